// Real dossier-node processes on loopback ports, in a temporary directory, for the tests; the
// cluster is initialised with Admin.InitCluster over gRPC-Web.

import { type ChildProcess, spawn } from "node:child_process";
import * as fs from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import { fileURLToPath } from "node:url";
import { createClient, type Transport } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { Admin } from "../src/gen/dossier/v1/admin_pb.js";

/** The origin the nodes let call them from a browser. */
export const PORTAL_ORIGIN = "http://portal.test";

/** clients/web, from dist/test/cluster.js. */
export const PACKAGE_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");

export interface TestNode {
  id: bigint;
  grpc: string;
  http: string;
  data: string;
  process?: ChildProcess;
  exited?: Promise<void>;
}

/** Every node process started by this module: killed if the test process exits with them up. */
const running = new Set<ChildProcess>();
function killAll(): void {
  for (const p of running) {
    p.kill("SIGKILL");
  }
}
process.on("exit", killAll);
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  process.once(signal, () => {
    killAll();
    process.exit(1);
  });
}

export const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

/** DOSSIER_NODE_BIN, or the workspace's debug build. */
export function nodeBinary(): string {
  const bin = path.resolve(PACKAGE_DIR, process.env["DOSSIER_NODE_BIN"] ?? "../../target/debug/dossier-node");
  if (!fs.existsSync(bin)) {
    throw new Error(
      `dossier-node not found at ${bin} (build it with \`cargo build -p dossier-node\`, or set DOSSIER_NODE_BIN)`,
    );
  }
  return bin;
}

async function freePort(): Promise<string> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as net.AddressInfo;
      server.close(() => resolve(`127.0.0.1:${port}`));
    });
  });
}

export function adminAt(address: string, transport?: (baseUrl: string) => Transport) {
  const baseUrl = transport === undefined ? `http://${address}` : `https://${address}`;
  return createClient(Admin, transport?.(baseUrl) ?? createGrpcWebTransport({ baseUrl }));
}

/** How the test's nodes run: extra arguments (TLS, tokens) and the operator's transport. */
export interface ClusterOptions {
  args?: string[];
  /** The transport of the operator initialising the cluster (https, a client certificate). */
  admin?: (baseUrl: string) => Transport;
}

export class TestCluster {
  readonly nodes: TestNode[] = [];

  private constructor(
    readonly bin: string,
    readonly dir: string,
    readonly options: ClusterOptions,
  ) {}

  /** Starts n nodes and initialises a cluster of `shards` shards of 3 replicas (at most 60 s). */
  static async start(n: number, shards: number, options: ClusterOptions = {}): Promise<TestCluster> {
    const bin = nodeBinary();
    const c = new TestCluster(bin, fs.mkdtempSync(path.join(os.tmpdir(), "dossier-web-")), options);
    try {
      for (let i = 1; i <= n; i++) {
        const node: TestNode = {
          id: BigInt(i),
          grpc: await freePort(),
          http: await freePort(),
          data: path.join(c.dir, `n${i}`),
        };
        c.nodes.push(node);
        c.start(node);
      }
      await c.init(shards);
      return c;
    } catch (err) {
      c.dumpLogs();
      await c.stop();
      c.remove();
      throw err;
    }
  }

  private async init(shards: number): Promise<void> {
    const nodes = this.nodes.map((n) => ({ nodeId: n.id, address: n.grpc }));
    const admin = adminAt(this.nodes[0]!.grpc, this.options.admin);
    const deadline = Date.now() + 60_000;
    for (;;) {
      let failure: unknown;
      try {
        await admin.initCluster({ nodes, shards, replicas: 3 }, { timeoutMs: 15_000 });
        return;
      } catch (err) {
        failure = err;
      }
      // An attempt that timed out here may still have initialised the cluster.
      try {
        const m = await admin.getClusterMap({}, { timeoutMs: 2_000 });
        if (m.shards.length === shards) {
          return;
        }
      } catch {
        // not yet
      }
      if (Date.now() > deadline) {
        throw new Error(`cluster init did not complete within 60 s: ${String(failure)}`);
      }
      await sleep(200);
    }
  }

  /** Starts (or restarts) a node, its output appended to node.log in its data directory. */
  start(node: TestNode): void {
    fs.mkdirSync(node.data, { recursive: true });
    const log = fs.openSync(path.join(node.data, "node.log"), "a");
    try {
      const p = spawn(
        this.bin,
        [
          "--node-id", node.id.toString(),
          "--listen", node.grpc,
          "--http-listen", node.http,
          "--data-dir", node.data,
          "--no-auto-init",
          "--web-allowed-origins", PORTAL_ORIGIN,
          ...(this.options.args ?? []),
        ],
        { stdio: ["ignore", log, log] },
      );
      running.add(p);
      node.process = p;
      node.exited = new Promise((resolve) => {
        p.once("exit", () => {
          running.delete(p);
          resolve();
        });
        p.once("error", () => {
          running.delete(p);
          resolve();
        });
      });
    } finally {
      fs.closeSync(log);
    }
  }

  /** SIGKILLs a node: it stops at once, mid-write. */
  async kill(node: TestNode): Promise<void> {
    if (node.process !== undefined) {
      node.process.kill("SIGKILL");
      await node.exited;
      node.process = undefined;
    }
  }

  /** SIGTERM to every node, SIGKILL to those still up after 20 s; then the data is removed. */
  async stop(): Promise<void> {
    await Promise.all(
      this.nodes.map(async (node) => {
        const p = node.process;
        if (p === undefined) {
          return;
        }
        p.kill("SIGTERM");
        const timer = setTimeout(() => p.kill("SIGKILL"), 20_000);
        await node.exited;
        clearTimeout(timer);
        node.process = undefined;
      }),
    );
  }

  /** Removes the data directory (logs included). */
  remove(): void {
    fs.rmSync(this.dir, { recursive: true, force: true });
  }

  dumpLogs(): void {
    for (const node of this.nodes) {
      let data = "";
      try {
        data = fs.readFileSync(path.join(node.data, "node.log"), "utf8");
      } catch {
        data = "(no log)";
      }
      if (data.length > 6000) {
        data = data.slice(data.length - 6000);
      }
      console.error(`--- node ${node.id} log (tail) ---\n${data}`);
    }
  }

  seeds(): string[] {
    return this.nodes.map((n) => n.grpc);
  }

  /** Which running node leads the shard, by their NodeStatus; the highest term wins. */
  async leaderOf(shard: bigint): Promise<TestNode | undefined> {
    let best: TestNode | undefined;
    let bestTerm = 0n;
    for (const node of this.nodes) {
      if (node.process === undefined) {
        continue;
      }
      try {
        const status = await adminAt(node.grpc, this.options.admin).nodeStatus({}, { timeoutMs: 2_000 });
        for (const s of status.shards) {
          if (s.shardId === shard && s.role === "leader" && s.term >= bestTerm) {
            best = node;
            bestTerm = s.term;
          }
        }
      } catch {
        // down or busy: ask the others
      }
    }
    return best;
  }

  /** The shard's leader, waiting up to 20 s for one. */
  async waitForLeader(shard: bigint): Promise<TestNode> {
    const deadline = Date.now() + 20_000;
    while (Date.now() < deadline) {
      const leader = await this.leaderOf(shard);
      if (leader !== undefined) {
        return leader;
      }
      await sleep(100);
    }
    throw new Error(`shard ${shard} has no leader`);
  }
}
