//! Records set aside on import instead of refusing the patient, and one fixed record mapped again
//! (docs/schema.md §8, Quarantine).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde_json::Value;

use crate::bundle::{Target, modelled};
use crate::import::{Mapped, map_resource};
use crate::{ImportOptions, Problem, fhir_type};
use dossier_api::v1::{Resource, ResourceType};
use dossier_records::{is_valid_id, record_refs};

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

/// The entries to set aside and why: those whose mapping or validation found problems, then, to a
/// fixed point, those whose record refers to a record set aside (the server would refuse the
/// reference), with a problem naming the entry it refers to.
pub(crate) fn cascade(
    mapped: &[(usize, ResourceType, String, Mapped)],
) -> BTreeMap<usize, Vec<Problem>> {
    let mut held: BTreeMap<(i32, String), usize> = BTreeMap::new();
    let mut reasons: BTreeMap<usize, Vec<Problem>> = BTreeMap::new();
    for (i, t, id, m) in mapped {
        if !m.problems.is_empty() {
            held.insert((*t as i32, id.clone()), *i);
            reasons.insert(*i, m.problems.clone());
        }
    }
    loop {
        let mut more = Vec::new();
        for (i, t, id, m) in mapped {
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
    reasons
}

/// The quarantine entry of bundle entry `entry`, mapped as `m`, set aside for `problems`.
pub(crate) fn quarantined(
    entry: usize,
    t: ResourceType,
    id: String,
    m: &Mapped,
    resource: &Value,
    targets: &HashMap<String, Target>,
    problems: Vec<Problem>,
) -> Quarantined {
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
    Quarantined {
        entry,
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
    }
}

/// Every `reference` string in a resource.
pub(crate) fn reference_strings(v: &Value, out: &mut BTreeSet<String>) {
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
        return Err(problem(
            "",
            "must be a FHIR resource (a JSON object)".into(),
        ));
    };
    let fhir = object
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let Some(t) = modelled(fhir).filter(|t| *t != ResourceType::Patient) else {
        return Err(problem(
            "resourceType",
            format!(
                "{fhir:?} is not a record type Dossier models (a Patient comes with its bundle)"
            ),
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
