"""easylaunch: launch experiments anywhere with one call.

    from easylaunch import run_experiment, run_sweep, grid

    def fn(doodad_config, variant):
        print("lr", variant["lr"], "logs to", doodad_config.base_log_dir)
        return variant["lr"]

    job = run_experiment(fn, exp_name="demo", mode="local", variant={"lr": 0.1})
    print(job.state, job.result())

Names are loaded lazily so that the runner (``python -m easylaunch.runner``) starts fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "run_experiment": "easylaunch.api",
    "run_sweep": "easylaunch.api",
    "relaunch": "easylaunch.api",
    "grid": "easylaunch.sweep",
    "Job": "easylaunch.job",
    "Sweep": "easylaunch.job",
    "JobError": "easylaunch.job",
    "load_experiment": "easylaunch.job",
    "DoodadConfig": "easylaunch.spec",
    "GitInfo": "easylaunch.spec",
    "State": "easylaunch.spec",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .api import relaunch, run_experiment, run_sweep
    from .job import Job, JobError, Sweep, load_experiment
    from .spec import DoodadConfig, GitInfo, State
    from .sweep import grid


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'easylaunch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
