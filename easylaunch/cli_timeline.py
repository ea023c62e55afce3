"""``easylaunch timeline``: an experiment's transaction log drawn, tabulated or summed up.

easylaunch timeline EXP -o tasks.png                    # a bar per attempt: queued, running, state
easylaunch timeline EXP -o workers.png --mode workers   # a band per worker, a row per slot
easylaunch timeline EXP --csv attempts.csv              # one row per attempt
easylaunch timeline EXP --stats                         # totals (the default without -o / --csv)
"""

from __future__ import annotations

import argparse
from pathlib import Path


def resolve_exp(target: str, root: Path) -> Path:
    """An experiment directory from a path or an experiment name under ``root``."""
    path = Path(target)
    if path.is_dir() and (path / ".batches").is_dir():
        return path.resolve()
    if "/" not in target and (root / target).is_dir():
        return (root / target).resolve()
    raise SystemExit(
        f"easylaunch: no experiment {target!r} (not an experiment directory, and no experiment of that "
        f"name under {root}); see `easylaunch ls`"
    )


def cmd_timeline(args: argparse.Namespace) -> int:
    from . import timeline, txlog
    from .cli import _root

    exp_dir = resolve_exp(args.exp, _root(args))
    try:
        events = txlog.read_experiment(exp_dir, args.batch)
    except FileNotFoundError as exc:
        raise SystemExit(f"easylaunch: {exc}") from None
    if not events:
        raise SystemExit(
            f"easylaunch: {exp_dir} has no transaction log (.batches/*/{txlog.BATCH_LOG}); runs launched "
            "with $EASYLAUNCH_TXLOG=0 or by an easylaunch older than the log have none"
        )
    rows = txlog.attempts(events)
    did = False
    if args.csv:
        timeline.write_csv(rows, args.csv)
        print(f"wrote {len(rows)} attempts to {args.csv}")
        did = True
    if args.output:
        timeline.plot(rows, args.output, mode=args.mode, title=f"{exp_dir.name} ({args.mode})")
        print(f"wrote {args.output}")
        did = True
    if args.stats or not did:
        print(timeline.format_stats(rows))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("timeline", help="plot, tabulate or sum up an experiment's transaction log")
    p.add_argument("exp", help="experiment name (under the log dir) or directory")
    p.add_argument("-o", "--output", help="image to draw (png, pdf, svg; needs easylaunch[timeline])")
    p.add_argument(
        "--mode", choices=("tasks", "workers"), default="tasks", help="a bar per run, or a band per worker"
    )
    p.add_argument("--csv", help="write one row per attempt to this CSV file")
    p.add_argument("--stats", action="store_true", help="print totals (the default without -o/--csv)")
    p.add_argument("--batch", help="only this batch id (default: every batch of the experiment)")
    p.set_defaults(func=cmd_timeline)
