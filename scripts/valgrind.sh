#!/usr/bin/env bash
# The C examples and the Rust tests, once each under valgrind's memcheck:
# invalid reads and writes (use after free, overflows), invalid frees, reads
# of uninitialized memory, and definite leaks fail the run.
#
#   bash scripts/valgrind.sh              # everything (about 6-8 minutes on 2 cores)
#   bash scripts/valgrind.sh examples     # only the C examples (about 1 minute)
#   bash scripts/valgrind.sh tests        # only the Rust test binaries
#   VALGRIND_TESTS="c_api informer" bash scripts/valgrind.sh tests   # chosen test files
#
# Needs valgrind (apt-get install valgrind), etcd and etcdctl (bash .ci/install).
# The C examples run against a private etcd on a free loopback port; each test
# binary starts its own etcd, as in `cargo test`. etcd itself is never run
# under valgrind (--trace-children=no): only our library and its callers are.
# Memory the library keeps on purpose for the life of the process (its tokio
# runtime, which a forked child must not drop) shows as "still reachable" and
# is not an error; definite leaks are.
#
# Prints one line per program ("ok" or "FAILED: see <log>") and a summary;
# exits 1 if anything failed. Logs go to target/valgrind/.
set -euo pipefail

ROOT="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.." && pwd)"
cd "$ROOT"
WHAT="${1:-all}"
OUT="$ROOT/target/valgrind"
mkdir -p "$OUT"

command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }

VG=(valgrind --error-exitcode=99 --trace-children=no --leak-check=full
    --errors-for-leak-kinds=definite --show-leak-kinds=definite
    --num-callers=30 --child-silent-after-fork=no)

passed=0
failed=0
failures=()

# run NAME CMD...: runs CMD under memcheck, its log in $OUT/NAME.log.
# With FORKS=1: CMD forks children that keep running library code. A child
# holds memory owned by threads that it does not have (the parent's runtime
# among it), which memcheck calls "definitely lost" in the child: there,
# only memory errors count, and definite leaks are judged in the parent's
# summary alone.
run() {
    local name="$1"
    shift
    local log="$OUT/$name.log"
    local t0=$SECONDS
    local vg=("${VG[@]}")
    [[ "${FORKS:-0}" == 1 ]] && vg+=(--errors-for-leak-kinds=none)
    if "${vg[@]}" --log-file="$log.vg" "$@" >"$log" 2>&1 && parent_leaks_none "$log.vg"; then
        printf '  %-48s ok (%ds)\n' "$name" $((SECONDS - t0))
        passed=$((passed + 1))
    else
        printf '  %-48s FAILED (exit %d): see %s and %s.vg\n' "$name" $? "$log" "$log"
        failed=$((failed + 1))
        failures+=("$name")
    fi
}

# A program left running under memcheck in the background: bg NAME CMD...
# starts it (its pid in BG_PID); bg_done NAME PID stops it with SIGTERM
# (delivered to the program, which closes its client and exits) and counts
# its result.
bg() {
    local name="$1"
    shift
    "${VG[@]}" --log-file="$OUT/$name.log.vg" "$@" >"$OUT/$name.log" 2>&1 &
    BG_PID=$!
}

bg_done() {
    local name="$1" pid="$2" rc=0
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" || rc=$?
    if [[ "$rc" -eq 0 ]]; then
        printf '  %-48s ok\n' "$name"
        passed=$((passed + 1))
    else
        printf '  %-48s FAILED (exit %d): see %s and %s.vg\n' "$name" "$rc" "$OUT/$name.log" "$OUT/$name.log"
        failed=$((failed + 1))
        failures+=("$name")
    fi
}

# True when the first process in a memcheck log (the one started, not a
# forked child) reports no definite leak.
parent_leaks_none() {
    [[ "${FORKS:-0}" == 1 ]] || return 0
    local parent
    parent="$(grep -o -m1 '^==[0-9]*==' "$1")"
    ! grep "^$parent *definitely lost:" "$1" | grep -vq ' 0 bytes in 0 blocks'
}

ETCD_PID=""
ETCD_DIR=""
cleanup() {
    if [[ -n "$ETCD_PID" ]]; then
        kill "$ETCD_PID" 2>/dev/null || true
        wait "$ETCD_PID" 2>/dev/null || true
    fi
    [[ -n "$ETCD_DIR" ]] && rm -rf "$ETCD_DIR"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

examples() {
    echo "== C examples under valgrind"
    cargo build --release --quiet
    make -s -C c_examples LIBDIR="$ROOT/target/release" >/dev/null
    ETCD_DIR="$(mktemp -d /tmp/nixl-etcd-valgrind-XXXXXX)"
    local cport pport
    cport="$(free_port)"
    pport="$(free_port)"
    etcd --name vg --data-dir "$ETCD_DIR/data" \
        --listen-client-urls "http://127.0.0.1:$cport" --advertise-client-urls "http://127.0.0.1:$cport" \
        --listen-peer-urls "http://127.0.0.1:$pport" --initial-advertise-peer-urls "http://127.0.0.1:$pport" \
        --initial-cluster "vg=http://127.0.0.1:$pport" >"$ETCD_DIR/etcd.log" 2>&1 &
    ETCD_PID=$!
    local i
    for i in $(seq 1 100); do
        ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$cport" endpoint health >/dev/null 2>&1 && break
        sleep 0.1
    done
    export VLLM_NIXL_USE_ETCD=1 VLLM_NIXL_ETCD_ENDPOINTS="http://127.0.0.1:$cport" VLLM_NIXL_ETCD_TIMEOUT=30
    export VLLM_NIXL_ETCD_NAMESPACE="/valgrind/$$"
    # prefill holds 4 ranks while decode (also under valgrind) reads them,
    # then SIGTERM: it closes its client (revoking its lease) and exits.
    bg prefill c_examples/prefill vg_engine 4 --hold 300
    local prefill_pid=$BG_PID
    run decode c_examples/decode vg_engine 4 --timeout-ms 120000
    bg_done prefill "$prefill_pid"
    bg tp_prefill c_examples/tp_prefill vg_tp 4 --hold 300
    local tp_pid=$BG_PID
    run tp_decode c_examples/tp_decode vg_tp 8 --timeout-ms 120000
    bg_done tp_prefill "$tp_pid"
    run restart_demo c_examples/restart_demo
    local left
    left="$(ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$cport" get --prefix "$VLLM_NIXL_ETCD_NAMESPACE" --keys-only)"
    if [[ -n "$left" ]]; then
        echo "  keys left in etcd after every example closed: $left"
        failed=$((failed + 1))
        failures+=("leftover-keys")
    fi
    cleanup
    ETCD_PID=""
    ETCD_DIR=""
}

tests() {
    echo "== Rust test binaries under valgrind"
    # The test files to run (default: every one that needs no NIXL install
    # and no timing: those measure wall time, which valgrind stretches
    # 20-50x; faults.rs runs its close test under valgrind itself).
    local files="${VALGRIND_TESTS:-c_api concurrency env_config fork informer lease hostile_input fuzz_decoders c_examples stress}"
    cargo test --release --no-run --quiet 2>/dev/null || cargo test --release --no-run
    local f bin
    local -a filter
    for f in $files; do
        # A file of tests/integration/ is a module of the `integration`
        # binary (its tests: `FILE::`); the others are binaries of their own.
        filter=()
        if [[ -f "tests/integration/$f.rs" ]]; then
            bin="$(ls -t target/release/deps/integration-* 2>/dev/null | grep -v '\.d$' | head -1 || true)"
            filter=("$f::")
        else
            bin="$(ls -t target/release/deps/"$f"-* 2>/dev/null | grep -v '\.d$' | head -1 || true)"
        fi
        if [[ -z "$bin" ]]; then
            echo "  $f: no test binary found" >&2
            failed=$((failed + 1))
            failures+=("$f")
            continue
        fi
        # One test at a time, fewer fuzz cases, longer client timeouts are
        # up to each test; NIXL_ETCD_UNDER_VALGRIND lets a test widen its
        # time bounds.
        local forks=0
        [[ " fork stress " == *" $f "* ]] && forks=1
        FORKS=$forks PROPTEST_CASES=200 NIXL_ETCD_UNDER_VALGRIND=1 run "test-$f" "$bin" "${filter[@]}" --test-threads=1
    done
}

case "$WHAT" in
    examples) examples ;;
    tests) tests ;;
    all) examples; tests ;;
    *) echo "usage: $0 [all|examples|tests]" >&2; exit 2 ;;
esac

echo "valgrind: $passed passed, $failed failed${failures:+ (${failures[*]})}"
[[ "$failed" -eq 0 ]]
