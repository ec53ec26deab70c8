// The patient hash: where a patient's data lives. XXH3-64 of the UTF-8 bytes of the patient id
// (or index key) with a fixed seed; a shard holds the patients whose hash falls in its range.
// Equal to the Rust and Go clients' (clients/testdata/patient-hash-vectors.json).

import { createXXHash3, type IHasher } from "hash-wasm";

/** The seed: "DOSSIER1" read as a little-endian u64. */
export const PATIENT_HASH_SEED = 0x3152454953534f44n;

const encoder = new TextEncoder();
let hasher: IHasher | undefined;
let loading: Promise<IHasher> | undefined;

/** Loads the hash (WebAssembly) once; patientHashSync may be used after it resolves. */
export async function initPatientHash(): Promise<void> {
  if (hasher === undefined) {
    loading ??= createXXHash3(
      Number(PATIENT_HASH_SEED & 0xffffffffn),
      Number(PATIENT_HASH_SEED >> 32n),
    );
    hasher = await loading;
  }
}

/** The patient hash of an id, as an unsigned 64-bit bigint. */
export async function patientHash(id: string): Promise<bigint> {
  await initPatientHash();
  return patientHashSync(id);
}

/** The patient hash, once initPatientHash() has resolved (DossierClient.connect does it). */
export function patientHashSync(id: string): bigint {
  if (hasher === undefined) {
    throw new Error("patientHashSync before initPatientHash() resolved");
  }
  hasher.init();
  hasher.update(encoder.encode(id));
  // The digest is XXH3's canonical (big-endian) form.
  return BigInt("0x" + hasher.digest("hex"));
}
