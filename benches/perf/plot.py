#!/usr/bin/env python3
"""Draws the perf benchmark's report as one PNG.

    python3 benches/perf/plot.py target/perf/perf.json target/perf/perf.png

Reads what benches/perf/main.rs writes (rows[] from Row::to_json) and draws,
per etcd setup (single member, then the 3-member cluster if present), the
latency distribution of every operation: ours, its floor (the raw etcd-client
doing the same etcd work) and NIXL's built-in exchange where it has an
equivalent, as box plots on a log microsecond axis. Any series may be missing
or null. (Fleet start-up has its own benchmark: cargo bench --bench fleet.)

Needs matplotlib (pip install matplotlib).
"""

import datetime
import json
import math
import os
import platform
import socket
import sys
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

# (key in the row, legend label, colour)
SERIES = (
    ("ours", "nixl-etcd (ours)", "#1f6fb4"),
    ("floor", "floor: raw etcd-client, same etcd work", "#8c8c8c"),
    ("nixl", "NIXL built-in etcd exchange", "#e07b10"),
)
SETUP_TITLES = {
    "single": "single etcd member (loopback)",
    "cluster3": "3-member etcd cluster (loopback)",
}
BOX_HEIGHT = 0.24
# boxplot's `vert` gave way to `orientation` in matplotlib 3.10.
_MPL = tuple(int(x) for x in matplotlib.__version__.split(".")[:2] if x.isdigit())
HORIZONTAL = {"orientation": "horizontal"} if _MPL >= (3, 10) else {"vert": False}


def samples(row, key):
    """The finite, positive samples of one series of a row, or []."""
    field = {"ours": "ours_samples_us", "floor": "floor_samples_us",
             "nixl": "nixl_samples_us"}[key]
    vals = row.get(field) or []
    out = []
    for v in vals:
        if isinstance(v, (int, float)) and math.isfinite(v) and v > 0:
            out.append(float(v))
    return out


def pct(values, p):
    v = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(v)))
    return v[min(rank, len(v)) - 1]


def fmt_us(us):
    if us >= 1e6:
        return f"{us / 1e6:.2f} s"
    if us >= 1e3:
        return f"{us / 1e3:.3g} ms"
    return f"{us:.3g} µs"


def machine_name(doc):
    name = os.environ.get("NIXL_ETCD_BENCH_MACHINE") or doc.get("machine")
    if name:
        return str(name)
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [socket.gethostname(), f"{os.cpu_count()} cores"]
    if cpu:
        parts.append(cpu)
    return ", ".join(parts)


def run_date(doc, json_path):
    if doc.get("date"):
        return str(doc["date"])
    t = os.path.getmtime(json_path)
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")


def op_label(row):
    label = textwrap.fill(str(row.get("op") or "?"), 44)
    if row.get("floor_op") and samples(row, "floor"):
        label += "\n" + textwrap.fill(f"floor: {row['floor_op']}", 44)
    return label


def draw_setup(ax, rows, title, xlim):
    """Horizontal box plots, one group of up to three boxes per operation."""
    # Ours on top of its group, then the floor, then NIXL.
    offsets = {"ours": BOX_HEIGHT * 1.1, "floor": 0.0, "nixl": -BOX_HEIGHT * 1.1}
    yticks, ylabels = [], []
    for i, row in enumerate(rows):
        base = len(rows) - 1 - i  # first row on top
        yticks.append(base)
        ylabels.append(op_label(row))
        for key, _label, colour in SERIES:
            vals = samples(row, key)
            if not vals:
                continue
            y = base + offsets[key]
            ax.boxplot(
                [vals], positions=[y], widths=BOX_HEIGHT, **HORIZONTAL,
                whis=(1, 99), showfliers=False, patch_artist=True, manage_ticks=False,
                boxprops=dict(facecolor=colour, edgecolor="black", linewidth=0.6, alpha=0.85),
                medianprops=dict(color="black", linewidth=1.4),
                whiskerprops=dict(color=colour, linewidth=1.0),
                capprops=dict(color=colour, linewidth=1.0),
            )
            ax.annotate(
                f"p50 {fmt_us(pct(vals, 50))}  p99 {fmt_us(pct(vals, 99))}  "
                f"max {fmt_us(max(vals))}  n={len(vals)}",
                xy=(pct(vals, 99), y), xytext=(6, 0), textcoords="offset points",
                va="center", fontsize=7, color="#333333",
            )
    ax.set_yticks(yticks)
    ax.set_yticklabels(ylabels, fontsize=8)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.set_xscale("log")
    ax.set_xlim(*xlim)
    ax.set_xlabel("latency (µs, log scale)")
    ax.grid(axis="x", which="major", linestyle=":", alpha=0.6)
    ax.grid(axis="x", which="minor", linestyle=":", alpha=0.2)
    for b in range(len(rows) - 1):
        ax.axhline(b + 0.5, color="#dddddd", linewidth=0.6)
    ax.set_title(title, fontsize=10, loc="left")


def main(argv):
    if len(argv) != 3:
        print("usage: plot.py PERF_JSON OUT_PNG", file=sys.stderr)
        return 2
    json_path, png_path = argv[1], argv[2]
    try:
        with open(json_path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as e:
        print(f"plot.py: cannot read {json_path}: {e}", file=sys.stderr)
        return 1
    rows = [r for r in (doc.get("rows") or []) if isinstance(r, dict)]

    def has_data(r):
        return any(samples(r, k) for k, _, _ in SERIES)

    setups = []
    for name in ["single", "cluster3"] + sorted({str(r.get("setup")) for r in rows}):
        group = [r for r in rows if str(r.get("setup")) == name and has_data(r)]
        if group and name not in [s for s, _ in setups]:
            setups.append((name, group))

    # One x range for every setup, so that the panels compare; room on the
    # right for the annotations.
    every = [samples(r, k) for _, g in setups for r in g for k, _, _ in SERIES]
    every = [v for v in every if v]
    if every:
        xlim = (min(min(v) for v in every) / 2, max(pct(v, 99) for v in every) * 150)
    else:
        xlim = (1, 1e6)

    heights = [max(2.2, 1.05 * len(g)) for _, g in setups] or [2.2]
    head_in = 0.6  # inches above the panels for the legend (tight_layout makes room for the title)
    fig_h = sum(heights) + head_in + 0.6
    fig, axes = plt.subplots(len(heights), 1, figsize=(13, fig_h),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    axes = axes[:, 0]
    for ax, (name, group) in zip(axes, setups):
        draw_setup(ax, group, SETUP_TITLES.get(name, name), xlim)
    if not setups:
        fig.text(0.5, 0.6, "no latency samples in " + json_path, ha="center", color="#777777")

    title = f"nixl-etcd performance: {machine_name(doc)}, {run_date(doc, json_path)}"
    sub = []
    if doc.get("etcd"):
        sub.append(str(doc["etcd"]))
    if doc.get("samples"):
        sub.append(f"{doc['samples']} samples per operation asked for")
    sub.append("box: p25-p75, line: p50, whiskers: p1-p99")
    fig.suptitle(title + "\n" + "; ".join(sub), fontsize=11)
    handles = [Patch(facecolor=c, edgecolor="black", label=l) for _, l, c in SERIES]
    fig.legend(handles=handles, loc="upper center", fontsize=8, ncol=3,
               bbox_to_anchor=(0.5, 1 - 0.78 / fig_h))
    fig.tight_layout(rect=(0, 0, 1, 1 - head_in / fig_h))
    out_dir = os.path.dirname(os.path.abspath(png_path))
    os.makedirs(out_dir, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    print(f"plot.py: wrote {png_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
