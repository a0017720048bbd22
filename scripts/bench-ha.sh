#!/usr/bin/env bash
# Benchmark: the etcd backend beside SQLite (issue #16). For each N in $SIZES
# (default "1000 10000"), 20 guests per host, runs target/release/lifeboat-loadgen
# twice, back to back: once on SQLite (one controller) and once on a real etcd
# (one member started by the load generator, `--controllers 2` sharing it),
# then SIGKILLs the etcd leader and times the failover (standby leading, every
# agent reconnected, every agent's leases renewed). Writes the table to the
# bench-ha section of docs/benchmarks.md. Needs etcd (scripts/install-deps.sh),
# no root, no lab. Build first: cargo build --release --workspace
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-"1000 10000"}
OUT=${OUT:-docs/benchmarks.md}
MEASURE_S=${MEASURE_S:-30}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
for b in lifeboat-loadgen lifeboat-controller lifeboat; do
  [ -x "target/release/$b" ] || { echo "bench-ha: target/release/$b missing; cargo build --release --workspace" >&2; exit 1; }
done
command -v etcd >/dev/null || { echo "bench-ha: etcd missing (scripts/install-deps.sh)" >&2; exit 1; }
for n in $SIZES; do
  for backend in sqlite etcd; do
    echo "bench-ha: $n hosts x 20 guests on $backend" >&2
    extra=()
    [ "$backend" = etcd ] && extra=(--etcd --controllers 2)
    flock /tmp/lifeboat-bench.lock target/release/lifeboat-loadgen --hosts "$n" --measure-s "$MEASURE_S" \
      --plan-runs 5 --work-dir "$WORK/run" "${extra[@]}" >"$WORK/$n-$backend.json" 2>"$WORK/$n-$backend.log" \
      || { tail -20 "$WORK/$n-$backend.log" >&2; exit 1; }
    cat "$WORK/$n-$backend.json"
  done
done
python3 - "$OUT" "$WORK" $SIZES <<'PY'
import json, sys, datetime
sys.path.insert(0, "scripts")
import bench_doc
out, work, sizes = sys.argv[1], sys.argv[2], sys.argv[3:]
machine = bench_doc.machine()
lines = [
    "<!-- bench-ha:start -->",
    "## etcd backend beside SQLite, and failover",
    "",
    f"`scripts/bench-ha.sh` ({datetime.date.today()}; {machine}; release build).",
    "The same `lifeboat-loadgen` run as \"Controller at scale\" (each simulated agent from its own loopback address), once with SQLite and once with `[store] backend = \"etcd\"`: one etcd 3.4 member on the same machine (data on local disk, `--max-txn-ops 10000 --max-request-bytes 10485760`) and two controllers sharing it. etcd and both controllers share the 2 cores with the load generator. *etcd writes/s*: puts + deletes over the steady window (`etcd_mvcc_put_total` + `etcd_mvcc_delete_total`), with about one guest change per host per minute. *etcd database*: `etcd_mvcc_db_total_size_in_bytes` (in use) at the end of the steady window, no compaction yet.",
    "*Failover*: the leader is SIGKILLed after the steady window; times from the kill until the standby answers as leader, until every simulated agent has a session with it (as the agent does, each dials the dead leader once more, then the follower, naming the epoch it lost, on the standby connection it keeps to it; the follower holds that call until it leads and serves it; a follower's `lifeboat-leader` hint is followed; 0.1 s doubling to 1 s backoff), and until every agent has been granted leases by it. Target: under 10 s at 10,000 hosts.",
    "",
    "| hosts | backend | controller RSS (MiB) | heartbeat RTT p50 / p99 (ms) | all inventories held (s) | controller CPU (%) | etcd writes/s | etcd txns/s | etcd database (MiB, in use) | failover: leader / all reconnected / all leases (s) | reconnects |",
    "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]
for n in sizes:
    for b in ["sqlite", "etcd"]:
        r = json.load(open(f"{work}/{n}-{b}.json"))
        if b == "etcd":
            e = f"{r['etcd_writes_per_s']:.1f} | {r['etcd_txns_per_s']:.1f} | {r['etcd_db_bytes']/1048576:.0f} ({r['etcd_db_in_use_bytes']/1048576:.0f})"
            f = f"{r['failover_elected_s']:.2f} / {r['failover_reconnected_s']:.2f} / {r['failover_leases_s']:.2f}"
        else:
            e, f = "– | – | –", "–"
        lines.append(f"| {r['hosts']} | {b} | {r['controller_rss_mib']:.0f} | {r['heartbeat_rtt_p50_ms']:.2f} / {r['heartbeat_rtt_p99_ms']:.1f} | {r['inventory_stored_s']:.0f} | {r['controller_cpu_pct']:.1f} | {e} | {f} | {r.get('session_reconnects', 0)} |")
lines.append("<!-- bench-ha:end -->")
section = "\n".join(lines) + "\n"
bench_doc.write_section(out, "bench-ha", section)
print(section)
PY
