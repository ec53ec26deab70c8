//! The one key map of a patient's data in its shard's store (docs/schema.md §4). Every key of a
//! patient starts with the patient id and a space byte, so a patient's keys are contiguous and
//! never mix with another patient's:
//!
//! | space | key                                   | value                                    |
//! |-------|---------------------------------------|------------------------------------------|
//! | Kv    | `P 0x00 <user key>`                   | the user's value                         |
//! | rec   | `P 0x01 c`                            | the patient's clock (u64 BE)             |
//! | rec   | `P 0x01 p`                            | empty; present iff the Patient is live   |
//! | rec   | `P 0x01 h/<Type>/<id>`                | current version (u64 BE)                 |
//! | rec   | `P 0x01 v/<Type>/<id>/<version BE>`   | one version (`Resource`)                 |
//! | rec   | `P 0x01 t/<Type>/<stamp BE>`          | version BE ‖ id (Everything order)       |
//! | rec   | `P 0x01 q/<request id>`               | fingerprint ‖ answer (exactly-once)      |
//! | rec   | `P 0x01 i/<system>\|<value>`          | token: the patient holds the identifier  |
//! | rec   | `P 0x01 f/<token>/<system>\|<value>`  | empty: a revoked identifier claim        |
//! | rec   | `P 0x01 x/<Type>/<date>/<id>`         | search index by date (value: status)     |
//! | rec   | `P 0x01 y/<Type>/<system>\|<code> 0x00 <date>/<id>` | search index by code       |
//! | rec   | `P 0x01 z/<id>`                       | a quarantined record                     |
//! | rec   | `P 0x01 A`                            | audit chain head: seq BE ‖ hash          |
//! | rec   | `P 0x01 a/<seq BE>`                   | audit event: hash ‖ `AuditEvent`         |
//! | mpi   | `mpi:<system>\|<value> 0x01 m`        | the identifier's claim record            |
//!
//! `<date>` is the clinical date, order-inverted so that a forward scan is newest first.

use bytes::Bytes;

use crate::error::Error;

/// A patient's id: FHIR id syntax `[A-Za-z0-9.-]{1,64}`, the rule every service applies (Kv and
/// Records alike), so that a patient written through Kv can hold records and no id can contain
/// a space byte, `/`, `|` or `:` of the key layout.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PatientId(String);

/// The longest patient (and record) id.
pub const ID_BYTES_MAX: usize = 64;

impl PatientId {
    /// Checks `id`; `field` names it in the error.
    pub fn parse(id: &str, field: &str) -> Result<PatientId, Error> {
        if id.len() > ID_BYTES_MAX {
            return Err(Error::InvalidArgument {
                field: field.to_owned(),
                message: format!("is {} bytes, above the limit of {ID_BYTES_MAX}", id.len()),
                limit: Some(ID_BYTES_MAX as u64),
            });
        }
        if !crate::is_valid_id(id) {
            return Err(Error::invalid(
                field,
                format!("must match [A-Za-z0-9.-]{{1,{ID_BYTES_MAX}}}"),
            ));
        }
        Ok(PatientId(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The prefix of every Kv key of this patient: `P 0x00`.
    pub fn kv_prefix(&self) -> Vec<u8> {
        let mut prefix = self.0.as_bytes().to_vec();
        prefix.push(SPACE_KV);
        prefix
    }
}

impl std::fmt::Display for PatientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The space byte of Kv keys.
pub const SPACE_KV: u8 = 0x00;
/// The space byte of record keys.
pub const SPACE_RECORDS: u8 = 0x01;

/// The hash a stored key is routed by: the patient hash of its routing key (a patient id, or an
/// identifier's `mpi:<system>|<value>`), the bytes before its space byte. `None` for a key with
/// no space byte. Shard splits divide a shard's keys by it, so it must agree with how every
/// request is routed.
pub fn route_hash(key: &[u8]) -> Option<u64> {
    let end = key
        .iter()
        .position(|b| *b == SPACE_KV || *b == SPACE_RECORDS)?;
    let owner = std::str::from_utf8(&key[..end]).ok()?;
    Some(dossier_api::patient_hash(owner))
}

/// `owner ‖ 0x01 ‖ parts`: a key in a routing key's records space.
fn key(owner: &str, parts: &[&[u8]]) -> Bytes {
    let len = owner.len() + 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut k = Vec::with_capacity(len);
    k.extend_from_slice(owner.as_bytes());
    k.push(SPACE_RECORDS);
    for p in parts {
        k.extend_from_slice(p);
    }
    k.into()
}

/// A big-endian u64 value.
pub fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// A clinical date (unix micros) as a key part, newest first: `!(micros ^ sign bit)`, so that a
/// forward scan meets later dates first and undated records (`i64::MIN`) last.
pub fn date_part(micros: i64) -> [u8; 8] {
    (!((micros as u64) ^ (1 << 63))).to_be_bytes()
}

/// The inverse of [`date_part`].
pub fn date_from_part(part: &[u8]) -> Option<i64> {
    Some(((!be_u64(part)?) ^ (1 << 63)) as i64)
}

/// The records keys of one patient.
#[derive(Debug, Clone)]
pub struct PatientKeys {
    patient: String,
}

impl PatientKeys {
    pub fn new(patient: &PatientId) -> Self {
        PatientKeys {
            patient: patient.0.clone(),
        }
    }

    fn key(&self, parts: &[&[u8]]) -> Bytes {
        key(&self.patient, parts)
    }

    /// `c`: the patient's clock, the last stamp given to a version (u64 BE).
    pub fn clock(&self) -> Bytes {
        self.key(&[b"c"])
    }

    /// `p`: present iff the Patient record exists and is not entered-in-error.
    pub fn present(&self) -> Bytes {
        self.key(&[b"p"])
    }

    /// `h/<Type>/<id>`: the current version (u64 BE).
    pub fn head(&self, t: &str, id: &str) -> Bytes {
        self.key(&[b"h/", t.as_bytes(), b"/", id.as_bytes()])
    }

    /// `v/<Type>/<id>/<version u64 BE>`: one immutable version (`Resource`, protobuf).
    pub fn version(&self, t: &str, id: &str, version: u64) -> Bytes {
        self.key(&[
            b"v/",
            t.as_bytes(),
            b"/",
            id.as_bytes(),
            b"/",
            &version.to_be_bytes(),
        ])
    }

    /// `t/<Type>/`: the records of a kind by the stamp of their current version.
    pub fn stamps(&self, t: &str) -> Bytes {
        self.key(&[b"t/", t.as_bytes(), b"/"])
    }

    /// `t/<Type>/<stamp u64 BE>` → version u64 BE ‖ id.
    pub fn stamp(&self, t: &str, stamp: u64) -> Bytes {
        self.key(&[b"t/", t.as_bytes(), b"/", &stamp.to_be_bytes()])
    }

    /// `q/<request id>` → fingerprint (16 bytes) ‖ `RecordWriteResponse`.
    pub fn request(&self, request_id: &[u8]) -> Bytes {
        self.key(&[b"q/", request_id])
    }

    /// `i/<system|value>` (H_P(X)) → the token of the write that made the patient hold X.
    pub fn hold(&self, x: &Ident) -> Bytes {
        self.key(&[b"i/", x.joined().as_bytes()])
    }

    /// `f/<token>/<system|value>` (F_P(T, X)): claim T of X was revoked.
    pub fn fence(&self, token: &[u8], x: &Ident) -> Bytes {
        self.key(&[b"f/", token, b"/", x.joined().as_bytes()])
    }

    /// `x/<Type>/`: the search index of a kind by clinical date.
    pub fn by_date(&self, t: &str) -> Bytes {
        self.key(&[b"x/", t.as_bytes(), b"/"])
    }

    /// `x/<Type>/<date>/<id>` → status.
    pub fn by_date_entry(&self, t: &str, date: i64, id: &str) -> Bytes {
        self.key(&[
            b"x/",
            t.as_bytes(),
            b"/",
            &date_part(date),
            b"/",
            id.as_bytes(),
        ])
    }

    /// `y/<Type>/<system|code> 0x00`: the search index of a kind and code by clinical date.
    pub fn by_code(&self, t: &str, code: &str) -> Bytes {
        self.key(&[b"y/", t.as_bytes(), b"/", code.as_bytes(), &[0]])
    }

    /// `y/<Type>/<system|code> 0x00 <date>/<id>` → status.
    pub fn by_code_entry(&self, t: &str, code: &str, date: i64, id: &str) -> Bytes {
        self.key(&[
            b"y/",
            t.as_bytes(),
            b"/",
            code.as_bytes(),
            &[0],
            &date_part(date),
            b"/",
            id.as_bytes(),
        ])
    }

    /// `z/`: the patient's quarantine.
    pub fn quarantine(&self) -> Bytes {
        self.key(&[b"z/"])
    }

    /// `z/<id>` → a quarantined record (`QuarantinedRecord`).
    pub fn quarantined(&self, id: &str) -> Bytes {
        self.key(&[b"z/", id.as_bytes()])
    }

    /// `A`: the head of the patient's audit chain (the store's chain layout).
    pub fn audit_head(&self) -> Bytes {
        self.key(&[b"A"])
    }

    /// `a/`: the prefix of the audit chain's entries, each `a/<seq BE>`.
    pub fn audit_entries(&self) -> Bytes {
        self.key(&[b"a/"])
    }
}

/// An identifier of an indexed system.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Ident {
    pub system: String,
    pub value: String,
}

impl Ident {
    /// `system|value`: the identifier in keys (systems never contain `|`).
    pub fn joined(&self) -> String {
        format!("{}|{}", self.system, self.value)
    }

    /// The routing key of the identifier's claim record: `mpi:<system>|<value>`.
    pub fn route_key(&self) -> String {
        format!("mpi:{}", self.joined())
    }

    /// E[X]: `mpi:<system>|<value> 0x01 m`, the identifier's claim record.
    pub fn claim_key(&self) -> Bytes {
        key(&self.route_key(), &[b"m"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patient_ids_follow_one_rule() {
        assert!(PatientId::parse("a1.B-2", "p").is_ok());
        assert!(PatientId::parse(&"x".repeat(64), "p").is_ok());
        for bad in ["", "a/b", "mpi:x", "a b", "a|b", "é", &"x".repeat(65)] {
            let e = PatientId::parse(bad, "route.patient_id").unwrap_err();
            assert!(e.to_string().starts_with("route.patient_id"), "{e}");
        }
        let Error::InvalidArgument { limit, .. } =
            PatientId::parse(&"x".repeat(65), "p").unwrap_err()
        else {
            panic!("not an argument error")
        };
        assert_eq!(limit, Some(64));
    }

    #[test]
    fn dates_order_newest_first_and_round_trip() {
        let dates = [i64::MIN, -5, 0, 1, 1_700_000_000_000_000, i64::MAX];
        for w in dates.windows(2) {
            assert!(date_part(w[0]) > date_part(w[1]), "{w:?}");
        }
        for d in dates {
            assert_eq!(date_from_part(&date_part(d)), Some(d));
        }
    }

    #[test]
    fn spaces_keep_patients_and_kinds_apart() {
        let p = PatientKeys::new(&PatientId::parse("p1", "p").unwrap());
        let q = PatientKeys::new(&PatientId::parse("p10", "p").unwrap());
        // No key of p1 is a prefix-range member of p10's and the reverse.
        assert!(!q.clock().starts_with(&p.clock()[..3]));
        assert!(p.head("Observation", "a").starts_with(b"p1\x01h/"));
        assert!(
            p.by_code_entry("Observation", "http://loinc.org|2339-0", 5, "o1")
                .starts_with(&p.by_code("Observation", "http://loinc.org|2339-0"))
        );
        assert!(
            !p.by_code_entry("Observation", "http://loinc.org|2339-01", 5, "o1")
                .starts_with(&p.by_code("Observation", "http://loinc.org|2339-0"))
        );
        assert!(p.quarantined("x").starts_with(&p.quarantine()));
    }
}
