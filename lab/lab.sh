#!/usr/bin/env bash
# Lifeboat lab: several simulated KVM hypervisor hosts on one Debian 12 machine.
#
# Each host = a network namespace (lb-host-X) + a PID/mount/UTS namespace whose init is tini,
# with its own libvirtd, its own Lifeboat agent and tiny real qemu guests. A controller runs in
# its own network namespace (lb-ctl). Every host has a Redfish BMC (sushy-emulator, fake driver)
# in namespace lb-bmc, whose power changes power the host off/on. All namespaces meet on a
# bridge in namespace lb-br.
# See docs/lab.md for the layout, every subcommand and how faults are injected.
set -euo pipefail

LAB_SH=$(readlink -f "${BASH_SOURCE[0]}")
REPO_DIR=$(cd "$(dirname "$LAB_SH")/.." && pwd)
LAB_DIR=$(realpath -m "${LAB_DIR:-/var/lib/lifeboat-lab}")
LIFEBOAT_BIN_DIR=$(realpath -m "${LIFEBOAT_BIN_DIR:-$REPO_DIR/target/debug}")
export LAB_DIR LIFEBOAT_BIN_DIR

# ---- fixed lab parameters -------------------------------------------------------------------
NET_PREFIX=10.77.0
CTL_IP=$NET_PREFIX.2
CTL_PORT=7443
CONTROLLER_URL="https://$CTL_IP:$CTL_PORT"
CONTROLLER_SERVER_NAME=lifeboat-controller
BR_NS=lb-br
CTL_NS=lb-ctl
GUEST_BRIDGE=lbguest0
LOCK_FILE=/run/lifeboat-lab.lock
CLIENT_ROLES=(admin operator viewer)
# BMCs: one sushy-emulator per host in namespace lb-bmc (10.77.0.3), host N (0-based) on port 8001+N
BMC_NS=lb-bmc
BMC_IP=$NET_PREFIX.3
BMC_PORT_BASE=8001
BMC_LISTENER_PORT=8100
# the controller's forced-migration grace and start-lease TTL in the lab (grace > lease TTL)
FORCE_GRACE_MS=${LAB_FORCE_GRACE_MS:-5000}
LEASE_TTL_MS=${LAB_LEASE_TTL_MS:-4000}
# the web dashboard (docs/dashboard.md): LAB_DASHBOARD=0 leaves it off; every controller uses this port
LAB_DASHBOARD=${LAB_DASHBOARD:-1}
DASHBOARD_PORT=8443
LAB_VENV=$(realpath -m "${LAB_VENV:-/opt/lifeboat-lab/venv}")
SUSHY_BIN=$LAB_VENV/bin/sushy-emulator
VENV_PY=$LAB_VENV/bin/python
BMC_LISTENER=$REPO_DIR/lab/bmc/notify-listener.py
BMC_AUTH=$REPO_DIR/lab/bmc/auth.py

PKI_DIR=$LAB_DIR/pki
SHARED_DIR=$LAB_DIR/shared
CTL_DIR=$LAB_DIR/controller
CTL_CONFIG=$CTL_DIR/controller.toml
CTL_DB=$CTL_DIR/controller.db
CTL_LOG=$CTL_DIR/controller.log
CTL_MEMORY_RESERVE=$CTL_DIR/host-memory-reserve-mib
STATE_FILE=$LAB_DIR/lab.env
GUESTS_FILE=$LAB_DIR/guests.tsv
BMC_DIR=$LAB_DIR/bmc
# Warmed qemu capabilities cache, kept across `down`/`up` (copied into every host at boot).
CAPS_CACHE=$LAB_DIR/qemu-caps-cache

AGENT_BIN=$LIFEBOAT_BIN_DIR/lifeboat-agent
CTL_BIN=$LIFEBOAT_BIN_DIR/lifeboat-controller
CLI_BIN=$LIFEBOAT_BIN_DIR/lifeboat

# ---- small helpers --------------------------------------------------------------------------
log() { printf 'lab: %s\n' "$*" >&2; }
warn() { printf '\nlab: WARNING: %s\n\n' "$*" >&2; }
die() { printf 'lab: ERROR: %s\n' "$*" >&2; exit 1; }
usage_die() { printf 'lab: usage: %s\n' "$*" >&2; exit 2; }
now_ms() { local s; s=$(date +%s%N); echo $((s / 1000000)); }

need_root() { [ "$(id -u)" -eq 0 ] || die "the lab needs root (namespaces, libvirtd, bridges)"; }

LOCKED=0
take_lock() {
  [ "$LOCKED" -eq 1 ] && return 0
  exec 9>"$LOCK_FILE"
  flock -w 300 9 || die "another lab.sh command holds $LOCK_FILE for more than 300 s"
  LOCKED=1
}

# proc_state PID -> prints the one-letter state from /proc/PID/stat, fails if PID is gone.
proc_state() {
  local stat rest
  { IFS= read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
  [ -n "$stat" ] || return 1
  rest=${stat##*) }
  printf '%s\n' "${rest%% *}"
}
# proc_starttime PID -> field 22 of /proc/PID/stat (to tell a recycled PID from ours)
proc_starttime() {
  local stat rest f
  { IFS= read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 1
  rest=${stat##*) }
  read -r -a f <<<"$rest"
  printf '%s\n' "${f[19]}"
}
# proc_running PID: exists and is neither a zombie nor dead (this machine's PID 1 reaps slowly).
proc_running() {
  local st
  st=$(proc_state "$1") || return 1
  [ "$st" != Z ] && [ "$st" != X ] && [ "$st" != x ]
}
# wait_gone TIMEOUT_S PID... : wait until none of the PIDs is running
wait_gone() {
  local timeout=$1 deadline p left
  shift
  deadline=$(($(now_ms) + timeout * 1000))
  while :; do
    left=0
    for p in "$@"; do proc_running "$p" && left=1; done
    [ "$left" -eq 0 ] && return 0
    [ "$(now_ms)" -ge "$deadline" ] && return 1
    sleep 0.05
  done
}
# term_then_kill GRACE_S PID...: SIGTERM, then SIGKILL after GRACE_S seconds
term_then_kill() {
  local grace=$1
  shift
  [ $# -gt 0 ] || return 0
  kill -TERM "$@" 2>/dev/null || true
  if ! wait_gone "$grace" "$@"; then
    kill -KILL "$@" 2>/dev/null || true
    wait_gone 10 "$@" || true
  fi
}

# pids whose PID namespace is NSLINK (e.g. "pid:[4026532301]"), not zombies
pids_in_pidns() {
  local ns=$1 p
  # one `ls` for all processes: "... /proc/PID/ns/pid -> pid:[INODE]"
  for p in $(ls -l /proc/[0-9]*/ns/pid 2>/dev/null |
    awk -v ns="$ns" '$NF == ns && $(NF-1) == "->" { split($(NF-2), a, "/"); print a[3] }'); do
    proc_running "$p" && printf '%s\n' "$p"
  done
  return 0
}
# pids in network namespace NAME (ip netns pids), not zombies
pids_in_netns() {
  local p
  for p in $(ip netns pids "$1" 2>/dev/null); do
    proc_running "$p" && printf '%s\n' "$p"
  done
  return 0
}
netns_exists() { [ -e "/run/netns/$1" ]; }

# LAB_ACCEL=auto (default: KVM when /dev/kvm opens read-write, else TCG) | kvm | tcg
kvm_usable() {
  case ${LAB_ACCEL:-auto} in
    tcg) return 1 ;;
    kvm) return 0 ;;
    auto) ;;
    *) die "LAB_ACCEL must be auto, kvm or tcg (got '$LAB_ACCEL')" ;;
  esac
  [ -c /dev/kvm ] || return 1
  { exec 8<>/dev/kvm; } 2>/dev/null || return 1
  exec 8>&-
  return 0
}

# ---- hosts ----------------------------------------------------------------------------------
load_state() {
  HOSTS=()
  LAB_HA=0
  if [ -f "$STATE_FILE" ]; then
    # shellcheck disable=SC1090
    . "$STATE_FILE"
    read -r -a HOSTS <<<"${LAB_HOSTS:-}"
  fi
  if [ "$LAB_HA" = 1 ]; then
    LEASE_TTL_MS=$LAB_HA_LEASE_TTL_MS
    FORCE_GRACE_MS=$LAB_HA_FORCE_GRACE_MS
  fi
}
require_lab() {
  load_state
  [ "${#HOSTS[@]}" -gt 0 ] || die "no lab at $LAB_DIR (run: lab.sh up)"
}
host_index() {
  local i
  for i in "${!HOSTS[@]}"; do
    [ "${HOSTS[$i]}" = "$1" ] && { echo "$i"; return 0; }
  done
  return 1
}
require_host() {
  require_lab
  [ -n "${1:-}" ] || usage_die "lab.sh ${CMD:-?} HOST   (hosts: ${HOSTS[*]})"
  host_index "$1" >/dev/null || die "unknown host '$1' (lab hosts: ${HOSTS[*]})"
}
host_name_for_index() { printf 'host-%b\n' "\\$(printf '%03o' $((97 + $1)))"; }
host_letter() { echo "${1#host-}"; }
host_dir() { echo "$LAB_DIR/hosts/$1"; }
host_netns() { echo "lb-$1"; }
host_bridge_port() { echo "ve-$1"; }
host_ip() { local i; i=$(host_index "$1"); echo "$NET_PREFIX.$((11 + i))"; }
host_sock() { echo "$(host_dir "$1")/run-libvirt/libvirt-sock"; }
host_uri() { echo "qemu+unix:///system?socket=$(host_sock "$1")"; }
host_var() { local l; l=$(host_letter "$1"); echo "HOST_${l^^}"; }

# the bind mounts each host gets: <dir under host dir>:<path inside the host>
HOST_MOUNTS=(
  etc-libvirt:/etc/libvirt
  run-libvirt:/run/libvirt
  var-lib-libvirt:/var/lib/libvirt
  cache-libvirt:/var/cache/libvirt
  log-libvirt:/var/log/libvirt
  etc-lifeboat:/etc/lifeboat
  var-lib-lifeboat:/var/lib/lifeboat
)

# host_init_pid HOST -> root-namespace PID of the host's init (tini) if the host is on
host_init_pid() {
  local hd pid start
  hd=$(host_dir "$1")
  [ -f "$hd/init.pid" ] || return 1
  read -r pid start <"$hd/init.pid" || return 1
  proc_running "$pid" || return 1
  [ "$(proc_starttime "$pid" 2>/dev/null)" = "$start" ] || return 1
  echo "$pid"
}
host_is_on() { host_init_pid "$1" >/dev/null; }
host_pidns() { cat "$(host_dir "$1")/pidns" 2>/dev/null; }
host_pids() {
  local ns o
  ns=$(host_pidns "$1") || return 0
  [ -n "$ns" ] || return 0
  # The kernel recycles namespace ids: the id recorded for a host that is off may by now be the
  # namespace of a host booted later. Never take a running host's namespace for another's.
  for o in "${HOSTS[@]}"; do
    if [ "$o" != "$1" ] && [ "$(host_pidns "$o")" = "$ns" ] && host_is_on "$o"; then return 0; fi
  done
  pids_in_pidns "$ns"
  return 0
}
# an off host whose processes are all gone forgets its namespace id (see host_pids)
host_forget_pidns() {
  host_is_on "$1" && return 0
  [ -z "$(host_pids "$1")" ] && rm -f "$(host_dir "$1")/pidns"
  return 0
}
# proc_is PID NAME: the process runs program NAME (argv[0]'s basename, or the script run by
# an interpreter: lab/testbin has script stand-ins for the Lifeboat binaries)
proc_is() {
  local -a args
  { mapfile -d '' -n 2 args <"/proc/$1/cmdline"; } 2>/dev/null || return 1
  [ "${#args[@]}" -ge 1 ] || return 1
  [ "${args[0]##*/}" = "$2" ] && return 0
  case ${args[0]##*/} in
    bash | sh | dash | python3*) [ "${#args[@]}" -ge 2 ] && [ "${args[1]##*/}" = "$2" ] ;;
    *) return 1 ;;
  esac
}
# pids of a named program among the host's processes
host_prog_pids() {
  local p
  for p in $(host_pids "$1"); do
    proc_is "$p" "$2" && echo "$p"
  done
  return 0
}
# pids of the host's own agent processes (the daemon and any start guard it runs), never an
# impostor (agent-impostor) that runs in this host with another host's identity
host_agent_pids() {
  local p
  for p in $(host_prog_pids "$1" lifeboat-agent); do
    grep -qzF -- /impostor- "/proc/$p/cmdline" 2>/dev/null && continue
    echo "$p"
  done
  return 0
}

# ---- config files ---------------------------------------------------------------------------
write_libvirt_conf() {
  local hd=$1
  mkdir -p "$hd/etc-libvirt/qemu/autostart" "$hd/etc-libvirt/hooks"
  cat >"$hd/etc-libvirt/libvirtd.conf" <<'EOF'
# Written by lab/lab.sh: root-only unix sockets, no polkit (no D-Bus in the lab).
unix_sock_group = "root"
unix_sock_ro_perms = "0770"
unix_sock_rw_perms = "0770"
unix_sock_admin_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
  cat >"$hd/etc-libvirt/qemu.conf" <<'EOF'
# Written by lab/lab.sh (see docs/lab.md): qemu runs as root, libvirt touches no file ownership,
# qemu's stdout/stderr go straight to /var/log/libvirt/qemu/NAME.log (no virtlogd).
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
stdio_handler = "file"
security_driver = "none"
namespaces = [ ]
EOF
  cat >"$hd/etc-libvirt/libvirt.conf" <<'EOF'
uri_default = "qemu:///system"
EOF
  # Lifeboat's start guard: libvirt runs this before every start, incoming migration and
  # restore (it must exist when libvirtd starts). Without the agent binary: no guard.
  if [ -x "$AGENT_BIN" ]; then
    # The packaged hook itself (packaging/libvirt/qemu-hook): it refuses only
    # starts when the agent cannot run, and never fails libvirtd's `reconnect`.
    cat >"$hd/etc-libvirt/hooks/qemu" <<EOF
#!/bin/sh
# Written by lab/lab.sh: Lifeboat's start guard (docs/return.md).
LIFEBOAT_AGENT_BIN=$AGENT_BIN LIFEBOAT_AGENT_CONFIG=/etc/lifeboat/agent.toml LIFEBOAT_HOOK_DIR=/etc/libvirt/hooks \\
  exec /bin/sh $REPO_DIR/packaging/libvirt/qemu-hook "\$@"
EOF
    chmod 755 "$hd/etc-libvirt/hooks/qemu"
  else
    rm -f "$hd/etc-libvirt/hooks/qemu"
  fi
}

write_agent_conf() {
  local h=$1 hd
  hd=$(host_dir "$h")
  mkdir -p "$hd/etc-lifeboat/pki"
  cat >"$hd/etc-lifeboat/agent.toml" <<EOF
# Written by lab/lab.sh. Seen inside the host as /etc/lifeboat/agent.toml.
host_id = "$h"
boot_id_file = "$hd/boot_id"
libvirt_uri = "qemu:///system"
autostart_dir = "/etc/libvirt/qemu/autostart"
state_dir = "/var/lib/lifeboat"
metrics_listen = "$(host_ip "$h"):9465"

[controller]
$(agent_controller_lines)
server_name = "$CONTROLLER_SERVER_NAME"
ca = "/etc/lifeboat/pki/ca.pem"
cert = "/etc/lifeboat/pki/agent.pem"
key = "/etc/lifeboat/pki/agent.key"
EOF
  if [ -f "$PKI_DIR/agent-$h.pem" ]; then
    cp "$PKI_DIR/ca.pem" "$hd/etc-lifeboat/pki/ca.pem"
    cp "$PKI_DIR/agent-$h.pem" "$hd/etc-lifeboat/pki/agent.pem"
    cp "$PKI_DIR/agent-$h.key" "$hd/etc-lifeboat/pki/agent.key"
    chmod 600 "$hd/etc-lifeboat/pki/agent.key"
  fi
}

# /etc/hosts inside a host: its own name, the other lab hosts and the controller
write_hosts_file() {
  local h=$1 o
  {
    printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n' "$h"
    printf '%s\t%s lifeboat-controller\n' "$CTL_IP" "$CTL_NS"
    for o in "${HOSTS[@]}"; do
      [ "$o" = "$h" ] || printf '%s\t%s\n' "$(host_ip "$o")" "$o"
    done
  } >"$(host_dir "$h")/hosts"
}

# Whether the controller binary knows the [dashboard] section. A controller built before the
# dashboard refuses unknown sections, so the lab asks it: the probe config names files that do
# not exist, so --check-config fails either way, and only the reason tells. Asked once per run.
DASHBOARD_SUPPORTED=
DASHBOARD_WARNED=
dashboard_supported() {
  if [ -z "$DASHBOARD_SUPPORTED" ]; then
    local probe out
    probe=$(mktemp "${TMPDIR:-/tmp}/lab-dashboard-probe.XXXXXX")
    cat >"$probe" <<EOF
listen = "127.0.0.1:1"
database = "/nonexistent/lab-probe.db"
[tls]
ca = "/nonexistent/ca.pem"
cert = "/nonexistent/c.pem"
key = "/nonexistent/c.key"
[dashboard]
enabled = true
listen = "0.0.0.0:$DASHBOARD_PORT"
EOF
    out=$("$CTL_BIN" --config "$probe" --check-config 2>&1 || true)
    rm -f "$probe"
    if grep -q 'unknown field `dashboard`' <<<"$out"; then DASHBOARD_SUPPORTED=no; else DASHBOARD_SUPPORTED=yes; fi
  fi
  [ "$DASHBOARD_SUPPORTED" = yes ]
}
# the dashboard is on in this lab: LAB_DASHBOARD is not 0 and the controller knows it
dashboard_enabled() { [ "$LAB_DASHBOARD" != 0 ] && [ -x "$CTL_BIN" ] && dashboard_supported; }
# whether a written controller config turned the dashboard on (what `paths` reports)
dashboard_in_config() { grep -q '^\[dashboard\]' "${1:-$CTL_CONFIG}" 2>/dev/null; }

write_controller_conf() {
  mkdir -p "$CTL_DIR"
  cat >"$CTL_CONFIG" <<EOF
# Written by lab/lab.sh. The controller runs in network namespace $CTL_NS ($CTL_IP).
listen = "0.0.0.0:$CTL_PORT"
database = "$CTL_DB"
heartbeat_interval_ms = 1000
unreachable_after_ms = 3000
force_grace_ms = $FORCE_GRACE_MS
lease_ttl_ms = $LEASE_TTL_MS
metrics_listen = "$CTL_IP:9464"

EOF
  # set with `lab.sh controller-memory-reserve MIB`; kept across controller restarts
  if [ -f "$CTL_MEMORY_RESERVE" ]; then
    printf 'host_memory_reserve_mib = %s\n' "$(cat "$CTL_MEMORY_RESERVE")" >>"$CTL_CONFIG"
  fi
  cat >>"$CTL_CONFIG" <<EOF

[tls]
ca = "$PKI_DIR/ca.pem"
cert = "$PKI_DIR/controller.pem"
key = "$PKI_DIR/controller.key"
EOF
  if dashboard_enabled; then
    # the controller's [tls] certificate (it names the controller's IP) serves the pages too
    printf '\n[dashboard]\nenabled = true\nlisten = "0.0.0.0:%s"\n' "$DASHBOARD_PORT" >>"$CTL_CONFIG"
  elif [ "$LAB_DASHBOARD" != 0 ] && [ -z "$DASHBOARD_WARNED" ]; then
    DASHBOARD_WARNED=1
    log "the controller binary does not know [dashboard] (built before the dashboard): the lab runs without it"
  fi
  bmc_enabled || return 0
  local h
  for h in "${HOSTS[@]}"; do
    cat >>"$CTL_CONFIG" <<EOF

[bmc.$h]
driver = "redfish"
url = "$(bmc_url "$h")"
system_id = "$(bmc_system_id "$h")"
credentials_file = "$BMC_DIR/$h.cred"
ca = "$BMC_DIR/ca.pem"
power_off_timeout_s = 30
poll_interval_ms = 500
EOF
  done
}

# ---- networking -----------------------------------------------------------------------------
setup_bridge_ns() {
  netns_exists "$BR_NS" || ip netns add "$BR_NS"
  ip -n "$BR_NS" link set lo up
  if ! ip -n "$BR_NS" link show br0 >/dev/null 2>&1; then
    ip -n "$BR_NS" link add br0 type bridge stp_state 0 forward_delay 0
  fi
  ip -n "$BR_NS" link set br0 up
}
# attach_ns NS PORT IP: veth PORT (in lb-br, on br0) <-> eth0 (in NS, with IP/24)
attach_ns() {
  local ns=$1 port=$2 ip=$3
  netns_exists "$ns" || ip netns add "$ns"
  ip -n "$ns" link set lo up
  if ! ip -n "$BR_NS" link show "$port" >/dev/null 2>&1; then
    ip -n "$ns" link del eth0 2>/dev/null || true
    ip link add "$port" netns "$BR_NS" type veth peer name eth0 netns "$ns"
  fi
  ip -n "$BR_NS" link set "$port" master br0
  ip -n "$BR_NS" link set "$port" up
  ip -n "$ns" addr replace "$ip/24" dev eth0
  ip -n "$ns" link set eth0 up
}
setup_host_net() {
  local h=$1 ns
  ns=$(host_netns "$h")
  attach_ns "$ns" "$(host_bridge_port "$h")" "$(host_ip "$h")"
  # an isolated bridge inside the host for the guests' NICs (taps made by libvirtd)
  if ! ip -n "$ns" link show "$GUEST_BRIDGE" >/dev/null 2>&1; then
    ip -n "$ns" link add "$GUEST_BRIDGE" type bridge stp_state 0 forward_delay 0
  fi
  ip -n "$ns" link set "$GUEST_BRIDGE" up
}

# ---- PKI ------------------------------------------------------------------------------------
make_pki() {
  mkdir -p "$PKI_DIR"
  "$CLI_BIN" certs init "$PKI_DIR" >/dev/null ||
    die "'lifeboat certs init $PKI_DIR' failed"
  local -a sans=(--san "$CTL_IP")
  if ha_enabled; then
    local n
    for n in $(ctl_list); do sans+=(--san "$(ctl_ip "$n")"); done
  fi
  "$CLI_BIN" certs issue --ca-dir "$PKI_DIR" --controller "${sans[@]}" >/dev/null ||
    die "'lifeboat certs issue --controller' failed"
  local h r
  for h in "${HOSTS[@]}"; do
    "$CLI_BIN" certs issue --ca-dir "$PKI_DIR" --agent "$h" >/dev/null ||
      die "'lifeboat certs issue --agent $h' failed"
  done
  for r in "${CLIENT_ROLES[@]}"; do
    "$CLI_BIN" certs issue --ca-dir "$PKI_DIR" --client "$r" --role "$r" >/dev/null ||
      die "'lifeboat certs issue --client $r --role $r' failed"
  done
  local f
  for f in ca.pem controller.pem controller.key client-admin.pem client-admin.key; do
    [ -f "$PKI_DIR/$f" ] || die "the lifeboat CLI did not write $PKI_DIR/$f"
  done
}

# ---- controller -----------------------------------------------------------------------------
# the verbs for the one SQLite controller refuse in an HA lab
single_controller() {
  ! ha_enabled || die "this is an HA lab: use ctl-kill|ctl-stop|ctl-start|ctl-partition|ctl-heal N (lab.sh help)"
}
controller_pids() {
  local p
  for p in $(pids_in_netns "$CTL_NS"); do
    proc_is "$p" lifeboat-controller && echo "$p"
  done
  return 0
}
controller_listening() {
  [ -n "$(ip netns exec "$CTL_NS" ss -Hltn "sport = :$CTL_PORT" 2>/dev/null)" ]
}
controller_start() {
  if [ ! -x "$CTL_BIN" ]; then
    warn "$CTL_BIN is missing: the controller is NOT started (build it: cargo build)"
    return 0
  fi
  [ -f "$PKI_DIR/controller.pem" ] || die "no controller certificate in $PKI_DIR (the lab was brought up without the lifeboat CLI; run lab.sh up again)"
  netns_exists "$CTL_NS" || die "network namespace $CTL_NS is missing (run lab.sh up)"
  if [ -n "$(controller_pids)" ]; then
    log "controller already running (pid $(controller_pids | paste -sd' ' -))"
    return 0
  fi
  write_controller_conf
  # Logs are owner-only like everything the controller writes (they may name secrets' files).
  touch "$CTL_LOG" && chmod 600 "$CTL_LOG"
  printf '\n==== lab: controller start %s ====\n' "$(date -Is)" >>"$CTL_LOG"
  (
    cd "$CTL_DIR"
    exec setsid ip netns exec "$CTL_NS" env RUST_LOG="${RUST_LOG:-info}" "$CTL_BIN" --config "$CTL_CONFIG"
  ) </dev/null >>"$CTL_LOG" 2>&1 9>&- &
  local deadline
  deadline=$(($(now_ms) + 15000))
  while ! controller_listening; do
    if [ -z "$(controller_pids)" ] && ! proc_running $! ; then
      tail -n 20 "$CTL_LOG" >&2 || true
      die "the controller exited at start (log: $CTL_LOG)"
    fi
    [ "$(now_ms)" -ge "$deadline" ] && { tail -n 20 "$CTL_LOG" >&2 || true; die "the controller does not listen on $CTL_IP:$CTL_PORT after 15 s (log: $CTL_LOG)"; }
    sleep 0.05
  done
  log "controller listening on $CONTROLLER_URL (pid $(controller_pids | paste -sd' ' -))"
}
controller_stop() {
  local sig=$1 pids
  pids=$(controller_pids)
  if [ -z "$pids" ]; then
    log "controller not running"
    return 0
  fi
  if [ "$sig" = KILL ]; then
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    # shellcheck disable=SC2086
    wait_gone 10 $pids || die "controller pid(s) $pids still running after SIGKILL"
    log "controller killed (SIGKILL)"
  else
    # shellcheck disable=SC2086
    term_then_kill 10 $pids
    log "controller stopped"
  fi
  # The process reads as gone when its first thread has exited; its other
  # threads (one may be in an fsync) close the database lock a moment later.
  # Stopped means the lock is free: a restore right after must not be refused.
  local i
  for i in $(seq 1 100); do
    flock -n "$CTL_DB.lock" true 2>/dev/null && return 0
    [ -e "$CTL_DB.lock" ] || return 0
    sleep 0.1
  done
  log "warning: $CTL_DB.lock is still held 10 s after the controller stopped"
}

# ---- BMCs -----------------------------------------------------------------------------------
# One sushy-emulator (Redfish, fake driver) per host, all in network namespace lb-bmc
# (10.77.0.3), host N on port 8001+N, HTTPS with the lab's BMC CA ($BMC_DIR/ca.pem), basic auth
# with per-host credentials. Each emulator's one system ("HOST", power On at `up`) notifies
# lab/bmc/notify-listener.py of its changes; the listener powers the host off/on. A fault the lab
# injects into a host (host-kill) never reaches its BMC. NEVER read a BMC (an HTTP GET of the
# system) while holding the lab lock: the read may apply a pending power change whose listener
# runs `lab.sh host-kill`, which waits for the lock.
bmc_available() { [ -x "$SUSHY_BIN" ] && [ -x "$VENV_PY" ] && command -v openssl >/dev/null && command -v curl >/dev/null; }
bmc_enabled() { [ -f "$BMC_DIR/enabled" ]; }
require_bmc() {
  require_host "${1:-}"
  bmc_enabled || die "this lab has no BMCs (the sushy-tools venv $LAB_VENV was missing at 'lab.sh up', or --no-bmc)"
}
bmc_port() { local i; i=$(host_index "$1"); echo $((BMC_PORT_BASE + i)); }
bmc_url() { echo "https://$BMC_IP:$(bmc_port "$1")"; }
bmc_system_id() { cat "$BMC_DIR/$1.system_id"; }
bmc_system_url() { echo "$(bmc_url "$1")/redfish/v1/Systems/$(bmc_system_id "$1")"; }

# the lab's BMC CA and one server certificate for 10.77.0.3 (all emulators share it)
bmc_make_certs() {
  local d=$BMC_DIR
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -keyout "$d/ca.key" -out "$d/ca.pem" -subj "/O=Lifeboat lab/CN=Lifeboat lab BMC CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null || die "openssl: cannot make the BMC CA in $d"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$d/bmc.key" -out "$d/bmc.csr" -subj "/O=Lifeboat lab/CN=lab-bmc" \
    2>/dev/null || die "openssl: cannot make the BMC key in $d"
  printf '%s\n' "subjectAltName=IP:$BMC_IP,IP:127.0.0.1,DNS:lab-bmc" "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" \
    "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid" >"$d/bmc.ext"
  openssl x509 -req -in "$d/bmc.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial -days 825 \
    -extfile "$d/bmc.ext" -out "$d/bmc.pem" 2>/dev/null || die "openssl: cannot sign the BMC certificate in $d"
  chmod 600 "$d/ca.key" "$d/bmc.key"
  rm -f "$d/bmc.csr" "$d/ca.srl"
}

# sushy-emulator's config (Python) for HOST's BMC
write_bmc_conf() {
  local h=$1 disable=False
  [ -f "$BMC_DIR/$h.no-poweroff" ] && disable=True
  cat >"$BMC_DIR/$h.conf" <<EOF
# Written by lab/lab.sh: the lab BMC of $h (sushy-emulator, fake driver).
SUSHY_EMULATOR_LISTEN_IP = '$BMC_IP'
SUSHY_EMULATOR_LISTEN_PORT = $(bmc_port "$h")
SUSHY_EMULATOR_SSL_CERT = '$BMC_DIR/bmc.pem'
SUSHY_EMULATOR_SSL_KEY = '$BMC_DIR/bmc.key'
SUSHY_EMULATOR_AUTH_FILE = '$BMC_DIR/$h.htpasswd'
SUSHY_EMULATOR_STATE_DIR = '$BMC_DIR/$h.state'
SUSHY_EMULATOR_FAKE_DRIVER = True
SUSHY_EMULATOR_DISABLE_POWER_OFF = $disable
SUSHY_EMULATOR_FAKE_SYSTEMS = [{
    'uuid': '$(bmc_system_id "$h")',
    'name': '$h',
    'power_state': 'On',
    'external_notifier': True,
    'nics': [{'mac': '52:54:00:77:00:$(printf '%02x' $((11 + $(host_index "$h"))))', 'ip': '$(host_ip "$h")'}],
}]
EXTERNAL_NOTIFICATION_URL = 'http://127.0.0.1:$BMC_LISTENER_PORT/$h'
EOF
}

# Everything the BMCs need on disk: CA + certificate, per-host system id, credentials, configs.
bmc_prepare() {
  local h
  rm -rf "$BMC_DIR"
  mkdir -p "$BMC_DIR"
  chmod 700 "$BMC_DIR"
  bmc_make_certs
  for h in "${HOSTS[@]}"; do
    cat /proc/sys/kernel/random/uuid >"$BMC_DIR/$h.system_id"
    mkdir -p "$BMC_DIR/$h.state"
  done
  "$VENV_PY" "$BMC_AUTH" init "$BMC_DIR" "${HOSTS[@]}" || die "cannot write the BMC credentials ($BMC_AUTH)"
  for h in "${HOSTS[@]}"; do write_bmc_conf "$h"; done
  touch "$BMC_DIR/enabled"
}

# pids of HOST's emulator (in lb-bmc, started with its config file)
bmc_pids() {
  local p conf=$BMC_DIR/$1.conf
  for p in $(pids_in_netns "$BMC_NS"); do
    grep -qzxF -- "$conf" "/proc/$p/cmdline" 2>/dev/null && echo "$p"
  done
  return 0
}
bmc_listening() {
  [ -n "$(ip netns exec "$BMC_NS" ss -Hltn "sport = :$(bmc_port "$1")" 2>/dev/null)" ]
}
# start HOST's emulator without waiting
bmc_launch() {
  local h=$1
  [ -n "$(bmc_pids "$h")" ] && return 0
  printf '\n==== lab: BMC start %s ====\n' "$(date -Is)" >>"$BMC_DIR/$h.log"
  (
    exec setsid ip netns exec "$BMC_NS" "$SUSHY_BIN" --config "$BMC_DIR/$h.conf"
  ) </dev/null >>"$BMC_DIR/$h.log" 2>&1 9>&- &
}
# wait until HOST's emulator listens
bmc_wait() {
  local h=$1 t0 why=""
  t0=$(now_ms)
  until bmc_listening "$h"; do
    if [ "$(($(now_ms) - t0))" -ge 20000 ]; then
      why="does not listen on $(bmc_url "$h") after 20 s"
    elif [ "$(($(now_ms) - t0))" -ge 2000 ] && [ -z "$(bmc_pids "$h")" ]; then
      why="exited at start"
    fi
    if [ -n "$why" ]; then
      tail -n 20 "$BMC_DIR/$h.log" >&2 || true
      die "$h: its BMC (sushy-emulator) $why (log: $BMC_DIR/$h.log)"
    fi
    sleep 0.05
  done
}
bmc_start() {
  local h=$1
  if [ -n "$(bmc_pids "$h")" ]; then log "$h: BMC already running"; return 0; fi
  netns_exists "$BMC_NS" || die "network namespace $BMC_NS is missing (lab.sh up)"
  bmc_launch "$h"
  bmc_wait "$h"
  log "$h: BMC listening on $(bmc_url "$h")"
}
bmc_stop() {
  local h=$1 pids
  pids=$(bmc_pids "$h" | paste -sd' ' -)
  if [ -z "$pids" ]; then log "$h: BMC not running"; return 0; fi
  # shellcheck disable=SC2086
  term_then_kill 5 $pids
  log "$h: BMC stopped"
}

# the power-change listener: a process of the root namespaces, its socket in lb-bmc
# (any checkout's listener: there is one lab per machine)
listener_pids() {
  local p
  local -a args
  for p in $(grep -lzF -- /lab/bmc/notify-listener.py /proc/[0-9]*/cmdline 2>/dev/null | sed 's#/proc/\([0-9]*\)/cmdline#\1#'); do
    { mapfile -d '' -n 2 args <"/proc/$p/cmdline"; } 2>/dev/null || continue
    [ "${#args[@]}" -ge 2 ] && [ "${args[1]##*/lab/bmc/}" = notify-listener.py ] || continue
    proc_running "$p" && echo "$p"
  done
  return 0
}
listener_start() {
  [ -n "$(listener_pids)" ] && return 0
  (
    exec setsid "$VENV_PY" "$BMC_LISTENER" --netns "$BMC_NS" --port "$BMC_LISTENER_PORT" \
      --lab-dir "$LAB_DIR" --lab-sh "$LAB_SH"
  ) </dev/null >>"$BMC_DIR/listener.log" 2>&1 9>&- &
}
listener_wait() {
  local deadline
  deadline=$(($(now_ms) + 10000))
  until [ -n "$(ip netns exec "$BMC_NS" ss -Hltn "sport = :$BMC_LISTENER_PORT" 2>/dev/null)" ]; do
    [ "$(now_ms)" -ge "$deadline" ] && { tail -n 20 "$BMC_DIR/listener.log" >&2 || true; die "the BMC power listener does not listen (log: $BMC_DIR/listener.log)"; }
    sleep 0.05
  done
}
# kill the listener and whatever lab.sh it is running (its process group)
listener_stop() {
  local p pids=""
  for p in $(listener_pids); do
    kill -KILL -- "-$p" 2>/dev/null || kill -KILL "$p" 2>/dev/null || true
    pids="$pids $p"
  done
  # shellcheck disable=SC2086
  if [ -n "${pids// /}" ]; then wait_gone 10 $pids || die "the BMC listener ($pids) survives SIGKILL"; fi
  return 0
}

# curl against HOST's BMC with its configured credentials, from the controller's namespace
bmc_curl() {
  local h=$1 user pass
  shift
  user=$(sed -n 's/^username = "\(.*\)"$/\1/p' "$BMC_DIR/$h.cred")
  pass=$(sed -n 's/^password = "\(.*\)"$/\1/p' "$BMC_DIR/$h.cred")
  # credentials through --config on stdin: never on a command line
  printf 'user = "%s:%s"\n' "$user" "$pass" |
    ip netns exec "$CTL_NS" curl -sS --config - --cacert "$BMC_DIR/ca.pem" \
      --connect-timeout 5 --max-time 10 "$@"
}
# prints On, Off or unknown (the reason on stderr). Reads the system: never under the lock.
bmc_state() {
  local h=$1 out code body ps
  if ! out=$(bmc_curl "$h" -w '\n%{http_code}' "$(bmc_system_url "$h")" 2>&1); then
    log "$h: BMC $(bmc_url "$h") unreachable: $(grep -m1 '^curl:' <<<"$out" || echo "curl failed")"
    echo unknown
    return 0
  fi
  code=$(tail -n 1 <<<"$out")
  body=$(sed '$d' <<<"$out")
  if [ "$code" != 200 ]; then
    log "$h: BMC answered HTTP $code: $(tr -s ' \n' ' ' <<<"$body" | cut -c1-200)"
    echo unknown
    return 0
  fi
  ps=$(sed -n 's/.*"PowerState": *"\([A-Za-z]*\)".*/\1/p' <<<"$body" | head -n 1)
  case $ps in
    On | Off) echo "$ps" ;;
    PoweringOn | PoweringOff) echo On ;;
    *) log "$h: BMC answered without a usable PowerState ('$ps')"; echo unknown ;;
  esac
}
# bmc_power HOST on|off [--no-wait]: Reset On / ForceOff, then read until it shows (30 s)
bmc_power() {
  local h=$1 want reset out code deadline st
  case $2 in
    on) want=On reset=On ;;
    off) want=Off reset=ForceOff ;;
    *) usage_die "lab.sh bmc-power HOST on|off [--no-wait]" ;;
  esac
  out=$(bmc_curl "$h" -w '\n%{http_code}' -H 'Content-Type: application/json' \
    -d "{\"ResetType\": \"$reset\"}" "$(bmc_system_url "$h")/Actions/ComputerSystem.Reset" 2>&1) || {
    echo unknown
    die "$h: BMC $(bmc_url "$h") unreachable: $(grep -m1 '^curl:' <<<"$out" || echo "curl failed")"
  }
  code=$(tail -n 1 <<<"$out")
  case $code in
    2??) log "$h: BMC accepted $reset (HTTP $code)" ;;
    *)
      # refused (400/409 may also mean "already so"): only a read tells
      st=$(bmc_state "$h")
      echo "$st"
      [ "$st" = "$want" ] && { log "$h: BMC answered HTTP $code to $reset, and reads $st"; return 0; }
      die "$h: BMC refused $reset (HTTP $code: $(sed '$d' <<<"$out" | tr -s ' \n' ' ' | sed -n 's/.*"message": *"\([^"]*\)".*/\1/p'))"
      ;;
  esac
  if [ "${3:-}" = --no-wait ]; then return 0; fi
  # the fake driver applies the change 1-11 s later, and only when the system is read
  deadline=$(($(now_ms) + 30000))
  while :; do
    st=$(bmc_state "$h")
    [ "$st" = "$want" ] && break
    [ "$(now_ms)" -ge "$deadline" ] && { echo "$st"; die "$h: BMC still reads $st 30 s after $reset"; }
    sleep 0.3
  done
  echo "$st"
}

# ---- host power -----------------------------------------------------------------------------
# Inside the host (run by tini as the host's "boot script"): mounts, hostname, libvirtd, agent.
internal_boot() {
  local h=$1 hd m src dst
  hd=$(host_dir "$h")
  hostname "$h"
  for m in "${HOST_MOUNTS[@]}"; do
    src=$hd/${m%%:*}
    dst=${m#*:}
    mount --bind "$src" "$dst"
  done
  mount --bind "$hd/hosts" /etc/hosts
  echo "==== boot $(cat "$hd/boot_id") at $(date -Is) ===="
  libvirtd -d -p /run/libvirt/libvirtd.pid || echo "lab: libvirtd failed to start (see $hd/log-libvirt/libvirtd.log)"
  internal_agent_start "$h"
  # tini's main child must stay alive: when it exits tini exits = the host powers off.
  # The daemons above are tini's children (double fork), so tini reaps them and their qemus.
  exec sleep infinity
}

# Inside the host: start the agent, detached (setsid -f => it becomes a child of tini).
internal_agent_start() {
  local h=$1 hd
  hd=$(host_dir "$h")
  if [ ! -x "$AGENT_BIN" ]; then
    echo "lab: WARNING: $AGENT_BIN is missing: no agent on $h"
    return 0
  fi
  touch "$hd/agent.log" && chmod 600 "$hd/agent.log"
  printf '\n==== lab: agent start %s (boot %s) ====\n' "$(date -Is)" "$(cat "$hd/boot_id")" >>"$hd/agent.log"
  (cd /var/lib/lifeboat && RUST_LOG="${RUST_LOG:-info}" exec setsid -f "$AGENT_BIN" --config /etc/lifeboat/agent.toml) \
    </dev/null >>"$hd/agent.log" 2>&1 9>&-
}

# ---- impostor agents ------------------------------------------------------------------------
# `agent-impostor HOST FROM start|stop`: a second lifeboat-agent that presents HOST's certificate
# and host id, run inside host FROM (so from FROM's address, against FROM's own libvirtd), as a
# host cloned with HOST's agent config would. It has its own state directory (a second machine
# has its own disk): it never writes leases into HOST's or FROM's agent state.
# Its files: <FROM's hostdir>/impostor-HOST/{agent.toml,pki/,state/,agent.log}.
impostor_dir() { echo "$(host_dir "$2")/impostor-$1"; }
impostor_pids() {
  local p conf
  conf="$(impostor_dir "$1" "$2")/agent.toml"
  for p in $(host_prog_pids "$2" lifeboat-agent); do
    grep -qzxF -- "$conf" "/proc/$p/cmdline" 2>/dev/null && echo "$p"
  done
  return 0
}
# Inside FROM: start the impostor detached (setsid -f => a child of FROM's tini).
internal_impostor_start() {
  local d
  d=$(impostor_dir "$1" "$2")
  printf '\n==== lab: impostor of %s in %s start %s ====\n' "$1" "$2" "$(date -Is)" >>"$d/agent.log"
  (cd "$d/state" && RUST_LOG="${RUST_LOG:-info}" exec setsid -f "$AGENT_BIN" --config "$d/agent.toml") \
    </dev/null >>"$d/agent.log" 2>&1 9>&-
}
impostor_start() {
  local h=$1 from=$2 d pid deadline
  [ "$h" != "$from" ] || die "an impostor of $h must run in another host"
  pid=$(host_init_pid "$from") || die "$from is off (lab.sh host-boot $from)"
  [ -x "$AGENT_BIN" ] || die "$AGENT_BIN is missing (cargo build)"
  [ -f "$PKI_DIR/agent-$h.pem" ] || die "no agent certificate for $h in $PKI_DIR (lab brought up without the lifeboat CLI)"
  if [ -n "$(impostor_pids "$h" "$from")" ]; then
    log "an impostor of $h already runs in $from"
    return 0
  fi
  d=$(impostor_dir "$h" "$from")
  mkdir -p "$d/pki" "$d/state"
  cp "$PKI_DIR/ca.pem" "$d/pki/ca.pem"
  cp "$PKI_DIR/agent-$h.pem" "$d/pki/agent.pem"
  cp "$PKI_DIR/agent-$h.key" "$d/pki/agent.key"
  chmod 600 "$d/pki/agent.key"
  # HOST's agent.toml, but with its own state and copies of HOST's certificate, and no metrics
  # listener (HOST's metrics address does not exist in FROM's network namespace)
  cat >"$d/agent.toml" <<EOF
# Written by lab/lab.sh agent-impostor: $h's identity, running inside $from.
host_id = "$h"
boot_id_file = "$(host_dir "$h")/boot_id"
libvirt_uri = "qemu:///system"
autostart_dir = "/etc/libvirt/qemu/autostart"
state_dir = "$d/state"

[controller]
$(agent_controller_lines)
server_name = "$CONTROLLER_SERVER_NAME"
ca = "$d/pki/ca.pem"
cert = "$d/pki/agent.pem"
key = "$d/pki/agent.key"
EOF
  nsenter -t "$pid" -n -m -p -u -- "$LAB_SH" _impostor-start "$h" "$from" 9>&-
  deadline=$(($(now_ms) + 5000))
  until [ -n "$(impostor_pids "$h" "$from")" ]; do
    [ "$(now_ms)" -ge "$deadline" ] && die "the impostor of $h did not start in $from (log: $d/agent.log)"
    sleep 0.02
  done
  log "impostor of $h started in $from ($(host_ip "$from"), pid $(impostor_pids "$h" "$from" | paste -sd' ' -), log $d/agent.log)"
}
impostor_stop() {
  local pids
  pids=$(impostor_pids "$1" "$2" | paste -sd' ' -)
  if [ -z "$pids" ]; then
    log "no impostor of $1 runs in $2"
    return 0
  fi
  # shellcheck disable=SC2086
  term_then_kill 10 $pids
  log "impostor of $1 in $2 stopped"
}

# find the tini of HOST that we just launched (root-namespace pid)
find_host_tini() {
  local h=$1 f p
  local -a args
  for f in $(grep -lzxF -- "$h" /proc/[0-9]*/cmdline 2>/dev/null); do
    p=${f#/proc/}
    p=${p%/cmdline}
    { mapfile -d '' args <"$f"; } 2>/dev/null || continue
    [ "${args[*]}" = "tini -s -- $LAB_SH _boot $h" ] || continue
    proc_running "$p" || continue
    # tini is pid 1 of its own PID namespace
    [ "$(readlink "/proc/$p/ns/pid" 2>/dev/null)" != "$(readlink /proc/self/ns/pid)" ] || continue
    echo "$p"
    return 0
  done
  return 1
}

# Power a host on without waiting for its libvirtd.
host_launch() {
  local h=$1 hd m pid deadline
  hd=$(host_dir "$h")
  if host_is_on "$h"; then
    log "$h is already on"
    return 0
  fi
  # leftovers of the previous power cycle must be gone before we boot
  host_reap_leftovers "$h"
  setup_bridge_ns
  setup_host_net "$h"
  for m in "${HOST_MOUNTS[@]}"; do
    mkdir -p "$hd/${m%%:*}" "${m#*:}"
  done
  write_hosts_file "$h"
  # a fresh boot: new boot id, empty /run/libvirt (so libvirt autostart fires again)
  find "$hd/run-libvirt" -mindepth 1 -delete
  cat /proc/sys/kernel/random/uuid >"$hd/boot_id.tmp"
  mv "$hd/boot_id.tmp" "$hd/boot_id"
  # seed the qemu capabilities cache (saves the ~1.5 s probe per libvirtd start)
  if [ -f "$CAPS_CACHE/.saved" ] && [ ! -d "$hd/cache-libvirt/qemu/capabilities" ]; then
    cp -a "$CAPS_CACHE/qemu" "$hd/cache-libvirt/"
  fi
  rm -f "$hd/init.pid" "$hd/pidns"
  (
    exec setsid ip netns exec "$(host_netns "$h")" \
      unshare --pid --fork --kill-child --mount-proc --mount --uts --propagation private \
      tini -s -- "$LAB_SH" _boot "$h"
  ) </dev/null >>"$hd/boot.log" 2>&1 9>&- &
  deadline=$(($(now_ms) + 10000))
  until pid=$(find_host_tini "$h"); do
    [ "$(now_ms)" -ge "$deadline" ] && { tail -n 20 "$hd/boot.log" >&2 || true; die "$h: its init (tini) did not appear within 10 s (log: $hd/boot.log)"; }
    sleep 0.02
  done
  echo "$pid $(proc_starttime "$pid")" >"$hd/init.pid"
  readlink "/proc/$pid/ns/pid" >"$hd/pidns"
}

# Wait until the host's libvirtd answers on its socket.
host_wait_libvirtd() {
  local h=$1 hd deadline
  hd=$(host_dir "$h")
  deadline=$(($(now_ms) + ${LAB_LIBVIRTD_TIMEOUT:-60} * 1000))
  while :; do
    if [ -S "$(host_sock "$h")" ] &&
      timeout 20 virsh -q -c "$(host_uri "$h")" version >/dev/null 2>&1; then
      return 0
    fi
    host_is_on "$h" || die "$h powered off while booting (log: $hd/boot.log)"
    if [ "$(now_ms)" -ge "$deadline" ]; then
      tail -n 20 "$hd/log-libvirt/libvirtd.log" >&2 2>/dev/null || true
      die "$h: libvirtd does not answer on $(host_sock "$h") (logs: $hd/boot.log $hd/log-libvirt/libvirtd.log)"
    fi
    sleep 0.05
  done
}

# Keep a warmed capabilities cache for later boots: save the host's cache when there is none
# yet, or when its libvirtd re-probed qemu (files newer than the last save, e.g. after an upgrade).
save_caps_cache() {
  local h=$1 hd
  hd=$(host_dir "$h")
  ls "$hd/cache-libvirt/qemu/capabilities/"*.xml >/dev/null 2>&1 || return 0
  if [ -f "$CAPS_CACHE/.saved" ] &&
    [ -z "$(find "$hd/cache-libvirt/qemu/capabilities" -name '*.xml' -newer "$CAPS_CACHE/.saved")" ]; then
    return 0
  fi
  rm -rf "$CAPS_CACHE.tmp"
  mkdir -p "$CAPS_CACHE.tmp"
  cp -a "$hd/cache-libvirt/qemu" "$CAPS_CACHE.tmp/"
  touch "$CAPS_CACHE.tmp/.saved"
  rm -rf "$CAPS_CACHE"
  mv "$CAPS_CACHE.tmp" "$CAPS_CACHE"
}

host_boot() {
  local h=$1 t0
  t0=$(now_ms)
  if host_is_on "$h"; then
    log "$h is already on"
    return 0
  fi
  host_launch "$h"
  host_wait_libvirtd "$h"
  save_caps_cache "$h"
  log "$h booted in $(($(now_ms) - t0)) ms (boot id $(cat "$(host_dir "$h")/boot_id"))"
}

# Kill every process of the host's PID namespace that is still running (after its init died).
host_reap_leftovers() {
  local h=$1 pids
  pids=$(host_pids "$h" | tr '\n' ' ')
  if [ -n "${pids// /}" ]; then
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    # shellcheck disable=SC2086
    wait_gone 10 $pids || die "$h: processes $pids survive SIGKILL"
  fi
  host_forget_pidns "$h"
}

host_kill() {
  local h=$1 pid
  if ! pid=$(host_init_pid "$h"); then
    host_reap_leftovers "$h"
    log "$h is already off"
    return 0
  fi
  # SIGKILL to a PID namespace's init = the kernel kills every process in it at once.
  kill -KILL "$pid" 2>/dev/null || true
  wait_gone 10 "$pid" || die "$h: init pid $pid survives SIGKILL"
  # wait for the rest of the namespace (libvirtd, agent, qemus) to be gone
  local deadline
  deadline=$(($(now_ms) + 10000))
  while [ -n "$(host_pids "$h")" ]; do
    if [ "$(now_ms)" -ge "$deadline" ]; then host_reap_leftovers "$h"; break; fi
    sleep 0.02
  done
  host_forget_pidns "$h"
  log "$h powered off (killed)"
}

# ---- guests ---------------------------------------------------------------------------------
# registry of lab guests: NAME UUID MAC (a name keeps its UUID/MAC when defined on another host)
guest_lookup() {
  [ -f "$GUESTS_FILE" ] || return 1
  awk -v n="$1" '$1 == n { print $2, $3; found=1; exit } END { exit !found }' "$GUESTS_FILE"
}
guest_mac_for() {
  local h
  h=$(printf '%s' "$1" | md5sum)
  echo "52:54:00:${h:0:2}:${h:2:2}:${h:4:2}"
}

guest_xml() {
  local name=$1 uuid=$2 mac=$3 disk=$4 dtype=$5
  cat <<EOF
<domain type='$dtype'>
  <name>$name</name>
  <uuid>$uuid</uuid>
  <description>Lifeboat lab guest (lab/lab.sh)</description>
  <memory unit='MiB'>32</memory>
  <currentMemory unit='MiB'>32</currentMemory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <loader readonly='yes' type='rom'>/usr/share/qemu/qboot.rom</loader>
    <boot dev='hd'/>
  </os>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='$disk'/>
      <target dev='vda' bus='virtio'/>
      <shareable/>
    </disk>
    <interface type='bridge'>
      <mac address='$mac'/>
      <source bridge='$GUEST_BRIDGE'/>
      <model type='virtio'/>
      <rom enabled='no'/>
    </interface>
    <video>
      <model type='none'/>
    </video>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}

# define_guest HOST NAME START(0/1) AUTOSTART(0/1) LOCAL(0/1) -> prints "NAME UUID"
define_guest() {
  local h=$1 name=$2 start=$3 autostart=$4 local_disk=$5 uuid mac disk hostdisk dtype uri xmlf
  host_is_on "$h" || die "$h is off (lab.sh host-boot $h)"
  [[ "$name" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "bad guest name '$name'"
  if read -r uuid mac < <(guest_lookup "$name"); then
    :
  else
    uuid=$(cat /proc/sys/kernel/random/uuid)
    mac=$(guest_mac_for "$name")
    printf '%s %s %s\n' "$name" "$uuid" "$mac" >>"$GUESTS_FILE"
  fi
  if [ "$local_disk" = 1 ]; then
    # /var/lib/libvirt is per host: the same path on another host is another (or no) file
    disk=/var/lib/libvirt/images/$name.img
    hostdisk=$(host_dir "$h")/var-lib-libvirt/images/$name.img
  else
    disk=$SHARED_DIR/$name.img
    hostdisk=$disk
  fi
  mkdir -p "$(dirname "$hostdisk")"
  [ -f "$hostdisk" ] || truncate -s 1M "$hostdisk"
  if kvm_usable; then dtype=kvm; else dtype=qemu; fi
  mkdir -p "$LAB_DIR/xml"
  xmlf=$LAB_DIR/xml/$name.xml
  guest_xml "$name" "$uuid" "$mac" "$disk" "$dtype" >"$xmlf.$h"
  mv "$xmlf.$h" "$xmlf"
  uri=$(host_uri "$h")
  virsh -q -c "$uri" define "$xmlf" >/dev/null || die "$h: virsh define $name failed"
  if [ "$autostart" = 1 ]; then
    virsh -q -c "$uri" autostart "$name" >/dev/null || die "$h: virsh autostart $name failed"
  else
    virsh -q -c "$uri" autostart --disable "$name" >/dev/null || die "$h: virsh autostart --disable $name failed"
  fi
  if [ "$start" = 1 ]; then
    local st
    st=$(virsh -q -c "$uri" domstate "$name" 2>/dev/null || true)
    if [ "$st" != running ]; then
      virsh -q -c "$uri" start "$name" >/dev/null || die "$h: virsh start $name failed (log: $(host_dir "$h")/log-libvirt/qemu/$name.log)"
    fi
  fi
  printf '%s %s\n' "$name" "$uuid"
}

# count the running qemu processes (all hosts) whose command line has "-uuid UUID"
count_copies() {
  local uuid=${1,,} f p n=0 i
  local -a args
  for f in $(grep -lzxF -- "$uuid" /proc/[0-9]*/cmdline 2>/dev/null); do
    p=${f#/proc/}
    p=${p%/cmdline}
    proc_running "$p" || continue
    { mapfile -d '' args <"$f"; } 2>/dev/null || continue
    for ((i = 0; i + 1 < ${#args[@]}; i++)); do
      if [ "${args[$i]}" = -uuid ] && [ "${args[$((i + 1))]}" = "$uuid" ]; then
        n=$((n + 1))
        break
      fi
    done
  done
  echo "$n"
}

# copies_all -> "UUID COUNT HOSTS" for every UUID with a running qemu process (one pass over
# /proc; HOSTS comma-separated, "?" for a qemu outside the lab's hosts), sorted by UUID
copies_all() {
  running_guests | awk '{ n[$1]++; h[$1] = (n[$1] > 1) ? h[$1] "," $2 : $2 } END { for (u in n) print u, n[u], h[u] }' | sort
}

# ---- up / down ------------------------------------------------------------------------------
# refuse to wipe a directory that is not a lab (LAB_DIR=/ would be a disaster)
check_lab_dir() {
  case $LAB_DIR in
    / | /bin | /boot | /dev | /etc | /home | /lib | /opt | /proc | /root | /run | /sbin | /sys | /tmp | /usr | /var | /var/lib | /work)
      die "LAB_DIR=$LAB_DIR: refusing to use a system directory as the lab directory" ;;
  esac
  if [ -d "$LAB_DIR" ] && [ -n "$(ls -A "$LAB_DIR" 2>/dev/null)" ] && [ ! -e "$LAB_DIR/.lifeboat-lab" ] && [ ! -e "$STATE_FILE" ]; then
    die "LAB_DIR=$LAB_DIR is not empty and is not a lab directory (no .lifeboat-lab marker): refusing to wipe it"
  fi
}

lab_down() {
  local ns p pids h t0
  t0=$(now_ms)
  load_state
  # 0. the BMC power listener first (with any lab.sh it runs): nothing may boot a host any more
  listener_stop
  # 0b. HA lab: the controllers' supervisors, so that none starts its controller again
  ha_down_supervisors
  # 1. power every host off (SIGKILL to each PID namespace init)
  for h in "${HOSTS[@]}"; do
    if p=$(host_init_pid "$h"); then kill -KILL "$p" 2>/dev/null || true; fi
  done
  # 2. the controller: a short SIGTERM grace, then SIGKILL
  pids=$(controller_pids | tr '\n' ' ')
  # shellcheck disable=SC2086
  [ -n "${pids// /}" ] && term_then_kill 3 $pids
  # 3. every process still in a lab network namespace (hosts, controller, clients, tests)
  local nslist
  nslist=$(ip netns list 2>/dev/null | awk '{print $1}' | grep '^lb-' || true)
  pids=""
  for ns in $nslist; do pids="$pids $(pids_in_netns "$ns" | tr '\n' ' ')"; done
  for h in "${HOSTS[@]}"; do pids="$pids $(host_pids "$h" | tr '\n' ' ')"; done
  # 4. safety net: any qemu still using a file of this lab
  for p in $(grep -lzF -- "$LAB_DIR/" /proc/[0-9]*/cmdline 2>/dev/null | sed 's#/proc/\([0-9]*\)/cmdline#\1#'); do
    proc_is "$p" qemu-system-x86_64 && pids="$pids $p"
  done
  pids=$(echo "$pids" | tr ' ' '\n' | grep -v "^$$\$" | sort -un | tr '\n' ' ')
  if [ -n "${pids// /}" ]; then
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    # shellcheck disable=SC2086
    wait_gone 15 $pids || die "processes survive SIGKILL: $pids"
  fi
  # 4b. the controller directory's own filesystem (up --controller-fs-mib), now that nothing uses it
  if mountpoint -q "$CTL_DIR" 2>/dev/null; then
    umount "$CTL_DIR" || umount -l "$CTL_DIR" || die "cannot unmount $CTL_DIR"
  fi
  # 5. the network namespaces (their veths and bridges go with them)
  for ns in $nslist; do ip netns del "$ns" 2>/dev/null || true; done
  for ns in $nslist; do
    netns_exists "$ns" && die "could not delete network namespace $ns"
  done
  # iproute2 made /run/netns a mount point: undo it when no namespace is left in it
  if mountpoint -q /run/netns && [ -z "$(ls -A /run/netns 2>/dev/null)" ]; then
    umount /run/netns 2>/dev/null || true
  fi
  rm -f "$LAB_DIR"/hosts/*/init.pid 2>/dev/null || true
  log "down in $(($(now_ms) - t0)) ms"
}

lab_up() {
  local nhosts=3 nguests=2 with_lifeboat=1 with_bmc=1 ctl_fs_mib=0 ha=${LAB_HA:-0} nctl=${LAB_CONTROLLERS:-3}
  local up_usage="lab.sh up [--hosts N] [--guests N] [--no-lifeboat] [--no-bmc] [--controller-fs-mib N] [--ha [--controllers N]]"
  while [ $# -gt 0 ]; do
    case $1 in
      --hosts) [ $# -ge 2 ] || usage_die "$up_usage"; nhosts=$2; shift 2 ;;
      --hosts=*) nhosts=${1#*=}; shift ;;
      --guests) [ $# -ge 2 ] || usage_die "$up_usage"; nguests=$2; shift 2 ;;
      --guests=*) nguests=${1#*=}; shift ;;
      --no-lifeboat) with_lifeboat=0; shift ;;
      --no-bmc) with_bmc=0; shift ;;
      --controller-fs-mib) [ $# -ge 2 ] || usage_die "$up_usage"; ctl_fs_mib=$2; shift 2 ;;
      --controller-fs-mib=*) ctl_fs_mib=${1#*=}; shift ;;
      --ha) ha=1; shift ;;
      --controllers) [ $# -ge 2 ] || usage_die "$up_usage"; nctl=$2; shift 2 ;;
      --controllers=*) nctl=${1#*=}; shift ;;
      *) usage_die "$up_usage   (unknown: $1)" ;;
    esac
  done
  [[ "$nhosts" =~ ^[0-9]+$ ]] && [ "$nhosts" -ge 1 ] && [ "$nhosts" -le 26 ] || die "--hosts must be 1..26"
  [[ "$nguests" =~ ^[0-9]+$ ]] && [ "$nguests" -le 50 ] || die "--guests must be 0..50"
  [[ "$ctl_fs_mib" =~ ^[0-9]+$ ]] && { [ "$ctl_fs_mib" = 0 ] || { [ "$ctl_fs_mib" -ge 8 ] && [ "$ctl_fs_mib" -le 4096 ]; }; } \
    || die "--controller-fs-mib must be 8..4096 (MiB)"
  [ "$ha" = 0 ] || [ "$ha" = 1 ] || die "LAB_HA must be 0 or 1 (got '$ha')"
  [[ "$nctl" =~ ^[1-3]$ ]] || die "--controllers must be 1..3"
  for b in libvirtd virsh qemu-system-x86_64 tini unshare nsenter ip; do
    command -v "$b" >/dev/null || die "$b not found: run scripts/install-deps.sh"
  done
  [ -f /usr/share/qemu/qboot.rom ] || die "/usr/share/qemu/qboot.rom missing (package qemu-system-data): run scripts/install-deps.sh"
  getent passwd libvirt-qemu >/dev/null || die "user libvirt-qemu missing (libvirtd needs it): run scripts/install-deps.sh"

  local t0 i h
  t0=$(now_ms)
  check_lab_dir
  lab_down
  # fresh state; keep only the warmed qemu capabilities cache
  mkdir -p "$LAB_DIR"
  touch "$LAB_DIR/.lifeboat-lab"
  find "$LAB_DIR" -mindepth 1 -maxdepth 1 ! -name "$(basename "$CAPS_CACHE")" -exec rm -rf {} +
  mkdir -p "$SHARED_DIR" "$CTL_DIR" "$LAB_DIR/hosts"
  if [ "$ctl_fs_mib" != 0 ]; then
    # A small filesystem of its own for the controller's directory (database,
    # WAL, config, log), so a test can fill it: a full disk under the controller.
    mount -t tmpfs -o "size=${ctl_fs_mib}m,mode=0755" lifeboat-lab-controller "$CTL_DIR" \
      || die "cannot mount a ${ctl_fs_mib} MiB tmpfs on $CTL_DIR"
    log "controller directory on its own ${ctl_fs_mib} MiB filesystem: $CTL_DIR"
  fi
  # The hosts share one kernel and one root filesystem: a storage marker is what
  # tells the agents that SHARED_DIR is shared storage (per-host dirs stay "local").
  cat /proc/sys/kernel/random/uuid >"$SHARED_DIR/.lifeboat-storage-id"

  HOSTS=()
  for ((i = 0; i < nhosts; i++)); do HOSTS+=("$(host_name_for_index "$i")"); done
  local kvm=0
  kvm_usable && kvm=1
  cat >"$STATE_FILE" <<EOF
LAB_HOSTS="${HOSTS[*]}"
LAB_GUESTS_PER_HOST=$nguests
LAB_KVM=$kvm
LAB_CREATED="$(date -Is)"
LAB_HA=$ha
EOF
  LAB_HA=$ha
  # A teardown of an earlier HA lab (load_state) may have set the HA timings:
  # a single-controller lab always starts from its own.
  LEASE_TTL_MS=${LAB_LEASE_TTL_MS:-4000}
  FORCE_GRACE_MS=${LAB_FORCE_GRACE_MS:-5000}
  if [ "$ha" = 1 ]; then
    LAB_CONTROLLERS=$nctl
    LEASE_TTL_MS=${LAB_LEASE_TTL_MS:-$HA_LEASE_TTL_MS_DEFAULT}
    FORCE_GRACE_MS=${LAB_FORCE_GRACE_MS:-$HA_FORCE_GRACE_MS_DEFAULT}
    cat >>"$STATE_FILE" <<EOF
LAB_CONTROLLERS=$nctl
LAB_ETCD_TLS=${LAB_ETCD_TLS:-1}
LAB_HA_LEASE_TTL_MS=$LEASE_TTL_MS
LAB_HA_FORCE_GRACE_MS=$FORCE_GRACE_MS
EOF
  fi
  [ "$kvm" = 1 ] || warn "guests run under TCG (<domain type='qemu'>): /dev/kvm is not usable or LAB_ACCEL=tcg"

  # networking
  setup_bridge_ns
  attach_ns "$CTL_NS" ve-ctl "$CTL_IP"
  for h in "${HOSTS[@]}"; do setup_host_net "$h"; done
  if ha_enabled; then
    for i in $(seq 1 "$ETCD_MEMBERS"); do attach_ns "$(etcd_ns "$i")" "ve-etcd$i" "$(etcd_ip "$i")"; done
    for i in $(ctl_list); do attach_ns "$(ctl_ns "$i")" "ve-ctl$i" "$(ctl_ip "$i")"; done
  fi

  # BMCs: files now (the controller's config names them), emulators start in the background
  if [ "$with_bmc" = 0 ]; then
    log "--no-bmc: no BMCs"
  elif bmc_available; then
    attach_ns "$BMC_NS" ve-bmc "$BMC_IP"
    bmc_prepare
    listener_start
    for h in "${HOSTS[@]}"; do bmc_launch "$h"; done
  else
    warn "NO BMCs: sushy-tools is not installed in $LAB_VENV (or openssl/curl is missing): the lab runs without out-of-band power control, so the controller cannot fence any host. Install it: sudo scripts/install-deps.sh"
  fi

  # certificates, controller
  local have_cli=0
  if [ "$with_lifeboat" = 0 ]; then
    log "--no-lifeboat: no certificates, controller or agents"
  elif [ -x "$CLI_BIN" ]; then
    have_cli=1
    make_pki
    log "certificates in $PKI_DIR"
  else
    warn "$CLI_BIN is missing: NO certificates, so NO controller and NO agents (build: cargo build)"
  fi
  write_controller_conf
  for h in "${HOSTS[@]}"; do
    write_libvirt_conf "$(host_dir "$h")"
    write_agent_conf "$h"
    if [ "$have_cli" = 0 ]; then
      # without certificates an agent can't run: make the boot skip it
      touch "$(host_dir "$h")/no-agent"
    fi
  done
  if [ "$have_cli" = 1 ] && ha_enabled; then
    ha_up
  elif [ "$have_cli" = 1 ]; then
    # A start never creates a database (a typo in its path would serve no
    # hosts): a new lab creates its empty one here, once.
    if [ -x "$CTL_BIN" ] && [ ! -e "$CTL_DB" ]; then
      "$CTL_BIN" --config "$CTL_CONFIG" init >/dev/null || die "'lifeboat-controller init' could not create $CTL_DB"
    fi
    controller_start
  fi
  [ "$have_cli" = 1 ] && [ ! -x "$AGENT_BIN" ] && warn "$AGENT_BIN is missing: the hosts run NO agent"

  # hosts: launch all, then wait for all. Without a warmed qemu capabilities cache the first
  # host probes qemu alone (~1.5 s) and the others start from its cache: on 2 cores that is
  # faster than 3 parallel probes.
  local -a rest=("${HOSTS[@]}")
  if [ ! -f "$CAPS_CACHE/.saved" ]; then
    log "no warmed qemu capabilities cache yet: ${HOSTS[0]} probes qemu first"
    host_launch "${HOSTS[0]}"
    host_wait_libvirtd "${HOSTS[0]}"
    save_caps_cache "${HOSTS[0]}"
    rest=("${HOSTS[@]:1}")
  fi
  for h in "${rest[@]}"; do host_launch "$h"; done
  for h in "${rest[@]}"; do host_wait_libvirtd "$h"; done
  save_caps_cache "${HOSTS[0]}"
  log "${#HOSTS[@]} hosts up, libvirtd answering ($(($(now_ms) - t0)) ms)"

  # guests, all defined and started in parallel
  local -a jobs=()
  local letter g j fail=0
  for h in "${HOSTS[@]}"; do
    letter=$(host_letter "$h")
    for ((g = 1; g <= nguests; g++)); do
      define_guest "$h" "vm-$letter$g" 1 1 0 >/dev/null 9>&- &
      jobs+=("$!")
    done
  done
  for j in "${jobs[@]}"; do wait "$j" || fail=1; done
  [ "$fail" = 0 ] || die "defining/starting guests failed (see above)"
  if bmc_enabled; then
    listener_wait
    for h in "${HOSTS[@]}"; do bmc_wait "$h"; done
    log "${#HOSTS[@]} BMCs listening on $BMC_IP:$BMC_PORT_BASE.. ($(($(now_ms) - t0)) ms)"
  fi
  log "lab up in $(($(now_ms) - t0)) ms: ${#HOSTS[@]} hosts, $((nguests * ${#HOSTS[@]})) guests"
  print_guests
}

# running_guests -> "UUID HOST" for every running qemu process of the lab (from /proc, so it
# does not depend on libvirtd answering)
running_guests() {
  local h ns f p i
  local -A host_of_ns=()
  local -a args
  for h in "${HOSTS[@]}"; do
    ns=$(host_pidns "$h" 2>/dev/null) || continue
    [ -n "$ns" ] && host_of_ns[$ns]=$h
  done
  for f in $(grep -lzxF -- -uuid /proc/[0-9]*/cmdline 2>/dev/null); do
    p=${f#/proc/}
    p=${p%/cmdline}
    proc_running "$p" || continue
    { mapfile -d '' args <"$f"; } 2>/dev/null || continue
    ns=$(readlink "/proc/$p/ns/pid" 2>/dev/null) || continue
    for ((i = 0; i + 1 < ${#args[@]}; i++)); do
      if [ "${args[$i]}" = -uuid ]; then
        printf '%s %s\n' "${args[$((i + 1))]}" "${host_of_ns[$ns]:-?}"
        break
      fi
    done
  done
}

print_guests() {
  # NAME UUID HOSTS-where-a-qemu-of-it-runs (comma separated, "-" when none)
  [ -f "$GUESTS_FILE" ] || return 0
  local name uuid mac running where
  running=$(running_guests)
  while read -r name uuid mac; do
    where=$(awk -v u="$uuid" '$1 == u { print $2 }' <<<"$running" | sort | paste -sd, -)
    printf '%s %s %s\n' "$name" "$uuid" "${where:--}"
  done < <(sort -k1,1 -V "$GUESTS_FILE")
}

print_paths() {
  load_state
  cat <<EOF
LAB_DIR=$LAB_DIR
LAB_SH=$LAB_SH
LIFEBOAT_BIN_DIR=$LIFEBOAT_BIN_DIR
SHARED_DIR=$SHARED_DIR
PKI_DIR=$PKI_DIR
CA_CERT=$PKI_DIR/ca.pem
GUESTS_FILE=$GUESTS_FILE
CONTROLLER_NETNS=$CTL_NS
CONTROLLER_IP=$CTL_IP
CONTROLLER_URL=$CONTROLLER_URL
CONTROLLER_SERVER_NAME=$CONTROLLER_SERVER_NAME
CONTROLLER_DIR=$CTL_DIR
CONTROLLER_CONFIG=$CTL_CONFIG
CONTROLLER_DB=$CTL_DB
CONTROLLER_LOG=$CTL_LOG
CONTROLLER_METRICS_URL=http://$CTL_IP:9464/metrics
EOF
  # an HA lab has no controller at $CTL_IP: it prints CTL_<N>_DASHBOARD_URL instead (ha_paths)
  if ! ha_enabled && dashboard_in_config; then echo "CONTROLLER_DASHBOARD_URL=https://$CTL_IP:$DASHBOARD_PORT"; fi
  local r h V hd
  for r in "${CLIENT_ROLES[@]}"; do
    echo "CLIENT_${r^^}_CERT=$PKI_DIR/client-$r.pem"
    echo "CLIENT_${r^^}_KEY=$PKI_DIR/client-$r.key"
  done
  echo "HOSTS=$(IFS=,; echo "${HOSTS[*]}")"
  if ha_enabled; then ha_paths; fi
  if bmc_enabled; then
    cat <<EOF
BMC_ENABLED=1
BMC_NETNS=$BMC_NS
BMC_IP=$BMC_IP
BMC_DIR=$BMC_DIR
BMC_CA=$BMC_DIR/ca.pem
BMC_LISTENER_LOG=$BMC_DIR/listener.log
LAB_VENV=$LAB_VENV
FORCE_GRACE_MS=$FORCE_GRACE_MS
LEASE_TTL_MS=$LEASE_TTL_MS
EOF
  else
    echo "BMC_ENABLED=0"
  fi
  for h in "${HOSTS[@]}"; do
    V=$(host_var "$h")
    hd=$(host_dir "$h")
    cat <<EOF
${V}_NAME=$h
${V}_DIR=$hd
${V}_IP=$(host_ip "$h")
${V}_NETNS=$(host_netns "$h")
${V}_LIBVIRT_URI=$(host_uri "$h")
${V}_LIBVIRT_SOCK=$(host_sock "$h")
${V}_BOOT_ID_FILE=$hd/boot_id
${V}_AGENT_CONFIG=$hd/etc-lifeboat/agent.toml
${V}_AGENT_STATE_DIR=$hd/var-lib-lifeboat
${V}_AGENT_LOG=$hd/agent.log
${V}_LIBVIRTD_LOG=$hd/log-libvirt/libvirtd.log
${V}_QEMU_LOG_DIR=$hd/log-libvirt/qemu
${V}_AUTOSTART_DIR=$hd/etc-libvirt/qemu/autostart
${V}_LOCAL_DISK_DIR=$hd/var-lib-libvirt/images
${V}_BOOT_LOG=$hd/boot.log
EOF
    if bmc_enabled; then
      cat <<EOF
${V}_BMC_URL=$(bmc_url "$h")
${V}_BMC_PORT=$(bmc_port "$h")
${V}_BMC_SYSTEM_ID=$(bmc_system_id "$h")
${V}_BMC_SYSTEM_URL=$(bmc_system_url "$h")
${V}_BMC_CRED=$BMC_DIR/$h.cred
${V}_BMC_LOG=$BMC_DIR/$h.log
EOF
    fi
  done
}

print_status() {
  load_state
  local h st agent lv
  if [ "${#HOSTS[@]}" -eq 0 ]; then echo "lab: down (no lab at $LAB_DIR)"; return 0; fi
  if ha_enabled; then
    ha_status
  else
    if [ -n "$(controller_pids 2>/dev/null)" ]; then st=running; else st=stopped; fi
    if ip -n "$BR_NS" -o link show ve-ctl 2>/dev/null | grep -q '<[^>]*[<,]UP[,>]'; then
      echo "controller $st net=connected"
    else
      echo "controller $st net=partitioned"
    fi
  fi
  for h in "${HOSTS[@]}"; do
    if host_is_on "$h"; then
      if [ -n "$(host_agent_pids "$h")" ]; then agent=running; else agent=stopped; fi
      if [ -n "$(host_prog_pids "$h" libvirtd)" ]; then lv=running; else lv=stopped; fi
      if ip -n "$BR_NS" -o link show "$(host_bridge_port "$h")" 2>/dev/null | grep -q '<[^>]*[<,]UP[,>]'; then
        net=connected
      else
        net=partitioned
      fi
      echo "$h on agent=$agent libvirtd=$lv net=$net boot_id=$(cat "$(host_dir "$h")/boot_id")"
    else
      echo "$h off"
    fi
  done
}

usage() {
  cat <<'EOF'
usage: lab/lab.sh COMMAND [ARGS...]        (root; env LAB_DIR, LIFEBOAT_BIN_DIR)

high availability (lab.sh up --ha [--controllers 2|3], or LAB_HA=1; LAB_ETCD_TLS=0 for plain http):
  3 etcd members (lb-etcdN, 10.77.0.5N:2379) and 2-3 controllers (lb-ctlN, https://10.77.0.6N:7443)
  on [store] backend = "etcd", each under a supervisor that restarts it 1 s after it exits
  leader                             "N URL" of the leading controller (exit 1: none, 2: etcd unreadable)
  ctl-kill N [--restart]             SIGKILL controller N (--restart: its supervisor starts it again)
  ctl-stop N | ctl-start N           SIGTERM (stays stopped) / start it under its supervisor
  ctl-partition N | ctl-heal N       cut controller N from every etcd member (agents still reach it)
  ctl-exits N                        "UNIX_MS STATUS" per exit of controller N (3 = lost leadership)
  etcd-kill N | etcd-start N         SIGKILL / start etcd member N
  etcd-stop-all | etcd-start-all     SIGTERM every member / start them all again
  etcdctl ARGS...                    etcdctl against the cluster, from lb-ctl
  cli-at N ARGS...                   lifeboat CLI as admin against controller N only
  metrics [N]                        controller N's metrics (default: the leader's)

lab:
  up [--hosts N] [--guests N] [--no-lifeboat] [--no-bmc]
                                     (re)create the lab (default 3 hosts, 2 guests each, a BMC each)
  down [--purge]                     kill everything, delete the namespaces (--purge: and LAB_DIR)
  status                             one line per host + controller
  paths                              KEY=VALUE lines of the lab's paths
  guests                             NAME UUID HOSTS-RUNNING-IT for the guests the lab defined
  logs [-f] [-n N] [HOST|controller] tail the logs
faults:
  host-kill HOST | host-boot HOST | host-status HOST
  host-partition HOST | host-heal HOST
  agent-stop HOST | agent-start HOST
  agent-impostor HOST FROM-HOST start|stop   a 2nd agent with HOST's identity, run inside FROM-HOST
  controller-stop | controller-start | controller-kill
  controller-memory-reserve MIB|default  the controller's host_memory_reserve_mib (restarts it if running)
  controller-partition | controller-heal
  libvirtd-stop HOST | libvirtd-kill HOST | libvirtd-start HOST
BMCs (Redfish, sushy-emulator in netns lb-bmc; a BMC power change powers the host off/on):
  bmc-state HOST                     On | Off | unknown (read through the BMC, from lb-ctl)
  bmc-power HOST on|off [--no-wait]  Reset On / ForceOff through the BMC, wait until it reads so
  bmc-status                         per host: BMC running|stopped, power-off and auth faults
  bmc-stop HOST | bmc-start HOST     the BMC is unreachable / back (its power state is kept)
  bmc-break-auth HOST | bmc-fix-auth HOST             the configured password is wrong / right
  bmc-disable-poweroff HOST | bmc-enable-poweroff HOST  ForceOff refused (HTTP 400) / allowed
guests and tools:
  define-guest HOST NAME [--no-start] [--no-autostart] [--local-disk]
  copies UUID                        running qemu processes of that guest on all hosts
  copies-all                         UUID COUNT HOSTS for every guest with a running qemu (one pass)
  virsh HOST ARGS...                 virsh against the host's libvirtd
  exec HOST CMD...                   run CMD inside the host's namespaces
  cli ARGS...                        lifeboat CLI as admin, inside the controller's netns
  cli-as ROLE ARGS...                same with the viewer|operator|admin certificate
  metrics                            the controller's Prometheus metrics (http://10.77.0.2:9464/metrics)
  agent-metrics HOST                 that host's agent metrics (http://<host ip>:9465/metrics)
  agent-pid HOST                     root-namespace PID of that host's running agent (not its start guard)
EOF
}

# shellcheck source=lab/ha.sh
. "$REPO_DIR/lab/ha.sh"

# ---- main -----------------------------------------------------------------------------------
CMD=${1:-}
[ $# -gt 0 ] && shift
case $CMD in
  _boot)
    [ -f "$(host_dir "$1")/no-agent" ] && AGENT_BIN=/nonexistent/lifeboat-agent
    internal_boot "$1"
    ;;
  _agent-start)
    internal_agent_start "$1"
    ;;
  _impostor-start)
    internal_impostor_start "$1" "$2"
    ;;
  _ctl-supervise)
    internal_ctl_supervise "$1"
    ;;
  leader) require_ha; ha_leader ;;
  ctl-kill)
    need_root; require_ctl "${1:-}"; take_lock
    [ -z "${2:-}" ] || [ "$2" = --restart ] || usage_die "lab.sh ctl-kill N [--restart]"
    ctl_kill "$1" "${2:-}"
    ;;
  ctl-stop) need_root; require_ctl "${1:-}"; take_lock; ctl_stop "$1" ;;
  ctl-start) need_root; require_ctl "${1:-}"; take_lock; ctl_start "$1" ;;
  ctl-partition) need_root; require_ctl "${1:-}"; take_lock; ctl_partition "$1" ;;
  ctl-heal) need_root; require_ctl "${1:-}"; take_lock; ctl_heal "$1" ;;
  ctl-exits) require_ctl "${1:-}"; cat "$(ctl_dir "$1")/exits" 2>/dev/null || true ;;
  etcd-kill) need_root; require_etcd "${1:-}"; take_lock; etcd_stop "$1" KILL ;;
  etcd-start) need_root; require_etcd "${1:-}"; take_lock; etcd_start "$1" ;;
  etcd-stop-all)
    need_root; require_ha; take_lock
    for n in $(seq 1 "$ETCD_MEMBERS"); do etcd_stop "$n" TERM; done
    ;;
  etcd-start-all)
    need_root; require_ha; take_lock
    for n in $(seq 1 "$ETCD_MEMBERS"); do etcd_launch "$n"; done
    for n in $(seq 1 "$ETCD_MEMBERS"); do etcd_wait_listening "$n"; done
    etcd_wait_healthy
    log "etcd: all $ETCD_MEMBERS members running and healthy"
    ;;
  etcdctl) need_root; require_ha; etcdctl_lab "$@" ;;
  up)
    need_root
    take_lock
    lab_up "$@"
    ;;
  down)
    need_root
    take_lock
    lab_down
    if [ "${1:-}" = --purge ]; then
      check_lab_dir
      rm -rf "$LAB_DIR"
      log "removed $LAB_DIR"
    fi
    ;;
  status) print_status ;;
  paths) print_paths ;;
  guests) require_lab; print_guests ;;
  host-status)
    require_host "${1:-}"
    if host_is_on "$1"; then echo on; else echo off; fi
    ;;
  host-kill)
    need_root; require_host "${1:-}"; take_lock
    host_kill "$1"
    ;;
  host-boot)
    need_root; require_host "${1:-}"; take_lock
    [ -f "$(host_dir "$1")/no-agent" ] || [ -x "$AGENT_BIN" ] || warn "$AGENT_BIN is missing: $1 boots without an agent"
    host_boot "$1"
    ;;
  host-partition | host-heal)
    need_root; require_host "${1:-}"; take_lock
    if [ "$CMD" = host-partition ]; then updown=down; else updown=up; fi
    ip -n "$BR_NS" link set "$(host_bridge_port "$1")" "$updown" ||
      die "could not set $(host_bridge_port "$1") $updown in $BR_NS"
    if [ "$updown" = up ]; then
      # forget the neighbour entries that failed during the partition (else the first
      # connection after healing fails at once with "no route to host")
      ip -n "$(host_netns "$1")" neigh flush dev eth0 2>/dev/null || true
      for ns in $(ip netns list | awk '{print $1}' | grep '^lb-'); do
        [ "$ns" = "$BR_NS" ] && continue
        ip -n "$ns" neigh flush to "$(host_ip "$1")" 2>/dev/null || true
      done
    fi
    log "$1 $([ $updown = down ] && echo partitioned || echo healed)"
    ;;
  agent-stop)
    need_root; require_host "${1:-}"; take_lock
    pids=$(host_agent_pids "$1" | tr '\n' ' ')
    if [ -z "${pids// /}" ]; then
      log "$1: agent not running"
    else
      # shellcheck disable=SC2086
      term_then_kill 10 $pids
      log "$1: agent stopped"
    fi
    ;;
  agent-pid)
    # the long-running agent only: the start guard (`lifeboat-agent ... guard ...`) is the same
    # binary, run briefly by libvirt's qemu hook
    need_root; require_host "${1:-}"
    found=
    for p in $(host_agent_pids "$1"); do
      tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -qw guard && continue
      echo "$p"
      found=1
    done
    [ -n "$found" ] || die "$1: no agent running"
    ;;
  agent-start)
    need_root; require_host "${1:-}"; take_lock
    pid=$(host_init_pid "$1") || die "$1 is off (lab.sh host-boot $1)"
    [ -x "$AGENT_BIN" ] || die "$AGENT_BIN is missing (cargo build)"
    [ -f "$(host_dir "$1")/no-agent" ] && die "$1 has no agent certificate (lab brought up without the lifeboat CLI)"
    if [ -n "$(host_agent_pids "$1")" ]; then
      log "$1: agent already running"
    else
      nsenter -t "$pid" -n -m -p -u -- "$LAB_SH" _agent-start "$1" 9>&-
      deadline=$(($(now_ms) + 5000))
      until [ -n "$(host_agent_pids "$1")" ]; do
        [ "$(now_ms)" -ge "$deadline" ] && die "$1: the agent did not start (log: $(host_dir "$1")/agent.log)"
        sleep 0.02
      done
      log "$1: agent started"
    fi
    ;;
  libvirtd-stop | libvirtd-kill)
    need_root; require_host "${1:-}"; take_lock
    pids=$(host_prog_pids "$1" libvirtd | paste -sd' ' -)
    if [ -z "$pids" ]; then
      log "$1: libvirtd not running"
    elif [ "$CMD" = libvirtd-kill ]; then
      # shellcheck disable=SC2086
      kill -KILL $pids 2>/dev/null || true
      # shellcheck disable=SC2086
      wait_gone 10 $pids || die "$1: libvirtd survives SIGKILL"
      log "$1: libvirtd killed (SIGKILL; its guests keep running)"
    else
      # shellcheck disable=SC2086
      term_then_kill 15 $pids
      log "$1: libvirtd stopped (its guests keep running)"
    fi
    ;;
  libvirtd-start)
    need_root; require_host "${1:-}"; take_lock
    pid=$(host_init_pid "$1") || die "$1 is off (lab.sh host-boot $1)"
    if [ -n "$(host_prog_pids "$1" libvirtd)" ]; then
      log "$1: libvirtd already running"
    else
      nsenter -t "$pid" -n -m -p -u -- libvirtd -d -p /run/libvirt/libvirtd.pid 9>&- ||
        die "$1: libvirtd failed to start (log: $(host_dir "$1")/log-libvirt/libvirtd.log)"
      host_wait_libvirtd "$1"
      log "$1: libvirtd started"
    fi
    ;;
  controller-partition | controller-heal)
    need_root; require_lab; single_controller; take_lock
    if [ "$CMD" = controller-partition ]; then updown=down; else updown=up; fi
    ip -n "$BR_NS" link set ve-ctl "$updown" || die "could not set ve-ctl $updown in $BR_NS"
    if [ "$updown" = up ]; then
      for ns in $(ip netns list | awk '{print $1}' | grep '^lb-'); do
        [ "$ns" = "$BR_NS" ] && continue
        ip -n "$ns" neigh flush dev eth0 2>/dev/null || true
      done
    fi
    log "controller $([ $updown = down ] && echo partitioned from all hosts || echo healed)"
    ;;
  bmc-state)
    need_root; require_bmc "${1:-}"
    bmc_state "$1"
    ;;
  bmc-power)
    # no lock: the reads apply the change, and the listener then runs lab.sh host-kill/host-boot
    need_root; require_bmc "${1:-}"
    [ $# -ge 2 ] || usage_die "lab.sh bmc-power HOST on|off [--no-wait]"
    bmc_power "$1" "$2" "${3:-}"
    ;;
  bmc-status)
    need_root; require_lab
    bmc_enabled || { echo "no BMCs"; exit 0; }
    for h in "${HOSTS[@]}"; do
      if [ -n "$(bmc_pids "$h")" ]; then st=running; else st=stopped; fi
      po=enabled; [ -f "$BMC_DIR/$h.no-poweroff" ] && po=disabled
      au=ok; [ -f "$BMC_DIR/$h.auth-broken" ] && au=broken
      echo "$h $st url=$(bmc_url "$h") poweroff=$po auth=$au"
    done
    if [ -n "$(listener_pids)" ]; then echo "listener running"; else echo "listener stopped"; fi
    ;;
  bmc-stop) need_root; require_bmc "${1:-}"; take_lock; bmc_stop "$1" ;;
  bmc-start) need_root; require_bmc "${1:-}"; take_lock; bmc_start "$1" ;;
  bmc-break-auth | bmc-fix-auth)
    need_root; require_bmc "${1:-}"; take_lock
    if [ "$CMD" = bmc-break-auth ]; then
      "$VENV_PY" "$BMC_AUTH" break "$BMC_DIR" "$1" || die "$1: cannot rewrite $BMC_DIR/$1.htpasswd"
      touch "$BMC_DIR/$1.auth-broken"
      log "$1: its BMC now rejects the password in $BMC_DIR/$1.cred (HTTP 401)"
    else
      "$VENV_PY" "$BMC_AUTH" fix "$BMC_DIR" "$1" || die "$1: cannot rewrite $BMC_DIR/$1.htpasswd"
      rm -f "$BMC_DIR/$1.auth-broken"
      log "$1: its BMC accepts the password in $BMC_DIR/$1.cred again"
    fi
    ;;
  bmc-disable-poweroff | bmc-enable-poweroff)
    need_root; require_bmc "${1:-}"; take_lock
    if [ "$CMD" = bmc-disable-poweroff ]; then touch "$BMC_DIR/$1.no-poweroff"; else rm -f "$BMC_DIR/$1.no-poweroff"; fi
    write_bmc_conf "$1"
    if [ -n "$(bmc_pids "$1")" ]; then
      bmc_stop "$1"
      bmc_start "$1"
      note=""
    else
      note=" (its BMC is stopped: it applies at bmc-start)"
    fi
    if [ "$CMD" = bmc-disable-poweroff ]; then
      log "$1: BMC power off DISABLED: ForceOff answers HTTP 400$note"
    else
      log "$1: BMC power off enabled$note"
    fi
    ;;
  controller-start) need_root; require_lab; single_controller; take_lock; controller_start ;;
  controller-stop) need_root; require_lab; single_controller; take_lock; controller_stop TERM ;;
  controller-kill) need_root; require_lab; single_controller; take_lock; controller_stop KILL ;;
  controller-memory-reserve)
    # memory every host keeps for itself: a large value leaves room for few guests (capacity tests)
    need_root; require_lab
    [ $# -eq 1 ] || usage_die "lab.sh controller-memory-reserve MIB|default"
    single_controller
    case $1 in
      default) ;;
      *[!0-9]* | '') usage_die "lab.sh controller-memory-reserve MIB|default   (MIB must be a whole number, got '$1')" ;;
    esac
    take_lock
    if [ "$1" = default ]; then rm -f "$CTL_MEMORY_RESERVE"; else printf '%s\n' "$1" >"$CTL_MEMORY_RESERVE"; fi
    if [ -n "$(controller_pids)" ]; then
      controller_stop TERM
      controller_start
    fi
    log "controller host_memory_reserve_mib: $1"
    ;;
  define-guest)
    need_root
    [ $# -ge 2 ] || usage_die "lab.sh define-guest HOST NAME [--no-start] [--no-autostart] [--local-disk]"
    h=$1 name=$2
    shift 2
    start=1 autostart=1 local_disk=0
    for a in "$@"; do
      case $a in
        --no-start) start=0 ;;
        --no-autostart) autostart=0 ;;
        --local-disk) local_disk=1 ;;
        *) usage_die "lab.sh define-guest HOST NAME [--no-start] [--no-autostart] [--local-disk]   (unknown: $a)" ;;
      esac
    done
    require_host "$h"
    take_lock
    define_guest "$h" "$name" "$start" "$autostart" "$local_disk"
    ;;
  agent-metrics)
    # one agent's Prometheus metrics, fetched inside that host's network namespace
    [ $# -eq 1 ] || usage_die "lab.sh agent-metrics HOST"
    require_host "$1"
    ip netns exec "lb-$1" curl -sf "http://$(host_ip "$1"):9465/metrics" || die "cannot read $1's agent metrics (agent running?)"
    ;;
  metrics)
    load_state
    if ha_enabled; then
      # controller N's (default: the leader's), fetched from the operator's station
      n=${1:-}
      [ -n "$n" ] || n=$(ha_leader | awk '{print $1}') || die "no controller leads (lab.sh leader)"
      require_ctl "$n"
      # bounded: a controller may accept on its metrics port and never answer
      ip netns exec "$CTL_NS" curl -sf --max-time 3 "http://$(ctl_ip "$n"):9464/metrics" ||
        die "cannot read controller $n's metrics (http://$(ctl_ip "$n"):9464/metrics)"
      exit 0
    fi
    # the controller's Prometheus metrics, fetched inside its network namespace
    ip netns exec "$CTL_NS" curl -sf "http://$CTL_IP:9464/metrics" || die "cannot read http://$CTL_IP:9464/metrics (controller running?)"
    ;;
  copies)
    [ $# -eq 1 ] || usage_die "lab.sh copies UUID"
    count_copies "$1"
    ;;
  copies-all)
    [ $# -eq 0 ] || usage_die "lab.sh copies-all"
    load_state
    copies_all
    ;;
  agent-impostor)
    [ $# -eq 3 ] || usage_die "lab.sh agent-impostor HOST FROM-HOST start|stop"
    need_root; require_host "$1"; require_host "$2"; take_lock
    case $3 in
      start) impostor_start "$1" "$2" ;;
      stop) impostor_stop "$1" "$2" ;;
      *) usage_die "lab.sh agent-impostor HOST FROM-HOST start|stop" ;;
    esac
    ;;
  virsh)
    [ $# -ge 1 ] || usage_die "lab.sh virsh HOST ARGS..."
    require_host "$1"
    h=$1
    shift
    exec virsh -c "$(host_uri "$h")" "$@"
    ;;
  exec)
    [ $# -ge 2 ] || usage_die "lab.sh exec HOST CMD..."
    need_root
    require_host "$1"
    pid=$(host_init_pid "$1") || die "$1 is off"
    shift
    exec nsenter -t "$pid" -n -m -p -u -- "$@"
    ;;
  cli | cli-as | cli-at)
    load_state
    urls=$CONTROLLER_URL
    if ha_enabled; then
      # every controller: the CLI finds the leader (LAB_CLI_URL=URL talks to that one only,
      # LAB_CLI_URL=leader to the one etcd names now)
      urls=${LAB_CLI_URL:-$(ctl_urls)}
      if [ "$urls" = leader ]; then
        urls=$(ha_leader | awk '{print $2}') || urls=$(ctl_urls)
      fi
    fi
    if [ "$CMD" = cli-at ]; then
      require_ctl "${1:-}"
      urls=$(ctl_url "$1")
      shift
      CMD=cli
    fi
    if [ "$CMD" = cli ]; then role="admin"; else
      [ $# -ge 1 ] || usage_die "lab.sh cli-as viewer|operator|admin ARGS..."
      role=$1
      shift
    fi
    case $role in viewer | operator | admin) ;; *) die "unknown role '$role' (viewer, operator, admin)" ;; esac
    [ -x "$CLI_BIN" ] || die "$CLI_BIN is missing (cargo build)"
    [ -f "$PKI_DIR/client-$role.pem" ] || die "no client certificate $PKI_DIR/client-$role.pem (lab.sh up)"
    netns_exists "$CTL_NS" || die "network namespace $CTL_NS is missing (lab.sh up)"
    exec ip netns exec "$CTL_NS" env \
      LIFEBOAT_CONTROLLER="$urls" \
      LIFEBOAT_CA="$PKI_DIR/ca.pem" \
      LIFEBOAT_CERT="$PKI_DIR/client-$role.pem" \
      LIFEBOAT_KEY="$PKI_DIR/client-$role.key" \
      "$CLI_BIN" "$@"
    ;;
  logs)
    follow=() lines=50
    while [ $# -gt 0 ]; do
      case $1 in
        -f) follow=(-F); shift ;;
        -n) lines=$2; shift 2 ;;
        *) break ;;
      esac
    done
    load_state
    files=()
    if [ $# -eq 0 ]; then
      files+=("$CTL_LOG")
      for h in "${HOSTS[@]}"; do
        hd=$(host_dir "$h")
        files+=("$hd/boot.log" "$hd/log-libvirt/libvirtd.log" "$hd/agent.log")
      done
    elif [ "$1" = controller ]; then
      files+=("$CTL_LOG")
    else
      require_host "$1"
      hd=$(host_dir "$1")
      files+=("$hd/boot.log" "$hd/log-libvirt/libvirtd.log" "$hd/agent.log")
      for f in "$hd"/log-libvirt/qemu/*.log; do [ -f "$f" ] && files+=("$f"); done
    fi
    existing=()
    for f in "${files[@]}"; do [ -f "$f" ] && existing+=("$f"); done
    [ "${#existing[@]}" -gt 0 ] || die "no log files yet"
    exec tail -v -n "$lines" "${follow[@]}" "${existing[@]}"
    ;;
  "" | -h | --help | help) usage ;;
  *) usage >&2; die "unknown command '$CMD'" ;;
esac
