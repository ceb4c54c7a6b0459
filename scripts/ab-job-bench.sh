#!/usr/bin/env bash
# Runs two builds of the job_bench example alternately against one warmed broker, so
# the host's drift (tens of percent within minutes) falls on both alike.
#
#   scripts/ab-job-bench.sh A_BIN B_BIN [PAIRS] [WARMUP] [-- job_bench args]
#
# A_BIN, B_BIN: job_bench binaries of the two builds (copy
# "$CARGO_TARGET_DIR/release/examples/job_bench" after building each). PAIRS
# (default 4) pairs A,B / B,A / ...; WARMUP (default 2) runs of A first, not
# reported: a fresh broker's JIT is still compiling (docs/benchmarks-stream.md).
# Needs KAFKA_BOOTSTRAP (and KAFKA_RUN_DIR or KAFKA_PID for the broker's CPU).
# Start the broker with KAFKA_JVM_OPTS=-XX:-UseCodeCacheFlushing: otherwise the
# JVM drops its compiled transaction code between runs and compiles it again
# in every end-to-end phase (docs/benchmarks-stream.md, sixteenth measurement):
#   KAFKA_JVM_OPTS=-XX:-UseCodeCacheFlushing KAFKA_PORT=19500 KAFKA_RUN_DIR=/tmp/wbk scripts/kafka.sh start
# Prints each run's summary lines; full logs go to $AB_LOG_DIR (default a temp dir).
set -euo pipefail

a=${1:?A_BIN}
b=${2:?B_BIN}
shift 2
pairs=4
warmup=2
if [ $# -gt 0 ] && [ "$1" != "--" ]; then pairs=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" != "--" ]; then warmup=$1; shift; fi
if [ $# -gt 0 ] && [ "$1" = "--" ]; then shift; fi
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  args=(--records 2400000 --hosts 5000 --wire binary --latency-secs 5)
fi
: "${KAFKA_BOOTSTRAP:?set KAFKA_BOOTSTRAP to the broker to measure against}"
logs=${AB_LOG_DIR:-$(mktemp -d -t ab-job-bench.XXXXXX)}
mkdir -p "$logs"
echo "logs in $logs; args: ${args[*]}"

run() { # label binary n
  local log="$logs/$3-$1.log"
  "$2" "${args[@]}" >"$log" 2>&1 || { echo "$1 run $3 failed, see $log"; return 1; }
  echo "== $1 (run $3)"
  grep -E '^(consume-only|end to end \(|ratio e2e/higher|steady state|scorer done|latency @|cpu end to end)' "$log" || true
}

for i in $(seq 1 "$warmup"); do
  "$a" "${args[@]}" >"$logs/warmup-$i.log" 2>&1 || true
done
n=0
for i in $(seq 1 "$pairs"); do
  if [ $((i % 2)) -eq 1 ]; then order=(A B); else order=(B A); fi
  for which in "${order[@]}"; do
    n=$((n + 1))
    if [ "$which" = A ]; then run A "$a" "$n"; else run B "$b" "$n"; fi
  done
done
