#!/usr/bin/env bash
# Self-test of the lab's BMCs (lab/lab.sh bmc-*): brings a lab up, checks the controller config and
# the paths, powers a host off and on through its BMC, injects every BMC fault, checks that a lab
# crash (host-kill) does not change the BMC, brings the lab down and checks that no emulator or
# listener is left. Needs root and the sushy-tools venv (scripts/install-deps.sh).
#
# The lab's binaries are used as they are (LIFEBOAT_BIN_DIR, default target/debug): with the real
# controller, fencing of the hosts this test powers off may run alongside; nothing here depends on it.
# Ends with "N passed, N failed". ~30-60 s (the fake BMC applies a power change 1-11 s later).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
LAB=$HERE/../lab.sh
export LAB_DIR=${LAB_DIR:-/var/lib/lifeboat-lab}

pass=0 fail=0
ok() { pass=$((pass + 1)); printf 'ok   %s\n' "$*"; }
bad() { fail=$((fail + 1)); printf 'FAIL %s\n' "$*"; }
eq() { if [ "$2" = "$3" ]; then ok "$1"; else bad "$1 (expected '$2', got '$3')"; fi; }
ms() { local s; s=$(date +%s%N); echo $((s / 1000000)); }
until_eq() { # until_eq TIMEOUT_S EXPECTED CMD...: poll until CMD prints EXPECTED
  local t=$1 want=$2 end
  shift 2
  end=$((SECONDS + t))
  until [ "$("$@" 2>/dev/null)" = "$want" ]; do
    [ "$SECONDS" -ge "$end" ] && return 1
    sleep 0.1
  done
}

t=$(ms)
"$LAB" up --hosts 2 --guests 1 >/dev/null 2>/tmp/lab-bmc-selftest-up.err || { cat /tmp/lab-bmc-selftest-up.err; exit 1; }
echo "up took $(($(ms) - t)) ms"
# shellcheck disable=SC1090
. <("$LAB" paths)
eq "paths: BMC_ENABLED" 1 "${BMC_ENABLED:-0}"
if [ "${BMC_ENABLED:-0}" != 1 ]; then
  grep WARNING /tmp/lab-bmc-selftest-up.err || true
  echo "$pass passed, $fail failed"
  exit 1
fi
eq "paths: HOST_A_BMC_URL" "https://10.77.0.3:8001" "$HOST_A_BMC_URL"
eq "paths: HOST_B_BMC_URL" "https://10.77.0.3:8002" "$HOST_B_BMC_URL"
eq "paths: BMC_CA exists" yes "$([ -f "$BMC_CA" ] && echo yes)"
eq "credentials are private" 600 "$(stat -c %a "$HOST_A_BMC_CRED")"
eq "controller.toml: one [bmc.*] per host" 2 "$(grep -c '^\[bmc\.host-[ab]\]$' "$CONTROLLER_CONFIG")"
eq "controller.toml: host-a's system id" 1 "$(grep -c "^system_id = \"$HOST_A_BMC_SYSTEM_ID\"$" "$CONTROLLER_CONFIG")"
eq "controller.toml: force_grace_ms before the first table" 1 \
  "$(awk '/^\[/ { exit } /^force_grace_ms = / { n++ } END { print n + 0 }' "$CONTROLLER_CONFIG")"
eq "BMC certificate verifies for 10.77.0.3" 0 \
  "$(openssl verify -CAfile "$BMC_CA" "$BMC_DIR/bmc.pem" >/dev/null 2>&1; echo $?)"
eq "bmc-status" 2 "$("$LAB" bmc-status | grep -c 'running .*poweroff=enabled auth=ok')"
eq "listener running" 1 "$("$LAB" bmc-status | grep -c '^listener running')"
eq "host-a's BMC reads On" On "$("$LAB" bmc-state host-a)"
eq "host-b's BMC reads On" On "$("$LAB" bmc-state host-b)"

# a crash does not reach the BMC
"$LAB" host-kill host-a 2>/dev/null
eq "host-kill: host-a off" off "$("$LAB" host-status host-a)"
eq "host-kill: its BMC still reads On" On "$("$LAB" bmc-state host-a)"
"$LAB" host-boot host-a 2>/dev/null

# power off / on through the BMC
t=$(ms)
eq "bmc-power off prints Off" Off "$("$LAB" bmc-power host-b off 2>/dev/null)"
echo "bmc-power off took $(($(ms) - t)) ms"
eq "BMC Off => host-b is off" off "$("$LAB" host-status host-b)"
eq "host-b's guest does not run" 0 "$("$LAB" copies "$(awk '$1 == "vm-b1" { print $2 }' "$GUESTS_FILE")")"
t=$(ms)
eq "bmc-power on prints On" On "$("$LAB" bmc-power host-b on 2>/dev/null)"
if until_eq 20 on "$LAB" host-status host-b; then ok "BMC On => host-b boots"; else bad "BMC On => host-b boots"; fi
echo "bmc-power on until the host runs took $(($(ms) - t)) ms"

# faults
"$LAB" bmc-stop host-a 2>/dev/null
eq "bmc-stop: unknown" unknown "$("$LAB" bmc-state host-a 2>/dev/null)"
eq "bmc-stop: bmc-status" 1 "$("$LAB" bmc-status | grep -c '^host-a stopped')"
if "$LAB" bmc-power host-a off >/dev/null 2>&1; then bad "bmc-power against a stopped BMC fails"; else ok "bmc-power against a stopped BMC fails"; fi
"$LAB" bmc-start host-a 2>/dev/null
eq "bmc-start: On again" On "$("$LAB" bmc-state host-a)"
"$LAB" bmc-break-auth host-a 2>/dev/null
eq "bmc-break-auth: unknown" unknown "$("$LAB" bmc-state host-a 2>/dev/null)"
eq "bmc-break-auth: the reason is HTTP 401" 1 "$("$LAB" bmc-state host-a 2>&1 >/dev/null | grep -c 'HTTP 401')"
if "$LAB" bmc-power host-a off >/dev/null 2>&1; then bad "bmc-power with a wrong password fails"; else ok "bmc-power with a wrong password fails"; fi
"$LAB" bmc-fix-auth host-a 2>/dev/null
eq "bmc-fix-auth: On" On "$("$LAB" bmc-state host-a)"
"$LAB" bmc-disable-poweroff host-a 2>/dev/null
eq "bmc-disable-poweroff: bmc-status" 1 "$("$LAB" bmc-status | grep -c '^host-a running .*poweroff=disabled')"
if "$LAB" bmc-power host-a off >/dev/null 2>/tmp/lab-bmc-selftest.err; then
  bad "ForceOff refused when power off is disabled"
else
  eq "ForceOff refused with HTTP 400" 1 "$(grep -c 'HTTP 400' /tmp/lab-bmc-selftest.err)"
fi
sleep 1
eq "refused: BMC still On" On "$("$LAB" bmc-state host-a)"
eq "refused: host-a still on" on "$("$LAB" host-status host-a)"
"$LAB" bmc-enable-poweroff host-a 2>/dev/null
eq "bmc-enable-poweroff: bmc-status" 1 "$("$LAB" bmc-status | grep -c '^host-a running .*poweroff=enabled')"

# down leaves nothing
"$LAB" down 2>/dev/null
left=0
for p in /proc/[0-9]*; do
  a=$(tr '\0' ' ' <"$p/cmdline" 2>/dev/null || true)
  case $a in
    *sushy-emulator* | *lab/bmc/notify-listener.py*)
      st=$(awk '{print $3}' "$p/stat" 2>/dev/null || echo gone)
      case $st in Z | gone | X) ;; *) left=$((left + 1)); echo "left: ${p#/proc/} $a" >&2 ;; esac ;;
  esac
done
eq "down: no emulator or listener left" 0 "$left"
eq "down: no lb-bmc namespace" 0 "$(ip netns list | grep -c '^lb-bmc' || true)"

# without the venv: a loud warning and no BMCs
LAB_VENV=/nonexistent "$LAB" up --hosts 1 --guests 0 >/dev/null 2>/tmp/lab-bmc-selftest-up.err
eq "no venv: WARNING" 1 "$(grep -c 'WARNING: NO BMCs' /tmp/lab-bmc-selftest-up.err)"
eq "no venv: BMC_ENABLED=0" BMC_ENABLED=0 "$("$LAB" paths | grep '^BMC_ENABLED=')"
eq "no venv: no [bmc.*] in controller.toml" 0 "$(grep -c '^\[bmc\.' "$CONTROLLER_CONFIG" || true)"
"$LAB" down 2>/dev/null

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
