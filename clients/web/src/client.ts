// DossierClient: the cluster map, routing by patient hash, retries within a deadline,
// exactly-once Kv sessions and records request ids, over gRPC-Web (browsers and Node), equal in
// behaviour to the Go and Rust clients:
//
//   - the map is fetched from any seed and cached; a request goes to the shard whose hash range
//     holds the patient's hash, at its last known leader, else to its replicas in rotation;
//   - retries until the deadline (10 s by default, 2 s per attempt, backoff 10 ms doubling to
//     100 ms): leader hints are followed, the map is refreshed on STALE_EPOCH and
//     SHARD_NOT_FOUND, unreachable or unavailable replicas are rotated, overload is backed off;
//     INVALID_ARGUMENT, SESSION, CLUSTER_STATE and INTERNAL are final;
//   - every Kv write carries a session of its shard and a sequence number, the same on every
//     retry, so that a retried write is applied once; records writes carry a request id drawn
//     once per call.

import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { type CallOptions, type Client, Code, createClient, type Transport } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { Admin, type ClusterMap, type ShardDescriptor } from "./gen/dossier/v1/admin_pb.js";
import { ErrorReason } from "./gen/dossier/v1/errors_pb.js";
import {
  Kv,
  ReadConsistency,
  type RouteHeader,
  RouteHeaderSchema,
  type SessionHeader,
  SessionHeaderSchema,
  type WriteResponse,
} from "./gen/dossier/v1/kv_pb.js";
import {
  type EverythingResponse,
  type RecordWriteResponse,
  Records,
  type Resource,
  type ResourceSchema,
  type ResourceType,
  WriteHeaderSchema,
  WriteOutcome,
} from "./gen/dossier/v1/records_pb.js";
import { Bundle } from "./bundle.js";
import {
  bytes,
  type Bytes,
  Deadline,
  newRequestId,
  randomNonZero,
  type ReadOptions,
  type RequestOptions,
  sleep,
  type WriteOptions,
  type WriteResult,
  writeResult,
} from "./common.js";
import { clientError, codeOf, detailOf, DossierError, messageOf, reasonOf } from "./errors.js";
import { initPatientHash, patientHashSync } from "./hash.js";

export interface DossierConfig {
  /** A few nodes, `host:port` (or a base URL); any one that answers gives the map. */
  seeds: string[];
  /** Scheme of the base URL made of a node's `host:port`: "http" by default. */
  scheme?: "http" | "https";
  /** The base URL of a node address (default: `${scheme}://${address}`), e.g. behind a proxy. */
  baseUrl?: (address: string) => string;
  /** The transport to a base URL (default: gRPC-Web, binary), e.g. to add interceptors. */
  transport?: (baseUrl: string) => Transport;
  /** Deadline of one call to one node (2000 ms). */
  attemptTimeoutMs?: number;
  /** Deadline of a whole request, retries included, when the call gives none (10000 ms). */
  deadlineMs?: number;
  /** First and largest pause between retries, doubling (10 and 100 ms). */
  backoffMinMs?: number;
  backoffMaxMs?: number;
  /**
   * The caller's bearer token (a clinician's or a patient's, from the identity provider or the
   * portal), sent as `authorization: Bearer <token>` with every call; a function is asked
   * before each request, so that a refreshed token is used at once. Without it, calls carry no
   * identity (or the transport's client certificate).
   */
  token?: string | (() => string);
}

/** The generated clients of one node, over its transport. */
export interface Node {
  address: string;
  transport: Transport;
  kv: Client<typeof Kv>;
  records: Client<typeof Records>;
  admin: Client<typeof Admin>;
}

/** One try of a routed request: the node to call, the route to send and the call options. */
export type Attempt<T> = (node: Node, route: RouteHeader, options: CallOptions) => Promise<T>;

interface Session {
  id: bigint;
  lastUsed: bigint;
}

/** True when a records write was applied (now, or by an earlier attempt: then `replayed`). */
export function applied(w: RecordWriteResponse): boolean {
  return w.outcome === WriteOutcome.APPLIED;
}

/** A resource to write: a message, or the object create(ResourceSchema, ...) takes. */
export type ResourceInit = MessageInitShape<typeof ResourceSchema>;

/** A connection to a Dossier cluster; share one per application. */
export class DossierClient {
  readonly config: Required<Omit<DossierConfig, "baseUrl" | "transport" | "token">> &
    Pick<DossierConfig, "baseUrl" | "transport" | "token">;
  private map: ClusterMap | undefined;
  private readonly nodes = new Map<string, Node>();
  /** The leader each shard last answered from (or was hinted). */
  readonly leaders = new Map<bigint, bigint>();
  /** Idle exactly-once sessions per shard (the server keeps a session table per shard). */
  private readonly sessions = new Map<bigint, Session[]>();

  private constructor(config: DossierConfig) {
    // The Rust and Go clients' defaults; a missing or non-positive value takes its default.
    const positive = (v: number | undefined, otherwise: number) =>
      v !== undefined && Number.isFinite(v) && v > 0 ? v : otherwise;
    const backoffMinMs = positive(config.backoffMinMs, 10);
    this.config = {
      seeds: [...config.seeds],
      scheme: config.scheme ?? "http",
      baseUrl: config.baseUrl,
      transport: config.transport,
      token: config.token,
      attemptTimeoutMs: positive(config.attemptTimeoutMs, 2000),
      deadlineMs: positive(config.deadlineMs, 10000),
      backoffMinMs,
      backoffMaxMs: Math.max(positive(config.backoffMaxMs, 100), backoffMinMs),
    };
  }

  /** Fetches the cluster map through the seeds. */
  static async connect(config: DossierConfig | string[], options?: RequestOptions): Promise<DossierClient> {
    const c = new DossierClient(Array.isArray(config) ? { seeds: config } : config);
    if (c.config.seeds.length === 0) {
      throw clientError(Code.InvalidArgument, "no seed address given");
    }
    await initPatientHash();
    await c.refreshMap(options);
    return c;
  }

  /** The cached cluster map (do not modify it). */
  get clusterMap(): ClusterMap {
    if (this.map === undefined) {
      throw clientError(Code.FailedPrecondition, "no cluster map");
    }
    return this.map;
  }

  /** The generated clients of a node address, over a transport made on first use. */
  node(address: string): Node {
    let node = this.nodes.get(address);
    if (node === undefined) {
      const baseUrl = this.config.baseUrl?.(address) ??
        (address.includes("://") ? address : `${this.config.scheme}://${address}`);
      const transport = this.config.transport?.(baseUrl) ?? createGrpcWebTransport({ baseUrl });
      node = {
        address,
        transport,
        kv: createClient(Kv, transport),
        records: createClient(Records, transport),
        admin: createClient(Admin, transport),
      };
      this.nodes.set(address, node);
    }
    return node;
  }

  /** Fetches the map from any node that answers: the seeds first, then the cached map's nodes. */
  async refreshMap(options?: RequestOptions): Promise<ClusterMap> {
    return this.refreshWithin(this.deadline(options));
  }

  private async refreshWithin(deadline: Deadline): Promise<ClusterMap> {
    const candidates = [...this.config.seeds, ...(this.map?.nodes.map((n) => n.address) ?? [])];
    let last = "no candidates";
    for (const address of candidates) {
      if (deadline.over() !== undefined) {
        break;
      }
      try {
        const m = await this.node(address).admin.getClusterMap({}, deadline.call(this.config.attemptTimeoutMs));
        if (m.shards.length === 0) {
          last = `${address}: the map has no shards`;
          continue;
        }
        if (this.map !== undefined && m.version < this.map.version) {
          // A node that fell behind (or left the cluster): the map never goes back.
          last = `${address}: map version ${m.version} is older than ${this.map.version}`;
          continue;
        }
        this.map = m;
        return m;
      } catch (err) {
        last = `${address}: ${err instanceof Error ? err.message : String(err)}`;
      }
    }
    throw clientError(Code.Unavailable, `no node gave the cluster map: ${last}`);
  }

  /** The descriptor of the shard holding the patient (or index key), by the cached map. */
  shardOf(patientId: string): ShardDescriptor {
    const h = patientHashSync(patientId);
    for (const d of this.clusterMap.shards) {
      if (h >= d.hashLo && (d.hashHiMax || h < d.hashHi)) {
        return d;
      }
    }
    throw clientError(Code.FailedPrecondition, `no shard covers patient "${patientId}" (hash ${h})`);
  }

  /** The address of a node id in the cached map. */
  address(nodeId: bigint): string | undefined {
    return this.map?.nodes.find((n) => n.nodeId === nodeId)?.address;
  }

  deadline(options?: RequestOptions): Deadline {
    return new Deadline(options?.timeoutMs ?? this.config.deadlineMs, options?.signal, this.headers(options));
  }

  /** The credentials of a request's calls: the token, and the request's break-the-glass reason. */
  private headers(options?: RequestOptions): Record<string, string> | undefined {
    const headers: Record<string, string> = {};
    const token = typeof this.config.token === "function" ? this.config.token() : this.config.token;
    if (token !== undefined) {
      if (!/^[\x21-\x7e]+$/.test(token)) {
        throw clientError(Code.InvalidArgument, "token: must be one word of printable ASCII characters");
      }
      headers["authorization"] = `Bearer ${token}`;
    }
    const reason = options?.breakGlass?.trim();
    if (reason !== undefined) {
      if (reason.length < 8 || reason.length > 512 || !/^[\x20-\x7e]+$/.test(reason)) {
        throw clientError(Code.InvalidArgument, "breakGlass: a reason of 8 to 512 printable ASCII characters");
      }
      headers["x-dossier-break-glass"] = reason;
    }
    return Object.keys(headers).length === 0 ? undefined : headers;
  }

  /**
   * Runs `call` against the patient's shard until it succeeds, fails for good, or the deadline
   * passes; for the requests this class has no method for (Search, History, ...).
   */
  async routed<T>(patientId: string, call: Attempt<T>, options?: RequestOptions): Promise<T> {
    return this.routedWithin(this.deadline(options), patientId, call);
  }

  async routedWithin<T>(deadline: Deadline, patientId: string, call: Attempt<T>): Promise<T> {
    let backoff = this.config.backoffMinMs;
    let rotate = 0;
    let last: unknown;
    for (let attempts = 1; ; attempts++) {
      const over = deadline.over();
      if (over !== undefined) {
        throw giveUp(over, attempts - 1, last);
      }
      const d = this.shardOf(patientId);
      if (d.replicas.length === 0) {
        throw clientError(Code.FailedPrecondition, `shard ${d.shardId} has no replicas in the map`);
      }
      let target = d.replicas[rotate % d.replicas.length]!;
      const leader = this.leaders.get(d.shardId);
      if (leader !== undefined && rotate === 0 && d.replicas.includes(leader)) {
        target = leader;
      }
      const address = this.address(target);
      if (address === undefined) {
        throw clientError(Code.FailedPrecondition, `node ${target} of shard ${d.shardId} is not in the map`);
      }
      const route = create(RouteHeaderSchema, { shardId: d.shardId, epoch: d.epoch, patientId });
      try {
        const answer = await call(this.node(address), route, deadline.call(this.config.attemptTimeoutMs));
        this.leaders.set(d.shardId, target);
        return answer;
      } catch (err) {
        const next = await this.classify(deadline, d, err, rotate);
        if (next === undefined) {
          throw new DossierError(codeOf(err), detailOf(err), messageOf(err), attempts, err);
        }
        rotate = next;
        last = err;
      }
      await sleep(Math.min(backoff, Math.max(0, deadline.remaining())), deadline.signal);
      backoff = Math.min(backoff * 2, this.config.backoffMaxMs);
    }
  }

  /** What one failed attempt means: the next rotation to retry with, or undefined (final). */
  private async classify(deadline: Deadline, d: ShardDescriptor, err: unknown, rotate: number): Promise<number | undefined> {
    const detail = detailOf(err);
    if (detail === undefined) {
      // No detail: the transport failed (node down, connection refused, attempt timeout).
      if (codeOf(err) === Code.Canceled && deadline.over() === undefined) {
        return undefined;
      }
      return rotate + 1;
    }
    switch (detail.reason) {
      case ErrorReason.NOT_LEADER:
        if (detail.leaderHintNodeId !== 0n) {
          this.leaders.set(d.shardId, detail.leaderHintNodeId);
          return 0;
        }
        this.leaders.delete(d.shardId);
        return rotate + 1;
      case ErrorReason.STALE_EPOCH:
      case ErrorReason.SHARD_NOT_FOUND:
        // The map moved: fetch it again (a failed refresh is retried on the next attempt).
        await this.refreshWithin(deadline).catch(() => undefined);
        return rotate + 1;
      case ErrorReason.RESOURCE_EXHAUSTED:
      case ErrorReason.DEADLINE:
        return rotate;
      case ErrorReason.UNAVAILABLE:
      case ErrorReason.UNSPECIFIED:
        return rotate + 1;
      default:
        // INVALID_ARGUMENT, SESSION, CLUSTER_STATE, INTERNAL, UNAUTHENTICATED, PERMISSION_DENIED:
        // the answer is final.
        return undefined;
    }
  }

  // ----- Kv -----------------------------------------------------------------------------------

  /** Reads a key of a patient (linearizably by default); undefined when the key is absent. */
  async get(patientId: string, key: Bytes, options?: ReadOptions): Promise<Uint8Array | undefined> {
    const consistency = options?.consistency ?? ReadConsistency.LINEARIZABLE;
    const answer = await this.routed(
      patientId,
      (n, route, o) => n.kv.get({ route, key: bytes(key), consistency }, o),
      options,
    );
    return answer.found ? answer.value : undefined;
  }

  /** Sets a key of a patient. */
  put(patientId: string, key: Bytes, value: Bytes, options?: RequestOptions): Promise<WriteResult> {
    return this.write(
      patientId,
      (kv, route, session, o) => kv.put({ route, session, key: bytes(key), value: bytes(value) }, o),
      options,
    );
  }

  /** Removes a key of a patient. */
  delete(patientId: string, key: Bytes, options?: RequestOptions): Promise<WriteResult> {
    return this.write(patientId, (kv, route, session, o) => kv.delete({ route, session, key: bytes(key) }, o), options);
  }

  /** Puts `value` only if the key holds `expected` (undefined: only if the key is absent). */
  compareAndSet(
    patientId: string,
    key: Bytes,
    expected: Bytes | undefined,
    value: Bytes,
    options?: RequestOptions,
  ): Promise<WriteResult> {
    return this.write(
      patientId,
      (kv, route, session, o) =>
        kv.compareAndSet(
          {
            route,
            session,
            key: bytes(key),
            expected: expected === undefined ? new Uint8Array() : bytes(expected),
            expectAbsent: expected === undefined,
            value: bytes(value),
          },
          o,
        ),
      options,
    );
  }

  /** A bundle of independent Kv requests, sent as one Kv.Bundle per node. */
  bundle(): Bundle {
    return new Bundle(this);
  }

  /**
   * Runs a Kv write under an exactly-once session of the patient's shard: every retry carries
   * the same session and sequence number, so the write is applied at most once.
   */
  private async write(
    patientId: string,
    send: (kv: Client<typeof Kv>, route: RouteHeader, session: SessionHeader, options: CallOptions) => Promise<WriteResponse>,
    options?: RequestOptions,
  ): Promise<WriteResult> {
    const shard = this.shardOf(patientId).shardId;
    const session = this.takeSession(shard);
    try {
      const answer = await this.routed(patientId, (n, route, o) => send(n.kv, route, session, o), options);
      this.settleSession(shard, session, undefined);
      return writeResult(answer);
    } catch (err) {
      this.settleSession(shard, session, err);
      throw err;
    }
  }

  /** An idle session of the shard with its next number, or a new one (one write in flight each). */
  takeSession(shard: bigint): SessionHeader {
    const s = this.sessions.get(shard)?.pop();
    if (s !== undefined) {
      return create(SessionHeaderSchema, { clientSession: s.id, sequence: s.lastUsed + 1n });
    }
    return create(SessionHeaderSchema, { clientSession: randomNonZero(), sequence: 1n });
  }

  /** Returns a write's session to the idle pool once the write is over. */
  settleSession(shard: bigint, s: SessionHeader, err: unknown): void {
    let lastUsed = s.sequence;
    switch (reasonOf(err)) {
      case ErrorReason.SESSION:
        // The server's table is ahead of this session (or forgot it): drop the session.
        return;
      case ErrorReason.INVALID_ARGUMENT:
        // Refused before it was proposed, on every attempt: the number was never used.
        lastUsed = s.sequence - 1n;
        break;
    }
    let idle = this.sessions.get(shard);
    if (idle === undefined) {
      idle = [];
      this.sessions.set(shard, idle);
    }
    idle.push({ id: s.clientSession, lastUsed });
  }

  // ----- Records ------------------------------------------------------------------------------

  /** Creates a patient (meta.id and meta.patient_id are the patient id). */
  createPatient(patient: ResourceInit, options?: WriteOptions): Promise<RecordWriteResponse> {
    return this.recordsWrite(
      patient.meta?.id ?? "",
      (r, route, header, o) => r.createPatient({ route, header, resource: patient }, o),
      options,
    );
  }

  /** Creates a record of the patient named by meta.patient_id. */
  createRecord(resource: ResourceInit, options?: WriteOptions): Promise<RecordWriteResponse> {
    return this.recordsWrite(
      resource.meta?.patientId ?? "",
      (r, route, header, o) => r.create({ route, header, resource }, o),
      options,
    );
  }

  /**
   * Writes a new version of a record if its current version is `expectedVersion` (outcome
   * VERSION_CONFLICT with current_version otherwise). Server-set meta fields must be unset.
   */
  updateRecord(resource: ResourceInit, expectedVersion: bigint, options?: WriteOptions): Promise<RecordWriteResponse> {
    return this.recordsWrite(
      resource.meta?.patientId ?? "",
      (r, route, header, o) => r.update({ route, header, expectedVersion, resource }, o),
      options,
    );
  }

  /** The current version of a record, linearizably by default; undefined when there is none. */
  async readRecord(
    patientId: string,
    type: ResourceType,
    id: string,
    options?: ReadOptions,
  ): Promise<Resource | undefined> {
    const consistency = options?.consistency ?? ReadConsistency.LINEARIZABLE;
    const answer = await this.routed(
      patientId,
      (n, route, o) => n.records.read({ route, type, id, consistency }, o),
      options,
    );
    return answer.found ? answer.resource : undefined;
  }

  /**
   * Streams every current record of a patient changed after `sinceMicros` (0n: all), message by
   * message, to `each`; returns the as-of stamp to pass as `sinceMicros` next time. The stream is
   * opened through the router (hints, map refreshes) and runs under the request's deadline; a
   * stream that breaks after its first message is an error the caller resumes with since = the
   * last record's last_updated_micros.
   */
  async everything(
    patientId: string,
    sinceMicros: bigint,
    each: (resources: Resource[]) => void | Promise<void>,
    options?: ReadOptions,
  ): Promise<bigint> {
    const deadline = this.deadline(options);
    const consistency = options?.consistency ?? ReadConsistency.LINEARIZABLE;
    // Ends the open stream when the caller stops early (or its signal fires).
    const stop = new AbortController();
    const cancel = () => stop.abort(options?.signal?.reason);
    options?.signal?.addEventListener("abort", cancel);
    try {
      const stream = await this.routedWithin(deadline, patientId, async (n, route) => {
        const s = n.records
          .everything(
            { route, sinceMicros, consistency },
            { signal: stop.signal, timeoutMs: Math.max(1, deadline.remaining()), headers: deadline.headers },
          )
          [Symbol.asyncIterator]();
        const first = await s.next();
        return { s, first };
      });
      let asOf = sinceMicros;
      let next: IteratorResult<EverythingResponse> = stream.first;
      while (next.done !== true) {
        const message = next.value;
        asOf = message.asOfMicros;
        await each(message.resources);
        try {
          next = await stream.s.next();
        } catch (err) {
          throw new DossierError(codeOf(err), detailOf(err), `the Everything stream broke: ${messageOf(err)}`, 1, err);
        }
      }
      return asOf;
    } finally {
      options?.signal?.removeEventListener("abort", cancel);
      stop.abort();
    }
  }

  /** Runs a records write with one request id for every attempt. */
  private recordsWrite(
    patientId: string,
    send: (
      records: Client<typeof Records>,
      route: RouteHeader,
      header: ReturnType<typeof writeHeader>,
      options: CallOptions,
    ) => Promise<RecordWriteResponse>,
    options?: WriteOptions,
  ): Promise<RecordWriteResponse> {
    const header = writeHeader(options?.requestId ?? newRequestId(), options?.author);
    return this.routed(patientId, (n, route, o) => send(n.records, route, header, o), options);
  }
}

function writeHeader(requestId: Uint8Array, author: WriteOptions["author"]) {
  return create(WriteHeaderSchema, { requestId, author });
}

function giveUp(code: Code, attempts: number, last: unknown): DossierError {
  const message =
    last === undefined
      ? "the deadline passed before the first attempt"
      : `the deadline passed; last attempt: ${last instanceof Error ? last.message : String(last)}`;
  return new DossierError(code, detailOf(last), message, attempts, last);
}
