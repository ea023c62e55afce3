"""The ``easylaunch`` command: inspect, follow, cancel and relaunch runs from their directories.

easylaunch ls                 # experiments under the log dir
easylaunch ls EXP             # runs of one experiment: state, mode, variant, peak memory, CPU time, age
easylaunch plot RUN|EXP [-o F.png] [--term]   # memory and CPU over time
easylaunch run [--mode M] [--name EXP] [-O KEY=VALUE] -- CMD ...      # one command as a job
easylaunch sweep --grid 'lr=1e-3,1e-4' --grid 'seed=0:3' [--mode M] -- CMD ...
easylaunch status RUN         # RUN is a run directory or a run name
easylaunch logs RUN [-f] [--stderr]
easylaunch result RUN
easylaunch cancel RUN|EXP
easylaunch relaunch RUN [--mode MODE]
easylaunch init [PATH] [--force]
easylaunch collect DIR         # runs copied back from a cluster (sss/htp bundles) -> the log dir
easylaunch timeline EXP [-o out.png] [--mode tasks|workers] [--csv out.csv] [--stats]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

from . import records
from .config import KEYS, load_settings, log_root, redact_secrets
from .job import Job, JobError, Sweep, find_runs, refresh_states
from .spec import TERMINAL_STATES, State
from .sweep import summarize

STATE_STYLE = {
    State.COMPLETED: "green",
    State.FAILED: "red",
    State.CANCELLED: "yellow",
    State.TIMEOUT: "magenta",
    State.PREEMPTED: "magenta",
    State.RUNNING: "cyan",
    State.PENDING: "white",
    State.GENERATED: "blue",
}


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


def _age(ts: Optional[float]) -> str:
    if not ts:
        return "-"
    s = max(0, time.time() - ts)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{int(s // size)}{unit} ago"
    return f"{int(s)}s ago"


def _root(args: argparse.Namespace) -> Path:
    return log_root(getattr(args, "log_dir", None), load_settings())


def resolve_run(target: str, root: Path) -> Path:
    """A run directory from a path or a run name (searched in every experiment of ``root``)."""
    path = Path(target)
    if records.is_run_dir(path):
        return path.resolve()
    matches = [p for p in root.glob(f"*/{target}") if records.is_run_dir(p)] if "/" not in target else []
    if len(matches) == 1:
        return matches[0].resolve()
    if len(matches) > 1:
        raise SystemExit(f"easylaunch: run name {target!r} is ambiguous: " + ", ".join(map(str, matches)))
    raise SystemExit(
        f"easylaunch: no run {target!r} (not a run directory, and no run of that name under {root}); "
        "see `easylaunch ls EXP`"
    )


def cmd_ls(args: argparse.Namespace) -> int:
    from rich.table import Table

    root = _root(args)
    console = _console()
    if not args.exp:
        table = Table(title=f"experiments in {root}")
        for col in ("experiment", "runs", "states", "last launch"):
            table.add_column(col)
        exps = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        for exp in exps:
            runs = find_runs(exp)
            if not runs:
                continue
            jobs = [Job(r) for r in runs]
            refresh_states(jobs)
            counts = Counter(j.last_state.value for j in jobs)
            table.add_row(
                exp.name,
                str(len(runs)),
                " ".join(f"{k.lower()}={v}" for k, v in sorted(counts.items())),
                _age(jobs[-1].manifest.get("launched")),
            )
        console.print(table)
        return 0
    exp_dir = root / args.exp
    runs = find_runs(exp_dir)
    half_made = records.half_made_runs(exp_dir, min_age=HALF_MADE_AGE)
    if half_made:
        print(
            f"easylaunch: {len(half_made)} half-made run director{'y' if len(half_made) == 1 else 'ies'} "
            f"in {exp_dir} (a launch was killed before it wrote their manifests; nothing runs there): "
            f"remove them with `easylaunch clean {args.exp}`",
            file=sys.stderr,
        )
    if not runs:
        print(f"easylaunch: no runs of experiment {args.exp!r} under {root}", file=sys.stderr)
        return 1
    jobs = Sweep(Job(r) for r in runs)
    refresh_states(jobs)
    table = Table(title=f"{args.exp} ({len(jobs)} runs)")
    show_ids = any(job.job_id != job.run_dir.name for job in jobs)
    from .cli_resources import resource_cells

    columns = ("run", "state", "mode", *(["job id"] if show_ids else []), "variant", "peak mem", "cpu time")
    for col in (*columns, "launched"):
        table.add_column(col, overflow="fold")
    for job in jobs:
        st = job.last_state
        ids = [job.job_id] if show_ids else []
        table.add_row(
            job.run_dir.name,
            f"[{STATE_STYLE.get(st, 'white')}]{st.value}[/]",
            job.manifest.get("mode", "?"),
            *ids,
            summarize(job.variant),
            *resource_cells(job.status),
            _age(job.manifest.get("launched")),
        )
    console.print(table)
    return 0


#: a run directory without manifest or launch record this old (s) is half-made, not being written
HALF_MADE_AGE = 60.0


def cmd_clean(args: argparse.Namespace) -> int:
    exp_dir = _root(args) / args.exp
    if not exp_dir.is_dir():
        raise FileNotFoundError(f"no experiment {args.exp!r} under {exp_dir.parent}")
    half_made = records.half_made_runs(exp_dir, min_age=args.min_age)
    for d in half_made:
        print(f"{'would remove' if args.dry_run else 'removing'} {d} (half-made: no manifest)")
        if not args.dry_run:
            shutil.rmtree(d, ignore_errors=True)
    if not half_made:
        print(f"easylaunch: nothing to clean in {exp_dir}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    job = Job.load(resolve_run(args.run, _root(args)))
    state = job.state
    status = job.status
    manifest = job.manifest
    info = {
        "run_dir": str(job.run_dir),
        "state": state.value,
        "mode": manifest.get("mode"),
        "job_id": job.job_id,
        "variant": redact_secrets(job.variant),
        "attempt": status.get("attempt"),
        "host": status.get("host"),
        "pid": status.get("pid"),
        "exit_code": status.get("exit_code"),
        "message": status.get("message"),
        "started": status.get("started"),
        "ended": status.get("ended"),
        "git": manifest.get("git"),
    }
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    console = _console()
    for key, value in info.items():
        if value not in (None, [], {}):
            if key in ("started", "ended"):
                value = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(value))
            console.print(f"[bold]{key:>10}[/]  {value}", highlight=False)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    job = Job.load(resolve_run(args.run, _root(args)))
    path = job.run_dir / (records.STDERR if args.stderr else records.STDOUT)
    pos = 0
    while True:
        job.fetch()  # a remote run (mode ssh): its new output comes into the run dir first
        try:
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            pos += len(chunk)
        if not args.follow or (job.state in TERMINAL_STATES and not chunk):
            return 0
        time.sleep(0.5)


def cmd_result(args: argparse.Namespace) -> int:
    job = Job.load(resolve_run(args.run, _root(args)))
    state = job.state
    if state is State.COMPLETED:
        try:
            print(repr(job.result()))
        except JobError as exc:  # a result that cannot be read here: the message says why
            print(f"easylaunch: {exc}", file=sys.stderr)
            return 1
        return 0
    if state not in TERMINAL_STATES:
        print(f"easylaunch: run is {state.value}; wait with `easylaunch logs -f {args.run}`", file=sys.stderr)
        return 1
    error = records.read_json(job.run_dir / records.ERROR)
    if error:
        print(error["traceback"], end="", file=sys.stderr)
    else:
        print(f"easylaunch: run ended as {state.value}: {job.status.get('message')}", file=sys.stderr)
    return 1


def cmd_cancel(args: argparse.Namespace) -> int:
    root = _root(args)
    exp_dir = root / args.target
    if "/" not in args.target and exp_dir.is_dir() and not records.is_run_dir(exp_dir):
        jobs = Sweep(Job(r) for r in find_runs(exp_dir))
    else:
        jobs = Sweep([Job.load(resolve_run(args.target, root))])
    live = [j for j in jobs if not j.done()]
    Sweep(live).cancel()
    print(f"cancel requested for {len(live)} unfinished run(s) of {len(jobs)}")
    return 0


def cmd_relaunch(args: argparse.Namespace) -> int:
    from .api import relaunch

    run_dir = resolve_run(args.run, _root(args))
    job = (
        relaunch(str(run_dir), mode=args.mode, skip_wait=True)
        if _takes_skip_wait(args.mode, run_dir)
        else relaunch(str(run_dir), mode=args.mode)
    )
    print(job.run_dir)
    return 0


def _takes_skip_wait(mode: Optional[str], run_dir: Path) -> bool:
    from .modes import get_mode_class

    name = mode or records.read_manifest(run_dir)["mode"]
    return any(o.name == "skip_wait" for o in get_mode_class(name).options)


def render_config_example() -> str:
    """The documented config file: every key with its default and meaning."""
    lines = [
        '"""easylaunch configuration (doodad easy_launch keys).',
        "",
        "Found at $EASYLAUNCH_CONFIG, ./easylaunch_config.py or ~/.config/easylaunch/config.py.",
        "Only UPPERCASE names are read; an unknown name is an error. Call options override these.",
        "Local modes need none of it. Written by `easylaunch init`.",
        '"""',
        "",
    ]
    for name, key in KEYS.items():
        lines.append(f"# {key.doc}")
        lines.append(f"{name} = {key.default!r}")
        lines.append("")
    return "\n".join(lines)


def cmd_collect(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .bundle import by_target, collect_runs

    seen = by_target(collect_runs(Path(args.dir), getattr(args, "log_dir", None)))
    jobs = [Job(t) for t in seen]
    refresh_states(jobs)
    console = _console()
    table = Table(title=f"collected from {args.dir} ({len(jobs)} runs)")
    for col in ("run", "experiment", "state", "action"):
        table.add_column(col, overflow="fold")
    limit = 200
    for job, c in list(zip(jobs, seen.values()))[:limit]:
        st = job.last_state
        table.add_row(
            job.run_dir.name,
            job.run_dir.parent.name,
            f"[{STATE_STYLE.get(st, 'white')}]{st.value}[/]",
            c.action,
        )
    console.print(table)
    if len(jobs) > limit:
        print(f"... and {len(jobs) - limit} more")
    states = Counter(j.last_state.value for j in jobs)
    actions = Counter(c.action for c in seen.values())
    print(
        "states: "
        + " ".join(f"{k.lower()}={v}" for k, v in sorted(states.items()))
        + "; "
        + " ".join(f"{k.replace(' ', '_')}={v}" for k, v in sorted(actions.items()))
    )
    roots = sorted({str(t.parent.parent) for t in seen})
    print("log dir: " + ", ".join(roots) + " (see `easylaunch ls EXP`)")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    path = Path(args.path).expanduser() if args.path else Path.home() / ".config/easylaunch/config.py"
    if path.exists() and not args.force:
        print(f"easylaunch: {path} exists; pass --force to overwrite", file=sys.stderr)
        return 1
    path.parent.mkdir(parents=True, exist_ok=True)
    records.atomic_write_bytes(path, render_config_example().encode(), 0o600)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="easylaunch", description="Inspect and control easylaunch runs.")
    parser.add_argument(
        "--log-dir", help="log dir (default: LOCAL_LOG_DIR, $EASYLAUNCH_LOG_DIR, ./easylaunch-logs)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ls", help="list experiments, or the runs of one")
    p.add_argument("exp", nargs="?")
    p.set_defaults(func=cmd_ls)
    p = sub.add_parser("status", help="state and details of one run")
    p.add_argument("run")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("logs", help="print a run's stdout (or --stderr)")
    p.add_argument("run")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing until the run ends")
    p.add_argument("--stderr", action="store_true")
    p.set_defaults(func=cmd_logs)
    p = sub.add_parser("result", help="print a run's result, or its traceback")
    p.add_argument("run")
    p.set_defaults(func=cmd_result)
    p = sub.add_parser("cancel", help="cancel a run, or every unfinished run of an experiment")
    p.add_argument("target")
    p.set_defaults(func=cmd_cancel)
    p = sub.add_parser("relaunch", help="launch a run again from its directory")
    p.add_argument("run")
    p.add_argument("--mode")
    p.set_defaults(func=cmd_relaunch)
    p = sub.add_parser(
        "collect", help="merge run directories copied back from a cluster (sss/htp bundles) into the log dir"
    )
    p.add_argument("dir", help="what came back: a bundle, its logs/ dir, an experiment dir or run dirs")
    p.set_defaults(func=cmd_collect)
    from . import cli_cloud, cli_duet, cli_gpu, cli_launch, cli_resources, cli_timeline

    cli_resources.register(sub)
    cli_launch.register(sub)
    cli_timeline.register(sub)
    cli_gpu.register(sub)
    cli_cloud.register(sub)
    cli_duet.register(sub)
    p = sub.add_parser(
        "clean", help="remove the half-made run directories of a launch that was killed while making them"
    )
    p.add_argument("exp")
    p.add_argument(
        "--min-age",
        type=float,
        default=HALF_MADE_AGE,
        help=f"only directories untouched this many seconds (default {HALF_MADE_AGE:g})",
    )
    p.add_argument("--dry-run", action="store_true", help="list what would be removed")
    p.set_defaults(func=cmd_clean)
    p = sub.add_parser("init", help="write a documented config file")
    p.add_argument("path", nargs="?")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_init)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        print(f"easylaunch: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        # easylaunch's own errors (a backend refused, a job failed) say what went wrong and
        # the fix: their message, not a traceback; anything else is a bug and keeps its traceback
        if not type(exc).__module__.startswith("easylaunch.") or os.environ.get("EASYLAUNCH_DEBUG"):
            raise
        print(f"easylaunch: {exc}\n(EASYLAUNCH_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
