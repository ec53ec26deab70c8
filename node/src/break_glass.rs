//! The review list of break-the-glass accesses: each one is written to the meta group before
//! it is served (keys `break-glass/<time µs BE><node BE><n BE>`), so that auditors find every
//! such access of the cluster in one place (`Admin.ListBreakGlass`, `dossier audit break-glass`),
//! besides the event in the patient's own audit chain.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use dossier_api::v1::BreakGlassAccess;
use dossier_records::kv;
use dossier_storage::ShardHandle;
use prost::Message;

use crate::authn::Caller;
use crate::errors::ApiError;

const PREFIX: &[u8] = b"break-glass/";

/// The most accesses one list answers.
pub const LIST_MAX: usize = 1_000;

/// Distinguishes the accesses one node records in the same microsecond.
static NEXT: AtomicU64 = AtomicU64::new(0);

/// The put recording `caller`'s access to `patient` (or an identifier lookup) for `reason`.
pub fn record(caller: &Caller, patient: &str, reason: &str, call: &str, node_id: u64) -> kv::Op {
    let time_micros = dossier_records::now_micros() as i64;
    let access = BreakGlassAccess {
        time_micros,
        actor: caller.name.clone(),
        actor_identifiers: caller.care.idents().map(|x| x.joined()).collect(),
        via: caller.via.clone().unwrap_or_default(),
        patient_id: patient.to_owned(),
        reason: reason.to_owned(),
        node_id,
        call: call.to_owned(),
    };
    let mut key = PREFIX.to_vec();
    key.extend_from_slice(&(time_micros.max(0) as u64).to_be_bytes());
    key.extend_from_slice(&node_id.to_be_bytes());
    key.extend_from_slice(&NEXT.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    kv::Op::Put {
        key: Bytes::from(key),
        value: Bytes::from(access.encode_to_vec()),
    }
}

/// The accesses at or after `since_micros`, oldest first, at most `limit`; and whether more
/// follow.
pub fn list(
    meta: &ShardHandle,
    since_micros: i64,
    limit: usize,
) -> Result<(Vec<BreakGlassAccess>, bool), ApiError> {
    // After the last key of the microsecond before `since_micros`.
    let start_after = (since_micros > 0).then(|| {
        let mut k = PREFIX.to_vec();
        k.extend_from_slice(&(since_micros as u64 - 1).to_be_bytes());
        k.extend_from_slice(&[0xff; 16]);
        k
    });
    let page = meta
        .scan_prefix(PREFIX, start_after.as_deref(), limit + 1)
        .map_err(|e| ApiError::Unavailable(format!("scan the meta store: {e}")))?;
    let more = page.len() > limit;
    let accesses = page
        .into_iter()
        .take(limit)
        .map(|(_, v)| {
            BreakGlassAccess::decode(v.as_ref()).map_err(|e| {
                ApiError::Internal(format!("a break-glass record does not decode: {e}"))
            })
        })
        .collect::<Result<_, _>>()?;
    Ok((accesses, more))
}
