#!/usr/bin/env bash
# Builds the Lifeboat RPMs (x86_64) into dist/:
#   lifeboat-VERSION-1.x86_64.rpm             the CLI, its man pages and bash/zsh completions
#   lifeboat-agent-VERSION-1.x86_64.rpm       agent, systemd unit, agent.toml, libvirt qemu hook
#   lifeboat-controller-VERSION-1.x86_64.rpm  controller, systemd unit, controller.toml
#
# usage: scripts/build-rpms.sh [--no-build] [--out DIR]
#   --no-build  use the binaries already in target/release (default: run
#               `cargo build --release --locked --bins` first; a no-op when they are fresh)
#   --out DIR   where the RPMs go (default: dist/)
#
# Needs rpmbuild (Debian: apt-get install rpm; RHEL: dnf install rpm-build). The spec is
# packaging/rpm/lifeboat.spec; see packaging/README.md. VERSION is the workspace version in
# Cargo.toml ("-" becomes "~", RPM's pre-release separator). Respects CARGO_TARGET_DIR and
# SOURCE_DATE_EPOCH (default: the time of the last git commit): packaging the same
# binaries twice gives byte-identical RPMs.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

log() { printf 'build-rpms: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

OUT=dist
BUILD=1
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) BUILD=0 ;;
    --out) [ $# -ge 2 ] || die "--out needs a directory"; OUT=$2; shift ;;
    --out=*) OUT=${1#--out=} ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

command -v rpmbuild >/dev/null ||
  die "rpmbuild not found: install it (Debian: apt-get install rpm; RHEL/Fedora: dnf install rpm-build)"
[ "$(uname -m)" = x86_64 ] || die "builds x86_64 packages from native binaries; this machine is $(uname -m)"

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR=$ROOT/$TARGET_DIR ;; esac
BIN=$TARGET_DIR/release
WORK=$TARGET_DIR/rpmbuild
mkdir -p "$WORK"

# One build at a time per target directory (tests and people may run this concurrently).
exec 9>"$WORK/.lock"
if ! flock -n 9; then
  log "another build-rpms.sh is running on $WORK, waiting"
  flock 9
fi

version=$(awk '
  /^\[workspace\.package\]/ { s = 1; next }
  /^\[/ { s = 0 }
  s && /^version[ \t]*=/ { sub(/^[^"]*"/, ""); sub(/".*$/, ""); print; exit }
' Cargo.toml)
[ -n "$version" ] || die "no version in [workspace.package] of Cargo.toml"
rpm_version=${version//-/\~}

if [ "$BUILD" -eq 1 ]; then
  log "cargo build --release --locked --bins"
  cargo build --release --locked --bins
fi
for b in lifeboat lifeboat-agent lifeboat-controller; do
  [ -x "$BIN/$b" ] || die "$BIN/$b is missing (run without --no-build)"
done
# Stale binaries would be packaged under the wrong version.
for b in lifeboat lifeboat-agent lifeboat-controller; do
  v=$("$BIN/$b" --version 2>&1 | head -n1) || die "$BIN/$b --version failed: $v"
  case "$v" in
    "$b $version"|"$b $version "*) ;;
    *) die "$BIN/$b --version says '$v', Cargo.toml says $version (rebuild without --no-build)" ;;
  esac
done

STAGE=$WORK/stage
TOP=$WORK/top
rm -rf "$STAGE" "$TOP"
mkdir -p "$STAGE"/{bin,man,completions,doc} "$TOP"

log "staging binaries, docs and packaging files in $STAGE"
cp -p "$BIN/lifeboat" "$BIN/lifeboat-agent" "$BIN/lifeboat-controller" "$STAGE/bin/"
cp -a packaging "$STAGE/packaging"
cp README.md docs/cli.md docs/return.md docs/migrate.md docs/operations.md "$STAGE/doc/"
cp packaging/README.md "$STAGE/doc/packaging.md"

log "generating man pages and completions from the CLI definition"
"$BIN/lifeboat" generate man "$STAGE/man" || die "'lifeboat generate man' failed"
[ -s "$STAGE/man/lifeboat.1" ] || die "'lifeboat generate man' wrote no lifeboat.1"
"$BIN/lifeboat" generate completions bash >"$STAGE/completions/lifeboat.bash" ||
  die "'lifeboat generate completions bash' failed"
"$BIN/lifeboat" generate completions zsh >"$STAGE/completions/_lifeboat" ||
  die "'lifeboat generate completions zsh' failed"
for f in "$STAGE/completions/lifeboat.bash" "$STAGE/completions/_lifeboat"; do
  [ -s "$f" ] || die "empty completion script $f"
done

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH

log "rpmbuild (version $rpm_version, SOURCE_DATE_EPOCH $SOURCE_DATE_EPOCH)"
# --nodeps: there are no BuildRequires, and on Debian the rpm database is empty anyway.
rpmbuild -bb --nodeps --target x86_64 \
  --define "_topdir $TOP" \
  --define "lb_version $rpm_version" \
  --define "lb_stage $STAGE" \
  --define "use_source_date_epoch_as_buildtime 1" \
  --define "clamp_mtime_to_source_date_epoch 1" \
  --define "source_date_epoch_from_changelog 0" \
  packaging/rpm/lifeboat.spec >"$WORK/rpmbuild.log" 2>&1 || {
  tail -n 40 "$WORK/rpmbuild.log" >&2
  die "rpmbuild failed (full log: $WORK/rpmbuild.log)"
}

mkdir -p "$OUT"
for n in lifeboat lifeboat-agent lifeboat-controller; do
  rm -f "$OUT/$n"-[0-9]*.x86_64.rpm
  f="$TOP/RPMS/x86_64/$n-$rpm_version-1.x86_64.rpm"
  [ -f "$f" ] || die "rpmbuild did not produce $f"
  cp "$f" "$OUT/"
done
log "done:"
for n in lifeboat lifeboat-agent lifeboat-controller; do
  f="$OUT/$n-$rpm_version-1.x86_64.rpm"
  printf '  %s  %s\n' "$(du -h "$f" | cut -f1)" "$f" >&2
done
