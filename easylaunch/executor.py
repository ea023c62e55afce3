"""A ``concurrent.futures`` / submitit-style Executor on every easylaunch mode.

    import easylaunch

    def train(lr, epochs=10):
        config = easylaunch.current()        # the run's DoodadConfig (None outside a run)
        return lr * epochs

    with easylaunch.Executor(mode="slurm", exp_name="demo") as ex:
        ex.update_parameters(timeout_min=30, slurm_partition="debug")  # submitit's names work
        job = ex.submit(train, 0.1, epochs=3)     # a Job, which is a concurrent.futures.Future
        jobs = ex.map_array(train, [0.1, 0.01])   # ONE launch: one Slurm array
        with ex.batch():                          # likewise: the submits become one launch
            more = [ex.submit(train, lr) for lr in (1e-3, 1e-4)]
        print(job.result(), [j.result() for j in concurrent.futures.as_completed(jobs + more)])

The function takes its own arguments: each run calls it through :class:`_Call`, a small
picklable ``(doodad_config, variant) -> fn(*args, **kwargs)`` whose arguments travel in the
run's payload, while ``variant.json`` records a JSON-friendly summary of them. Every run keeps
its run directory, so ``easylaunch ls/status/logs`` and ``Job.load`` work as for any launch.

:data:`SUBMITIT_NAMES` maps submitit's ``update_parameters`` names to easylaunch options (the
README's "Coming from submitit" table is rendered from it by :func:`submitit_table`).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import re
import shlex
import threading
import time
import warnings
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

from .job import Job, Sweep, _Watcher, cancel_all, cleanup_all, refresh_states, wait_all
from .spec import State


class DelayedSubmission:
    """``function(*args, **kwargs)`` to be run later: what a ``checkpoint()`` method returns to
    resume a run after a requeue (submitit's ``helpers.DelayedSubmission``)::

        class Train:
            def __call__(self, steps): ...
            def checkpoint(self, steps):
                return DelayedSubmission(self, steps)   # resume with this object's state
    """

    def __init__(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        self.function = function
        self.args = args
        self.kwargs = kwargs

    def result(self) -> Any:
        """Call it now."""
        return self.function(*self.args, **self.kwargs)

    def __repr__(self) -> str:
        return (
            f"DelayedSubmission({_name(self.function)}, args={self.args!r:.60}, kwargs={self.kwargs!r:.60})"
        )


def _name(fn: Any) -> str:
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None) or type(fn).__module__
    return f"{module}.{qualname}"


def _checkpoint_method(fn: Any) -> Optional[Callable[..., Any]]:
    """The submitit-style checkpoint method of ``fn`` (``__submitit_checkpoint__`` first)."""
    for attr in ("__submitit_checkpoint__", "checkpoint"):
        method = getattr(fn, attr, None)
        if callable(method):
            return method
    return None


class _Call:
    """What an Executor's run executes: ``(doodad_config, variant) -> fn(*args, **kwargs)``.

    One object per launch holds the launch's distinct functions (pickled once); each run's
    variant names its function and holds its arguments. After a checkpoint the object holds
    the one function and the arguments of the ``DelayedSubmission`` to resume with.
    """

    def __init__(self, fns: Sequence[Callable[..., Any]], bound: Optional[Tuple[tuple, dict]] = None):
        self.fns = tuple(fns)
        self.bound = bound
        # the manifest's "function" names the user's (first) function, not this wrapper
        first = self.fns[0]
        self.__module__ = getattr(first, "__module__", None) or type(first).__module__
        self.__qualname__ = getattr(first, "__qualname__", None) or type(first).__qualname__
        if len(self.fns) > 1:
            self.__qualname__ += f" (+{len(self.fns) - 1} more)"

    def _resolve(self, variant: Mapping[str, Any]) -> Tuple[Callable[..., Any], tuple, dict]:
        if self.bound is not None:
            return self.fns[0], tuple(self.bound[0]), dict(self.bound[1])
        return (
            self.fns[int(variant.get("fn", 0))],
            tuple(variant.get("args", ())),
            dict(variant.get("kwargs", {})),
        )

    def __call__(self, doodad_config: Any, variant: Mapping[str, Any]) -> Any:
        fn, args, kwargs = self._resolve(variant)
        return fn(*args, **kwargs)

    @property
    def checkpoint(self) -> Callable[[Any, Mapping[str, Any]], Optional[_Call]]:
        """Present only when a wrapped function has submitit's ``checkpoint()``: the Slurm
        requeue hook (:mod:`easylaunch.taskrunner`) then calls it at the time limit."""
        if not any(_checkpoint_method(fn) is not None for fn in self.fns):
            raise AttributeError("checkpoint")
        return self._checkpoint

    def _checkpoint(self, doodad_config: Any, variant: Mapping[str, Any]) -> Optional[_Call]:
        fn, args, kwargs = self._resolve(variant)
        method = _checkpoint_method(fn)
        if method is None:
            return None
        resume = method(*args, **kwargs)
        if resume is None:
            return None  # the function declines the requeue: the run ends as TIMEOUT
        if all(hasattr(resume, a) for a in ("function", "args", "kwargs")):  # a DelayedSubmission
            return _Call([resume.function], (tuple(resume.args), dict(resume.kwargs)))
        if callable(resume):
            return _Call([resume], (args, kwargs))
        raise TypeError(
            f"{_name(fn)}.checkpoint() returned {type(resume).__name__}; return a "
            "DelayedSubmission(callable, *args, **kwargs), a callable, or None"
        )


# -- submitit's parameter names ------------------------------------------------------------


@dataclass(frozen=True)
class Alias:
    """What one submitit ``update_parameters`` name sets in easylaunch.

    ``target`` is an easylaunch option, ``slurm_options.FIELD`` (a SlurmConfig field),
    ``sbatch:--FLAG`` (an sbatch flag in ``slurm_options.extra_flags``) or ``exp_name``.
    """

    target: str
    note: str = ""
    convert: Optional[Callable[[Any], Any]] = None


def _mem(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"mem_gb={value!r} must be a positive number of GB")
    return f"{int(value)}G" if float(value).is_integer() else f"{int(round(value * 1024))}M"


def _only(expected: Any, why: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value != expected:
            raise ValueError(f"only {expected!r} is supported: {why}")
        return value

    return check


_SBATCH_FLAGS = (
    "comment",
    "exclude",
    "nodelist",
    "mail_type",
    "mail_user",
    "wckey",
    "dependency",
    "exclusive",
)
_SBATCH_FLAGS += ("mem_per_cpu", "mem_per_gpu", "cpus_per_gpu", "gpus_per_task")

#: submitit name -> the easylaunch option it sets (AutoExecutor spelling; SlurmExecutor's bare
#: names such as ``partition`` are these without ``slurm_``). Rendered into the README.
SUBMITIT_NAMES: Dict[str, Alias] = {
    "name": Alias("exp_name", "names the run directories `<folder>/<name>/` and the Slurm job"),
    "slurm_job_name": Alias("exp_name"),
    "timeout_min": Alias("time_in_mins", "minutes (`slurm_time` also takes `'HH:MM:SS'`)"),
    "slurm_time": Alias("time_in_mins"),
    "slurm_partition": Alias("slurm_options.partition"),
    "slurm_account": Alias("slurm_options.account_name"),
    "slurm_qos": Alias("slurm_options.qos"),
    "slurm_constraint": Alias("slurm_options.constraint"),
    "slurm_gres": Alias("slurm_options.gres"),
    "mem_gb": Alias("slurm_options.mem", "`4` -> `'4G'`, `0.5` -> `'512M'`", _mem),
    "slurm_mem": Alias("slurm_options.mem", "`slurm_mem`: a Slurm size such as `'4G'`"),
    "cpus_per_task": Alias("slurm_options.n_cpus_per_task"),
    "slurm_cpus_per_task": Alias("slurm_options.n_cpus_per_task"),
    "gpus_per_node": Alias("slurm_options.n_gpus", "also sets `use_gpu` when > 0"),
    "slurm_gpus_per_node": Alias("slurm_options.n_gpus", "also sets `use_gpu` when > 0"),
    "nodes": Alias("slurm_options.n_nodes"),
    "slurm_nodes": Alias("slurm_options.n_nodes"),
    "slurm_array_parallelism": Alias("max_parallel", "the array's `%k` (local modes: runs at once)"),
    "slurm_signal_delay_s": Alias("signal_before_timeout", "seconds; USR2 before the time limit"),
    "slurm_max_num_timeout": Alias("max_requeue", "requeues of a checkpointable function"),
    "slurm_additional_parameters": Alias(
        "slurm_options.extra_flags", '`{"mail_type": "END"}` -> `--mail-type=END` (as submitit writes them)'
    ),
    **{f"slurm_{flag}": Alias(f"sbatch:--{flag.replace('_', '-')}") for flag in _SBATCH_FLAGS},
    "tasks_per_node": Alias(
        "-", "only `1`: easylaunch runs one process per run", _only(1, "easylaunch runs one process per run")
    ),
    "slurm_ntasks_per_node": Alias("-", "only `1`", _only(1, "easylaunch runs one process per run")),
    "stderr_to_stdout": Alias(
        "-", "only `False`: stdout.log and stderr.log stay apart", _only(False, "the logs stay apart")
    ),
}

#: submitit names with no easylaunch counterpart, and what to use instead
UNMAPPED: Dict[str, str] = {
    "slurm_setup": "run setup commands inside the function, or use SINGULARITY_PRE_CMDS with an image",
    "slurm_srun_args": "easylaunch starts its runner without srun",
    "slurm_use_srun": "easylaunch starts its runner without srun (always `False`)",
    "slurm_python": "runs use the launching interpreter; for an image use singularity_image",
    "visible_gpus": "use gpu_id",
    "slurm_num_gpus": "use gpus_per_node",
}


def submitit_table() -> str:
    """The README's mapping table (markdown), rendered from :data:`SUBMITIT_NAMES`: one row per
    easylaunch target, naming every submitit spelling that sets it."""
    rows: Dict[str, Tuple[List[str], List[str]]] = {}
    for name, alias in SUBMITIT_NAMES.items():
        target = alias.target
        if target.startswith("sbatch:"):
            shown, note = (
                "`slurm_options['extra_flags']` (sbatch flags)",
                "`slurm_X=v` -> `--X=v` (`_` -> `-`)",
            )
        elif target.startswith("slurm_options."):
            shown, note = f"`slurm_options['{target.split('.', 1)[1]}']`", alias.note
        elif target == "-":
            shown, note = "(none)", alias.note
        else:
            shown, note = f"`{target}`", alias.note
        if target.startswith("sbatch:") or target == "slurm_options.extra_flags":
            shown = "`slurm_options['extra_flags']`" + (
                " (sbatch flags)" if target.startswith("sbatch:") else ""
            )
        key = shown if target != "-" else f"- {name}"
        names, notes = rows.setdefault(key, ([], []))
        names.append(f"`{name}`")
        if note and note not in notes:
            notes.append(note)
    lines = ["| submitit | easylaunch | note |", "|---|---|---|"]
    for key, (names, notes) in rows.items():
        shown = "(none)" if key.startswith("- ") else key
        lines.append(f"| {', '.join(names)} | {shown} | {'; '.join(notes)} |")
    for name, hint in UNMAPPED.items():
        lines.append(f"| `{name}` | (error) | {hint} |")
    return "\n".join(lines) + "\n"


_FLAG_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def _sbatch_flag(flag: str, value: Any) -> str:
    """``--flag=value`` in the form SlurmConfig.extra_flags takes (value shell-quoted)."""
    name = flag.lstrip("-")
    if not _FLAG_NAME.match(name):
        raise ValueError(f"{flag!r} is not an sbatch option name")
    name = name.replace("_", "-")
    if value is True:
        return f"--{name}"
    return f"--{name}={shlex.quote(str(value))}"


def _all_option_names() -> Dict[str, Any]:
    from .modes import all_mode_options
    from .options import COMMON, PLANNED

    names: Dict[str, Any] = {o.name: o for o in COMMON}
    for opts in all_mode_options().values():
        for o in opts:
            names.setdefault(o.name, o)
    for name in PLANNED:
        names.setdefault(name, None)
    return names


def _jsonable(value: Any, limit: int = 2000) -> Any:
    """``value`` itself when it is (small) JSON, else a short repr, for variant.json."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = None
    if text is not None and len(text) <= limit:
        return value
    text = repr(value)
    return text if len(text) <= 200 else text[:199] + "…"


# -- the Executor ---------------------------------------------------------------------------


class Executor(futures.Executor):
    """Submit plain functions to any easylaunch mode; every call returns a :class:`Job` (a Future).

    ``Executor(mode="local", exp_name="executor", **options)`` takes the options of
    ``run_experiment`` for that mode and submitit's names (:data:`SUBMITIT_NAMES`)::

        ex = Executor(mode="slurm", exp_name="sweep", slurm_config_name="cpu")
        ex.update_parameters(timeout_min=60, cpus_per_task=2, slurm_array_parallelism=8)
        jobs = ex.map_array(train, [0.1, 0.01, 0.001])   # one array job
        for job in concurrent.futures.as_completed(jobs):
            print(job.result())
        ex.shutdown()                                      # or use `with Executor(...) as ex:`

    Launches never wait: ``submit`` returns at once. A name that no mode and no submitit alias
    knows is a TypeError naming the closest option; one that the chosen mode does not use is a
    TypeError naming the mode. With ``mode="here_no_doodad"`` the call runs inside ``submit``.
    """

    #: the Job class handed out (the submitit compatibility layer adds submitit's methods)
    job_class: type = Job
    #: drop options the chosen mode does not use instead of refusing them (submitit ignores
    #: ``slurm_*`` parameters on other clusters; the compatibility layer does the same)
    _ignore_unused: bool = False

    def __init__(self, mode: str = "local", exp_name: str = "executor", **options: Any) -> None:
        from .api import _check_exp_name
        from .modes import get_mode_class

        self._mode_cls = get_mode_class(mode)
        self.mode = mode
        self.exp_name = _check_exp_name(exp_name)
        self._options: Dict[str, Any] = {}
        self._lock = threading.RLock()
        self._watcher = _Watcher()
        self._batch: Optional[List[Tuple[Job, Callable[..., Any], tuple, dict]]] = None
        self._jobs: List[Job] = []
        self._shut_down = False
        self.update_parameters(**options)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mode={self.mode!r}, exp_name={self.exp_name!r}, {self._options!r})"

    # -- parameters ------------------------------------------------------------------------
    @property
    def parameters(self) -> Dict[str, Any]:
        """The easylaunch options every launch of this executor uses."""
        return dict(self._options)

    def update_parameters(self, **params: Any) -> None:
        """Set launch options: easylaunch's names or submitit's (see :data:`SUBMITIT_NAMES`).

        Checked at once: an unknown name is a TypeError naming the closest easylaunch option,
        a bad value a TypeError/ValueError, before anything is submitted. None means "unset"
        (as in submitit). Not allowed inside ``with executor.batch():``.
        """
        if self._batch is not None:
            raise RuntimeError(
                'Changing parameters within batch context "with executor.batch():" is not allowed'
            )
        func = f"{type(self).__name__}.update_parameters()"
        known = _all_option_names()
        own = {o.name for o in self._common_and_mode_options()}
        options = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self._options.items()}
        exp_name = self.exp_name
        for name, value in params.items():
            if value is None:
                continue
            if name in known and name not in SUBMITIT_NAMES:
                origin, targets = name, [(name, value, False)]
            elif name in SUBMITIT_NAMES:
                origin, targets = name, self._translate(name, value, func)
            else:
                raise TypeError(self._unknown(name, func, known))
            for target, converted, optional in targets:
                if target == "exp_name":
                    from .api import _check_exp_name

                    exp_name = _check_exp_name(converted)
                    continue
                if target not in own:
                    if optional:
                        continue  # e.g. gpus_per_node's GPU count off Slurm (use_gpu still applies)
                    if self._ignore_unused:
                        # as submitit does on other clusters; only a lost time limit is worth a word
                        if target == "time_in_mins" and not origin.startswith("slurm_"):
                            warnings.warn(
                                f"{func}: {origin}={value!r} is ignored: mode {self.mode!r} has no time limit",
                                stacklevel=2,
                            )
                        continue
                    via = "" if origin == target else f" (it sets easylaunch's {target!r})"
                    raise TypeError(
                        f"{func}: {origin!r}{via} is not used by mode {self.mode!r}; remove it or pick a mode "
                        "that uses it"
                    )
                if target == "slurm_options" and isinstance(converted, Mapping):
                    merged = dict(options.get("slurm_options") or {})
                    converted = dict(converted)
                    extra = " ".join(
                        f for f in (merged.get("extra_flags"), converted.pop("extra_flags", None)) if f
                    )
                    merged.update(converted)
                    if extra:
                        merged["extra_flags"] = extra
                    options["slurm_options"] = merged
                else:
                    options[target] = converted
        self._check(options, func)
        self._options, self.exp_name = options, exp_name

    def _common_and_mode_options(self) -> tuple:
        from .options import COMMON

        return (*COMMON, *self._mode_cls.options)

    def _translate(self, name: str, value: Any, func: str) -> List[Tuple[str, Any, bool]]:
        """``[(easylaunch option, value, optional)]`` for submitit's ``name=value``; an optional
        target is left out on modes that do not use it."""
        alias = SUBMITIT_NAMES[name]
        try:
            converted = alias.convert(value) if alias.convert else value
        except ValueError as exc:
            raise ValueError(f"{func}: {name}={value!r}: {exc}") from None
        target = alias.target
        if target == "-":
            return []
        if target == "slurm_options.extra_flags":
            if not isinstance(value, Mapping):
                raise TypeError(f"{func}: {name} must be a dict of sbatch options, got {value!r}")
            flags = [_sbatch_flag(k, v) for k, v in sorted(value.items()) if v is not False and v is not None]
            return [("slurm_options", {"extra_flags": " ".join(flags)}, False)] if flags else []
        if target.startswith("sbatch:"):
            if value is False:
                return []
            return [("slurm_options", {"extra_flags": _sbatch_flag(target[7:], converted)}, False)]
        if target.startswith("slurm_options."):
            field = target.split(".", 1)[1]
            if field == "n_gpus":
                if isinstance(converted, bool) or not isinstance(converted, int) or converted < 0:
                    raise TypeError(f"{func}: {name}={value!r} must be a number of GPUs (0 or more)")
                # the GPU count is Slurm's; use_gpu applies on every mode
                return [("use_gpu", converted > 0, False), ("slurm_options", {field: converted}, True)]
            return [("slurm_options", {field: converted}, False)]
        return [(target, converted, False)]

    def _unknown(self, name: str, func: str, known: Mapping[str, Any]) -> str:
        if name in UNMAPPED:
            return f"{func}: submitit's {name!r} has no easylaunch counterpart: {UNMAPPED[name]}"
        candidates = sorted(set(known) | set(SUBMITIT_NAMES))
        close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
        if close:
            alias = SUBMITIT_NAMES.get(close[0])
            where = f" (easylaunch's {alias.target!r})" if alias and alias.target != "-" else ""
            return f"{func} got an unknown parameter {name!r}; did you mean {close[0]!r}{where}?"
        own = sorted(o.name for o in self._common_and_mode_options())
        return (
            f"{func} got an unknown parameter {name!r}; options of mode {self.mode!r}: {', '.join(own)} "
            "(or submitit's names: see easylaunch.executor.SUBMITIT_NAMES)"
        )

    def _check(self, options: Mapping[str, Any], func: str) -> None:
        from .modes import all_mode_options
        from .options import resolve

        def others() -> dict:  # imported only to explain a keyword the mode does not use
            return {n: o for n, o in all_mode_options().items() if n != self.mode}

        resolve(self.mode, self._mode_cls.options, others, options, func=func)

    def _launch_options(self) -> Dict[str, Any]:
        options = dict(self._options)
        if any(o.name == "skip_wait" for o in self._mode_cls.options):
            options["skip_wait"] = True  # a Future is returned at once; results are waited for
        return options

    # -- submitting --------------------------------------------------------------------------
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Job:  # type: ignore[override]
        """Run ``fn(*args, **kwargs)`` as one run; returns its :class:`Job` at once."""
        with self._lock:
            self._check_open()
            _check_call(fn, args, kwargs)
            if self._batch is not None:
                job = self.job_class._unlaunched(self._watcher)
                self._batch.append((job, fn, args, kwargs))
                return job
        return self._launch([(fn, args, kwargs)], "submit")[0]

    def map_array(self, fn: Callable[..., Any], *iterables: Iterable[Any]) -> List[Job]:
        """``fn(*args)`` for each tuple of ``zip(*iterables)``, as ONE launch (one Slurm array)."""
        calls = [(fn, tuple(args), {}) for args in zip(*iterables)]
        if not calls:
            warnings.warn("Received an empty job array", stacklevel=2)
            return []
        with self._lock:
            self._check_open()
            for _, args, kwargs in calls[:1]:
                _check_call(fn, args, kwargs)
            if self._batch is not None:
                jobs = [self.job_class._unlaunched(self._watcher) for _ in calls]
                self._batch.extend((j, f, a, k) for j, (f, a, k) in zip(jobs, calls))
                return jobs
        return list(self._launch(calls, "map_array"))

    def map(  # type: ignore[override]
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: Optional[float] = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """Like ``concurrent.futures.Executor.map``, submitted as ONE launch: results in order;
        TimeoutError after ``timeout`` seconds; the first failure is raised when reached (runs not
        started yet are then cancelled, as a thread pool would)."""
        end = None if timeout is None else time.monotonic() + timeout
        calls = [tuple(args) for args in zip(*iterables)]
        jobs = self.map_array(fn, *zip(*calls)) if calls else []  # nothing to map: no warning

        def results() -> Iterator[Any]:
            pending = list(reversed(jobs))
            try:
                while pending:
                    job = pending[-1]
                    yield job.result(None if end is None else max(0.0, end - time.monotonic()))
                    pending.pop()
            finally:
                _cancel_unstarted(pending)

        return results()

    @contextlib.contextmanager
    def batch(self, allow_implicit_submissions: bool = False) -> Iterator[None]:
        """Collect the ``submit``/``map_array`` calls of the block into ONE launch at its end.

        The Jobs exist at once but get their run (and run directory) when the block exits; an
        exception inside the block drops the submissions (their Futures end cancelled).
        """
        if allow_implicit_submissions:
            raise ValueError(
                "allow_implicit_submissions is not supported: the batch launches when the block exits"
            )
        with self._lock:
            if self._batch is not None:
                raise RuntimeError('Nesting "with executor.batch()" contexts is not allowed.')
            self._batch = []
        try:
            yield None
        except BaseException:
            with self._lock:
                dropped, self._batch = self._batch or [], None
            for job, *_ in dropped:
                job._drop("dropped: the `with executor.batch():` block raised before it could launch")
            raise
        with self._lock:
            calls, self._batch = self._batch or [], None
        if not calls:
            warnings.warn(
                'No submission happened during "with executor.batch()" context.', RuntimeWarning, stacklevel=3
            )
            return
        try:
            launched = self._launch([(f, a, k) for _, f, a, k in calls], "batch", register=False)
        except BaseException as exc:
            for job, *_ in calls:
                job._drop(f"never launched: the batch's launch failed ({type(exc).__name__}: {exc})")
            raise
        for (job, *_), run in zip(calls, launched):
            job._bind(run)
        with self._lock:
            self._jobs.extend(job for job, *_ in calls)

    def _launch(
        self, calls: List[Tuple[Callable[..., Any], tuple, dict]], what: str, register: bool = True
    ) -> Sweep:
        from .api import _launch, _prepare

        fns: List[Callable[..., Any]] = []
        index: Dict[int, int] = {}
        for fn, _, _ in calls:
            if id(fn) not in index:
                index[id(fn)] = len(fns)
                fns.append(fn)
        variants = [{"fn": index[id(fn)], "args": args, "kwargs": kwargs} for fn, args, kwargs in calls]
        shown = [
            {
                "function": _name(fn),
                "args": [_jsonable(a) for a in args],
                "kwargs": {str(k): _jsonable(v) for k, v in kwargs.items()},
            }
            for fn, args, kwargs in calls
        ]
        batch, mode_obj, plan = _prepare(
            _Call(fns),
            variants,
            self.exp_name,
            self.mode,
            self._launch_options(),
            f"{type(self).__name__}.{what}()",
            recorded_variants=shown,
        )
        jobs = _launch(
            batch, mode_obj, plan, watcher=self._watcher, keep_started=True, job_class=self.job_class
        )
        if register:
            with self._lock:
                self._jobs.extend(jobs)
        return jobs

    def _check_open(self) -> None:
        if self._shut_down:
            raise RuntimeError("cannot schedule new futures after shutdown")

    # -- ending ------------------------------------------------------------------------------
    @property
    def jobs(self) -> List[Job]:
        """Every Job this executor launched, in submission order."""
        with self._lock:
            return list(self._jobs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """No new submissions; ``cancel_futures`` cancels the runs that have not started;
        ``wait`` blocks until every launched run has ended (runs go on otherwise), then lets the
        backend release what it still holds (containers)."""
        with self._lock:
            self._shut_down = True
            jobs = list(self._jobs)
        if cancel_futures:
            _cancel_unstarted(jobs)
        if wait and jobs:
            refresh_states(jobs, backend=False)
            waitable = [j for j in jobs if j.last_state is not State.GENERATED]
            wait_all(waitable, progress=False)
            for job in waitable:
                job._settle()
            cleanup_all(waitable)  # e.g. the containers of a docker launch


def _check_call(fn: Any, args: tuple, kwargs: dict) -> None:
    """Refuse a non-callable or arguments the function cannot take, before anything is written."""
    if not callable(fn):
        raise TypeError(f"submit() needs a callable, got {type(fn).__name__} {fn!r:.60}")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        raise TypeError(f"{_name(fn)}{sig} cannot be called with these arguments: {exc}") from None


def _cancel_unstarted(jobs: Sequence[Job]) -> None:
    """Cancel the runs among ``jobs`` that have not started (what a thread pool can cancel)."""
    launched = [j for j in jobs if "run_dir" in j.__dict__]
    if not launched:
        return
    refresh_states(launched)
    queued = [j for j in launched if j.last_state is State.PENDING]
    if queued:
        cancel_all(queued)
