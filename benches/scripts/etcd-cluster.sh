#!/usr/bin/env bash
# Starts or stops a 3-member etcd cluster on loopback with etcd's default durability (fsync on,
# heartbeat 100 ms, election timeout 1000 ms), beside which Dossier is measured.
#   benches/scripts/etcd-cluster.sh start [DIR]   # installs Debian's etcd-server if missing
#   benches/scripts/etcd-cluster.sh stop [DIR]    # stops the members by PID
#   benches/scripts/etcd-cluster.sh restart-member DIR N   # starts member N (1-3) again
# Client endpoints: 127.0.0.1:2379, 127.0.0.1:22379, 127.0.0.1:32379.
set -euo pipefail
cmd=${1:?usage: etcd-cluster.sh start|stop [dir]}
dir=${2:-target/etcd-bench}
start_member() {
    local i=$1 c p
    case $i in 1) c=2379 p=2380 ;; 2) c=22379 p=22380 ;; 3) c=32379 p=32380 ;; *) echo "member 1-3" >&2; exit 2 ;; esac
    etcd --name "e$i" --data-dir "$dir/e$i" \
        --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
        --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
        --initial-cluster "e1=http://127.0.0.1:2380,e2=http://127.0.0.1:22380,e3=http://127.0.0.1:32380" \
        --initial-cluster-state new --initial-cluster-token dossier-bench \
        >>"$dir/e$i.log" 2>&1 &
    echo $! >"$dir/e$i.pid"
}
case "$cmd" in
restart-member)
    start_member "${3:?member number}"
    ;;
start)
    if ! command -v etcd >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
    fi
    rm -rf "$dir" && mkdir -p "$dir"
    for i in 1 2 3; do
        start_member "$i"
    done
    for _ in $(seq 1 100); do
        if curl -fs http://127.0.0.1:2379/health 2>/dev/null | grep -q '"health":"true"'; then
            echo "etcd cluster up ($(etcd --version | head -1))"
            exit 0
        fi
        sleep 0.2
    done
    echo "etcd did not become healthy; logs in $dir" >&2
    exit 1
    ;;
stop)
    # Waits for the members to exit (SIGKILL after 10 s), so a start right after begins clean.
    for f in "$dir"/e*.pid; do
        [ -f "$f" ] || continue
        pid=$(cat "$f")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$f"
    done
    ;;
*)
    echo "usage: etcd-cluster.sh start|stop [dir]" >&2
    exit 2
    ;;
esac
