"""``easylaunch duet``: run A/B duets, process their results, analyze them.

Three forms share the word ``duet``; the first word after it picks one::

    easylaunch duet CONFIG.yml... --outdir DIR [--docker docker|podman] [--mode M [-O KEY=VALUE]...]
                    [--docker-host unix:///PATH]
    easylaunch duet process -c CONFIG DIR -o out.csv [--json]
    easylaunch duet analyze out.csv [-o report.png] [--min-overlap 0.4]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

USAGE = """easylaunch duet CONFIG.yml... --outdir DIR [--docker docker|podman] [--mode M [-O KEY=VALUE]...]
                       [--docker-host unix:///PATH]
       easylaunch duet process -c CONFIG [-c CONFIG...] DIR -o out.csv [--json]
       easylaunch duet analyze out.csv [-o report.png] [--min-overlap 0.4] [--seed N]"""
DESCRIPTION = (
    "A/B duet benchmarking (Asynchronous Duet): A and B run at once in two containers; the analysis pairs "
    "iterations that overlapped and gives a 95% BCa bootstrap CI of mean(B - A). "
    "`easylaunch duet process --help` and `easylaunch duet analyze --help` describe the other two forms."
)


def _run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="easylaunch duet", usage=USAGE, description=DESCRIPTION)
    p.add_argument(
        "configs", nargs="+", metavar="CONFIG.yml", help="duetbench YAML config(s), read unchanged"
    )
    p.add_argument("--outdir", required=True, help="results directory; must not exist")
    p.add_argument(
        "--docker", choices=("docker", "podman"), help="engine (default: the config's docker_command)"
    )
    p.add_argument(
        "--mode", default="local", help="easylaunch mode that runs the duet as a job (default local)"
    )
    p.add_argument("--exp-name", default="duet", help="experiment name of the job (default duet)")
    p.add_argument(
        "--docker-host",
        metavar="unix:///PATH",
        help="the engine's socket on the machine that runs the duet (default: $DOCKER_HOST for the "
        "local modes, else the engine's usual socket there)",
    )
    p.add_argument(
        "-O",
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="an option of --mode (e.g. -O ssh_host=lab)",
    )
    return p


def _process_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="easylaunch duet process", description="results -> duetprocess's CSV schema"
    )
    p.add_argument("-c", "--config", action="append", required=True, help="the config(s) the run used")
    p.add_argument("dir", help="the --outdir of easylaunch duet")
    p.add_argument("-o", "--output", required=True, help="CSV (or JSON with --json) to write")
    p.add_argument("--json", action="store_true", help="write JSON records instead of CSV")
    return p


def _analyze_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="easylaunch duet analyze", description="pair, bootstrap CI, verdict")
    p.add_argument("csv", help="output of easylaunch duet process (CSV or JSON)")
    p.add_argument("-o", "--output", help="plot to draw (png, pdf, svg)")
    p.add_argument("--min-overlap", type=float, default=0.4, help="minimum overlap of both durations (0.4)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    p.add_argument("--resamples", type=int, default=9999, help="bootstrap resamples (9999)")
    return p


#: where the duet job writes, inside its run directory (brought back with it on every mode)
RESULTS_IN_RUN = "duet-results"
CONFIGS_IN_RUN = "duet-configs"
LOCAL_MODES = ("local", "local_pool", "here")


def duet_job(doodad_config: Any, variant: dict) -> str:
    """The job easylaunch runs, on the target: writes the configs it carries (by value: the
    launching machine's paths do not exist there; parsed there too, so the target needs no YAML
    library), runs every duet into its run directory's ``duet-results`` and returns that
    directory's name."""
    from .duet.bench import run_duets
    from .duet.config import parse_config

    run_dir = Path(doodad_config.base_log_dir)
    configs_dir = run_dir / CONFIGS_IN_RUN
    configs_dir.mkdir(exist_ok=True)
    configs = []
    for name, text, data in variant["configs"]:
        path = configs_dir / name
        path.write_text(text)
        configs.append(parse_config(data, path))
    run_duets(
        configs,
        run_dir / RESULTS_IN_RUN,
        docker=variant.get("docker"),
        docker_host=variant.get("docker_host"),
    )
    return RESULTS_IN_RUN


def _carried(paths: Sequence[str]) -> list:
    """``[(file name, text, data)]`` of the configs, names made unique (``2-name`` for a
    repeat); ``data`` is the YAML as JSON values (a YAML date becomes its text)."""
    from .duet.config import read_config

    out, seen = [], set()
    for i, p in enumerate(paths):
        name = Path(p).name
        if name in seen:
            name = f"{i}-{name}"
        seen.add(name)
        data = json.loads(json.dumps(read_config(Path(p)), default=str))
        out.append((name, Path(p).read_text(), data))
    return out


def cmd_run(argv: Sequence[str]) -> int:
    args = _run_parser().parse_args(argv)
    from .cli_launch import parse_options
    from .duet.config import DuetConfigError, load_configs

    try:
        load_configs(args.configs)  # every error before anything runs
        options = parse_options(args.option)
    except (DuetConfigError, ValueError) as exc:
        print(f"easylaunch duet: {exc}", file=sys.stderr)
        return 2
    outdir = Path(args.outdir).resolve()
    if outdir.exists():
        print(
            f"easylaunch duet: {outdir} exists; give a new --outdir (results are never overwritten)",
            file=sys.stderr,
        )
        return 2
    from .api import run_experiment

    variant = {
        "configs": _carried(args.configs),
        "docker": args.docker,
        # this machine's engine socket means nothing on another host
        "docker_host": args.docker_host
        or (os.environ.get("DOCKER_HOST") if args.mode in LOCAL_MODES else None),
    }
    job = run_experiment(duet_job, mode=args.mode, exp_name=args.exp_name, variant=variant, **options)
    try:
        job.result()
    except Exception as exc:
        print(f"easylaunch duet: the duet failed: {exc}", file=sys.stderr)
        return 1
    job.fetch()  # the run directory's files, results included, back here (no-op when local)
    results = Path(job.run_dir) / RESULTS_IN_RUN
    if not results.is_dir():
        print(f"easylaunch duet: the job completed but {results} did not come back", file=sys.stderr)
        return 1
    import shutil

    shutil.move(str(results), str(outdir))
    print(f"results in {outdir}; run directory {job.run_dir}")
    return 0


def cmd_process(argv: Sequence[str]) -> int:
    args = _process_parser().parse_args(argv)
    from .duet.config import DuetConfigError, load_configs
    from .duet.process import process

    try:
        frame = process(load_configs(args.config), args.dir)
    except (DuetConfigError, FileNotFoundError, ValueError) as exc:
        print(f"easylaunch duet process: {exc}", file=sys.stderr)
        return 2
    if args.json:
        frame.to_json(args.output, orient="records", indent=1)
    else:
        frame.to_csv(args.output, index=False)
    print(f"{len(frame)} iterations -> {args.output}")
    return 0


def cmd_analyze(argv: Sequence[str]) -> int:
    args = _analyze_parser().parse_args(argv)
    import pandas as pd

    from .duet.analyze import analyze, plot

    path = Path(args.csv)
    if not path.is_file():
        print(
            f"easylaunch duet analyze: {path} not found; give the output of easylaunch duet process",
            file=sys.stderr,
        )
        return 2
    frame = pd.read_json(path) if path.suffix == ".json" else pd.read_csv(path)
    report = analyze(frame, args.min_overlap, args.seed, args.resamples)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(report.to_string(index=False))
    if args.output:
        plot(frame, report, args.output, args.min_overlap)
        print(f"plot -> {args.output}")
    return 0


#: what `easylaunch duet` needs beyond easylaunch itself (the ``duet`` extra)
DUET_NEEDS = {"yaml": "pyyaml", "scipy": "scipy", "pandas": "pandas", "docker": "docker"}


def cmd_duet(args: argparse.Namespace) -> int:
    rest = list(args.duet_args)
    try:
        if rest and rest[0] == "process":
            return cmd_process(rest[1:])
        if rest and rest[0] == "analyze":
            return cmd_analyze(rest[1:])
        return cmd_run(rest)
    except ModuleNotFoundError as exc:
        if exc.name not in DUET_NEEDS:
            raise
        print(
            f"easylaunch duet needs {DUET_NEEDS[exc.name]}, which is not installed: "
            "pip install 'easylaunch[duet]'",
            file=sys.stderr,
        )
        return 2


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``duet`` to the easylaunch CLI (its three forms are dispatched on the first word)."""
    p = sub.add_parser(
        "duet", help="A/B duet benchmarking: run | process | analyze", add_help=False, usage=USAGE
    )

    def take_all(args: Optional[Sequence[str]] = None, namespace: Optional[argparse.Namespace] = None):
        # every word after `duet` (options included, --help too) goes to the form the first word picks
        namespace = namespace if namespace is not None else argparse.Namespace()
        namespace.duet_args = list(args or [])
        namespace.func = cmd_duet
        return namespace, []

    p.parse_known_args = take_all  # type: ignore[method-assign]


def main(argv: Optional[Sequence[str]] = None) -> int:  # pragma: no cover - python -m easylaunch.cli_duet
    ns = argparse.Namespace(duet_args=list(sys.argv[1:] if argv is None else argv))
    return cmd_duet(ns)
