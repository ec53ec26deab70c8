// A patient portal's read of the patient's own record: connect through the seeds, stream the
// record with Everything and print what it holds, kind by kind.
//
//   npm run build
//   node dist/examples/portal.js <patient-id> <host:port> [host:port...]
//
// In a browser the same code runs unchanged; the nodes must list the page's origin in
// --web-allowed-origins.

import { DossierClient, DossierError, ErrorReason, ReadConsistency, type Resource } from "../src/index.js";

async function main(argv: string[]): Promise<number> {
  const [patientId, ...seeds] = argv;
  if (patientId === undefined || seeds.length === 0) {
    console.error("usage: portal <patient-id> <host:port> [host:port...]");
    return 2;
  }
  const client = await DossierClient.connect({ seeds });
  const counts = new Map<string, number>();
  let name = "";
  let total = 0;
  const asOf = await client.everything(
    patientId,
    0n,
    (resources: Resource[]) => {
      for (const r of resources) {
        const kind = r.kind.case ?? "unknown";
        counts.set(kind, (counts.get(kind) ?? 0) + 1);
        total++;
        if (r.kind.case === "patient") {
          const n = r.kind.value.names[0];
          name = n === undefined ? "" : [...n.given, n.family].join(" ");
        }
      }
    },
    // A portal may read from any replica; a replica behind the leader is a few moments old.
    { consistency: ReadConsistency.STALE },
  );
  if (total === 0) {
    console.log(`no records for patient ${patientId}`);
    return 1;
  }
  const when = new Date(Number(asOf / 1000n)).toISOString();
  console.log(`patient ${patientId}${name === "" ? "" : ` (${name})`}: ${total} records as of ${when}`);
  for (const [kind, count] of [...counts].sort(([a], [b]) => a.localeCompare(b))) {
    console.log(`  ${kind.padEnd(20)} ${count}`);
  }
  return 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (err: unknown) => {
    if (err instanceof DossierError && err.reason === ErrorReason.INVALID_ARGUMENT) {
      console.error(`invalid request (${err.detail?.field}): ${err.rawMessage}`);
    } else {
      console.error(err instanceof Error ? err.message : err);
    }
    process.exit(1);
  },
);
