"""Parse duetbench's YAML config unchanged; every error names the key and the fix."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

DEFAULT_ARTIFACTS = {
    "uname": "uname -a",
    "lscpu": "lscpu",
    "meminfo": "cat /proc/meminfo",
    "hostname": "hostname",
    "date": "date",
}
TOP_KEYS = {
    "suite", "verbose", "seed", "docker_command", "remove_containers", "duet_repetitions",
    "sequential_repetitions", "schedule", "artifacts", "image", "results", "duets", "timeout",
}  # fmt: skip
OTHER_KEYS = {"name", "syncduet_repetitions", "run_base", "environment"}
"""Keys duetbench configs carry that easylaunch duet accepts and ignores."""
SCHEDULES = ("randomized_interleaving_trials",)


class DuetConfigError(ValueError):
    """A duet config is wrong; the message names the file, the key and the fix."""


@dataclass
class Side:
    """One side (A or B) of a duet: the command, the image and the result paths."""

    run: str
    image: str
    results: list[str]


@dataclass
class Duet:
    """One benchmark: A and B (B is a copy of A for an A/A run)."""

    name: str
    a: Side
    b: Side
    duet_repetitions: int
    sequential_repetitions: int
    aa: bool = False


@dataclass
class DuetConfig:
    """A parsed config file: the ``duetbench:`` block and its duets."""

    path: Path
    suite: str
    seed: int
    docker_command: str
    remove_containers: bool
    verbose: bool
    schedule: str
    artifacts: dict[str, str]
    duets: list[Duet] = field(default_factory=list)


def _err(path: Path, key: str, problem: str, fix: str) -> DuetConfigError:
    return DuetConfigError(f"{path}: `{key}` {problem}; {fix}")


def _int(path: Path, key: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _err(path, key, f"is {value!r}", f"give an integer >= {minimum}")
    return value


def _results(path: Path, key: str, value: Any) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise _err(path, key, f"is {value!r}", "give a list of absolute paths inside the image")
    for v in value:
        if not v.startswith("/"):
            raise _err(path, key, f"has the relative path {v!r}", "give absolute paths inside the image")
    return list(value)


def parse_config(data: Any, path: Path) -> DuetConfig:
    """Check and parse one loaded YAML document (a dict) of duetbench's format."""
    if not isinstance(data, dict) or not isinstance(data.get("duetbench"), dict):
        raise _err(
            path, "duetbench", "is missing or not a mapping", "start the file with a `duetbench:` block"
        )
    top = data["duetbench"]
    for key in sorted(set(top) - TOP_KEYS - OTHER_KEYS):
        import difflib
        import warnings

        near = difflib.get_close_matches(key, sorted(TOP_KEYS), n=1)
        hint = f"did you mean `{near[0]}`?" if near else f"known keys: {sorted(TOP_KEYS)}"
        warnings.warn(
            f"{path}: `duetbench.{key}` is not a key easylaunch duet uses (ignored); {hint}", stacklevel=2
        )
    suite = top.get("suite")
    if not isinstance(suite, str) or not suite or "." in suite:
        raise _err(path, "duetbench.suite", f"is {suite!r}", "give the suite's name (no dots)")
    seed = _int(path, "duetbench.seed", top.get("seed", 42))
    schedule = top.get("schedule", SCHEDULES[0])
    if schedule not in SCHEDULES:
        raise _err(path, "duetbench.schedule", f"is {schedule!r}", f"use one of {list(SCHEDULES)}")
    artifacts = dict(DEFAULT_ARTIFACTS)
    extra = top.get("artifacts") or {}
    if not isinstance(extra, dict) or not all(isinstance(v, str) for v in extra.values()):
        raise _err(
            path, "duetbench.artifacts", "is not a mapping of name: command", "write `name: shell command`"
        )
    artifacts.update({str(k): v for k, v in extra.items()})
    image = top.get("image")
    results = top.get("results")
    duet_reps = top.get("duet_repetitions", 1)
    seq_reps = top.get("sequential_repetitions", 0)
    names = top.get("duets")
    if not isinstance(names, list) or not names:
        raise _err(path, "duetbench.duets", f"is {names!r}", "list the benchmark blocks to run")
    cfg = DuetConfig(
        path=path,
        suite=suite,
        seed=seed,
        docker_command=str(top.get("docker_command", "docker")),
        remove_containers=bool(top.get("remove_containers", True)),
        verbose=bool(top.get("verbose", False)),
        schedule=schedule,
        artifacts=artifacts,
    )
    for name in names:
        if not isinstance(name, str) or name in ("duetbench", "artifacts") or "." in name:
            raise _err(
                path, "duetbench.duets", f"names {name!r}", "use names without dots, not duetbench/artifacts"
            )
        block = data.get(name)
        if not isinstance(block, dict):
            raise _err(
                path,
                name,
                "is listed in duetbench.duets but has no block",
                f"add a top-level `{name}:` with `A:`",
            )
        if not isinstance(block.get("A"), dict):
            raise _err(
                path, f"{name}.A", "is missing", "give `A:` with `run:` (and `B:` unless this is an A/A run)"
            )
        sides = []
        for letter in ("A", "B"):
            s = block.get(letter)
            if s is None:
                continue
            if not isinstance(s, dict) or not isinstance(s.get("run"), str) or not s["run"].strip():
                raise _err(
                    path, f"{name}.{letter}.run", "is missing", "give the shell command that runs the harness"
                )
            img = s.get("image", image)
            if not isinstance(img, str) or not img:
                raise _err(
                    path, f"{name}.{letter}.image", "is missing", "set duetbench.image or the side's image"
                )
            res = s.get("results", results)
            if res is None:
                raise _err(
                    path,
                    f"{name}.{letter}.results",
                    "is missing",
                    "set duetbench.results or the side's results",
                )
            sides.append(Side(s["run"], img, _results(path, f"{name}.{letter}.results", res)))
        aa = len(sides) == 1
        cfg.duets.append(
            Duet(
                name=name,
                a=sides[0],
                b=sides[-1],
                duet_repetitions=_int(
                    path, f"{name}.duet_repetitions", block.get("duet_repetitions", duet_reps)
                ),
                sequential_repetitions=_int(
                    path, f"{name}.sequential_repetitions", block.get("sequential_repetitions", seq_reps)
                ),
                aa=aa,
            )
        )
    return cfg


def load_configs(paths: Sequence[str | Path]) -> list[DuetConfig]:
    """Read and check every config before anything runs::

    configs = load_configs(["renaissance.duet.yml"])
    """
    return [parse_config(read_config(Path(p)), Path(p)) for p in paths]


def read_config(path: Path) -> Any:
    """The YAML of a config file, as plain data (what :func:`parse_config` takes)."""
    import yaml

    if not path.is_file():
        raise DuetConfigError(f"{path}: no such config file; give the path of a duet YAML file")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DuetConfigError(f"{path}: not valid YAML ({exc}); fix the syntax") from None


def result_name(suite: str, benchmark: str, runid: int, kind: str, order: str, side: str, file: str) -> str:
    """duetbench's name: ``<suite>.<benchmark>.<runid>.<duet|seq>.<AB|BA>.<A|B>.<file>``."""
    return f"{suite}.{benchmark}.{runid}.{kind}.{order}.{side}.{file}"


def parse_result_name(name: str) -> Optional[dict]:
    """The fields of a result file name, or None when it is not one."""
    parts = name.split(".", 6)
    if (
        len(parts) < 7
        or parts[3] not in ("duet", "seq")
        or parts[4] not in ("AB", "BA")
        or parts[5] not in "AB"
    ):
        return None
    if not parts[2].isdigit() or len(parts[5]) != 1:
        return None
    return dict(suite=parts[0], benchmark=parts[1], runid=int(parts[2]), kind=parts[3], order=parts[4],
                pair=parts[5], file=parts[6])  # fmt: skip
