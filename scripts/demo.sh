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
cat <<'MSG'

The lab keeps running. Try:
  lab/lab.sh virsh host-a destroy vm-a1 ; lab/lab.sh cli vms list   # seen within 1 s
  lab/lab.sh host-kill host-b ; sleep 4 ; lab/lab.sh cli hosts list  # UNREACHABLE
  lab/lab.sh down                                                    # tear it all down
MSG
