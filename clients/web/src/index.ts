// @dossier/web-client: Dossier from a browser (or Node) over gRPC-Web.

export { applied, type Attempt, DossierClient, type DossierConfig, type Node, type ResourceInit } from "./client.js";
export { Bundle, type BundleAnswer } from "./bundle.js";
export {
  type Bytes,
  Deadline,
  newRequestId,
  type ReadOptions,
  type RequestOptions,
  type WriteOptions,
  type WriteResult,
} from "./common.js";
export { Code, codeOf, detailOf, DossierError, ErrorReason, reasonOf } from "./errors.js";
export { initPatientHash, PATIENT_HASH_SEED, patientHash, patientHashSync } from "./hash.js";
// The API's messages and enums (create(XxxSchema, {...}) builds a message).
export * from "./gen/dossier/v1/admin_pb.js";
export * from "./gen/dossier/v1/errors_pb.js";
export * from "./gen/dossier/v1/kv_pb.js";
export * from "./gen/dossier/v1/records_pb.js";
