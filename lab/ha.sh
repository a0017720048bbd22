# shellcheck shell=bash
# Sourced by lab/lab.sh: the high-availability lab (`lab.sh up --ha`, or LAB_HA=1).
#
# A 3-member etcd cluster, member N (1..3) in network namespace lb-etcdN at 10.77.0.(50+N),
# client port 2379, peer port 2380, TLS with the lab's own etcd CA (clients and peers show
# certificates; LAB_ETCD_TLS=0 runs plain http inside the lab network), started with the flags
# docs/operations.md requires. Controllers 1..N (2 or 3, --controllers) each in namespace lb-ctlN
# at 10.77.0.(60+N):7443 with `[store] backend = "etcd"`, each under a supervisor loop (a lab.sh
# process in its namespace) that starts it again 1 s after it exits, as systemd's Restart=always
# does (status 3 = it lost leadership and comes back as a follower). Namespace lb-ctl (10.77.0.2)
# stays as the operator's station: the CLI, etcdctl and the BMC reads run there.
#
# Faults: ctl-kill N (the machine dies: SIGKILL, nothing restarts it), ctl-kill N --restart (a
# crash: SIGKILL, the supervisor starts it again), ctl-stop N, ctl-start N, ctl-partition N /
# ctl-heal N (the controller cannot reach any etcd member, agents and clients still reach it:
# a permanent neighbour entry with a MAC nobody has, per member, in its namespace, so its packets
# to etcd are silently lost, as in a real partition), etcd-kill N, etcd-start N, etcd-stop-all,
# etcd-start-all; `leader` reads the election from etcd.

ETCD_MEMBERS=3
ETCD_CLIENT_PORT=2379
ETCD_PEER_PORT=2380
ETCD_PREFIX=${LAB_ETCD_PREFIX:-/lifeboat/}
ETCD_DIR=$LAB_DIR/etcd
ETCD_PKI=$ETCD_DIR/pki
# the MAC of nobody: a partitioned controller's packets to etcd go there
PARTITION_MAC=02:00:00:00:de:ad
# forced-migration grace and start-lease TTL in an HA lab: leader_ttl_ms (3000) plus the
# controller's failover margin (5000) must stay below lease_ttl_ms (StoreConfig::check)
HA_LEASE_TTL_MS_DEFAULT=9000
HA_FORCE_GRACE_MS_DEFAULT=10000

ha_enabled() { [ "${LAB_HA:-0}" = 1 ]; }
require_ha() {
  require_lab
  ha_enabled || die "this lab has one controller on SQLite; the HA lab is: lab.sh up --ha"
}
ctl_ns() { echo "lb-ctl$1"; }
ctl_ip() { echo "$NET_PREFIX.$((60 + $1))"; }
ctl_url() { echo "https://$(ctl_ip "$1"):$CTL_PORT"; }
ctl_dir() { echo "$LAB_DIR/controller-$1"; }
ctl_list() { seq 1 "${LAB_CONTROLLERS:-0}"; }
ctl_urls() {
  local n out=""
  for n in $(ctl_list); do out="$out${out:+,}$(ctl_url "$n")"; done
  echo "$out"
}
etcd_ns() { echo "lb-etcd$1"; }
etcd_ip() { echo "$NET_PREFIX.$((50 + $1))"; }
etcd_tls() { [ "${LAB_ETCD_TLS:-1}" = 1 ]; }
etcd_scheme() { if etcd_tls; then echo https; else echo http; fi; }
etcd_url() { echo "$(etcd_scheme)://$(etcd_ip "$1"):$ETCD_CLIENT_PORT"; }
etcd_peer_url() { echo "$(etcd_scheme)://$(etcd_ip "$1"):$ETCD_PEER_PORT"; }
etcd_endpoints() {
  local n out=""
  for n in $(seq 1 "$ETCD_MEMBERS"); do out="$out${out:+,}$(etcd_url "$n")"; done
  echo "$out"
}
etcd_member_dir() { echo "$ETCD_DIR/member-$1"; }

require_ctl() {
  require_ha
  [[ "${1:-}" =~ ^[1-9]$ ]] && [ "$1" -le "$LAB_CONTROLLERS" ] ||
    usage_die "lab.sh ${CMD:-?} N   (controllers: $(ctl_list | paste -sd' ' -))"
}
require_etcd() {
  require_ha
  [[ "${1:-}" =~ ^[1-9]$ ]] && [ "$1" -le "$ETCD_MEMBERS" ] || usage_die "lab.sh ${CMD:-?} N   (etcd members: 1..$ETCD_MEMBERS)"
}

# ---- etcd PKI (openssl, like the BMCs'): a CA, one certificate per member (server and peer),
# one client certificate the controllers and etcdctl show ------------------------------------
etcd_sign() {
  local name=$1 cn=$2 ext=$3 d=$ETCD_PKI
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$d/$name.key" -out "$d/$name.csr" \
    -subj "/O=Lifeboat lab/CN=$cn" 2>/dev/null || die "openssl: cannot make the key $d/$name.key"
  printf '%s\n' "$ext" "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature" \
    "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid" >"$d/$name.ext"
  openssl x509 -req -in "$d/$name.csr" -CA "$d/ca.pem" -CAkey "$d/ca.key" -CAcreateserial -days 825 \
    -extfile "$d/$name.ext" -out "$d/$name.pem" 2>/dev/null || die "openssl: cannot sign $d/$name.pem"
  chmod 600 "$d/$name.key"
  rm -f "$d/$name.csr" "$d/$name.ext"
}
etcd_make_certs() {
  local d=$ETCD_PKI n
  mkdir -p "$d"
  chmod 700 "$d"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
    -keyout "$d/ca.key" -out "$d/ca.pem" -subj "/O=Lifeboat lab/CN=Lifeboat lab etcd CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null || die "openssl: cannot make the etcd CA in $d"
  chmod 600 "$d/ca.key"
  for n in $(seq 1 "$ETCD_MEMBERS"); do
    etcd_sign "etcd$n" "etcd$n" "subjectAltName=IP:$(etcd_ip "$n"),IP:127.0.0.1,DNS:etcd$n
extendedKeyUsage=serverAuth,clientAuth"
  done
  etcd_sign client lifeboat-controller "extendedKeyUsage=clientAuth"
  rm -f "$d/ca.srl"
}

# ---- etcd members ----------------------------------------------------------------------------
etcd_pids() {
  local p
  for p in $(pids_in_netns "$(etcd_ns "$1")"); do
    proc_is "$p" etcd && echo "$p"
  done
  return 0
}
etcd_listening() {
  [ -n "$(ip netns exec "$(etcd_ns "$1")" ss -Hltn "sport = :$ETCD_CLIENT_PORT" 2>/dev/null)" ]
}
etcd_launch() {
  local n=$1 d cluster="" m
  local -a args tls=()
  d=$(etcd_member_dir "$n")
  mkdir -p "$d"
  chmod 700 "$d"
  [ -n "$(etcd_pids "$n")" ] && return 0
  for m in $(seq 1 "$ETCD_MEMBERS"); do cluster="$cluster${cluster:+,}etcd$m=$(etcd_peer_url "$m")"; done
  if etcd_tls; then
    tls=(--cert-file "$ETCD_PKI/etcd$n.pem" --key-file "$ETCD_PKI/etcd$n.key"
      --client-cert-auth --trusted-ca-file "$ETCD_PKI/ca.pem"
      --peer-cert-file "$ETCD_PKI/etcd$n.pem" --peer-key-file "$ETCD_PKI/etcd$n.key"
      --peer-client-cert-auth --peer-trusted-ca-file "$ETCD_PKI/ca.pem")
  fi
  # The flags docs/operations.md ("High availability") requires. An existing data dir wins
  # over the --initial-* flags, so the same command starts a member again after etcd-kill.
  args=(--name "etcd$n" --data-dir "$d/data"
    --listen-client-urls "$(etcd_url "$n")" --advertise-client-urls "$(etcd_url "$n")"
    --listen-peer-urls "$(etcd_peer_url "$n")" --initial-advertise-peer-urls "$(etcd_peer_url "$n")"
    --initial-cluster "$cluster" --initial-cluster-token lifeboat-lab --initial-cluster-state new
    --max-txn-ops 10000 --max-request-bytes 10485760
    --quota-backend-bytes $((2 * 1024 * 1024 * 1024))
    --auto-compaction-mode periodic --auto-compaction-retention 1h
    "${tls[@]}")
  printf '\n==== lab: etcd%s start %s ====\n' "$n" "$(date -Is)" >>"$d/etcd.log"
  (
    exec setsid ip netns exec "$(etcd_ns "$n")" etcd "${args[@]}"
  ) </dev/null >>"$d/etcd.log" 2>&1 9>&- &
}
etcd_wait_listening() {
  local n=$1 deadline
  deadline=$(($(now_ms) + 20000))
  until etcd_listening "$n"; do
    if [ "$(now_ms)" -ge "$deadline" ]; then
      tail -n 20 "$(etcd_member_dir "$n")/etcd.log" >&2 || true
      die "etcd$n does not listen on $(etcd_url "$n") after 20 s (log: $(etcd_member_dir "$n")/etcd.log)"
    fi
    sleep 0.05
  done
}
etcd_start() {
  local n=$1
  if [ -n "$(etcd_pids "$n")" ]; then log "etcd$n already running"; return 0; fi
  etcd_launch "$n"
  etcd_wait_listening "$n"
  log "etcd$n listening on $(etcd_url "$n")"
}
etcd_stop() {
  local n=$1 sig=$2 pids
  pids=$(etcd_pids "$n" | paste -sd' ' -)
  if [ -z "$pids" ]; then log "etcd$n not running"; return 0; fi
  if [ "$sig" = KILL ]; then
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    # shellcheck disable=SC2086
    wait_gone 10 $pids || die "etcd$n ($pids) survives SIGKILL"
    log "etcd$n killed (SIGKILL)"
  else
    # shellcheck disable=SC2086
    term_then_kill 10 $pids
    log "etcd$n stopped"
  fi
}
# etcdctl against the whole cluster, from the operator's station (never the root namespace)
etcdctl_lab() {
  local -a tls=()
  if etcd_tls; then tls=(--cacert "$ETCD_PKI/ca.pem" --cert "$ETCD_PKI/client.pem" --key "$ETCD_PKI/client.key"); fi
  ip netns exec "$CTL_NS" env ETCDCTL_API=3 etcdctl --endpoints "$(etcd_endpoints)" "${tls[@]}" \
    --dial-timeout 2s --command-timeout 3s "$@"
}
etcd_wait_healthy() {
  local deadline out
  deadline=$(($(now_ms) + 30000))
  until out=$(etcdctl_lab endpoint health --cluster 2>&1); do
    if [ "$(now_ms)" -ge "$deadline" ]; then
      printf '%s\n' "$out" >&2
      die "the etcd cluster is not healthy 30 s after its start (logs: $ETCD_DIR/member-*/etcd.log)"
    fi
    sleep 0.2
  done
}

# ---- controllers -------------------------------------------------------------------------
write_ha_controller_conf() {
  local n=$1 d m eps=""
  d=$(ctl_dir "$n")
  mkdir -p "$d"
  for m in $(seq 1 "$ETCD_MEMBERS"); do eps="$eps${eps:+, }\"$(etcd_url "$m")\""; done
  # the single controller's config (bmc sections, timings), then this controller's own parts
  write_controller_conf
  sed -e "s#^database = .*#database = \"$d/controller.db\"#" \
    -e "s#^metrics_listen = .*#metrics_listen = \"$(ctl_ip "$n"):9464\"#" \
    -e "s|^# Written by lab/lab.sh.*|# Written by lab/lab.sh: HA controller $n in network namespace $(ctl_ns "$n") ($(ctl_ip "$n")).|" \
    "$CTL_CONFIG" >"$d/controller.toml.tmp"
  {
    printf '\n[store]\nbackend = "etcd"\nendpoints = [%s]\n' "$eps"
    if etcd_tls; then
      printf 'ca = "%s"\ncert = "%s"\nkey = "%s"\n' "$ETCD_PKI/ca.pem" "$ETCD_PKI/client.pem" "$ETCD_PKI/client.key"
    fi
    printf 'prefix = "%s"\nadvertise_url = "%s"\ncache_dir = "%s"\n' "$ETCD_PREFIX" "$(ctl_url "$n")" "$d/etcd-cache"
  } >>"$d/controller.toml.tmp"
  mv "$d/controller.toml.tmp" "$d/controller.toml"
  mkdir -p "$d/etcd-cache"
  chmod 700 "$d/etcd-cache"
}
ctl_controller_pids() {
  local p
  for p in $(pids_in_netns "$(ctl_ns "$1")"); do
    proc_is "$p" lifeboat-controller && echo "$p"
  done
  return 0
}
ctl_supervisor_pids() {
  local p
  for p in $(pids_in_netns "$(ctl_ns "$1")"); do
    proc_is "$p" lab.sh && echo "$p"
  done
  return 0
}
ctl_listening() {
  [ -n "$(ip netns exec "$(ctl_ns "$1")" ss -Hltn "sport = :$CTL_PORT" 2>/dev/null)" ]
}
# Inside lb-ctlN: run the controller again 1 s after every exit (systemd: Restart=always,
# RestartSec=1). Every exit is logged and recorded in DIR/exits as "UNIX_MS STATUS".
internal_ctl_supervise() {
  local n=$1 d stop=0 cpid="" rc
  d=$(ctl_dir "$n")
  trap 'stop=1; [ -n "$cpid" ] && kill -TERM "$cpid" 2>/dev/null' TERM INT
  while [ "$stop" = 0 ]; do
    printf '\n==== lab: controller %s start %s ====\n' "$n" "$(date -Is)" >>"$d/controller.log"
    (cd "$d" && RUST_LOG="${RUST_LOG:-info}" exec "$CTL_BIN" --config "$d/controller.toml") \
      </dev/null >>"$d/controller.log" 2>&1 &
    cpid=$!
    rc=0
    wait "$cpid" || rc=$?
    if [ "$stop" = 1 ]; then
      # a trapped signal ends `wait` early: wait for the controller itself
      rc=0
      wait "$cpid" || rc=$?
    fi
    printf '==== lab: controller %s exited with status %s at %s ====\n' "$n" "$rc" "$(date -Is)" >>"$d/controller.log"
    printf '%s %s\n' "$(now_ms)" "$rc" >>"$d/exits"
    cpid=""
    [ "$stop" = 1 ] && break
    sleep 1
  done
}
ctl_start() {
  local n=$1 d deadline
  d=$(ctl_dir "$n")
  [ -x "$CTL_BIN" ] || die "$CTL_BIN is missing (cargo build)"
  netns_exists "$(ctl_ns "$n")" || die "network namespace $(ctl_ns "$n") is missing (lab.sh up --ha)"
  if [ -n "$(ctl_supervisor_pids "$n")" ]; then
    log "controller $n already supervised (pid $(ctl_supervisor_pids "$n" | paste -sd' ' -))"
    return 0
  fi
  write_ha_controller_conf "$n"
  touch "$d/controller.log" "$d/exits" && chmod 600 "$d/controller.log"
  (
    exec setsid ip netns exec "$(ctl_ns "$n")" "$LAB_SH" _ctl-supervise "$n"
  ) </dev/null >>"$d/supervisor.log" 2>&1 9>&- &
  deadline=$(($(now_ms) + 20000))
  until ctl_listening "$n"; do
    if [ "$(now_ms)" -ge "$deadline" ]; then
      tail -n 20 "$d/controller.log" >&2 || true
      warn "controller $n does not listen on $(ctl_url "$n") after 20 s; its supervisor keeps restarting it (log: $d/controller.log)"
      return 0
    fi
    sleep 0.05
  done
  log "controller $n listening on $(ctl_url "$n") (pid $(ctl_controller_pids "$n" | paste -sd' ' -))"
}
# ctl_kill N [--restart]: SIGKILL; without --restart its supervisor dies first (the machine is
# gone), with it only the controller dies and its supervisor starts it again (a crash)
ctl_kill() {
  local n=$1 restart=${2:-} sup pids
  sup=$(ctl_supervisor_pids "$n" | paste -sd' ' -)
  if [ "$restart" != --restart ] && [ -n "$sup" ]; then
    # shellcheck disable=SC2086
    kill -KILL $sup 2>/dev/null || true
    # shellcheck disable=SC2086
    wait_gone 10 $sup || die "the supervisor of controller $n ($sup) survives SIGKILL"
  fi
  pids=$(ctl_controller_pids "$n" | paste -sd' ' -)
  if [ -z "$pids" ]; then log "controller $n not running"; return 0; fi
  # shellcheck disable=SC2086
  kill -KILL $pids 2>/dev/null || true
  # shellcheck disable=SC2086
  wait_gone 10 $pids || die "controller $n ($pids) survives SIGKILL"
  if [ "$restart" = --restart ]; then
    log "controller $n killed (SIGKILL); its supervisor starts it again in 1 s"
  else
    log "controller $n killed (SIGKILL), not restarted (lab.sh ctl-start $n)"
  fi
}
ctl_stop() {
  local n=$1 sup pids
  sup=$(ctl_supervisor_pids "$n" | paste -sd' ' -)
  # shellcheck disable=SC2086
  [ -n "$sup" ] && term_then_kill 15 $sup
  pids=$(ctl_controller_pids "$n" | paste -sd' ' -)
  # shellcheck disable=SC2086
  [ -n "$pids" ] && term_then_kill 10 $pids
  log "controller $n stopped"
}
ctl_partition() {
  local n=$1 m
  for m in $(seq 1 "$ETCD_MEMBERS"); do
    ip -n "$(ctl_ns "$n")" neigh replace "$(etcd_ip "$m")" lladdr "$PARTITION_MAC" nud permanent dev eth0 ||
      die "cannot cut controller $n from etcd$m"
  done
  touch "$(ctl_dir "$n")/partitioned"
  log "controller $n cut from etcd (agents and clients still reach it)"
}
ctl_heal() {
  local n=$1 m
  for m in $(seq 1 "$ETCD_MEMBERS"); do
    ip -n "$(ctl_ns "$n")" neigh del "$(etcd_ip "$m")" dev eth0 2>/dev/null || true
  done
  rm -f "$(ctl_dir "$n")/partitioned"
  log "controller $n reaches etcd again"
}
ctl_partitioned() { [ -f "$(ctl_dir "$1")/partitioned" ]; }

# leader -> "N URL" of the controller holding the election (the key with the lowest create
# revision under PREFIX/leader/, etcd's election rule); exit 1 + "none" when nobody holds it,
# exit 2 + "unknown" when etcd cannot be read. A SIGKILLed leader's key stays until its lease
# (leader_ttl_ms) expires.
ha_leader() {
  local val n
  if ! val=$(etcdctl_lab get --prefix "${ETCD_PREFIX}leader/" --sort-by=CREATE --order=ASCEND --limit=1 \
    --print-value-only 2>/dev/null); then
    echo unknown
    return 2
  fi
  val=$(printf '%s' "$val" | head -n 1)
  if [ -z "$val" ]; then echo none; return 1; fi
  for n in $(ctl_list); do
    [ "$(ctl_url "$n")" = "$val" ] && { echo "$n $val"; return 0; }
  done
  echo "? $val"
}

# The etcd keyspace starts empty: `init` with controller 1's config writes Lifeboat's schema key
# (a new, empty pool), while no controller runs. A controller never starts on a prefix without it.
ha_bootstrap() {
  local out
  if out=$(ip netns exec "$(ctl_ns 1)" "$CTL_BIN" --config "$(ctl_dir 1)/controller.toml" init 2>&1); then
    log "etcd: $out"
  else
    die "lifeboat-controller init (etcd) failed: $out"
  fi
}

# Whether this agent binary takes `[controller] urls = [...]` (several controllers).
agent_takes_urls() {
  local f out
  [ -n "${AGENT_URLS_OK:-}" ] && { [ "$AGENT_URLS_OK" = 1 ]; return; }
  f=$LAB_DIR/.probe-agent.toml
  printf 'host_id = "probe"\nstate_dir = "%s"\n[controller]\nurls = ["https://probe:1"]\nca = "/n"\ncert = "/n"\nkey = "/n"\n' \
    "$LAB_DIR" >"$f"
  out=$("$AGENT_BIN" --config "$f" check-config 2>&1 || true)
  rm -f "$f"
  if grep -q 'unknown field `urls`' <<<"$out"; then AGENT_URLS_OK=0; else AGENT_URLS_OK=1; fi
  [ "$AGENT_URLS_OK" = 1 ]
}
# the [controller] address lines of an agent config
agent_controller_lines() {
  if ! ha_enabled; then
    printf 'url = "%s"\n' "$CONTROLLER_URL"
  elif agent_takes_urls; then
    printf 'urls = [%s]\n' "$(ctl_urls | sed 's/\([^,]*\)/"\1"/g; s/,/, /g')"
  else
    warn "this lifeboat-agent takes one controller url: the agents know controller 1 only"
    printf 'url = "%s"\n' "$(ctl_url 1)"
  fi
}

# Bring up the HA parts (networking is done): etcd, then the controllers, then wait for a leader.
ha_up() {
  local n t0 deadline
  t0=$(now_ms)
  command -v etcd >/dev/null && command -v etcdctl >/dev/null || die "etcd/etcdctl not found: run scripts/install-deps.sh"
  mkdir -p "$ETCD_DIR"
  chmod 700 "$ETCD_DIR"
  if etcd_tls; then etcd_make_certs; fi
  for n in $(seq 1 "$ETCD_MEMBERS"); do etcd_launch "$n"; done
  for n in $(seq 1 "$ETCD_MEMBERS"); do etcd_wait_listening "$n"; done
  etcd_wait_healthy
  log "etcd: $ETCD_MEMBERS members healthy at $(etcd_endpoints) ($(($(now_ms) - t0)) ms)"
  [ -x "$CTL_BIN" ] || { warn "$CTL_BIN is missing: NO controllers"; return 0; }
  for n in $(ctl_list); do write_ha_controller_conf "$n"; done
  ha_bootstrap
  for n in $(ctl_list); do ctl_start "$n"; done
  # LAB_LEADER_WAIT_S=0: do not wait for a leader (e.g. to look at controllers that never lead)
  deadline=$(($(now_ms) + ${LAB_LEADER_WAIT_S:-30} * 1000))
  [ "${LAB_LEADER_WAIT_S:-30}" = 0 ] && return 0
  until ha_leader >/dev/null; do
    [ "$(now_ms)" -ge "$deadline" ] && die "no controller leads 30 s after the start (logs: $LAB_DIR/controller-*/controller.log)"
    sleep 0.1
  done
  log "controller $(ha_leader) leads ($(($(now_ms) - t0)) ms after etcd's start)"
}

# lab_down's first step: no supervisor may start a controller again
ha_down_supervisors() {
  local ns p pids=""
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^lb-ctl[0-9]' || true); do
    for p in $(pids_in_netns "$ns"); do proc_is "$p" lab.sh && pids="$pids $p"; done
  done
  # shellcheck disable=SC2086
  if [ -n "${pids// /}" ]; then
    kill -KILL $pids 2>/dev/null || true
    wait_gone 10 $pids || die "controller supervisors ($pids) survive SIGKILL"
  fi
  return 0
}

ha_status() {
  local n st net lead
  lead=$(ha_leader 2>/dev/null | awk '{print $1}') || true
  for n in $(seq 1 "$ETCD_MEMBERS"); do
    if [ -n "$(etcd_pids "$n")" ]; then st=running; else st=stopped; fi
    echo "etcd$n $st url=$(etcd_url "$n")"
  done
  for n in $(ctl_list); do
    if [ -n "$(ctl_controller_pids "$n")" ]; then st=running; else st=stopped; fi
    [ -n "$(ctl_supervisor_pids "$n")" ] && st="$st supervised" || st="$st unsupervised"
    if ctl_partitioned "$n"; then net=cut-from-etcd; else net=connected; fi
    echo "controller$n $st net=$net url=$(ctl_url "$n")$([ "$lead" = "$n" ] && echo ' LEADER')"
  done
}

ha_paths() {
  local n
  cat <<EOF
LAB_HA=1
CONTROLLERS=$(ctl_list | paste -sd, -)
CONTROLLER_URLS=$(ctl_urls)
ETCD_ENDPOINTS=$(etcd_endpoints)
ETCD_PREFIX=$ETCD_PREFIX
ETCD_DIR=$ETCD_DIR
ETCD_TLS=${LAB_ETCD_TLS:-1}
HA_LEASE_TTL_MS=$LEASE_TTL_MS
HA_FORCE_GRACE_MS=$FORCE_GRACE_MS
EOF
  if etcd_tls; then
    echo "ETCD_CA=$ETCD_PKI/ca.pem"
    echo "ETCD_CLIENT_CERT=$ETCD_PKI/client.pem"
    echo "ETCD_CLIENT_KEY=$ETCD_PKI/client.key"
  fi
  for n in $(seq 1 "$ETCD_MEMBERS"); do
    echo "ETCD_${n}_URL=$(etcd_url "$n")"
    echo "ETCD_${n}_NETNS=$(etcd_ns "$n")"
    echo "ETCD_${n}_LOG=$(etcd_member_dir "$n")/etcd.log"
  done
  for n in $(ctl_list); do
    cat <<EOF
CTL_${n}_URL=$(ctl_url "$n")
CTL_${n}_IP=$(ctl_ip "$n")
CTL_${n}_NETNS=$(ctl_ns "$n")
CTL_${n}_DIR=$(ctl_dir "$n")
CTL_${n}_CONFIG=$(ctl_dir "$n")/controller.toml
CTL_${n}_LOG=$(ctl_dir "$n")/controller.log
CTL_${n}_EXITS=$(ctl_dir "$n")/exits
CTL_${n}_METRICS_URL=http://$(ctl_ip "$n"):9464/metrics
EOF
    if dashboard_in_config "$(ctl_dir "$n")/controller.toml"; then
      echo "CTL_${n}_DASHBOARD_URL=https://$(ctl_ip "$n"):$DASHBOARD_PORT"
    fi
  done
}
