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

if ! lab/lab.sh paths | grep -q '^HOST_A_BMC_URL='; then
  echo "demo.sh: the lab has no BMC emulator; the forced-migration part needs it (scripts/install-deps.sh)" >&2
  exit 1
fi
step "host-a fails: it hangs (its BMC still reads On)"
lab/lab.sh host-kill host-a
echo "waiting until the controller has not heard from host-a for the grace period..."
for _ in $(seq 60); do
  lab/lab.sh cli hosts show host-a -o json | grep -q '"liveness": "UNREACHABLE"' && break
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
cat <<'MSG'

The lab keeps running. Try:
  lab/lab.sh cli jobs list                                           # the job and its moves
  lab/lab.sh virsh host-b destroy vm-b1 ; lab/lab.sh cli vms list    # seen within 1 s
  lab/lab.sh copies <uuid>                                           # qemu processes of a guest across all hosts
  lab/lab.sh down                                                    # tear it all down
MSG
