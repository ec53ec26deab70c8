//! Validation of records as clients send them. The first violation, in field order and depth
//! first, is reported with the path of the field in the request (`resource.observation.code`)
//! and the rule it breaks. The rules are in docs/schema.md §1 and §3. This file holds what every
//! kind shares (the envelope, text bounds, codings, times, references, `unmodelled_json`); each
//! kind's own rules are in `kinds/<kind>.rs`.

use crate::{
    SYSTEM_INSZ, SYSTEM_LOINC, SYSTEM_SNOMED, insz_is_valid, is_valid_id, kind_field, kind_type,
    loinc_is_valid, snomed_is_valid,
};
use dossier_api::v1::{
    Annotation, CodeableConcept, Coding, Date, DatePrecision, DateTime, Identifier, Period,
    Quantity, RecordRef, RecordStatus, Reference, Resource, ResourceType, observation_value,
    reference, resource,
};

/// A violation: the field path, the rule, and the bound when one was exceeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: String,
    pub message: String,
    pub limit: Option<u64>,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl std::error::Error for Invalid {}

/// Configurable bounds (the fixed ones are constants below).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Free text: notes, descriptions, dosage text, document text.
    pub text_bytes_max: usize,
    /// Inline document content (text or binary).
    pub document_bytes_max: usize,
    /// Items in any repeated field.
    pub repeated_items_max: usize,
    /// `Resource.unmodelled_json`: the source elements a record keeps verbatim.
    pub unmodelled_bytes_max: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            text_bytes_max: 64 * 1024,
            document_bytes_max: 512 * 1024,
            repeated_items_max: 256,
            unmodelled_bytes_max: 64 * 1024,
        }
    }
}

pub(crate) const SYSTEM_BYTES_MAX: usize = 255;
pub(crate) const CODE_BYTES_MAX: usize = 128;
pub(crate) const IDENTIFIER_VALUE_BYTES_MAX: usize = 64;
pub(crate) const SHORT_TEXT_BYTES_MAX: usize = 1024;
const CODINGS_MAX: usize = 16;
const DECIMAL_BYTES_MAX: usize = 32;
/// −14:00 … +14:00.
const UTC_OFFSET_MINUTES_MAX: i32 = 14 * 60;

pub(crate) type Check = Result<(), Invalid>;

/// A path under construction: `resource.observation.codings[2].code`.
pub(crate) struct Path<'a> {
    pub(crate) limits: &'a Limits,
    parts: Vec<String>,
}

impl Path<'_> {
    pub(crate) fn at(&self, field: &str) -> String {
        let mut s = self.parts.join(".");
        if !field.is_empty() {
            if !s.is_empty() && !field.starts_with('[') {
                s.push('.');
            }
            s.push_str(field);
        }
        s
    }

    pub(crate) fn fail(&self, field: &str, message: impl Into<String>) -> Check {
        Err(Invalid {
            field: self.at(field),
            message: message.into(),
            limit: None,
        })
    }

    pub(crate) fn too_long(&self, field: &str, len: usize, max: usize) -> Check {
        Err(Invalid {
            field: self.at(field),
            message: format!("is {len} bytes, above the limit of {max}"),
            limit: Some(max as u64),
        })
    }

    /// Runs `f` one level down, at `field`.
    pub(crate) fn with(&mut self, field: &str, f: impl FnOnce(&mut Self) -> Check) -> Check {
        self.parts.push(field.to_owned());
        let r = f(self);
        self.parts.pop();
        r
    }

    pub(crate) fn each<T>(
        &mut self,
        field: &str,
        items: &[T],
        mut f: impl FnMut(&mut Self, &T) -> Check,
    ) -> Check {
        if items.len() > self.limits.repeated_items_max {
            return Err(Invalid {
                field: self.at(field),
                message: format!(
                    "has {} items, above the limit of {}",
                    items.len(),
                    self.limits.repeated_items_max
                ),
                limit: Some(self.limits.repeated_items_max as u64),
            });
        }
        for (i, item) in items.iter().enumerate() {
            self.with(&format!("{field}[{i}]"), |p| f(p, item))?;
        }
        Ok(())
    }

    /// Text without control characters (free text may hold TAB, LF and CR), within `max`.
    pub(crate) fn text(&self, field: &str, value: &str, max: usize, free: bool) -> Check {
        if value.len() > max {
            return self.too_long(field, value.len(), max);
        }
        let bad = value
            .chars()
            .any(|c| c.is_control() && !(free && matches!(c, '\t' | '\n' | '\r')));
        if bad {
            return self.fail(field, "must not contain control characters");
        }
        Ok(())
    }

    pub(crate) fn short(&self, field: &str, value: &str) -> Check {
        self.text(field, value, SHORT_TEXT_BYTES_MAX, false)
    }

    pub(crate) fn free(&self, field: &str, value: &str) -> Check {
        self.text(field, value, self.limits.text_bytes_max, true)
    }

    /// A token: non-empty, no white space or control characters, within `max`.
    pub(crate) fn token(&self, field: &str, value: &str, max: usize) -> Check {
        if value.is_empty() {
            return self.fail(field, "is required");
        }
        if value.len() > max {
            return self.too_long(field, value.len(), max);
        }
        if value.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return self.fail(field, "must not contain white space or control characters");
        }
        Ok(())
    }

    /// An enum field: a known value, and not UNSPECIFIED when `required`.
    pub(crate) fn enumeration<E: TryFrom<i32>>(
        &self,
        field: &str,
        raw: i32,
        required: bool,
    ) -> Check {
        if E::try_from(raw).is_err() {
            return self.fail(field, format!("unknown value {raw}"));
        }
        if required && raw == 0 {
            return self.fail(field, "is required");
        }
        Ok(())
    }

    pub(crate) fn coding(&mut self, c: &Coding) -> Check {
        self.token("system", &c.system, SYSTEM_BYTES_MAX)?;
        self.token("code", &c.code, CODE_BYTES_MAX)?;
        match c.system.as_str() {
            SYSTEM_LOINC if !loinc_is_valid(&c.code) => {
                self.fail("code", "is not a LOINC code (NNNNN-C with its check digit)")?
            }
            SYSTEM_SNOMED if !snomed_is_valid(&c.code) => self.fail(
                "code",
                "is not a SNOMED CT concept id (Verhoeff check digit, partition 00 or 10)",
            )?,
            _ => {}
        }
        self.short("display", &c.display)
    }

    pub(crate) fn concept(&mut self, c: &CodeableConcept) -> Check {
        if c.codings.len() > CODINGS_MAX {
            return Err(Invalid {
                field: self.at("codings"),
                message: format!(
                    "has {} codings, above the limit of {CODINGS_MAX}",
                    c.codings.len()
                ),
                limit: Some(CODINGS_MAX as u64),
            });
        }
        if c.codings.is_empty() && c.text.is_empty() {
            return self.fail("", "needs a coding or a text");
        }
        self.each("codings", &c.codings, |p, c| p.coding(c))?;
        self.short("text", &c.text)
    }

    pub(crate) fn concept_at(
        &mut self,
        field: &str,
        c: Option<&CodeableConcept>,
        required: bool,
    ) -> Check {
        match c {
            Some(c) => self.with(field, |p| p.concept(c)),
            None if required => self.fail(field, "is required"),
            None => Ok(()),
        }
    }

    pub(crate) fn concepts(&mut self, field: &str, items: &[CodeableConcept]) -> Check {
        self.each(field, items, |p, c| p.concept(c))
    }

    /// A concept that must carry a coding of one of `systems`.
    pub(crate) fn coded_in(
        &mut self,
        field: &str,
        c: Option<&CodeableConcept>,
        systems: &[&str],
    ) -> Check {
        self.concept_at(field, c, true)?;
        let has = c.is_some_and(|c| {
            c.codings
                .iter()
                .any(|coding| systems.contains(&coding.system.as_str()))
        });
        if !has {
            return self.fail(field, format!("needs a coding of {}", systems.join(" or ")));
        }
        Ok(())
    }

    pub(crate) fn date_time(&mut self, field: &str, t: Option<&DateTime>) -> Check {
        let Some(t) = t else { return Ok(()) };
        self.with(field, |p| {
            p.enumeration::<DatePrecision>("precision", t.precision, true)?;
            if t.utc_offset_minutes.abs() > UTC_OFFSET_MINUTES_MAX {
                return p.fail("utc_offset_minutes", "must be within -840..840");
            }
            if t.precision != DatePrecision::Time as i32 && t.utc_offset_minutes != 0 {
                return p.fail(
                    "utc_offset_minutes",
                    "must be 0 unless the precision is TIME",
                );
            }
            Ok(())
        })
    }

    pub(crate) fn period(&mut self, field: &str, period: Option<&Period>) -> Check {
        let Some(period) = period else { return Ok(()) };
        self.with(field, |p| {
            p.date_time("start", period.start.as_ref())?;
            p.date_time("end", period.end.as_ref())?;
            if let (Some(s), Some(e)) = (&period.start, &period.end)
                && s.unix_micros > e.unix_micros
            {
                return p.fail("end", "is before start");
            }
            Ok(())
        })
    }

    pub(crate) fn date(&mut self, field: &str, d: Option<&Date>) -> Check {
        let Some(d) = d else { return Ok(()) };
        self.with(field, |p| {
            if !(1..=9999).contains(&d.year) {
                return p.fail("year", "must be within 1..9999");
            }
            if d.month > 12 {
                return p.fail("month", "must be within 0..12");
            }
            let days = match d.month {
                0 => 0,
                2 if d.year % 4 == 0 && (d.year % 100 != 0 || d.year % 400 == 0) => 29,
                2 => 28,
                4 | 6 | 9 | 11 => 30,
                _ => 31,
            };
            if d.day > days {
                return p.fail("day", format!("must be within 0..{days} for that month"));
            }
            Ok(())
        })
    }

    pub(crate) fn quantity(&mut self, q: &Quantity) -> Check {
        if !is_decimal(&q.value) {
            return self.fail("value", "is not a decimal (-?digits[.digits][e[+-]digits])");
        }
        self.enumeration::<dossier_api::v1::QuantityComparator>("comparator", q.comparator, false)?;
        self.short("unit", &q.unit)?;
        if !q.code.is_empty() {
            self.token("system", &q.system, SYSTEM_BYTES_MAX)?;
            self.token("code", &q.code, CODE_BYTES_MAX)?;
        }
        Ok(())
    }

    pub(crate) fn identifier(&mut self, id: &Identifier) -> Check {
        self.token("system", &id.system, SYSTEM_BYTES_MAX)?;
        if id.system.contains('|') {
            return self.fail("system", "must not contain '|'");
        }
        self.token("value", &id.value, IDENTIFIER_VALUE_BYTES_MAX)?;
        if id.system == SYSTEM_INSZ && !insz_is_valid(&id.value) {
            return self.fail(
                "value",
                "is not a valid INSZ/NISS number (11 digits, check digits mod 97)",
            );
        }
        self.concept_at("type", id.r#type.as_ref(), false)
    }

    pub(crate) fn record_ref(&mut self, field: &str, r: Option<&RecordRef>) -> Check {
        let Some(r) = r else { return Ok(()) };
        self.with(field, |p| {
            p.enumeration::<ResourceType>("type", r.r#type, true)?;
            if r.r#type == ResourceType::Patient as i32 {
                return p.fail(
                    "type",
                    "must not be Patient (the record's patient is implied)",
                );
            }
            if !is_valid_id(&r.id) {
                return p.fail("id", "must match [A-Za-z0-9.-]{1,64}");
            }
            Ok(())
        })
    }

    pub(crate) fn reference(&mut self, r: &Reference) -> Check {
        self.short("display", &r.display)?;
        self.enumeration::<dossier_api::v1::EntityType>("entity_type", r.entity_type, false)?;
        match &r.target {
            Some(reference::Target::Record(rec)) => {
                if r.entity_type != 0 {
                    return self.fail("entity_type", "must be unset for a record reference");
                }
                self.record_ref("record", Some(rec))
            }
            Some(reference::Target::Identifier(id)) => {
                if r.entity_type == 0 {
                    return self.fail("entity_type", "is required with an identifier");
                }
                self.with("identifier", |p| p.identifier(id))
            }
            None if r.display.is_empty() => {
                self.fail("", "needs a record, an identifier or a display")
            }
            None => Ok(()),
        }
    }

    pub(crate) fn reference_at(
        &mut self,
        field: &str,
        r: Option<&Reference>,
        required: bool,
    ) -> Check {
        match r {
            Some(r) => self.with(field, |p| p.reference(r)),
            None if required => self.fail(field, "is required"),
            None => Ok(()),
        }
    }

    pub(crate) fn references(&mut self, field: &str, items: &[Reference]) -> Check {
        self.each(field, items, |p, r| p.reference(r))
    }

    pub(crate) fn record_refs(&mut self, field: &str, items: &[RecordRef]) -> Check {
        if items.len() > self.limits.repeated_items_max {
            return self.fail(field, "has too many items");
        }
        for (i, r) in items.iter().enumerate() {
            self.record_ref(&format!("{field}[{i}]"), Some(r))?;
        }
        Ok(())
    }

    /// A record reference that must name a record of one of `types`.
    pub(crate) fn record_ref_of(
        &mut self,
        field: &str,
        r: Option<&RecordRef>,
        types: &[ResourceType],
    ) -> Check {
        self.record_ref(field, r)?;
        if let Some(r) = r
            && !types.iter().any(|t| *t as i32 == r.r#type)
        {
            let names: Vec<&str> = types.iter().filter_map(|t| crate::type_name(*t)).collect();
            return self.fail(
                &format!("{field}.type"),
                format!("must be {}", names.join(" or ")),
            );
        }
        Ok(())
    }

    /// Record references that must each name a record of one of `types`.
    pub(crate) fn record_refs_of(
        &mut self,
        field: &str,
        items: &[RecordRef],
        types: &[ResourceType],
    ) -> Check {
        self.record_refs(field, items)?;
        for (i, r) in items.iter().enumerate() {
            self.record_ref_of(&format!("{field}[{i}]"), Some(r), types)?;
        }
        Ok(())
    }

    /// An optional coding.
    pub(crate) fn coding_at(&mut self, field: &str, c: Option<&Coding>, required: bool) -> Check {
        match c {
            Some(c) => self.with(field, |p| p.coding(c)),
            None if required => self.fail(field, "is required"),
            None => Ok(()),
        }
    }

    pub(crate) fn notes(&mut self, items: &[Annotation]) -> Check {
        self.each("notes", items, |p, n| {
            if n.text.is_empty() {
                return p.fail("text", "is required");
            }
            p.free("text", &n.text)?;
            p.reference_at("author", n.author.as_ref(), false)?;
            p.date_time("time", n.time.as_ref())
        })
    }

    pub(crate) fn kind(&mut self, kind: &resource::Kind) -> Check {
        use resource::Kind as K;
        let field = kind_field(kind_type(kind));
        self.with(field, |p| match kind {
            K::Patient(x) => crate::kinds::patient::check(p, x),
            K::Encounter(x) => crate::kinds::encounter::check(p, x),
            K::Observation(x) => crate::kinds::observation::check(p, x),
            K::Condition(x) => crate::kinds::condition::check(p, x),
            K::AllergyIntolerance(x) => crate::kinds::allergy_intolerance::check(p, x),
            K::MedicationRequest(x) => crate::kinds::medication_request::check(p, x),
            K::Procedure(x) => crate::kinds::procedure::check(p, x),
            K::DocumentReference(x) => crate::kinds::document_reference::check(p, x),
            K::CareRelationship(x) => crate::kinds::care_relationship::check(p, x),
            K::Consent(x) => crate::kinds::consent::check(p, x),
            K::Immunization(x) => crate::kinds::immunization::check(p, x),
            K::DiagnosticReport(x) => crate::kinds::diagnostic_report::check(p, x),
            K::CarePlan(x) => crate::kinds::care_plan::check(p, x),
            K::Goal(x) => crate::kinds::goal::check(p, x),
            K::ImagingStudy(x) => crate::kinds::imaging_study::check(p, x),
        })
    }
}

pub(crate) fn observation_value_check(
    p: &mut Path<'_>,
    v: &dossier_api::v1::ObservationValue,
) -> Check {
    match &v.kind {
        Some(observation_value::Kind::Quantity(q)) => p.with("quantity", |p| p.quantity(q)),
        Some(observation_value::Kind::Concept(c)) => p.with("concept", |p| p.concept(c)),
        Some(observation_value::Kind::Text(t)) => p.free("text", t),
        Some(observation_value::Kind::Boolean(_)) => Ok(()),
        None => p.fail("kind", "is required when value is present"),
    }
}

/// FHIR decimal: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`, at most 32 bytes.
pub(crate) fn is_decimal(s: &str) -> bool {
    if s.is_empty() || s.len() > DECIMAL_BYTES_MAX {
        return false;
    }
    let b = s.as_bytes();
    let mut i = usize::from(b[0] == b'-');
    let digits = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i - start
    };
    let int_start = i;
    let n = digits(&mut i);
    if n == 0 || (n > 1 && b[int_start] == b'0') {
        return false;
    }
    if i < b.len() && b[i] == b'.' {
        i += 1;
        if digits(&mut i) == 0 {
            return false;
        }
    }
    if i < b.len() && (b[i] == b'e' || b[i] == b'E') {
        i += 1;
        if i < b.len() && (b[i] == b'+' || b[i] == b'-') {
            i += 1;
        }
        if digits(&mut i) == 0 {
            return false;
        }
    }
    i == b.len()
}

/// Checks a record's content (its kind), under `prefix` (e.g. `resource`), whatever its meta.
pub fn validate_record_content(resource: &Resource, prefix: &str, limits: &Limits) -> Check {
    let mut p = Path {
        limits,
        parts: vec![prefix.to_owned()],
    };
    match &resource.kind {
        Some(kind) => p.kind(kind)?,
        None => p.fail("kind", "is required (one resource kind)")?,
    }
    unmodelled_json(&p, &resource.unmodelled_json)
}

/// `Resource.unmodelled_json`: empty, or a JSON object within `unmodelled_bytes_max`. Its content
/// is the source's own and is not checked further: it is never interpreted, only given back.
fn unmodelled_json(p: &Path<'_>, text: &str) -> Check {
    if text.is_empty() {
        return Ok(());
    }
    let max = p.limits.unmodelled_bytes_max;
    if text.len() > max {
        return p.too_long("unmodelled_json", text.len(), max);
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(_)) => Ok(()),
        Ok(_) => p.fail("unmodelled_json", "must be a JSON object"),
        Err(_) => p.fail("unmodelled_json", "is not JSON"),
    }
}

/// Checks a record a client sends for a create or an update: its kind and content, its
/// client-set meta (id, patient), and that the server-set meta fields are unset.
pub fn validate_new_record(
    resource: &Resource,
    prefix: &str,
    patient_id: &str,
    limits: &Limits,
) -> Check {
    let p = Path {
        limits,
        parts: vec![prefix.to_owned()],
    };
    let Some(meta) = &resource.meta else {
        return p.fail("meta", "is required (it carries the record id)");
    };
    if !is_valid_id(&meta.id) {
        return p.fail("meta.id", "must match [A-Za-z0-9.-]{1,64}");
    }
    if !meta.patient_id.is_empty() && meta.patient_id != patient_id {
        return p.fail("meta.patient_id", "must be empty or equal route.patient_id");
    }
    if meta.version != 0
        || meta.last_updated_micros != 0
        || meta.author.is_some()
        || meta.status != RecordStatus::Unspecified as i32
        || !meta.status_reason.is_empty()
        || !meta.request_id.is_empty()
    {
        return p.fail(
            "meta",
            "version, last_updated_micros, author, status, status_reason and request_id are \
             set by the server and must be unset",
        );
    }
    p.short("meta.source", &meta.source)?;
    validate_record_content(resource, prefix, limits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dossier_api::v1::{Meta, Observation, ObservationStatus, ObservationValue, Patient};

    fn observation(code: &str, value: &str) -> Resource {
        Resource {
            meta: Some(Meta {
                id: "obs-1".into(),
                ..Meta::default()
            }),
            kind: Some(resource::Kind::Observation(Observation {
                status: ObservationStatus::Final as i32,
                code: Some(CodeableConcept {
                    codings: vec![Coding {
                        system: SYSTEM_LOINC.into(),
                        code: code.into(),
                        display: "Body height".into(),
                    }],
                    text: String::new(),
                }),
                value: Some(ObservationValue {
                    kind: Some(observation_value::Kind::Quantity(Quantity {
                        value: value.into(),
                        unit: "cm".into(),
                        system: crate::SYSTEM_UCUM.into(),
                        code: "cm".into(),
                        ..Quantity::default()
                    })),
                }),
                ..Observation::default()
            })),
            unmodelled_json: String::new(),
        }
    }

    fn check(r: &Resource) -> Result<(), Invalid> {
        validate_new_record(r, "resource", "patient-1", &Limits::default())
    }

    #[test]
    fn a_good_observation_passes_and_bad_fields_are_named() {
        check(&observation("8302-2", "116.55007050417136")).unwrap();
        let e = check(&observation("8302-3", "1")).unwrap_err();
        assert_eq!(e.field, "resource.observation.code.codings[0].code");
        assert!(e.message.contains("LOINC"), "{e}");
        let e = check(&observation("8302-2", "1.")).unwrap_err();
        assert_eq!(e.field, "resource.observation.value.quantity.value");
        let mut r = observation("8302-2", "1");
        r.meta.as_mut().unwrap().version = 3;
        assert_eq!(check(&r).unwrap_err().field, "resource.meta");
        r.meta = None;
        assert_eq!(check(&r).unwrap_err().field, "resource.meta");
        let mut r = observation("8302-2", "1");
        r.kind = None;
        assert_eq!(check(&r).unwrap_err().field, "resource.kind");
    }

    #[test]
    fn patient_identifiers_are_checked() {
        let patient = |value: &str| Resource {
            meta: Some(Meta {
                id: "patient-1".into(),
                ..Meta::default()
            }),
            kind: Some(resource::Kind::Patient(Patient {
                identifiers: vec![Identifier {
                    system: SYSTEM_INSZ.into(),
                    value: value.into(),
                    r#type: None,
                }],
                ..Patient::default()
            })),
            unmodelled_json: String::new(),
        };
        check(&patient("85073003328")).unwrap();
        let e = check(&patient("85073003329")).unwrap_err();
        assert_eq!(e.field, "resource.patient.identifiers[0].value");
        assert!(e.message.contains("INSZ"));
    }

    #[test]
    fn oversized_documents_are_refused_with_the_limit() {
        let r = Resource {
            meta: Some(Meta {
                id: "letter".into(),
                ..Meta::default()
            }),
            kind: Some(resource::Kind::DocumentReference(
                dossier_api::v1::DocumentReference {
                    status: dossier_api::v1::DocumentReferenceStatus::Current as i32,
                    r#type: Some(CodeableConcept {
                        codings: vec![],
                        text: "Discharge letter".into(),
                    }),
                    content: Some(dossier_api::v1::DocumentContent {
                        content_type: "text/plain".into(),
                        data: Some(dossier_api::v1::document_content::Data::Text(
                            "x".repeat(50 << 20),
                        )),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )),
            unmodelled_json: String::new(),
        };
        let e = check(&r).unwrap_err();
        assert_eq!(e.field, "resource.document_reference.content.text");
        assert_eq!(e.limit, Some(512 * 1024));
    }

    #[test]
    fn decimals() {
        for ok in ["0", "-1", "1.50", "116.55007050417136", "1e10", "2.5E-3"] {
            assert!(is_decimal(ok), "{ok}");
        }
        for bad in [
            "",
            "01",
            "1.",
            ".5",
            "1e",
            "+1",
            "1,5",
            "NaN",
            &"9".repeat(33),
        ] {
            assert!(!is_decimal(bad), "{bad}");
        }
    }
}
