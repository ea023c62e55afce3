"""Packed array tasks: several runs, one after another, in one warm process.

    python -m easylaunch.runner --tasks TASKS.json --index N [--quiet]

``TASKS.json`` holds ``{"groups": [[payload, ...], ...], "max_requeue": k}``; payload paths may
be relative to the file (bundles copied to a cluster keep working). The task imports
cloudpickle, activates the code snapshot and unpickles the function once, then forks one
child per run, so a crash in one run never takes its task-mates down and every run keeps its
own directory, state, result and cancel (a ``cancel.requested`` file stops just that run).

Stop signals: SIGUSR2 (sent by Slurm before the time limit, ``--signal=B:USR2@N``) reaches
the current run; if its function offers ``checkpoint(doodad_config, variant) -> callable``, the
callable is pickled as the new payload and the task is requeued (``scontrol requeue``) up to
``max_requeue`` times; the resumed run appends to the same run directory with attempt+1.
Otherwise the run ends as TIMEOUT. SIGTERM is a cancel, unless Slurm is requeueing the job
(preemption, ``scontrol requeue``): then unfinished runs go back to PENDING and run again when
the job restarts. Finished runs are never run twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, List, Optional

from . import records
from .runner import SIGNAL_STATES, RunInterrupted, execute, load_payload_file
from .spec import DoodadConfig, State

REQUEUE_EXIT = 75  # the run checkpointed and asks for the task to be requeued
REQUEUED_BY_SLURM = 76  # Slurm itself requeues the job (preemption, scontrol requeue)


def slurm_job_ref() -> Optional[str]:
    """This task's id for scontrol (``ARRAYJOB_TASK`` or ``JOBID``), None outside Slurm."""
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        return f"{array_job}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def slurm_job_fields() -> dict:
    """This task's ``scontrol -o show job`` record (empty outside Slurm or on error).

    Asks for ``ARRAYJOB_TASK``: ``show job $SLURM_JOB_ID`` of the array's own id lists every
    task of the array, one record per line.
    """
    ref = slurm_job_ref()
    if not ref:
        return {}
    try:
        out = subprocess.run(
            ["scontrol", "-o", "show", "job", ref], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    line = out.splitlines()[0] if out.strip() else ""
    return dict(tok.split("=", 1) for tok in line.split() if "=" in tok)


def slurm_requeue_pending() -> bool:
    """True when Slurm is requeueing this job (so a SIGTERM is not a cancel).

    During ``scontrol requeue`` (and preemption with requeue) Slurm 22.05 shows the job as
    ``COMPLETING`` with no reason, exactly as during ``scancel``; what differs is ``Restarts``,
    already one more than the ``$SLURM_RESTART_COUNT`` this attempt started with.
    """
    fields = slurm_job_fields()
    if not fields:
        return False
    try:
        restarts = int(fields.get("Restarts", "0"))
        started_with = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        restarts = started_with = 0
    state = fields.get("JobState", "")
    return (
        restarts > started_with
        or state in {"REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "PENDING", "PREEMPTED"}
        or "REQUEUE" in fields.get("Reason", "").upper()
    )


def slurm_time_limit_reached() -> bool:
    """True when Slurm's SIGTERM is the time limit (no USR2 came, or it came too late)."""
    fields = slurm_job_fields()
    return fields.get("Reason") == "TimeLimit" or fields.get("JobState") in ("TIMEOUT", "DEADLINE")


def _save_checkpoint(run_dir: Path, new_fn: Callable) -> None:
    """Replace the payload's function, keeping the previous payload for provenance."""
    import pickle

    import cloudpickle

    from .payload import read_header

    payload = run_dir / records.PAYLOAD
    header = read_header(payload)
    attempt = records.read_status(run_dir).get("attempt", 1)
    os.replace(payload, run_dir / f"payload.attempt{attempt}.pkl")
    header["fn"] = cloudpickle.dumps(new_fn)
    records.atomic_write_bytes(
        payload, pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL), records.PRIVATE_MODE
    )


def make_checkpoint_hook(max_requeue: int) -> Callable[..., Optional[int]]:
    """The ``on_interrupt`` hook of :func:`easylaunch.runner.execute` for Slurm tasks."""

    def hook(
        run_dir: Path, fn: Callable, config: DoodadConfig, variant: Any, exc: RunInterrupted
    ) -> Optional[int]:
        checkpoint = getattr(fn, "checkpoint", None)
        status = records.read_status(run_dir)
        requeues = int(status.get("requeues", 0))
        if exc.signum == signal.SIGUSR2:
            if not callable(checkpoint) or requeues >= max_requeue:
                return None  # recorded as TIMEOUT
            why = "checkpointed at the time limit; requeued"
            code = REQUEUE_EXIT
        elif exc.signum == signal.SIGTERM and slurm_requeue_pending():
            why = "requeued by Slurm (preemption or scontrol requeue)"
            code = REQUEUED_BY_SLURM
        elif exc.signum == signal.SIGTERM and slurm_time_limit_reached():
            from .runner import record_failure

            record_failure(run_dir, exc, State.TIMEOUT, 128 + exc.signum)
            records.write_status(run_dir, State.TIMEOUT, message="Slurm's time limit was reached (SIGTERM)")
            return 128 + exc.signum
        else:
            return None
        if callable(checkpoint):
            try:
                _save_checkpoint(run_dir, checkpoint(config, variant))
                why += ", resumes from its checkpoint"
            except Exception as err:  # a broken checkpoint must not lose the run's record
                print(f"easylaunch: checkpoint() failed: {err!r}", file=sys.stderr)
                if code == REQUEUE_EXIT:
                    return None
        records.write_status(
            run_dir, State.PENDING, requeues=requeues + 1, message=why, ended=time.time(), exit_code=None
        )
        return code

    return hook


class _Master:
    """Signal bookkeeping of the task process."""

    def __init__(self) -> None:
        self.child: Optional[int] = None
        self.stop: Optional[int] = None
        for sig in SIGNAL_STATES:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop is None:
            self.stop = signum
        if self.child:
            try:
                os.kill(self.child, signum)
            except ProcessLookupError:
                pass


def run_group(paths: List[Path], quiet: bool = False, max_requeue: int = 0) -> int:
    """Run each payload of one task in a forked child; returns 0 when every run completed."""
    master = _Master()
    hook = make_checkpoint_hook(max_requeue)
    _warm_up(paths, master)
    loaded: dict = {}
    requeue = False
    all_ok = True
    for path in paths:
        run_dir = path.parent
        if master.stop is not None:
            break
        state = records.read_status(run_dir).get("state", State.PENDING)
        if state not in (State.PENDING, State.RUNNING):
            all_ok &= state == State.COMPLETED
            continue  # finished in an earlier attempt, or cancelled
        if (run_dir / records.CANCEL_MARK).exists():
            records.write_status(
                run_dir, State.CANCELLED, ended=time.time(), message="cancelled before it started"
            )
            all_ok = False
            continue
        if not _await_payload(path, master):
            if master.stop is not None:
                break
            records.write_status(
                run_dir,
                State.FAILED,
                ended=time.time(),
                message=f"{path} was never written (the launch stopped before it finished)",
            )
            all_ok = False
            continue

        def load(path: Path = path) -> tuple:
            fn, config, variant = load_payload_file(path)
            return fn, config, variant

        sys.stdout.flush()
        sys.stderr.flush()
        # stop signals stay blocked in the child until execute() has its handlers in place
        # (a SIGTERM or USR2 in between would otherwise kill it unrecorded); in the parent
        # they are delivered once the child's pid is known, and forwarded to it
        signal.pthread_sigmask(signal.SIG_BLOCK, list(SIGNAL_STATES))
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                for sig in SIGNAL_STATES:
                    signal.signal(sig, signal.SIG_DFL)
                code = execute(run_dir, load, echo=not quiet, on_interrupt=hook)
            finally:
                os._exit(code)
        master.child = pid
        signal.pthread_sigmask(signal.SIG_UNBLOCK, list(SIGNAL_STATES))
        if master.stop is not None:  # a signal arrived between the check and the fork
            os.kill(pid, master.stop)
        code = _wait_child(pid, run_dir, master)
        master.child = None
        loaded[path] = code
        if code in (REQUEUE_EXIT, REQUEUED_BY_SLURM):
            requeue = code == REQUEUE_EXIT or requeue
            master.stop = master.stop or signal.SIGTERM
            break
        all_ok &= code == 0
        # the run process left without its final record: killed by a signal it could not
        # catch, or os._exit() from inside the function (any exit code, 0 included)
        status = records.read_status(run_dir)
        if status.get("state") in (State.RUNNING, State.PENDING):
            all_ok = False
            how = (
                f"killed by {signal.Signals(-code).name}"
                if code < 0 and -code in signal.valid_signals()
                else f"exit status {code}"
            )
            records.write_status(
                run_dir,
                State.FAILED,
                ended=time.time(),
                exit_code=code,
                message=f"run process died without recording an outcome ({how})",
            )
    if master.stop is not None:
        _settle_unstarted(paths, loaded, master.stop, requeue)
        if requeue:
            ref = slurm_job_ref()
            if ref:
                subprocess.run(["scontrol", "requeue", ref], check=False)
        return 128 + master.stop if not requeue else 0
    return 0 if all_ok else 1


#: seconds a task waits for a payload the launcher has not written yet (it submits first)
PAYLOAD_WAIT = float(os.environ.get("EASYLAUNCH_PAYLOAD_WAIT", "300"))


def _await_payload(path: Path, master: Optional["_Master"] = None) -> bool:
    """True once ``path`` exists; False after PAYLOAD_WAIT seconds or on a stop signal.

    The Slurm mode submits the array before it writes the payloads (so that every manifest
    is written once, with its job id): a task that starts at once may be early.
    """
    deadline = time.monotonic() + PAYLOAD_WAIT
    delay = 0.01
    while not path.exists():
        if time.monotonic() > deadline or (master is not None and master.stop is not None):
            return False
        time.sleep(delay)
        delay = min(0.2, delay * 1.5)
    return True


def _warm_up(paths: List[Path], master: Optional["_Master"] = None) -> None:
    """Pay imports once: unpickle the first unfinished payload here, before forking runs."""
    for path in paths:
        if records.read_status(path.parent).get("state", State.PENDING) in (State.PENDING, State.RUNNING):
            if not _await_payload(path, master):
                return
            try:
                load_payload_file(path)
            except BaseException:
                pass  # the run's own child records the error properly
            return


def _wait_child(pid: int, run_dir: Path, master: _Master) -> int:
    """Reap the run's process as soon as it exits; meanwhile check its cancel mark (every 0.2 s).

    Waits on a pidfd where there is one (Linux >= 5.3): a short run is reaped at once, not at
    the next tick (a fixed 0.2 s sleep cost 0.2 s per packed run). Elsewhere the sleep grows
    from 1 ms to 0.2 s.
    """
    import select

    mark = run_dir / records.CANCEL_MARK
    cancelled = False
    pidfd: Optional[int] = None
    try:
        pidfd = os.pidfd_open(pid)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        pidfd = None
    delay = 0.001
    try:
        while True:
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return 1
            if done:
                return os.waitstatus_to_exitcode(status)
            if not cancelled and mark.exists():
                cancelled = True
                os.kill(pid, signal.SIGTERM)
            if pidfd is not None:
                select.select([pidfd], [], [], 0.2)
            else:
                time.sleep(delay)
                delay = min(0.2, delay * 2)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _settle_unstarted(paths: List[Path], started: dict, signum: int, requeue: bool) -> None:
    """Runs the task never reached: back to the queue on requeue, else TIMEOUT/CANCELLED."""
    if requeue or (signum == signal.SIGTERM and slurm_requeue_pending()):
        return  # they stay PENDING and run when the job restarts
    state = SIGNAL_STATES[signum]
    if signum == signal.SIGTERM and slurm_time_limit_reached():
        state = State.TIMEOUT
    for path in paths:
        if path in started:
            continue
        run_dir = path.parent
        if records.read_status(run_dir).get("state") == State.PENDING:
            records.write_status(
                run_dir,
                state,
                ended=time.time(),
                message=f"the task was stopped ({signal.Signals(signum).name}) before this run started",
            )


def main(args: List[str]) -> int:
    """``--tasks FILE --index N [--quiet]`` (N may also come from $SLURM_ARRAY_TASK_ID)."""
    try:
        tasks_file = Path(args[args.index("--tasks") + 1]).resolve()
        index = (
            int(args[args.index("--index") + 1])
            if "--index" in args
            else int(os.environ["SLURM_ARRAY_TASK_ID"])
        )
    except (ValueError, IndexError, KeyError):
        print("usage: python -m easylaunch.runner --tasks TASKS.json --index N [--quiet]", file=sys.stderr)
        return 2
    tasks = records.read_json(tasks_file)
    if tasks is None:
        print(f"easylaunch runner: no task file {tasks_file}", file=sys.stderr)
        return 2
    groups = tasks["groups"]
    if not 0 <= index < len(groups):
        print(f"easylaunch runner: task index {index} out of range (0..{len(groups) - 1})", file=sys.stderr)
        return 2
    paths = [(tasks_file.parent / p).resolve() for p in groups[index]]
    return run_group(paths, quiet="--quiet" in args, max_requeue=int(tasks.get("max_requeue", 0)))
