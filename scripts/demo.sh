#!/usr/bin/env bash
# The demo: installs what is missing, builds, brings up the lab (3 simulated
# hypervisor hosts with real libvirtd and tiny qemu guests, a controller) and
# shows the cluster through the `lifeboat` CLI. Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "demo.sh: needs root (namespaces, libvirtd)" >&2; exit 1; }
bash scripts/install-deps.sh
cargo build --workspace --locked --bins
lab/lab.sh up --hosts 3 --guests 2
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
step "lifeboat hosts list"
lab/lab.sh cli hosts list
step "lifeboat vms list"
lab/lab.sh cli vms list
step "lifeboat hosts show host-a"
lab/lab.sh cli hosts show host-a

if ! grep -q '^HOST_A_BMC_URL=' <<<"$(lab/lab.sh paths)"; then
  echo "demo.sh: the lab has no BMC emulator; the forced-migration part needs it (scripts/install-deps.sh)" >&2
  exit 1
fi
step "host-a fails: it hangs (its BMC still reads On)"
lab/lab.sh host-kill host-a
echo "waiting until the controller has not heard from host-a for the grace period..."
for _ in $(seq 60); do
  grep -q '"liveness": "UNREACHABLE"' <<<"$(lab/lab.sh cli hosts show host-a -o json)" && break
  sleep 0.5
done
sleep 6
lab/lab.sh cli hosts list
step "lifeboat migrate --force --from host-a --fence --plan   (nothing is changed)"
lab/lab.sh cli migrate --force --from host-a --fence --plan || true
step "lifeboat migrate --force --from host-a --fence --yes"
lab/lab.sh cli migrate --force --from host-a --fence --yes
step "host-a's BMC now reads: $(lab/lab.sh bmc-state host-a)"
step "lifeboat vms list"
lab/lab.sh cli vms list
step "lifeboat log --host host-a   (the action log)"
lab/lab.sh cli log --host host-a
step "host-a is repaired: power it on through its BMC"
lab/lab.sh bmc-power host-a on
for _ in $(seq 120); do
  grep -q '"liveness": "REACHABLE"' <<<"$(lab/lab.sh cli hosts show host-a -o json)" && break
  sleep 0.5
done
sleep 2
lab/lab.sh cli hosts show host-a
step "the moved guests did not start on host-a (libvirt autostart was refused by Lifeboat's start guard)"
lab/lab.sh virsh host-a list --all
moved=$(lab/lab.sh cli vms list --host host-a -o json | python3 -c 'import json,sys; g=[x["name"] for x in json.load(sys.stdin) if x["owner_host"]!="host-a"]; print(g[0] if g else "")')
if [ -n "$moved" ]; then
  step "a hand-typed virsh start $moved on host-a is refused too"
  lab/lab.sh virsh host-a start "$moved" || true
fi
step "lifeboat cleanup host-a --plan ; --yes"
lab/lab.sh cli cleanup host-a --plan
lab/lab.sh cli cleanup host-a --yes
step "lifeboat hosts set-status host-a NOT_ACCEPTING; test it with one guest; AVAILABLE"
lab/lab.sh cli hosts set-status host-a NOT_ACCEPTING --reason "repaired, testing" >/dev/null
vm=$(lab/lab.sh cli vms list --host host-b -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["name"])')
lab/lab.sh cli move --vm "$vm" --from host-b --to host-a --yes
lab/lab.sh cli hosts set-status host-a AVAILABLE --reason "tested with $vm"
step "lifeboat hosts list ; vms list"
lab/lab.sh cli hosts list
lab/lab.sh cli vms list
step "lifeboat log --host host-a"
lab/lab.sh cli log --host host-a
cat <<'MSG'

The lab keeps running. Try:
  lab/lab.sh cli jobs list                                           # the job and its moves
  lab/lab.sh virsh host-b destroy vm-b1 ; lab/lab.sh cli vms list    # seen within 1 s
  lab/lab.sh copies <uuid>                                           # qemu processes of a guest across all hosts
  lab/lab.sh down                                                    # tear it all down
MSG
