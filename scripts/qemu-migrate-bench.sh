#!/usr/bin/env bash
# QEMU live-migration reference figures for docs/benchmarks-vmm.md.
#
# Migrates an idle KVM guest of MEM_MIB MiB between two QEMU processes over
# loopback TCP and prints QEMU's own figures (query-migrate / `info migrate`):
# total time, downtime, bytes transferred, throughput.
#
# The guest has no OS: its RAM is filled with random bytes by QEMU's generic
# loader device (so zero-page detection cannot skip it and the comparison with
# waterbear-vmm, whose guest prefills its memory, is fair), and the vCPU idles
# in SeaBIOS after the failed boot. (`-cpu qemu64`: `-cpu host` aborts on
# hosts whose KVM refuses MSR 0x10a, e.g. nested PVM.) QEMU's 128 MiB/s default bandwidth cap is
# lifted; the downtime limit stays at QEMU's default (300 ms).
#
# Usage: scripts/qemu-migrate-bench.sh [MEM_MIB=1024] [PORT=4444] [RUNS=3]
# Needs: qemu-system-x86 (Debian), python3, /dev/kvm.
set -euo pipefail

MEM=${1:-1024}
PORT=${2:-4444}
RUNS=${3:-3}

command -v qemu-system-x86_64 >/dev/null || {
    echo "qemu-system-x86_64 missing: apt-get install -y qemu-system-x86" >&2
    exit 1
}

work=$(mktemp -d)
cleanup() {
    for f in "$work"/*.pid; do
        [ -e "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT

# Everything above the first MiB (BIOS/ROM area) gets random content.
head -c $(((MEM - 2) * 1048576)) /dev/urandom >"$work/fill.bin"

qemu() {
    qemu-system-x86_64 -accel kvm -cpu qemu64 -smp 1 -m "${MEM}M" \
        -nodefaults -display none -serial none \
        -device loader,file="$work/fill.bin",addr=0x100000 \
        "$@"
}

qmp() { # qmp SOCKET MODE: MODE is "migrate PORT" or "status"
    python3 - "$1" "$2" <<'EOF'
import json, socket, sys, time
path = sys.argv[1]
s = socket.socket(socket.AF_UNIX)
for _ in range(200):
    try:
        s.connect(path); break
    except OSError:
        time.sleep(0.05)
f = s.makefile("rw")
json.loads(f.readline())  # greeting
def cmd(name, **args):
    f.write(json.dumps({"execute": name, "arguments": args}) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r or "error" in r:
            return r
cmd("qmp_capabilities")
mode = sys.argv[2]
if mode.startswith("migrate "):
    port = mode.split()[1]
    print(cmd("migrate-set-parameters", **{"max-bandwidth": 100 * 1024**3}))
    t0 = time.monotonic()
    print(cmd("migrate", uri=f"tcp:127.0.0.1:{port}"))
    while True:
        r = cmd("query-migrate")["return"]
        if r.get("status") in ("completed", "failed", "cancelled"):
            break
        time.sleep(0.01)
    wall = time.monotonic() - t0
    ram = r.get("ram", {})
    print(f"RESULT status={r['status']} total_ms={r.get('total-time')} "
          f"downtime_ms={r.get('downtime')} setup_ms={r.get('setup-time')} "
          f"transferred_MiB={ram.get('transferred', 0) / 2**20:.0f} "
          f"mbps={ram.get('mbps')} wall_ms={wall * 1e3:.0f}")
    print(cmd("human-monitor-command", **{"command-line": "info migrate"})["return"])
elif mode == "status":
    print(cmd("query-status")["return"])
EOF
}

for run in $(seq 1 "$RUNS"); do
    rm -f "$work"/*.qmp "$work"/*.pid
    qemu -qmp "unix:$work/src.qmp,server=on,wait=off" -daemonize -pidfile "$work/src.pid"
    qemu -qmp "unix:$work/dst.qmp,server=on,wait=off" -incoming "tcp:127.0.0.1:$PORT" \
        -daemonize -pidfile "$work/dst.pid"
    echo "== run $run: ${MEM} MiB idle guest"
    qmp "$work/src.qmp" "migrate $PORT"
    qmp "$work/dst.qmp" status
    pids="$(cat "$work/src.pid") $(cat "$work/dst.pid")"
    # shellcheck disable=SC2086
    kill $pids 2>/dev/null || true
    for p in $pids; do
        while kill -0 "$p" 2>/dev/null; do sleep 0.1; done
    done
done
