//! Typed records → FHIR R4 JSON (docs/schema.md §3 for the element mapping).

use serde_json::{Map, Number, Value, json};

use crate::codes::*;
use crate::time::{format_date, format_date_time, format_instant};
use dossier_api::v1::{
    Address, Annotation, CodeableConcept, Coding, ContactPoint, DateTime, HumanName, Identifier,
    ObservationValue, Period, Quantity, RecordRef, RecordStatus, Reference, Resource, ResourceType,
    diagnostic_report, observation, observation_value, patient, reference, resource,
};
use dossier_records::type_name;

struct Out(Map<String, Value>);

impl Out {
    fn new() -> Self {
        Out(Map::new())
    }
    fn put(&mut self, k: &str, v: Value) {
        let empty = match &v {
            Value::Null => true,
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => false,
        };
        if !empty {
            self.0.insert(k.to_owned(), v);
        }
    }
    fn code(&mut self, k: &str, table: &[&'static str], raw: i32) {
        if let Some(c) = code_of(table, raw) {
            self.put(k, json!(c));
        }
    }
    fn done(self) -> Value {
        Value::Object(self.0)
    }
}

fn coding(c: &Coding) -> Value {
    let mut o = Out::new();
    o.put("system", json!(c.system));
    o.put("code", json!(c.code));
    o.put("display", json!(c.display));
    o.done()
}

fn concept(c: &CodeableConcept) -> Value {
    let mut o = Out::new();
    o.put(
        "coding",
        Value::Array(c.codings.iter().map(coding).collect()),
    );
    o.put("text", json!(c.text));
    o.done()
}

fn concept_opt(c: Option<&CodeableConcept>) -> Value {
    c.map_or(Value::Null, concept)
}

fn concepts(cs: &[CodeableConcept]) -> Value {
    Value::Array(cs.iter().map(concept).collect())
}

/// A status kept as a CodeableConcept in FHIR (e.g. Condition.clinicalStatus).
fn status_concept(system: &str, table: &[&'static str], raw: i32) -> Value {
    match code_of(table, raw) {
        Some(c) => json!({"coding": [{"system": system, "code": c}]}),
        None => Value::Null,
    }
}

fn date_time(t: Option<&DateTime>) -> Value {
    t.map_or(Value::Null, |t| json!(format_date_time(t)))
}

fn period(p: Option<&Period>) -> Value {
    let Some(p) = p else { return Value::Null };
    let mut o = Out::new();
    o.put("start", date_time(p.start.as_ref()));
    o.put("end", date_time(p.end.as_ref()));
    o.done()
}

/// A decimal kept as its text: a JSON number with exactly those digits.
fn decimal(text: &str) -> Value {
    text.parse::<Number>()
        .map_or_else(|_| json!(text), Value::Number)
}

fn quantity(q: &Quantity) -> Value {
    let mut o = Out::new();
    o.put("value", decimal(&q.value));
    o.code("comparator", QUANTITY_COMPARATOR, q.comparator);
    o.put("unit", json!(q.unit));
    o.put("system", json!(q.system));
    o.put("code", json!(q.code));
    o.done()
}

fn identifier(i: &Identifier) -> Value {
    let mut o = Out::new();
    o.put("type", concept_opt(i.r#type.as_ref()));
    o.put("system", json!(i.system));
    o.put("value", json!(i.value));
    o.done()
}

fn record_ref(r: &RecordRef) -> Value {
    let t = ResourceType::try_from(r.r#type)
        .ok()
        .and_then(type_name)
        .unwrap_or("Unknown");
    json!({"reference": format!("{t}/{}", r.id)})
}

fn record_ref_opt(r: Option<&RecordRef>) -> Value {
    r.map_or(Value::Null, record_ref)
}

fn reference_value(r: &Reference) -> Value {
    let mut o = Out::new();
    match &r.target {
        Some(reference::Target::Record(rr)) => {
            o.0.extend(record_ref(rr).as_object().cloned().unwrap_or_default());
        }
        Some(reference::Target::Identifier(i)) => {
            if let Some(t) = code_of(ENTITY_TYPE, r.entity_type) {
                o.put("type", json!(t));
            }
            o.put("identifier", identifier(i));
        }
        None => {}
    }
    o.put("display", json!(r.display));
    o.done()
}

fn reference_opt(r: Option<&Reference>) -> Value {
    r.map_or(Value::Null, reference_value)
}

fn references(rs: &[Reference]) -> Value {
    Value::Array(rs.iter().map(reference_value).collect())
}

fn annotations(notes: &[Annotation]) -> Value {
    Value::Array(
        notes
            .iter()
            .map(|n| {
                let mut o = Out::new();
                o.put("authorReference", reference_opt(n.author.as_ref()));
                o.put("time", date_time(n.time.as_ref()));
                o.put("text", json!(n.text));
                o.done()
            })
            .collect(),
    )
}

fn human_name(n: &HumanName) -> Value {
    let mut o = Out::new();
    o.code("use", NAME_USE, n.r#use);
    o.put("text", json!(n.text));
    o.put("family", json!(n.family));
    o.put("given", json!(n.given));
    o.put("prefix", json!(n.prefix));
    o.put("suffix", json!(n.suffix));
    o.put("period", period(n.period.as_ref()));
    o.done()
}

fn contact_point(c: &ContactPoint) -> Value {
    let mut o = Out::new();
    o.code("system", CONTACT_POINT_SYSTEM, c.system);
    o.put("value", json!(c.value));
    o.code("use", CONTACT_POINT_USE, c.r#use);
    if c.rank > 0 {
        o.put("rank", json!(c.rank));
    }
    o.done()
}

fn address(a: &Address) -> Value {
    let mut o = Out::new();
    o.code("use", ADDRESS_USE, a.r#use);
    o.put("line", json!(a.lines));
    o.put("city", json!(a.city));
    o.put("district", json!(a.district));
    o.put("state", json!(a.state));
    o.put("postalCode", json!(a.postal_code));
    o.put("country", json!(a.country));
    o.done()
}

fn value_into(o: &mut Out, prefix: &str, v: Option<&ObservationValue>) {
    match v.and_then(|v| v.kind.as_ref()) {
        Some(observation_value::Kind::Quantity(q)) => {
            o.put(&format!("{prefix}Quantity"), quantity(q))
        }
        Some(observation_value::Kind::Concept(c)) => {
            o.put(&format!("{prefix}CodeableConcept"), concept(c))
        }
        Some(observation_value::Kind::Text(t)) => o.put(&format!("{prefix}String"), json!(t)),
        Some(observation_value::Kind::Boolean(b)) => o.put(&format!("{prefix}Boolean"), json!(b)),
        None => {}
    }
}

/// The FHIR resource type a record is exported as.
pub fn fhir_type(t: ResourceType) -> &'static str {
    match t {
        ResourceType::CareRelationship => "CareTeam",
        other => type_name(other).unwrap_or("Unknown"),
    }
}

/// One record as a FHIR R4 resource. Records marked entered-in-error carry that status where
/// the FHIR type has one.
pub fn to_fhir(r: &Resource) -> Value {
    let meta = r.meta.clone().unwrap_or_default();
    let in_error = meta.status == RecordStatus::EnteredInError as i32;
    let mut o = Out::new();
    let Some(kind) = &r.kind else {
        return Value::Null;
    };
    let t = dossier_records::kind_type(kind);
    o.put("resourceType", json!(fhir_type(t)));
    o.put("id", json!(meta.id));
    let mut m = Out::new();
    if meta.version > 0 {
        m.put("versionId", json!(meta.version.to_string()));
    }
    if meta.last_updated_micros > 0 {
        m.put(
            "lastUpdated",
            json!(format_instant(meta.last_updated_micros)),
        );
    }
    m.put("source", json!(meta.source));
    o.put("meta", m.done());
    let subject = json!({"reference": format!("Patient/{}", meta.patient_id)});
    let status = |o: &mut Out, table: &[&'static str], raw: i32| {
        if in_error {
            o.put("status", json!("entered-in-error"));
        } else {
            o.code("status", table, raw);
        }
    };
    use resource::Kind as K;
    match kind {
        K::Patient(p) => {
            if in_error {
                o.put("active", json!(false));
            }
            o.put(
                "identifier",
                Value::Array(p.identifiers.iter().map(identifier).collect()),
            );
            o.put(
                "name",
                Value::Array(p.names.iter().map(human_name).collect()),
            );
            o.put(
                "telecom",
                Value::Array(p.telecom.iter().map(contact_point).collect()),
            );
            o.code("gender", GENDER, p.gender);
            if let Some(d) = &p.birth_date {
                o.put("birthDate", json!(format_date(d)));
            }
            match &p.deceased {
                Some(patient::Deceased::DeceasedFlag(b)) => o.put("deceasedBoolean", json!(b)),
                Some(patient::Deceased::DeceasedTime(t)) => {
                    o.put("deceasedDateTime", date_time(Some(t)))
                }
                None => {}
            }
            o.put(
                "address",
                Value::Array(p.addresses.iter().map(address).collect()),
            );
            o.put(
                "contact",
                Value::Array(
                    p.contacts
                        .iter()
                        .map(|c| {
                            let mut x = Out::new();
                            x.put("relationship", concepts(&c.relationships));
                            x.put("name", c.name.as_ref().map_or(Value::Null, human_name));
                            x.put(
                                "telecom",
                                Value::Array(c.telecom.iter().map(contact_point).collect()),
                            );
                            x.put("address", c.address.as_ref().map_or(Value::Null, address));
                            x.done()
                        })
                        .collect(),
                ),
            );
            o.put("generalPractitioner", references(&p.general_practitioners));
            o.put(
                "communication",
                Value::Array(
                    p.languages
                        .iter()
                        .map(|l| json!({"language": {"coding": [{"system": "urn:ietf:bcp:47", "code": l}]}}))
                        .collect(),
                ),
            );
        }
        K::Encounter(e) => {
            status(&mut o, ENCOUNTER_STATUS, e.status);
            o.put(
                "class",
                e.encounter_class.as_ref().map_or(Value::Null, coding),
            );
            o.put("type", concepts(&e.types));
            o.put("subject", subject);
            o.put(
                "participant",
                Value::Array(
                    e.participants
                        .iter()
                        .map(|p| {
                            let mut x = Out::new();
                            x.put("type", concepts(&p.types));
                            x.put("period", period(p.period.as_ref()));
                            x.put("individual", reference_opt(p.individual.as_ref()));
                            x.done()
                        })
                        .collect(),
                ),
            );
            o.put("period", period(e.period.as_ref()));
            o.put("reasonCode", concepts(&e.reason_codes));
            o.put(
                "reasonReference",
                Value::Array(e.reason_records.iter().map(record_ref).collect()),
            );
            if let Some(d) = &e.discharge_disposition {
                o.put(
                    "hospitalization",
                    json!({"dischargeDisposition": concept(d)}),
                );
            }
            o.put(
                "serviceProvider",
                reference_opt(e.service_provider.as_ref()),
            );
        }
        K::Observation(x) => {
            status(&mut o, OBSERVATION_STATUS, x.status);
            o.put("category", concepts(&x.categories));
            o.put("code", concept_opt(x.code.as_ref()));
            o.put("subject", subject);
            o.put("encounter", record_ref_opt(x.encounter.as_ref()));
            match &x.effective {
                Some(observation::Effective::EffectiveTime(t)) => {
                    o.put("effectiveDateTime", date_time(Some(t)))
                }
                Some(observation::Effective::EffectivePeriod(p)) => {
                    o.put("effectivePeriod", period(Some(p)))
                }
                None => {}
            }
            o.put("issued", date_time(x.issued.as_ref()));
            o.put("performer", references(&x.performers));
            value_into(&mut o, "value", x.value.as_ref());
            o.put(
                "dataAbsentReason",
                concept_opt(x.data_absent_reason.as_ref()),
            );
            o.put("interpretation", concepts(&x.interpretations));
            o.put("note", annotations(&x.notes));
            o.put(
                "referenceRange",
                Value::Array(
                    x.reference_ranges
                        .iter()
                        .map(|r| {
                            let mut y = Out::new();
                            y.put("low", r.low.as_ref().map_or(Value::Null, quantity));
                            y.put("high", r.high.as_ref().map_or(Value::Null, quantity));
                            y.put("type", concept_opt(r.r#type.as_ref()));
                            y.put("text", json!(r.text));
                            y.done()
                        })
                        .collect(),
                ),
            );
            o.put(
                "component",
                Value::Array(
                    x.components
                        .iter()
                        .map(|c| {
                            let mut y = Out::new();
                            y.put("code", concept_opt(c.code.as_ref()));
                            value_into(&mut y, "value", c.value.as_ref());
                            y.put(
                                "dataAbsentReason",
                                concept_opt(c.data_absent_reason.as_ref()),
                            );
                            y.put("interpretation", concepts(&c.interpretations));
                            y.done()
                        })
                        .collect(),
                ),
            );
        }
        K::Condition(c) => {
            o.put(
                "clinicalStatus",
                status_concept(
                    SYS_CONDITION_CLINICAL,
                    CONDITION_CLINICAL,
                    c.clinical_status,
                ),
            );
            if in_error {
                o.put("verificationStatus", json!({"coding": [{"system": SYS_CONDITION_VERIFICATION, "code": "entered-in-error"}]}));
            } else {
                o.put(
                    "verificationStatus",
                    status_concept(
                        SYS_CONDITION_VERIFICATION,
                        CONDITION_VERIFICATION,
                        c.verification_status,
                    ),
                );
            }
            o.put("category", concepts(&c.categories));
            o.put("severity", concept_opt(c.severity.as_ref()));
            o.put("code", concept_opt(c.code.as_ref()));
            o.put("bodySite", concepts(&c.body_sites));
            o.put("subject", subject);
            o.put("encounter", record_ref_opt(c.encounter.as_ref()));
            o.put("onsetDateTime", date_time(c.onset.as_ref()));
            o.put("abatementDateTime", date_time(c.abatement.as_ref()));
            o.put("recordedDate", date_time(c.recorded.as_ref()));
            o.put("asserter", reference_opt(c.asserter.as_ref()));
            o.put("note", annotations(&c.notes));
        }
        K::AllergyIntolerance(a) => {
            o.put(
                "clinicalStatus",
                status_concept(SYS_ALLERGY_CLINICAL, ALLERGY_CLINICAL, a.clinical_status),
            );
            if in_error {
                o.put("verificationStatus", json!({"coding": [{"system": SYS_ALLERGY_VERIFICATION, "code": "entered-in-error"}]}));
            } else {
                o.put(
                    "verificationStatus",
                    status_concept(
                        SYS_ALLERGY_VERIFICATION,
                        ALLERGY_VERIFICATION,
                        a.verification_status,
                    ),
                );
            }
            o.code("type", ALLERGY_TYPE, a.r#type);
            o.put(
                "category",
                Value::Array(
                    a.categories
                        .iter()
                        .filter_map(|c| code_of(ALLERGY_CATEGORY, *c))
                        .map(|c| json!(c))
                        .collect(),
                ),
            );
            o.code("criticality", ALLERGY_CRITICALITY, a.criticality);
            o.put("code", concept_opt(a.code.as_ref()));
            o.put("patient", subject);
            o.put("encounter", record_ref_opt(a.encounter.as_ref()));
            o.put("onsetDateTime", date_time(a.onset.as_ref()));
            o.put("recordedDate", date_time(a.recorded.as_ref()));
            o.put("recorder", reference_opt(a.recorder.as_ref()));
            o.put("lastOccurrence", date_time(a.last_occurrence.as_ref()));
            o.put("note", annotations(&a.notes));
            o.put(
                "reaction",
                Value::Array(
                    a.reactions
                        .iter()
                        .map(|r| {
                            let mut y = Out::new();
                            y.put("substance", concept_opt(r.substance.as_ref()));
                            y.put("manifestation", concepts(&r.manifestations));
                            y.put("description", json!(r.description));
                            y.put("onset", date_time(r.onset.as_ref()));
                            y.code("severity", ALLERGY_SEVERITY, r.severity);
                            y.done()
                        })
                        .collect(),
                ),
            );
        }
        K::MedicationRequest(m) => {
            status(&mut o, MEDICATION_REQUEST_STATUS, m.status);
            o.code("intent", MEDICATION_REQUEST_INTENT, m.intent);
            o.put(
                "medicationCodeableConcept",
                concept_opt(m.medication.as_ref()),
            );
            o.put("subject", subject);
            o.put("encounter", record_ref_opt(m.encounter.as_ref()));
            o.put("authoredOn", date_time(m.authored_on.as_ref()));
            o.put("requester", reference_opt(m.requester.as_ref()));
            o.put("reasonCode", concepts(&m.reason_codes));
            o.put(
                "reasonReference",
                Value::Array(m.reason_records.iter().map(record_ref).collect()),
            );
            o.put("note", annotations(&m.notes));
            o.put(
                "dosageInstruction",
                Value::Array(
                    m.dosage_instructions
                        .iter()
                        .map(|d| {
                            let mut y = Out::new();
                            if d.sequence > 0 {
                                y.put("sequence", json!(d.sequence));
                            }
                            y.put("text", json!(d.text));
                            let mut rep = Out::new();
                            if d.frequency > 0 {
                                rep.put("frequency", json!(d.frequency));
                            }
                            if !d.period.is_empty() {
                                rep.put("period", decimal(&d.period));
                            }
                            rep.code("periodUnit", TIME_UNIT, d.period_unit);
                            let rep = rep.done();
                            if rep.as_object().is_some_and(|r| !r.is_empty()) {
                                y.put("timing", json!({"repeat": rep}));
                            }
                            if d.as_needed {
                                match &d.as_needed_reason {
                                    Some(c) => y.put("asNeededCodeableConcept", concept(c)),
                                    None => y.put("asNeededBoolean", json!(true)),
                                }
                            }
                            y.put("route", concept_opt(d.route.as_ref()));
                            if let Some(q) = &d.dose {
                                y.put("doseAndRate", json!([{"doseQuantity": quantity(q)}]));
                            }
                            y.done()
                        })
                        .collect(),
                ),
            );
        }
        K::Procedure(p) => {
            status(&mut o, PROCEDURE_STATUS, p.status);
            o.put("code", concept_opt(p.code.as_ref()));
            o.put("subject", subject);
            o.put("encounter", record_ref_opt(p.encounter.as_ref()));
            match &p.performed {
                Some(dossier_api::v1::procedure::Performed::PerformedTime(t)) => {
                    o.put("performedDateTime", date_time(Some(t)))
                }
                Some(dossier_api::v1::procedure::Performed::PerformedPeriod(x)) => {
                    o.put("performedPeriod", period(Some(x)))
                }
                None => {}
            }
            o.put(
                "performer",
                Value::Array(
                    p.performers
                        .iter()
                        .map(|r| json!({"actor": reference_value(r)}))
                        .collect(),
                ),
            );
            o.put("reasonCode", concepts(&p.reason_codes));
            o.put(
                "reasonReference",
                Value::Array(p.reason_records.iter().map(record_ref).collect()),
            );
            o.put("bodySite", concepts(&p.body_sites));
            o.put("outcome", concept_opt(p.outcome.as_ref()));
            o.put("note", annotations(&p.notes));
        }
        K::DocumentReference(d) => {
            status(&mut o, DOCUMENT_REFERENCE_STATUS, d.status);
            o.put("type", concept_opt(d.r#type.as_ref()));
            o.put("category", concepts(&d.categories));
            o.put("subject", subject);
            if let Some(t) = &d.date {
                // FHIR R4 DocumentReference.date is an instant.
                o.put("date", json!(format_date_time(t)));
            }
            o.put("author", references(&d.authors));
            o.put("description", json!(d.description));
            if let Some(c) = &d.content {
                let mut a = Out::new();
                a.put("contentType", json!(c.content_type));
                a.put("language", json!(c.language));
                a.put("title", json!(c.title));
                match &c.data {
                    Some(dossier_api::v1::document_content::Data::Text(t)) => {
                        a.put("data", json!(super::base64_encode(t.as_bytes())))
                    }
                    Some(dossier_api::v1::document_content::Data::Binary(b)) => {
                        a.put("data", json!(super::base64_encode(b)))
                    }
                    None => {}
                }
                o.put("content", json!([{"attachment": a.done()}]));
            }
            let mut ctx = Out::new();
            if let Some(e) = &d.encounter {
                ctx.put("encounter", json!([record_ref(e)]));
            }
            ctx.put("period", period(d.period.as_ref()));
            o.put("context", ctx.done());
        }
        K::CareRelationship(c) => {
            status(&mut o, CARE_RELATIONSHIP_STATUS, c.status);
            o.put("subject", subject);
            o.put("period", period(c.period.as_ref()));
            let mut part = Out::new();
            part.put(
                "role",
                c.role.as_ref().map_or(Value::Null, |r| json!([concept(r)])),
            );
            part.put("member", reference_opt(c.participant.as_ref()));
            o.put("participant", json!([part.done()]));
            o.put("reasonCode", concepts(&c.reason_codes));
            o.put(
                "managingOrganization",
                c.managing_organization
                    .as_ref()
                    .map_or(Value::Null, |r| json!([reference_value(r)])),
            );
        }
        K::Consent(c) => {
            status(&mut o, CONSENT_STATUS, c.status);
            o.put("scope", concept_opt(c.scope.as_ref()));
            o.put("category", concepts(&c.categories));
            o.put("patient", subject);
            o.put("dateTime", date_time(c.date_time.as_ref()));
            o.put("performer", references(&c.performers));
            o.put("policyRule", concept_opt(c.policy_rule.as_ref()));
            if let Some(s) = &c.source {
                o.put("sourceReference", record_ref(s));
            }
            let mut p = Out::new();
            p.code("type", CONSENT_DECISION, c.decision);
            p.put("period", period(c.period.as_ref()));
            p.put(
                "actor",
                Value::Array(
                    c.actors
                        .iter()
                        .map(|a| {
                            let mut y = Out::new();
                            y.put("role", concept_opt(a.role.as_ref()));
                            y.put("reference", reference_opt(a.reference.as_ref()));
                            y.done()
                        })
                        .collect(),
                ),
            );
            p.put("action", concepts(&c.actions));
            p.put(
                "purpose",
                Value::Array(c.purposes.iter().map(coding).collect()),
            );
            p.put(
                "class",
                Value::Array(
                    c.resource_types
                        .iter()
                        .filter_map(|t| ResourceType::try_from(*t).ok())
                        .map(|t| json!({"system": "http://hl7.org/fhir/resource-types", "code": fhir_type(t)}))
                        .collect(),
                ),
            );
            o.put("provision", p.done());
        }
        K::Immunization(x) => {
            status(&mut o, IMMUNIZATION_STATUS, x.status);
            o.put("statusReason", concept_opt(x.status_reason.as_ref()));
            o.put("vaccineCode", concept_opt(x.vaccine_code.as_ref()));
            o.put("patient", subject);
            o.put("encounter", record_ref_opt(x.encounter.as_ref()));
            o.put("occurrenceDateTime", date_time(x.occurrence.as_ref()));
            o.put("recorded", date_time(x.recorded.as_ref()));
            if let Some(b) = x.primary_source {
                o.put("primarySource", json!(b));
            }
            o.put("lotNumber", json!(x.lot_number));
            if let Some(d) = &x.expiration_date {
                o.put("expirationDate", json!(format_date(d)));
            }
            o.put("site", concept_opt(x.site.as_ref()));
            o.put("route", concept_opt(x.route.as_ref()));
            o.put(
                "doseQuantity",
                x.dose.as_ref().map_or(Value::Null, quantity),
            );
            o.put(
                "performer",
                Value::Array(
                    x.performers
                        .iter()
                        .map(|r| json!({"actor": reference_value(r)}))
                        .collect(),
                ),
            );
            o.put("note", annotations(&x.notes));
            o.put("reasonCode", concepts(&x.reason_codes));
            o.put(
                "reasonReference",
                Value::Array(x.reason_records.iter().map(record_ref).collect()),
            );
        }
        K::DiagnosticReport(x) => {
            status(&mut o, DIAGNOSTIC_REPORT_STATUS, x.status);
            o.put("category", concepts(&x.categories));
            o.put("code", concept_opt(x.code.as_ref()));
            o.put("subject", subject);
            o.put("encounter", record_ref_opt(x.encounter.as_ref()));
            match &x.effective {
                Some(diagnostic_report::Effective::EffectiveTime(t)) => {
                    o.put("effectiveDateTime", date_time(Some(t)))
                }
                Some(diagnostic_report::Effective::EffectivePeriod(p)) => {
                    o.put("effectivePeriod", period(Some(p)))
                }
                None => {}
            }
            o.put("issued", date_time(x.issued.as_ref()));
            o.put("performer", references(&x.performers));
            o.put(
                "result",
                Value::Array(x.results.iter().map(record_ref).collect()),
            );
            o.put("conclusion", json!(x.conclusion));
            o.put("conclusionCode", concepts(&x.conclusion_codes));
        }
        K::CarePlan(x) => {
            status(&mut o, CARE_PLAN_STATUS, x.status);
            o.code("intent", CARE_PLAN_INTENT, x.intent);
            o.put("category", concepts(&x.categories));
            o.put("title", json!(x.title));
            o.put("description", json!(x.description));
            o.put("subject", subject);
            o.put("encounter", record_ref_opt(x.encounter.as_ref()));
            o.put("period", period(x.period.as_ref()));
            o.put("created", date_time(x.created.as_ref()));
            o.put("author", reference_opt(x.author.as_ref()));
            o.put(
                "addresses",
                Value::Array(x.addresses.iter().map(record_ref).collect()),
            );
            o.put(
                "goal",
                Value::Array(x.goals.iter().map(record_ref).collect()),
            );
            o.put(
                "activity",
                Value::Array(
                    x.activities
                        .iter()
                        .map(|a| {
                            let mut d = Out::new();
                            d.put("code", concept_opt(a.code.as_ref()));
                            d.code("status", CARE_PLAN_ACTIVITY_STATUS, a.status);
                            d.put("scheduledPeriod", period(a.scheduled_period.as_ref()));
                            d.put("description", json!(a.description));
                            let d = d.done();
                            // An activity without a detail stays an element, so that positions
                            // match the source's (unmodelled_json is merged by position).
                            if d.as_object().is_some_and(|m| m.is_empty()) {
                                json!({})
                            } else {
                                json!({"detail": d})
                            }
                        })
                        .collect(),
                ),
            );
            o.put("note", annotations(&x.notes));
        }
        K::Goal(x) => {
            if in_error {
                o.put("lifecycleStatus", json!("entered-in-error"));
            } else {
                o.code("lifecycleStatus", GOAL_LIFECYCLE_STATUS, x.lifecycle_status);
            }
            o.put(
                "achievementStatus",
                concept_opt(x.achievement_status.as_ref()),
            );
            o.put("category", concepts(&x.categories));
            o.put("priority", concept_opt(x.priority.as_ref()));
            o.put("description", concept_opt(x.description.as_ref()));
            o.put("subject", subject);
            if let Some(d) = &x.start_date {
                o.put("startDate", json!(format_date(d)));
            }
            o.put(
                "target",
                Value::Array(
                    x.targets
                        .iter()
                        .map(|t| {
                            let mut y = Out::new();
                            y.put("measure", concept_opt(t.measure.as_ref()));
                            y.put(
                                "detailQuantity",
                                t.detail_quantity.as_ref().map_or(Value::Null, quantity),
                            );
                            y.put("detailString", json!(t.detail_text));
                            if let Some(d) = &t.due_date {
                                y.put("dueDate", json!(format_date(d)));
                            }
                            y.done()
                        })
                        .collect(),
                ),
            );
            if let Some(d) = &x.status_date {
                o.put("statusDate", json!(format_date(d)));
            }
            o.put("expressedBy", reference_opt(x.expressed_by.as_ref()));
            o.put(
                "addresses",
                Value::Array(x.addresses.iter().map(record_ref).collect()),
            );
            o.put("note", annotations(&x.notes));
        }
        K::ImagingStudy(x) => {
            status(&mut o, IMAGING_STUDY_STATUS, x.status);
            o.put(
                "identifier",
                Value::Array(x.identifiers.iter().map(identifier).collect()),
            );
            o.put(
                "modality",
                Value::Array(x.modalities.iter().map(coding).collect()),
            );
            o.put("subject", subject);
            o.put("encounter", record_ref_opt(x.encounter.as_ref()));
            o.put("started", date_time(x.started.as_ref()));
            if x.number_of_series > 0 {
                o.put("numberOfSeries", json!(x.number_of_series));
            }
            if x.number_of_instances > 0 {
                o.put("numberOfInstances", json!(x.number_of_instances));
            }
            o.put("procedureCode", concepts(&x.procedure_codes));
            o.put("reasonCode", concepts(&x.reason_codes));
            o.put("note", annotations(&x.notes));
            o.put("description", json!(x.description));
            o.put(
                "series",
                Value::Array(
                    x.series
                        .iter()
                        .map(|s| {
                            let mut y = Out::new();
                            y.put("uid", json!(s.uid));
                            if s.number > 0 {
                                y.put("number", json!(s.number));
                            }
                            y.put("modality", s.modality.as_ref().map_or(Value::Null, coding));
                            y.put("description", json!(s.description));
                            if s.number_of_instances > 0 {
                                y.put("numberOfInstances", json!(s.number_of_instances));
                            }
                            y.put("bodySite", s.body_site.as_ref().map_or(Value::Null, coding));
                            y.put("started", date_time(s.started.as_ref()));
                            y.put(
                                "instance",
                                Value::Array(
                                    s.instances
                                        .iter()
                                        .map(|i| {
                                            let mut z = Out::new();
                                            z.put("uid", json!(i.uid));
                                            z.put(
                                                "sopClass",
                                                i.sop_class.as_ref().map_or(Value::Null, coding),
                                            );
                                            if i.number > 0 {
                                                z.put("number", json!(i.number));
                                            }
                                            z.put("title", json!(i.title));
                                            z.done()
                                        })
                                        .collect(),
                                ),
                            );
                            y.done()
                        })
                        .collect(),
                ),
            );
        }
    }
    let mut out = o.done();
    if !r.unmodelled_json.is_empty()
        && let Ok(residue) = serde_json::from_str::<Value>(&r.unmodelled_json)
    {
        crate::residue::merge(&mut out, &residue);
    }
    out
}
