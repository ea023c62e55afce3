"""Run a submitit script on easylaunch by changing only its import::

    import easylaunch.submitit_compat as submitit      # was: import submitit

    executor = submitit.AutoExecutor(folder="logs")     # Slurm when sbatch is here, else local
    executor.update_parameters(timeout_min=4, slurm_partition="debug", slurm_array_parallelism=2)
    jobs = executor.map_array(add, [1, 2, 3], [10, 20, 30])   # one array job
    print([job.result() for job in jobs])

What maps: ``AutoExecutor(folder, cluster=None, **kwargs)``, ``LocalExecutor(folder)``,
``SlurmExecutor(folder)``, ``DebugExecutor(folder)`` (runs in this process) with ``submit``,
``map_array``, ``submit_array``, ``batch()`` and ``update_parameters`` (the names in
:data:`easylaunch.executor.SUBMITIT_NAMES`; ``slurm_*`` names are ignored off Slurm, as in
submitit); Jobs with ``job_id``, ``result()``, ``results()``, ``exception()``, ``done()``,
``wait()``, ``cancel()``, ``state``, ``stdout()``/``stderr()``, ``paths``; ``helpers``
(``DelayedSubmission``, ``Checkpointable``) and ``JobEnvironment()`` inside a job. A callable with
``checkpoint(*args, **kwargs) -> DelayedSubmission`` is requeued at the Slurm time limit and
resumes from the returned object (``slurm_max_num_timeout`` times, default 3).

Differences: runs live in ``<folder>/<name>/<run>/`` (``%j`` and anything after it in
``folder`` is dropped: run directories are already per job); ``result()`` re-raises the job's
own exception (remote traceback as its ``__cause__``) where submitit raises FailedJobError.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Union

from .context import current
from .executor import DelayedSubmission, Executor
from .job import Job

__all__ = [
    "AutoExecutor",
    "Checkpointable",
    "DebugExecutor",
    "DelayedSubmission",
    "Job",
    "JobEnvironment",
    "LocalExecutor",
    "SlurmExecutor",
    "SubmititJob",
    "helpers",
]


class SubmititJob(Job):
    """An easylaunch :class:`~easylaunch.job.Job` with submitit's extra methods."""

    def results(self) -> List[Any]:
        """``[result()]`` (one task per job)."""
        return [self.result()]

    def cancel(self, check: bool = True) -> bool:  # type: ignore[override]
        """Cancel the run (``check`` is accepted for submitit scripts)."""
        return super().cancel()

    @property
    def num_tasks(self) -> int:
        return 1

    def task(self, task_id: int) -> SubmititJob:
        if task_id != 0:
            raise ValueError(f"task_id {task_id} must be 0: easylaunch runs one task per job")
        return self

    @property
    def paths(self) -> _Paths:
        """``folder``, ``stdout``, ``stderr``, ``result_pickle``, ``submitted_pickle`` of the run."""
        return _Paths(self.run_dir)


class _Paths:
    def __init__(self, run_dir: Path):
        from . import records

        self.folder = run_dir
        self.stdout = run_dir / records.STDOUT
        self.stderr = run_dir / records.STDERR
        self.result_pickle = run_dir / records.RESULT
        self.submitted_pickle = run_dir / records.PAYLOAD


def _folder_root(folder: Union[str, Path]) -> Path:
    """The log dir for submitit's ``folder``: up to the first part with a ``%`` pattern."""
    parts = []
    for part in Path(folder).expanduser().parts:
        if "%" in part:
            break
        parts.append(part)
    if not parts:
        raise ValueError(f"folder {str(folder)!r} has no directory before its %-pattern")
    return Path(*parts).absolute()


#: submitit cluster name -> easylaunch mode (any easylaunch mode name is accepted too)
CLUSTERS = {"slurm": "slurm", "local": "local", "debug": "here_no_doodad"}


class _SubmititExecutor(Executor):
    job_class = SubmititJob
    _ignore_unused = True
    #: this executor's bare parameter names -> the AutoExecutor spelling
    _renames: dict = {}

    def __init__(self, folder: Union[str, Path], mode: str, **kwargs: Any) -> None:
        self.folder = _folder_root(folder)
        super().__init__(mode=mode, exp_name="submitit", base_log_dir=str(self.folder))
        self.update_parameters(**kwargs)

    def update_parameters(self, **kwargs: Any) -> None:
        super().update_parameters(**{self._renames.get(k, k): v for k, v in kwargs.items()})

    def submit_array(self, fns: Sequence[Callable[[], Any]]) -> List[Job]:
        """Each callable (taking no argument) as one run of ONE launch."""
        if not fns:
            import warnings

            warnings.warn("Received an empty job array", stacklevel=2)
            return []
        with self.batch():
            return [self.submit(fn) for fn in fns]

    @classmethod
    def name(cls) -> str:
        n = cls.__name__
        return (n[: -len("Executor")] if n.endswith("Executor") else n).lower()


class AutoExecutor(_SubmititExecutor):
    """submitit's AutoExecutor: Slurm when ``sbatch`` is on PATH, else local.

    ``cluster`` forces one: ``"slurm"``, ``"local"``, ``"debug"`` or any easylaunch mode
    (``"local_pool"``, ``"sss"``, ...). Extra arguments carry an executor prefix, as in
    submitit (``slurm_max_num_timeout=3``); those of other clusters are ignored.
    """

    def __init__(self, folder: Union[str, Path], cluster: Optional[str] = None, **kwargs: Any) -> None:
        self.cluster = cluster or self.which()
        self._renames = {"max_num_timeout": "slurm_max_num_timeout"}
        kwargs = {k: v for k, v in kwargs.items() if not _foreign(k, self.cluster)}
        super().__init__(folder, CLUSTERS.get(self.cluster, self.cluster), **kwargs)

    @staticmethod
    def which() -> str:
        """The cluster this machine can submit to: ``slurm`` or ``local``."""
        return "slurm" if shutil.which("sbatch") else "local"


def _foreign(name: str, cluster: str) -> bool:
    """A parameter prefixed for another submitit cluster (``local_...`` on Slurm, ...)."""
    prefix = name.split("_", 1)[0]
    return prefix in ("local", "debug", "slurm") and prefix != cluster and cluster in CLUSTERS


class LocalExecutor(_SubmititExecutor):
    """submitit's LocalExecutor: one local process per job (easylaunch mode ``local``)."""

    _renames = {"signal_delay_s": "slurm_signal_delay_s", "max_num_timeout": "slurm_max_num_timeout"}

    def __init__(
        self, folder: Union[str, Path], max_num_timeout: int = 3, python: Optional[str] = None
    ) -> None:
        _no_python(python)
        super().__init__(folder, "local")


class DebugExecutor(_SubmititExecutor):
    """submitit's DebugExecutor: runs each job in this process (easylaunch ``here_no_doodad``)."""

    def __init__(self, folder: Union[str, Path]) -> None:
        super().__init__(folder, "here_no_doodad")


class SlurmExecutor(_SubmititExecutor):
    """submitit's SlurmExecutor: Slurm parameters by their bare names (``partition``,
    ``time``, ``mem``, ``array_parallelism``, ``additional_parameters``, ...)."""

    def __init__(
        self,
        folder: Union[str, Path],
        max_num_timeout: int = 3,
        max_pickle_size_gb: float = 1.0,
        python: Optional[str] = None,
    ) -> None:
        from .executor import SUBMITIT_NAMES, UNMAPPED

        _no_python(python)
        self._renames = {
            bare: f"slurm_{bare}"
            for bare in {n[6:] for n in (*SUBMITIT_NAMES, *UNMAPPED) if n.startswith("slurm_")}
            if bare not in SUBMITIT_NAMES
        }
        self._renames.update({"job_name": "name", "ntasks_per_node": "tasks_per_node"})
        super().__init__(folder, "slurm", slurm_max_num_timeout=max_num_timeout)


def _no_python(python: Optional[str]) -> None:
    if python is not None:
        raise ValueError(
            f"python={python!r} is not supported: runs use the launching interpreter; to run in an "
            "image pass singularity_image=... (mode slurm)"
        )


class Checkpointable:
    """Base class of callables that resume from their own state after a requeue (submitit's
    ``helpers.Checkpointable``): ``checkpoint`` resubmits the object with the same arguments."""

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        return DelayedSubmission(self, *args, **kwargs)


class helpers:  # noqa: N801 - submitit's module name
    """``submitit.helpers``: DelayedSubmission and Checkpointable."""

    DelayedSubmission = DelayedSubmission
    Checkpointable = Checkpointable


class JobEnvironment:
    """Inside a job: its id, host and (single-task) ranks, as submitit's JobEnvironment.

    Raises RuntimeError outside an easylaunch run.
    """

    def __init__(self) -> None:
        config = current()
        if config is None:
            raise RuntimeError("JobEnvironment() is only available inside a job")
        from .environments import detect

        self.cluster = detect().name
        self.run_dir = Path(config.base_log_dir)
        self._ref = detect().job_ref()

    @property
    def job_id(self) -> str:
        return self._ref or self.run_dir.name

    @property
    def array_job_id(self) -> Optional[str]:
        return os.environ.get("SLURM_ARRAY_JOB_ID")

    @property
    def array_task_id(self) -> Optional[str]:
        return os.environ.get("SLURM_ARRAY_TASK_ID")

    @property
    def hostname(self) -> str:
        return socket.gethostname()

    @property
    def hostnames(self) -> List[str]:
        return [self.hostname]

    global_rank = 0
    local_rank = 0
    node = 0
    num_nodes = 1
    num_tasks = 1

    def __repr__(self) -> str:
        return f"JobEnvironment(job_id={self.job_id}, hostname={self.hostname}, cluster={self.cluster})"
