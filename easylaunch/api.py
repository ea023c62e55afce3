"""Entry points: run_experiment (one variant) and run_sweep (many, as one batch).

    from easylaunch import run_experiment, run_sweep, grid

    def train(doodad_config, variant):
        return variant["lr"] * 10

    job = run_experiment(train, exp_name="demo", mode="local", variant={"lr": 0.1})
    job.result()                      # 1.0

    sweep = run_sweep(train, grid({"lr": [0.1, 0.01], "seed": range(3)}),
                      exp_name="demo", mode="local_pool")
    sweep.results()

Everything is validated before any directory is written; a failed submission removes what
it created.
"""

from __future__ import annotations

import inspect
import re
import sys
import time
from typing import Any, Callable, Iterable, Mapping, Optional

from .batch import Batch
from .config import load_settings, log_root
from .gitinfo import prewarm
from .job import Job, Sweep
from .modes import all_mode_options, get_mode_class
from .options import COMMON, resolve
from .payload import dumps_checked
from .sweep import check_variants

prewarm()

_EXP_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=@,-]*$")


def _check_exp_name(exp_name: Any) -> str:
    if not isinstance(exp_name, str) or not exp_name.strip():
        raise ValueError(f"exp_name must be a non-empty string, got {exp_name!r}")
    if exp_name in (".", "..") or not _EXP_NAME.match(exp_name):
        raise ValueError(
            f"exp_name {exp_name!r} is not allowed: it becomes a directory name, so use letters, "
            "digits and _ . + = @ , - only (no '/', no leading '.' or '-', no spaces)"
        )
    return exp_name


def _check_callable(method_call: Any) -> None:
    if not callable(method_call):
        raise TypeError(
            f"method_call must be a function taking (doodad_config, variant), "
            f"got {type(method_call).__name__} {method_call!r:.60}"
        )
    try:
        sig = inspect.signature(method_call)
    except (TypeError, ValueError):
        return  # builtins and some C callables have no signature: let the call decide
    try:
        sig.bind(None, None)
    except TypeError as exc:
        name = getattr(method_call, "__qualname__", repr(method_call))
        raise TypeError(
            f"method_call {name}{sig} must accept two positional arguments (doodad_config, variant): {exc}"
        ) from None


def _prepare(
    method_call: Callable,
    variants: Iterable[Any],
    exp_name: str,
    mode: str,
    options: Mapping[str, Any],
    func: str,
) -> tuple[Batch, Any]:
    mode_cls = get_mode_class(mode)
    others = {name: opts for name, opts in all_mode_options().items() if name != mode}
    resolved = resolve(mode, mode_cls.options, others, options, func=func)
    _check_callable(method_call)
    variant_list = check_variants(variants)
    base_exp_name = _check_exp_name(exp_name)
    if resolved.get("prepend_date_to_exp_name"):
        exp_name = time.strftime("%y-%m-%d") + "-" + exp_name
    settings = load_settings(resolved.get("config_file"))
    fn_blob = dumps_checked(method_call, f"method_call {getattr(method_call, '__qualname__', method_call)!r}")
    variant_blobs = [dumps_checked(v, f"variant #{i} {v!r:.80}") for i, v in enumerate(variant_list)]
    batch = Batch(
        fn=method_call,
        fn_blob=fn_blob,
        exp_name=exp_name,
        base_exp_name=base_exp_name,
        mode_name=mode,
        options=resolved,
        settings=settings,
        log_root=log_root(resolved.get("base_log_dir"), settings),
        variants=variant_list,
        variant_blobs=variant_blobs,
    )
    mode_obj = mode_cls(settings)
    mode_obj.check(batch)
    return batch, mode_obj


def _launch(batch: Batch, mode_obj: Any) -> Sweep:
    batch.create_dirs()
    try:
        mode_obj.launch(batch)
    except BaseException:
        if not batch.started:
            batch.remove_dirs()
        raise
    jobs = Sweep(Job(run.run_dir, mode_obj, _resolved=True) for run in batch.runs)  # log_root is resolved
    if batch.options.get("verbose"):
        print(
            f"easylaunch: {len(jobs)} run(s) of {batch.exp_name!r} on mode {batch.mode_name!r} "
            f"in {batch.exp_dir} (first: {jobs[0].run_dir.name}, job id {jobs[0].job_id})",
            file=sys.stderr,
        )
    if mode_obj.waits_by_default and not batch.options.get("skip_wait"):
        jobs.wait()
    return jobs


def run_experiment(
    method_call: Callable,
    exp_name: str = "default",
    mode: str = "local",
    variant: Optional[Mapping[str, Any]] = None,
    **options: Any,
) -> Job:
    """Run ``method_call(doodad_config, variant)`` once on the target ``mode``; returns its Job.

    Takes doodad easy_launch's keyword arguments (use_gpu, gpu_id, base_log_dir,
    prepend_date_to_exp_name, skip_wait, ...). A keyword no mode knows is a TypeError with the
    closest valid name; one the chosen mode does not use is a TypeError naming the mode.
    Local modes wait for the run to finish unless ``skip_wait=True``.
    """
    batch, mode_obj = _prepare(method_call, [variant], exp_name, mode, options, "run_experiment")
    return _launch(batch, mode_obj)[0]


def run_sweep(
    method_call: Callable,
    variants: Iterable[Mapping[str, Any]],
    exp_name: str = "default",
    mode: str = "local",
    **options: Any,
) -> Sweep:
    """Launch one run per variant as ONE batch (packed the way the backend likes).

    Returns a :class:`Sweep` (a list of Jobs) with ``wait()``, ``results()``, ``states()`` and
    ``cancel()``. Local modes wait (with a progress display) unless ``skip_wait=True``.
    """
    if isinstance(variants, Mapping):
        raise TypeError("run_sweep() takes a list of variant dicts; for a grid use grid({...})")
    variants = list(variants)
    if not variants:
        raise ValueError("run_sweep() got no variants; pass a non-empty list such as grid({...})")
    batch, mode_obj = _prepare(method_call, variants, exp_name, mode, options, "run_sweep")
    return _launch(batch, mode_obj)


def relaunch(run_dir: str, mode: Optional[str] = None, **overrides: Any) -> Job:
    """Launch a run again from its directory (payload + manifest), optionally on another mode."""
    from . import records
    from .runner import load_payload_file

    old = Job.load(run_dir)
    manifest = old.manifest
    fn, _config, variant = load_payload_file(old.run_dir / records.PAYLOAD)
    options = {k: v for k, v in (manifest.get("options") or {}).items()}
    new_mode = mode or manifest["mode"]
    mode_cls = get_mode_class(new_mode)
    known = {o.name for o in (*COMMON, *mode_cls.options)}
    options = {k: v for k, v in options.items() if k in known and v is not None}
    options.update(overrides)
    if manifest.get("base_exp_name") and options.get("prepend_date_to_exp_name"):
        options["prepend_date_to_exp_name"] = False
    exp_name = manifest.get("exp_name") or old.run_dir.parent.name
    options.setdefault("base_log_dir", str(old.run_dir.parent.parent))
    return run_experiment(fn, exp_name=exp_name, mode=new_mode, variant=variant, **options)
