"""Launcher side of GPU packing: the ``gpus=`` / ``gpu_policy=`` options of the local modes.

    sweep = run_sweep(train, variants, exp_name="mnist", mode="local_pool",
                      gpus="auto", gpu_policy="pack")

Each run asks the log dir's GPU broker (:mod:`easylaunch.gpu_broker`) for a GPU when it starts
and holds it until it ends; the broker packs runs by the measured GPU memory of their job
type. The job type is the function's module and qualified name (``train.py::fit`` for a
function of the launch script), or a :class:`~easylaunch.Command`'s first two arguments.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Dict, Optional

from .gpu_sched import POLICIES
from .options import Option

GPU_OPTIONS = (
    Option(
        "gpus",
        (str, int, list, tuple),
        None,
        "GPUs the runs share, packed by measured memory: 'auto' (every GPU here), a count, or ids",
    ),
    Option(
        "gpu_policy", (str,), "pack", "with gpus=: 'pack' (tightest GPU that fits) or 'spread' (most free)"
    ),
)


def job_type(fn: Callable) -> str:
    """The job type whose GPU memory profile a run uses: ``file.py::func`` for a function of
    the launch script (GRN's naming), ``module::qualname`` otherwise, ``'python train.py'``
    for ``Command(['python', 'train.py', ...])``."""
    argv = getattr(fn, "argv", None)
    if argv is not None and type(fn).__name__ == "Command":
        parts = argv.split()[:2] if isinstance(argv, str) else [str(a) for a in argv[:2]]
        return " ".join(parts)
    target = getattr(fn, "func", fn)  # functools.partial
    module = getattr(target, "__module__", None) or "?"
    name = getattr(target, "__qualname__", None) or type(target).__qualname__
    if module == "__main__":
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        if main_file:
            module = os.path.basename(main_file)
    return f"{module}::{name}"


def gpu_request(fn: Callable, options: Dict[str, Any], log_root: os.PathLike) -> Optional[dict]:
    """What each run's payload carries to its runner for ``gpus=`` (None without it); checks
    the options against this machine's GPUs first (ValueError naming the fix)."""
    spec = options.get("gpus")
    if spec is None:
        return None
    policy = options.get("gpu_policy") or "pack"
    if policy not in POLICIES:
        raise ValueError(
            f"option gpu_policy={policy!r} must be one of {', '.join(repr(p) for p in POLICIES)}"
        )
    from .gpu_broker import resolve_gpus

    ids = resolve_gpus(spec)
    return {"dir": os.path.abspath(os.fspath(log_root)), "gpus": ids, "policy": policy, "type": job_type(fn)}
