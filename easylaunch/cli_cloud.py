"""``easylaunch cloud cleanup [EXP]`` and ``easylaunch recover EXP``: the clouds' after-care.

    easylaunch cloud cleanup                  # list the live instances easylaunch made (dry run)
    easylaunch cloud cleanup demo --terminate # terminate those of experiment demo whose runs ended
    easylaunch recover demo                   # relaunch demo's PREEMPTED runs on new instances

Instances are found by their tags/labels (``easylaunch=1``, ``easylaunch-exp``), one listing
call per place: for EXP, where its runs were launched (their manifests: the mode, EC2 region,
GCE project and zone) and the config's default place; else the config's (``AWS_REGION``;
``GCP_DEFAULT_KWARGS['zone']`` / ``GCP_ZONE``). ``--region`` (ec2) and ``--zone`` (gcp)
override the place. ``--terminate`` spares an instance whose runs are still unfinished in the
local log dir (it is working, not a stray) unless ``--force``. ``recover`` needs only the run
directories: each PREEMPTED run goes back to PENDING and runs again (attempt+1) from the
payload its instance last synced, a checkpoint when the function saved one. A run whose
instance had a notice and is still syncing in its notice window is waited for (up to
``--timeout``): relaunched earlier, it would start again from the older payload.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

from . import records
from .spec import TERMINAL_STATES, State

CLOUD_MODES = ("ec2", "gcp")


def _root(args: argparse.Namespace) -> Path:
    from .config import load_settings, log_root

    return log_root(args.log_dir, load_settings())


def _cloud_mode(name: str):
    from .config import load_settings
    from .modes import get_mode_class, mode_names
    from .modes.cloud import CloudMode

    if name not in mode_names():
        raise ValueError(f"mode {name!r} is not available here (modes: {', '.join(sorted(mode_names()))})")
    cls = get_mode_class(name)
    if not issubclass(cls, CloudMode):
        raise ValueError(f"mode {name!r} is not a cloud mode; use one of {', '.join(CLOUD_MODES)}")
    return cls(load_settings())


def unfinished_runs(root: Path, exp: str, names: List[str]) -> List[str]:
    """Of the runs ``names`` of ``exp``, those the local log dir has and shows unfinished."""
    out = []
    for name in names:
        run_dir = root / exp / name
        if records.is_run_dir(run_dir):
            state = records.read_status(run_dir).get("state", State.PENDING)
            if State(state) not in TERMINAL_STATES and state != State.PREEMPTED:
                out.append(name)
    return out


def _cleanup_places(args: argparse.Namespace, root: Path) -> List[Tuple[str, Dict[str, Any]]]:
    """``(mode, options)`` of every place to look for strays (see the module docstring)."""
    from .modes import get_mode_class, mode_names

    launched: List[Tuple[str, Dict[str, Any]]] = []
    if args.exp:
        from .job import find_runs

        for d in find_runs(root / args.exp):
            m = records.read_manifest(d) or {}
            if m.get("mode") in CLOUD_MODES and (not args.mode or m["mode"] == args.mode):
                launched.append((m["mode"], dict(m.get("options") or {})))
    import json

    launched = list({json.dumps(p, sort_keys=True, default=str): p for p in launched}.values())
    modes = [args.mode] if args.mode else sorted({name for name, _ in launched}) or ["ec2"]
    places = []
    for name in modes:
        if name not in mode_names():
            raise ValueError(
                f"mode {name!r} is not available here (modes: {', '.join(sorted(mode_names()))})"
            )
        cls = get_mode_class(name).provider_class
        options = [o for n, o in launched if n == name]
        if not (args.region or args.zone):
            options.append({})  # the config's place too
        for opts in options or [{}]:
            places.append((name, cls.with_location(opts, region=args.region, zone=args.zone)))
    return places


def cmd_cleanup(args: argparse.Namespace) -> int:
    root = _root(args)
    found: List[Tuple[Any, Dict[str, Any]]] = []
    looked: List[str] = []
    modes_seen: List[str] = []
    seen = set()
    modes: Dict[str, Any] = {}
    for name, options in _cleanup_places(args, root):
        if name not in modes:
            modes[name] = _cloud_mode(name)
        provider = modes[name].provider(options)
        where = f"{name} {provider.location()}"
        if where in looked:
            continue
        looked.append(where)
        modes_seen.append(name)
        for inst in provider.strays(args.exp, {}):
            if (name, inst["id"]) not in seen:
                seen.add((name, inst["id"]))
                found.append((provider, inst))
    if not found:
        names = "/".join(dict.fromkeys(modes_seen)) or (args.mode or "ec2")
        print(
            f"easylaunch: no live {names} instance made by easylaunch"
            + (f" for {args.exp!r}" if args.exp else "")
            + f" (looked in {'; '.join(looked)})"
        )
        return 0
    doomed: Dict[int, Tuple[Any, List[str]]] = {}
    n_doomed = 0
    for provider, inst in found:
        runs = [r for r in str(inst.get("runs") or "").split(",") if r]
        busy = unfinished_runs(root, str(inst.get("exp") or ""), runs)
        note = f"{len(busy)} of its runs unfinished here" if busy else "its runs ended (or are unknown here)"
        spare = bool(busy) and not args.force
        if args.terminate:
            action = "sparing" if spare else "terminating"
        else:
            action = "would spare" if spare else "would terminate"
        print(
            f"{action} {inst['id']} {inst.get('name', '')} ({inst.get('state')}, experiment "
            f"{inst.get('exp') or '?'}, batch {inst.get('batch') or '?'}): {note}"
        )
        if not spare:
            doomed.setdefault(id(provider), (provider, []))[1].append(inst["id"])
            n_doomed += 1
    if not args.terminate:
        print(
            f"dry run: pass --terminate to terminate {n_doomed} instance(s)"
            + (" (--force: all)" if n_doomed < len(found) else "")
        )
        return 0
    for provider, ids in doomed.values():
        provider.terminate(ids, {})
    print(f"easylaunch: terminated {n_doomed} instance(s)")
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    from .job import find_runs
    from .modes.cloud import recover_when_ready

    exp_dir = _root(args) / args.exp
    runs = find_runs(exp_dir)
    if not runs:
        raise FileNotFoundError(f"no runs of experiment {args.exp!r} under {exp_dir.parent}")
    if args.timeout < 0:
        raise ValueError(f"--timeout {args.timeout:g}: give the seconds to wait, 0 or more")
    candidates = []
    for d in runs:
        m = records.read_manifest(d) or {}
        state = records.read_status(d).get("state", State.PENDING)
        if m.get("mode") in CLOUD_MODES and (state == State.PREEMPTED or State(state) not in TERMINAL_STATES):
            candidates.append(d)
    done, waiting = recover_when_ready(
        candidates, timeout=args.timeout, say=lambda line: print(line, file=sys.stderr, flush=True)
    )
    if not done and not waiting:
        print(f"easylaunch: no PREEMPTED run in {exp_dir}; nothing to recover")
        return 0
    for d in done:
        print(f"relaunched {d.name} (attempt {int(records.read_status(d).get('attempt') or 0) + 1})")
    for d, why in waiting.items():
        print(
            f"easylaunch: {d.name} not relaunched: {why}, after {args.timeout:g} s (--timeout). Its "
            f"instance is still syncing the run's checkpoint; run `easylaunch recover {args.exp}` again "
            "later or with a longer --timeout",
            file=sys.stderr,
        )
    return 1 if waiting else 0


def register(sub: Any) -> None:
    p = sub.add_parser("cloud", help="the cloud instances easylaunch made: cloud cleanup [EXP]")
    csub = p.add_subparsers(dest="cloud_command", required=True)
    c = csub.add_parser("cleanup", help="list (dry run) or --terminate the live instances easylaunch made")
    c.add_argument("exp", nargs="?", help="only this experiment's")
    c.add_argument(
        "--mode",
        choices=CLOUD_MODES,
        help="the cloud (default: the mode of EXP's runs, else ec2)",
    )
    c.add_argument(
        "--region",
        help="ec2 only: look in this region (default: where EXP's runs were launched, and config AWS_REGION)",
    )
    c.add_argument(
        "--zone",
        help="gcp only: look in this zone (default: where EXP's runs were launched, and "
        "GCP_DEFAULT_KWARGS['zone'] / GCP_ZONE of the config)",
    )
    c.add_argument("--terminate", action="store_true", help="terminate them (default: only list)")
    c.add_argument("--force", action="store_true", help="also those whose runs are unfinished here")
    c.set_defaults(func=cmd_cleanup)
    r = sub.add_parser("recover", help="relaunch an experiment's PREEMPTED cloud runs on new instances")
    r.add_argument("exp")
    r.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds to wait for an instance still syncing in its notice window (default 300; 0: do not wait)",
    )
    r.set_defaults(func=cmd_recover)
