"""A/B duet benchmarking (Asynchronous Duet): run A and B at once in two containers, pair what overlapped.

Usage::

    from easylaunch.duet import load_configs, run_duets, process, analyze
    configs = load_configs(["bench.duet.yml"])      # errors name the key and the fix
    run_duets(configs, "results", docker="docker")  # containers always removed
    frame = process(configs, "results")             # duetprocess's unified schema
    report = analyze(frame)                          # one row per benchmark and run type

Heavy dependencies (yaml, docker, scipy, pandas, matplotlib) are imported inside functions.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_configs", "run_duets", "process", "analyze", "DuetConfigError"]


def __getattr__(name: str) -> Any:
    if name in ("load_configs", "DuetConfigError", "DuetConfig", "Duet"):
        from . import config

        return getattr(config, name)
    if name == "run_duets":
        from .bench import run_duets

        return run_duets
    if name == "process":
        from .process import process

        return process
    if name in ("analyze", "pair_iterations"):
        from . import analyze as _an

        return getattr(_an, name)
    raise AttributeError(name)
