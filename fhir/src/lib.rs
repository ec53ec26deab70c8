//! FHIR R4 JSON in and out: a patient's Bundle to typed records (import) and typed records to
//! FHIR resources, Bundles and NDJSON lines (export). No I/O. The mapping is in docs/schema.md
//! §3 and §8.

mod codes;
mod export;
mod import;
mod time;

use std::collections::{BTreeMap, HashMap};

use serde_json::{Value, json};

pub use export::{fhir_type, to_fhir};
pub use time::{format_date, format_date_time, parse_date, parse_date_time};

use dossier_records::{is_valid_id, kind_type};
use dossier_api::v1::{EntityType, Identifier, Meta, Resource, ResourceType};

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
}

impl Target {
    fn describe(&self) -> String {
        match self {
            Target::Patient(p) => format!("the patient {p}"),
            Target::Record(t, id) => format!("{}/{id}", fhir_type(*t)),
            Target::Directory(_, i, _) => format!("a directory entry ({}|{})", i.system, i.value),
            Target::Unmapped(t) => format!("an entry of unmodelled type {t}"),
        }
    }
}

/// One thing wrong with a bundle: the entry (index in `Bundle.entry`) and the element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub entry: Option<usize>,
    pub path: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.entry {
            Some(e) => write!(f, "entry[{e}] {}: {}", self.path, self.message),
            None => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Skip entries of unmodelled types and drop unmodelled elements (both still reported).
    pub skip_unmapped: bool,
    /// Names the source in every record's `meta.source` (`<source>#<fullUrl>`).
    pub source: String,
}

/// A bundle mapped to typed records, ready to write: the patient, then its records in an order
/// where every reference points to an earlier record.
#[derive(Debug, Clone, Default)]
pub struct ImportedBundle {
    pub patient: Resource,
    pub records: Vec<Resource>,
    /// Records whose source status was entered-in-error: write them, then mark them.
    pub entered_in_error: Vec<(ResourceType, String)>,
    /// Entries of unmodelled types skipped (with `skip_unmapped`), by FHIR type.
    pub skipped_types: BTreeMap<String, usize>,
    /// Directory entries (Practitioner, Organization) used only to resolve references.
    pub directory_entries: usize,
    /// Elements dropped (allowlisted, or any with `skip_unmapped`), by type and path.
    pub dropped_elements: BTreeMap<String, usize>,
}

/// The modelled FHIR types and the record type they become.
fn modelled(fhir: &str) -> Option<ResourceType> {
    match fhir {
        "CareTeam" => Some(ResourceType::CareRelationship),
        "CareRelationship" => None,
        other => dossier_records::type_from_name(other),
    }
}

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
/// `searchset`). Either the whole bundle maps, or every problem found is returned.
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
                    None => {
                        problems.push(Problem {
                            entry: Some(i),
                            path: "identifier".into(),
                            message: format!("a {fhir} needs an identifier to be referred to"),
                        });
                        continue;
                    }
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
                *unmapped_types.entry(other.to_owned()).or_default() += 1;
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
    let Some((_, patient_id)) = patient_id else {
        problems.push(Problem {
            entry: None,
            path: "entry".into(),
            message: "holds no Patient: a bundle holds exactly one patient".into(),
        });
        return Err(problems);
    };
    if !unmapped_types.is_empty() {
        if options.skip_unmapped {
            imported.skipped_types = unmapped_types;
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
    // References to skipped entries are refused even with skip_unmapped: the record would lose
    // its meaning silently.
    for (i, t, id, resource, full_url) in plan {
        let mut reader = import::Reader::new(&targets, &patient_id, i);
        let mut in_error = false;
        let kind = reader.resource(t, resource, &mut in_error);
        let value = Value::Object(resource.clone());
        reader.finish(&value, options.skip_unmapped);
        for (path, n) in std::mem::take(&mut reader.dropped) {
            *imported
                .dropped_elements
                .entry(format!("{}.{path}", fhir_type(t)))
                .or_default() += n;
        }
        problems.append(&mut reader.problems);
        let record = Resource {
            meta: Some(Meta {
                id: id.clone(),
                source: if options.source.is_empty() {
                    full_url.clone()
                } else {
                    format!("{}#{full_url}", options.source)
                },
                ..Meta::default()
            }),
            kind,
        };
        if in_error {
            imported.entered_in_error.push((t, id));
        }
        if t == ResourceType::Patient {
            imported.patient = record;
        } else {
            imported.records.push(record);
        }
    }
    if !problems.is_empty() {
        return Err(problems);
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

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub(crate) fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16)
            | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8)
            | u32::from(*chunk.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub(crate) fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !text.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    for chunk in text.chunks(4) {
        let mut n = 0u32;
        let mut pad = 0;
        for (i, c) in chunk.iter().enumerate() {
            let v = match c {
                b'=' if i >= 2 => {
                    pad += 1;
                    0
                }
                _ if pad > 0 => return None,
                c => B64.iter().position(|b| b == c)? as u32,
            };
            n = (n << 6) | v;
        }
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests;
