"""The deployment recipes under deploy/ pass their validators
(scripts/check-deploy.sh: systemd-analyze verify, kubernetes-validate, and the
flags and variables they use), and a broken one is caught."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

PY_DIR = Path(__file__).resolve().parent.parent
REPO = PY_DIR.parent
SCRIPT = REPO / "scripts" / "check-deploy.sh"


def run(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # The command the tests built (cargo test builds the bin into target/release).
    env.setdefault("NIXL_ETCD_BIN", str(REPO / "target" / "release" / "nixl-etcd"))
    return subprocess.run(
        ["bash", str(root / "scripts" / "check-deploy.sh")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_every_recipe_passes_its_validators():
    r = run(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    for recipe in ["etcd units", "nixl-etcd-serve.service", "kubernetes-validate"]:
        assert f"check-deploy: ok: {recipe}" in r.stdout, r.stdout
    assert "every recipe passed" in r.stdout


def test_a_misspelled_field_fails_the_check(tmp_path):
    """A copy of the recipes with one unknown Kubernetes field and one unknown
    systemd key: both reported, and the script fails."""
    root = tmp_path / "repo"
    for d in ["deploy", "scripts", "docs"]:
        shutil.copytree(REPO / d, root / d)
    ds = root / "deploy" / "kubernetes" / "nixl-etcd-serve.yaml"
    ds.write_text(ds.read_text().replace("  hostPID: true", "  hostPIDD: true", 1))
    unit = root / "deploy" / "systemd" / "etcd.service"
    unit.write_text(unit.read_text().replace("Restart=", "Restartt=", 1))
    r = run(root)
    assert r.returncode != 0, r.stdout
    assert "hostPIDD" in r.stdout + r.stderr
    assert "Restartt" in r.stdout + r.stderr
