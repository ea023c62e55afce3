"""Draw, tabulate and sum up a sweep's transaction log (what ``vine_plot_txn_log`` does).

    easylaunch timeline EXP -o tasks.png                  # one bar per run attempt
    easylaunch timeline EXP -o workers.png --mode workers # one band per worker, its slots
    easylaunch timeline EXP --csv attempts.csv --stats

From Python::

    from easylaunch import timeline, txlog
    rows = txlog.attempts(txlog.read_experiment("logs/demo"))
    timeline.write_csv(rows, "attempts.csv")
    timeline.plot(rows, "tasks.png", mode="tasks")   # needs the extra: pip install easylaunch[timeline]

Plots use matplotlib's Agg backend (no display needed); matplotlib is imported only here.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .txlog import stats

PathLike = Union[str, Path]

#: CSV columns, one row per attempt
COLUMNS = (
    "run", "attempt", "worker", "host", "slot", "submitted", "started", "ended", "state", "exit_code",
    "peak_memory",
)  # fmt: skip

STATE_COLOURS = {
    "COMPLETED": "#2ca02c",
    "FAILED": "#d62728",
    "CANCELLED": "#bcbd22",
    "TIMEOUT": "#9467bd",
    "PREEMPTED": "#e377c2",
    "REQUEUED": "#ff7f0e",
    "LOST": "#8c564b",
    "RUNNING": "#17becf",
}
QUEUED_COLOUR = "#cccccc"
FAILED_STATES = {"FAILED", "TIMEOUT", "LOST", "PREEMPTED"}


def write_csv(rows: List[Dict[str, Any]], path: PathLike) -> None:
    """One row per attempt (:data:`COLUMNS`; times in epoch seconds)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})


def format_stats(rows: List[Dict[str, Any]]) -> str:
    """The totals of :func:`easylaunch.txlog.stats` as text lines."""
    s = stats(rows)

    def sec(v: Optional[float]) -> str:
        return "-" if v is None else f"{v:.3f} s"

    lines = [
        f"runs: {s['runs']} ({s['attempts']} attempts)",
        "by state: " + (", ".join(f"{k}={v}" for k, v in s["by_state"].items()) or "-"),
        f"wall time: {sec(s['wall_time'])}",
        f"workers: {s['workers']}, slots: {s['slots']}",
        "busy fraction of the slots: " + ("-" if s["busy_fraction"] is None else f"{s['busy_fraction']:.1%}"),
        f"queue wait: median {sec(s['queue_wait_median'])}, p90 {sec(s['queue_wait_p90'])}",
    ]
    return "\n".join(lines)


def plot(rows: List[Dict[str, Any]], path: PathLike, mode: str = "tasks", title: str = "") -> None:
    """Draw ``rows`` (from :func:`easylaunch.txlog.attempts`) into ``path`` (png, pdf, svg).

    ``tasks``: one bar per attempt, grey while queued (submitted -> started), coloured by its
    final state while running, failures marked with an x. ``workers``: one band per worker
    with a row per slot, each attempt drawn where it ran.
    """
    if mode not in ("tasks", "workers"):
        raise ValueError(f"timeline mode {mode!r} is not known; use 'tasks' or 'workers'")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise ImportError(
            "easylaunch timeline plots need matplotlib: pip install 'easylaunch[timeline]'"
        ) from exc
    times = [r[k] for r in rows for k in ("submitted", "started", "ended") if r.get(k) is not None]
    t0 = min(times) if times else 0.0
    now = max(times) if times else 0.0

    def rel(t: Optional[float]) -> Optional[float]:
        return None if t is None else t - t0

    height = 2.0 + 0.18 * (len(rows) if mode == "tasks" else _slot_count(rows))
    fig, ax = plt.subplots(figsize=(10, min(max(height, 3.0), 40.0)))
    try:
        if mode == "tasks":
            labels = []
            for y, r in enumerate(rows):
                sub, start, end = rel(r["submitted"]), rel(r["started"]), rel(r["ended"])
                if sub is not None and (start is not None or end is not None):
                    ax.barh(
                        y,
                        (start if start is not None else end) - sub,
                        left=sub,
                        color=QUEUED_COLOUR,
                        height=0.8,
                    )
                if start is not None:
                    stop = end if end is not None else now - t0
                    ax.barh(y, stop - start, left=start, color=_colour(r["state"]), height=0.8)
                    if r["state"] in FAILED_STATES:
                        ax.plot([stop], [y], marker="x", color="black", markersize=5)
                labels.append(f"{r['run'].rsplit('_', 1)[-1]}.{r['attempt']}")
            ax.set_ylabel("run.attempt")
            if len(rows) <= 60:
                ax.set_yticks(range(len(rows)), labels, fontsize=6)
            ax.invert_yaxis()
        else:
            y = 0
            ticks, names = [], []
            workers = sorted(
                {r["worker"] for r in rows if r["worker"] is not None and r["started"] is not None}
            )
            for w in workers:
                mine = [r for r in rows if r["worker"] == w and r["started"] is not None]
                slots = sorted({r["slot"] for r in mine})
                for r in mine:
                    row_y = y + slots.index(r["slot"])
                    start = rel(r["started"])
                    stop = rel(r["ended"]) if r["ended"] is not None else now - t0
                    ax.barh(row_y, stop - start, left=start, color=_colour(r["state"]), height=0.8,
                            edgecolor="white", linewidth=0.3)  # fmt: skip
                ticks.append(y + (len(slots) - 1) / 2)
                names.append(f"{w} ({len(slots)} slot{'s' if len(slots) != 1 else ''})")
                y += len(slots)
                ax.axhline(y - 0.5, color="black", linewidth=0.4)
            if len(workers) <= 60:
                ax.set_yticks(ticks, names, fontsize=6)
            ax.set_ylabel("worker")
            ax.invert_yaxis()
        present = sorted({str(r["state"]) for r in rows if r["started"] is not None})
        handles = [Patch(color=_colour(s), label=s) for s in present]
        if mode == "tasks":
            handles.insert(0, Patch(color=QUEUED_COLOUR, label="queued"))
        if handles:
            ax.legend(handles=handles, loc="upper right", fontsize=7)
        ax.set_xlabel(f"seconds since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t0))}")
        ax.set_title(title or f"{len(rows)} attempts ({mode})")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def _colour(state: Any) -> str:
    return STATE_COLOURS.get(str(state), "#7f7f7f")


def _slot_count(rows: List[Dict[str, Any]]) -> int:
    return len({(r["worker"], r["slot"]) for r in rows if r["started"] is not None})
