"""``easylaunch plot``: runs' memory and CPU over time, and the resource columns of ``ls``.

easylaunch plot RUN                 # -> RUN_DIR/resources.png
easylaunch plot EXP -o exp.png      # every run of the experiment, overlaid
easylaunch plot RUN_A RUN_B --term  # drawn in the terminal (plotext)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

from . import records


def human_bytes(n: Optional[float]) -> str:
    """``1536 * 1024**2`` -> ``'1.5G'``; ``'-'`` for None."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit in ("B", "K") else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}T"  # pragma: no cover


def human_seconds(s: Optional[float]) -> str:
    """``75.2`` -> ``'1m15s'``; ``'-'`` for None."""
    if s is None:
        return "-"
    s = float(s)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def resource_cells(status: dict) -> List[str]:
    """The ``peak mem`` and ``cpu time`` cells of ``easylaunch ls`` for one run's status."""
    res = status.get("resources") or {}
    return [human_bytes(res.get("peak_rss_bytes")), human_seconds(res.get("cpu_seconds"))]


def _targets(names: List[str], root: Path) -> List[Path]:
    from .cli import resolve_run
    from .job import find_runs

    runs: List[Path] = []
    for name in names:
        exp = Path(name) if Path(name).is_dir() and not records.is_run_dir(Path(name)) else root / name
        if "/" not in name or Path(name).is_dir():
            found = find_runs(exp) if exp.is_dir() and not records.is_run_dir(exp) else []
            if found:
                runs.extend(Path(r) for r in found)
                continue
        runs.append(resolve_run(name, root))
    return runs


def cmd_plot(args: argparse.Namespace) -> int:
    from .cli import _root
    from .plot import PlotError, plot_png, plot_terminal

    root = _root(args)
    runs = _targets(args.targets, root)
    try:
        if args.term:
            print(plot_terminal(runs))
            return 0
        if args.output:
            out = Path(args.output)
        elif len(runs) == 1:
            out = runs[0] / "resources.png"
        else:
            out = runs[0].parent / "resources.png"
        plot_png(runs, out, title=args.title)
    except PlotError as exc:
        print(f"easylaunch: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="plot runs' memory and CPU over time (resources.csv)")
    p.add_argument("targets", nargs="+", metavar="RUN|EXP", help="run dirs, run names or experiments")
    p.add_argument(
        "-o", "--output", help="PNG to write (default: resources.png in the run or experiment dir)"
    )
    p.add_argument("--term", action="store_true", help="draw in the terminal (plotext) instead")
    p.add_argument("--title")
    p.set_defaults(func=cmd_plot)
