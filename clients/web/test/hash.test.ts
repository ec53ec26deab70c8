// The patient hash against the shared vectors of the reference xxHash (the Rust and Go clients
// check the same file).

import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as path from "node:path";
import { test } from "node:test";
import { PATIENT_HASH_SEED, patientHash, patientHashSync } from "../src/hash.js";
import { PACKAGE_DIR } from "./cluster.js";

interface Vectors {
  seed: string;
  seed_hex: string;
  vectors: { input: string; hash: string }[];
}

const vectors = JSON.parse(
  fs.readFileSync(path.join(PACKAGE_DIR, "..", "testdata", "patient-hash-vectors.json"), "utf8"),
) as Vectors;

test("the seed is DOSSIER1 read little-endian", () => {
  assert.equal(PATIENT_HASH_SEED.toString(), vectors.seed);
  assert.equal("0x" + PATIENT_HASH_SEED.toString(16), vectors.seed_hex);
  const le = new DataView(new TextEncoder().encode("DOSSIER1").buffer).getBigUint64(0, true);
  assert.equal(le, PATIENT_HASH_SEED);
});

test("patient hash vectors", async () => {
  assert.ok(vectors.vectors.length > 0);
  for (const v of vectors.vectors) {
    assert.equal((await patientHash(v.input)).toString(), v.hash, `hash of ${JSON.stringify(v.input)}`);
    assert.equal(patientHashSync(v.input).toString(), v.hash);
  }
});
