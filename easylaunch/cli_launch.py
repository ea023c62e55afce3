"""``easylaunch run`` and ``easylaunch sweep``: commands as jobs from the command line.

    easylaunch run [--mode M] [--name EXP] [-O KEY=VALUE ...] -- CMD ARG ...
    easylaunch sweep --grid 'lr=1e-3,1e-4' --grid 'seed=0:3' [--mode M] -- python train.py

``run`` launches one :class:`easylaunch.Command`, waits, prints the run directory and exits
with the command's exit code. ``sweep`` launches one run per point of the grid (each variant
rendered as ``--lr=0.001 --seed=0``), shows a progress bar, prints a summary table and exits
non-zero if any run did not complete. ``-O KEY=VALUE`` passes any option of the mode
(``-O slurm_config_name=cpu``, ``-O docker_image=python:3.11``); values are Python literals
where they parse as one (``-O max_parallel=4``), else strings.
"""

from __future__ import annotations

import argparse
import ast
import os
import sys
from typing import Any, Dict, List, Optional

#: options with flags of their own (the rest go through -O KEY=VALUE)
_FLAGS = ("timeout", "monitor", "gpus", "gpu_policy")


def parse_value(text: str) -> Any:
    """``'1e-3'`` -> 0.001, ``'3'`` -> 3, ``'True'`` -> True, ``'[1,2]'`` -> [1, 2]; else the str."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_grid(items: List[str]) -> Dict[str, List[Any]]:
    """``['lr=1e-3,1e-4', 'seed=0:3']`` -> ``{'lr': [0.001, 0.0001], 'seed': [0, 1, 2]}``.

    ``A:B`` (integers) is the range A..B-1, ``A:B:STEP`` with a step; otherwise values are
    separated by commas. ValueError naming the item when it is not ``KEY=VALUES``.
    """
    grid: Dict[str, List[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ValueError(
                f"--grid {item!r} must be KEY=V1,V2,... or KEY=START:STOP[:STEP] (e.g. --grid 'seed=0:3')"
            )
        parts = values.split(":")
        if len(parts) in (2, 3) and all(p.strip().lstrip("-").isdigit() for p in parts):
            found: List[Any] = list(range(*(int(p) for p in parts)))
            if not found:
                raise ValueError(f"--grid {item!r}: the range {values} is empty")
        else:
            found = [parse_value(v.strip()) for v in values.split(",")]
        if key in grid:
            raise ValueError(f"--grid names {key!r} twice; give its values once, separated by commas")
        grid[key] = found
    return grid


def parse_options(items: Optional[List[str]]) -> Dict[str, Any]:
    """``['ssh_host=lab', 'max_parallel=4']`` (the ``-O`` flags) -> ``{'ssh_host': 'lab',
    'max_parallel': 4}``; ValueError naming the item when it is not ``KEY=VALUE``."""
    options: Dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"-O {item!r} must be KEY=VALUE (e.g. -O slurm_config_name=cpu)")
        options[key.strip()] = parse_value(value)
    return options


def _options(args: argparse.Namespace) -> Dict[str, Any]:
    options = parse_options(args.option)
    for name in _FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    return options


def _command(args: argparse.Namespace) -> Any:
    from .command import Command

    argv = list(args.cmd or [])
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise ValueError(f"easylaunch {args.command}: give the command after '--' (e.g. -- python train.py)")
    # it runs where it was typed (`python train.py` finds train.py): here, that directory; on
    # a target that lacks it, the shipped code's copy of it (the launch directory is a code dir)
    return Command(argv, args_style=args.args_style, cwd=os.getcwd())


def cmd_run(args: argparse.Namespace) -> int:
    from .api import run_experiment

    cmd = _command(args)
    options = _options(args)
    options["skip_wait"] = True
    job = run_experiment(cmd, exp_name=args.name, mode=args.mode, **options)
    print(job.run_dir, flush=True)
    state = job.wait()
    status = job.status
    code = status.get("exit_code")
    if state.value != "COMPLETED":
        print(f"easylaunch: {state.value}: {status.get('message') or ''}".rstrip(), file=sys.stderr)
        return int(code) if isinstance(code, int) and code > 0 else 1
    return 0


def summary_table(jobs: List[Any]) -> Any:
    """A rich Table of a sweep: run, state, exit code, variant, peak memory, CPU time, duration."""
    from rich.table import Table

    from .cli import STATE_STYLE
    from .cli_resources import human_seconds, resource_cells
    from .sweep import summarize

    table = Table(title=f"{len(jobs)} runs")
    for col in ("run", "state", "exit", "variant", "peak mem", "cpu time", "took"):
        table.add_column(col, overflow="fold")
    for job in jobs:
        status = job.status
        st = job.last_state
        started, ended = status.get("started"), status.get("ended")
        took = human_seconds(ended - started) if started and ended else "-"
        code = status.get("exit_code")
        table.add_row(
            job.run_dir.name,
            f"[{STATE_STYLE.get(st, 'white')}]{st.value}[/]",
            "-" if code is None else str(code),
            summarize(job.variant),
            *resource_cells(status),
            took,
        )
    return table


def cmd_sweep(args: argparse.Namespace) -> int:
    from collections import Counter

    from .api import run_sweep
    from .cli import _console
    from .sweep import grid

    if not args.grid:
        raise ValueError("easylaunch sweep needs at least one --grid KEY=VALUES (e.g. --grid 'seed=0:3')")
    variants = grid(parse_grid(args.grid))
    cmd = _command(args)
    options = _options(args)
    options["skip_wait"] = True
    sweep = run_sweep(cmd, variants, exp_name=args.name, mode=args.mode, **options)
    print(sweep[0].run_dir.parent, flush=True)
    sweep.wait(progress=not args.no_progress)
    _console().print(summary_table(list(sweep)))
    counts = Counter(job.last_state.value for job in sweep)
    print(" ".join(f"{k.lower()}={v}" for k, v in sorted(counts.items())))
    return 0 if set(counts) == {"COMPLETED"} else 1


def _common(p: argparse.ArgumentParser, default_name: str) -> None:
    p.add_argument("--mode", default="local", help="where to run (default: local)")
    p.add_argument("--name", default=default_name, help=f"experiment name (default: {default_name})")
    p.add_argument("-O", "--option", action="append", metavar="KEY=VALUE", help="any option of the mode")
    p.add_argument("--timeout", type=float, help="seconds a run may take")
    p.add_argument("--monitor", type=float, help="seconds between resource samples (0: off)")
    p.add_argument(
        "--args-style",
        choices=("equals", "space"),
        default="equals",
        help="variant as --k=v (default) or --k v",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command and its arguments")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run one command as a job: easylaunch run [--mode M] -- CMD ...")
    _common(p, "run")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("sweep", help="run a command over a grid: easylaunch sweep --grid 'lr=1,2' -- CMD ...")
    p.add_argument("--grid", action="append", metavar="KEY=VALUES", help="'lr=1e-3,1e-4' or 'seed=0:3'")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _common(p, "sweep")
    p.set_defaults(func=cmd_sweep)
