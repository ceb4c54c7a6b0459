#!/usr/bin/env bash
# Runs every test of the project: the Rust workspace (unit, property, integration, doc
# tests; the Kafka tests against a real broker, the KVM tests against /dev/kvm) and the
# notebooks. This is the README's test command and what CI runs.
#
# A broker is started for the run (and stopped after) unless KAFKA_BOOTSTRAP names one.
# The last line sums every test runner's counts: "tests: N passed, N failed".
set -euo pipefail
cd "$(dirname "$0")/.."

log=$(mktemp -t waterbear-test.XXXXXX)
trap 'rm -f "$log"' EXIT

# --no-fail-fast: one failing test binary must not hide the results of the others
cargo_test=(cargo test --workspace --release --locked --no-fail-fast "$@")
status=0
if [ -x scripts/with-kafka.sh ]; then
  scripts/with-kafka.sh "${cargo_test[@]}" 2>&1 | tee "$log" || status=$?
else
  "${cargo_test[@]}" 2>&1 | tee "$log" || status=$?
fi

notebooks_passed=0
notebooks_failed=0
if [ -x scripts/run-notebooks.sh ]; then
  if scripts/run-notebooks.sh 2>&1 | tee -a "$log"; then
    notebooks_passed=$(ls notebooks/*.ipynb 2>/dev/null | wc -l)
  else
    status=1
    notebooks_failed=1
  fi
fi

passed=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($i ~ /^passed;?$/) s += $(i-1) } END { print s + 0 }' "$log")
failed=$(awk '/^test result:/ { for (i = 1; i <= NF; i++) if ($i ~ /^failed;?$/) s += $(i-1) } END { print s + 0 }' "$log")
passed=$((passed + notebooks_passed))
failed=$((failed + notebooks_failed))
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then failed=1; fi
echo "tests: $passed passed, $failed failed"
exit "$status"
