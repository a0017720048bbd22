#!/usr/bin/env bash
# Runs every `fuzz_*` property test of the workspace for a bounded time each.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [NAME_FILTER]
#
#   SECONDS_PER_TARGET  time per target (default 60); targets built on
#                       fuzz/harness.rs run batches until it has passed, others
#                       run one batch of $PROPTEST_CASES and are killed after
#                       3 x SECONDS + 300 s (a hang is a failure too)
#   NAME_FILTER         only targets whose name contains it (default: all)
#   PROPTEST_CASES      cases per batch (default 256)
#
# Prints cases run, time and rate per target; logs go to target/fuzz-logs/.
# Exits 1 when a target fails (the minimized input and the file holding its
# seed are printed; commit the seed file in fuzz/proptest-regressions/ with the
# fix), 3 when a required target is missing.
set -euo pipefail

secs=${1:-60}
filter=${2:-}
[[ "$secs" =~ ^[0-9]+$ && "$secs" -gt 0 ]] || { echo "usage: $0 [SECONDS_PER_TARGET>0] [NAME_FILTER]" >&2; exit 2; }
cd "$(dirname "$0")/.."
export CARGO_INCREMENTAL=0
export PROPTEST_CASES=${PROPTEST_CASES:-256}
# targets that must exist (the agent->controller messages test is the intake part's)
required=(fuzz_domxml_arbitrary_text fuzz_domxml_corpus_mutations fuzz_config_controller_text
  fuzz_config_controller_mutations fuzz_config_agent_text fuzz_config_agent_mutations fuzz_redfish_answers
  fuzz_cli_args fuzz_cli_config fuzz_cli_live fuzz_agent_messages)
packages=(-p lifeboat-agent -p lifeboat-controller -p lifeboat-cli -p lifeboat-e2e -p lifeboat-common)
logs=target/fuzz-logs
mkdir -p "$logs"

echo "building the CLI binary and the test executables ..."
cargo build -q -p lifeboat-cli
cargo test -q --no-run --message-format=json "${packages[@]}" 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m.get("profile", {}).get("test"):
        print(m["executable"])
' | sort -u > "$logs/executables"

# (executable, test name) of every fuzz_ test
: > "$logs/targets"
while read -r exe; do
  "$exe" --list --format terse 2>/dev/null | sed -n 's/^\(\([^ ]*::\)*fuzz_[A-Za-z0-9_]*\): test$/\1/p' \
    | while read -r t; do printf '%s %s\n' "$exe" "$t"; done >> "$logs/targets"
done < "$logs/executables"

missing=()
for r in "${required[@]}"; do
  grep -Eq " (.*::)?$r\$" "$logs/targets" || missing+=("$r")
done

failed=()
printf '%-40s %10s %9s %10s  %s\n' TARGET CASES SECONDS CASES/S RESULT
while read -r exe t; do
  [[ -z "$filter" || "$t" == *"$filter"* ]] || continue
  log="$logs/${t//::/_}.log"
  start=$(date +%s.%N)
  rc=0
  FUZZ_SECONDS=$secs timeout --kill-after=10 $((secs * 3 + 300)) \
    "$exe" --exact "$t" --nocapture --test-threads 1 > "$log" 2>&1 || rc=$?
  took=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")
  line=$(grep -a -o 'fuzz [A-Za-z0-9_]*: [0-9]* cases in [0-9.]* s ([0-9]* cases/s)' "$log" | tail -1 || true)
  cases=$(sed -n 's/.*: \([0-9]*\) cases in.*/\1/p' <<<"$line")
  rate=$(sed -n 's/.*(\([0-9]*\) cases\/s).*/\1/p' <<<"$line")
  if [[ $rc -eq 0 ]]; then
    result=ok
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
    result="HUNG (killed after $((secs * 3 + 300)) s)"
  else
    result="FAILED (exit $rc)"
  fi
  printf '%-40s %10s %9s %10s  %s\n' "$t" "${cases:--}" "$took" "${rate:--}" "$result"
  if [[ $rc -ne 0 ]]; then
    failed+=("$t")
    echo "---- $t: $log"
    grep -a -A40 -E 'FAILED after|minimized input|panicked at|overflowed its stack' "$log" | grep -av '^ *[0-9]*: \|^ *at ' | head -60
    grep -a -o 'seed saved in [^ ]*' "$log" | head -1 || true
    grep -a -o 'Saving this and future failures in [^ ]*' "$log" | head -1 || true
    echo "----"
  fi
done < "$logs/targets"

if [[ ${#missing[@]} -gt 0 ]]; then
  echo "MISSING required targets: ${missing[*]}" >&2
fi
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "FAILED: ${failed[*]} (logs in $logs/)" >&2
  exit 1
fi
[[ ${#missing[@]} -eq 0 ]] || exit 3
echo "all fuzz targets passed (${secs} s each)"
