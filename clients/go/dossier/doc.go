// Package dossier is the Go client of Dossier, the patient-sharded record store: the generated
// gRPC API (package dossier.internal/go/api/dossierv1) plus the thin layer every client needs,
// written from docs/client-protocol.md and equal in behaviour to the Rust client:
//
//   - routing: the cluster map is fetched from any seed and cached; a request goes to the shard
//     whose hash range holds PatientHash(patient id), at its last known leader;
//   - retries within one deadline: leader hints are followed, the map is refreshed on
//     STALE_EPOCH and SHARD_NOT_FOUND, unreachable or unavailable replicas are rotated, and
//     overload is backed off (10 ms doubling to 100 ms);
//   - exactly-once Kv writes: every write carries a session of its shard and a sequence number,
//     the same on every retry, so a retried write is applied once;
//   - records writes carry a request id drawn once per call and resent on every retry;
//   - errors: *Error, with the gRPC code, the ErrorDetail of the standard error model and what
//     to do about it.
//
// Unlike the Rust client it does not coalesce concurrent requests into Kv.Bundle calls by
// itself; Bundle sends one explicitly.
package dossier
