"""Packed array tasks: several runs, one after another, in one warm process.

    python -m easylaunch.runner --tasks TASKS.json --index N [--quiet]

``TASKS.json`` holds ``{"groups": [[payload, ...], ...], "max_requeue": k}``; payload paths may
be relative to the file (bundles copied to a cluster keep working). A bundle's also names each
group's pack (``"packs"``, see :mod:`easylaunch.packs`): the task makes its runs' directories
from it first. The task imports
cloudpickle, activates the code snapshot and unpickles the function once, then forks one
child per run, so a crash in one run never takes its task-mates down and every run keeps its
own directory, state, result and cancel (a ``cancel.requested`` file stops just that run).

Stop signals (what the scheduler means by them comes from :mod:`easylaunch.environments`):
SIGUSR2 (sent by Slurm before the time limit, ``--signal=B:USR2@N``) reaches
the current run; if its function offers ``checkpoint(doodad_config, variant) -> callable``, the
callable is pickled as the new payload and the task is requeued (``scontrol requeue``) up to
``max_requeue`` times; the resumed run appends to the same run directory with attempt+1.
Otherwise (no checkpoint, or one that returns None, as submitit allows) the run ends as
TIMEOUT. SIGTERM is a cancel, unless Slurm is requeueing the job (preemption, ``scontrol
requeue``): then unfinished runs go back to PENDING and run again when the job restarts.
Finished runs are never run twice.

A run's own ``timeout`` interrupts it the same way (as SIGUSR2, see
:class:`easylaunch.runner.Watchdog`). Where the task cannot be requeued (no scheduler, or no
requeue budget) a checkpoint is still taken: the callable it returns is saved as the run's new
payload (the previous one kept as ``payload.attemptN.pkl``) and the run ends TIMEOUT with a
message saying how to resume it (``easylaunch relaunch RUN``). A checkpoint that returns None
declines (the run ends TIMEOUT, nothing saved).

Each run's process leads its own process group. A cancelled run that ignores SIGTERM is killed
(SIGKILL, its whole group) after its ``cancel_grace`` (payload header, default 10 s) and
recorded CANCELLED.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, List, Optional

from . import monitor, records, transitions
from .environments import JobEnvironment, detect
from .liveness import LAUNCHER_FILE, LauncherWatch
from .procs import kill_run, waitstatus_to_exitcode
from .runner import SIGNAL_STATES, RunInterrupted, execute, load_payload_file, load_payload_run
from .spec import DoodadConfig, State

REQUEUE_EXIT = 75  # the run checkpointed and asks for the task to be requeued
REQUEUED_BY_SLURM = 76  # Slurm itself requeues the job (preemption, scontrol requeue)


def _save_checkpoint(run_dir: Path, new_fn: Callable) -> None:
    """Replace the payload's function, keeping the previous payload for provenance."""
    import pickle

    from .payload import PROTOCOL, read_header, replace_function

    payload = run_dir / records.PAYLOAD
    header = replace_function(read_header(payload), new_fn)  # stamped with this Python's versions
    attempt = records.read_status(run_dir).get("attempt", 1)
    os.replace(payload, run_dir / f"payload.attempt{attempt}.pkl")
    records.atomic_write_bytes(payload, pickle.dumps(header, protocol=PROTOCOL), records.PRIVATE_MODE)


def make_checkpoint_hook(max_requeue: int, environment: JobEnvironment) -> Callable[..., Optional[int]]:
    """The ``on_interrupt`` hook of :func:`easylaunch.runner.execute`: a checkpoint at the time
    limit (the scheduler's or the run's own ``timeout``), a requeue by the scheduler
    (``environment`` tells which). Plain runners use it with ``max_requeue=0``."""

    def hook(
        run_dir: Path, fn: Callable, config: DoodadConfig, variant: Any, exc: RunInterrupted
    ) -> Optional[int]:
        checkpoint = getattr(fn, "checkpoint", None)
        status = records.read_status(run_dir)
        requeues = int(status.get("requeues", 0))
        if exc.signum == signal.SIGUSR2:
            if not callable(checkpoint):
                return None  # recorded as TIMEOUT
            if not environment.can_requeue or max_requeue == 0:
                return _checkpoint_here(run_dir, checkpoint, config, variant, exc)
            if requeues >= max_requeue:
                return None  # the requeue budget is spent: TIMEOUT
            why = "checkpointed at the time limit; requeued"
            code = REQUEUE_EXIT
        elif exc.signum == signal.SIGTERM and environment.requeue_pending():
            why = environment.requeue_reason()
            code = REQUEUED_BY_SLURM
        elif exc.signum == signal.SIGTERM and environment.time_limit_reached():
            from .runner import record_failure

            record_failure(run_dir, exc, State.TIMEOUT, 128 + exc.signum)
            records.write_status(
                run_dir, State.TIMEOUT, message=f"{environment.scheduler}'s time limit was reached (SIGTERM)"
            )
            return 128 + exc.signum
        else:
            return None
        if callable(checkpoint):
            try:
                resume = checkpoint(config, variant)  # None declines the requeue, as in submitit
                if resume is not None:
                    _save_checkpoint(run_dir, resume)
                    why += ", resumes from its checkpoint"
            except Exception as err:  # a broken checkpoint must not lose the run's record
                print(f"easylaunch: checkpoint() failed: {err!r}", file=sys.stderr)
                resume = None
            if resume is None and code == REQUEUE_EXIT:
                return None  # recorded as TIMEOUT
        records.write_status(
            run_dir, State.PENDING, requeues=requeues + 1, message=why, ended=time.time(), exit_code=None
        )
        return code

    return hook


def _checkpoint_here(
    run_dir: Path, checkpoint: Callable, config: DoodadConfig, variant: Any, exc: RunInterrupted
) -> Optional[int]:
    """No requeue possible: save the checkpoint as the run's payload and end it TIMEOUT."""
    from .runner import record_failure

    try:
        resume = checkpoint(config, variant)
        if resume is None:
            return None  # declined: a plain TIMEOUT
        _save_checkpoint(run_dir, resume)
    except Exception as err:
        print(f"easylaunch: checkpoint() failed: {err!r}", file=sys.stderr)
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    record_failure(run_dir, exc, State.TIMEOUT, 128 + exc.signum)
    attempt = records.read_status(run_dir).get("attempt", 1)
    records.write_status(
        run_dir,
        State.TIMEOUT,
        message=(
            f"{exc}; a checkpoint was saved as this run's payload.pkl (the previous one is "
            f"payload.attempt{attempt}.pkl): resume it with `easylaunch relaunch {run_dir}`"
        ),
        checkpoint_saved=True,
    )
    return 128 + exc.signum


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
            # a stop (SIGTERM/SIGINT) goes to the run's whole process group, so that what its
            # function started ends with it where no cgroup does that (ssh, local); SIGUSR2 (the
            # time-limit warning) only to the run process: its children keep their default action
            try:
                if signum == signal.SIGUSR2:
                    os.kill(self.child, signum)
                else:
                    kill_run(self.child, signum)
            except ProcessLookupError:
                pass


def run_group(
    paths: List[Path],
    quiet: bool = False,
    max_requeue: int = 0,
    environment: Optional[JobEnvironment] = None,
    launcher: Optional[LauncherWatch] = None,
) -> int:
    """Run each payload of one task in a forked child; returns 0 when every run completed.

    ``launcher`` tells when a payload that is not written yet will never come (the launcher
    finished, or died): the run is then recorded FAILED at once instead of after PAYLOAD_WAIT.
    """
    environment = environment or detect()
    master = _Master()
    hook = make_checkpoint_hook(max_requeue, environment)
    _warm_up(paths, master, launcher)
    hub = monitor.Hub()  # samples every run of the task: a run starts no thread of its own
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
            transitions.cancelled_before_start(run_dir)
            all_ok = False
            continue
        if not _await_payload(path, master, launcher):
            if master.stop is not None:
                break
            transitions.not_started(
                run_dir,
                State.FAILED,
                f"{path} was never written: the launcher stopped (or died) before it wrote this "
                "run's payload",
            )
            all_ok = False
            continue

        def load(path: Path = path) -> tuple:
            return load_payload_run(path)

        sys.stdout.flush()
        sys.stderr.flush()
        # stop signals stay blocked in the child until execute() has its handlers in place
        # (a SIGTERM or USR2 in between would otherwise kill it unrecorded); in the parent
        # they are delivered once the child's pid is known, and forwarded to it
        signal.pthread_sigmask(signal.SIG_BLOCK, list(SIGNAL_STATES))
        oom_before = environment.oom_kills()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 1
            try:
                for sig in SIGNAL_STATES:
                    signal.signal(sig, signal.SIG_DFL)
                os.setpgid(0, 0)  # the run's own group: a forced cancel kills it, not its task-mates
                hub.adopt()
                code = execute(run_dir, load, echo=not quiet, on_interrupt=hook)
            finally:
                os._exit(code)
        master.child = pid
        try:
            os.setpgid(pid, pid)  # also here: no window where the child is still in the task's group
        except OSError:
            pass
        signal.pthread_sigmask(signal.SIG_UNBLOCK, list(SIGNAL_STATES))
        if master.stop is not None:  # a signal arrived between the check and the fork
            os.kill(pid, master.stop)
        code = _wait_child(pid, run_dir, master)
        hub.forget(pid)
        master.child = None
        loaded[path] = code
        if code in (REQUEUE_EXIT, REQUEUED_BY_SLURM):
            requeue = code == REQUEUE_EXIT or requeue
            master.stop = master.stop or signal.SIGTERM
            break
        all_ok &= code == 0
        # the run process left without its final record: killed by a signal it could not
        # catch, or os._exit() from inside the function (any exit code, 0 included)
        oom = code == -signal.SIGKILL and (environment.oom_kills() or 0) > (oom_before or 0)
        if (
            transitions.died_without_record(run_dir, f"run process {pid}", exit_code=code, oom_killed=oom)
            is not State.COMPLETED
        ):
            all_ok = False
    if master.stop is not None:
        _settle_unstarted(paths, loaded, master.stop, requeue, environment)
        if requeue:
            environment.requeue()
        return 128 + master.stop if not requeue else 0
    return 0 if all_ok else 1


#: seconds a task waits for a payload the launcher has not written yet (it submits first)
PAYLOAD_WAIT = float(os.environ.get("EASYLAUNCH_PAYLOAD_WAIT", "300"))


def _await_payload(
    path: Path, master: Optional["_Master"] = None, launcher: Optional[LauncherWatch] = None
) -> bool:
    """True once ``path`` exists; False after PAYLOAD_WAIT seconds, on a stop signal, or as
    soon as ``launcher`` says the launcher is gone (finished or dead: the payload never comes).

    The Slurm mode submits the array before it writes the payloads (so that every manifest
    is written once, with its job id): a task that starts at once may be early.
    """
    deadline = time.monotonic() + PAYLOAD_WAIT
    delay = 0.01
    while not path.exists():
        if time.monotonic() > deadline or (master is not None and master.stop is not None):
            return False
        if launcher is not None and launcher.gone():
            return path.exists()  # written just before the launcher ended
        time.sleep(delay)
        delay = min(0.2, delay * 1.5)
    return True


def _warm_up(
    paths: List[Path], master: Optional["_Master"] = None, launcher: Optional[LauncherWatch] = None
) -> None:
    """Pay imports once: unpickle the first unfinished payload here, before forking runs."""
    for path in paths:
        if records.read_status(path.parent).get("state", State.PENDING) in (State.PENDING, State.RUNNING):
            if not _await_payload(path, master, launcher):
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
    kill_at: Optional[float] = None
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
                return waitstatus_to_exitcode(status)
            if not cancelled and mark.exists():
                cancelled = True
                grace = _cancel_grace(run_dir / records.PAYLOAD)
                kill_at = time.monotonic() + grace
                kill_run(pid, signal.SIGTERM)
            elif kill_at is not None and time.monotonic() >= kill_at:
                # it ignored the cancel: record why, then kill it (and what it started)
                transitions.cancel_forced(run_dir, f"run process {pid}", grace)
                kill_run(pid, signal.SIGKILL)
                kill_at = None
            if pidfd is not None:
                select.select([pidfd], [], [], 0.2)
            else:
                time.sleep(delay)
                delay = min(0.2, delay * 2)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _cancel_grace(payload_path: Path) -> float:
    """The run's ``cancel_grace`` from its payload header (read only when a cancel comes)."""
    from .payload import read_header
    from .runner import DEFAULT_CANCEL_GRACE

    try:
        grace = (read_header(payload_path).get("extra") or {}).get("cancel_grace")
    except Exception:
        grace = None
    return float(grace) if grace is not None else DEFAULT_CANCEL_GRACE


def _settle_unstarted(
    paths: List[Path], started: dict, signum: int, requeue: bool, environment: JobEnvironment
) -> None:
    """Runs the task never reached: back to the queue on requeue, else TIMEOUT/CANCELLED."""
    if requeue or (signum == signal.SIGTERM and environment.requeue_pending()):
        return  # they stay PENDING and run when the job restarts
    state = SIGNAL_STATES[signum]
    if signum == signal.SIGTERM and environment.time_limit_reached():
        state = State.TIMEOUT
    for path in paths:
        if path in started:
            continue
        run_dir = path.parent
        if transitions.current(run_dir) is State.PENDING:
            transitions.not_started(
                run_dir,
                state,
                f"the task was stopped ({signal.Signals(signum).name}) before this run started",
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
    packs = tasks.get("packs")
    if packs:  # a bundle: this task makes its runs' directories from its pack
        from .packs import PackError, unpack_runs

        try:
            unpack_runs(tasks_file.parent / packs[index], [p.parent for p in paths])
        except (PackError, OSError) as exc:
            print(f"easylaunch runner: {exc}", file=sys.stderr)
            return 2
    return run_group(
        paths,
        quiet="--quiet" in args,
        max_requeue=int(tasks.get("max_requeue", 0)),
        launcher=LauncherWatch(tasks_file.parent / LAUNCHER_FILE),
    )
