"""``local``: runner processes on this machine; the scheduler ``local_singularity`` reuses.

As in doodad, run_experiment waits for the run unless ``skip_wait=True``; runs are started in
their own session, so they survive the launch script. Up to ``max_parallel`` processes start
directly; larger sweeps hand their queue to a detached dispatcher process
(``python -m easylaunch.modes.local_dispatch``) so queued runs are not lost when the launch
script exits.

What a process runs comes from the plan's runtime (:mod:`easylaunch.runtimes`): the plain
interpreter here, Apptainer for ``local_singularity``. With ``variants_per_task=k`` (or
``expected_duration``, as on Slurm) one process runs k variants by the warm task runner
(``python -m easylaunch.runner --tasks TASKS.json --index N``), each forked with its own run
directory, state, result and cancel; the container start and the imports are paid once per k.

To reach the function fast, a lone run's interpreter is started *before* the payload is
written; it imports while the launcher captures git state, then waits for one byte on stdin.
Packed tasks start early too, and wait for their payloads (written atomically).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .. import failpoints, records
from ..batch import Batch, RunSpec
from ..gpu_options import GPU_OPTIONS, gpu_request
from ..liveness import LAUNCHER_FILE, Heartbeat
from ..options import Option
from ..plan import LaunchPlan, variants_per_task
from ..plan import groups as plan_groups
from ..procs import process_token, terminate
from ..runtimes import PlainRuntime, Runtime, literal
from ..shipping import keep_local
from .process import SUPERVISOR_FILE, ProcessMode, runner_env, write_supervisor

PACKING_OPTIONS = (
    Option("variants_per_task", (int,), None, "variants run one after another by one warm process", 1),
    Option(
        "expected_duration",
        (int, float),
        None,
        "expected seconds per variant: picks variants_per_task (tasks of about a minute)",
        0.001,
    ),
)


class LocalMode(ProcessMode):
    name = "local"
    options = (*ProcessMode.options, *PACKING_OPTIONS, *GPU_OPTIONS)

    def check(self, batch: Batch) -> LaunchPlan:
        limit = self.max_parallel(batch.options)  # refuse max_parallel=0 before any directory exists
        batch.gpu_request = gpu_request(batch.fn, batch.options, batch.log_root)
        return LaunchPlan(
            runtime=self.runtime(batch),
            variants_per_task=variants_per_task(batch.options, len(batch.variants), limit),
        )

    # -- what runs: overridden by container modes ---------------------------------------------
    def runtime(self, batch: Batch) -> Runtime:
        """The environment the runners start in (checked here, before anything is written)."""
        return PlainRuntime()

    def group_runtime(
        self, runtime: Runtime, batch: Batch, group: Sequence[RunSpec], tasks_file: Optional[Path]
    ) -> Runtime:
        """The runtime for one process running ``group`` (containers bind its run dirs)."""
        return runtime

    def code_paths(self, batch: Batch, runtime: Runtime) -> List[str]:
        """What goes on the runner's PYTHONPATH (containers: the easylaunch and cloudpickle
        zips of the log dir's store, written once per content); known before :meth:`ship`, so
        that the processes start while the code is snapshotted."""
        if not runtime.isolated:
            return []
        from ..selfzip import cloudpickle_zip, easylaunch_zip

        store = batch.log_root / ".snapshots"
        store.mkdir(parents=True, exist_ok=True)
        return [str(easylaunch_zip(store)), str(cloudpickle_zip(store))]

    def ship(self, batch: Batch, runtime: Runtime) -> None:
        """Make the code reachable from the runtime (before the payloads are written): the
        live code, its snapshot kept for the record (:func:`easylaunch.shipping.keep_local`)."""
        keep_local(batch, batch.log_root / ".snapshots")

    # -- launch ----------------------------------------------------------------------------
    def launch(self, batch: Batch, plan: LaunchPlan) -> None:
        runtime = plan.runtime or PlainRuntime()
        limit = self.max_parallel(batch.options)
        k = max(1, plan.variants_per_task)
        echo = not batch.options.get("skip_wait") and len(batch.runs) == 1
        code = self.code_paths(batch, runtime)
        groups = plan_groups(batch.runs, k)
        tasks_file: Optional[Path] = None
        if k > 1 or len(groups) > limit:
            batch.sweep_dir.mkdir(parents=True, exist_ok=True)
        if k > 1:
            tasks_file = batch.sweep_dir / "tasks.json"
            records.atomic_write_json(
                tasks_file, {"groups": [[str(r.payload_path) for r in g] for g in groups], "max_requeue": 0}
            )
        starter = _Starter(self, batch, runtime, code, tasks_file)
        failpoints.point("local.before_start")
        if len(groups) <= limit:
            self._start_now(batch, groups, starter, echo)
        else:
            self._dispatch(batch, groups, starter, limit)

    def _start_now(self, batch: Batch, groups: List[List[RunSpec]], starter: _Starter, echo: bool) -> None:
        packed = starter.tasks_file is not None
        if packed:
            batch.early_start = True  # the tasks may read a payload while it is being written
        out = None if echo else subprocess.DEVNULL
        procs = []
        beat = None
        if packed:
            # the tasks wait for payloads written below: they give up at once if we die
            beat = Heartbeat(batch.sweep_dir / LAUNCHER_FILE).start()
        batch.started = True
        try:
            for i, group in enumerate(groups):
                argv, env, shown = starter.command(i, group, wait_go=not packed, quiet=not echo)
                streams = starter.log_files(i, group) if not echo else (None, None)
                try:
                    proc = subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL if packed else subprocess.PIPE,
                        stdout=streams[0] if streams[0] is not None else out,
                        stderr=streams[1] if streams[1] is not None else out,
                        env=env,
                        start_new_session=True,
                    )
                finally:
                    for f in streams:
                        if f is not None:
                            f.close()
                procs.append(proc)
                facts = {"pid": proc.pid, "token": process_token(proc.pid), "command": shown}
                if packed:
                    facts.update(task=i, task_runs=len(group))
                for run in group:
                    batch.backend[run.index] = facts
                    self._started[run.run_dir] = proc
            batch.record_launch()  # seen and polled by pid even if we die before the manifests
            self.ship(batch, starter.runtime)  # while the runners (and containers) start
            failpoints.point("local.before_materialize")
            batch.materialize()
            failpoints.point("local.after_materialize")
        finally:
            if beat is not None:
                beat.stop()  # every payload is written, or none more will be
            for proc in procs:
                if proc.stdin is not None:
                    # after a failed materialize the runner reads EOF and records FAILED
                    try:
                        proc.stdin.write(b"g") if batch.materialized else None
                        proc.stdin.close()
                    except OSError:
                        pass
                elif not batch.materialized:
                    # a packed task waiting for payloads that will not come: its runs end CANCELLED
                    terminate(proc.pid, process_token(proc.pid))

    def _dispatch(self, batch: Batch, groups: List[List[RunSpec]], starter: _Starter, limit: int) -> None:
        sweep_dir = batch.sweep_dir
        batch.backend_common = {"supervisor_file": str(sweep_dir / SUPERVISOR_FILE)}
        # until the dispatcher runs, this process is who starts the runs: a poll that finds
        # it dead records them FAILED (never PENDING forever)
        write_supervisor(sweep_dir, os.getpid(), "launcher")
        entries = []
        for i, group in enumerate(groups):
            argv, env, shown = starter.command(i, group, wait_go=False, quiet=True, overlay=True)
            stdout, stderr = starter.log_paths(i, group)
            entries.append(
                {
                    "argv": argv,
                    "env": env,
                    "runs": [str(r.run_dir) for r in group],
                    "stdout": stdout,
                    "stderr": stderr,
                }
            )
            for run in group:
                facts = {"command": shown}
                if starter.tasks_file is not None:
                    facts.update(task=i, task_runs=len(group))
                batch.backend[run.index] = facts
        batch.record_launch(per_run=False)  # seen (and FAILED once we are gone) before the manifests
        self.ship(batch, starter.runtime)
        failpoints.point("local.before_materialize")
        batch.materialize()
        failpoints.point("local.after_materialize")
        queue = sweep_dir / "queue.json"
        # private: it holds the pre-commands and the runner's environment
        records.atomic_write_json(queue, {"entries": entries, "max_parallel": limit}, records.PRIVATE_MODE)
        batch.started = True
        with open(sweep_dir / "dispatcher.log", "ab") as log:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "easylaunch.modes.local_dispatch", str(queue)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    env=runner_env(),
                    start_new_session=True,
                )
            except BaseException:
                write_supervisor(sweep_dir, 0, "dispatcher (did not start)")  # its runs end FAILED
                raise
        failpoints.point("local.after_dispatcher_start")
        write_supervisor(sweep_dir, proc.pid, "dispatcher")  # the dispatcher also writes it


class _Starter:
    """The command line, environment and log files of each process of one launch."""

    def __init__(
        self, mode: LocalMode, batch: Batch, runtime: Runtime, code: List[str], tasks_file: Optional[Path]
    ):
        self.mode, self.batch, self.runtime, self.code, self.tasks_file = (
            mode,
            batch,
            runtime,
            code,
            tasks_file,
        )
        self.base_env = runner_env()
        self.wrapper: Optional[str] = None
        pre_cmds = runtime.command(code).host_pre_cmds
        if pre_cmds:
            from ..templating import render

            self.wrapper = render("local_pre_cmds.sh.j2", pre_cmds=pre_cmds)

    def command(
        self, i: int, group: Sequence[RunSpec], wait_go: bool, quiet: bool, overlay: bool = False
    ) -> Tuple[List[str], Dict[str, str], List[str]]:
        """``(argv, env, shown)``: what to execute, its environment (only what differs from the
        launcher's with ``overlay``), and the runner's command as manifests record it."""
        runtime = self.mode.group_runtime(self.runtime, self.batch, group, self.tasks_file)
        cmd = runtime.command(self.code)
        if self.tasks_file is not None:
            args = ["--tasks", str(self.tasks_file), "--index", str(i)]
        else:
            args = [str(group[0].payload_path)] + (["--wait-go"] if wait_go else [])
        if quiet:
            args.append("--quiet")
        shown = literal(cmd.argv(args), "the local runner command")
        env = cmd.exec_env(self.base_env)
        if overlay:
            env = {k: v for k, v in env.items() if self.base_env.get(k) != v}
        argv = shown if self.wrapper is None else ["bash", "-c", self.wrapper, "easylaunch-pre-cmds", *shown]
        return argv, env, shown

    def log_paths(self, i: int, group: Sequence[RunSpec]) -> Tuple[str, str]:
        """Where the process's own output goes (what the runner prints before its logs are
        set up, a container engine's messages): the run's logs, or the task's log."""
        if self.tasks_file is not None:
            path = str(self.batch.sweep_dir / f"task-{i}.log")
            return path, path
        return str(group[0].run_dir / records.STDOUT), str(group[0].run_dir / records.STDERR)

    def log_files(self, i: int, group: Sequence[RunSpec]) -> tuple:
        stdout, stderr = self.log_paths(i, group)
        out = open(stdout, "ab")
        return out, (out if stderr == stdout else open(stderr, "ab"))
