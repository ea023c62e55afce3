"""Target side: what the backend a run executes under can tell and do (submitit's JobEnvironment).

The runner and the task runner are the same on every target; the facts that differ by backend
live here, behind one small interface::

    env = detect()            # SlurmEnvironment inside a Slurm job, else LocalEnvironment
    env.job_ref()             # "1234_7" on Slurm, None elsewhere
    env.requeue_pending()     # is the SIGTERM we got a requeue (preemption) rather than a cancel?
    env.time_limit_reached()  # is the SIGTERM we got the scheduler's time limit?
    env.requeue()             # ask the scheduler to run this task again (checkpoint at the limit)

Environments for new backends (cloud spot notices, ...) subclass :class:`JobEnvironment` and
join :func:`detect`. Runs on Python 3.8+ with the standard library only.
"""

from __future__ import annotations

import os
import subprocess
from typing import Dict, Optional


class JobEnvironment:
    """The plain environment: no scheduler, so no requeue and no time limit but the run's own."""

    name = "local"
    #: how messages name the scheduler
    scheduler = "the scheduler"
    #: the scheduler can start this task again (a checkpoint at the time limit is then requeued;
    #: elsewhere it is saved as the run's payload, to relaunch)
    can_requeue = False

    def job_ref(self) -> Optional[str]:
        """The scheduler's id for this task, None when there is no scheduler."""
        return None

    def requeue_pending(self) -> bool:
        """True when the scheduler is putting this task back in its queue (a SIGTERM is no cancel)."""
        return False

    def time_limit_reached(self) -> bool:
        """True when the SIGTERM that arrived is the scheduler's time limit."""
        return False

    def requeue_reason(self) -> str:
        """What a run's status says when a requeue (:meth:`requeue_pending`) stopped it."""
        return f"requeued by {self.scheduler} (preemption)"

    def requeue(self) -> bool:
        """Ask the scheduler to start this task again; False when it cannot."""
        return False

    def facts(self) -> Dict[str, str]:
        """What the status record should say about where the run executes (ids, attempt)."""
        return {}

    def oom_kills(self) -> Optional[int]:
        """How many processes the kernel's OOM killer has killed in this process's memory
        cgroup (a container's, a Slurm job's), None where that cannot be read."""
        return cgroup_oom_kills()


LocalEnvironment = JobEnvironment


class SlurmEnvironment(JobEnvironment):
    """Inside a Slurm job: ids from ``$SLURM_*``, state from ``scontrol``, requeue by ``scontrol``."""

    name = "slurm"
    scheduler = "Slurm"
    can_requeue = True

    def requeue_reason(self) -> str:
        return "requeued by Slurm (preemption or scontrol requeue)"

    def __init__(self, environ: Optional[Dict[str, str]] = None, scontrol: str = "scontrol") -> None:
        self.environ = os.environ if environ is None else environ
        self.scontrol = scontrol

    def job_ref(self) -> Optional[str]:
        """``ARRAYJOB_TASK`` for an array task, else ``JOBID``."""
        array_job, task = self.environ.get("SLURM_ARRAY_JOB_ID"), self.environ.get("SLURM_ARRAY_TASK_ID")
        if array_job and task:
            return f"{array_job}_{task}"
        return self.environ.get("SLURM_JOB_ID")

    def job_fields(self) -> Dict[str, str]:
        """This task's ``scontrol -o show job`` record (empty on error).

        Asks for ``ARRAYJOB_TASK``: ``show job $SLURM_JOB_ID`` of the array's own id lists every
        task of the array, one record per line.
        """
        ref = self.job_ref()
        if not ref:
            return {}
        try:
            out = subprocess.run(
                [self.scontrol, "-o", "show", "job", ref], capture_output=True, text=True, timeout=10
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return {}
        line = out.splitlines()[0] if out.strip() else ""
        return dict(tok.split("=", 1) for tok in line.split() if "=" in tok)

    def requeue_pending(self) -> bool:
        """During ``scontrol requeue`` (and preemption with requeue) Slurm 22.05 shows the job as
        ``COMPLETING`` with no reason, exactly as during ``scancel``; what differs is ``Restarts``,
        already one more than the ``$SLURM_RESTART_COUNT`` this attempt started with."""
        fields = self.job_fields()
        if not fields:
            return False
        try:
            restarts = int(fields.get("Restarts", "0"))
            started_with = int(self.environ.get("SLURM_RESTART_COUNT") or 0)
        except ValueError:
            restarts = started_with = 0
        state = fields.get("JobState", "")
        return (
            restarts > started_with
            or state in {"REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "PENDING", "PREEMPTED"}
            or "REQUEUE" in fields.get("Reason", "").upper()
        )

    def time_limit_reached(self) -> bool:
        """True when Slurm's SIGTERM is the time limit (no USR2 came, or it came too late)."""
        fields = self.job_fields()
        return fields.get("Reason") == "TimeLimit" or fields.get("JobState") in ("TIMEOUT", "DEADLINE")

    def requeue(self) -> bool:
        ref = self.job_ref()
        if not ref:
            return False
        try:
            return subprocess.run([self.scontrol, "requeue", ref], check=False).returncode == 0
        except OSError:
            return False

    def facts(self) -> Dict[str, str]:
        ref = self.job_ref()
        return {"slurm_job": ref} if ref else {}


class CloudEnvironment(JobEnvironment):
    """A cloud instance of modes ``ec2`` / ``gcp``: the instance agent writes the file named by
    ``$EASYLAUNCH_PREEMPT_NOTICE`` when the cloud announces the instance's end, then sends SIGTERM;
    that SIGTERM is then a requeue (the function's ``checkpoint()`` runs, the launcher recovers
    the run on a new instance), not a cancel."""

    name = "cloud"
    scheduler = "the cloud"

    def __init__(self, environ: Optional[Dict[str, str]] = None) -> None:
        self.environ = os.environ if environ is None else environ

    def requeue_pending(self) -> bool:
        notice = self.environ.get("EASYLAUNCH_PREEMPT_NOTICE")
        return bool(notice) and os.path.exists(notice)

    def requeue_reason(self) -> str:
        return "stopped by a spot interruption / preemption notice; to be recovered on a new instance"


def cgroup_oom_kills(root: str = "/sys/fs/cgroup") -> Optional[int]:
    """The ``oom_kill`` counter of this process's memory cgroup (v2 ``memory.events``, v1
    ``memory.oom_control``); None when neither is readable."""
    paths = []
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _id, controllers, path = line.rstrip("\n").split(":", 2)
                if controllers == "":
                    paths.append(os.path.join(root, path.lstrip("/"), "memory.events"))
                elif "memory" in controllers.split(","):
                    paths.append(os.path.join(root, "memory", path.lstrip("/"), "memory.oom_control"))
    except OSError:
        pass
    # inside a container the cgroup is mounted at the root of the hierarchy
    paths += [os.path.join(root, "memory.events"), os.path.join(root, "memory", "memory.oom_control")]
    for path in paths:
        try:
            with open(path) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


#: set by local schedulers for their runners: a local run started from inside a Slurm job (an
#: salloc shell) must never requeue that job
ENV_OVERRIDE = "EASYLAUNCH_ENVIRONMENT"


def detect(environ: Optional[Dict[str, str]] = None) -> JobEnvironment:
    """The environment this process runs in, from its environment variables
    (``$EASYLAUNCH_ENVIRONMENT=local`` overrides what they say)."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV_OVERRIDE) == "local":
        return JobEnvironment()
    if environ.get(ENV_OVERRIDE) == "cloud":
        return CloudEnvironment(environ)
    if environ.get("SLURM_JOB_ID"):
        return SlurmEnvironment(environ)
    return JobEnvironment()
