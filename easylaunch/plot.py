"""Plots of runs' resources over time, from their ``resources.csv`` (see :mod:`easylaunch.monitor`).

    from easylaunch.plot import plot_png, plot_terminal
    plot_png([run_dir_a, run_dir_b], "resources.png")   # memory and CPU over time, overlaid
    print(plot_terminal([run_dir_a]))                   # the same drawn with characters

``easylaunch plot RUN|EXP ... [-o FILE.png] [--term]`` calls these. Needs matplotlib (PNG,
through the Agg backend: no display) or plotext (``--term``): ``pip install 'easylaunch[monitor]'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .monitor import read_samples

MIB = 1024.0 * 1024.0


class PlotError(RuntimeError):
    """Nothing to plot, or the plotting library is missing (the message says which)."""


def _series(run_dirs: Sequence[Path]) -> List[tuple]:
    out = []
    for run_dir in run_dirs:
        samples = read_samples(Path(run_dir))
        if samples:
            out.append((Path(run_dir).name, samples))
    if not out:
        names = ", ".join(Path(r).name for r in run_dirs[:3]) + (" ..." if len(run_dirs) > 3 else "")
        raise PlotError(
            f"no resource samples in {names}: resources.csv is written by runs that lasted longer "
            "than one monitor period (option monitor=SECONDS, default 1; monitor=0 turns it off)"
        )
    return out


def _columns(samples: List[Dict[str, float]]) -> Dict[str, List[float]]:
    return {
        "t": [s["t"] for s in samples],
        "rss": [s["rss_bytes"] / MIB for s in samples],
        "cpu": [s["cpu_percent"] for s in samples],
        "gpu": [s.get("gpu_bytes", 0.0) / MIB for s in samples],
    }


def plot_png(run_dirs: Sequence[Path], out: Path, title: Optional[str] = None) -> Path:
    """Draw memory (MiB), CPU (% of one core) and, when used, GPU memory over time into ``out``."""
    series = _series(run_dirs)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("easylaunch plot needs matplotlib: pip install 'easylaunch[monitor]'") from None
    cols = [(name, _columns(s)) for name, s in series]
    with_gpu = any(max(c["gpu"]) > 0 for _, c in cols)
    rows = 3 if with_gpu else 2
    fig, axes = plt.subplots(rows, 1, figsize=(8, 2.4 * rows + 0.6), sharex=True)
    for name, c in cols:
        label = name if len(cols) <= 12 else None
        axes[0].plot(c["t"], c["rss"], label=label, linewidth=1.2)
        axes[1].plot(c["t"], c["cpu"], label=label, linewidth=1.2)
        if with_gpu:
            axes[2].plot(c["t"], c["gpu"], label=label, linewidth=1.2)
    axes[0].set_ylabel("memory (MiB)")
    axes[1].set_ylabel("CPU (% of a core)")
    if with_gpu:
        axes[2].set_ylabel("GPU memory (MiB)")
    axes[-1].set_xlabel("seconds since the run started")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    if len(cols) > 1 and len(cols) <= 12:
        axes[0].legend(fontsize="small", loc="best")
    fig.suptitle(title or (cols[0][0] if len(cols) == 1 else f"{len(cols)} runs"))
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_terminal(run_dirs: Sequence[Path], width: int = 100, height: int = 30) -> str:
    """The same plot drawn with characters (plotext); returns the text."""
    series = _series(run_dirs)
    try:
        import plotext as plt
    except ImportError:
        raise PlotError("easylaunch plot --term needs plotext: pip install 'easylaunch[monitor]'") from None
    plt.clear_figure()
    plt.subplots(2, 1)
    plt.plot_size(width, height)
    for row, (key, label) in enumerate((("rss", "memory (MiB)"), ("cpu", "CPU (% of a core)")), start=1):
        plt.subplot(row, 1)
        plt.theme("clear")
        plt.title(label)
        for name, samples in series:
            c = _columns(samples)
            plt.plot(c["t"], c[key], label=name if len(series) <= 6 else None)
    plt.xlabel("seconds")
    return plt.build()
