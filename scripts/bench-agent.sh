#!/usr/bin/env bash
# Benchmark: the footprint of `lifeboat-agent` (release build) with 100 guests.
#  (a) libvirt's test driver: a `test:///ABS/node.xml` node file with 100
#      domains (10 running, 90 shut off), a real release controller on
#      127.0.0.1 with a PKI made by `lifeboat certs`; the agent in the root
#      namespace, with the same settings as in the lab (metrics endpoint on).
#  (b) a real libvirtd: the lab with 1 host (release binaries), 100 lab
#      guests defined on host-a, 10 of them running.
# For each: wait until the controller lists all 100 guests, let it settle
# (SETTLE_S, default 20 s), then over WINDOW_S (default 60 s) the agent's
# CPU time (utime+stime from /proc/PID/stat, as % of one core) and its
# VmRSS / VmHWM (/proc/PID/status) at the end of the window.
# Targets (issue #6): RSS at most 15 MiB, idle CPU under 0.2 %.
# The CPU windows hold /tmp/lifeboat-bench.lock (other timing runs take it too).
#
# Needs root (the lab) and `cargo build --release -p lifeboat-agent` plus
# release `lifeboat` and `lifeboat-controller` in target/release.
# Env: ONLY=test|lab (one part only), NO_WRITE=1 (print, do not write docs),
#      OUT (default docs/benchmarks.md), BIN (default target/release).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
BIN=$(realpath "${BIN:-target/release}")
OUT=${OUT:-docs/benchmarks.md}
SETTLE_S=${SETTLE_S:-20}
WINDOW_S=${WINDOW_S:-60}
GUESTS=100
RUNNING=10
ONLY=${ONLY:-}
LOCK=/tmp/lifeboat-bench.lock
LAB=lab/lab.sh
[ "$(id -u)" -eq 0 ] || { echo "bench-agent: needs root (the lab)" >&2; exit 1; }
for b in lifeboat lifeboat-agent lifeboat-controller; do
  [ -x "$BIN/$b" ] || { echo "bench-agent: $BIN/$b missing (cargo build --release -p ...)" >&2; exit 1; }
done
log() { printf 'bench-agent: %s\n' "$*" >&2; }
CLK_TCK=$(getconf CLK_TCK)

cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; } # utime + stime (fields 14, 15)
kib() { awk -v k="$2" '$1 == k":" { print $2 }' "/proc/$1/status"; }
# PID -> "pss_kib uss_kib": proportional set (shared pages divided among the
# processes mapping them) and unique set (pages only this process maps).
smaps() { awk '$1 == "Pss:" { p = $2 } $1 == "Private_Clean:" || $1 == "Private_Dirty:" { u += $2 } END { print p, u }' "/proc/$1/smaps_rollup"; }
mib() { python3 -c "print(f'{$1/1024:.1f}')"; }

# PID -> "cpu_pct rss_mib hwm_mib anon_mib file_mib threads" over WINDOW_S, holding the bench lock
measure() {
  local pid=$1 t0 t1 c0 c1
  exec 8>"$LOCK"
  flock 8
  t0=$(date +%s%N); c0=$(cpu_ticks "$pid")
  sleep "$WINDOW_S"
  t1=$(date +%s%N); c1=$(cpu_ticks "$pid")
  flock -u 8
  exec 8>&-
  python3 -c "print(f'{($c1-$c0)/$CLK_TCK/(($t1-$t0)/1e9)*100:.3f}')" | tr '\n' ' '
  local pss uss
  read -r pss uss <<<"$(smaps "$pid")"
  echo "$(mib "$(kib "$pid" VmRSS)") $(mib "$(kib "$pid" VmHWM)") $(mib "$(kib "$pid" RssAnon)") $(mib "$(kib "$pid" RssFile)") $(kib "$pid" Threads) $(mib "$pss") $(mib "$uss")"
}

WORK=$(mktemp -d)
CTL_PID=
AGENT_PID=
cleanup() {
  [ -n "$AGENT_PID" ] && kill "$AGENT_PID" 2>/dev/null || true
  [ -n "$CTL_PID" ] && kill "$CTL_PID" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# ---- (a) test driver -------------------------------------------------------------------------
run_test_driver() {
  local pki=$WORK/pki port mport
  mkdir -p "$pki" "$WORK/autostart" "$WORK/state"
  "$BIN/lifeboat" certs init "$pki" >/dev/null
  "$BIN/lifeboat" certs issue --ca-dir "$pki" --controller --san 127.0.0.1 >/dev/null
  "$BIN/lifeboat" certs issue --ca-dir "$pki" --agent bench-a >/dev/null
  "$BIN/lifeboat" certs issue --ca-dir "$pki" --client admin --role admin >/dev/null
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  mport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  python3 - "$WORK/node.xml" "$GUESTS" "$RUNNING" <<'PY'
import sys
out, n, running = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
doms = []
for i in range(1, n + 1):
    # the shape of tests/src/lib.rs test_domain
    doms.append(
        f"<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'><name>bench-{i:03}</name>"
        f"<uuid>b0000000-0000-4000-8000-{i:012}</uuid>"
        "<memory unit='MiB'>32</memory><vcpu>1</vcpu><os><type>hvm</type></os><devices>"
        f"<disk type='file' device='disk'><source file='/shared/bench-{i:03}.img'/><target dev='vda' bus='virtio'/></disk>"
        f"<interface type='bridge'><mac address='52:54:00:00:{i // 256:02x}:{i % 256:02x}'/><source bridge='br0'/></interface></devices>"
        f"<test:runstate>{1 if i <= running else 5}</test:runstate></domain>")
open(out, "w").write(
    "<node><cpu><nodes>1</nodes><sockets>1</sockets><cores>4</cores><threads>1</threads><mhz>2000</mhz>"
    "<model>x86_64</model></cpu><memory>8388608</memory>" + "".join(doms) + "</node>")
PY
  cat >"$WORK/controller.toml" <<EOF
listen = "127.0.0.1:$port"
database = "$WORK/controller.db"
heartbeat_interval_ms = 1000
unreachable_after_ms = 3000

[tls]
ca = "$pki/ca.pem"
cert = "$pki/controller.pem"
key = "$pki/controller.key"
EOF
  cat >"$WORK/agent.toml" <<EOF
host_id = "bench-a"
libvirt_uri = "test://$WORK/node.xml"
autostart_dir = "$WORK/autostart"
state_dir = "$WORK/state"
boot_id_file = "$WORK/boot_id"
metrics_listen = "127.0.0.1:$mport"

[controller]
url = "https://127.0.0.1:$port"
ca = "$pki/ca.pem"
cert = "$pki/agent-bench-a.pem"
key = "$pki/agent-bench-a.key"
EOF
  python3 -c 'import uuid; print(uuid.uuid4())' >"$WORK/boot_id"
  "$BIN/lifeboat-controller" --config "$WORK/controller.toml" init >/dev/null  # a start never creates it
  (cd "$WORK" && RUST_LOG=warn exec "$BIN/lifeboat-controller" --config "$WORK/controller.toml" >"$WORK/controller.log" 2>&1) &
  CTL_PID=$!
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  (cd "$WORK" && RUST_LOG=info exec "$BIN/lifeboat-agent" --config "$WORK/agent.toml" >"$WORK/agent.log" 2>&1) &
  AGENT_PID=$!
  local n=0
  for _ in $(seq 300); do
    n=$(LIFEBOAT_CONTROLLER="https://127.0.0.1:$port" LIFEBOAT_CA="$pki/ca.pem" LIFEBOAT_CERT="$pki/client-admin.pem" \
      LIFEBOAT_KEY="$pki/client-admin.key" "$BIN/lifeboat" vms list --host bench-a -o json 2>/dev/null |
      python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo 0)
    [ "$n" = "$GUESTS" ] && break
    sleep 0.2
  done
  [ "$n" = "$GUESTS" ] || { log "controller lists $n of $GUESTS guests; agent log:"; tail "$WORK/agent.log" >&2; exit 1; }
  log "(a) test driver: controller lists $n guests; settling ${SETTLE_S}s, then ${WINDOW_S}s window"
  sleep "$SETTLE_S"
  R_TEST=$(measure "$AGENT_PID")
  log "(a) test driver: cpu% rss hwm anon file threads (MiB) = $R_TEST"
  kill "$AGENT_PID" "$CTL_PID" 2>/dev/null || true
  wait "$AGENT_PID" "$CTL_PID" 2>/dev/null || true
  AGENT_PID= CTL_PID=
}

# ---- (b) real libvirtd in the lab ------------------------------------------------------------
run_lab() {
  local i pid n=0
  # the controller's default lease TTL (30 s: a renewal of every guest's lease every 10 s),
  # not the lab's 4 s; LAB_LEASE_TTL_MS=4000 measures the lab's own setting
  export LIFEBOAT_BIN_DIR=$BIN LAB_LEASE_TTL_MS=${LAB_LEASE_TTL_MS:-30000} LAB_FORCE_GRACE_MS=${LAB_FORCE_GRACE_MS:-60000}
  $LAB up --hosts 1 --guests 0 --no-bmc >/dev/null
  for i in $(seq -w 1 "$GUESTS"); do
    if [ $((10#$i)) -le "$RUNNING" ]; then
      $LAB define-guest host-a "bench-$i" >/dev/null
    else
      $LAB define-guest host-a "bench-$i" --no-start --no-autostart >/dev/null
    fi
  done
  for _ in $(seq 300); do
    n=$($LAB cli vms list --host host-a -o json 2>/dev/null | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null || echo 0)
    [ "$n" = "$GUESTS" ] && break
    sleep 0.2
  done
  [ "$n" = "$GUESTS" ] || { log "controller lists $n of $GUESTS guests"; exit 1; }
  pid=$($LAB agent-pid host-a)
  log "(b) lab: controller lists $n guests; agent pid $pid; settling ${SETTLE_S}s, then ${WINDOW_S}s window"
  sleep "$SETTLE_S"
  R_LAB=$(measure "$pid")
  log "(b) lab: cpu% rss hwm anon file threads (MiB) = $R_LAB"
  $LAB down >/dev/null
}

R_TEST="- - - - - -"
R_LAB="- - - - - -"
[ "$ONLY" = lab ] || run_test_driver
[ "$ONLY" = test ] || run_lab

row() { # label "cpu rss hwm anon file threads pss uss"
  local c r h a f t p u
  read -r c r h a f t p u <<<"$2"
  echo "| $1 | $r | $h | $a | $f | $p | $u | $c | $t |"
}
table=$(
  echo "| libvirt | VmRSS (MiB) | VmHWM (MiB) | of which RssAnon (MiB) | of which RssFile (MiB) | PSS (MiB) | USS: private pages (MiB) | idle CPU (% of one core, ${WINDOW_S} s) | threads |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  row "test driver (\`test:///…/node.xml\`, in-process)" "$R_TEST"
  row "real libvirtd (lab host-a, qemu:///system)" "$R_LAB"
)
echo "$table"
echo "agent $(git -C "$REPO" rev-parse --short HEAD)$(git -C "$REPO" diff --quiet -- agent || echo +dirty): test=[$R_TEST] lab=[$R_LAB]"
[ -n "${NO_WRITE:-}" ] && exit 0
[ -z "$ONLY" ] || { log "ONLY=$ONLY: not writing $OUT (both parts are needed)"; exit 0; }

python3 - "$OUT" "$SETTLE_S" "$WINDOW_S" <<PY
import sys, datetime
sys.path.insert(0, "scripts")
import bench_doc
out, settle, window = sys.argv[1:4]
machine = bench_doc.machine(libvirt=True)
table = """$table"""
section = f"""<!-- bench-agent:start -->
## Agent footprint with 100 guests

\`scripts/bench-agent.sh\` ({datetime.date.today()}; {machine}; release build).
100 guests, 10 of them running. *Test driver*: a libvirt \`test:///…/node.xml\` file, the agent and a release
controller on 127.0.0.1 (mTLS). *Real libvirtd*: the lab with one host (release binaries), 100 lab guests
defined on host-a. Both with the lab's agent settings: \`resync_interval_s\` 30 (default), metrics endpoint on,
heartbeats every 1 s, \`RUST_LOG=info\`; and the controller's default lease TTL (30 s: every guest's start lease is
renewed every 10 s; the lab's own 4 s TTL renews every 1.3 s). Measured after the controller lists all 100 guests and {settle} s of
settling: CPU = utime+stime of the agent (\`/proc/PID/stat\`) over {window} s, as % of one core (tick 10 ms, so
a resolution of ~0.02 %); memory = \`VmRSS\` / \`VmHWM\` (\`/proc/PID/status\`) at the end of the window.
\`RssAnon\` is the agent's own memory (heap, stacks, relocated data); \`RssFile\` is mapped program text, ~17 MiB of
it the shared libraries libvirt's client library pulls in (libvirt, gnutls, libxml2, glib, libcrypto, … — shared with
libvirtd and every virsh; an idle \`virsh -c test:///default\` shell here has VmRSS 20.0 MiB, RssFile 17.5 MiB).
*PSS* (\`/proc/PID/smaps_rollup\`) divides each shared page among the processes that map it; *USS* counts only the
pages no other process maps (\`Private_Clean\` + \`Private_Dirty\`): the memory the agent adds to a host that runs
libvirtd anyway. (In the test-driver run no libvirtd runs, so the libraries are the agent's alone there.)
Targets: RSS at most 15 MiB, idle CPU under 0.2 %.

{table}
<!-- bench-agent:end -->
"""
# the hand-kept before/after record stays
bench_doc.write_section(out, "bench-agent", section, keep_from="### Before and after")
PY
log "wrote $OUT"
