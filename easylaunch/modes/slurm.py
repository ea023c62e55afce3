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

import math
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .. import __version__, records
from ..batch import Batch
from ..job import Job
from ..options import Option
from ..slurm_config import ARRAY_OPTIONS, SLURM_OPTIONS, SlurmConfigError, config_for
from ..spec import TERMINAL_STATES, State
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
_PATH_OK = re.compile(r"^[^\s'\"\\$`]+$")
SACCT_MIN_INTERVAL = 5.0
#: the interval grows with the age of the sweep (a quarter of it), up to this: runs report
#: through their status files, sacct is only needed for tasks that died without a record
SACCT_MAX_INTERVAL = 60.0


class SubmitError(RuntimeError):
    """sbatch refused the job; the message holds its output verbatim."""


def _run(cmd: List[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


class SlurmMode(Mode):
    name = "slurm"
    poll_interval = 2.0
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

    def __init__(self, settings):
        super().__init__(settings)
        self._sacct_cache: Tuple[float, set, Dict[str, str]] = (0.0, set(), {})
        self._accounting: Optional[bool] = None

    # -- validation ------------------------------------------------------------------
    def check(self, batch: Batch) -> None:
        if shutil.which("sbatch") is None:
            raise RuntimeError(
                "sbatch is not on PATH, so this machine cannot submit to Slurm; run the launch script "
                "on the cluster's login node, or use mode='sss' (writes the scripts to copy there)"
            )
        name, cfg = config_for(self.settings, batch.options)
        batch.mode_data["slurm"] = (name, cfg)
        opts = batch.options
        if not _PATH_OK.match(str(batch.log_root)):
            raise ValueError(
                f"log dir {batch.log_root} has spaces, quotes or '$'; sbatch #SBATCH lines cannot "
                "hold it. Choose a plain path with base_log_dir=..."
            )
        image = opts.get("singularity_image")
        if image is not None and not (Path(image).exists() or "://" in image):
            raise FileNotFoundError(f"singularity_image {image!r} does not exist")
        if image is not None and shutil.which("singularity") is None and shutil.which("apptainer") is None:
            raise RuntimeError(
                "singularity_image is set but neither `singularity` nor `apptainer` is on PATH"
            )

    # -- packing -----------------------------------------------------------------------
    def variants_per_task(self, batch: Batch) -> int:
        opts = batch.options
        if opts.get("variants_per_task"):
            return int(opts["variants_per_task"])
        duration = opts.get("expected_duration")
        if not duration:
            return 1
        n = len(batch.runs)
        # aim for tasks of at least a minute, but keep every slot of the partition busy
        k = max(1, math.floor(60.0 / float(duration)))
        _name, cfg = batch.mode_data["slurm"]  # resolved by check()
        slots = max(1, (self.cluster_cpus(cfg.partition) or 1) // max(1, cfg.n_cpus_per_task))
        if opts.get("max_parallel"):
            slots = min(slots, int(opts["max_parallel"]))
        return max(1, min(k, math.ceil(n / slots)))

    def cluster_cpus(self, partition: Optional[str] = None) -> Optional[int]:
        """CPUs of the partition (of the cluster when None), from ``sinfo -o %C`` (A/I/O/T)."""
        try:
            out = _run(["sinfo", "-h", "-o", "%C"] + (["-p", partition] if partition else [])).stdout.split()
            return int(out[0].split("/")[3]) if out else None
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return None

    def max_array_size(self) -> int:
        try:
            out = _run(["scontrol", "show", "config"]).stdout
        except (OSError, subprocess.TimeoutExpired):
            return 1001
        m = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
        return int(m.group(1)) if m else 1001

    # -- launch ------------------------------------------------------------------------
    def runner_command(self, batch: Batch, store: Path) -> Tuple[List[str], Dict[str, str]]:
        opts = batch.options
        image = opts.get("singularity_image")
        if not image:
            return [sys.executable, "-m", "easylaunch.runner"], {}
        from ..selfzip import easylaunch_zip

        zip_path = easylaunch_zip(store)
        binary = "singularity" if shutil.which("singularity") else "apptainer"
        binds = [str(batch.log_root)]
        for mount in self.settings.get("NON_CODE_DIRS_TO_MOUNT") or []:
            binds.append(f"{mount['local_dir']}:{mount['mount_point']}")
        cmd = [binary, "exec"]
        if opts.get("use_gpu"):
            cmd.append("--nv")
        extra = self.settings.get("BRC_EXTRA_SINGULARITY_ARGS") or ""
        import shlex

        cmd.extend(shlex.split(extra))
        for bind in binds:
            cmd.extend(["-B", bind])
        cmd.extend([image, "python3", "-m", "easylaunch.runner"])
        env = {"APPTAINERENV_PYTHONPATH": str(zip_path), "SINGULARITYENV_PYTHONPATH": str(zip_path)}
        return cmd, env

    def prepare_code(self, batch: Batch, store: Path) -> None:
        """Snapshot the code dirs into ``store``; the payload points the runner at it."""
        code_dirs = batch.code_dirs()
        if code_dirs:
            from .. import snapshot

            batch.payload_snapshot = snapshot.create(code_dirs, store, include_easylaunch=False)
        else:
            from .process import launcher_sys_path

            batch.payload_sys_path = launcher_sys_path()

    def launch(self, batch: Batch) -> None:
        name, cfg = batch.mode_data["slurm"]  # resolved by check()
        opts = batch.options
        store = batch.log_root / ".snapshots"
        store.mkdir(parents=True, exist_ok=True)
        self.prepare_code(batch, store)
        # Submitted before the payloads are written, so that each manifest is written once,
        # with its job id (a task that starts first waits for its payload: taskrunner).
        k = self.variants_per_task(batch)
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
        command, env = self.runner_command(batch, store)
        chunk = self.max_array_size()
        submitted: List[Tuple[str, int, int]] = []  # (job id, first group, count)
        limit = opts.get("max_parallel")
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
                    output_pattern=str(sweep_dir / "slurm" / "%A_%a.out"),
                    signal_seconds=int(opts.get("signal_before_timeout") or 90),
                    requeue=bool(opts.get("max_requeue")),
                    directives=cfg.directives(),
                    pre_cmds=list(self.settings.get("SINGULARITY_PRE_CMDS") or [])
                    if opts.get("singularity_image")
                    else [],
                    env=env,
                    command=command,
                    offset=first,
                )
                script_path = sweep_dir / f"submit_{first:06d}.sbatch"
                records.atomic_write_bytes(script_path, script.encode(), 0o700)
                cmd = ["sbatch", "--parsable"] + (["--hold"] if opts.get("hold") else []) + [str(script_path)]
                proc = _run(cmd)
                if proc.returncode != 0:
                    raise SubmitError(
                        f"sbatch rejected the job (slurm config {name!r}, script {script_path}):\n"
                        + (proc.stderr or proc.stdout).strip()
                    )
                job_id = proc.stdout.strip().split(";")[0]
                submitted.append((job_id, first, count))
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
            batch.atomic_payloads = True  # tasks may already be reading them
            batch.materialize()
        except BaseException:
            if submitted:
                _run(["scancel", *[j for j, _, _ in submitted]])
            raise
        batch.started = True
        records.atomic_write_json(
            sweep_dir / "submission.json",
            {
                "jobs": [{"job_id": j, "first_group": f, "count": c} for j, f, c in submitted],
                "variants_per_task": k,
                "slurm_config": name,
                "submitted": submit_time,
            },
        )

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
            proc = _run(
                [
                    "sacct",
                    "-X",
                    "-n",
                    "-P",
                    "-o",
                    "JobID,State",
                    "-S",
                    time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since)),
                    "-j",
                    ",".join(array_ids),
                ]
            )
            if proc.returncode == 0:
                self._accounting = True
                for line in proc.stdout.splitlines():
                    parts = line.split("|")
                    if len(parts) >= 2:
                        _expand(parts[0], parts[1].split()[0] if parts[1] else "", states)
            elif "accounting" in proc.stderr.lower() or "slurmdbd" in proc.stderr.lower():
                self._accounting = False
        if self._accounting is False or not states:
            proc = _run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(array_ids)])
            for line in proc.stdout.splitlines():
                parts = line.split("|")
                if len(parts) == 2:
                    _expand(parts[0], parts[1], states)
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
            if job._status.get("state") == State.PENDING and (job.run_dir / records.CANCEL_MARK).exists():
                if states.get(job.job_id) != "RUNNING":
                    # cancelled before it started: no runner will ever record it, so say it here
                    # (a packed task that starts later finds the CANCELLED record and skips it)
                    job._status = records.write_status(
                        job.run_dir, State.CANCELLED, ended=time.time(), message="cancelled before it started"
                    )
                    out[job.run_dir] = State.CANCELLED
                continue
            slurm_state = states.get(job.job_id)
            if slurm_state is None or slurm_state in ACTIVE:
                continue
            fresh = records.read_status(job.run_dir)
            if State(fresh.get("state", "PENDING")) in TERMINAL_STATES:
                out[job.run_dir] = State(fresh["state"])
                continue
            state = SLURM_STATES.get(slurm_state, State.FAILED)
            if slurm_state == "GONE" or state is State.COMPLETED:
                state = State.FAILED
            message = f"Slurm task {job.job_id} ended as {slurm_state} without this run's record"
            job._status = records.write_status(job.run_dir, state, ended=time.time(), message=message)
            out[job.run_dir] = state
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
            _run(["scancel", *targets])
        self._sacct_cache = (0.0, set(), {})


def _expand(job_field: str, state: str, out: Dict[str, str]) -> None:
    """``123_4``, ``123_[5-7,9%2]`` or ``123`` -> per-task entries of ``out``."""
    state = state.split()[0] if state else state
    if "_" not in job_field:
        out[job_field] = state
        return
    array_id, _, tasks = job_field.partition("_")
    if not tasks.startswith("["):
        out[f"{array_id}_{tasks}"] = state
        return
    for part in tasks.strip("[]").split("%")[0].split(","):
        if "-" in part:
            lo, hi = part.split("-")
            for t in range(int(lo), int(hi) + 1):
                out[f"{array_id}_{t}"] = state
        elif part:
            out[f"{array_id}_{int(part)}"] = state


class SlurmSingularityMode(SlurmMode):
    """``slurm_singularity``: like ``slurm`` with the runner inside SINGULARITY_IMAGE."""

    name = "slurm_singularity"

    def check(self, batch: Batch) -> None:
        if not batch.options.get("singularity_image"):
            image = self.settings.get("SINGULARITY_IMAGE")
            if not image:
                raise SlurmConfigError(
                    "mode 'slurm_singularity' needs an image: pass singularity_image=... "
                    "or set SINGULARITY_IMAGE in the config file"
                )
            batch.options["singularity_image"] = image
        super().check(batch)
