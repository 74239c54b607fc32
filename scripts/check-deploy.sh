#!/usr/bin/env bash
# Checks every deployment recipe under deploy/ (docs/deploy.md) with a real
# validator, and exits non-zero if any check fails or any validator is missing:
#   deploy/systemd/*.service   systemd-analyze verify (a unit whose ExecStart
#                              binary is absent fails, so nixl-etcd must exist:
#                              installed at /usr/bin/nixl-etcd, or built, see below)
#   deploy/kubernetes/*.yaml   kubernetes-validate --strict (the Kubernetes API's
#                              OpenAPI schemas; unknown fields are errors)
#   both                       every etcd / nixl-etcd flag the recipes pass is
#                              one the installed binaries list in --help, every
#                              VLLM_NIXL_* / NIXL_* variable is a documented one,
#                              and each --kv-transfer-config is valid JSON
#
# Usage: bash scripts/check-deploy.sh
# Environment: NIXL_ETCD_BIN, the nixl-etcd command to check against when
# /usr/bin/nixl-etcd is not installed (default: target/release/nixl-etcd).
set -uo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."

UNITS=(deploy/systemd/etcd.service deploy/systemd/etcd-grpc-proxy.service
       deploy/systemd/nixl-etcd-serve.service)
MANIFESTS=(deploy/kubernetes/etcd.yaml deploy/kubernetes/nixl-etcd-serve.yaml
           deploy/kubernetes/vllm-pd.yaml)
KUBERNETES_VALIDATE_VERSION=1.37.0

failed=()
fail() { echo "check-deploy: FAILED: $*" >&2; failed+=("$1"); }

# --- validators present? ---------------------------------------------------
missing=()
command -v systemd-analyze >/dev/null 2>&1 ||
    missing+=("systemd-analyze (apt-get install systemd)")
[[ -x /usr/bin/etcd ]] ||
    missing+=("/usr/bin/etcd, which the etcd units run (apt-get install etcd-server)")
command -v python3 >/dev/null 2>&1 || missing+=("python3 (apt-get install python3)")
# The command, or the module where pip put the command off PATH (--user).
if command -v kubernetes-validate >/dev/null 2>&1; then
    KUBERNETES_VALIDATE=(kubernetes-validate)
elif python3 -c "import kubernetes_validate" >/dev/null 2>&1; then
    KUBERNETES_VALIDATE=(python3 -m kubernetes_validate)
else
    missing+=("kubernetes-validate (python3 -m pip install kubernetes-validate==$KUBERNETES_VALIDATE_VERSION)")
fi
if [[ -x /usr/bin/nixl-etcd ]]; then
    NIXL_ETCD=/usr/bin/nixl-etcd
else
    NIXL_ETCD="${NIXL_ETCD_BIN:-target/release/nixl-etcd}"
    [[ -x "$NIXL_ETCD" ]] ||
        missing+=("nixl-etcd: not at /usr/bin/nixl-etcd nor $NIXL_ETCD (install the package, or cargo build --release --bin nixl-etcd, or set NIXL_ETCD_BIN)")
fi
for f in "${UNITS[@]}" "${MANIFESTS[@]}"; do
    [[ -f "$f" ]] || missing+=("the recipe $f")
done
if ((${#missing[@]} > 0)); then
    for m in "${missing[@]}"; do echo "check-deploy: missing: $m" >&2; done
    echo "check-deploy: FAILED: cannot check the recipes without the above" >&2
    exit 1
fi

echo "check-deploy: $(systemd-analyze --version | head -1)"
echo "check-deploy: kubernetes-validate $("${KUBERNETES_VALIDATE[@]}" --version)"
echo "check-deploy: $(/usr/bin/etcd --version | head -1)"
echo "check-deploy: $("$NIXL_ETCD" --version) ($NIXL_ETCD)"

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# --- systemd ---------------------------------------------------------------
# systemd-analyze verify exits 0 on unknown keys and unparsable values (it only
# warns and ignores them), so any output at all counts as a failure.
verify() { # LABEL ARGS...
    local label="$1" out rc
    shift
    out="$(systemd-analyze verify "$@" 2>&1)"
    rc=$?
    if [[ $rc -ne 0 || -n "$out" ]]; then
        printf '%s\n' "$out" >&2
        fail "$label: systemd-analyze verify (status $rc)"
    else
        echo "check-deploy: ok: $label: systemd-analyze verify $*"
    fi
}

verify "etcd units" deploy/systemd/etcd.service deploy/systemd/etcd-grpc-proxy.service

if [[ "$NIXL_ETCD" == /usr/bin/nixl-etcd ]]; then
    verify "nixl-etcd-serve.service" deploy/systemd/nixl-etcd-serve.service
else
    # Not installed here: verify in a root laid out as an install would be,
    # the host's systemd units plus this nixl-etcd at /usr/bin/nixl-etcd
    # (verify checks that ExecStart's binary exists and is executable).
    root="$tmp/root"
    mkdir -p "$root/etc/systemd/system" "$root/usr/lib/systemd" "$root/usr/bin"
    sysunits=/usr/lib/systemd/system
    [[ -d "$sysunits" ]] || sysunits=/lib/systemd/system
    cp -a "$sysunits" "$root/usr/lib/systemd/system"
    cp deploy/systemd/nixl-etcd-serve.service "$root/etc/systemd/system/"
    cp "$NIXL_ETCD" "$root/usr/bin/nixl-etcd"
    echo "check-deploy: /usr/bin/nixl-etcd is not installed; verifying nixl-etcd-serve.service in a root with $NIXL_ETCD at /usr/bin/nixl-etcd"
    verify "nixl-etcd-serve.service" --root="$root" nixl-etcd-serve.service
fi

# --- Kubernetes ------------------------------------------------------------
if out="$("${KUBERNETES_VALIDATE[@]}" --strict "${MANIFESTS[@]}" 2>&1)"; then
    printf '%s\n' "$out"
    echo "check-deploy: ok: kubernetes-validate --strict ${MANIFESTS[*]}"
else
    printf '%s\n' "$out" >&2
    fail "Kubernetes manifests: kubernetes-validate --strict"
fi

# --- flags, variables and JSON against the binaries and the docs ----------
/usr/bin/etcd --help >"$tmp/etcd.help" 2>&1
/usr/bin/etcd grpc-proxy start --help >"$tmp/proxy.help" 2>&1
"$NIXL_ETCD" --help >"$tmp/nixl-etcd.help" 2>&1
if python3 - "$tmp" <<'EOF'
import json, re, sys
tmp = sys.argv[1]
helps = {k: open(f"{tmp}/{k}.help").read() for k in ("etcd", "proxy", "nixl-etcd")}
docs = open("docs/configuration.md").read() + open("docs/vllm.md").read()
bad = []

def exec_start(path):
    text = open(path).read().replace("\\\n", " ")
    line = [l for l in text.splitlines() if l.startswith("ExecStart=")]
    return line[0][len("ExecStart="):].split()

def flags(words):
    return [w.split("=", 1)[0] for w in words if w.startswith("--")]

def check_flags(where, words, help_key):
    for f in flags(words):
        if not re.search(r"(^|[\s\[])" + re.escape(f) + r"(\s|=|,|$)", helps[help_key], re.M):
            bad.append(f"{where}: {f} is not in `{help_key} --help`")

check_flags("deploy/systemd/etcd.service", exec_start("deploy/systemd/etcd.service"), "etcd")
check_flags("deploy/systemd/etcd-grpc-proxy.service",
            exec_start("deploy/systemd/etcd-grpc-proxy.service"), "proxy")
check_flags("deploy/systemd/nixl-etcd-serve.service",
            exec_start("deploy/systemd/nixl-etcd-serve.service"), "nixl-etcd")

k8s_etcd = re.findall(r"^\s*- (--[\w-]+)", open("deploy/kubernetes/etcd.yaml").read(), re.M)
check_flags("deploy/kubernetes/etcd.yaml", k8s_etcd, "etcd")
serve = open("deploy/kubernetes/nixl-etcd-serve.yaml").read()
check_flags("deploy/kubernetes/nixl-etcd-serve.yaml",
            re.findall(r"^\s*- (--[\w-]+)", serve, re.M), "nixl-etcd")

names = set()
for path in ("deploy/systemd/nixl-etcd-serve.service", "deploy/kubernetes/nixl-etcd-serve.yaml",
             "deploy/kubernetes/vllm-pd.yaml"):
    text = open(path).read()
    names |= {(path, n) for n in re.findall(r"^Environment=(\w+)=", text, re.M)}
    names |= {(path, n) for n in re.findall(r"^\s*- name: (\w+)\s*$", text, re.M)}
for path, n in sorted(names):
    if re.match(r"(VLLM_NIXL_|NIXL_)", n) and f"`{n}`" not in docs:
        bad.append(f"{path}: {n} is not a variable of docs/configuration.md or docs/vllm.md")

configs = re.findall(r"--kv-transfer-config\n\s*- '([^']*)'", open("deploy/kubernetes/vllm-pd.yaml").read())
if len(configs) != 2:
    bad.append(f"deploy/kubernetes/vllm-pd.yaml: {len(configs)} --kv-transfer-config values, expected 2")
for c in configs:
    try:
        v = json.loads(c)
        assert v["kv_connector"] == "NixlConnector" and v["engine_id"] and \
            v["kv_role"] in ("kv_producer", "kv_consumer", "kv_both"), v
    except Exception as e:
        bad.append(f"deploy/kubernetes/vllm-pd.yaml: --kv-transfer-config {c!r}: {e!r}")

for b in bad:
    print("check-deploy:", b, file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
then
    echo "check-deploy: ok: flags in etcd/nixl-etcd --help, variables documented, kv-transfer-config JSON"
else
    fail "flags, variables and JSON"
fi

if ((${#failed[@]} > 0)); then
    echo "check-deploy: ${#failed[@]} check(s) failed:" >&2
    printf 'check-deploy:   %s\n' "${failed[@]}" >&2
    exit 1
fi
echo "check-deploy: every recipe passed"
