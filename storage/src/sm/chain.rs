//! Hash-chained append logs: [`crate::Op::Append`] adds an entry to a log kept under a head
//! key, linking it to the entry before by SHA-256, at apply time, so that concurrent appends
//! from anywhere are ordered by the Raft log and every replica builds the same chain. A change
//! or removal of any entry, or of the tail, breaks the chain ([`verify`]).
//!
//! Layout, for a log with head key `H` and entry prefix `P`:
//! - `H` = seq (u64 BE) ‖ hash of entry `seq` (32 bytes); absent for an empty log;
//! - `P ‖ seq (u64 BE)` = hash (32 bytes) ‖ the entry's bytes, for seq = 1, 2, …
//!
//! hash(seq) = SHA-256("dossier-chain-v1" ‖ hash(seq − 1) ‖ seq (u64 BE) ‖ bytes), with
//! hash(0) = 32 zero bytes.

use sha2::{Digest, Sha256};

/// Bytes of a link hash.
pub const HASH_BYTES: usize = 32;

/// The hash before the first entry.
pub const GENESIS: [u8; HASH_BYTES] = [0; HASH_BYTES];

const DOMAIN: &[u8] = b"dossier-chain-v1";

/// The hash of entry `seq` holding `bytes`, after an entry hashed `prev`.
pub fn link(prev: &[u8; HASH_BYTES], seq: u64, bytes: &[u8]) -> [u8; HASH_BYTES] {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(prev);
    h.update(seq.to_be_bytes());
    h.update(bytes);
    h.finalize().into()
}

/// A head value: the last seq and its hash.
pub fn decode_head(value: &[u8]) -> Option<(u64, [u8; HASH_BYTES])> {
    if value.len() != 8 + HASH_BYTES {
        return None;
    }
    let seq = u64::from_be_bytes(value[..8].try_into().ok()?);
    Some((seq, value[8..].try_into().ok()?))
}

pub fn encode_head(seq: u64, hash: &[u8; HASH_BYTES]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + HASH_BYTES);
    v.extend_from_slice(&seq.to_be_bytes());
    v.extend_from_slice(hash);
    v
}

/// The key of entry `seq` under `prefix`.
pub fn entry_key(prefix: &[u8], seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 8);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// Splits a stored entry into its hash and bytes.
pub fn split_entry(value: &[u8]) -> Option<(&[u8; HASH_BYTES], &[u8])> {
    if value.len() < HASH_BYTES {
        return None;
    }
    let (hash, bytes) = value.split_at(HASH_BYTES);
    Some((hash.try_into().ok()?, bytes))
}

/// Where a chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Break {
    #[error("entry {seq} is missing (the entries jump from {after} to {seq_found})")]
    Missing {
        seq: u64,
        after: u64,
        seq_found: u64,
    },
    #[error("entry {seq} does not match its hash: it was changed, or an entry before it was")]
    Altered { seq: u64 },
    #[error("entry {seq} is not readable")]
    Unreadable { seq: u64 },
    #[error("the head names entry {head_seq} but the entries end at {last}: entries were removed")]
    Truncated { head_seq: u64, last: u64 },
    #[error("the head's hash does not match entry {seq}: the head or the tail was rewritten")]
    HeadMismatch { seq: u64 },
    #[error("entries exist after the head's entry {head_seq}")]
    BeyondHead { head_seq: u64 },
}

/// Checks a chain as it is walked, entry by entry in seq order.
#[derive(Debug, Clone)]
pub struct Verifier {
    seq: u64,
    hash: [u8; HASH_BYTES],
}

impl Default for Verifier {
    fn default() -> Self {
        Verifier {
            seq: 0,
            hash: GENESIS,
        }
    }
}

impl Verifier {
    /// Takes the next entry (its seq and stored value); returns its bytes when it links.
    pub fn next<'v>(&mut self, seq: u64, value: &'v [u8]) -> Result<&'v [u8], Break> {
        if seq != self.seq + 1 {
            return Err(Break::Missing {
                seq: self.seq + 1,
                after: self.seq,
                seq_found: seq,
            });
        }
        let (stored, bytes) = split_entry(value).ok_or(Break::Unreadable { seq })?;
        let hash = link(&self.hash, seq, bytes);
        if &hash != stored {
            return Err(Break::Altered { seq });
        }
        self.seq = seq;
        self.hash = hash;
        Ok(bytes)
    }

    /// The last seq and hash walked so far.
    pub fn position(&self) -> (u64, [u8; HASH_BYTES]) {
        (self.seq, self.hash)
    }

    /// Ends the walk against the head (None: an empty log).
    pub fn finish(&self, head: Option<(u64, [u8; HASH_BYTES])>) -> Result<(), Break> {
        let (head_seq, head_hash) = head.unwrap_or((0, GENESIS));
        if self.seq < head_seq {
            return Err(Break::Truncated {
                head_seq,
                last: self.seq,
            });
        }
        if self.seq > head_seq {
            return Err(Break::BeyondHead { head_seq });
        }
        if self.hash != head_hash {
            return Err(Break::HeadMismatch { seq: head_seq });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Head = (u64, [u8; HASH_BYTES]);

    /// A chain of `n` entries as the state machine stores it, and its head.
    fn chain(n: u64) -> (Vec<(u64, Vec<u8>)>, Head) {
        let mut prev = GENESIS;
        let mut entries = Vec::new();
        for seq in 1..=n {
            let bytes = format!("event {seq}").into_bytes();
            let hash = link(&prev, seq, &bytes);
            let mut stored = hash.to_vec();
            stored.extend_from_slice(&bytes);
            entries.push((seq, stored));
            prev = hash;
        }
        (entries, (n, prev))
    }

    fn walk(entries: &[(u64, Vec<u8>)], head: Head) -> Result<(), Break> {
        let mut v = Verifier::default();
        for (seq, value) in entries {
            v.next(*seq, value)?;
        }
        v.finish(Some(head))
    }

    #[test]
    fn an_intact_chain_verifies_and_every_tampering_is_found() {
        let (entries, head) = chain(5);
        walk(&entries, head).unwrap();
        Verifier::default().finish(None).unwrap();

        let mut changed = entries.clone();
        *changed[2].1.last_mut().unwrap() ^= 1;
        assert_eq!(walk(&changed, head), Err(Break::Altered { seq: 3 }));

        let mut removed = entries.clone();
        removed.remove(1);
        assert!(matches!(
            walk(&removed, head),
            Err(Break::Missing { seq: 2, .. })
        ));

        let truncated = entries[..4].to_vec();
        assert_eq!(
            walk(&truncated, head),
            Err(Break::Truncated {
                head_seq: 5,
                last: 4
            })
        );
        // Truncated with the head rewritten to the shorter chain's seq but not its hash.
        assert_eq!(
            walk(&truncated, (4, head.1)),
            Err(Break::HeadMismatch { seq: 4 })
        );
        // An entry rewritten with a recomputed own hash breaks at the next link.
        let mut rehashed = entries.clone();
        let bytes = b"event 2, rewritten".to_vec();
        let prev: [u8; HASH_BYTES] = entries[0].1[..HASH_BYTES].try_into().unwrap();
        let mut stored = link(&prev, 2, &bytes).to_vec();
        stored.extend_from_slice(&bytes);
        rehashed[1].1 = stored;
        assert_eq!(walk(&rehashed, head), Err(Break::Altered { seq: 3 }));
    }
}
