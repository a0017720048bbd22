#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds, checks formatting
# (cargo fmt --check) and lints (cargo clippy -D warnings), runs every test.
#   - unit tests of the pure logic and in-process end-to-end tests (real
#     controller, mutual TLS, agents on libvirt's test driver);
#   - the multi-host lab tests (real libvirtd, real qemu guests, namespaces),
#     which need root; without root they print why they skip.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then
  bash scripts/install-deps.sh
else
  echo "test.sh: not root: skipping package installation (the lab tests will skip too)" >&2
fi
export CARGO_TERM_COLOR=never
# A clean clone builds once: incremental caches would only take disk (6 GB).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
# Informational only: never changes the run's outcome.
disk() { { df -h --output=avail,target . | tail -1 | awk -v w="$1" '{ printf "test.sh: %s: %s free on %s\n", w, $1, $2 }' >&2; } || true; }
disk "before the build"
cargo build --workspace --locked --bins

# Lint policy as code: formatting and clippy findings fail the run before any test.
# rustfmt and clippy come with a rustup toolchain as components; add them when missing.
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null; then
      echo "test.sh: installing the missing toolchain component $component" >&2
      rustup component add "$component"
    else
      echo "test.sh: FAILED: cargo ${component/rustfmt/fmt} is missing and there is no rustup to add it" >&2
      exit 1
    fi
  fi
done
if ! cargo fmt --all -- --check; then
  echo "test.sh: FAILED: the code is not formatted (rustfmt.toml); run: cargo fmt --all" >&2
  exit 1
fi
if ! cargo clippy --workspace --all-targets --locked -- -D warnings; then
  echo "test.sh: FAILED: clippy findings (above); fix them, or see which with:" \
    "cargo clippy --workspace --all-targets -- -D warnings (some are fixed by adding --fix --allow-dirty)" >&2
  exit 1
fi

disk "after the build and lints"
status=0
cargo test --workspace --locked --no-fail-fast 2>&1 | tee target/test-output.txt || status=$?
# cargo test's per-binary summaries, added up into one closing line.
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' target/test-output.txt
disk "after the tests"
exit "$status"
