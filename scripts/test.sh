#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds, runs every test.
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
cargo build --workspace --locked --bins
status=0
cargo test --workspace --locked --no-fail-fast 2>&1 | tee target/test-output.txt || status=$?
# cargo test's per-binary summaries, added up into one closing line.
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' target/test-output.txt
exit "$status"
