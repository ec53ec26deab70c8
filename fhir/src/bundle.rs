//! A patient's Bundle in and out: entries resolved (ids, references, directory entries), each
//! record mapped (`import.rs`), problems classified (the bundle refused, or records set aside:
//! `quarantine.rs`), records ordered so that references point backwards (docs/schema.md §8).

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

use crate::import::{Mapped, map_resource};
use crate::{
    ImportOptions, ImportedBundle, OnInvalid, Problem, codes, fhir_type, quarantine, to_fhir,
};
use dossier_api::v1::{EntityType, Identifier, Resource, ResourceType};
use dossier_records::{is_valid_id, kind_type};

/// What a reference in a bundle resolves to.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Target {
    /// The bundle's patient (its Dossier id).
    Patient(String),
    /// A record of the patient that the bundle creates.
    Record(ResourceType, String),
    /// A practitioner or organisation of the bundle: referred to by identifier, not stored.
    Directory(EntityType, Identifier, String),
    /// An entry of a type Dossier does not model.
    Unmapped(String),
    /// A practitioner or organisation without an identifier: it cannot be referred to.
    Unidentified(String),
}

impl Target {
    pub(crate) fn describe(&self) -> String {
        match self {
            Target::Patient(p) => format!("the patient {p}"),
            Target::Record(t, id) => format!("{}/{id}", fhir_type(*t)),
            Target::Directory(_, i, _) => format!("a directory entry ({}|{})", i.system, i.value),
            Target::Unmapped(t) => format!("an entry of unmodelled type {t}"),
            Target::Unidentified(t) => format!(
                "a {t} without an identifier (Dossier refers to practitioners and organisations \
                 by identifier)"
            ),
        }
    }

    /// The reference string this target is written as outside the bundle: `Type/id` for the
    /// patient and its records, a conditional reference `Type?identifier=system|value` for a
    /// directory entry, None for an unmodelled entry.
    pub(crate) fn resolved(&self) -> Option<String> {
        match self {
            Target::Patient(p) => Some(format!("Patient/{p}")),
            Target::Record(t, id) => Some(format!("{}/{id}", fhir_type(*t))),
            Target::Directory(e, i, _) => {
                let t = codes::code_of(codes::ENTITY_TYPE, *e as i32)?;
                Some(format!("{t}?identifier={}|{}", i.system, i.value))
            }
            Target::Unmapped(_) | Target::Unidentified(_) => None,
        }
    }

    /// The inverse of `resolved`.
    pub(crate) fn parse(text: &str) -> Option<Target> {
        if let Some((t, rest)) = text.split_once("?identifier=") {
            let (system, value) = rest.split_once('|')?;
            let e = codes::value_of(codes::ENTITY_TYPE, t)?;
            let entity = EntityType::try_from(e).ok()?;
            let identifier = Identifier {
                system: system.to_owned(),
                value: value.to_owned(),
                r#type: None,
            };
            return Some(Target::Directory(entity, identifier, String::new()));
        }
        let (t, id) = text.split_once('/')?;
        if !is_valid_id(id) {
            return None;
        }
        if t == "Patient" {
            return Some(Target::Patient(id.to_owned()));
        }
        Some(Target::Record(modelled(t)?, id.to_owned()))
    }
}

/// The modelled FHIR types and the record type they become.
pub(crate) fn modelled(fhir: &str) -> Option<ResourceType> {
    match fhir {
        "CareTeam" => Some(ResourceType::CareRelationship),
        "CareRelationship" => None,
        other => dossier_records::type_from_name(other),
    }
}

/// Billing and payment: Dossier holds none of it (docs/schema.md §8).
pub(crate) const BILLING_TYPES: &[&str] = &[
    "Account",
    "ChargeItem",
    "Claim",
    "ClaimResponse",
    "Coverage",
    "CoverageEligibilityRequest",
    "CoverageEligibilityResponse",
    "EnrollmentRequest",
    "EnrollmentResponse",
    "ExplanationOfBenefit",
    "Invoice",
    "PaymentNotice",
    "PaymentReconciliation",
];

/// Dependency order of record types in an import (a reference points backwards).
fn rank(t: ResourceType) -> usize {
    [
        ResourceType::Patient,
        ResourceType::Encounter,
        ResourceType::Condition,
        ResourceType::AllergyIntolerance,
        ResourceType::Procedure,
        ResourceType::MedicationRequest,
        ResourceType::Observation,
        ResourceType::DiagnosticReport,
        ResourceType::Immunization,
        ResourceType::ImagingStudy,
        ResourceType::Goal,
        ResourceType::CarePlan,
        ResourceType::DocumentReference,
        ResourceType::CareRelationship,
        ResourceType::Consent,
    ]
    .iter()
    .position(|x| *x == t)
    .unwrap_or(usize::MAX)
}

/// The Dossier id of an entry: `urn:uuid:<u>` → `<u>`; `…/<Type>/<id>` or `<Type>/<id>` →
/// `<id>`; else the resource's own id when valid; else a hash of the fullUrl.
fn dossier_id(full_url: &str, resource_id: &str) -> String {
    if let Some(u) = full_url.strip_prefix("urn:uuid:")
        && is_valid_id(u)
    {
        return u.to_ascii_lowercase();
    }
    if let Some(last) = full_url.rsplit('/').next()
        && !full_url.is_empty()
        && is_valid_id(last)
        && full_url.contains('/')
    {
        return last.to_owned();
    }
    if is_valid_id(resource_id) {
        return resource_id.to_owned();
    }
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(full_url.as_bytes()))
}

/// The identifier a directory entry (Practitioner, Organization) is referred to by, and its name.
fn directory_identity(resource: &Value) -> Option<(Identifier, String)> {
    let ids = resource.get("identifier")?.as_array()?;
    let preferred = [
        "https://www.ehealth.fgov.be/standards/fhir/core/NamingSystem/nihdi",
        "https://www.ehealth.fgov.be/standards/fhir/core/NamingSystem/cbe",
    ];
    let pick = ids
        .iter()
        .find(|i| {
            i.get("system")
                .and_then(Value::as_str)
                .is_some_and(|s| preferred.contains(&s))
        })
        .or_else(|| ids.first())?;
    let identifier = Identifier {
        system: pick.get("system")?.as_str()?.to_owned(),
        value: pick.get("value")?.as_str()?.to_owned(),
        r#type: None,
    };
    let name = match resource.get("name") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(names)) => names
            .first()
            .map(|n| {
                let given: Vec<&str> = n
                    .get("given")
                    .and_then(Value::as_array)
                    .map(|g| g.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let family = n.get("family").and_then(Value::as_str).unwrap_or_default();
                let prefix: Vec<&str> = n
                    .get("prefix")
                    .and_then(Value::as_array)
                    .map(|g| g.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                [prefix.join(" "), given.join(" "), family.to_owned()]
                    .iter()
                    .filter(|s| !s.is_empty())
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default(),
        _ => String::new(),
    };
    Some((identifier, name))
}

/// A mapped entry to read: its index, record type, Dossier id, JSON and fullUrl.
type Planned<'a> = (
    usize,
    ResourceType,
    String,
    &'a serde_json::Map<String, Value>,
    String,
);

/// Maps a FHIR R4 Bundle of one patient (type `transaction`, `batch`, `collection` or
/// `searchset`). With `OnInvalid::Refuse` either the whole bundle maps, or every problem found is
/// returned; with `Quarantine` (the default) records with problems are set aside instead, and
/// only problems with the bundle's shape or its Patient refuse it.
pub fn import_bundle(
    bundle: &Value,
    options: &ImportOptions,
) -> Result<ImportedBundle, Vec<Problem>> {
    let fail = |path: &str, message: &str| {
        Err(vec![Problem {
            entry: None,
            path: path.to_owned(),
            message: message.to_owned(),
        }])
    };
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return fail("resourceType", "must be \"Bundle\"");
    }
    let kind = bundle
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if !matches!(kind, "transaction" | "batch" | "collection" | "searchset") {
        return fail(
            "type",
            "must be transaction, batch, collection or searchset",
        );
    }
    let Some(entries) = bundle.get("entry").and_then(Value::as_array) else {
        return fail("entry", "is required (an array of entries)");
    };
    // Problems that refuse the bundle whatever `on_invalid` says.
    let mut problems = Vec::new();
    let mut targets: HashMap<String, Target> = HashMap::new();
    let mut patient_id: Option<(usize, String)> = None;
    let mut plan: Vec<Planned<'_>> = Vec::new();
    let mut imported = ImportedBundle::default();
    let mut unmapped_types: BTreeMap<String, usize> = BTreeMap::new();
    for (i, entry) in entries.iter().enumerate() {
        let Some(resource) = entry.get("resource").and_then(Value::as_object) else {
            problems.push(Problem {
                entry: Some(i),
                path: "resource".into(),
                message: "is required".into(),
            });
            continue;
        };
        let fhir = resource
            .get("resourceType")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let full_url = entry
            .get("fullUrl")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let rid = resource
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let id = dossier_id(full_url, rid);
        let target = match (fhir, modelled(fhir)) {
            ("Patient", _) => {
                if let Some((first, _)) = &patient_id {
                    problems.push(Problem {
                        entry: Some(i),
                        path: "resource".into(),
                        message: format!("a second Patient (entry[{first}] is the first): a bundle holds one patient"),
                    });
                }
                patient_id = Some((i, id.clone()));
                Target::Patient(id.clone())
            }
            ("Practitioner" | "Organization", _) => {
                imported.directory_entries += 1;
                let entity = if fhir == "Practitioner" {
                    EntityType::Practitioner
                } else {
                    EntityType::Organization
                };
                match directory_identity(&Value::Object(resource.clone())) {
                    Some((identifier, name)) => Target::Directory(entity, identifier, name),
                    // Refused with the bundle; quarantined, the records that refer to it are set
                    // aside instead (their reference cannot be written).
                    None if options.on_invalid == OnInvalid::Refuse => {
                        problems.push(Problem {
                            entry: Some(i),
                            path: "identifier".into(),
                            message: format!("a {fhir} needs an identifier to be referred to"),
                        });
                        continue;
                    }
                    None => Target::Unidentified(fhir.to_owned()),
                }
            }
            (_, Some(t)) => Target::Record(t, id.clone()),
            ("", None) => {
                problems.push(Problem {
                    entry: Some(i),
                    path: "resource.resourceType".into(),
                    message: "is required".into(),
                });
                continue;
            }
            (other, None) => {
                if BILLING_TYPES.contains(&other) && !options.refuse_billing {
                    *imported.skipped_types.entry(other.to_owned()).or_default() += 1;
                } else {
                    *unmapped_types.entry(other.to_owned()).or_default() += 1;
                }
                Target::Unmapped(other.to_owned())
            }
        };
        for key in [
            full_url.to_owned(),
            format!("{fhir}/{rid}"),
            format!("{fhir}/{id}"),
        ] {
            if !key.is_empty() && !key.ends_with('/') {
                targets.insert(key, target.clone());
            }
        }
        if let Target::Patient(_) | Target::Record(..) = target {
            let t = modelled(fhir).unwrap_or(ResourceType::Patient);
            plan.push((i, t, id, resource, full_url.to_owned()));
        }
    }
    let Some((patient_entry, patient_id)) = patient_id else {
        problems.push(Problem {
            entry: None,
            path: "entry".into(),
            message: "holds no Patient: a bundle holds exactly one patient".into(),
        });
        return Err(problems);
    };
    if !unmapped_types.is_empty() {
        if options.skip_unmapped {
            for (t, n) in unmapped_types {
                *imported.skipped_types.entry(t).or_default() += n;
            }
        } else {
            let list: Vec<String> = unmapped_types
                .iter()
                .map(|(t, n)| format!("{t} ({n})"))
                .collect();
            problems.push(Problem {
                entry: None,
                path: "entry".into(),
                message: format!(
                    "holds types Dossier does not model: {} (pass --skip-unmapped to skip them)",
                    list.join(", ")
                ),
            });
        }
    }
    // References to skipped entries are problems of the record even with skip_unmapped: the
    // record would lose its meaning silently.
    let mut mapped: Vec<(usize, ResourceType, String, Mapped)> = Vec::new();
    for (i, t, id, resource, full_url) in plan {
        let source = if options.source.is_empty() {
            full_url.clone()
        } else {
            format!("{}#{full_url}", options.source)
        };
        let m = map_resource(
            &targets,
            &patient_id,
            i,
            t,
            &id,
            resource,
            source,
            &options.limits,
        );
        for key in ["versionId", "lastUpdated", "source"] {
            if resource.get("meta").and_then(|x| x.get(key)).is_some() {
                *imported
                    .dropped_elements
                    .entry(format!("{}.meta.{key}", fhir_type(t)))
                    .or_default() += 1;
            }
        }
        mapped.push((i, t, id, m));
    }
    // Problems of the patient itself refuse the bundle in every mode.
    for (i, _, _, m) in &mapped {
        if *i == patient_entry {
            problems.extend(m.problems.iter().cloned());
        }
    }
    let quarantine = options.on_invalid == OnInvalid::Quarantine;
    if quarantine && !problems.is_empty() {
        return Err(problems);
    }
    if !quarantine {
        for (_, _, _, m) in &mapped {
            problems.extend(m.problems.iter().cloned());
        }
        if !problems.is_empty() {
            return Err(problems);
        }
    }
    let mut reasons = quarantine::cascade(&mapped);
    for (i, t, id, m) in mapped {
        if let Some(problems) = reasons.remove(&i) {
            imported.quarantined.push(quarantine::quarantined(
                i,
                t,
                id,
                &m,
                &entries[i]["resource"],
                &targets,
                problems,
            ));
            continue;
        }
        for (k, n) in m.unmodelled {
            *imported.unmodelled_elements.entry(k).or_default() += n;
        }
        if m.in_error {
            imported.entered_in_error.push((t, id));
        }
        if t == ResourceType::Patient {
            imported.patient = m.record;
        } else {
            imported.records.push(m.record);
        }
    }
    imported
        .records
        .sort_by_key(|r| r.kind.as_ref().map_or(usize::MAX, |k| rank(kind_type(k))));
    Ok(imported)
}

/// A FHIR R4 Bundle of records (`collection` or `searchset`), each entry with a fullUrl
/// `<Type>/<id>` so that the references between them resolve.
pub fn export_bundle(records: &[Resource], bundle_type: &str) -> Value {
    let entries: Vec<Value> = records
        .iter()
        .map(|r| {
            let resource = to_fhir(r);
            let t = resource
                .get("resourceType")
                .and_then(Value::as_str)
                .unwrap_or("Unknown");
            let id = resource
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let mut entry = json!({"fullUrl": format!("{t}/{id}"), "resource": resource});
            if bundle_type == "searchset" {
                entry["search"] = json!({"mode": "match"});
            }
            entry
        })
        .collect();
    let mut bundle = json!({"resourceType": "Bundle", "type": bundle_type, "entry": entries});
    if bundle_type == "searchset" {
        bundle["total"] = json!(records.len());
    }
    bundle
}
