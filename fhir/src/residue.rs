//! Lossless import: the source elements a typed record does not hold, kept verbatim beside it in
//! `Resource.unmodelled_json` and merged back on export (docs/schema.md §8).
//!
//! The residue is found by a generic diff, not by a list of what the mapping reads: the record is
//! mapped, exported again, and every source leaf the export does not hold is kept. So an element
//! the mapping forgets is kept rather than lost, and the residue never holds an element the typed
//! export holds (a later typed update of that element is not overridden on export). A leaf the
//! export holds with another value is a mapping that changes the form of a value; the round-trip
//! test over the Synthea sample lists such leaves, and the mapping is fixed.
//!
//! Shape: an object shaped like the resource; arrays by position, `null` where an element holds
//! nothing unmodelled (trailing nulls are cut). Reference strings inside kept elements are
//! rewritten to what they resolved to (`Type/id`), so an export does not point into the source
//! bundle. What is kept of a modelled reference (its `display`) carries the reference as a guard:
//! it is merged back only onto the same target, so an update that points the typed reference
//! elsewhere drops it. Other elements are merged by position whatever the typed update did.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// Meta elements the store sets: never kept (`meta.tag`, `meta.profile`, `meta.security` are).
const META_SET_BY_STORE: &[&str] = &["versionId", "lastUpdated", "source"];

/// The residue of `source` (a FHIR resource) against `typed` (the export of its typed record), or
/// None when the export holds every source leaf. `resolve` rewrites a kept reference string.
pub(crate) fn residue(
    source: &Value,
    typed: &Value,
    resolve: &dyn Fn(&str) -> Option<String>,
) -> Option<Value> {
    let Value::Object(src) = source else {
        return None;
    };
    let empty = Map::new();
    let typed = typed.as_object().unwrap_or(&empty);
    let mut out = Map::new();
    for (k, v) in src {
        match k.as_str() {
            // Identity: regenerated from the record (the id may be rewritten).
            "resourceType" | "id" => {}
            "meta" => {
                let mut v = v.clone();
                if let Value::Object(m) = &mut v {
                    m.retain(|k, _| !META_SET_BY_STORE.contains(&k.as_str()));
                    if m.is_empty() {
                        continue;
                    }
                }
                if let Some(d) = diff(&v, typed.get(k), resolve) {
                    out.insert(k.clone(), d);
                }
            }
            _ => {
                if let Some(d) = diff(v, typed.get(k), resolve) {
                    out.insert(k.clone(), d);
                }
            }
        }
    }
    (!out.is_empty()).then_some(Value::Object(out))
}

fn diff(
    src: &Value,
    typed: Option<&Value>,
    resolve: &dyn Fn(&str) -> Option<String>,
) -> Option<Value> {
    match (src, typed) {
        (_, None) => {
            let mut kept = src.clone();
            rewrite_references(&mut kept, resolve);
            Some(kept)
        }
        (Value::Object(s), Some(Value::Object(t))) => {
            let mut out = Map::new();
            for (k, v) in s {
                // A reference to a practitioner or organisation became an identifier reference:
                // the typed record holds its target.
                if k == "reference" && t.contains_key("identifier") {
                    continue;
                }
                if let Some(d) = diff(v, t.get(k), resolve) {
                    out.insert(k.clone(), d);
                }
            }
            if out.is_empty() {
                return None;
            }
            // What is kept of a reference (its display) belongs to its target: the target goes
            // with it as a guard, so that it is not merged onto another target after an update.
            if let Some(r @ Value::String(_)) = t.get("reference") {
                out.insert("reference".to_owned(), r.clone());
            }
            Some(Value::Object(out))
        }
        (Value::Array(s), Some(Value::Array(t))) => {
            let mut out: Vec<Value> = s
                .iter()
                .enumerate()
                .map(|(i, v)| diff(v, t.get(i), resolve).unwrap_or(Value::Null))
                .collect();
            while out.last() == Some(&Value::Null) {
                out.pop();
            }
            (!out.is_empty()).then_some(Value::Array(out))
        }
        // The export holds this leaf (or element): the typed model represents it.
        _ => None,
    }
}

fn rewrite_references(v: &mut Value, resolve: &dyn Fn(&str) -> Option<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter_mut() {
                match x {
                    Value::String(s) if k == "reference" => {
                        if let Some(r) = resolve(s) {
                            *s = r;
                        }
                    }
                    _ => rewrite_references(x, resolve),
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|x| rewrite_references(x, resolve)),
        _ => {}
    }
}

/// Deep-merges `residue` into `typed`: objects by key, arrays by position (nulls skipped; items
/// past the end of the typed array appended), the typed value winning on a conflicting leaf.
pub(crate) fn merge(typed: &mut Value, residue: &Value) {
    match (typed, residue) {
        (Value::Object(t), Value::Object(r)) => {
            if let (Some(Value::String(a)), Some(Value::String(b))) =
                (t.get("reference"), r.get("reference"))
                && a != b
            {
                // Kept for another target (the typed reference changed since).
                return;
            }
            for (k, v) in r {
                match t.get_mut(k) {
                    Some(x) => merge(x, v),
                    None if v.is_null() => {}
                    None => {
                        t.insert(k.clone(), without_nulls(v));
                    }
                }
            }
        }
        (Value::Array(t), Value::Array(r)) => {
            for (i, v) in r.iter().enumerate() {
                if v.is_null() {
                    continue;
                }
                match t.get_mut(i) {
                    Some(x) => merge(x, v),
                    // A reference whose typed element is gone is gone too.
                    None if v.get("reference").is_some() => {}
                    None => t.push(without_nulls(v)),
                }
            }
        }
        _ => {}
    }
}

/// A residue subtree as an element of its own: array positions that hold nothing are dropped.
fn without_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, x)| !x.is_null())
                .map(|(k, x)| (k.clone(), without_nulls(x)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(
            a.iter()
                .filter(|x| !x.is_null())
                .map(without_nulls)
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Every leaf (path → value) of a JSON value; paths as `a.b[2].c`.
pub(crate) fn leaves(v: &Value, path: &str, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                leaves(x, &p, out);
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                leaves(x, &format!("{path}[{i}]"), out);
            }
        }
        _ => out.push((path.to_owned(), v.clone())),
    }
}

/// `a.b[3].c` → `a.b.c`.
pub(crate) fn normalise(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut skip = false;
    for c in path.chars() {
        match c {
            '[' => skip = true,
            ']' => skip = false,
            _ if !skip => out.push(c),
            _ => {}
        }
    }
    out
}

/// Counts the non-null leaves of a residue by normalised path, under `prefix` (the FHIR type).
pub(crate) fn count_leaves(residue: &Value, prefix: &str, counts: &mut BTreeMap<String, usize>) {
    let mut ls = Vec::new();
    leaves(residue, "", &mut ls);
    for (path, v) in ls {
        if !v.is_null() {
            *counts
                .entry(format!("{prefix}.{}", normalise(&path)))
                .or_default() += 1;
        }
    }
}

/// The value at a leaf path produced by `leaves` (`a.b[2].c`), if any.
#[cfg(test)]
pub(crate) fn at<'v>(v: &'v Value, path: &str) -> Option<&'v Value> {
    let mut cur = v;
    for part in path.split('.') {
        let (key, indexes) = match part.find('[') {
            Some(i) => (&part[..i], &part[i..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            cur = cur.get(key)?;
        }
        for ix in indexes.split('[').filter(|s| !s.is_empty()) {
            let i: usize = ix.trim_end_matches(']').parse().ok()?;
            cur = cur.get(i)?;
        }
    }
    Some(cur)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn residue_keeps_what_the_export_lacks_and_merge_restores_it() {
        let source = json!({
            "resourceType": "Patient", "id": "x",
            "meta": {"versionId": "3", "tag": [{"code": "t"}]},
            "name": [{"family": "A", "use": "official"}, {"family": "B"}],
            "maritalStatus": {"text": "M"},
            "link": [{"other": {"reference": "urn:uuid:1"}}]
        });
        let typed = json!({"resourceType": "Patient", "id": "y", "name": [{"family": "A"}, {"family": "B"}]});
        let resolve = |r: &str| (r == "urn:uuid:1").then(|| "Patient/1".to_owned());
        let r = residue(&source, &typed, &resolve).unwrap();
        assert_eq!(
            r,
            json!({
                "meta": {"tag": [{"code": "t"}]},
                "name": [{"use": "official"}],
                "maritalStatus": {"text": "M"},
                "link": [{"other": {"reference": "Patient/1"}}]
            })
        );
        let mut merged = typed.clone();
        merge(&mut merged, &r);
        assert_eq!(merged["name"][0]["use"], json!("official"));
        assert_eq!(merged["name"][1], json!({"family": "B"}));
        assert_eq!(merged["maritalStatus"]["text"], json!("M"));
        // The typed value wins on a conflicting leaf.
        let mut t = json!({"gender": "male"});
        merge(&mut t, &json!({"gender": "female", "x": [null, 1]}));
        assert_eq!(t, json!({"gender": "male", "x": [1]}));
        assert_eq!(at(&source, "name[0].use"), Some(&json!("official")));
        assert_eq!(at(&source, "meta.tag[0].code"), Some(&json!("t")));
        assert_eq!(residue(&typed, &typed, &resolve), None);
        // A reference's display is kept with its target, and merged only onto that target.
        let source = json!({"reasonReference": [{"reference": "urn:uuid:1", "display": "Asthma"}],
            "requester": {"reference": "urn:uuid:2", "display": "Dr. A"}});
        let typed = json!({"reasonReference": [{"reference": "Condition/1"}],
            "requester": {"type": "Practitioner", "identifier": {"value": "9"}, "display": "Dr. A"}});
        let r = residue(&source, &typed, &resolve).unwrap();
        assert_eq!(
            r,
            json!({"reasonReference": [{"reference": "Condition/1", "display": "Asthma"}]})
        );
        let mut same = typed.clone();
        merge(&mut same, &r);
        assert_eq!(same["reasonReference"][0]["display"], json!("Asthma"));
        let mut moved = json!({"reasonReference": [{"reference": "Condition/2"}]});
        merge(&mut moved, &r);
        assert_eq!(
            moved,
            json!({"reasonReference": [{"reference": "Condition/2"}]})
        );
        let mut removed = json!({"reasonReference": []});
        merge(&mut removed, &r);
        assert_eq!(removed, json!({"reasonReference": []}));
    }
}
