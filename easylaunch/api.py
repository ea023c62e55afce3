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

# ruff: noqa: E402
from __future__ import annotations

import inspect
import os
import re
import sys
import time
from typing import Any, Callable, Iterable, List, Mapping, Optional, Union

#: the oldest Python the launcher supports (setup.cfg python_requires; the target side: 3.8)
LAUNCHER_PYTHON = (3, 11)
if sys.version_info[:2] < LAUNCHER_PYTHON:  # before the imports below fail less clearly
    raise ImportError(
        "easylaunch's launcher needs Python %d.%d or later (this is %d.%d); "
        "launch from a newer Python (the runs themselves may use Python 3.8+ in an image or on a "
        "host)" % (LAUNCHER_PYTHON + sys.version_info[:2])
    )

from . import transitions, txlog
from .batch import Batch
from .config import load_settings, log_root
from .job import Job, Sweep, _Watcher
from .modes import all_mode_options, get_mode_class, mode_names
from .options import COMMON, DOODAD_KEYWORDS, ignored_line, resolve, split_ignored
from .payload import dumps_checked
from .plan import LaunchPlan
from .sweep import check_variants

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
    recorded_variants: Optional[List[dict]] = None,
    ignore_doodad_keywords: bool = False,
) -> tuple[Batch, Any, LaunchPlan]:
    """Validate a launch and build its Batch and plan (nothing is written yet).

    ``ignore_doodad_keywords`` (run_experiment's): doodad keywords the mode does not use are
    dropped (and recorded) instead of refused.

    ``recorded_variants`` (the Executor's) are what variant.json and the manifests show, when
    the variants handed to the function hold objects that are not JSON (call arguments).
    """
    mode_cls = _mode_class(mode, exp_name, func)
    own = [o.name for o in (*COMMON, *mode_cls.options)]
    ignored: dict = {}
    if ignore_doodad_keywords:
        options, ignored = split_ignored(own, options)
    # the other modes' modules are imported only to explain a keyword the mode does not use
    resolved = resolve(mode, mode_cls.options, lambda: _other_modes(mode), options, func=func)
    _check_callable(method_call)
    variant_list = check_variants(variants, doodad_rules=recorded_variants is None)
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
        recorded_variants=recorded_variants,
    )
    batch.early_start = mode_cls.starts_before_payloads
    batch.ignored_options = ignored
    mode_obj = mode_cls(settings)
    plan = mode_obj.check(batch)
    # an image's own Python may differ from this one: then the function travels by reference
    batch.target_python = plan.target_python
    batch.choose_transport()
    if ignored:  # one line per launch, as doodad scripts pass every keyword whatever the mode
        print(ignored_line(mode, ignored), file=sys.stderr)
    return batch, mode_obj, plan


def _other_modes(mode: str) -> dict:
    return {name: opts for name, opts in all_mode_options().items() if name != mode}


def _mode_class(mode: Any, exp_name: Any, func: str) -> Any:
    """The mode's class; a mode and exp_name given the other way round get a hint."""
    try:
        return get_mode_class(mode)
    except ValueError as exc:
        if func == "run_experiment" and isinstance(exp_name, str) and exp_name in mode_names():
            raise ValueError(
                f"{exc}. run_experiment's positional order is doodad's (method_call, mode, "
                f"exp_name, variant): did you mean run_experiment(fn, {exp_name!r}, {mode!r}, ...)?"
            ) from None
        raise


def _launch(
    batch: Batch,
    mode_obj: Any,
    plan: LaunchPlan,
    watcher: Optional[_Watcher] = None,
    keep_started: bool = False,
    job_class: type = Job,
) -> Sweep:
    """Create the run directories and hand the batch to its mode; returns the Jobs.

    ``watcher`` completes the Jobs' Future side (default: one for this launch). With
    ``keep_started``, an Exception raised once runs were written and started (here_no_doodad
    re-raises the function's) is left in the runs' records instead of propagating. ``job_class``
    is the class of the handles (the submitit layer adds submitit's methods).
    """
    batch.create_dirs()
    submitted = txlog.now_us()
    try:
        mode_obj.launch(batch, plan)
    except Exception:
        if not batch.started:
            batch.remove_dirs()
        if not (keep_started and batch.started and batch.materialized):
            raise
    except BaseException:
        if not batch.started:
            batch.remove_dirs()
        raise
    transitions.launched(batch, submitted)
    watcher = watcher or _Watcher()  # a thread only once a Job's Future side is waited on
    # log_root is resolved
    jobs = Sweep(job_class(run.run_dir, mode_obj, _resolved=True, _watcher=watcher) for run in batch.runs)
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
    mode: str = "local",
    exp_name: str = "default",
    variant: Optional[Mapping[str, Any]] = None,
    prepend_date_to_exp_name: bool = False,
    use_gpu: bool = False,
    gpu_id: Union[int, str] = 0,
    base_log_dir: Optional[Union[str, os.PathLike]] = None,
    local_input_dir_to_mount_point_dict: Optional[dict] = None,
    skip_wait: bool = False,
    sync_interval: int = 180,
    region: str = "us-east-1",
    instance_type: Optional[str] = None,
    spot_price: Optional[float] = None,
    verbose: bool = False,
    num_exps_per_instance: int = 1,
    time_in_mins: Optional[int] = None,
    slurm_config_name: Optional[str] = None,
    ssh_host: Optional[str] = None,
    gcp_kwargs: Optional[dict] = None,
    s3_log_prefix: Optional[str] = None,
    s3_log_name: str = "",
    **options: Any,
) -> Job:
    """Run ``method_call(doodad_config, variant)`` once on the target ``mode``; returns its Job.

    The signature is doodad easy_launch's, positional order and defaults included
    (``prepend_date_to_exp_name`` defaults to False), so doodad scripts run unchanged::

        run_experiment(train, "local", "my-exp", {"lr": 0.1})
        run_experiment(train, mode=mode, exp_name="my-exp", variant=v, ssh_host="blue",
                       region="us-west-2", time_in_mins=60)   # any mode: unused ones ignored

    A doodad keyword the chosen mode does not use is ignored, as doodad does: one warning line
    on stderr per launch, and the manifest's ``ignored_options`` records it. easylaunch's own
    options (``timeout``, ``max_parallel``, ``docker_options``, ...) follow as keywords; one
    the chosen mode does not use is a TypeError naming the mode, and a name no mode knows is a
    TypeError with the closest valid name. Local modes wait for the run to finish unless
    ``skip_wait=True``.
    """
    given = {name: value for name, value in locals().items() if name in DOODAD_KEYWORDS}
    return _launch(
        *_prepare(
            method_call,
            [variant],
            exp_name,
            mode,
            {**given, **options},
            "run_experiment",
            ignore_doodad_keywords=True,
        )
    )[0]


def run_sweep(
    method_call: Callable,
    variants: Iterable[Mapping[str, Any]],
    exp_name: str = "default",
    mode: str = "local",
    **options: Any,
) -> Sweep:
    """Launch one run per variant as ONE batch (packed the way the backend likes).

    Options are run_experiment's, checked strictly: an option the mode does not use is a
    TypeError naming the mode (passing it as None is allowed).

    Returns a :class:`Sweep` (a list of Jobs) with ``wait()``, ``results()``, ``states()`` and
    ``cancel()``. Local modes wait (with a progress display) unless ``skip_wait=True``.
    """
    if isinstance(variants, Mapping):
        raise TypeError("run_sweep() takes a list of variant dicts; for a grid use grid({...})")
    variants = list(variants)
    if not variants:
        raise ValueError("run_sweep() got no variants; pass a non-empty list such as grid({...})")
    return _launch(*_prepare(method_call, variants, exp_name, mode, options, "run_sweep"))


def relaunch(run_dir: str, mode: Optional[str] = None, **overrides: Any) -> Job:
    """Launch a run again from its directory (payload + manifest), optionally on another mode::

        job = relaunch("logs/my-exp/20261202-101500.123_ab12cd_000", mode="local_pool")

    The new run runs the code that ran: the run's own code snapshot (any mode's, local ones
    included), never the code dirs as they are now; its git infos are the run's. To unpickle
    the function here the snapshot goes at the end of ``sys.path`` (modules this process has
    imported already are kept: a local_pool relaunch from a script that imported the live code
    forks with it). A run without a snapshot (code too large, an older launch) runs today's
    code, with a warning.
    """
    import warnings

    from . import payload, records, snapshot
    from .runner import load_payload_file

    old = Job.load(run_dir)
    manifest = old.manifest
    path = old.run_dir / records.PAYLOAD
    header = payload.read_header(path)
    payload.check_versions(header)
    info = header.get("snapshot") or header.get("kept_snapshot")
    reused: Optional[dict] = None
    if info:
        try:
            reused = {**info, "archive": str(snapshot.locate(info, path))}
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"cannot relaunch {old.run_dir.name} with the code that ran: {exc}"
            ) from None
        # its code reachable here for unpickling, behind what this process imports already
        # (nothing imported is forgotten: the caller may be a script or a test)
        for entry in snapshot.import_paths(reused, path):
            if entry not in sys.path:
                sys.path.append(entry)
        header = {**header, "snapshot": None, "sys_path": []}  # not the live code dirs
    else:
        warnings.warn(
            f"run {old.run_dir.name} kept no code snapshot: the relaunch runs the code as it is now",
            stacklevel=2,
        )
    fn, config, variant = load_payload_file(path, header)
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
    batch, mode_obj, plan = _prepare(fn, [variant], exp_name, new_mode, options, "relaunch")
    batch.reuse_snapshot = reused
    batch.relaunch_of = str(old.run_dir)
    batch.git_infos = list(config.git_infos)  # what ran, not this process's directory
    return _launch(batch, mode_obj, plan)[0]
