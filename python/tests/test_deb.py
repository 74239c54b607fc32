"""The Debian package (`bash scripts/deb.sh DIR`) installs with `dpkg -i`; a C
example built with `pkg-config --cflags --libs nixl_etcd` against what it
installed runs against etcd; `dpkg -r` takes it all away again."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from conftest import Etcd, engine

PY_DIR = Path(__file__).resolve().parent.parent
REPO = PY_DIR.parent
PACKAGE = "nixl-etcd"


def run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, **kw)
    assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def installed() -> bool:
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", PACKAGE], capture_output=True, text=True)
    return r.stdout.strip() == "install ok installed"


def test_the_deb_installs_and_a_c_example_built_from_it_runs(tmp_path, etcd: Etcd, ns: str):
    assert os.geteuid() == 0, "dpkg -i needs root: run this test as root (CI does)"
    assert not installed(), f"{PACKAGE} is installed on this machine already: not touching it"
    run(["bash", str(REPO / "scripts" / "deb.sh"), str(tmp_path / "deb")], cwd=REPO)
    [deb] = list((tmp_path / "deb").glob(f"{PACKAGE}_*_amd64.deb"))
    listing = run(["dpkg", "-c", str(deb)]).stdout
    for path in [
        "./usr/include/nixl_etcd.h",
        "./usr/lib/x86_64-linux-gnu/libnixl_etcd.so -> libnixl_etcd.so.0",
        "./usr/lib/x86_64-linux-gnu/pkgconfig/nixl_etcd.pc",
        "./usr/bin/nixl-etcd",
        "./lib/systemd/system/nixl-etcd-serve.service",
    ]:
        assert path in listing, listing
    run(["dpkg", "-i", str(deb)])
    try:
        flags = run(["pkg-config", "--cflags", "--libs", "nixl_etcd"]).stdout.split()
        assert "-lnixl_etcd" in flags, flags
        bins = {}
        for name in ["prefill", "decode"]:
            bins[name] = tmp_path / name
            run(["cc", "-O1", "-o", str(bins[name]), str(REPO / "c_examples" / f"{name}.c"), *flags])
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("NIXL_ETCD_", "LD_LIBRARY"))
        }
        env.update(
            VLLM_NIXL_USE_ETCD="1",
            VLLM_NIXL_ETCD_ENDPOINTS=etcd.endpoint,
            VLLM_NIXL_ETCD_NAMESPACE=ns,
        )
        # The programs load the installed library (no LD_LIBRARY_PATH).
        ldd = run(["ldd", str(bins["decode"])], env=env).stdout
        assert re.search(r"libnixl_etcd\.so\.0 => (/usr)?/lib/x86_64-linux-gnu/libnixl_etcd\.so\.0", ldd), ldd
        eng = engine("deb")
        prefill = subprocess.Popen(
            [str(bins["prefill"]), eng, "2"], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )
        try:
            decode = run([str(bins["decode"]), eng, "2", "--timeout-ms", "60000"], env=env)
        finally:
            prefill.send_signal(signal.SIGINT)
            out, _ = prefill.communicate(timeout=60)
        assert prefill.returncode == 0, out
        for rank in (0, 1):
            assert f"decode: rank {rank}: 8192 bytes verified" in decode.stdout, decode.stdout
        assert f"for 2 ranks of {eng}" in decode.stdout, decode.stdout
        version = run(["/usr/bin/nixl-etcd", "--version"]).stdout.strip()
        assert version.startswith("nixl-etcd 0."), version
    finally:
        run(["dpkg", "-r", PACKAGE])
    assert not installed()
    assert not Path("/usr/lib/x86_64-linux-gnu/libnixl_etcd.so.0").exists()
