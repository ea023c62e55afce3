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

from .. import records, runner
from ..batch import Batch
from ..procs import process_token
from .process import SUPERVISOR_FILE, ProcessMode, launcher_sys_path


class LocalPoolMode(ProcessMode):
    name = "local_pool"

    def check(self, batch: Batch) -> None:
        super().check(batch)
        if not hasattr(os, "fork"):
            raise RuntimeError("mode 'local_pool' needs os.fork (POSIX); use mode='local' here")

    def launch(self, batch: Batch) -> None:
        limit = self.max_parallel(batch.options)
        echo = not batch.options.get("skip_wait") and len(batch.runs) == 1
        sweep_dir = batch.sweep_dir
        sweep_dir.mkdir(parents=True, exist_ok=True)
        batch.payload_sys_path = launcher_sys_path()
        batch.backend_common = {"supervisor_file": str(sweep_dir / SUPERVISOR_FILE)}
        batch.materialize()
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
                    os.write(write_fd, str(second).encode())
                    os._exit(0)
                os.close(write_fd)
                code = _supervise(batch, config, limit, echo)
            finally:
                os._exit(code)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as f:
            supervisor = int(f.read() or 0)
        os.waitpid(first, 0)
        records.atomic_write_json(
            sweep_dir / SUPERVISOR_FILE,
            {"pid": supervisor, "token": process_token(supervisor), "kind": "pool supervisor"},
        )


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
    running = 0
    for run in batch.runs:
        while running >= limit:
            os.wait()
            running -= 1
        if (run.run_dir / records.CANCEL_MARK).exists():
            records.write_status(run.run_dir, "CANCELLED", message="cancelled before it started")
            continue
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setpgid(0, 0)
                code = runner.execute(
                    run.run_dir, lambda run=run: (batch.fn, config._replace(), run.variant), echo=echo
                )
            finally:
                os._exit(code)
        running += 1
    while running:
        os.wait()
        running -= 1
    return 0
