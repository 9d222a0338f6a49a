"""Plot wall time and peak memory against sellers x samples from a ``tip-fed bench`` JSON.

    .venv/bin/python benchmarks/plot_scale.py benchmarks/results/cpu2-full.json benchmarks/scale.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot(result_json: Path, out_png: Path) -> None:
    """Two panels sharing the x axis (samples valued = sum over sellers of their samples)."""
    scale = json.loads(result_json.read_text())["scale"]
    points = scale["points"]
    x = [p["samples"] for p in points]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    ax_t.plot(x, [p["seconds"] for p in points], "o--", color="tab:grey", label="whole run (incl. ground truth)")
    ax_t.plot(x, [p["valuation_seconds"] for p in points], "o-", label="valuation (Offer to settlement)")
    for p in points:
        ax_t.annotate(f"{p['sellers']} sellers\n{p['valuation_seconds_per_seller']:.3f} s/seller",
                      (p["samples"], p["valuation_seconds"]), textcoords="offset points", xytext=(6, -18), fontsize=8)
    ax_t.legend(fontsize=8)
    ax_t.set_xlabel("samples valued (sellers x samples per seller)")
    ax_t.set_ylabel("seconds")
    ax_t.set_title(f"time, runtime={scale['runtime']}")
    ax_m.plot(x, [p["peak_rss_mb"] / 1024 for p in points], "s-", color="tab:red")
    ax_m.axhline(8, color="grey", linestyle="--", linewidth=1)
    ax_m.text(x[0], 8.1, "8 GB limit", fontsize=8, color="grey")
    ax_m.set_ylim(0, max(9, max(p["peak_rss_mb"] for p in points) / 1024 * 1.2))
    ax_m.set_xlabel("samples valued (sellers x samples per seller)")
    ax_m.set_ylabel("peak RSS of the process tree (GB)")
    ax_m.set_title("memory")
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


if __name__ == "__main__":
    plot(Path(sys.argv[1]), Path(sys.argv[2]))
