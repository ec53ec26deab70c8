//! The rules of each kind of record, one file per kind (docs/schema.md §3). The element checks
//! they share (codings, times, references, text bounds) are in `validate.rs`.

pub(crate) mod allergy_intolerance;
pub(crate) mod care_plan;
pub(crate) mod care_relationship;
pub(crate) mod condition;
pub(crate) mod consent;
pub(crate) mod diagnostic_report;
pub(crate) mod document_reference;
pub(crate) mod encounter;
pub(crate) mod goal;
pub(crate) mod imaging_study;
pub(crate) mod immunization;
pub(crate) mod medication_request;
pub(crate) mod observation;
pub(crate) mod patient;
pub(crate) mod procedure;

#[cfg(test)]
mod tests {
    use crate::{Limits, SYSTEM_CVX, SYSTEM_LOINC, SYSTEM_SNOMED, validate_new_record};
    use dossier_api::v1::*;

    fn concept(system: &str, code: &str) -> Option<CodeableConcept> {
        Some(CodeableConcept {
            codings: vec![Coding {
                system: system.into(),
                code: code.into(),
                display: String::new(),
            }],
            text: String::new(),
        })
    }

    fn time() -> Option<DateTime> {
        Some(DateTime {
            unix_micros: 1_440_292_569_000_000,
            precision: DatePrecision::Time as i32,
            utc_offset_minutes: 0,
        })
    }

    fn rec(t: ResourceType, id: &str) -> RecordRef {
        RecordRef {
            r#type: t as i32,
            id: id.into(),
        }
    }

    fn check(kind: resource::Kind) -> Result<(), crate::Invalid> {
        let r = Resource {
            meta: Some(Meta {
                id: "r".into(),
                ..Meta::default()
            }),
            kind: Some(kind),
            unmodelled_json: String::new(),
        };
        validate_new_record(&r, "resource", "p", &Limits::default())
    }

    fn field(kind: resource::Kind) -> String {
        check(kind).expect_err("refused").field
    }

    fn immunization() -> Immunization {
        Immunization {
            status: ImmunizationStatus::Completed as i32,
            vaccine_code: concept(SYSTEM_CVX, "08"),
            encounter: Some(rec(ResourceType::Encounter, "e")),
            occurrence: time(),
            primary_source: Some(true),
            ..Immunization::default()
        }
    }

    #[test]
    fn immunizations() {
        check(resource::Kind::Immunization(immunization())).unwrap();
        let mut x = immunization();
        x.vaccine_code = concept("http://example.org/local", "flu");
        assert_eq!(
            field(resource::Kind::Immunization(x)),
            "resource.immunization.vaccine_code"
        );
        let mut x = immunization();
        x.vaccine_code = Some(CodeableConcept {
            codings: vec![],
            text: "Influenza, seasonal".into(),
        });
        check(resource::Kind::Immunization(x)).unwrap();
        let mut x = immunization();
        x.vaccine_code = concept(SYSTEM_SNOMED, "34552-0");
        assert_eq!(
            field(resource::Kind::Immunization(x)),
            "resource.immunization.vaccine_code.codings[0].code"
        );
        let mut x = immunization();
        x.occurrence = None;
        assert_eq!(
            field(resource::Kind::Immunization(x)),
            "resource.immunization.occurrence"
        );
        let mut x = immunization();
        x.encounter = Some(rec(ResourceType::Condition, "c"));
        assert_eq!(
            field(resource::Kind::Immunization(x)),
            "resource.immunization.encounter.type"
        );
        let mut x = immunization();
        x.status = 0;
        assert_eq!(
            field(resource::Kind::Immunization(x)),
            "resource.immunization.status"
        );
    }

    #[test]
    fn diagnostic_reports() {
        let report = || DiagnosticReport {
            status: DiagnosticReportStatus::Final as i32,
            code: concept(SYSTEM_LOINC, "58410-2"),
            effective: Some(diagnostic_report::Effective::EffectiveTime(time().unwrap())),
            results: vec![rec(ResourceType::Observation, "o1")],
            ..DiagnosticReport::default()
        };
        check(resource::Kind::DiagnosticReport(report())).unwrap();
        let mut x = report();
        x.results.push(rec(ResourceType::Encounter, "e"));
        assert_eq!(
            field(resource::Kind::DiagnosticReport(x)),
            "resource.diagnostic_report.results[1].type"
        );
        let mut x = report();
        x.code = None;
        assert_eq!(
            field(resource::Kind::DiagnosticReport(x)),
            "resource.diagnostic_report.code"
        );
        let mut x = report();
        x.code = concept(SYSTEM_LOINC, "58410-3");
        assert_eq!(
            field(resource::Kind::DiagnosticReport(x)),
            "resource.diagnostic_report.code.codings[0].code"
        );
        let mut x = report();
        x.effective = None;
        assert_eq!(
            field(resource::Kind::DiagnosticReport(x)),
            "resource.diagnostic_report.effective"
        );
    }

    #[test]
    fn care_plans_and_goals() {
        let plan = || CarePlan {
            status: CarePlanStatus::Active as i32,
            intent: CarePlanIntent::Order as i32,
            addresses: vec![rec(ResourceType::Condition, "c")],
            goals: vec![rec(ResourceType::Goal, "g")],
            activities: vec![CarePlanActivity {
                code: concept(SYSTEM_SNOMED, "229070002"),
                status: CarePlanActivityStatus::Completed as i32,
                ..CarePlanActivity::default()
            }],
            ..CarePlan::default()
        };
        check(resource::Kind::CarePlan(plan())).unwrap();
        let mut x = plan();
        x.activities[0].status = 0;
        assert_eq!(
            field(resource::Kind::CarePlan(x)),
            "resource.care_plan.activities[0].status"
        );
        let mut x = plan();
        x.goals = vec![rec(ResourceType::Condition, "c")];
        assert_eq!(
            field(resource::Kind::CarePlan(x)),
            "resource.care_plan.goals[0].type"
        );
        let mut x = plan();
        x.intent = 0;
        assert_eq!(
            field(resource::Kind::CarePlan(x)),
            "resource.care_plan.intent"
        );

        let goal = || Goal {
            lifecycle_status: GoalLifecycleStatus::Accepted as i32,
            description: Some(CodeableConcept {
                codings: vec![],
                text: "Hemoglobin A1c total in Blood < 7.0".into(),
            }),
            ..Goal::default()
        };
        check(resource::Kind::Goal(goal())).unwrap();
        let mut x = goal();
        x.description = None;
        assert_eq!(field(resource::Kind::Goal(x)), "resource.goal.description");
        let mut x = goal();
        x.start_date = Some(Date {
            year: 2021,
            month: 2,
            day: 30,
        });
        assert_eq!(
            field(resource::Kind::Goal(x)),
            "resource.goal.start_date.day"
        );
    }

    #[test]
    fn imaging_studies() {
        let study = || ImagingStudy {
            status: ImagingStudyStatus::Available as i32,
            number_of_series: 1,
            number_of_instances: 1,
            series: vec![ImagingSeries {
                uid: "1.2.840.99999999.1.17049402.1559319193419".into(),
                number: 1,
                modality: Some(Coding {
                    system: "http://dicom.nema.org/resources/ontology/DCM".into(),
                    code: "DX".into(),
                    display: "Digital Radiography".into(),
                }),
                number_of_instances: 1,
                instances: vec![ImagingInstance {
                    uid: "1.2.840.99999999.1.1.12373599.1559319193419".into(),
                    sop_class: Some(Coding {
                        system: "urn:ietf:rfc:3986".into(),
                        code: "1.2.840.10008.5.1.4.1.1.1.1".into(),
                        display: String::new(),
                    }),
                    number: 1,
                    title: "Image of wrist".into(),
                }],
                ..ImagingSeries::default()
            }],
            ..ImagingStudy::default()
        };
        check(resource::Kind::ImagingStudy(study())).unwrap();
        let mut x = study();
        x.series[0].uid = "urn:oid:1.2".into();
        assert_eq!(
            field(resource::Kind::ImagingStudy(x)),
            "resource.imaging_study.series[0].uid"
        );
        let mut x = study();
        x.series[0].modality = None;
        assert_eq!(
            field(resource::Kind::ImagingStudy(x)),
            "resource.imaging_study.series[0].modality"
        );
        let mut x = study();
        x.number_of_series = 0;
        check(resource::Kind::ImagingStudy(x)).unwrap();
        let mut x = study();
        x.series[0].number_of_instances = 0;
        x.series[0].instances.clear();
        check(resource::Kind::ImagingStudy(x)).unwrap();
    }

    /// A kind's `ResourceType` value is its field number in `Resource.kind` (the wire contract),
    /// and `kind_type` and `kind_field` agree with it.
    #[test]
    fn kind_field_numbers_equal_type_values() {
        use prost::Message;
        use resource::Kind as K;
        for t in crate::RESOURCE_TYPES {
            let kind = match t {
                ResourceType::Unspecified => unreachable!("not a kind"),
                ResourceType::Patient => K::Patient(Patient::default()),
                ResourceType::Encounter => K::Encounter(Encounter::default()),
                ResourceType::Observation => K::Observation(Observation::default()),
                ResourceType::Condition => K::Condition(ClinicalCondition::default()),
                ResourceType::AllergyIntolerance => {
                    K::AllergyIntolerance(AllergyIntolerance::default())
                }
                ResourceType::MedicationRequest => {
                    K::MedicationRequest(MedicationRequest::default())
                }
                ResourceType::Procedure => K::Procedure(Procedure::default()),
                ResourceType::DocumentReference => {
                    K::DocumentReference(DocumentReference::default())
                }
                ResourceType::CareRelationship => K::CareRelationship(CareRelationship::default()),
                ResourceType::Consent => K::Consent(Consent::default()),
                ResourceType::Immunization => K::Immunization(Immunization::default()),
                ResourceType::DiagnosticReport => K::DiagnosticReport(DiagnosticReport::default()),
                ResourceType::CarePlan => K::CarePlan(CarePlan::default()),
                ResourceType::Goal => K::Goal(Goal::default()),
                ResourceType::ImagingStudy => K::ImagingStudy(ImagingStudy::default()),
            };
            assert_eq!(crate::kind_type(&kind), t);
            assert!(!crate::kind_field(t).is_empty());
            let bytes = Resource {
                kind: Some(kind),
                ..Resource::default()
            }
            .encode_to_vec();
            // The key of the first field: a varint of (field number << 3 | wire type 2).
            let (mut key, mut shift) = (0u64, 0);
            for b in &bytes {
                key |= u64::from(b & 0x7f) << shift;
                shift += 7;
                if b & 0x80 == 0 {
                    break;
                }
            }
            assert_eq!(key >> 3, t as u64, "{t:?}");
        }
    }

    #[test]
    fn unmodelled_json_is_an_object_within_its_limit() {
        let mut r = Resource {
            meta: Some(Meta {
                id: "r".into(),
                ..Meta::default()
            }),
            kind: Some(resource::Kind::Goal(Goal {
                lifecycle_status: GoalLifecycleStatus::Active as i32,
                description: Some(CodeableConcept {
                    codings: vec![],
                    text: "walk".into(),
                }),
                ..Goal::default()
            })),
            unmodelled_json: r#"{"text":{"status":"generated"}}"#.into(),
        };
        let limits = Limits::default();
        validate_new_record(&r, "resource", "p", &limits).unwrap();
        for bad in ["[1]", "\"x\"", "{", "null"] {
            r.unmodelled_json = bad.into();
            let e = validate_new_record(&r, "resource", "p", &limits).unwrap_err();
            assert_eq!(e.field, "resource.unmodelled_json", "{bad}");
        }
        r.unmodelled_json = format!(r#"{{"x":"{}"}}"#, "y".repeat(limits.unmodelled_bytes_max));
        let e = validate_new_record(&r, "resource", "p", &limits).unwrap_err();
        assert_eq!(e.limit, Some(65_536));
    }
}
