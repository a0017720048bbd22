#!/usr/bin/env bash
# Benchmark: forced migration with Lifeboat against a plain serial
# `virsh define` + `virsh start` loop doing the same work, in the same lab
# run, for 1, 10 and 20 guests. Prints a table and writes docs/benchmarks.md.
# Needs root and the lab (scripts/install-deps.sh; cargo build --workspace).
#
# Per size N: a fresh lab with 3 hosts; N guests on host-a; host-a "hangs"
# (its namespace is killed; its BMC still reads On).
#  1. serial baseline: on host-b, `virsh define` + `virsh start` for each
#     guest, one after another; then those copies are removed again;
#  2. Lifeboat: `lifeboat migrate --force --from host-a --fence --to host-b
#     --parallel P --yes`, timed from the command's start to the job's end
#     (whole) and from the BMC's Off reading to the last guest running
#     (moving phase, comparable with the baseline, which does not fence);
#  3. in a second fresh lab with 4 hosts, the same without --to: the planner
#     spreads the guests over host-b, host-c and host-d.
# Timing runs hold /tmp/lifeboat-bench.lock (run it as
# `flock /tmp/lifeboat-bench.lock scripts/bench-migrate.sh`; other timing runs take it too).
set -euo pipefail
cd "$(dirname "$0")/.."
LAB=lab/lab.sh
PARALLEL=${PARALLEL:-8}
SIZES=${SIZES:-"1 10 20"}
OUT=${OUT:-docs/benchmarks.md}
[ "$(id -u)" -eq 0 ] || { echo "bench-migrate: needs root (the lab)" >&2; exit 1; }

now_ms() { echo $(( $(date +%s%N) / 1000000 )); }
log() { printf 'bench: %s\n' "$*" >&2; }

prepare() { # N [HOSTS] -> lab with N guests on host-a, host-a failed and silent past the grace
  local n=$1 hosts=${2:-3} i
  $LAB up --hosts "$hosts" --guests 0 >/dev/null
  for i in $(seq -w 1 "$n"); do $LAB define-guest host-a "bench-$i" >/dev/null; done
  for i in $(seq -w 1 "$n"); do
    $LAB virsh host-a dumpxml --inactive --security-info "bench-$i" >"$WORK/bench-$i.xml"
  done
  # wait until the controller knows all of them, then "hang" host-a
  for _ in $(seq 200); do
    [ "$($LAB cli vms list --host host-a -o json | python3 -c 'import json,sys; print(sum(1 for g in json.load(sys.stdin) if g["state"]=="running"))')" = "$n" ] && break
    sleep 0.1
  done
  $LAB host-kill host-a
  sleep 7 # > unreachable_after_ms + force_grace_ms of the lab controller
}

audit_times() { # JOB -> "requested off end" in ms
  $LAB cli log --job "$1" -o json | python3 -c '
import json, sys
e = json.load(sys.stdin)
t = lambda a: next((x["at_unix_ms"] for x in e if x["action"] == a), 0)
end = max((x["at_unix_ms"] for x in e if x["action"] in ("guest.running", "job.succeeded")), default=0)
print(t("migrate.requested"), t("power.confirmed_off") or t("power.attested"), end)'
}

lifeboat_run() { # N TO-ARGS... -> "whole_ms moving_ms guests-per-target"
  local n=$1; shift
  local t0 t1 out job req off end running
  t0=$(now_ms)
  out=$($LAB cli migrate --force --from host-a --fence "$@" --parallel "$PARALLEL" --yes -o json)
  t1=$(now_ms)
  job=$(python3 -c 'import json,sys; print(json.loads(sys.stdin.read())["id"])' <<<"$out")
  running=$(python3 -c 'import json,sys; print(sum(1 for m in json.loads(sys.stdin.read())["moves"] if m["state"]=="RUNNING"))' <<<"$out")
  [ "$running" = "$n" ] || { log "only $running of $n guests running after job $job"; exit 1; }
  read -r req off end < <(audit_times "$job")
  per=$(python3 -c 'import json,sys,collections; c=collections.Counter(m["target"] for m in json.loads(sys.stdin.read())["moves"]); print("/".join(h.replace("host-", "") + str(n) for h, n in sorted(c.items())))' <<<"$out")
  echo "$((t1 - t0)) $((end - off)) $per"
}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
declare -A SERIAL WHOLE MOVE SWHOLE SMOVE SPER
for n in $SIZES; do
  log "N=$n: preparing"
  prepare "$n"
  log "N=$n: serial virsh loop on host-b"
  uri=$($LAB paths | sed -n 's/^HOST_B_LIBVIRT_URI=//p')
  t0=$(now_ms)
  for i in $(seq -w 1 "$n"); do
    virsh -q -c "$uri" define "$WORK/bench-$i.xml" >/dev/null
    virsh -q -c "$uri" start "bench-$i" >/dev/null
  done
  SERIAL[$n]=$(( $(now_ms) - t0 ))
  for i in $(seq -w 1 "$n"); do
    virsh -q -c "$uri" destroy "bench-$i" >/dev/null
    virsh -q -c "$uri" undefine "bench-$i" >/dev/null
  done
  sleep 1 # let host-b's agent report the removals
  log "N=$n: lifeboat to host-b"
  read -r w m _ < <(lifeboat_run "$n" --to host-b)
  WHOLE[$n]=$w; MOVE[$n]=$m
  log "N=$n: lifeboat, 4 hosts, planner spreads over host-b, host-c and host-d"
  prepare "$n" 4
  read -r w m p < <(lifeboat_run "$n")
  SWHOLE[$n]=$w; SMOVE[$n]=$m; SPER[$n]=$p
done
$LAB down >/dev/null

ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
table=$(
  echo "| guests | serial virsh loop (ms) | Lifeboat, moving phase, to host-b (ms) | ratio | Lifeboat whole command incl. BMC power-off (ms) | Lifeboat moving phase, spread over 3 hosts (ms) | ratio | whole, spread (ms) | guests per target (b/c/d) |"
  echo "|---:|---:|---:|---:|---:|---:|---:|---:|---|"
  for n in $SIZES; do
    echo "| $n | ${SERIAL[$n]} | ${MOVE[$n]} | $(ratio "${MOVE[$n]}" "${SERIAL[$n]}") | ${WHOLE[$n]} | ${SMOVE[$n]} | $(ratio "${SMOVE[$n]}" "${SERIAL[$n]}") | ${SWHOLE[$n]} | ${SPER[$n]} |"
  done
)
echo "$table"
# BIN_NOTE: what the binaries were, for the text (default: the lab's binary directory)
bin_note=${BIN_NOTE:-binaries from ${LIFEBOAT_BIN_DIR:-target/debug}}
python3 - "$OUT" "$bin_note" "$PARALLEL" <<PY
import sys, datetime
sys.path.insert(0, "scripts")
import bench_doc
out, bin_note, parallel = sys.argv[1:4]
machine = bench_doc.machine(libvirt=True) + "; " + bin_note
table = """$table"""
section = f"""<!-- bench-migrate:start -->
## Forced migration against a serial virsh loop

\`scripts/bench-migrate.sh\` ({datetime.date.today()}; {machine}; \`--parallel {parallel}\`).
Per size: a fresh lab (3 hosts), N tiny guests on host-a, host-a hangs (BMC still On).
*Spread*: the same in a fresh lab with 4 hosts, without \`--to\`: the planner spreads the guests over host-b, host-c and host-d (all lab hosts share the machine's 2 cores, so spreading cannot make the qemu boots faster here; on real hosts each target boots its share).
*Serial virsh loop*: \`virsh define\` + \`virsh start\` per guest on host-b, one after another.
*Moving phase*: from the BMC's confirmed Off reading to the last guest running (audit log times) — the same work as the loop.
*Whole command*: \`lifeboat migrate --force --fence --yes\` wall time, including planning and the BMC power-off, whose
emulator (sushy-tools) applies a power change 1–11 s after the request (random), so it dominates and varies.
Target: moving phase at most 0.6x the serial loop for 20 guests.

{table}
<!-- bench-migrate:end -->
"""
bench_doc.write_section(out, "bench-migrate", section)
PY
log "wrote $OUT"
