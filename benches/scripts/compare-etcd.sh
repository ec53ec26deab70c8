#!/usr/bin/env bash
# Runs the same cluster-load points against etcd, Dossier and the gRPC floor (in-memory tonic
# servers: the most any tonic server reaches on this machine), alternating them ROUNDS times in
# one session, and prints one JSON line per point (stdout) and the tables (stderr).
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
trap '"$here/etcd-cluster.sh" stop "$etcd_dir" >/dev/null 2>&1 || true' EXIT
for round in $(seq "$rounds"); do
    echo "round $round of $rounds: etcd" >&2
    "$here/etcd-cluster.sh" start "$etcd_dir" >/dev/null
    "$bench" cluster-load --backend etcd "${args[@]}"
    "$here/etcd-cluster.sh" stop "$etcd_dir" >/dev/null
    echo "round $round of $rounds: dossier" >&2
    "$bench" cluster-load --backend dossier "${args[@]}"
    echo "round $round of $rounds: grpc-floor" >&2
    "$bench" cluster-load --backend grpc-floor "${args[@]}"
done
