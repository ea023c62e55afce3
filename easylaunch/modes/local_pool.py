"""``local_pool``: large local sweeps through a warm, forking supervisor.

The launch script's process forks once into a detached supervisor that already holds the
function and every import; the supervisor forks one child per run (``max_parallel`` at a
time), so each run is isolated in its own process yet starts in about a millisecond. Every
run still gets its full run directory (payload included, for relaunching elsewhere).

POSIX only (needs ``os.fork``). Like any fork, it copies the launch script's state: threads
other than the caller's are not carried over.
"""

from __future__ import annotations

import os
import signal
import sys

from .. import failpoints, records, runner, transitions, txlog
from ..batch import Batch
from ..gpu_options import GPU_OPTIONS, gpu_request
from ..plan import LaunchPlan
from ..procs import waitstatus_to_exitcode
from ..shipping import keep_local
from ..spec import State
from .process import SUPERVISOR_FILE, ProcessMode, write_supervisor


class LocalPoolMode(ProcessMode):
    name = "local_pool"
    options = (*ProcessMode.options, *GPU_OPTIONS)

    def check(self, batch: Batch) -> LaunchPlan:
        if not hasattr(os, "fork"):
            raise RuntimeError("mode 'local_pool' needs os.fork (POSIX); use mode='local' here")
        plan = super().check(batch)
        batch.gpu_request = gpu_request(batch.fn, batch.options, batch.log_root)
        return plan

    def launch(self, batch: Batch, plan: LaunchPlan) -> None:
        limit = self.max_parallel(batch.options)
        echo = not batch.options.get("skip_wait") and len(batch.runs) == 1
        sweep_dir = batch.sweep_dir
        sweep_dir.mkdir(parents=True, exist_ok=True)
        keep_local(batch, batch.log_root / ".snapshots")  # the forked runs use the live code
        batch.backend_common = {"supervisor_file": str(sweep_dir / SUPERVISOR_FILE)}
        # until the supervisor runs, this process is who starts the runs: a poll that finds
        # it dead records them FAILED (never PENDING forever)
        write_supervisor(sweep_dir, os.getpid(), "launcher")
        batch.record_launch(per_run=False)  # seen (and FAILED once we are gone) before the manifests
        failpoints.point("local_pool.before_materialize")
        batch.materialize()
        failpoints.point("local_pool.after_materialize")
        config = batch.doodad_config()
        sys.stdout.flush()
        sys.stderr.flush()
        read_fd, write_fd = os.pipe()
        batch.started = True
        first = os.fork()
        if first == 0:  # pragma: no cover - runs in the forked child
            code = 0
            try:
                os.close(read_fd)
                os.setsid()
                second = os.fork()
                if second:
                    os._exit(0)
                # the supervisor names itself before the launcher learns its pid: a launcher
                # that dies now leaves a living starter on record, not a dead one
                write_supervisor(sweep_dir, os.getpid(), "pool supervisor")
                os.write(write_fd, str(os.getpid()).encode())
                os.close(write_fd)
                code = _supervise(batch, config, limit, echo)
            finally:
                os._exit(code)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as f:
            supervisor = int(f.read() or 0)
        os.waitpid(first, 0)
        if not supervisor:  # it never started: its runs are recorded FAILED by the next poll
            records.atomic_write_json(sweep_dir / SUPERVISOR_FILE, {"pid": 0, "kind": "pool supervisor"})
        failpoints.point("local_pool.after_fork")


def _supervise(batch: Batch, config, limit: int, echo: bool) -> int:  # pragma: no cover - forked
    """Fork one child per run, ``limit`` at a time; reap them all."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    if not echo:
        # a detached supervisor must not hold the launch script's stdout/stderr open: whoever
        # reads them (a pipe, `| tee`, CI, ssh) would wait for the whole sweep
        devnull_w = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull_w, 1)
        os.dup2(devnull_w, 2)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    running: dict = {}  # pid -> (run dir, slot)
    extra = batch.payload_extra()  # timeout, cancel_grace
    hub = None
    if extra.get("monitor", runner.DEFAULT_MONITOR_PERIOD):
        from ..monitor import Hub  # imported once here, not by every forked run

        hub = Hub()  # samples every run here: a run starts no thread of its own

    def reap_one() -> None:
        pid, status = os.wait()
        run_dir, _slot = running.pop(pid, (None, None))
        if hub is not None:
            hub.forget(pid)
        if run_dir is not None:
            # a run that died without its record (os._exit, a signal): its exit code or signal
            transitions.died_without_record(
                run_dir, f"runner process {pid}", exit_code=waitstatus_to_exitcode(status)
            )

    for run in batch.runs:
        while len(running) >= limit:
            reap_one()
        if (run.run_dir / records.CANCEL_MARK).exists():
            transitions.cancelled_before_start(run.run_dir)
            continue
        if transitions.current(run.run_dir) is not State.PENDING:
            continue  # settled meanwhile (e.g. FAILED by a poll that saw the launcher die)
        # the lowest slot no running child holds: the timeline shows the pool's real lanes
        slot = min(set(range(limit)) - {held for _, held in running.values()})
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setpgid(0, 0)
                os.environ[txlog.ENV_SLOT] = str(slot)
                if hub is not None:
                    hub.adopt()
                code = runner.execute(
                    run.run_dir, lambda run=run: (batch.fn, config._replace(), run.variant, extra), echo=echo
                )
            finally:
                os._exit(code)
        running[pid] = (run.run_dir, slot)
    while running:
        reap_one()
    return 0
