// What the client's parts share: request options, deadlines, write results, random ids.

import type { MessageInitShape } from "@bufbuild/protobuf";
import { type CallOptions, Code } from "@connectrpc/connect";
import type { ReadConsistency, WriteResponse } from "./gen/dossier/v1/kv_pb.js";
import type { ReferenceSchema } from "./gen/dossier/v1/records_pb.js";

/** Keys and values: bytes, or a string taken as its UTF-8 bytes. */
export type Bytes = Uint8Array | string;

/** Per call: a cancellation signal and a deadline of the whole request, retries included. */
export interface RequestOptions {
  signal?: AbortSignal;
  timeoutMs?: number;
  /**
   * A clinician's reason to open a record without a care relationship (break-the-glass,
   * docs/security.md): 8 to 512 bytes of text, sent with this request only, audited and listed
   * for review.
   */
  breakGlass?: string;
}

export interface ReadOptions extends RequestOptions {
  /** LINEARIZABLE (default) or STALE: any replica, possibly behind. */
  consistency?: ReadConsistency;
}

export interface WriteOptions extends RequestOptions {
  /** Who writes; becomes Meta.author. */
  author?: MessageInitShape<typeof ReferenceSchema>;
  /** The exactly-once key, 16 bytes not all zero; drawn once for the call when absent. */
  requestId?: Uint8Array;
}

/** The answer of a Kv write. */
export interface WriteResult {
  /** False when a condition did not hold (compare-and-set); nothing was applied then. */
  applied: boolean;
  /** The condition that failed, when not applied. */
  failedCondition: number;
  /** The log index it committed at (for a retried write, the first application's). */
  index: bigint;
}

/** The time left to a request, its caller's signal and the headers of its calls. */
export class Deadline {
  readonly expiresAt: number;
  constructor(
    timeoutMs: number,
    readonly signal?: AbortSignal,
    readonly headers?: Record<string, string>,
  ) {
    this.expiresAt = Date.now() + timeoutMs;
  }
  remaining(): number {
    return this.expiresAt - Date.now();
  }
  /** Why the request must stop: Canceled, DeadlineExceeded, or undefined while it may go on. */
  over(): Code | undefined {
    if (this.signal?.aborted) {
      return Code.Canceled;
    }
    return this.remaining() <= 0 ? Code.DeadlineExceeded : undefined;
  }
  /** Options of one call: at most `attemptMs`, within the deadline. */
  call(attemptMs: number): CallOptions {
    return {
      signal: this.signal,
      timeoutMs: Math.max(1, Math.min(attemptMs, this.remaining())),
      headers: this.headers,
    };
  }
}

const encoder = new TextEncoder();

export function bytes(b: Bytes): Uint8Array {
  return typeof b === "string" ? encoder.encode(b) : b;
}

export function writeResult(w: WriteResponse): WriteResult {
  return { applied: w.applied, failedCondition: w.failedCondition, index: w.index };
}

/** A random 64-bit number, not zero (an exactly-once session id). */
export function randomNonZero(): bigint {
  const b = new BigUint64Array(1);
  for (;;) {
    crypto.getRandomValues(b);
    if (b[0] !== 0n) {
      return b[0]!;
    }
  }
}

/** A records write's exactly-once key: 16 random bytes, not all zero. */
export function newRequestId(): Uint8Array {
  const id = new Uint8Array(16);
  do {
    crypto.getRandomValues(id);
  } while (id.every((b) => b === 0));
  return id;
}

export function sleep(ms: number, signal?: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal?.aborted) {
      resolve();
      return;
    }
    const done = () => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal?.addEventListener("abort", done);
  });
}
