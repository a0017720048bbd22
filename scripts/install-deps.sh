#!/usr/bin/env bash
# Installs the Debian 12 packages that Lifeboat's build and its lab (lab/lab.sh) need,
# and creates the system user/group `libvirt-qemu` that a privileged libvirtd looks up
# before it reads qemu.conf (normally made by libvirt-daemon-system, which we don't install).
#
# Idempotent: when everything is already there it touches nothing and needs no network.
# Runs `apt-get update` at most once per run. Must run as root.
set -euo pipefail

log() { printf 'install-deps: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs Debian packages)"
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian 12 only"

export DEBIAN_FRONTEND=noninteractive

# Packages the lab and the Rust build need.
#   libvirt-daemon + qemu driver: one privileged libvirtd per simulated host
#   libvirt-clients: virsh        libvirt-dev + pkg-config: the `virt` crate links libvirt
#   qemu-system-x86 + qemu-system-data: guests (qboot.rom lives in qemu-system-data)
#   tini: the init (zombie reaper) of each simulated host's PID namespace
#   iproute2: netns/veth/bridge   procps, util-linux: ps/pkill-free helpers, unshare, nsenter, flock
#   gcc/libc6-dev: C compiler for bundled sqlite (rusqlite) and other build scripts
#   python3, openssl: the lab's stand-in binaries (lab/testbin, used by lab/selftest.sh)
#   fence-agents: ClusterLabs fence agents (fence_redfish, fence_ipmilan, ...) for the
#     controller's fence-agent driver and its tests
#   python3-venv: the venv for sushy-tools (the lab's Redfish BMCs, below)
#   curl: lab.sh talks to the lab's BMCs with it (bmc-state, bmc-power)
#   rpm: rpmbuild and rpm for scripts/build-rpms.sh and tests/tests/packaging.rs
#   systemd: systemd-analyze, which checks the packaged unit files (tests/tests/packaging.rs)
#   etcd-server, etcd-client: etcd v3 for the HA store backend, its tests and the lab (etcdctl)
#   protobuf-compiler + libprotobuf-dev: protoc and its well-known .proto files (google/protobuf/*), which the etcd-client crate's build script needs
MAIN_PKGS=(
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config
  qemu-system-x86 qemu-system-data tini iproute2 procps util-linux
  gcc libc6-dev ca-certificates
  python3 openssl
  fence-agents python3-venv curl
  rpm systemd
  etcd-server etcd-client protobuf-compiler libprotobuf-dev
)
# Browser tests of the web dashboard (tests/tests/dashboard_lab.rs, docs/dashboard.md):
#   chromium + chromium-driver: Debian's headless Chromium and its ChromeDriver
#     (/usr/bin/chromium, /usr/bin/chromedriver); a browser download at test time is impossible
#   fonts-dejavu-core: a font, so the dashboard screenshots have glyphs
BROWSER_PKGS=(chromium chromium-driver fonts-dejavu-core)
# qemu-utils must come AFTER qemu-system-x86: installing qemu-system-x86 removes a newer
# (backported) qemu-utils when one is present; we then put Debian's matching one back.
LATE_PKGS=(qemu-utils)

installed() {
  # true when every named package is installed ("install ok installed")
  local p st
  for p in "$@"; do
    st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$st" = "install ok installed" ] || return 1
  done
}

updated=0
apt_update_once() {
  if [ "$updated" -eq 0 ]; then
    log "apt-get update"
    apt-get update -q >/dev/null
    updated=1
  fi
}

if installed "${MAIN_PKGS[@]}"; then
  log "main packages already installed"
else
  apt_update_once
  log "installing: ${MAIN_PKGS[*]}"
  apt-get install -y -q --no-install-recommends "${MAIN_PKGS[@]}"
fi

if installed "${BROWSER_PKGS[@]}"; then
  log "browser packages already installed"
else
  apt_update_once
  log "installing: ${BROWSER_PKGS[*]}"
  apt-get install -y -q --no-install-recommends "${BROWSER_PKGS[@]}"
fi

# qemu-utils: it must be the same qemu version as qemu-system-x86 (both from Debian).
qsys_ver=$(dpkg-query -W -f='${Version}' qemu-system-x86)
qutils_ver=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
if installed "${LATE_PKGS[@]}" && [ "$qutils_ver" = "$qsys_ver" ]; then
  log "qemu-utils $qutils_ver already installed"
else
  apt_update_once
  log "installing qemu-utils=$qsys_ver (matching qemu-system-x86)"
  if ! apt-get install -y -q --no-install-recommends --allow-downgrades "qemu-utils=$qsys_ver"; then
    log "qemu-utils=$qsys_ver not available, installing the candidate version"
    apt-get install -y -q --no-install-recommends qemu-utils
  fi
fi

# The privileged libvirtd refuses to start without its built-in user (see docs/lab.md).
if ! getent group libvirt-qemu >/dev/null; then
  log "creating system group libvirt-qemu"
  groupadd --system libvirt-qemu
fi
if ! getent passwd libvirt-qemu >/dev/null; then
  log "creating system user libvirt-qemu"
  useradd --system --gid libvirt-qemu --home-dir /var/lib/libvirt --no-create-home \
    --shell /usr/sbin/nologin libvirt-qemu
fi

# The lab's BMCs and the fencing tests: sushy-tools (a Redfish BMC emulator, PyPI only) in a
# venv of Debian's python3. Version pinned: the lab relies on the fake driver's behaviour and
# on its external notifier (docs/lab.md). bcrypt (a dependency of sushy-tools) hashes the
# htpasswd files. Set LAB_VENV to put it elsewhere (lab.sh and the tests read LAB_VENV too).
LAB_VENV=${LAB_VENV:-/opt/lifeboat-lab/venv}
SUSHY_VERSION=2.2.0
venv_ok() {
  [ -x "$LAB_VENV/bin/sushy-emulator" ] &&
    "$LAB_VENV/bin/python" -c 'import sushy_tools, bcrypt, importlib.metadata as m, sys; sys.exit(m.version("sushy-tools") != sys.argv[1])' \
      "$SUSHY_VERSION" 2>/dev/null
}
if venv_ok; then
  log "sushy-tools $SUSHY_VERSION already installed in $LAB_VENV"
else
  log "creating the venv $LAB_VENV with sushy-tools $SUSHY_VERSION (pip)"
  mkdir -p "$(dirname "$LAB_VENV")"
  [ -x "$LAB_VENV/bin/pip" ] || /usr/bin/python3 -m venv "$LAB_VENV"
  "$LAB_VENV/bin/pip" install -q --disable-pip-version-check "sushy-tools==$SUSHY_VERSION" bcrypt
  venv_ok || die "sushy-tools is not usable in $LAB_VENV after pip install"
fi

# Sanity checks of what the lab relies on.
for f in /usr/sbin/libvirtd /usr/bin/virsh /usr/bin/qemu-system-x86_64 /usr/bin/tini \
         /usr/share/qemu/qboot.rom /usr/bin/unshare /usr/bin/nsenter /usr/bin/flock \
         /usr/sbin/fence_redfish /usr/bin/curl /usr/bin/rpmbuild /usr/bin/systemd-analyze \
         /usr/bin/chromium /usr/bin/chromedriver; do
  [ -e "$f" ] || die "expected $f after installing packages, it is missing"
done
log "done"
