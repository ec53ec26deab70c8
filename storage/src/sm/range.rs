//! The part of the hash space a shard replica owns, once a split has given part of it away.
//!
//! The store knows nothing of patients: the node supplies a [`KeyRoute`], the hash a key is
//! routed by. A replica that never split stores no range and checks nothing (the node routes by
//! the cluster map); after a split each side stores its range, and every command and read is
//! checked against it, so a key that moved is never written or read on the side that gave it
//! away, whatever map the proposer routed by.

/// The routing hash of a key (a user key, as the batch names it); `None` for a key that is not
/// routed by hash (it stays with the shard it is in and is never checked).
pub type KeyRoute = fn(&[u8]) -> Option<u64>;

/// A half-open range `[lo, hi)` of the 64-bit hash space; `hi: None` runs to the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashRange {
    pub lo: u64,
    pub hi: Option<u64>,
}

impl HashRange {
    pub fn contains(&self, hash: u64) -> bool {
        hash >= self.lo && self.hi.is_none_or(|hi| hash < hi)
    }

    pub(crate) fn encode(&self) -> [u8; 17] {
        let mut out = [0u8; 17];
        out[..8].copy_from_slice(&self.lo.to_be_bytes());
        if let Some(hi) = self.hi {
            out[8..16].copy_from_slice(&hi.to_be_bytes());
            out[16] = 1;
        }
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<HashRange> {
        if bytes.len() != 17 {
            return None;
        }
        let lo = u64::from_be_bytes(bytes[..8].try_into().ok()?);
        let hi = u64::from_be_bytes(bytes[8..16].try_into().ok()?);
        match bytes[16] {
            0 => Some(HashRange { lo, hi: None }),
            1 if hi > lo => Some(HashRange { lo, hi: Some(hi) }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::HashRange;

    #[test]
    fn ranges_round_trip_and_are_half_open() {
        for r in [
            HashRange { lo: 0, hi: None },
            HashRange { lo: 5, hi: Some(9) },
            HashRange {
                lo: u64::MAX - 1,
                hi: None,
            },
        ] {
            assert_eq!(HashRange::decode(&r.encode()), Some(r));
        }
        let r = HashRange { lo: 5, hi: Some(9) };
        assert!(!r.contains(4) && r.contains(5) && r.contains(8) && !r.contains(9));
        assert!(HashRange { lo: 7, hi: None }.contains(u64::MAX));
        // An empty or inverted range does not decode.
        let mut bad = r.encode();
        bad[8..16].copy_from_slice(&5u64.to_be_bytes());
        assert_eq!(HashRange::decode(&bad), None);
    }
}
