#!/usr/bin/env bash
# End-to-end demo of nixl-etcd on one machine: a private etcd, a prefill
# process publishing 4 ranks of agent metadata under a lease, a decode process
# discovering and verifying them, then the prefill's clean exit removing its
# keys.
#
#   bash scripts/demo-c.sh
set -euo pipefail

ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
cd "$ROOT"

ENGINE=prefill_engine
NRANKS=4
PREFIX=/vllm/nixl/agents/

# shellcheck source=private-etcd.sh
source "$ROOT/scripts/private-etcd.sh"
WORK=""
PREFILL_PID=""

section() { printf '\n=== %s ===\n' "$*"; }
die() { echo "demo: $*" >&2; exit 1; }

cleanup() {
    local rc=$?
    set +e
    if [[ -n "$PREFILL_PID" ]] && kill -0 "$PREFILL_PID" 2>/dev/null; then
        kill -TERM "$PREFILL_PID" 2>/dev/null
        wait "$PREFILL_PID" 2>/dev/null
    fi
    stop_private_etcd
    if [[ -n "$WORK" ]]; then
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM


section "Installing system dependencies"
bash .ci/install

section "Building the library (cargo build --release)"
cargo build --release

section "Building the C examples"
make -C c_examples LIBDIR="$PWD/target/release"

section "Starting a private etcd"
WORK="$(mktemp -d -t nixl-etcd-demo.XXXXXX)"
start_private_etcd "$WORK" || exit 1

export ETCDCTL_API=3
ETCDCTL=(etcdctl --endpoints "$ENDPOINT")

export VLLM_NIXL_USE_ETCD=1
export VLLM_NIXL_ETCD_ENDPOINTS="$ENDPOINT"
# The demo uses the default namespace and timeout.
unset VLLM_NIXL_ETCD_NAMESPACE VLLM_NIXL_ETCD_TIMEOUT
echo "VLLM_NIXL_USE_ETCD=$VLLM_NIXL_USE_ETCD"
echo "VLLM_NIXL_ETCD_ENDPOINTS=$VLLM_NIXL_ETCD_ENDPOINTS"

section "Terminal 1: prefill registers $NRANKS ranks of $ENGINE"
c_examples/prefill "$ENGINE" "$NRANKS" --hold 60 >"$WORK/prefill.log" 2>&1 &
PREFILL_PID=$!
for _ in $(seq 1 600); do # 600 x 50 ms = 30 s
    grep -q "holding" "$WORK/prefill.log" && break
    kill -0 "$PREFILL_PID" 2>/dev/null || break
    sleep 0.05
done
cat "$WORK/prefill.log"
PREFILL_SHOWN="$(wc -l <"$WORK/prefill.log")"
if ! grep -q "holding" "$WORK/prefill.log"; then
    die "prefill did not register its ranks"
fi

section "etcd contents: values under $PREFIX (first 600 bytes)"
"${ETCDCTL[@]}" get --prefix "$PREFIX" --print-value-only >"$WORK/values"
head -c 600 "$WORK/values"
echo

section "Lease of ${PREFIX}$ENGINE/rank_0"
"${ETCDCTL[@]}" get "${PREFIX}$ENGINE/rank_0" -w json >"$WORK/rank0.json"
LEASE_HEX="$(python3 -c '
import json, sys
kvs = json.load(open(sys.argv[1])).get("kvs") or []
lease = kvs[0].get("lease", 0) if kvs else 0
print(format(lease, "016x"))' "$WORK/rank0.json")"
if [[ "$LEASE_HEX" == "0" ]]; then
    echo "rank_0 is not attached to a lease"
else
    echo "rank_0 is attached to lease $LEASE_HEX"
    "${ETCDCTL[@]}" lease timetolive "$LEASE_HEX" --keys
fi

section "Terminal 2: decode discovers $NRANKS ranks of $ENGINE"
decode_rc=0
c_examples/decode "$ENGINE" "$NRANKS" || decode_rc=$?
if ((decode_rc != 0)); then
    die "decode failed with exit status $decode_rc"
fi

section "Stopping prefill (SIGTERM): closing the client revokes its lease"
kill -TERM "$PREFILL_PID"
prefill_rc=0
wait "$PREFILL_PID" || prefill_rc=$?
PREFILL_PID=""
tail -n +"$((PREFILL_SHOWN + 1))" "$WORK/prefill.log"
if ((prefill_rc != 0)); then
    die "prefill exited with status $prefill_rc"
fi

section "etcd contents after prefill exit"
KEYS="$("${ETCDCTL[@]}" get --prefix "$PREFIX" --keys-only)"
if [[ -z "$KEYS" ]]; then
    echo "no keys left under $PREFIX: the registration is gone"
else
    echo "$KEYS"
    die "keys are still registered under $PREFIX after prefill exit"
fi

section "Stopping etcd"
kill -TERM "$ETCD_PID"
wait "$ETCD_PID" || true
ETCD_PID=""
echo "etcd stopped"

section "Demo completed"
