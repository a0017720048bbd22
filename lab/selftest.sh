#!/usr/bin/env bash
# Self-test of the lab (lab/lab.sh) itself: brings a lab up, injects every fault, checks the
# effects, brings it down and checks that nothing is left behind, then repeats up/down.
#
# By default it uses the stand-in binaries in lab/testbin (so it tests the lab, not Lifeboat);
# LIFEBOAT_BIN_DIR=... runs it with other (real) binaries: then the checks that read the
# stand-ins' logs are skipped. Needs root. Ends with "N passed, N failed".
# Usage: lab/selftest.sh [--cycles N]    (N extra up/down cycles at the end, default 2)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
LAB=$HERE/lab.sh
cycles=2
[ "${1:-}" = --cycles ] && cycles=$2
STANDIN=0
if [ -z "${LIFEBOAT_BIN_DIR:-}" ]; then
  export LIFEBOAT_BIN_DIR=$HERE/testbin
  STANDIN=1
fi
export LAB_DIR=${LAB_DIR:-/var/lib/lifeboat-lab}

pass=0 fail=0
ok() { pass=$((pass + 1)); printf 'ok   %s\n' "$*"; }
bad() { fail=$((fail + 1)); printf 'FAIL %s\n' "$*"; }
check() { # check DESCRIPTION CMD...
  local d=$1
  shift
  if "$@" >/dev/null 2>&1; then ok "$d"; else bad "$d"; fi
}
eq() { # eq DESCRIPTION EXPECTED ACTUAL
  if [ "$2" = "$3" ]; then ok "$1"; else bad "$1 (expected '$2', got '$3')"; fi
}
# until_true TIMEOUT_S CMD...: poll
until_true() {
  local t=$1 end
  shift
  end=$((SECONDS + t))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -ge "$end" ] && return 1
    sleep 0.1
  done
}
ms() { local s; s=$(date +%s%N); echo $((s / 1000000)); }

# processes / namespaces the lab may leave behind
leftovers() {
  local n=0 p
  n=$(ip netns list 2>/dev/null | grep -c '^lb-' || true)
  for p in $(grep -lzF -- "$LAB_DIR/" /proc/[0-9]*/cmdline 2>/dev/null | sed 's#/proc/\([0-9]*\)/cmdline#\1#'); do
    [ "$p" = $$ ] && continue
    st=$(awk '{print $3}' "/proc/$p/stat" 2>/dev/null || echo gone)
    case $st in Z | gone | X) ;; *) n=$((n + 1)); echo "left: $p $(tr '\0' ' ' <"/proc/$p/cmdline" | cut -c1-100)" >&2 ;; esac
  done
  for p in /proc/[0-9]*; do
    a=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null || true)
    case $a in
      "tini -s -- $LAB"* | "unshare --pid"*"$LAB"* | *libvirtd\ -d\ -p*)
        st=$(awk '{print $3}' "$p/stat" 2>/dev/null || echo gone)
        [ "$st" != Z ] && [ "$st" != gone ] && { n=$((n + 1)); echo "left: ${p#/proc/} $a" >&2; } ;;
    esac
  done
  echo "$n"
}
agent_log() { echo "$LAB_DIR/hosts/$1/agent.log"; }
uuid_of() { awk -v n="$1" '$1 == n {print $2}' "$LAB_DIR/guests.tsv"; }
copies_is() { [ "$("$LAB" copies "$1")" = "$2" ]; }

echo "== up"
t0=$(ms)
"$LAB" up >/tmp/lab-selftest-up.out 2>&1 || { cat /tmp/lab-selftest-up.out; bad "lab up"; echo "$pass passed, $fail failed"; exit 1; }
echo "up took $(($(ms) - t0)) ms"
ok "lab up"
eq "up lists 6 guests" 6 "$(grep -c '^vm-' /tmp/lab-selftest-up.out)"
for h in host-a host-b host-c; do eq "$h is on" on "$("$LAB" host-status "$h")"; done
eq "paths has HOST_A_AGENT_CONFIG" 1 "$("$LAB" paths | grep -c '^HOST_A_AGENT_CONFIG=.*/hosts/host-a/etc-lifeboat/agent.toml$')"
eq "paths has CONTROLLER_DB" 1 "$("$LAB" paths | grep -c "^CONTROLLER_DB=$LAB_DIR/controller/controller.db$")"
eq "status: controller running" 1 "$("$LAB" status | grep -c '^controller running net=connected')"
eq "status: 3 agents running" 3 "$("$LAB" status | grep -c 'on agent=running libvirtd=running net=connected')"
for g in vm-a1 vm-a2 vm-b1 vm-b2 vm-c1 vm-c2; do eq "$g runs once" 1 "$("$LAB" copies "$(uuid_of "$g")")"; done
eq "autostart on for vm-a1" 1 "$("$LAB" virsh host-a dominfo vm-a1 | grep -c 'Autostart: *enable')"
eq "hostname inside host-b" host-b "$("$LAB" exec host-b hostname)"
eq "libvirt sees its own /etc/libvirt" 2 "$("$LAB" exec host-c ls /etc/libvirt/qemu/autostart | grep -c '^vm-c')"
eq "boot id file is a uuid" 1 "$(grep -cE '^[0-9a-f-]{36}$' "$LAB_DIR/hosts/host-a/boot_id")"
check "agent config written" grep -q 'host_id = "host-a"' "$LAB_DIR/hosts/host-a/etc-lifeboat/agent.toml"
check "agent key copied" test -s "$LAB_DIR/hosts/host-a/etc-lifeboat/pki/agent.key"
check "controller config written" grep -q "database = \"$LAB_DIR/controller/controller.db\"" "$LAB_DIR/controller/controller.toml"
if [ "$STANDIN" = 1 ]; then
  eq "cli reaches the controller from lb-ctl" "controller reachable" "$("$LAB" cli ping)"
  eq "cli-as viewer uses the viewer cert" 1 "$("$LAB" cli-as viewer show-env | grep -c "LIFEBOAT_CERT=$LAB_DIR/pki/client-viewer.pem")"
  check "agents heartbeat to the controller" until_true 5 grep -q 'hello from 10.77.0.13: host-c' "$LAB_DIR/controller/controller.log"
  check "agent sees the host name" grep -q 'hostname host-a' "$(agent_log host-a)"
fi

echo "== guests"
t=$(ms)
"$LAB" virsh host-a -q destroy vm-a2 >/dev/null
eq "virsh destroy is fast (<2 s)" 1 "$([ $(($(ms) - t)) -lt 2000 ] && echo 1 || echo 0)"
check "vm-a2 gone after destroy" copies_is "$(uuid_of vm-a2)" 0
"$LAB" virsh host-a -q start vm-a2 >/dev/null
check "vm-a2 back" copies_is "$(uuid_of vm-a2)" 1
out=$("$LAB" define-guest host-b vm-a1 --no-autostart)
eq "define-guest reuses the uuid of a known name" "vm-a1 $(uuid_of vm-a1)" "$out"
eq "double run is visible" 2 "$("$LAB" copies "$(uuid_of vm-a1)")"
"$LAB" virsh host-b -q destroy vm-a1 >/dev/null
"$LAB" virsh host-b -q undefine vm-a1 >/dev/null
eq "back to one copy" 1 "$("$LAB" copies "$(uuid_of vm-a1)")"
"$LAB" define-guest host-c vm-local --local-disk --no-start >/dev/null
check "local disk lives in host-c's /var/lib/libvirt/images" test -f "$LAB_DIR/hosts/host-c/var-lib-libvirt/images/vm-local.img"
eq "--no-start leaves it off" 0 "$("$LAB" copies "$(uuid_of vm-local)")"
"$LAB" virsh host-c -q start vm-local >/dev/null
eq "local-disk guest starts" 1 "$("$LAB" copies "$(uuid_of vm-local)")"

echo "== partition"
"$LAB" host-partition host-a 2>/dev/null
eq "status shows partition" 1 "$("$LAB" status | grep -c '^host-a on .*net=partitioned')"
check "host-a cannot reach the controller" bash -c "! '$LAB' exec host-a timeout 2 bash -c 'exec 3<>/dev/tcp/10.77.0.2/7443'"
check "host-b still can" "$LAB" exec host-b timeout 2 bash -c 'exec 3<>/dev/tcp/10.77.0.2/7443'
"$LAB" host-heal host-a 2>/dev/null
check "host-a reaches the controller after heal" "$LAB" exec host-a timeout 2 bash -c 'exec 3<>/dev/tcp/10.77.0.2/7443'
"$LAB" controller-partition 2>/dev/null
check "controller partition cuts host-b" bash -c "! '$LAB' exec host-b timeout 2 bash -c 'exec 3<>/dev/tcp/10.77.0.2/7443'"
"$LAB" controller-heal 2>/dev/null
check "controller heal restores host-b" "$LAB" exec host-b timeout 2 bash -c 'exec 3<>/dev/tcp/10.77.0.2/7443'

echo "== power"
old_boot=$(cat "$LAB_DIR/hosts/host-a/boot_id")
pidns=$(cat "$LAB_DIR/hosts/host-a/pidns")
t=$(ms)
"$LAB" host-kill host-a 2>/dev/null
echo "host-kill took $(($(ms) - t)) ms"
eq "host-a off" off "$("$LAB" host-status host-a)"
eq "vm-a1 died with host-a" 0 "$("$LAB" copies "$(uuid_of vm-a1)")"
n=0
for p in /proc/[0-9]*; do
  [ "$(readlink "$p/ns/pid" 2>/dev/null)" = "$pidns" ] || continue
  st=$(awk '{print $3}' "$p/stat" 2>/dev/null || echo gone)
  [ "$st" != Z ] && [ "$st" != gone ] && n=$((n + 1))
done
eq "no process left in host-a's PID namespace" 0 "$n"
check "virsh against an off host fails" bash -c "! '$LAB' virsh host-a list"
check "host-kill of an off host is a no-op" "$LAB" host-kill host-a
t=$(ms)
"$LAB" host-boot host-a 2>/dev/null
echo "host-boot took $(($(ms) - t)) ms"
eq "host-a on" on "$("$LAB" host-status host-a)"
check "new boot id" bash -c "[ \"\$(cat '$LAB_DIR/hosts/host-a/boot_id')\" != '$old_boot' ]"
check "autostart brought vm-a1 back" until_true 10 copies_is "$(uuid_of vm-a1)" 1
check "autostart brought vm-a2 back" until_true 10 copies_is "$(uuid_of vm-a2)" 1
eq "agent running after boot" 1 "$("$LAB" status | grep -c '^host-a on agent=running')"
[ "$STANDIN" = 1 ] && check "agent read the new boot id" grep -q "boot $(cat "$LAB_DIR/hosts/host-a/boot_id")" "$(agent_log host-a)"

echo "== daemons"
"$LAB" agent-stop host-b 2>/dev/null
eq "agent stopped" 1 "$("$LAB" status | grep -c '^host-b on agent=stopped libvirtd=running')"
eq "guests untouched by agent-stop" 1 "$("$LAB" copies "$(uuid_of vm-b1)")"
"$LAB" agent-start host-b 2>/dev/null
eq "agent started" 1 "$("$LAB" status | grep -c '^host-b on agent=running')"
"$LAB" libvirtd-kill host-b 2>/dev/null
eq "libvirtd killed, guests live on" 1 "$("$LAB" copies "$(uuid_of vm-b1)")"
"$LAB" libvirtd-start host-b 2>/dev/null
eq "libvirtd reattached to its guests" 2 "$("$LAB" virsh host-b -q list | grep -c running)"
"$LAB" controller-stop 2>/dev/null
eq "controller stopped" 1 "$("$LAB" status | grep -c '^controller stopped')"
"$LAB" controller-start 2>/dev/null
eq "controller started" 1 "$("$LAB" status | grep -c '^controller running')"
"$LAB" controller-kill 2>/dev/null
eq "controller killed" 1 "$("$LAB" status | grep -c '^controller stopped')"
"$LAB" controller-start 2>/dev/null

echo "== down"
t=$(ms)
"$LAB" down 2>/dev/null
echo "down took $(($(ms) - t)) ms"
eq "nothing left after down" 0 "$(leftovers)"
check "down again is a no-op" "$LAB" down
eq "host-status after down" off "$("$LAB" host-status host-a)"

for ((c = 1; c <= cycles; c++)); do
  echo "== cycle $c"
  t=$(ms)
  if "$LAB" up --hosts 2 --guests 1 >/dev/null 2>&1; then ok "up #$c ($(($(ms) - t)) ms)"; else bad "up #$c"; fi
  eq "2 guests in cycle $c" 2 "$("$LAB" guests | grep -c ' host-[ab]$')"
  "$LAB" host-kill host-b 2>/dev/null
  # up on a live lab first brings it down
  if "$LAB" up --hosts 3 --guests 1 >/dev/null 2>&1; then ok "up over a live lab #$c"; else bad "up over a live lab #$c"; fi
  eq "3 guests" 3 "$("$LAB" guests | grep -c ' host-[abc]$')"
  "$LAB" down 2>/dev/null
  eq "nothing left after cycle $c" 0 "$(leftovers)"
done

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
