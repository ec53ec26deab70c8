//! A document held inline: a letter, a report, a scanned form.

use crate::validate::{Check, Path};
use dossier_api::v1::DocumentReference;

pub(crate) fn check(p: &mut Path<'_>, x: &DocumentReference) -> Check {
    p.enumeration::<dossier_api::v1::DocumentReferenceStatus>("status", x.status, true)?;
    p.concept_at("type", x.r#type.as_ref(), true)?;
    p.concepts("categories", &x.categories)?;
    p.date_time("date", x.date.as_ref())?;
    p.references("authors", &x.authors)?;
    p.free("description", &x.description)?;
    p.record_ref("encounter", x.encounter.as_ref())?;
    p.period("period", x.period.as_ref())?;
    let Some(content) = &x.content else {
        return p.fail("content", "is required");
    };
    p.with("content", |p| {
        p.token("content_type", &content.content_type, 255)?;
        p.short("title", &content.title)?;
        let max = p.limits.document_bytes_max;
        match &content.data {
            Some(dossier_api::v1::document_content::Data::Text(t)) if t.len() > max => {
                p.too_long("text", t.len(), max)
            }
            Some(dossier_api::v1::document_content::Data::Text(t)) => p.text("text", t, max, true),
            Some(dossier_api::v1::document_content::Data::Binary(b)) if b.len() > max => {
                p.too_long("binary", b.len(), max)
            }
            Some(dossier_api::v1::document_content::Data::Binary(_)) => Ok(()),
            None => p.fail("data", "is required (text or binary)"),
        }
    })
}
