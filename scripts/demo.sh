#!/usr/bin/env bash
# The guide's two terminals, for real: vLLM's CPU build runs a prefill engine and
# a decode engine (stock NixlConnector, VLLM_NIXL_USE_ETCD=1) that find each
# other through a private etcd, on a tiny Llama made locally (no download).
# Prints the generated text, the handshake time, etcdctl's view of the keys,
# and the keys gone after the prefill exits.
#
#   bash scripts/demo.sh
#
# Installs what is missing first (.ci/install, .ci/install-vllm: the vLLM venv,
# about 6.3 GB, at .venv-vllm). The C demo is scripts/demo-c.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
cd "$ROOT"

WORK=""
ETCD_PID=""

section() { printf '\n=== %s ===\n' "$*"; }
die() { echo "demo: $*" >&2; exit 1; }

cleanup() {
    local rc=$?
    set +e
    if [[ -n "$ETCD_PID" ]] && kill -0 "$ETCD_PID" 2>/dev/null; then
        kill -TERM "$ETCD_PID" 2>/dev/null
        wait "$ETCD_PID" 2>/dev/null
    fi
    if [[ -n "$WORK" ]]; then
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# True when http://127.0.0.1:$1/health reports healthy.
etcd_healthy() {
    python3 - "$1" <<'PY' 2>/dev/null
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=0.5) as r:
        sys.exit(0 if b'"health":"true"' in r.read() else 1)
except Exception:
    sys.exit(1)
PY
}

section "Installing what is missing (.ci/install, .ci/install-vllm)"
bash .ci/install
bash .ci/install-vllm
VPY="$ROOT/.venv-vllm/bin/python"

section "Building the library (cargo build --release --all-features --lib)"
cargo build --release --all-features --lib
export NIXL_ETCD_LIBRARY="$ROOT/target/release/libnixl_etcd.so"

section "Starting a private etcd"
WORK="$(mktemp -d -t nixl-etcd-demo.XXXXXX)"
started=""
for attempt in 1 2 3 4 5; do
    read -r CLIENT_PORT PEER_PORT < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
for s in socks:
    s.close()')
    rm -rf "$WORK/etcd-data"
    etcd --name demo \
        --data-dir "$WORK/etcd-data" \
        --listen-client-urls "http://127.0.0.1:$CLIENT_PORT" \
        --advertise-client-urls "http://127.0.0.1:$CLIENT_PORT" \
        --listen-peer-urls "http://127.0.0.1:$PEER_PORT" \
        --initial-advertise-peer-urls "http://127.0.0.1:$PEER_PORT" \
        --initial-cluster "demo=http://127.0.0.1:$PEER_PORT" \
        --initial-cluster-state new \
        >"$WORK/etcd.log" 2>&1 &
    ETCD_PID=$!
    for _ in $(seq 1 300); do # 300 x 50 ms = 15 s
        if etcd_healthy "$CLIENT_PORT"; then
            started=yes
            break
        fi
        kill -0 "$ETCD_PID" 2>/dev/null || break
        sleep 0.05
    done
    [[ -n "$started" ]] && break
    kill -KILL "$ETCD_PID" 2>/dev/null || true
    wait "$ETCD_PID" 2>/dev/null || true
    ETCD_PID=""
    if ! grep -q "address already in use" "$WORK/etcd.log"; then
        break
    fi
    echo "etcd: port clash on attempt $attempt, retrying"
done
if [[ -z "$started" ]]; then
    echo "--- tail of etcd log ---" >&2
    tail -n 30 "$WORK/etcd.log" >&2 || true
    die "etcd did not become healthy"
fi
ENDPOINT="http://127.0.0.1:$CLIENT_PORT"
echo "etcd (pid $ETCD_PID) is healthy at $ENDPOINT"


"$VPY" scripts/demo_vllm.py "$WORK" "$ENDPOINT" "$(command -v etcdctl)"
