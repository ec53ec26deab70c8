// The client against three nodes with TLS, tokens and authorisation on (docs/security.md): a
// service by its client certificate, a patient and a clinician by their bearer tokens, a
// caller without identity, and a clinician breaking the glass for one request.

import { execFileSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-node";
import { Kv } from "../src/gen/dossier/v1/kv_pb.js";
import { applied, DossierClient, DossierError, ResourceType } from "../src/index.js";
import { nodeBinary, TestCluster } from "./cluster.js";

/** Runs the `dossier` command next to the node binary; returns its output. */
function dossier(...args: string[]): string {
  return execFileSync(path.join(path.dirname(nodeBinary()), "dossier"), args, { encoding: "utf8" });
}

/**
 * gRPC-Web over https trusting `dir/ca.crt`, presenting `client.USER.crt` when a user is named;
 * over HTTP/2 (as browsers do with TLS) unless told HTTP/1.1 (as Node's fetch does).
 */
function tls(dir: string, user?: string, httpVersion: "1.1" | "2" = "2") {
  const ca = fs.readFileSync(path.join(dir, "ca.crt"));
  const identity =
    user === undefined
      ? {}
      : {
          cert: fs.readFileSync(path.join(dir, `client.${user}.crt`)),
          key: fs.readFileSync(path.join(dir, `client.${user}.key`)),
        };
  return (baseUrl: string) =>
    createGrpcWebTransport({ baseUrl, httpVersion, nodeOptions: { ca, ...identity } });
}

async function refused(call: Promise<unknown>, code: Code, what: string): Promise<void> {
  await assert.rejects(call, (err: unknown) => {
    assert.ok(err instanceof DossierError, `${what}: not a DossierError: ${String(err)}`);
    assert.equal(err.code, code, `${what}: ${err.message}`);
    return true;
  });
}

describe("security over gRPC-Web with TLS", { timeout: 180_000 }, () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "dossier-web-certs-"));
  let cluster: TestCluster | undefined;

  before(async () => {
    dossier("cert", "create-ca", "--certs-dir", dir);
    dossier("cert", "create-node", "127.0.0.1", "--certs-dir", dir);
    dossier("cert", "create-client", "ward-app", "--role", "service", "--certs-dir", dir);
    dossier("cert", "create-client", "dba", "--role", "admin", "--certs-dir", dir);
    dossier("token", "create-issuer", "--certs-dir", dir);
    cluster = await TestCluster.start(3, 2, {
      args: [
        "--certs-dir", dir,
        "--token-jwks", path.join(dir, "jwks.json"),
        "--token-issuer", "https://idp.dossier.local",
        "--token-audience", "dossier",
      ],
      admin: tls(dir, "dba"),
    });
  });

  after(async () => {
    await cluster?.stop();
    cluster?.remove();
    fs.rmSync(dir, { recursive: true, force: true });
  });

  it("serves each caller what its identity allows", async () => {
    const seeds = cluster!.seeds();
    const service = await DossierClient.connect({ seeds, scheme: "https", transport: tls(dir, "ward-app") });
    for (const id of ["web-secure-1", "web-secure-2"]) {
      const w = await service.createPatient({
        meta: { id, patientId: id },
        kind: { case: "patient", value: { names: [{ family: "Claes" }] } },
      });
      assert.ok(applied(w), `the service creates ${id}`);
    }

    // No certificate, no token: no node gives the map. Over HTTP/1.1 too: the refusal comes
    // back as an answer, not as a broken connection.
    for (const version of ["2", "1.1"] as const) {
      await assert.rejects(
        DossierClient.connect({ seeds, scheme: "https", transport: tls(dir, undefined, version), deadlineMs: 2000 }),
        (err: unknown) => {
          assert.match(String(err), /\[unauthenticated\]/, `HTTP/${version}`);
          return true;
        },
      );
    }

    // A large request refused before it is read (here for want of identity) is answered too,
    // over HTTP/1.1, where the node would otherwise close the connection while the client still
    // sends it.
    const kv = createClient(Kv, tls(dir, undefined, "1.1")(`https://${seeds[0]}`));
    for (let i = 0; i < 3; i++) {
      await assert.rejects(
        kv.put({ route: { patientId: "web-secure-1" }, key: new Uint8Array([1]), value: new Uint8Array(512 * 1024) }),
        (err: unknown) => {
          assert.ok(err instanceof ConnectError, String(err));
          assert.equal(err.code, Code.Unauthenticated, err.message);
          return true;
        },
      );
    }

    // A patient reads their own record, and no one else's.
    const portal = dossier("--certs-dir", dir, "token", "issue", "portal-1", "--role", "patient",
      "--patient", "web-secure-1").trim();
    const patient = await DossierClient.connect({
      seeds, scheme: "https", transport: tls(dir), token: () => portal,
    });
    const own = await patient.readRecord("web-secure-1", ResourceType.PATIENT, "web-secure-1");
    assert.equal(own?.kind.case, "patient");
    // The Everything stream carries the token too.
    const everything: string[] = [];
    await patient.everything("web-secure-1", 0n, (rs) => void everything.push(...rs.map((r) => r.kind.case ?? "")));
    assert.deepEqual(everything, ["patient"]);
    await refused(
      patient.readRecord("web-secure-2", ResourceType.PATIENT, "web-secure-2"),
      Code.PermissionDenied,
      "another patient's record",
    );

    // A clinician without a care relationship is refused, then served for one request on
    // breaking the glass; a reason too short never leaves the client.
    const drToken = dossier("--certs-dir", dir, "token", "issue", "dr-web", "--role", "clinician",
      "--practitioner", "https://example.org/practitioners|999").trim();
    const dr = await DossierClient.connect({ seeds, scheme: "https", transport: tls(dir), token: drToken });
    await refused(
      dr.readRecord("web-secure-2", ResourceType.PATIENT, "web-secure-2"),
      Code.PermissionDenied,
      "no care relationship",
    );
    const opened = await dr.readRecord("web-secure-2", ResourceType.PATIENT, "web-secure-2", {
      breakGlass: "unconscious patient in the emergency room",
    });
    assert.equal(opened?.kind.case, "patient");
    let streamed = 0;
    await dr.everything("web-secure-2", 0n, (rs) => void (streamed += rs.length), {
      breakGlass: "unconscious patient in the emergency room",
    });
    assert.equal(streamed, 1, "Everything on breaking the glass");
    await refused(
      dr.readRecord("web-secure-2", ResourceType.PATIENT, "web-secure-2"),
      Code.PermissionDenied,
      "the glass is broken for one request only",
    );
    await refused(
      dr.readRecord("web-secure-2", ResourceType.PATIENT, "web-secure-2", { breakGlass: "why" }),
      Code.InvalidArgument,
      "a reason too short",
    );

    // A forged token (signed by another issuer's key) is UNAUTHENTICATED, and final.
    const other = fs.mkdtempSync(path.join(os.tmpdir(), "dossier-web-forger-"));
    try {
      dossier("token", "create-issuer", "--certs-dir", other);
      const forged = dossier("--certs-dir", other, "token", "issue", "dr-web", "--role", "clinician",
        "--practitioner", "https://example.org/practitioners|999").trim();
      const forger = await DossierClient.connect({ seeds, scheme: "https", transport: tls(dir, "ward-app") });
      forger.config.token = forged;
      await refused(
        forger.readRecord("web-secure-1", ResourceType.PATIENT, "web-secure-1"),
        Code.Unauthenticated,
        "a forged token",
      );
    } finally {
      fs.rmSync(other, { recursive: true, force: true });
    }
  });
});
