//! A patient: identifiers, names, contacts, languages.

use crate::validate::{Check, Path, SHORT_TEXT_BYTES_MAX};
use dossier_api::v1::Patient;

pub(crate) fn check(p: &mut Path<'_>, x: &Patient) -> Check {
    p.each("identifiers", &x.identifiers, |p, i| p.identifier(i))?;
    p.each("names", &x.names, |p, n| {
        p.enumeration::<dossier_api::v1::NameUse>("use", n.r#use, false)?;
        p.short("family", &n.family)?;
        for (i, g) in n.given.iter().enumerate() {
            p.short(&format!("given[{i}]"), g)?;
        }
        p.short("text", &n.text)?;
        if n.family.is_empty() && n.given.is_empty() && n.text.is_empty() {
            return p.fail("", "needs a family name, a given name or a text");
        }
        p.period("period", n.period.as_ref())
    })?;
    p.each("telecom", &x.telecom, |p, t| {
        p.enumeration::<dossier_api::v1::ContactPointSystem>("system", t.system, true)?;
        p.enumeration::<dossier_api::v1::ContactPointUse>("use", t.r#use, false)?;
        p.token("value", &t.value, SHORT_TEXT_BYTES_MAX)
            .or_else(|_| p.short("value", &t.value))
    })?;
    p.enumeration::<dossier_api::v1::AdministrativeGender>("gender", x.gender, false)?;
    p.date("birth_date", x.birth_date.as_ref())?;
    if let Some(dossier_api::v1::patient::Deceased::DeceasedTime(t)) = &x.deceased {
        p.date_time("deceased_time", Some(t))?;
    }
    p.each("addresses", &x.addresses, |p, a| {
        for (i, l) in a.lines.iter().enumerate() {
            p.short(&format!("lines[{i}]"), l)?;
        }
        p.short("city", &a.city)?;
        p.short("postal_code", &a.postal_code)?;
        p.short("country", &a.country)
    })?;
    p.each("contacts", &x.contacts, |p, c| {
        p.concepts("relationships", &c.relationships)
    })?;
    p.references("general_practitioners", &x.general_practitioners)?;
    for (i, l) in x.languages.iter().enumerate() {
        p.token(&format!("languages[{i}]"), l, 35)?;
    }
    Ok(())
}
