#!/usr/bin/env bash
# Run CMD with a Kafka broker available at $KAFKA_BOOTSTRAP.
#
#   scripts/with-kafka.sh cargo test -p waterbear-stream
#
# If KAFKA_BOOTSTRAP is already set (an existing cluster), CMD runs against it
# unchanged. Otherwise a throwaway single-node broker is started on a free port
# (or KAFKA_PORT) with scripts/kafka.sh, KAFKA_BOOTSTRAP is exported, CMD runs,
# and the broker is stopped and its data removed on exit, whatever happens.
# CMD's exit code is passed through.
#
# Also exported for tests that restart the broker: KAFKA_PORT, KAFKA_RUN_DIR and
# WATERBEAR_KAFKA_SCRIPT (this repository's scripts/kafka.sh).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [[ $# -eq 0 ]]; then
    echo "usage: $0 CMD [ARGS...]" >&2
    exit 2
fi

if [[ -n "${KAFKA_BOOTSTRAP:-}" ]]; then
    echo "with-kafka.sh: using existing KAFKA_BOOTSTRAP=$KAFKA_BOOTSTRAP" >&2
    exec "$@"
fi

if [[ -z "${KAFKA_PORT:-}" || "$KAFKA_PORT" == auto || "$KAFKA_PORT" == 0 ]]; then
    KAFKA_PORT=$("$here/kafka.sh" free-port 19092)
fi
export KAFKA_PORT
export KAFKA_RUN_DIR="${KAFKA_RUN_DIR:-${TMPDIR:-/tmp}/waterbear-kafka-$KAFKA_PORT}"
export WATERBEAR_KAFKA_SCRIPT="$here/kafka.sh"

cleanup() {
    "$here/kafka.sh" stop || true
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

KAFKA_BOOTSTRAP=$("$here/kafka.sh" start)
export KAFKA_BOOTSTRAP
echo "with-kafka.sh: broker at $KAFKA_BOOTSTRAP" >&2

set +e
"$@"
rc=$?
set -e
exit $rc
