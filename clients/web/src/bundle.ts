// Bundle: independent Kv requests sent as one Kv.Bundle per node. Each item is routed, served and
// answered as if sent alone, nothing is atomic across them; the server streams the answers as
// the items complete, each naming its item's index. Writes carry their own exactly-once session.
// An item refused for routing (NOT_LEADER, STALE_EPOCH, ...) or overload is retried alone
// through the normal path, with the same session and number; its answer is the retry's.

import { create } from "@bufbuild/protobuf";
import { type CallOptions, type Client, Code } from "@connectrpc/connect";
import { ErrorReason, type ErrorDetail } from "./gen/dossier/v1/errors_pb.js";
import {
  type BundleAnswer as WireAnswer,
  BundleAnswerSchema,
  type BundleItem,
  BundleItemSchema,
  type Kv,
  ReadConsistency,
  type RouteHeader,
  RouteHeaderSchema,
  type SessionHeader,
  type WriteResponse,
} from "./gen/dossier/v1/kv_pb.js";
import type { DossierClient } from "./client.js";
import { bytes, type Bytes, type Deadline, type RequestOptions, type WriteResult, writeResult } from "./common.js";
import { clientError, codeOf, detailOf, DossierError, messageOf } from "./errors.js";

/** One item's answer: a read's `found` and `value`, a write's `write`, or `error`. */
export interface BundleAnswer {
  found: boolean;
  value?: Uint8Array;
  write?: WriteResult;
  error?: DossierError;
}

interface Item {
  patientId: string;
  /** The request for a route and, for writes, a session. */
  request: (route: RouteHeader, session: SessionHeader | undefined) => BundleItem;
  write: boolean;
}

interface Slot {
  index: number;
  shard: bigint;
  session: SessionHeader | undefined;
}

export class Bundle {
  private readonly items: Item[] = [];

  constructor(private readonly client: DossierClient) {}

  /** The number of items added. */
  get length(): number {
    return this.items.length;
  }

  /** Adds a linearizable read of a key. */
  get(patientId: string, key: Bytes): this {
    const k = bytes(key);
    this.items.push({
      patientId,
      write: false,
      request: (route) =>
        create(BundleItemSchema, {
          request: { case: "get", value: { route, key: k, consistency: ReadConsistency.LINEARIZABLE } },
        }),
    });
    return this;
  }

  /** Adds a write of a key. */
  put(patientId: string, key: Bytes, value: Bytes): this {
    const k = bytes(key);
    const v = bytes(value);
    this.items.push({
      patientId,
      write: true,
      request: (route, session) =>
        create(BundleItemSchema, { request: { case: "put", value: { route, session, key: k, value: v } } }),
    });
    return this;
  }

  /**
   * Sends the items, one Kv.Bundle per node (to each shard's last known leader), and returns
   * their answers in the order they were added. It throws for the bundle as a whole (no map);
   * each item's own failure is in its answer.
   */
  async send(options?: RequestOptions): Promise<BundleAnswer[]> {
    const deadline = this.client.deadline(options);
    const perNode = new Map<string, { slots: Slot[]; requests: BundleItem[] }>();
    this.items.forEach((item, index) => {
      const d = this.client.shardOf(item.patientId);
      let target = d.replicas[0];
      const leader = this.client.leaders.get(d.shardId);
      if (leader !== undefined && d.replicas.includes(leader)) {
        target = leader;
      }
      const address = target === undefined ? undefined : this.client.address(target);
      if (address === undefined) {
        throw clientError(Code.FailedPrecondition, `no node of shard ${d.shardId} is in the map`);
      }
      const route = create(RouteHeaderSchema, { shardId: d.shardId, epoch: d.epoch, patientId: item.patientId });
      const session = item.write ? this.client.takeSession(d.shardId) : undefined;
      let group = perNode.get(address);
      if (group === undefined) {
        group = { slots: [], requests: [] };
        perNode.set(address, group);
      }
      group.slots.push({ index, shard: d.shardId, session });
      group.requests.push(item.request(route, session));
    });
    const answers = new Array<BundleAnswer>(this.items.length);
    await Promise.all(
      [...perNode].map(async ([address, { slots, requests }]) => {
        const got = await sendBundle(
          this.client.node(address).kv,
          requests,
          deadline.call(this.client.config.attemptTimeoutMs),
        );
        await Promise.all(
          slots.map(async (slot, k) => {
            answers[slot.index] = await this.finish(deadline, slot, got[k]!);
          }),
        );
      }),
    );
    return answers;
  }

  /** One item's answer: retried alone (same session) when the server says to retry, else final. */
  private async finish(deadline: Deadline, slot: Slot, a: WireAnswer): Promise<BundleAnswer> {
    const item = this.items[slot.index]!;
    const failure = a.answer.case === "error" ? a.answer.value : undefined;
    if (failure !== undefined && retryable(failure.detail)) {
      try {
        const again = await this.client.routedWithin(deadline, item.patientId, (n, route, o) =>
          sendAlone(n.kv, item.request(route, slot.session), o),
        );
        if (slot.session !== undefined) {
          this.client.settleSession(slot.shard, slot.session, undefined);
        }
        return again;
      } catch (err) {
        if (slot.session !== undefined) {
          this.client.settleSession(slot.shard, slot.session, err);
        }
        return { found: false, error: err instanceof DossierError ? err : new DossierError(codeOf(err), detailOf(err), messageOf(err), 1, err) };
      }
    }
    const error =
      failure === undefined ? undefined : new DossierError(failure.code as Code, failure.detail, failure.message, 1);
    if (slot.session !== undefined) {
      this.client.settleSession(slot.shard, slot.session, error);
    }
    return error === undefined ? answerOf(a) : { found: false, error };
  }
}

/** Sends one bundle to one node; an item left unanswered (the stream broke) gets the stream's error. */
async function sendBundle(kv: Client<typeof Kv>, items: BundleItem[], options: CallOptions): Promise<WireAnswer[]> {
  const got = new Array<WireAnswer | undefined>(items.length);
  let err: unknown = undefined;
  try {
    for await (const message of kv.bundle({ items }, options)) {
      for (const a of message.answers) {
        if (a.item < got.length) {
          got[a.item] = a;
        }
      }
    }
  } catch (e) {
    err = e;
  }
  const code = err === undefined ? Code.Internal : codeOf(err);
  const message = err === undefined ? "the bundle ended without answering this item" : messageOf(err);
  const detail = detailOf(err);
  return Array.from(got, (a) =>
    a ?? create(BundleAnswerSchema, { answer: { case: "error", value: { code, message, detail } } }),
  );
}

/** An item sent as the unary call it stands for, its answer as a bundle answer. */
async function sendAlone(kv: Client<typeof Kv>, item: BundleItem, options: CallOptions): Promise<BundleAnswer> {
  const r = item.request;
  let w: WriteResponse;
  switch (r.case) {
    case "get": {
      const g = await kv.get(r.value, options);
      return g.found ? { found: true, value: g.value } : { found: false };
    }
    case "put":
      w = await kv.put(r.value, options);
      break;
    case "delete":
      w = await kv.delete(r.value, options);
      break;
    case "compareAndSet":
      w = await kv.compareAndSet(r.value, options);
      break;
    case "batch":
      w = await kv.batch(r.value, options);
      break;
    default:
      throw clientError(Code.InvalidArgument, "an empty bundle item");
  }
  return { found: false, write: writeResult(w) };
}

function answerOf(a: WireAnswer): BundleAnswer {
  switch (a.answer.case) {
    case "write":
      return { found: false, write: writeResult(a.answer.value) };
    case "get":
      return a.answer.value.found ? { found: true, value: a.answer.value.value } : { found: false };
    default:
      return { found: false };
  }
}

/** The reasons the normal path retries (a missing detail is a transport failure). */
function retryable(d: ErrorDetail | undefined): boolean {
  switch (d?.reason) {
    case ErrorReason.INVALID_ARGUMENT:
    case ErrorReason.SESSION:
    case ErrorReason.CLUSTER_STATE:
    case ErrorReason.INTERNAL:
      return false;
    default:
      return true;
  }
}
