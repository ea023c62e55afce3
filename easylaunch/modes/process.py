"""Shared by the modes whose runs are processes on this machine (``local``, ``local_pool``):
liveness-based polling and signal-based cancel.

A run's status file names the runner's pid; before the runner starts, the manifest names
who will start it (the runner itself, or a supervisor recorded in ``supervisor.json``).
A run whose process is gone without a recorded outcome is marked FAILED, so nothing
stays RUNNING forever after a crash.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Sequence

from .. import records
from ..job import Job
from ..options import Option
from ..procs import alive, terminate
from ..spec import State
from .base import Mode

if TYPE_CHECKING:
    from ..batch import Batch

SUPERVISOR_FILE = "supervisor.json"


def runner_env() -> dict:
    """Environment for runner processes: easylaunch importable even from a source checkout."""
    env = dict(os.environ)
    pkg_parent = str(Path(__file__).resolve().parents[2])
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if pkg_parent not in parts:
        env["PYTHONPATH"] = os.pathsep.join([pkg_parent, *parts])
    return env


def launcher_sys_path() -> list[str]:
    """The launcher's own import roots: every ``sys.path`` directory outside the interpreter's
    installation (the launch script's directory first), so the runner imports what it could."""
    prefixes = {
        os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)
    }
    out: list[str] = []
    for entry in sys.path:
        path = os.path.realpath(entry or os.getcwd())
        if any(path == pre or path.startswith(pre + os.sep) for pre in prefixes):
            continue
        if "site-packages" in path or "dist-packages" in path or not os.path.isdir(path):
            continue
        if path not in out:
            out.append(path)
    return out


class ProcessMode(Mode):
    """Base of local process modes: poll by pid liveness, cancel by SIGTERM to the group."""

    waits_by_default = True
    poll_interval = 0.5
    options = (
        Option("skip_wait", (bool,), False, "return at once; runs go on after the script exits"),
        Option("max_parallel", (int,), None, "runs at once (default: MAX_PARALLEL or CPU count)", 1),
    )

    def check(self, batch: Batch) -> None:
        self.max_parallel(batch.options)  # refuse max_parallel=0 before any directory exists

    def max_parallel(self, options: dict) -> int:
        value = options.get("max_parallel")
        if value is None:  # not `or`: max_parallel=0 is an error, not "use the default"
            value = self.settings.get("MAX_PARALLEL") or os.cpu_count() or 1
        if value < 1:
            raise ValueError(f"option max_parallel={value!r} must be a positive integer")
        return int(value)

    def poll(self, jobs: Sequence[Job]) -> Dict[Path, Optional[State]]:
        here = records.hostname()
        supervisors: Dict[str, Optional[dict]] = {}
        out: Dict[Path, Optional[State]] = {}
        for job in jobs:
            status = job._status
            state = status.get("state")
            if status.get("host") not in (None, here):
                continue  # launched elsewhere: only its status file can tell
            if state == State.PENDING and (job.run_dir / records.CANCEL_MARK).exists():
                out[job.run_dir] = State.CANCELLED
                continue
            if state == State.RUNNING:
                if alive(status.get("pid"), status.get("pid_token")):
                    continue
                reason = f"runner process {status.get('pid')} exited without recording an outcome"
            elif state == State.PENDING:
                backend = job.manifest.get("backend") or {}
                if "pid" in backend:
                    owner = backend
                    owner_alive = alive(owner.get("pid"), owner.get("token"))
                elif "supervisor_file" in backend:
                    path = backend["supervisor_file"]
                    if path not in supervisors:
                        found = records.read_json(path)
                        # one liveness check per supervisor and poll, not one per queued run
                        supervisors[path] = found and {
                            **found,
                            "alive": alive(found.get("pid"), found.get("token")),
                        }
                    owner = supervisors[path]
                    if owner is None:
                        continue  # the launcher is still starting it
                    owner_alive = owner["alive"]
                else:
                    continue
                if owner_alive:
                    continue
                reason = f"process {owner.get('pid')} that was to start this run is gone"
            else:
                continue
            time.sleep(0.05)  # let a runner that just exited finish its last write
            fresh = records.read_status(job.run_dir)
            if fresh.get("state") != state:
                out[job.run_dir] = State(fresh["state"])
                job._status = fresh
                continue
            job._status = records.write_status(job.run_dir, State.FAILED, ended=time.time(), message=reason)
            out[job.run_dir] = State.FAILED
        return out

    def cancel(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            status = records.read_status(job.run_dir)
            if status.get("host") not in (None, records.hostname()):
                continue
            if status.get("state") == State.RUNNING:
                terminate(status.get("pid"), status.get("pid_token"))
            elif status.get("state") == State.PENDING:
                backend = job.manifest.get("backend") or {}
                if "pid" in backend and terminate(backend["pid"], backend.get("token")):
                    records.write_status(
                        job.run_dir, State.CANCELLED, ended=time.time(), message="cancelled before it started"
                    )
