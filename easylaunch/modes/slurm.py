"""``slurm`` and ``slurm_singularity``: submit from a login node with sbatch job arrays.

A sweep of N variants is ONE array job (split only where the cluster's MaxArraySize demands),
optionally with a ``%k`` concurrency limit (``max_parallel``). ``variants_per_task=k`` (or an
automatic choice from ``expected_duration``) packs k variants into one array task, run by a
warm runner that pays imports once (see :mod:`easylaunch.taskrunner`). States come from ONE
``sacct`` call per poll, bounded by the submit time (or ``squeue`` where accounting is off);
a finished run is seen through its status file as soon as the runner writes it.

Code ships as a content-addressed snapshot (``<log dir>/.snapshots/``), so a queued job runs
the code as it was at launch. With ``singularity_image=`` (or mode ``slurm_singularity``) the
runner runs inside ``singularity exec -B <mounts> IMAGE``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .. import __version__, failpoints, records, transitions
from ..batch import Batch
from ..job import Job
from ..liveness import HEARTBEAT, LAUNCHER_FILE, Heartbeat
from ..options import Option
from ..plan import LaunchPlan
from ..plan import variants_per_task as plan_variants_per_task
from ..runtimes import Mount, PlainRuntime, Runtime, Shell, apptainer_runtime
from ..shipping import ship
from ..slurm_cli import AccountingDisabled, SlurmCLI, SubmitError
from ..slurm_config import (
    ARRAY_OPTIONS,
    SLURM_OPTIONS,
    SlurmConfig,
    SlurmConfigError,
    check_output_dir,
    config_for,
    filename_pattern,
)
from ..spec import State
from ..templating import render
from .base import Mode

SLURM_STATES = {
    "COMPLETED": State.COMPLETED,
    "FAILED": State.FAILED,
    "CANCELLED": State.CANCELLED,
    "TIMEOUT": State.TIMEOUT,
    "PREEMPTED": State.PREEMPTED,
    "NODE_FAIL": State.FAILED,
    "OUT_OF_MEMORY": State.FAILED,
    "BOOT_FAIL": State.FAILED,
    "DEADLINE": State.TIMEOUT,
}
ACTIVE = {
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "CONFIGURING",
    "COMPLETING",
    "SUSPENDED",
    "RESIZING",
    "SIGNALING",
    "STAGE_OUT",
    "RESV_DEL_HOLD",
    "SPECIAL_EXIT",
    "STOPPED",
}
SACCT_MIN_INTERVAL = 5.0
#: the interval grows with the age of the sweep (a quarter of it), up to this: runs report
#: through their status files, sacct is only needed for tasks that died without a record
SACCT_MAX_INTERVAL = 60.0


@dataclass
class SlurmPlan(LaunchPlan):
    """What ``check()`` resolved: the named Slurm config and the packing."""

    config_name: str = ""
    config: Optional[SlurmConfig] = None


__all__ = ["SlurmMode", "SlurmSingularityMode", "SlurmPlan", "SubmitError"]


class SlurmMode(Mode):
    name = "slurm"
    poll_interval = 2.0
    # the array is submitted before the payloads are written (each manifest is written once,
    # with its job id): a task may start and read its payload while the launcher writes it
    starts_before_payloads = True
    options = (
        *SLURM_OPTIONS,
        *ARRAY_OPTIONS,
        Option(
            "expected_duration",
            (int, float),
            None,
            "expected seconds per variant: picks variants_per_task",
            0.001,
        ),
        Option("singularity_image", (str,), None, "run the runner inside this Singularity/Apptainer image"),
        Option("hold", (bool,), False, "submit held (release with `scontrol release`)"),
    )

    def __init__(self, settings, cli: Optional[SlurmCLI] = None):
        super().__init__(settings)
        #: every Slurm command of this mode goes through it (tests inject a replaying one)
        self.cli = cli if cli is not None else SlurmCLI()
        self._sacct_cache: Tuple[float, set, Dict[str, str]] = (0.0, set(), {})
        self._accounting: Optional[bool] = None

    # -- validation ------------------------------------------------------------------
    def check(self, batch: Batch) -> SlurmPlan:
        if not self.cli.available():
            raise RuntimeError(
                "sbatch is not on PATH, so this machine cannot submit to Slurm; run the launch script "
                "on the cluster's login node, or use mode='sss' (writes the scripts to copy there)"
            )
        name, cfg = config_for(self.settings, batch.options)
        opts = batch.options
        # the log dir is on the #SBATCH --output line (the only place sbatch cannot take it quoted)
        check_output_dir(str(batch.log_root), "log dir")
        image = opts.get("singularity_image")
        if image is not None and any(ch in str(batch.log_root) for ch in ":,"):
            raise ValueError(
                f"log dir {batch.log_root} holds ':' or ',', which singularity -B cannot bind "
                "(it splits there); choose another with base_log_dir=..."
            )
        runtime: Runtime = PlainRuntime()
        if image is not None:
            runtime = apptainer_runtime(
                self.settings,
                image,
                gpu=bool(opts.get("use_gpu")),
                binds=[Mount(str(batch.log_root), str(batch.log_root), read_only=False)],
                host_pre_cmds=self.settings.get("SINGULARITY_PRE_CMDS") or [],
            )
        plan = SlurmPlan(runtime=runtime, config_name=name, config=cfg)
        plan.variants_per_task = self.variants_per_task(opts, len(batch.variants), cfg)
        return plan

    # -- packing -----------------------------------------------------------------------
    def variants_per_task(self, opts: dict, n: int, cfg: SlurmConfig) -> int:
        """``variants_per_task``, else a k for ``expected_duration`` that fills the partition."""
        if opts.get("variants_per_task") or not opts.get("expected_duration"):
            return plan_variants_per_task(opts, n, 1)
        slots = max(1, (self.cluster_cpus(cfg.partition) or 1) // max(1, cfg.n_cpus_per_task))
        if opts.get("max_parallel"):
            slots = min(slots, int(opts["max_parallel"]))
        return plan_variants_per_task(opts, n, slots)

    def cluster_cpus(self, partition: Optional[str] = None) -> Optional[int]:
        """CPUs of the partition (of the cluster when None), from ``sinfo -o %C``."""
        return self.cli.partition_cpus(partition)

    def max_array_size(self) -> int:
        """Array tasks one sbatch may submit (the cluster's MaxArraySize)."""
        return self.cli.max_array_size()

    # -- launch ------------------------------------------------------------------------
    def launch(self, batch: Batch, plan: SlurmPlan) -> None:
        name, cfg, runtime = plan.config_name, plan.config, plan.runtime
        opts = batch.options
        shipment = ship(batch, batch.log_root / ".snapshots", zips=runtime.isolated)
        command = runtime.command([str(z) for z in shipment.zips])
        # Submitted before the payloads are written, so that each manifest is written once,
        # with its job id (a task that starts first waits for its payload: taskrunner).
        k = plan.variants_per_task
        groups = [batch.runs[i : i + k] for i in range(0, len(batch.runs), k)]
        sweep_dir = batch.sweep_dir
        (sweep_dir / "slurm").mkdir(parents=True, exist_ok=True)
        tasks_file = sweep_dir / "tasks.json"
        records.atomic_write_json(
            tasks_file,
            {
                "groups": [[str(r.payload_path) for r in g] for g in groups],
                "max_requeue": int(opts.get("max_requeue") or 0),
            },
        )
        chunk = self.max_array_size()
        submitted: List[Tuple[str, int, int]] = []  # (job id, first group, count)
        limit = opts.get("max_parallel")
        # tasks that start before their payloads wait for them only while we are alive (our
        # pid on this host, this heartbeat elsewhere); once we stop, a missing payload fails
        beat = Heartbeat(sweep_dir / LAUNCHER_FILE, every=HEARTBEAT).start()
        try:
            for first in range(0, len(groups), chunk):
                count = min(chunk, len(groups) - first)
                script = render(
                    "slurm_array.sh.j2",
                    version=__version__,
                    exp_name=batch.exp_name,
                    batch_id=batch.batch_id,
                    first_group=first,
                    last_group=first + count - 1,
                    tasks_file=str(tasks_file),
                    job_name=f"{batch.exp_name}"[:100],
                    array_spec=f"0-{count - 1}" + (f"%{limit}" if limit else ""),
                    output_pattern=filename_pattern(str(sweep_dir / "slurm"), "%A_%a.out"),
                    signal_seconds=int(opts.get("signal_before_timeout") or 90),
                    requeue=bool(opts.get("max_requeue")),
                    directives=cfg.directives(),
                    runner=command,
                    args=[
                        "--tasks",
                        str(tasks_file),
                        "--index",
                        Shell(f'"$((SLURM_ARRAY_TASK_ID + {first}))"'),
                        "--quiet",
                    ],
                )
                script_path = sweep_dir / f"submit_{first:06d}.sbatch"
                records.atomic_write_bytes(script_path, script.encode(), 0o700)
                job_id = self.cli.sbatch(
                    str(script_path),
                    hold=bool(opts.get("hold")),
                    what=f"slurm config {name!r}, script {script_path}",
                )
                submitted.append((job_id, first, count))
                failpoints.point("slurm.after_sbatch")
            submit_time = batch.created
            batch.backend_common = {"submitted": submit_time, "slurm_config": name, "variants_per_task": k}
            for job_id, first, count in submitted:
                for task in range(count):
                    for run in groups[first + task]:
                        batch.backend[run.index] = {
                            "job_id": f"{job_id}_{task}",
                            "array_job_id": job_id,
                            "array_task": task,
                            "task_runs": len(groups[first + task]),
                        }
            # from here on the runs are listed, polled and cancellable even if we die before
            # their manifests are written
            batch.record_launch()
            records.atomic_write_json(
                sweep_dir / "submission.json",
                {
                    "jobs": [{"job_id": j, "first_group": f, "count": c} for j, f, c in submitted],
                    "variants_per_task": k,
                    "slurm_config": name,
                    "submitted": submit_time,
                },
            )
            failpoints.point("slurm.before_materialize")
            batch.materialize()
        except BaseException:
            if submitted:
                self.cli.scancel([j for j, _, _ in submitted])
            raise
        finally:
            beat.stop()
        batch.started = True

    # -- state -------------------------------------------------------------------------
    def _query(self, jobs: Sequence[Job]) -> Dict[str, str]:
        """job id (``A_T``) -> Slurm state, from one sacct (or squeue) call."""
        now = time.monotonic()
        array_ids = sorted({str(j.manifest["backend"]["array_job_id"]) for j in jobs})
        cached_at, cached_ids, cached = self._sacct_cache
        submitted = min(float(j.manifest["backend"].get("submitted", time.time())) for j in jobs)
        # at most one call per interval for the same arrays, even while sacct lags behind
        # (slurmdbd may not list a task yet: asking again at once would not help)
        interval = min(SACCT_MAX_INTERVAL, max(SACCT_MIN_INTERVAL, 0.25 * (time.time() - submitted)))
        if now - cached_at < interval and set(array_ids) <= cached_ids:
            return cached
        since = submitted - 120
        states: Dict[str, str] = {}
        if self._accounting is not False:
            try:
                found = self.cli.sacct_states(array_ids, since)
            except AccountingDisabled:
                self._accounting = False
            else:
                if found is not None:
                    self._accounting = True
                    states = found
        if self._accounting is False or not states:
            states.update(self.cli.squeue_states(array_ids))
            if self._accounting is False:
                for job in jobs:  # gone from squeue: finished; only the status file can say how
                    states.setdefault(job.job_id, "GONE")
        self._sacct_cache = (now, set(array_ids), states)
        return states

    def poll(self, jobs: Sequence[Job]) -> Dict[Path, Optional[State]]:
        jobs = [j for j in jobs if (j.manifest.get("backend") or {}).get("array_job_id")]
        if not jobs:
            return {}
        states = self._query(jobs)
        out: Dict[Path, Optional[State]] = {}
        for job in jobs:
            if job.last_status.get("state") == State.PENDING and (job.run_dir / records.CANCEL_MARK).exists():
                if states.get(job.job_id) != "RUNNING":
                    # cancelled before it started: no runner will ever record it, so say it here
                    # (a packed task that starts later finds the CANCELLED record and skips it)
                    out[job.run_dir] = transitions.cancelled_before_start(job.run_dir)
                continue
            slurm_state = states.get(job.job_id)
            if slurm_state is None or slurm_state in ACTIVE:
                continue
            state = SLURM_STATES.get(slurm_state, State.FAILED)
            if slurm_state == "GONE" or state is State.COMPLETED:
                state = State.FAILED
            out[job.run_dir] = transitions.backend_ended(
                job.run_dir, f"Slurm task {job.job_id}", slurm_state, state
            )
        return out

    def cancel(self, jobs: Sequence[Job]) -> None:
        wanted = {j.run_dir for j in jobs}
        by_task: Dict[str, List[Job]] = {}
        for job in jobs:
            backend = job.manifest.get("backend") or {}
            if backend.get("array_job_id"):
                by_task.setdefault(job.job_id, []).append(job)
        targets = []
        for task_id, members in by_task.items():
            total = int(members[0].manifest["backend"].get("task_runs", 1))
            if len(members) >= total or all(m.run_dir in wanted for m in members) and total == len(members):
                targets.append(task_id)
            # otherwise the cancel marks stop just those runs inside the packed task
        if targets:
            self.cli.scancel(targets)
        self._sacct_cache = (0.0, set(), {})


class SlurmSingularityMode(SlurmMode):
    """``slurm_singularity``: like ``slurm`` with the runner inside SINGULARITY_IMAGE."""

    name = "slurm_singularity"

    def check(self, batch: Batch) -> SlurmPlan:
        if not batch.options.get("singularity_image"):
            image = self.settings.get("SINGULARITY_IMAGE")
            if not image:
                raise SlurmConfigError(
                    "mode 'slurm_singularity' needs an image: pass singularity_image=... "
                    "or set SINGULARITY_IMAGE in the config file"
                )
            batch.options["singularity_image"] = image
        return super().check(batch)
