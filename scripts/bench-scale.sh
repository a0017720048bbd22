#!/usr/bin/env bash
# Benchmark: one controller under N simulated agents (issue #6, item 1).
# Runs target/release/lifeboat-loadgen for each N in $SIZES (default
# "1000 5000 10000"), 20 guests per host, and writes the table to the
# bench-scale section of docs/benchmarks.md. Needs no root and no lab: the
# controller is the real binary on 127.0.0.1, every simulated agent has its
# own certificate and mutual-TLS session. Build first:
#   cargo build --release -p lifeboat-controller -p lifeboat-cli -p lifeboat-bench
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-"1000 5000 10000"}
OUT=${OUT:-docs/benchmarks.md}
MEASURE_S=${MEASURE_S:-30}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
for b in lifeboat-loadgen lifeboat-controller lifeboat; do
  [ -x "target/release/$b" ] || { echo "bench-scale: target/release/$b missing; cargo build --release --workspace" >&2; exit 1; }
done
for n in $SIZES; do
  echo "bench-scale: $n hosts x 20 guests" >&2
  flock /tmp/lifeboat-bench.lock target/release/lifeboat-loadgen --hosts "$n" --measure-s "$MEASURE_S" \
    --work-dir "$WORK/run" >"$WORK/$n.json" 2>"$WORK/$n.log" || { tail -20 "$WORK/$n.log" >&2; exit 1; }
  cat "$WORK/$n.json"
done
python3 - "$OUT" "$WORK" $SIZES <<'PY'
import json, sys, datetime
sys.path.insert(0, "scripts")
import bench_doc
out, work, sizes = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = [json.load(open(f"{work}/{n}.json")) for n in sizes]
machine = bench_doc.machine()
r = rows[0]
lines = [
    "<!-- bench-scale:start -->",
    "## Controller at scale",
    "",
    f"`scripts/bench-scale.sh` ({datetime.date.today()}; {machine}).",
    f"`lifeboat-loadgen` starts the release `lifeboat-controller` (defaults but `force_grace_ms`; SQLite on local disk) and N simulated agents in one process on the same 2 cores: each has its own certificate and mutual-TLS HTTP/2 session, sends Hello and a paged inventory of {r['guests']//r['hosts']} guests with {r['definition_bytes']}-byte definitions ({r.get('definition_packed_bytes', 0)} bytes packed, as agents send them), heartbeats every {r['heartbeat_interval_ms']} ms, sends about one guest change per host per minute, and answers commands (lease renewals, path checks).",
    "*Heartbeat RTT*: heartbeat sent → `HeartbeatAck` read back by the simulated agent, over the measuring window (load generator included).",
    f"*Silent host*: one agent stops sending (its connection stays open) until `hosts show` says UNREACHABLE; the detection time is {r['unreachable_after_ms']} ms.",
    "*Plan*: `PlanMigration` for that host (attested off), client-side from a thread and runtime of its own (as the CLI would ask, not queued behind the simulated agents' tasks), p50 and max of 20 runs. A plan waits for path checks on up to 28 simulated agents, which share the 2 cores; the controller's debug trace `planned` splits each plan into host views, database reads and those checks (`LOADGEN_CONTROLLER_LOG=warn,lifeboat_controller::migrate=debug`).",
    "*vms list*: the real `lifeboat vms list --output json` over every guest, wall time.",
    "",
    "| hosts | guests | controller CPU (% of one core) | load generator CPU | controller RSS (MiB) | peak RSS (MiB) | heartbeat RTT p50 / p99 (ms) | silent host noticed (ms) | plan p50 / max (ms) | `vms list -o json` (ms) | all sessions + inventories (s) | session reconnects |",
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]
for r in rows:
    lines.append(f"| {r['hosts']} | {r['guests']} | {r['controller_cpu_pct']:.1f} | {r['loadgen_cpu_pct']:.1f} | {r['controller_rss_mib']:.0f} | {r['controller_peak_rss_mib']:.0f} | {r['heartbeat_rtt_p50_ms']:.2f} / {r['heartbeat_rtt_p99_ms']:.1f} | {r['silent_detect_ms']:.0f} | {r['plan_ms_p50']:.1f} / {r['plan_ms_max']:.1f} | {r['vms_list_ms']:.0f} | {r['inventory_stored_s']:.0f} | {r.get('session_reconnects', 0)} |")
lines.append("<!-- bench-scale:end -->")
section = "\n".join(lines) + "\n"
bench_doc.write_section(out, "bench-scale", section)
print(section)
PY
