"""easylaunch: launch experiments anywhere with one call.

    from easylaunch import run_experiment, run_sweep, grid

    def fn(doodad_config, variant):
        print("lr", variant["lr"], "logs to", doodad_config.base_log_dir)
        return variant["lr"]

    job = run_experiment(fn, exp_name="demo", mode="local", variant={"lr": 0.1})
    print(job.state, job.result())

    from easylaunch import Executor

    with Executor(mode="local_pool", exp_name="demo") as ex:   # a concurrent.futures.Executor
        print(list(ex.map(pow, [2, 3], [5, 5])))               # of plain functions: [32, 243]

``import easylaunch.submitit_compat as submitit`` runs submitit scripts; Hydra finds the
``hydra/launcher=easylaunch`` plugin (``pip install easylaunch[hydra]``).

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
    "JobCancelled": "easylaunch.job",
    "Executor": "easylaunch.executor",
    "Command": "easylaunch.command",
    "CommandFailed": "easylaunch.command",
    "DelayedSubmission": "easylaunch.executor",
    "current": "easylaunch.context",
    "load_experiment": "easylaunch.job",
    "DoodadConfig": "easylaunch.spec",
    "GitInfo": "easylaunch.spec",
    "State": "easylaunch.spec",
    "FunctionExit": "easylaunch.spec",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from .api import relaunch, run_experiment, run_sweep
    from .command import Command, CommandFailed
    from .context import current
    from .executor import DelayedSubmission, Executor
    from .job import Job, JobCancelled, JobError, Sweep, load_experiment
    from .spec import DoodadConfig, FunctionExit, GitInfo, State
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
