// The conformance scenario, as clients/go/dossier/conformance_test.go runs it, through gRPC-Web
// against a real 3-node cluster of 8 shards: the cluster map, put/get, compare-and-set, errors
// with their details, a patient created, read and updated with a version conflict, Everything
// streamed, a bundle, the CORS policy a browser relies on, and writes that go on across a shard
// leader's SIGKILL.

import assert from "node:assert/strict";
import { after, before, describe, it, type TestContext } from "node:test";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  AdministrativeGender,
  applied,
  DatePrecision,
  DossierClient,
  DossierError,
  ErrorDetailSchema,
  ErrorReason,
  MetaSchema,
  newRequestId,
  ObservationStatus,
  type Resource,
  ResourceSchema,
  ResourceType,
  WriteOutcome,
} from "../src/index.js";
import { BadRequestSchema } from "../src/gen/google/rpc/error_details_pb.js";
import { PORTAL_ORIGIN, sleep, TestCluster } from "./cluster.js";

const text = (b: Uint8Array | undefined) => (b === undefined ? undefined : new TextDecoder().decode(b));

/** The error a call fails with (it must fail). */
async function failure(call: Promise<unknown>): Promise<unknown> {
  try {
    await call;
  } catch (err) {
    return err;
  }
  assert.fail("the call should have failed");
}

function observation(patient: string, id: string, heightCm: string): Resource {
  return create(ResourceSchema, {
    meta: { id, patientId: patient },
    kind: {
      case: "observation",
      value: {
        status: ObservationStatus.FINAL,
        code: { codings: [{ system: "http://loinc.org", code: "8302-2", display: "Body height" }] },
        effective: {
          case: "effectiveTime",
          value: { unixMicros: BigInt(Date.UTC(2026, 10, 30, 9, 0, 0)) * 1000n, precision: DatePrecision.TIME },
        },
        value: {
          kind: {
            case: "quantity",
            value: { value: heightCm, unit: "cm", system: "http://unitsofmeasure.org", code: "cm" },
          },
        },
      },
    },
  });
}

describe("conformance over gRPC-Web", { timeout: 300_000 }, () => {
  let cluster: TestCluster | undefined;
  let client: DossierClient;
  let failed = false;

  /** A step of the scenario; a failure keeps the node logs for the end. */
  function step(name: string, fn: (t: TestContext) => Promise<void>, timeout = 60_000) {
    it(name, { timeout }, async (t) => {
      try {
        await fn(t);
      } catch (err) {
        failed = true;
        throw err;
      }
    });
  }

  before(
    async () => {
      cluster = await TestCluster.start(3, 8);
      try {
        client = await DossierClient.connect({ seeds: cluster.seeds() });
      } catch (err) {
        failed = true;
        throw err;
      }
    },
    { timeout: 120_000 },
  );

  after(
    async () => {
      if (cluster === undefined) {
        return;
      }
      await cluster.stop();
      if (failed) {
        cluster.dumpLogs();
      }
      cluster.remove();
    },
    { timeout: 90_000 },
  );

  step("cluster map", async () => {
    const m = client.clusterMap;
    assert.equal(m.nodes.length, 3);
    assert.equal(m.shards.length, 8);
    // The shards cover the hash space without gap or overlap, 3 replicas each.
    let next = 0n;
    m.shards.forEach((d, i) => {
      assert.equal(d.hashLo, next, `shard ${d.shardId} starts at ${d.hashLo}, want ${next}`);
      assert.equal(d.replicas.length, 3, `shard ${d.shardId} replicas`);
      if (i === m.shards.length - 1) {
        assert.ok(d.hashHiMax, "the last shard must run to the end of the space");
      } else {
        assert.ok(!d.hashHiMax && d.hashHi > d.hashLo, `shard ${d.shardId} range`);
      }
      next = d.hashHi;
    });
  });

  step("put and get", async () => {
    const w = await client.put("web-p1", "allergies", "penicillin");
    assert.ok(w.applied && w.index > 0n, `put: ${JSON.stringify(w, (_, v) => (typeof v === "bigint" ? `${v}` : v))}`);
    assert.equal(text(await client.get("web-p1", "allergies")), "penicillin");
    assert.equal(await client.get("web-p1", "absent"), undefined);
  });

  step("compare and set", async () => {
    let w = await client.compareAndSet("web-p2", "bed", undefined, "A12");
    assert.ok(w.applied, "cas from absent");
    w = await client.compareAndSet("web-p2", "bed", "B7", "C3");
    assert.ok(!w.applied, "cas with a wrong expected value must not apply");
    assert.equal(w.failedCondition, 0);
    w = await client.compareAndSet("web-p2", "bed", "A12", "C3");
    assert.ok(w.applied, "cas with the right expected value");
    assert.equal(text(await client.get("web-p2", "bed")), "C3");
  });

  step("errors carry the standard model", async () => {
    // Through the client: an invalid patient id is final, with its field.
    const e = await failure(client.put("bad id", "k", "v"));
    assert.ok(e instanceof DossierError, `want a DossierError, got ${String(e)}`);
    assert.equal(e.code, Code.InvalidArgument, e.message);
    assert.equal(e.reason, ErrorReason.INVALID_ARGUMENT, e.message);
    assert.equal(e.detail?.field, "route.patient_id");
    assert.equal(e.attempts, 1);
    assert.equal(e.findDetails(BadRequestSchema)[0]?.fieldViolations[0]?.field, "route.patient_id");

    // Raw gRPC-Web: connect's findDetails reads the ErrorDetail and the BadRequest.
    const node = client.node(cluster!.nodes[0]!.grpc);
    let raw = await failure(node.kv.put({ route: { patientId: "bad id" }, key: new Uint8Array([107]) }));
    assert.ok(raw instanceof ConnectError, String(raw));
    assert.equal(raw.code, Code.InvalidArgument);
    assert.equal(raw.findDetails(ErrorDetailSchema)[0]?.reason, ErrorReason.INVALID_ARGUMENT);
    const badRequest = raw.findDetails(BadRequestSchema);
    assert.equal(badRequest.length, 1, "one google.rpc.BadRequest");
    assert.deepEqual(
      badRequest[0]!.fieldViolations.map((v) => v.field),
      ["route.patient_id"],
    );

    const d = client.shardOf("web-p1");
    const key = new Uint8Array([107]);
    // An epoch newer than the node's map: the node is behind, UNAVAILABLE (retry).
    raw = await failure(node.kv.get({ route: { shardId: d.shardId, epoch: d.epoch + 7n, patientId: "web-p1" }, key }));
    assert.ok(raw instanceof ConnectError, String(raw));
    assert.equal(raw.code, Code.Unavailable, raw.message);
    assert.equal(raw.findDetails(ErrorDetailSchema)[0]?.reason, ErrorReason.UNAVAILABLE);

    // Another shard than the patient's: FAILED_PRECONDITION, STALE_EPOCH and the descriptor to use.
    const other = (d.shardId % 8n) + 1n;
    raw = await failure(node.kv.get({ route: { shardId: other, epoch: 1n, patientId: "web-p1" }, key }));
    assert.ok(raw instanceof ConnectError, String(raw));
    assert.equal(raw.code, Code.FailedPrecondition, raw.message);
    let detail = raw.findDetails(ErrorDetailSchema)[0];
    assert.equal(detail?.reason, ErrorReason.STALE_EPOCH);
    assert.equal(detail?.shard?.shardId, d.shardId);

    // An unknown shard: NOT_FOUND, SHARD_NOT_FOUND, and still the descriptor to route with.
    raw = await failure(node.kv.get({ route: { shardId: 999n, epoch: 1n, patientId: "web-p1" }, key }));
    assert.ok(raw instanceof ConnectError, String(raw));
    assert.equal(raw.code, Code.NotFound, raw.message);
    detail = raw.findDetails(ErrorDetailSchema)[0];
    assert.equal(detail?.reason, ErrorReason.SHARD_NOT_FOUND);
    assert.equal(detail?.shard?.shardId, d.shardId);
  });

  step("patient create, read, update with a version conflict", async () => {
    const id = "web-patient-1";
    const patient = create(ResourceSchema, {
      meta: { id, patientId: id },
      kind: {
        case: "patient",
        value: {
          names: [{ family: "Peeters", given: ["An"] }],
          gender: AdministrativeGender.FEMALE,
          birthDate: { year: 1985, month: 7, day: 30 },
        },
      },
    });
    const author = { display: "Dr. Web" };
    let w = await client.createPatient(patient, { author });
    assert.ok(applied(w), `create patient: ${WriteOutcome[w.outcome]}`);
    assert.equal(w.written[0]?.version, 1n);
    const again = await client.createPatient(patient, { author });
    assert.equal(again.outcome, WriteOutcome.ALREADY_EXISTS, "a second create is ALREADY_EXISTS");

    const read = await client.readRecord(id, ResourceType.PATIENT, id);
    assert.ok(read !== undefined && read.kind.case === "patient", "read the patient");
    assert.equal(read.kind.value.names[0]?.family, "Peeters");
    assert.equal(read.meta?.version, 1n);

    // The version to expect travels beside the resource; meta's server-set fields stay unset.
    read.kind.value.names[0]!.family = "Peeters-Janssens";
    read.meta = create(MetaSchema, { id, patientId: id });
    w = await client.updateRecord(read, 1n, { author });
    assert.ok(applied(w), `update at version 1: ${WriteOutcome[w.outcome]}`);
    assert.equal(w.written[0]?.version, 2n);
    w = await client.updateRecord(read, 1n, { author });
    assert.equal(w.outcome, WriteOutcome.VERSION_CONFLICT, "a second update at version 1 conflicts");
    assert.equal(w.currentVersion, 2n);

    // A retried write (same request id) is answered as the first was, and applied once.
    const requestId = newRequestId();
    const obs = observation(id, "web-obs-1", "180");
    const first = await client.createRecord(obs, { author, requestId });
    assert.ok(applied(first) && !first.replayed, `create observation: ${WriteOutcome[first.outcome]}`);
    const retried = await client.createRecord(obs, { author, requestId });
    assert.ok(applied(retried), `the retry is APPLIED: ${WriteOutcome[retried.outcome]}`);
    assert.ok(retried.replayed, "the retry is replayed");
    assert.deepEqual(retried.written.map((v) => v.version), first.written.map((v) => v.version));
  });

  step("everything streamed", async () => {
    const id = "web-patient-1";
    const kinds: string[] = [];
    const asOf = await client.everything(id, 0n, (resources) => {
      for (const r of resources) {
        kinds.push(r.kind.case ?? "none");
      }
    });
    assert.deepEqual([...kinds].sort(), ["observation", "patient"]);
    assert.ok(asOf > 0n, "an as-of stamp");
    // Nothing changed since: an incremental sync gets nothing.
    let n = 0;
    const again = await client.everything(id, asOf, (resources) => {
      n += resources.length;
    });
    assert.equal(n, 0, `records changed since ${asOf}`);
    assert.ok(again >= asOf);
  });

  step("bundle", async () => {
    let b = client.bundle();
    for (let i = 0; i < 6; i++) {
      b.put(`web-b${i}`, "k", `v${i}`);
    }
    let answers = await b.send();
    assert.equal(answers.length, 6);
    answers.forEach((a, i) => {
      assert.equal(a.error, undefined, `item ${i}: ${a.error?.message}`);
      assert.ok(a.write?.applied, `item ${i} applied`);
    });
    b = client.bundle();
    for (let i = 0; i < 6; i++) {
      b.get(`web-b${i}`, "k");
    }
    answers = await b.send();
    answers.forEach((a, i) => {
      assert.equal(a.error, undefined, `item ${i}: ${a.error?.message}`);
      assert.ok(a.found, `item ${i} found`);
      assert.equal(text(a.value), `v${i}`);
    });
  });

  step("CORS lets the portal's origin in, and only it", async () => {
    const url = `http://${cluster!.nodes[0]!.grpc}/dossier.v1.Admin/GetClusterMap`;
    const preflight = (origin: string) =>
      fetch(url, {
        method: "OPTIONS",
        headers: {
          Origin: origin,
          "Access-Control-Request-Method": "POST",
          "Access-Control-Request-Headers": "content-type,x-grpc-web",
        },
      });
    const allowed = await preflight(PORTAL_ORIGIN);
    assert.ok(allowed.status >= 200 && allowed.status < 300, `preflight status ${allowed.status}`);
    assert.equal(allowed.headers.get("access-control-allow-origin"), PORTAL_ORIGIN);
    assert.match(allowed.headers.get("access-control-allow-methods") ?? "", /POST/);
    const allowHeaders = (allowed.headers.get("access-control-allow-headers") ?? "").toLowerCase();
    assert.match(allowHeaders, /content-type/);
    assert.match(allowHeaders, /x-grpc-web/);
    assert.equal(allowed.headers.get("access-control-max-age"), "600");

    const refused = await preflight("http://evil.test");
    assert.equal(refused.headers.get("access-control-allow-origin"), null);

    // A real gRPC-Web call: one frame of an empty ClusterMapRequest (flags 0, length 0).
    const answer = await fetch(url, {
      method: "POST",
      headers: {
        Origin: PORTAL_ORIGIN,
        "content-type": "application/grpc-web+proto",
        "x-grpc-web": "1",
      },
      body: new Uint8Array([0, 0, 0, 0, 0]),
    });
    assert.equal(answer.status, 200);
    assert.equal(answer.headers.get("access-control-allow-origin"), PORTAL_ORIGIN);
    const exposed = (answer.headers.get("access-control-expose-headers") ?? "")
      .split(",")
      .map((h) => h.trim().toLowerCase());
    for (const h of ["grpc-status", "grpc-message", "grpc-status-details-bin"]) {
      assert.ok(exposed.includes(h), `exposed headers ${JSON.stringify(exposed)} lack ${h}`);
    }
    // The body: the ClusterMap frame, then the trailers frame (flag 0x80) with grpc-status 0.
    const body = new Uint8Array(await answer.arrayBuffer());
    assert.equal(body[0], 0, "a data frame first");
    const length = new DataView(body.buffer, body.byteOffset).getUint32(1);
    assert.ok(length > 0, "a non-empty ClusterMap");
    const trailers = body.subarray(5 + length);
    assert.equal(trailers[0], 0x80, "a trailers frame last");
    assert.match(new TextDecoder().decode(trailers.subarray(5)), /grpc-status:\s*0/i);
  });

  step(
    "a leader's SIGKILL loses no acknowledged write",
    async (t) => {
      const c = cluster!;
      const patient = "web-failover";
      const d = client.shardOf(patient);
      const leader = await c.waitForLeader(d.shardId);
      const acked: { key: string; value: string }[] = [];
      const failures: string[] = [];
      let longest = 0;
      let stop = false;
      const writer = (async () => {
        let last = Date.now();
        for (let i = 0; !stop; i++) {
          const key = `k${String(i).padStart(4, "0")}`;
          const value = `v${i}`;
          try {
            await client.put(patient, key, value);
          } catch (err) {
            failures.push(`put ${key} failed across the leader's loss: ${String(err)}`);
            continue;
          }
          longest = Math.max(longest, Date.now() - last);
          last = Date.now();
          acked.push({ key, value });
        }
      })();
      await sleep(1000);
      await c.kill(leader);
      await sleep(4000);
      stop = true;
      await writer;
      t.diagnostic(
        `leader kill: ${acked.length} writes acknowledged; the longest wait between two was ${longest} ms ` +
          `(the leader of shard ${d.shardId}, node ${leader.id}, was killed)`,
      );
      assert.deepEqual(failures, []);
      assert.ok(acked.length >= 10, `only ${acked.length} writes were acknowledged`);
      for (const a of acked) {
        assert.equal(text(await client.get(patient, a.key)), a.value, `acknowledged write ${a.key}`);
      }
      c.start(leader);
    },
    120_000,
  );
});
