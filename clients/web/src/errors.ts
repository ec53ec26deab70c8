// Errors: DossierError is a request's final failure, with the gRPC code and the server's
// ErrorDetail read from the standard error model (grpc-status-details-bin: a google.rpc.Status
// whose details hold the ErrorDetail packed as an Any, and BadRequest, RetryInfo or ResourceInfo
// where they fit).

import type { DescMessage, MessageShape } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { type ErrorDetail, ErrorDetailSchema, ErrorReason } from "./gen/dossier/v1/errors_pb.js";

export { Code, ErrorReason };

/**
 * A request's final failure: the server's refusal (detail set), or the client's own (no seed
 * answered, the deadline passed, no shard covers the patient). `message` is for people;
 * `rawMessage` is the server's (or client's) text alone.
 */
export class DossierError extends Error {
  override name = "DossierError";
  /** The gRPC code of the last answer (DeadlineExceeded or Canceled when the client gave up). */
  readonly code: Code;
  /** The server's machine-readable detail; undefined for the client's own errors and transport failures. */
  readonly detail: ErrorDetail | undefined;
  readonly rawMessage: string;
  /** Attempts made before giving up (0 for errors found before sending). */
  readonly attempts: number;

  constructor(code: Code, detail: ErrorDetail | undefined, message: string, attempts: number, cause?: unknown) {
    super(format(code, detail, message, attempts), { cause });
    this.code = code;
    this.detail = detail;
    this.rawMessage = message;
    this.attempts = attempts;
  }

  /** The ErrorReason of the detail (UNSPECIFIED without one). */
  get reason(): ErrorReason {
    return this.detail?.reason ?? ErrorReason.UNSPECIFIED;
  }

  /**
   * The details of a type in the server's last answer (e.g. google.rpc.BadRequestSchema): empty
   * for the client's own errors.
   */
  findDetails<Desc extends DescMessage>(schema: Desc): MessageShape<Desc>[] {
    return this.cause instanceof ConnectError ? this.cause.findDetails(schema) : [];
  }
}

function format(code: Code, detail: ErrorDetail | undefined, message: string, attempts: number): string {
  const reason = detail === undefined ? "client" : ErrorReason[detail.reason];
  const after = attempts > 1 ? ` after ${attempts} attempts` : "";
  return `dossier: ${Code[code]} (${reason})${after}: ${message}`;
}

/** The ErrorReason of any error (UNSPECIFIED for errors without a detail). */
export function reasonOf(err: unknown): ErrorReason {
  return detailOf(err)?.reason ?? ErrorReason.UNSPECIFIED;
}

/**
 * The ErrorDetail of an error: a DossierError's, or read from a ConnectError's details (the
 * google.rpc.Status of grpc-status-details-bin). Undefined when it carries none (a transport
 * failure).
 */
export function detailOf(err: unknown): ErrorDetail | undefined {
  if (err instanceof DossierError) {
    return err.detail;
  }
  if (err instanceof ConnectError) {
    return err.findDetails(ErrorDetailSchema).find((d) => d.reason !== ErrorReason.UNSPECIFIED);
  }
  return undefined;
}

/** The gRPC code of any error (Unknown for errors that are not gRPC statuses). */
export function codeOf(err: unknown): Code {
  if (err instanceof DossierError) {
    return err.code;
  }
  return ConnectError.from(err).code;
}

/** The server's own text of an error, without the code prefix. */
export function messageOf(err: unknown): string {
  if (err instanceof DossierError || err instanceof ConnectError) {
    return err.rawMessage;
  }
  return err instanceof Error ? err.message : String(err);
}

export function clientError(code: Code, message: string): DossierError {
  return new DossierError(code, undefined, message, 0);
}
