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

# shellcheck source=private-etcd.sh
source "$ROOT/scripts/private-etcd.sh"
WORK=""

section() { printf '\n=== %s ===\n' "$*"; }
die() { echo "demo: $*" >&2; exit 1; }

cleanup() {
    local rc=$?
    set +e
    stop_private_etcd
    if [[ -n "$WORK" ]]; then
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM


section "Installing what is missing (.ci/install, .ci/install-vllm)"
bash .ci/install
bash .ci/install-vllm
VPY="$ROOT/.venv-vllm/bin/python"

section "Building the library (cargo build --release --all-features --lib)"
cargo build --release --all-features --lib
export NIXL_ETCD_LIBRARY="$ROOT/target/release/libnixl_etcd.so"

section "Starting a private etcd"
WORK="$(mktemp -d -t nixl-etcd-demo.XXXXXX)"
start_private_etcd "$WORK" || exit 1


"$VPY" scripts/demo_vllm.py "$WORK" "$ENDPOINT" "$(command -v etcdctl)"
