"""duetprocess's unified schema from result files; a registry of parsers keyed by file name.

Plain format (``*.timings`` or any file a config's suite maps to ``plain``): one line per
iteration, ``start_ns end_ns`` (epoch nanoseconds, ``#`` comments allowed)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from .config import DuetConfig, parse_result_name

COLUMNS = [
    "suite", "benchmark", "runid", "kind", "iteration", "pair", "order", "epoch_start_ms",
    "iteration_time_ns", "iteration_start_ns", "iteration_end_ns",
]  # fmt: skip

Parser = Callable[[Path], Iterable[tuple[int, int]]]
"""A parser yields each iteration's (start_ns, end_ns) from one result file."""
PARSERS: dict[str, Parser] = {}


def register_parser(name: str, parser: Parser) -> None:
    """Plug in a parser; a suite named ``name`` (or a file ending ``.name``) uses it::

    register_parser("mysuite", lambda path: [(0, 10), (10, 25)])
    """
    PARSERS[name] = parser


def parse_plain(path: Path) -> Iterable[tuple[int, int]]:
    """One ``start_ns end_ns`` line per iteration."""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"{path}:{n}: expected `start_ns end_ns`, got {line!r}")
        yield int(parts[0]), int(parts[1])


def parse_renaissance(path: Path) -> Iterable[tuple[int, int]]:
    """Renaissance's results, as its harness writes them (``ResultWriter.scala``):

    - ``--json``: ``environment.vm.start_unix_ms`` (the JVM's start, epoch ms) and, per
      benchmark, ``data.<bench>.results[]`` with ``uptime_ns`` (iteration start since the JVM's
      start) and ``duration_ns``;
    - ``--csv`` (a ``.csv`` file): the columns ``duration_ns``, ``uptime_ns`` and
      ``vm_start_unix_ms``, one row per iteration.

    Start = vm start + uptime, end = start + duration (as duetprocess computes them).
    """
    if path.suffix == ".csv":
        import csv

        with open(path, newline="") as f:
            for n, row in enumerate(csv.DictReader(f), 2):
                try:
                    start = int(row["vm_start_unix_ms"]) * 1_000_000 + int(row["uptime_ns"])
                    yield start, start + int(row["duration_ns"])
                except (KeyError, TypeError, ValueError) as exc:
                    raise ValueError(
                        f"{path}:{n}: not a Renaissance --csv row (needs duration_ns, uptime_ns and "
                        f"vm_start_unix_ms): {exc}"
                    ) from None
        return
    doc = json.loads(path.read_text())
    vm_start_ms = ((doc.get("environment") or {}).get("vm") or {}).get("start_unix_ms")
    if vm_start_ms is None:
        raise ValueError(
            f"{path}: no environment.vm.start_unix_ms: not Renaissance --json output (iterations "
            "cannot be placed in time without the JVM's start)"
        )
    for bench in (doc.get("data") or {}).values():
        for r in bench.get("results", []):
            start = int(vm_start_ms) * 1_000_000 + int(r["uptime_ns"])
            yield start, start + int(r["duration_ns"])


register_parser("plain", parse_plain)
register_parser("timings", parse_plain)
register_parser("renaissance", parse_renaissance)


def _parser_for(suite: str, file: str) -> Optional[Parser]:
    if suite in PARSERS:
        return PARSERS[suite]
    ext = file.rsplit(".", 1)[-1]
    if ext in PARSERS:
        return PARSERS[ext]
    if ext == "json":
        return parse_renaissance
    return None


def process(configs: Sequence[DuetConfig], results_dir: str | os.PathLike):
    """A DataFrame of every iteration in ``results_dir`` (COLUMNS + one ``artifact_<name>`` column each)::

    frame = process(load_configs(["a.duet.yml"]), "results")
    """
    import pandas as pd

    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a results directory; give the --outdir of easylaunch duet")
    suites = {c.suite for c in configs}
    rows = []
    for path in sorted(root.rglob("*")):
        if not path.is_file() or "artifacts" in path.relative_to(root).parts:
            continue
        top = path.relative_to(root).parts[0]
        meta = parse_result_name(top)
        if meta is None or meta["suite"] not in suites:
            continue
        parser = _parser_for(meta["suite"], path.name)
        if parser is None:
            continue
        for i, (start, end) in enumerate(parser(path)):
            rows.append(dict(suite=meta["suite"], benchmark=meta["benchmark"], runid=meta["runid"],
                             kind=meta["kind"], iteration=i, pair=meta["pair"], order=meta["order"],
                             epoch_start_ms=start // 1_000_000, iteration_time_ns=end - start,
                             iteration_start_ns=start, iteration_end_ns=end))  # fmt: skip
    frame = pd.DataFrame(rows, columns=COLUMNS)
    art = root / "artifacts"
    if art.is_dir():
        for f in sorted(art.iterdir()):
            if f.is_file():
                frame[f"artifact_{f.name}"] = (
                    f.read_text(errors="replace").strip().splitlines()[0] if f.stat().st_size else ""
                )
    return frame
