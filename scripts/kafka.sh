#!/usr/bin/env bash
# A real single-node Apache Kafka (KRaft, combined broker+controller) for
# development, tests and CI.
#
#   scripts/kafka.sh start      fetch jars if needed, format a fresh data dir, start, wait until ready
#   scripts/kafka.sh stop       stop the broker and delete its data dir
#   scripts/kafka.sh restart    stop (keeping the data dir) and start again on the same port and data
#   scripts/kafka.sh status     exit 0 and say "up" if the broker answers, else exit 1
#   scripts/kafka.sh bootstrap  print 127.0.0.1:PORT
#   scripts/kafka.sh fetch      only fetch the jars (cached; a second run does no network)
#   scripts/kafka.sh free-port [FROM]  print the first free port from FROM (default 19092)
#
# Environment:
#   KAFKA_VERSION     Apache Kafka version from Maven Central (default 4.1.1)
#   KAFKA_PORT        client port on 127.0.0.1 (default 9092; "auto" picks a free one
#                     for `start` only: pass the printed port to later commands)
#   KAFKA_RUN_DIR     where pid, log, config and data live
#                     (default ${TMPDIR:-/tmp}/waterbear-kafka-$KAFKA_PORT)
#   WATERBEAR_CACHE   jar cache root (default ~/.cache/waterbear); jars go to
#                     $WATERBEAR_CACHE/kafka-$KAFKA_VERSION/libs
#   KAFKA_HEAP_OPTS   JVM heap (default -Xmx512m -Xms128m)
#   KAFKA_JVM_OPTS    more JVM options for the broker (default none), e.g.
#                     -XX:-UseCodeCacheFlushing for benchmarks (docs/benchmarks-stream.md)
#   KAFKA_START_TIMEOUT  seconds to wait for readiness (default 120)
#
# Jars come from Maven Central through Maven (mvn) only; nothing is downloaded
# from elsewhere. The jar cache lives outside the repository.
set -euo pipefail

KAFKA_VERSION="${KAFKA_VERSION:-4.1.1}"
CACHE_ROOT="${WATERBEAR_CACHE:-$HOME/.cache/waterbear}"
KAFKA_HOME="$CACHE_ROOT/kafka-$KAFKA_VERSION"
LIBS="$KAFKA_HOME/libs"
HEAP="${KAFKA_HEAP_OPTS:--Xmx512m -Xms128m}"
JVM_OPTS="${KAFKA_JVM_OPTS:-}"
START_TIMEOUT="${KAFKA_START_TIMEOUT:-120}"

log() { echo "kafka.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

port_in_use() {
    # true when something listens on 127.0.0.1:$1
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

free_port() {
    # first port from $1 upwards that nobody listens on
    local p=$1
    while port_in_use "$p" || { command -v ss >/dev/null && ss -Htln "sport = :$p" | grep -q .; }; do
        p=$((p + 1))
    done
    echo "$p"
}

resolve_port() {
    local p="${KAFKA_PORT:-9092}"
    if [[ "$p" == auto || "$p" == 0 ]]; then
        p=$(free_port 19092)
    fi
    [[ "$p" =~ ^[0-9]+$ ]] || die "KAFKA_PORT must be a number or 'auto', got '$p'"
    PORT=$p
    RUN_DIR="${KAFKA_RUN_DIR:-${TMPDIR:-/tmp}/waterbear-kafka-$PORT}"
    PID_FILE="$RUN_DIR/kafka.pid"
    LOG_FILE="$RUN_DIR/server.log"
    DATA_DIR="$RUN_DIR/data"
    PROPS="$RUN_DIR/server.properties"
}

fetch() {
    if [[ -f "$LIBS/.complete" ]]; then
        return 0
    fi
    command -v mvn >/dev/null || die "mvn not found (apt-get install maven)"
    command -v java >/dev/null || die "java not found (apt-get install openjdk-17-jre-headless)"
    log "fetching Apache Kafka $KAFKA_VERSION jars from Maven Central into $LIBS (first use only)"
    local t0=$SECONDS
    mkdir -p "$KAFKA_HOME"
    # kafka_2.13 is the broker (kafka.Kafka, kafka.tools.StorageTool); kafka-tools
    # has BrokerApiVersionsCommand (readiness probe); log4j-slf4j2-impl and
    # log4j-core give the log4j2 binding the scripts in Kafka's bin/ would use.
    cat >"$KAFKA_HOME/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>waterbear</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka-tools</artifactId><version>$KAFKA_VERSION</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-api</artifactId><version>2.0.17</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j2-impl</artifactId><version>2.24.3</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-core</artifactId><version>2.24.3</version></dependency>
  </dependencies>
</project>
EOF
    rm -rf "$LIBS.tmp"
    mvn -B -q -Dstyle.color=never -f "$KAFKA_HOME/pom.xml" -Dmaven.repo.local="$CACHE_ROOT/m2" \
        org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
        -DincludeScope=runtime -DoutputDirectory="$LIBS.tmp" >&2 \
        || die "mvn failed to fetch Kafka $KAFKA_VERSION"
    touch "$LIBS.tmp/.complete"
    rm -rf "$LIBS"
    mv "$LIBS.tmp" "$LIBS"
    log "fetched $(ls "$LIBS" | wc -l) jars in $((SECONDS - t0))s"
}

java_cls() {
    # run a Kafka class from the cached jars with a small, fast-starting JVM
    local cls=$1
    shift
    timeout 60 java -Xmx256m -XX:TieredStopAtLevel=1 -XX:+UseSerialGC \
        -Dlog4j2.configurationFile="$RUN_DIR/log4j2-tools.properties" \
        -cp "$LIBS/*" "$cls" "$@"
}

write_config() {
    local cport=$1
    mkdir -p "$RUN_DIR"
    cat >"$PROPS" <<EOF
# generated by scripts/kafka.sh
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
listeners=PLAINTEXT://127.0.0.1:$PORT,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$DATA_DIR
num.partitions=1
default.replication.factor=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=8
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=true
log.segment.bytes=104857600
# Each partition's offset and time indexes are sparse files of this size,
# mapped into memory. The first write faults in a page and the kernel reads
# ahead around it; on a disk with a large readahead (8 MiB here) that zeroes
# most of a 10 MiB default index, twice per new partition or segment. A
# 100 MiB segment needs ~200 KiB of offset index and ~300 KiB of time index.
log.index.size.max.bytes=1048576
log.retention.hours=24
num.network.threads=2
num.io.threads=4
EOF
    cat >"$RUN_DIR/log4j2.properties" <<EOF
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
EOF
    cat >"$RUN_DIR/log4j2-tools.properties" <<EOF
status = error
appender.err.type = Console
appender.err.name = err
appender.err.target = SYSTEM_ERR
appender.err.layout.type = PatternLayout
appender.err.layout.pattern = %p %m%n
rootLogger.level = ERROR
rootLogger.appenderRef.err.ref = err
EOF
    echo "$cport" >"$RUN_DIR/controller.port"
}

pid_alive() {
    [[ -f "$PID_FILE" ]] && kill -0 "$(cat "$PID_FILE")" 2>/dev/null
}

probe_class() {
    # (Kafka 3.5+ has it in kafka-tools; older in core)
    if unzip -l "$LIBS/kafka-tools-$KAFKA_VERSION.jar" org/apache/kafka/tools/BrokerApiVersionsCommand.class >/dev/null 2>&1; then
        echo org.apache.kafka.tools.BrokerApiVersionsCommand
    else
        echo kafka.admin.BrokerApiVersionsCommand
    fi
}

# Ready = the port accepts connections AND the broker answers a metadata +
# ApiVersions round trip (BrokerApiVersionsCommand lists brokers from a
# Metadata response, so an empty/unelected cluster does not count).
broker_answers() {
    port_in_use "$PORT" || return 1
    local out
    out=$(java_cls "$(probe_class)" --bootstrap-server "127.0.0.1:$PORT" 2>/dev/null) || return 1
    [[ "$out" == *"127.0.0.1:$PORT (id: 1"* ]]
}

wait_ready() {
    local deadline=$((SECONDS + START_TIMEOUT))
    while ((SECONDS < deadline)); do
        if ! pid_alive; then
            tail -n 40 "$LOG_FILE" >&2 || true
            die "broker process exited during startup (log: $LOG_FILE)"
        fi
        # cheap check first: do not spawn a JVM before the socket is even open
        if port_in_use "$PORT" && broker_answers; then
            return 0
        fi
        sleep 0.5
    done
    tail -n 40 "$LOG_FILE" >&2 || true
    die "broker not ready within ${START_TIMEOUT}s (log: $LOG_FILE)"
}

launch() {
    # shellcheck disable=SC2086
    nohup java $HEAP -XX:+UseG1GC -XX:MaxGCPauseMillis=20 $JVM_OPTS -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$RUN_DIR/log4j2.properties" \
        -cp "$LIBS/*" kafka.Kafka "$PROPS" >>"$LOG_FILE" 2>&1 </dev/null &
    echo $! >"$PID_FILE"
}

cmd_start() {
    resolve_port
    if pid_alive; then
        log "already running (pid $(cat "$PID_FILE")) at 127.0.0.1:$PORT"
        echo "127.0.0.1:$PORT"
        return 0
    fi
    port_in_use "$PORT" && die "127.0.0.1:$PORT is already in use by another process (set KAFKA_PORT or KAFKA_PORT=auto)"
    fetch
    local t0=$SECONDS cport
    rm -rf "$RUN_DIR"
    mkdir -p "$RUN_DIR"
    cport=$(free_port $((PORT + 1)))
    write_config "$cport"
    local cluster_id
    # URL-safe base64 of 16 random bytes, as Kafka's own Uuid.randomUuid(), which also
    # draws again when the id starts with '-': the tool's argument parser would take
    # such an id for an option ("--cluster-id: expected one argument", 1 start in 64).
    cluster_id=-
    while [ "${cluster_id#-}" != "$cluster_id" ]; do
        cluster_id=$(head -c16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
    done
    java_cls kafka.tools.StorageTool format -t "$cluster_id" -c "$PROPS" >"$RUN_DIR/format.log" 2>&1 \
        || { cat "$RUN_DIR/format.log" >&2; die "kafka-storage format failed"; }
    launch
    wait_ready
    log "up at 127.0.0.1:$PORT (pid $(cat "$PID_FILE"), started in $((SECONDS - t0))s, log $LOG_FILE)"
    echo "127.0.0.1:$PORT"
}

stop_process() {
    if pid_alive; then
        local pid deadline
        pid=$(cat "$PID_FILE")
        kill "$pid" 2>/dev/null || true
        deadline=$((SECONDS + 30))
        while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then
            log "broker did not stop in 30s, killing"
            kill -9 "$pid" 2>/dev/null || true
            while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
        fi
    fi
    rm -f "$PID_FILE"
}

cmd_stop() {
    resolve_port
    stop_process
    rm -rf "$RUN_DIR"
    log "stopped 127.0.0.1:$PORT"
}

# Stop and start again on the same port with the same data (for broker-restart tests).
cmd_restart() {
    resolve_port
    [[ -f "$PROPS" ]] || die "no broker was started at 127.0.0.1:$PORT"
    stop_process
    local deadline=$((SECONDS + 30))
    while port_in_use "$PORT" && ((SECONDS < deadline)); do sleep 0.1; done
    launch
    wait_ready
    log "restarted at 127.0.0.1:$PORT"
}

cmd_status() {
    resolve_port
    if pid_alive && broker_answers; then
        echo "up 127.0.0.1:$PORT pid $(cat "$PID_FILE")"
    elif pid_alive; then
        echo "starting/unresponsive 127.0.0.1:$PORT pid $(cat "$PID_FILE")"
        return 1
    else
        echo "down 127.0.0.1:$PORT"
        return 1
    fi
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
restart) cmd_restart ;;
status) cmd_status ;;
bootstrap) resolve_port; echo "127.0.0.1:$PORT" ;;
free-port) free_port "${2:-19092}" ;;
fetch) fetch ;;
*) echo "usage: $0 start|stop|restart|status|bootstrap|fetch|free-port" >&2; exit 2 ;;
esac
