# Sourced by the demos: a private etcd on free loopback ports with its data
# under a work directory.
#   start_private_etcd DIR   sets ETCD_PID and ENDPOINT (http://127.0.0.1:PORT)
#   stop_private_etcd        stops it (SIGTERM), if running

ETCD_PID=""
ENDPOINT=""

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

start_private_etcd() {
    local dir="$1" started="" attempt client_port peer_port
    for attempt in 1 2 3 4 5; do
        read -r client_port peer_port < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])
for s in socks:
    s.close()')
        rm -rf "$dir/etcd-data"
        etcd --name demo \
            --data-dir "$dir/etcd-data" \
            --listen-client-urls "http://127.0.0.1:$client_port" \
            --advertise-client-urls "http://127.0.0.1:$client_port" \
            --listen-peer-urls "http://127.0.0.1:$peer_port" \
            --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
            --initial-cluster "demo=http://127.0.0.1:$peer_port" \
            --initial-cluster-state new \
            >"$dir/etcd.log" 2>&1 &
        ETCD_PID=$!
        for _ in $(seq 1 300); do # 300 x 50 ms = 15 s
            if etcd_healthy "$client_port"; then
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
        if ! grep -q "address already in use" "$dir/etcd.log"; then
            break
        fi
        echo "etcd: port clash on attempt $attempt, retrying"
    done
    if [[ -z "$started" ]]; then
        echo "--- tail of etcd log ---" >&2
        tail -n 30 "$dir/etcd.log" >&2 || true
        echo "demo: etcd did not become healthy" >&2
        return 1
    fi
    ENDPOINT="http://127.0.0.1:$client_port"
    echo "etcd (pid $ETCD_PID) is healthy at $ENDPOINT"
}

stop_private_etcd() {
    if [[ -n "$ETCD_PID" ]] && kill -0 "$ETCD_PID" 2>/dev/null; then
        kill -TERM "$ETCD_PID" 2>/dev/null
        wait "$ETCD_PID" 2>/dev/null
    fi
}
