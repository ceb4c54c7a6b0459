#!/usr/bin/env bash
# Runs every test of the project: the Rust workspace (unit, property, integration, doc
# tests; the Kafka tests against a real broker, the KVM tests against /dev/kvm) and the
# notebooks. This is the README's test command and what CI runs.
#
# A broker is started for the run (and stopped after) unless KAFKA_BOOTSTRAP names one.
set -euo pipefail
cd "$(dirname "$0")/.."

run_rust_tests() {
  cargo test --workspace --release --locked "$@"
}

if [ -x scripts/with-kafka.sh ]; then
  scripts/with-kafka.sh bash -c "$(declare -f run_rust_tests); run_rust_tests $*"
else
  run_rust_tests "$@"
fi

if [ -x scripts/run-notebooks.sh ]; then
  scripts/run-notebooks.sh
fi
