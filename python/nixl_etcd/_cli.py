"""The `nixl-etcd` command of the wheel: runs the command shipped inside the
package (nixl_etcd/bin/nixl-etcd), with this process's arguments."""

from __future__ import annotations

import os
import sys
from pathlib import Path

BIN = Path(__file__).resolve().parent / "bin" / "nixl-etcd"


def main() -> None:
    if not os.access(BIN, os.X_OK):
        sys.exit(
            f"nixl-etcd: the command is not in this installation ({BIN}); an editable or "
            "source install ships none: run target/release/nixl-etcd, or install the wheel "
            "(bash scripts/wheel.sh DIR)"
        )
    os.execv(BIN, [str(BIN)] + sys.argv[1:])
