#!/usr/bin/env bash
# Runs the same cluster-load points against etcd, Dossier and the gRPC floor (in-memory tonic
# servers: the most any tonic server reaches on this machine), alternating them ROUNDS times in
# one session. Each round runs:
#   - etcd with 1 and with 2 connections per member (its better figure of the two is compared);
#   - Dossier with 1 shard (one Raft group over 3 replicas, etcd's layout) and with SHARDS shards
#     (default 8: several Raft groups, leaders spread over the nodes);
#   - Dossier with 1 shard and the client's coalescing off (--unary: one unary call per request,
#     as etcd's clients send them);
#   - the floor.
# Prints one JSON line per point (stdout), then median tables with ratios to etcd (stderr).
#   benches/scripts/compare-etcd.sh [ROUNDS] [cluster-load arguments...]
# Needs: cargo build --release -p dossier-node -p dossier-bench; etcd (installed if missing).
set -euo pipefail
rounds=${1:-3}
shift || true
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--workloads put,get,get-stale --clients 64 --seconds 5)
here=$(cd "$(dirname "$0")" && pwd)
bench=${DOSSIER_BENCH:-$here/../../target/release/dossier-bench}
etcd_dir=${ETCD_DIR:-$here/../../target/etcd-bench}
shards=${SHARDS:-8}
results=$(mktemp)
trap '"$here/etcd-cluster.sh" stop "$etcd_dir" >/dev/null 2>&1 || true; rm -f "$results"' EXIT
for round in $(seq "$rounds"); do
    for conns in 1 2; do
        echo "round $round of $rounds: etcd, $conns connections per member" >&2
        "$here/etcd-cluster.sh" start "$etcd_dir" >/dev/null
        "$bench" cluster-load --backend etcd --connections-per-node "$conns" "${args[@]}" | tee -a "$results"
        "$here/etcd-cluster.sh" stop "$etcd_dir" >/dev/null
    done
    for n in 1 "$shards"; do
        echo "round $round of $rounds: dossier, $n shards" >&2
        "$bench" cluster-load --backend dossier --shards "$n" "${args[@]}" | tee -a "$results"
    done
    echo "round $round of $rounds: dossier, 1 shard, unary calls" >&2
    "$bench" cluster-load --backend dossier --shards 1 --unary "${args[@]}" | tee -a "$results"
    echo "round $round of $rounds: grpc-floor" >&2
    "$bench" cluster-load --backend grpc-floor "${args[@]}" | tee -a "$results"
done
python3 - "$results" "$rounds" >&2 <<'EOF'
import json, statistics, sys
from collections import defaultdict
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
runs = defaultdict(list)  # (system, workload, clients) -> [row per run]
for r in rows:
    system = r["backend"] if "shards" not in r else f'{r["backend"]}-{int(r["shards"])}'
    runs[(system, r["workload"], int(r["clients"]))].append(r)
def etcd_best(workload, clients):
    """etcd's better connection setting, per round: pairs of runs in round order."""
    rs = runs.get(("etcd", workload, clients), [])
    return [max(a, b, key=lambda r: r["ops_per_s"]) for a, b in zip(rs[0::2], rs[1::2])]
systems = sorted({k[0] for k in runs if k[0] != "etcd"})
points = sorted({(k[1], k[2]) for k in runs})
print(f"\nmedians over {sys.argv[2]} rounds (etcd: better of 1 and 2 connections per member)")
print("| workload | clients | etcd ops/s | " + " | ".join(f"{s} ops/s (ratio)" for s in systems)
      + " | etcd p50/p99 ms | " + " | ".join(f"{s} p50/p99 ms" for s in systems) + " |")
print("|---" * (3 + 2 * len(systems) + 1) + "|")
for workload, clients in points:
    base = etcd_best(workload, clients)
    if not base:
        continue
    med = lambda rs, f: statistics.median(f(r) for r in rs)
    e = med(base, lambda r: r["ops_per_s"])
    cells, lat = [], []
    for s in systems:
        rs = runs.get((s, workload, clients), [])
        if not rs:
            cells.append("-"); lat.append("-"); continue
        v = med(rs, lambda r: r["ops_per_s"])
        cells.append(f"{v:,.0f} ({v / e:.2f}x)")
        lat.append(f'{med(rs, lambda r: r["latency_p50_us"]) / 1000:.2f} / {med(rs, lambda r: r["latency_p99_us"]) / 1000:.2f}')
    el = f'{med(base, lambda r: r["latency_p50_us"]) / 1000:.2f} / {med(base, lambda r: r["latency_p99_us"]) / 1000:.2f}'
    print(f"| {workload} | {clients} | {e:,.0f} | " + " | ".join(cells) + f" | {el} | " + " | ".join(lat) + " |")
errors = defaultdict(int)
for r in rows:
    errors[r["backend"]] += int(r["errors"])
print(f"errors: {dict(errors)} over {len(rows)} runs")
EOF
