//! Exactly-once writes: every write stores, in its own batch, its request id's record
//! `q/<request id>` → fingerprint ‖ answer. A retry finds it and gets the first answer; a
//! different request under a used id is refused.

use dossier_api::v1::RecordWriteResponse;
use prost::Message;

use crate::error::Error;

/// The length of a request fingerprint.
pub const FINGERPRINT_BYTES: usize = 16;

/// The fingerprint that ties a request id to one request: XXH3-128 of the method name and the
/// request as encoded, without its route (which changes between retries).
pub fn fingerprint<M: Message>(method: &str, request: &M) -> [u8; FINGERPRINT_BYTES] {
    let encoded = request.encode_to_vec();
    let mut hash = xxhash_rust::xxh3::Xxh3::new();
    hash.update(method.as_bytes());
    hash.update(&[0]);
    hash.update(without_route(&encoded));
    hash.digest128().to_be_bytes()
}

/// The stored record of an applied request: fingerprint ‖ answer.
pub fn stored_answer(
    fingerprint: &[u8; FINGERPRINT_BYTES],
    answer: &RecordWriteResponse,
) -> Vec<u8> {
    let mut stored = fingerprint.to_vec();
    stored.extend_from_slice(&answer.encode_to_vec());
    stored
}

/// The stored answer of an applied request id, marked `replayed`, or INVALID_ARGUMENT when the
/// id was used by another request.
pub fn replay(
    stored: &[u8],
    fingerprint: &[u8; FINGERPRINT_BYTES],
) -> Result<RecordWriteResponse, Error> {
    if stored.len() < FINGERPRINT_BYTES {
        return Err(Error::corrupt("request record"));
    }
    if &stored[..FINGERPRINT_BYTES] != fingerprint {
        return Err(Error::invalid(
            "header.request_id",
            "was already used by a different request",
        ));
    }
    let mut response = RecordWriteResponse::decode(&stored[FINGERPRINT_BYTES..])
        .map_err(|_| Error::corrupt("request record's answer"))?;
    response.replayed = true;
    response.index = 0;
    Ok(response)
}

/// An encoded write request less its route: every write request has its `RouteHeader` as field
/// 1, which prost encodes first (tag byte 0x0a, a length, the bytes).
fn without_route(encoded: &[u8]) -> &[u8] {
    if encoded.first() != Some(&0x0a) {
        return encoded;
    }
    let mut rest = &encoded[1..];
    match prost::encoding::decode_varint(&mut rest) {
        Ok(len) if (len as usize) <= rest.len() => &rest[len as usize..],
        _ => encoded,
    }
}
