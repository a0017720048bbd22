#!/usr/bin/env bash
# All benchmarks of docs/benchmarks.md, one after another; each script
# rewrites its own section (with the machine's description). Needs root for
# the lab-based ones (agent footprint on a real libvirtd, event latency,
# forced migration). Takes about 30 minutes on 2 cores.
#   ONLY="scale agent events migrate dashboard"   choose which to run
set -euo pipefail
cd "$(dirname "$0")/.."
ONLY=${ONLY:-"scale agent events migrate dashboard"}
cargo build --release --workspace
# bench-events times changes with an example client (agent/examples/bench_events.rs)
cargo build --release -p lifeboat-agent --example bench_events
cargo build --workspace
for b in $ONLY; do
  s=scripts/bench-$b.sh
  [ -x "$s" ] || { echo "bench: $s missing" >&2; exit 1; }
  echo "bench: === $b ===" >&2
  "$s"
done
echo "bench: docs/benchmarks.md updated" >&2
