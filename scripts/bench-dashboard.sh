#!/usr/bin/env bash
# Benchmark: the web dashboard (issue #17). For each N in $SIZES (default
# "1000 10000"), 20 guests per host, runs target/release/lifeboat-loadgen with
# `--dashboard-port`: once every inventory is held it mints a sign-in link over
# gRPC, signs in with curl (real TLS), times the first byte of /hosts and of a
# filtered guests page 20 times each, and holds 20 /live?view=hosts streams
# open over the measure window (controller RSS before and with them). Writes
# the bench-dashboard section of docs/benchmarks.md. Needs curl, no root, no
# lab. Build first: cargo build --release -p lifeboat-bench -p lifeboat-controller -p lifeboat-cli
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${SIZES:-"1000 10000"}
OUT=${OUT:-docs/benchmarks.md}
MEASURE_S=${MEASURE_S:-30}
BIN=${BIN:-target/release}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
for b in lifeboat-loadgen lifeboat-controller lifeboat; do
  [ -x "$BIN/$b" ] || { echo "bench-dashboard: $BIN/$b missing; cargo build --release -p lifeboat-bench -p lifeboat-controller -p lifeboat-cli" >&2; exit 1; }
done
command -v curl >/dev/null || { echo "bench-dashboard: curl missing" >&2; exit 1; }
for n in $SIZES; do
  echo "bench-dashboard: $n hosts x 20 guests" >&2
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  flock /tmp/lifeboat-bench.lock "$BIN/lifeboat-loadgen" --hosts "$n" --measure-s "$MEASURE_S" \
    --controller-bin "$BIN/lifeboat-controller" --cli-bin "$BIN/lifeboat" \
    --plan-runs 1 --dashboard-port "$port" --work-dir "$WORK/run" >"$WORK/$n.json" 2>"$WORK/$n.log" \
    || { tail -20 "$WORK/$n.log" >&2; exit 1; }
  cat "$WORK/$n.json"
done
[ -n "${NO_DOC:-}" ] && exit 0
python3 - "$OUT" "$WORK" $SIZES <<'PY'
import json, sys, datetime
sys.path.insert(0, "scripts")
import bench_doc
out, work, sizes = sys.argv[1], sys.argv[2], sys.argv[3:]
machine = bench_doc.machine()
lines = [
    "<!-- bench-dashboard:start -->",
    "## Web dashboard",
    "",
    f"`scripts/bench-dashboard.sh` ({datetime.date.today()}; {machine}; release build).",
    "The same `lifeboat-loadgen` run as \"Controller at scale\" with `[dashboard] enabled = true`. Once every inventory is held, a sign-in link is minted over gRPC (`CreateDashboardLogin`) and redeemed with curl; then curl fetches each page 20 times, each over a new TLS connection (the handshake is in the figure), and reports its time to first byte (`%{time_starttransfer}`). *Guests page*: `/guests?state=running&q=vm-0004` (the name filter matches the guests of 10 hosts, up to 200). *Live streams*: 20 `/live?view=hosts` streams (5 signed-in sessions of 4 pages each, the per-session cap) held open over the 30 s steady window, with one guest change per host per minute; controller RSS (`VmRSS`) before they open and at the end of the window. curl, the load generator and the controller share the 2 cores. Target: first byte under 300 ms at 10,000 hosts.",
    "",
    "| hosts | guests | /hosts first byte p50 / max (ms) | /hosts page (KiB) | guests page first byte p50 / max (ms) | guests page (KiB) | live streams open | controller RSS before / with streams (MiB) |",
    "|---:|---:|---:|---:|---:|---:|---:|---:|",
]
for n in sizes:
    r = json.load(open(f"{work}/{n}.json"))
    lines.append(f"| {r['hosts']} | {r['guests']} | {r['dashboard_hosts_ttfb_ms_p50']:.1f} / {r['dashboard_hosts_ttfb_ms_max']:.1f} | {r['dashboard_hosts_bytes']/1024:.0f} | {r['dashboard_guests_ttfb_ms_p50']:.1f} / {r['dashboard_guests_ttfb_ms_max']:.1f} | {r['dashboard_guests_bytes']/1024:.0f} | {r['dashboard_streams_alive']} of {r['dashboard_streams']} | {r['dashboard_rss_before_mib']:.0f} / {r['dashboard_rss_with_streams_mib']:.0f} |")
lines.append("<!-- bench-dashboard:end -->")
section = "\n".join(lines) + "\n"
bench_doc.write_section(out, "bench-dashboard", section)
print(section)
PY
