"""Every status record written FOR a run by someone other than its runner.

The runner records its own transitions (RUNNING, COMPLETED, FAILED, ...). When it cannot,
because it never started or died without a word, whoever notices writes the record through
one of these functions, so that the wording, the fields and the rule "never overwrite an
outcome" are the same on every backend::

    transitions.cancelled_before_start(run_dir)
    transitions.died_without_record(run_dir, "runner process 123", exit_code=-9)
    transitions.backend_ended(run_dir, "Slurm task 12_3", "NODE_FAIL", State.FAILED)
    transitions.container_exited(run_dir, "container 1a2b", exit_code=137, oom_killed=True)
    transitions.cancel_forced(run_dir, "runner process 123", grace=10)

The launcher's own lines of the transaction log (:mod:`easylaunch.txlog`) are written here
too, once per batch: :func:`launched` (SUBMITTED, then PENDING or GENERATED). Every other
event follows from a status record (``records.write_status``), whoever writes it.

Each returns the run's state after the call: the one written, or the outcome that was already
recorded (a runner that finished a moment earlier wins). Modes report what their backend says
through these and never write status files or Job fields themselves. Standard library only
(the packed task runner uses it on the target, Python 3.8+).
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Union

from . import records, txlog
from .spec import TERMINAL_STATES, State

if TYPE_CHECKING:
    from .batch import Batch

PathLike = Union[str, Path]
#: the runner's exit code when it cannot write the run's records (EX_IOERR of sysexits.h)
RECORDS_UNWRITABLE = 74


def current(run_dir: PathLike) -> State:
    """The state recorded in the run's status file."""
    return State(records.read_status(run_dir).get("state", State.PENDING))


def settle(run_dir: PathLike, state: State, message: str, **fields: object) -> State:
    """Record ``state`` unless the run already has an outcome; returns the state it ends with.

    The status file is read again first, so an outcome the runner recorded since the caller
    last looked is kept.
    """
    now = current(run_dir)
    if now in TERMINAL_STATES:
        return now
    fields.setdefault("ended", time.time())
    try:
        records.write_status(run_dir, state, message=message, **fields)
    except OSError as exc:  # a full or read-only log dir: the state is still the answer
        _not_saved(run_dir, state, message, exc)
    return State(state)


_warned_unsaved: set = set()


def _not_saved(run_dir: PathLike, state: State, message: str, exc: OSError) -> None:
    """Say once per kind of error (per process) that a launcher-side record could not be written."""
    import sys

    key = (exc.errno, str(Path(run_dir).parent))
    if key in _warned_unsaved:
        return
    _warned_unsaved.add(key)
    try:  # stderr may be a log file on the same full disk (the dispatcher's)
        print(
            f"easylaunch: cannot record {State(state).value} for {Path(run_dir).name} ({message}): "
            f"{exc.strerror or exc}; the state is reported but not saved until {Path(run_dir).parent} "
            "can be written again (free some space there)",
            file=sys.stderr,
            flush=True,
        )
    except OSError:
        pass


def exit_description(exit_code: Optional[int]) -> str:
    """``exit code 3`` / ``killed by SIGKILL`` for a wait status as Popen and docker report it
    (negative = signal, 128+N from a shell or a container = signal N)."""
    if exit_code is None:
        return "exit code unknown"
    if exit_code == RECORDS_UNWRITABLE:
        return f"exit code {exit_code}: it could not write the run's records (disk full or read-only?)"
    number = -exit_code if exit_code < 0 else exit_code - 128 if exit_code > 128 else 0
    if number:
        try:
            return f"killed by {signal.Signals(number).name}"
        except ValueError:
            pass
    return f"exit code {exit_code}"


# -- before the runner started ------------------------------------------------------------
def cancelled_before_start(run_dir: PathLike, why: str = "cancelled before it started") -> State:
    """A cancel reached a run that had not started: it never will."""
    return settle(run_dir, State.CANCELLED, why)


def not_started(run_dir: PathLike, state: State, why: str) -> State:
    """A run that will never start (its task was stopped, an earlier run raised, ...)."""
    return settle(run_dir, state, why)


def starter_gone(run_dir: PathLike, who: str) -> State:
    """The process that was to start this run (a dispatcher, a supervisor) is gone."""
    return settle(run_dir, State.FAILED, f"{who} that was to start this run is gone")


def refused(run_dir: PathLike, backend: str, why: str) -> State:
    """The backend refused to start the run (image missing, submission rejected, ...)."""
    return settle(run_dir, State.FAILED, f"{backend} refused the run: {why}")


# -- after the runner started -------------------------------------------------------------
def died_without_record(
    run_dir: PathLike,
    who: str,
    exit_code: Optional[int] = None,
    state: State = State.FAILED,
    oom_killed: bool = False,
) -> State:
    """The runner's process is gone and left no outcome (killed, os._exit, host lost);
    ``oom_killed``: the kernel's out-of-memory killer did it.

    After a cancel was requested (``cancel.requested``) the run is CANCELLED, not FAILED: the
    cancel is what ended it (a runner killed before its handlers were in place, or by the
    escalation of :func:`cancel_forced`)."""
    how = f" ({exit_description(exit_code)})" if exit_code is not None else ""
    fields: dict = {"exit_code": exit_code} if exit_code is not None else {}
    if oom_killed:
        fields["oom_killed"] = True
        return settle(run_dir, state, f"{who} was killed: out of memory{how}", **fields)
    message = f"{who} exited without recording an outcome{how}"
    if state is State.FAILED and (Path(run_dir) / records.CANCEL_MARK).exists():
        state, message = State.CANCELLED, f"cancelled: {message} after the cancel was requested"
    return settle(run_dir, state, message, **fields)


def cancel_forced(run_dir: PathLike, who: str, grace: float) -> State:
    """A cancelled run ignored SIGTERM for ``grace`` seconds and was killed (SIGKILL)."""
    return settle(
        run_dir,
        State.CANCELLED,
        f"cancelled: {who} did not stop within {grace:g} s of SIGTERM and was killed (SIGKILL)",
        exit_code=128 + signal.SIGKILL,
    )


def backend_ended(run_dir: PathLike, who: str, backend_state: str, state: State, why: str = "") -> State:
    """The backend says the run's task ended (``backend_state``) and the run left no record
    (``why``: what else the backend knows, appended)."""
    message = f"{who} ended as {backend_state} without this run's record"
    return settle(run_dir, state, f"{message}; {why}" if why else message)


def container_exited(
    run_dir: PathLike, who: str, exit_code: Optional[int], oom_killed: bool = False
) -> State:
    """The run's container exited and the runner inside recorded nothing."""
    if oom_killed:
        message = f"{who} was killed: out of memory ({exit_description(exit_code)})"
    else:
        message = f"{who} exited without recording an outcome ({exit_description(exit_code)})"
    fields = {"exit_code": exit_code, "oom_killed": True} if oom_killed else {"exit_code": exit_code}
    return settle(run_dir, State.FAILED, message, **fields)


def recovering(run_dir: PathLike, why: str, **fields: object) -> State:
    """A PREEMPTED run is being relaunched (cloud recovery): PENDING again, in the same run
    directory (its runner then records attempt+1). Only a preempted run may go back."""
    if current(run_dir) != State.PREEMPTED:
        return current(run_dir)
    records.write_status(run_dir, State.PENDING, message=why, ended=None, **fields)
    return State.PENDING


def cancelled_here_only(run_dir: PathLike, why: str) -> State:
    """Mark a run CANCELLED locally when the backend cannot be reached (bundles)."""
    status = records.read_status(run_dir)
    if State(status.get("state", State.PENDING)) not in (State.GENERATED, State.PENDING, State.RUNNING):
        return State(status["state"])
    records.write_status(run_dir, State.CANCELLED, message=why)
    return State.CANCELLED


def generated(run_dirs: Iterable[PathLike], why: str, scratch: PathLike) -> None:
    """Runs written for a backend easylaunch cannot reach: state GENERATED.

    Every run's status is still the identical PENDING record its batch wrote, so the new
    record is written once and hard-linked into each (see records.write_same_status).
    """
    run_dirs = list(run_dirs)
    if not run_dirs:
        return
    status = records.read_status(run_dirs[0])
    status.update(state=str(State.GENERATED), message=why)
    status.setdefault("history", []).append([str(State.GENERATED), time.time()])
    records.write_same_status(run_dirs, status, Path(scratch))


#: backend facts copied into a run's PENDING line of the transaction log
_QUEUE_FACTS = ("job_id", "container_name", "task", "pid", "host")


def launched(batch: "Batch", submitted_us: int) -> None:
    """A batch was handed to its backend: one SUBMITTED line per run (at ``submitted_us``, when
    the launch began), then PENDING (queued by the backend, with its id) or GENERATED (a bundle
    to copy), into ``<exp>/.batches/<batch>/transactions.jsonl``."""
    if not batch.runs or not txlog.enabled():
        return
    now = txlog.now_us()
    queued = str(records.read_status(batch.runs[0].run_dir).get("state")) != State.GENERATED.value
    kind = "PENDING" if queued else "GENERATED"
    events = []
    for run in batch.runs:
        events.append(
            {
                "t": submitted_us,
                "event": "SUBMITTED",
                "run": run.name,
                "batch": batch.batch_id,
                "mode": batch.mode_name,
            }
        )
    for run in batch.runs:
        facts = batch.backend.get(run.index) or {}
        event = {"t": now, "event": kind, "run": run.name}
        event.update((k, facts[k]) for k in _QUEUE_FACTS if k in facts)
        events.append(event)
    txlog.record_batch(batch.sweep_dir, events)
