"""Draw bench/peers.py's pool size and usage over time, one subplot per workload:

    python -m bench.peers_plot peers.json docs/peers.png

Runs on the host after the guest run (bench/run_peers); needs matplotlib (the bench extra).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COLORS = {
    "presized": "#999999",
    "thinwatchd": "#1f77b4",
    "thinwatchd-tight": "#17becf",
    "floor": "#2ca02c",
    "lvm2": "#d62728",
    "diy": "#ff7f0e",
    "docker-fixed": "#9467bd",
}


def plot(result: dict[str, Any], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on the host
    import matplotlib.pyplot as plt

    workloads = list(result["cells"])
    fig, axes = plt.subplots(len(workloads), 1, figsize=(10, 3.6 * len(workloads)), squeeze=False)
    for ax, workload in zip(axes[:, 0], workloads, strict=True):
        for system, cell in result["cells"][workload].items():
            series = cell.get("series")
            if not series or not series["t"]:
                continue
            color = COLORS.get(system)
            ax.plot(series["t"], series["data_mib"], color=color, lw=1.8, label=system)
            ax.plot(series["t"], series["used_mib"], color=color, lw=1.0, ls="--")
            if cell.get("writer_exit") != 0:  # where the writer failed
                ax.plot(series["t"][-1], series["used_mib"][-1], "x", color=color, ms=10, mew=2)
        ax.set_title(
            f"{workload}: pool data size (solid) and used (dashed); x: writer failed", fontsize=10
        )
        ax.set_xlabel("seconds since the writer started")
        ax.set_ylabel("MiB (log)")
        ax.set_yscale("log")
        ax.set_ylim(bottom=16)
        ax.grid(True, which="both", alpha=0.3)
    # One legend for all: a system has the same colour in every subplot.
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)


def main() -> None:
    result = json.loads(Path(sys.argv[1]).read_text())
    plot(result, Path(sys.argv[2]))
    print(f"wrote {sys.argv[2]}")


if __name__ == "__main__":
    main()
