//! The patient hash: which shard holds a patient is `patient_hash(patient_id)` looked up in the
//! shards' `[hash_lo, hash_hi)` ranges.
//!
//! It is an on-disk and on-wire format: XXH3 (64-bit) of the patient id's UTF-8 bytes with the
//! fixed seed below. It must never change; `tests::known_values` pins it.

/// The seed of the patient hash ("DOSSIER1" as a little-endian u64). Never change it.
pub const PATIENT_HASH_SEED: u64 = u64::from_le_bytes(*b"DOSSIER1");

/// The 64-bit hash that places a patient in a shard.
pub fn patient_hash(patient_id: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(patient_id.as_bytes(), PATIENT_HASH_SEED)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pinned values: if this test fails, the hash changed and every stored shard map is wrong.
    #[test]
    fn known_values() {
        let got: Vec<u64> = ["", "patient-1", "85.07.30-033.28"]
            .iter()
            .map(|p| patient_hash(p))
            .collect();
        assert_eq!(got, PINNED);
    }

    /// The vectors every client's hash is checked against (docs/client-protocol.md): inputs of
    /// every length class of XXH3, computed with the reference xxHash library.
    #[test]
    fn shared_test_vectors() {
        let text = include_str!("../../clients/testdata/patient-hash-vectors.json");
        let doc: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(
            doc["seed"].as_str(),
            Some(PATIENT_HASH_SEED.to_string().as_str())
        );
        let vectors = doc["vectors"].as_array().unwrap();
        assert!(vectors.len() >= 40);
        for v in vectors {
            let input = v["input"].as_str().unwrap();
            let want: u64 = v["hash"].as_str().unwrap().parse().unwrap();
            assert_eq!(patient_hash(input), want, "input of {} bytes", input.len());
        }
    }

    // Cross-checked against the reference XXH3 (python-xxhash `xxh3_64_intdigest`, same seed).
    const PINNED: [u64; 3] = [
        2606540099225357142,
        12039219740810899933,
        14638417277319807648,
    ];
}
