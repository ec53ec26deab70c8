//! FHIR R4 JSON in and out: a patient's Bundle to typed records (import) and typed records to
//! FHIR resources, Bundles and NDJSON lines (export). No I/O. The mapping is in docs/schema.md
//! §3 and §8.
//!
//! Import is lossless: what a record does not model is kept verbatim in its `unmodelled_json`
//! and merged back on export (`residue.rs`). Records that do not map or validate are set aside
//! (quarantined) with their problems, not the whole patient, unless the caller asks to refuse.

mod codes;
mod export;
mod import;
mod residue;
mod search;
mod time;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::{Value, json};

pub use export::{fhir_type, to_fhir};
pub use time::{format_date, format_date_time, parse_date, parse_date_time};
pub use search::{SearchParams, parse_search};

use dossier_api::v1::{EntityType, Identifier, Meta, RecordStatus, Resource, ResourceType};
use dossier_records::{Limits, is_valid_id, kind_type, record_refs, validate_new_record};

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
    fn describe(&self) -> String {
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
    fn resolved(&self) -> Option<String> {
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
    fn parse(text: &str) -> Option<Target> {
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

/// What an import does with a record that does not map or does not validate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnInvalid {
    /// Refuse the whole bundle, with every problem found.
    Refuse,
    /// Set the record aside in `ImportedBundle::quarantined` (and the records that refer to it),
    /// and import the rest of the patient. Problems with the Patient entry or the bundle's shape
    /// still refuse the bundle.
    #[default]
    Quarantine,
}

#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Skip entries of unmodelled types other than billing (still counted in `skipped_types`);
    /// without it such a bundle is refused.
    pub skip_unmapped: bool,
    /// Names the source in every record's `meta.source` (`<source>#<fullUrl>`).
    pub source: String,
    /// Treat billing entries (Claim, ExplanationOfBenefit, …) like other unmodelled types; by
    /// default they are skipped and counted, as Dossier holds no billing.
    pub refuse_billing: bool,
    pub on_invalid: OnInvalid,
    /// The bounds every record is validated against (the server's, to learn before writing).
    pub limits: Limits,
}

/// A record set aside by an import: the entry as it was, why, and what its references resolved
/// to, so that it can be fixed and sent again with `import_resource`.
#[derive(Debug, Clone, PartialEq)]
pub struct Quarantined {
    /// Index of the entry in `Bundle.entry`.
    pub entry: usize,
    pub fhir_type: String,
    /// The Dossier id the record would have had.
    pub id: String,
    /// The `meta.source` the record would have had.
    pub source: String,
    /// The entry's resource, verbatim.
    pub resource: Value,
    pub problems: Vec<Problem>,
    /// Each reference string in the resource → what it resolved to: `Type/id` of the patient or
    /// one of its records, `Type?identifier=system|value` for a practitioner or organisation, ""
    /// when unresolved.
    pub references: BTreeMap<String, String>,
}

/// A bundle mapped to typed records, ready to write: the patient, then its records in an order
/// where every reference points to an earlier record.
#[derive(Debug, Clone, Default)]
pub struct ImportedBundle {
    pub patient: Resource,
    pub records: Vec<Resource>,
    /// Records whose source status was entered-in-error: write them, then mark them.
    pub entered_in_error: Vec<(ResourceType, String)>,
    /// Entries of unmodelled types skipped (billing by default, others with `skip_unmapped`), by
    /// FHIR type.
    pub skipped_types: BTreeMap<String, usize>,
    /// Directory entries (Practitioner, Organization) used only to resolve references.
    pub directory_entries: usize,
    /// Source elements the store sets instead (`meta.versionId`, `meta.lastUpdated`,
    /// `meta.source`), by type and path.
    pub dropped_elements: BTreeMap<String, usize>,
    /// Source leaves kept verbatim in `unmodelled_json`, by type and path.
    pub unmodelled_elements: BTreeMap<String, usize>,
    /// Records set aside (with `OnInvalid::Quarantine`), in entry order.
    pub quarantined: Vec<Quarantined>,
}

/// The modelled FHIR types and the record type they become.
fn modelled(fhir: &str) -> Option<ResourceType> {
    match fhir {
        "CareTeam" => Some(ResourceType::CareRelationship),
        "CareRelationship" => None,
        other => dossier_records::type_from_name(other),
    }
}

/// Billing and payment: Dossier holds none of it (docs/schema.md §8).
const BILLING_TYPES: &[&str] = &[
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

/// One resource mapped: the record, whether its source marked it entered-in-error, the problems
/// of its mapping and validation, and its unmodelled leaves by path.
struct Mapped {
    record: Resource,
    in_error: bool,
    problems: Vec<Problem>,
    unmodelled: BTreeMap<String, usize>,
}

/// Maps one resource of type `t` to record `id` of `patient_id`: typed fields, residue, then the
/// validation the Records service applies.
#[allow(clippy::too_many_arguments)]
fn map_resource(
    targets: &HashMap<String, Target>,
    patient_id: &str,
    entry: usize,
    t: ResourceType,
    id: &str,
    resource: &serde_json::Map<String, Value>,
    source: String,
    limits: &Limits,
) -> Mapped {
    let mut reader = import::Reader::new(targets, patient_id, entry);
    let mut in_error = false;
    let kind = reader.resource(t, resource, &mut in_error);
    let mut problems = std::mem::take(&mut reader.problems);
    let mut record = Resource {
        meta: Some(Meta {
            id: id.to_owned(),
            source,
            ..Meta::default()
        }),
        kind,
        unmodelled_json: String::new(),
    };
    // The export of the typed record as the store would give it, to find what it lacks.
    let mut typed = record.clone();
    if let Some(m) = typed.meta.as_mut() {
        m.patient_id = patient_id.to_owned();
        if in_error {
            m.status = RecordStatus::EnteredInError as i32;
        }
    }
    let source_value = Value::Object(resource.clone());
    let resolve = |r: &str| targets.get(r).and_then(Target::resolved);
    let mut unmodelled = BTreeMap::new();
    if let Some(residue) = residue::residue(&source_value, &to_fhir(&typed), &resolve) {
        residue::count_leaves(&residue, fhir_type(t), &mut unmodelled);
        record.unmodelled_json = residue.to_string();
    }
    if problems.is_empty()
        && let Err(e) = validate_new_record(&record, "resource", patient_id, limits)
    {
        problems.push(Problem {
            entry: Some(entry),
            path: e.field,
            message: e.message,
        });
    }
    Mapped {
        record,
        in_error,
        problems,
        unmodelled,
    }
}

/// Every `reference` string in a resource.
fn reference_strings(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                match x {
                    Value::String(s) if k == "reference" => {
                        out.insert(s.clone());
                    }
                    _ => reference_strings(x, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|x| reference_strings(x, out)),
        _ => {}
    }
}

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
            if resource
                .get("meta")
                .and_then(|x| x.get(key))
                .is_some()
            {
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
    // Quarantine: the records with problems, then (to a fixed point) the records that refer to
    // a quarantined one, since the server would refuse their reference.
    let mut held: BTreeMap<(i32, String), usize> = BTreeMap::new();
    let mut reasons: BTreeMap<usize, Vec<Problem>> = BTreeMap::new();
    for (i, t, id, m) in &mapped {
        if !m.problems.is_empty() {
            held.insert((*t as i32, id.clone()), *i);
            reasons.insert(*i, m.problems.clone());
        }
    }
    loop {
        let mut more = Vec::new();
        for (i, t, id, m) in &mapped {
            if reasons.contains_key(i) {
                continue;
            }
            for (path, r) in record_refs(&m.record, "resource") {
                if let Some(j) = held.get(&(r.r#type, r.id.clone())) {
                    let name = ResourceType::try_from(r.r#type).map_or("record", fhir_type);
                    more.push((
                        *i,
                        (*t as i32, id.clone()),
                        Problem {
                            entry: Some(*i),
                            path: path.clone(),
                            message: format!(
                                "refers to entry[{j}] ({name}/{}), which is quarantined",
                                r.id
                            ),
                        },
                    ));
                    break;
                }
            }
        }
        if more.is_empty() {
            break;
        }
        for (i, key, p) in more {
            held.insert(key, i);
            reasons.entry(i).or_default().push(p);
        }
    }
    for (i, t, id, m) in mapped {
        if let Some(problems) = reasons.remove(&i) {
            let resource = &entries[i]["resource"];
            let mut strings = BTreeSet::new();
            reference_strings(resource, &mut strings);
            let references = strings
                .into_iter()
                .map(|s| {
                    let to = targets
                        .get(&s)
                        .and_then(Target::resolved)
                        .unwrap_or_default();
                    (s, to)
                })
                .collect();
            imported.quarantined.push(Quarantined {
                entry: i,
                fhir_type: fhir_type(t).to_owned(),
                id,
                source: m
                    .record
                    .meta
                    .as_ref()
                    .map(|x| x.source.clone())
                    .unwrap_or_default(),
                resource: resource.clone(),
                problems,
                references,
            });
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

/// Maps one resource of a patient outside its bundle: a quarantined record, fixed, sent again.
/// Each reference string in it is resolved through `references` (as `Quarantined::references`
/// gives them: `Type/id`, `Type?identifier=system|value`, or "" for unresolved); the record id is
/// the resource's `id` (set it to `Quarantined::id`), its `meta.source` is `options.source` (set it
/// to `Quarantined::source`). The record is validated as the Records service will.
pub fn import_resource(
    resource: &Value,
    patient_id: &str,
    references: &BTreeMap<String, String>,
    options: &ImportOptions,
) -> Result<Resource, Vec<Problem>> {
    let problem = |path: &str, message: String| {
        vec![Problem {
            entry: None,
            path: path.to_owned(),
            message,
        }]
    };
    let Some(object) = resource.as_object() else {
        return Err(problem("", "must be a FHIR resource (a JSON object)".into()));
    };
    let fhir = object
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let Some(t) = modelled(fhir).filter(|t| *t != ResourceType::Patient) else {
        return Err(problem(
            "resourceType",
            format!("{fhir:?} is not a record type Dossier models (a Patient comes with its bundle)"),
        ));
    };
    let id = object.get("id").and_then(Value::as_str).unwrap_or_default();
    if !is_valid_id(id) {
        return Err(problem("id", "must match [A-Za-z0-9.-]{1,64}".into()));
    }
    let mut targets: HashMap<String, Target> = HashMap::new();
    for (from, to) in references {
        if let Some(target) = Target::parse(to) {
            targets.insert(from.clone(), target);
        }
    }
    let m = map_resource(
        &targets,
        patient_id,
        0,
        t,
        id,
        object,
        options.source.clone(),
        &options.limits,
    );
    if !m.problems.is_empty() {
        return Err(m
            .problems
            .into_iter()
            .map(|p| Problem { entry: None, ..p })
            .collect());
    }
    Ok(m.record)
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
