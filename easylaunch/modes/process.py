"""Shared by the modes whose runs are processes on this machine (``local``, ``local_pool``,
``local_singularity``): liveness-based polling, signal-based cancel with escalation, cleanup.

A run's status file names the runner's pid; before the runner starts, the manifest names
who will start it (the runner itself, a packed task, or a supervisor recorded in
``supervisor.json``). A run whose process is gone without a recorded outcome is marked FAILED
(CANCELLED after a cancel), so nothing stays RUNNING forever after a crash.

Cancel: SIGTERM to the run (its process group when it leads one), then, for a run still alive
``cancel_grace`` seconds later (option, else config CANCEL_GRACE, else 10 s), SIGKILL of its
processes and a CANCELLED record (:func:`easylaunch.transitions.cancel_forced`). The wait is
kept by a small detached reaper (``python -m easylaunch.modes.reaper``), so a launch script that
exits right after ``cancel()`` still gets its runs stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from .. import records, transitions
from ..batch import cancel_grace
from ..job import Job
from ..options import Option
from ..plan import LaunchPlan
from ..procs import alive, kill_run, process_token, terminate
from ..spec import TERMINAL_STATES, State
from .base import Mode
from .reaper import reap

if TYPE_CHECKING:
    from ..batch import Batch

SUPERVISOR_FILE = "supervisor.json"
#: a cancel waits this long for the signalled runs to exit before it leaves them to the reaper
QUICK_EXIT = 0.25


def write_supervisor(sweep_dir: Path, pid: int, kind: str) -> None:
    """Record who starts the batch's queued runs (``supervisor.json``): first the launcher
    itself, then the dispatcher or pool supervisor it started (each writes it)."""
    records.atomic_write_json(
        Path(sweep_dir) / SUPERVISOR_FILE, {"pid": pid, "token": process_token(pid), "kind": kind}
    )


def runner_env() -> dict:
    """Environment for runner processes: easylaunch importable even from a source checkout,
    and the runner told it runs under no scheduler (a local run started inside an salloc
    shell must never requeue that Slurm job)."""
    env = dict(os.environ)
    pkg_parent = str(Path(__file__).resolve().parents[2])
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if pkg_parent not in parts:
        env["PYTHONPATH"] = os.pathsep.join([pkg_parent, *parts])
    env["EASYLAUNCH_ENVIRONMENT"] = "local"
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
    """Base of local process modes: poll by pid liveness, cancel by SIGTERM (then SIGKILL)."""

    waits_by_default = True
    poll_interval = 0.5
    options = (
        Option("skip_wait", (bool,), False, "return at once; runs go on after the script exits"),
        Option("max_parallel", (int,), None, "runs at once (default: MAX_PARALLEL or CPU count)", 1),
    )

    def __init__(self, settings):
        super().__init__(settings)
        #: reapers started by cancel(), waited for by cleanup()
        self._reapers: List[subprocess.Popen] = []
        #: processes this launch started itself (reaped by cleanup(): no zombies left)
        self._started: Dict[Path, subprocess.Popen] = {}
        #: runs whose runner a poll found dead once, with their starter alive to record it
        self._dead_seen: set = set()

    def check(self, batch: Batch) -> LaunchPlan:
        self.max_parallel(batch.options)  # refuse max_parallel=0 before any directory exists
        return LaunchPlan()

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
            status = job.last_status
            state = status.get("state")
            if status.get("host") not in (None, here):
                continue  # launched elsewhere: only its status file can tell
            if state == State.PENDING and (job.run_dir / records.CANCEL_MARK).exists():
                out[job.run_dir] = State.CANCELLED
                continue
            if state == State.RUNNING:
                if alive(status.get("pid"), status.get("pid_token")):
                    continue
                code = None
                proc = self._started.get(job.run_dir)
                if proc is not None:
                    # started by this launcher: its wait status is ours to read
                    code = proc.poll()
                    if code is None:
                        continue  # its packed task (or the runner's exit) is still under way
                    if "task" in (job.manifest.get("backend") or {}):
                        # the task ended with the run unsaid: the task's code is not the run's
                        code = None
                elif self._starter_will_settle(job):
                    continue  # the dispatcher or pool supervisor reaps it and records its exit code
                # read again after the liveness check: a runner that just exited has written
                out[job.run_dir] = transitions.died_without_record(
                    job.run_dir, f"runner process {status.get('pid')}", exit_code=code
                )
                continue
            if state == State.PENDING:
                backend = job.manifest.get("backend") or {}
                if "pid" in backend:
                    owner = backend
                    owner_alive = alive(owner.get("pid"), owner.get("token"))
                elif "supervisor_file" in backend:
                    path = backend["supervisor_file"]
                    if path not in supervisors:
                        # one liveness check per supervisor and poll, not one per queued run
                        supervisors[path] = _starter(path)
                    owner = supervisors[path]
                    if owner is None:
                        continue  # a launch of an older version, still starting it
                    owner_alive = owner["alive"]
                else:
                    continue
                if owner_alive:
                    continue
                if records.read_status(job.run_dir).get("state") == State.PENDING:
                    out[job.run_dir] = transitions.starter_gone(job.run_dir, f"process {owner.get('pid')}")
        return out

    def _starter_will_settle(self, job: Job) -> bool:
        """True the first time a poll finds the runner of a dispatcher's or pool supervisor's run
        dead while that starter lives: it reaps the runner and records the exit code itself, so
        the poll leaves it one poll interval to do so (then records without the code)."""
        path = (job.manifest.get("backend") or {}).get("supervisor_file")
        if not path or job.run_dir in self._dead_seen:
            return False
        owner = _starter(path)
        if owner is None or not owner["alive"]:
            return False
        self._dead_seen.add(job.run_dir)
        return True

    def cancel(self, jobs: Sequence[Job]) -> None:
        here = records.hostname()
        signalled: List[Tuple[str, int, Optional[str]]] = []
        graces = []
        for job in jobs:
            status = records.read_status(job.run_dir)
            if status.get("host") not in (None, here):
                continue
            backend = job.manifest.get("backend") or {}
            if status.get("state") == State.RUNNING:
                # a packed run's pid is its own process (it leads its group), not the task's
                if terminate(status.get("pid"), status.get("pid_token")):
                    signalled.append((str(job.run_dir), status["pid"], status.get("pid_token")))
                    graces.append(self.cancel_grace(job))
            elif status.get("state") == State.PENDING and "pid" in backend and "task" not in backend:
                # started by the launcher, not running the function yet (importing, waiting for
                # its payload, a container starting); a packed run's task just skips it
                if terminate(backend["pid"], backend.get("token")):
                    transitions.cancelled_before_start(job.run_dir)
                    signalled.append((str(job.run_dir), backend["pid"], backend.get("token")))
                    graces.append(self.cancel_grace(job))
            # otherwise the cancel mark is enough: the dispatcher, pool or task skips the run
        if signalled:
            self._escalate(signalled, max(graces))

    def cancel_grace(self, job: Job) -> float:
        """The run's ``cancel_grace`` (launch option, else config CANCEL_GRACE, else 10 s)."""
        return cancel_grace(job.manifest.get("options") or {}, self.settings)

    def _escalate(self, targets: List[Tuple[str, int, Optional[str]]], grace: float) -> None:
        """Kill what ignores the SIGTERM just sent once ``grace`` has passed."""
        sent = time.time()
        quick = time.monotonic() + min(QUICK_EXIT, grace)
        while True:
            left = [t for t in targets if alive(t[1], t[2])]
            if not left or time.monotonic() >= quick:
                break
            time.sleep(0.005)
        if not left:
            return
        if grace <= 0:
            reap(left, grace, sent)
            return
        spec = json.dumps({"grace": grace, "sent": sent, "targets": left})
        self._reapers.append(
            subprocess.Popen(
                [sys.executable, "-m", "easylaunch.modes.reaper", spec],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=runner_env(),
                start_new_session=True,
            )
        )

    def cleanup(self, jobs: Sequence[Job]) -> None:
        """Wait (bounded by the runs' cancel_grace) until nothing these runs started is left:
        reapers, runner and task processes (killed at the bound), the dispatcher or pool
        supervisor of a batch that is entirely over; reap what this launch started."""
        if not jobs:
            return
        bound = time.monotonic() + max(self.cancel_grace(j) for j in jobs) + 2.0
        for proc in self._reapers:
            _wait_popen(proc, bound)
        self._reapers = [p for p in self._reapers if p.poll() is None]
        owners: Dict[Tuple[int, Optional[str]], List[Job]] = {}
        shared: Dict[str, List[Job]] = {}
        for job in jobs:
            backend = job.manifest.get("backend") or {}
            if "pid" in backend:
                owners.setdefault((backend["pid"], backend.get("token")), []).append(job)
            elif "supervisor_file" in backend:
                shared.setdefault(backend["supervisor_file"], []).append(job)
            status = records.read_status(job.run_dir)
            if status.get("pid") and status.get("state") in TERMINAL_STATES:
                # the runner itself (a run of a dispatcher's or a pool's) after its record
                _wait_gone(status["pid"], status.get("pid_token"), bound)
        for (pid, token), members in owners.items():
            expected = int((members[0].manifest.get("backend") or {}).get("task_runs", 1))
            if len(members) >= expected and all(m.done() for m in members):
                if not _wait_gone(pid, token, bound):
                    kill_run(pid, signal.SIGKILL)
        for path, members in shared.items():
            info = records.read_json(path)
            if info and len(members) >= int(members[0].manifest.get("batch_size") or 0):
                if all(m.done() for m in members):
                    _wait_gone(info.get("pid"), info.get("token"), bound)
        for job in jobs:
            proc = self._started.pop(job.run_dir, None)
            if proc is not None:
                _wait_popen(proc, bound)


def _starter(path: str) -> Optional[dict]:
    """``supervisor.json`` with ``alive``: whether whoever it names (the launcher, then the
    dispatcher or pool supervisor that took over) still runs. Read again after a death is
    seen: the launcher may have handed over in between."""
    found = records.read_json(path)
    while found is not None:
        found = {**found, "alive": alive(found.get("pid"), found.get("token"))}
        if found["alive"]:
            return found
        again = records.read_json(path)
        if again is None or (again.get("pid"), again.get("token")) == (found.get("pid"), found.get("token")):
            return found
        found = again
    return None


def _wait_gone(pid: Optional[int], token: Optional[str], bound: float) -> bool:
    while alive(pid, token):
        if time.monotonic() >= bound:
            return False
        time.sleep(0.01)
    return True


def _wait_popen(proc: subprocess.Popen, bound: float) -> None:
    try:
        proc.wait(timeout=max(0.0, bound - time.monotonic()))
    except subprocess.TimeoutExpired:
        kill_run(proc.pid, signal.SIGKILL)
        proc.wait()
