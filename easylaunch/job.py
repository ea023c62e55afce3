"""Job handles: state, wait, result, logs and cancel, rebuilt from a run directory alone.

job = run_experiment(fn, exp_name="demo", variant={"x": 1}, skip_wait=True)
job.wait()
job.result()                 # the return value, or re-raises the remote exception
job2 = Job.load(job.run_dir) # same run, from the directory alone (e.g. a new session)

sweep = run_sweep(fn, grid({"x": range(10)}), exp_name="demo", mode="local")
sweep.wait()                 # progress bar on a terminal
sweep.results()

A Job is also a ``concurrent.futures.Future``: ``concurrent.futures.wait(sweep)``,
``as_completed(sweep)`` and ``job.add_done_callback(fn)`` work on the Jobs of any launch (one
watcher thread per launch completes their Future side, started once they are waited on).

with run_experiment(fn, exp_name="demo", skip_wait=True) as job:   # guaranteed cleanup:
    time.sleep(10)           # on leaving the block (normally, by an exception or Ctrl-C) the
                             # run is cancelled if unfinished and nothing of it is left behind
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import Counter
from concurrent import futures
from concurrent.futures import _base as _fbase
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from . import records
from .spec import TERMINAL_STATES, State


class JobError(RuntimeError):
    """A run did not complete; ``state`` says how it ended."""

    def __init__(self, message: str, state: State, run_dir: Path):
        super().__init__(message)
        self.state = state
        self.run_dir = run_dir


class RemoteTraceback(Exception):
    """Carries the remote traceback text as the ``__cause__`` of a re-raised exception."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return "\n\nRemote traceback:\n" + self.tb


class RemoteError(RuntimeError):
    """The remote exception, when its class cannot be rebuilt here; message has its traceback."""


_log = logging.getLogger("easylaunch")


class JobCancelled(JobError, futures.CancelledError):
    """The run was cancelled: a :class:`JobError` that is also ``concurrent.futures.CancelledError``."""


#: what ``result(timeout)``/``wait(timeout)`` raise when time runs out: the builtin TimeoutError,
#: which is also ``concurrent.futures.TimeoutError`` (the same class from Python 3.11 on)
WaitTimeout: type = (
    TimeoutError
    if futures.TimeoutError is TimeoutError
    else type("WaitTimeout", (TimeoutError, futures.TimeoutError), {"__module__": __name__})
)


class NotLaunchedError(AttributeError):
    """The Job was submitted inside ``with executor.batch():`` and is launched when the block
    exits (or never, when the block raised)."""


# Future's own fields: created on first use (``concurrent.futures.wait``, ``as_completed``,
# ``add_done_callback``), so that a sweep of 10,000 Jobs costs no lock per Job until then
_FUTURE_FIELDS = {
    "_condition": threading.Condition,
    "_state": lambda: _fbase.PENDING,
    "_result": lambda: None,
    "_exception": lambda: None,
    "_waiters": list,
    "_done_callbacks": list,
}
_FUTURE_DONE = (_fbase.CANCELLED, _fbase.CANCELLED_AND_NOTIFIED, _fbase.FINISHED)


class Job(futures.Future):
    """Handle on one run; also a ``concurrent.futures.Future`` of the function's result.

    Cheap to create; every property reads the run directory::

        job.state, job.done(), job.result(timeout=60), job.exception(), job.cancel()
        concurrent.futures.wait(sweep); [j.result() for j in concurrent.futures.as_completed(sweep)]

    ``result()`` re-raises a failed run's own exception (the remote traceback is its
    ``__cause__``); a run that ended otherwise raises :class:`JobError` (:class:`JobCancelled`
    for CANCELLED). The Future side (``add_done_callback``, ``wait``, ``as_completed``) is
    completed by one watcher thread per launch or Executor, started only once it is used.
    """

    def __init__(
        self,
        run_dir: Path | str,
        mode: Any = None,
        _resolved: bool = False,
        _watcher: Optional[_Watcher] = None,
    ):
        # no Future.__init__: its fields are made on first use (see __getattr__)
        self.run_dir = Path(run_dir) if _resolved else Path(run_dir).resolve()
        self._mode = mode
        self._manifest: Optional[dict] = None
        self._status: dict = {}
        self._run_state: Optional[State] = None
        self._watcher = _watcher

    def __getattr__(self, name: str) -> Any:
        # only called for attributes not set yet
        if name in _FUTURE_FIELDS:
            self._wake_future()
            return self.__dict__[name]
        if name == "run_dir":
            raise NotLaunchedError(
                self.__dict__.get("_not_launched")
                or "this Job was submitted inside `with executor.batch():`; it is launched (and "
                "gets its run directory) when the block exits"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __getstate__(self) -> dict:
        # a pickled Job is a handle on the run directory: no lock, watcher or waiter travels
        return {k: v for k, v in self.__dict__.items() if k not in _FUTURE_FIELDS and k != "_watcher"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_watcher", None)

    # -- construction ----------------------------------------------------------------
    @classmethod
    def load(cls, run_dir: Path | str, _watcher: Optional[_Watcher] = None) -> Job:
        """Rebuild a handle from a run directory (raises FileNotFoundError if it is not one)."""
        job = cls(run_dir, _watcher=_watcher)
        job.manifest  # noqa: B018 - validates the directory
        return job

    @classmethod
    def _unlaunched(cls, watcher: Optional[_Watcher] = None) -> Job:
        """A handle whose run does not exist yet (``executor.batch()``); see :meth:`_bind`."""
        job = cls.__new__(cls)
        job._mode = None
        job._manifest = None
        job._status = {}
        job._run_state = None
        job._watcher = watcher
        return job

    def _bind(self, launched: Job) -> None:
        """Point an unlaunched handle at the run ``launched`` stands for."""
        self.__dict__["run_dir"] = launched.run_dir
        self._mode = launched._mode
        if "_done_callbacks" in self.__dict__:  # someone already waits on it
            self._track()

    def _drop(self, reason: str) -> None:
        """An unlaunched handle whose run will never exist: its Future side ends cancelled."""
        self.__dict__["_not_launched"] = reason
        if "_done_callbacks" in self.__dict__:
            self._finish_cancelled()

    @property
    def manifest(self) -> dict:
        """The run's manifest (cached once present)."""
        if self._manifest is None:
            self._manifest = records.read_manifest(self.run_dir)
        return self._manifest

    @property
    def mode(self) -> Any:
        """The mode object that launched this run (rebuilt from the manifest when loaded)."""
        if self._mode is None:
            from .config import load_settings
            from .modes import get_mode_class

            self._mode = get_mode_class(self.manifest["mode"])(load_settings())
        return self._mode

    # -- identity --------------------------------------------------------------------
    @property
    def job_id(self) -> str:
        """The backend's id for the run (e.g. ``1234_7`` on Slurm), else the run name."""
        try:
            backend = self.manifest.get("backend") or {}
        except FileNotFoundError:
            backend = {}
        return str(backend.get("job_id") or self.run_dir.name)

    @property
    def exp_name(self) -> str:
        return self.manifest.get("exp_name", self.run_dir.parent.name)

    @property
    def variant(self) -> dict:
        return records.read_json(self.run_dir / records.VARIANT, {})

    @property
    def status(self) -> dict:
        """The latest status record (refreshes the state)."""
        self._refresh_from_file()
        return dict(self._status)

    @property
    def last_status(self) -> dict:
        """The status record as last read (no file access): what a mode's poll starts from."""
        return self._status

    @property
    def last_state(self) -> Optional[State]:
        """The state as last read or polled (no file access); None before the first read."""
        return self._run_state

    def __repr__(self) -> str:
        if "run_dir" not in self.__dict__:
            if "_not_launched" in self.__dict__:
                return "Job(<never launched: its executor.batch() was dropped>)"
            return "Job(<not launched yet: inside executor.batch()>)"
        return f"Job({self.run_dir.name!r}, state={self.state.value})"

    def _unlaunched_state(self) -> State:
        """CANCELLED for a handle whose batch was dropped; NotLaunchedError inside the batch."""
        if "_not_launched" not in self.__dict__:
            self.run_dir  # noqa: B018 - raises NotLaunchedError, saying why
        return State.CANCELLED

    # -- state -----------------------------------------------------------------------
    def _refresh_from_file(self) -> State:
        if self._run_state is not None and self._run_state in TERMINAL_STATES:
            return self._run_state
        self._status = records.read_status(self.run_dir)
        raw = self._status.get("state", State.PENDING)
        self._run_state = State(raw)
        return self._run_state

    def _apply_backend(self, backend_state: Optional[State]) -> None:
        if backend_state is None or self._run_state in TERMINAL_STATES:
            return
        self._run_state = State(backend_state)

    @property
    def state(self) -> State:
        """Current state: the runner's status file, completed by the backend's view."""
        if "run_dir" not in self.__dict__:
            return self._unlaunched_state()
        refresh_states([self])
        return self._run_state  # type: ignore[return-value]

    def done(self) -> bool:
        """True once the run reached a terminal state."""
        finished = self.state in TERMINAL_STATES
        if finished:
            self._settle()
        return finished

    def running(self) -> bool:
        """True while the run is RUNNING (a Future's ``running()``)."""
        return self.state is State.RUNNING

    def cancelled(self) -> bool:
        """True once the run ended as CANCELLED."""
        state = self.state
        if state in TERMINAL_STATES:
            self._settle()
        return state is State.CANCELLED

    def wait(self, timeout: Optional[float] = None) -> State:
        """Block until the run ends; TimeoutError after ``timeout`` seconds."""
        if "run_dir" not in self.__dict__:
            return self._unlaunched_state()
        wait_all([self], timeout=timeout, progress=False)
        self._settle()
        return self._run_state  # type: ignore[return-value]

    # -- outcome ---------------------------------------------------------------------
    def result(self, timeout: Optional[float] = None) -> Any:
        """Wait, then return the function's return value or re-raise its exception."""
        state = self.wait(timeout)
        if state is State.COMPLETED:
            return self._load_result()
        raise self._failure(state)

    def _load_result(self) -> Any:
        import cloudpickle

        with open(self.run_dir / records.RESULT, "rb") as f:
            try:
                try:
                    return cloudpickle.load(f)
                except (ImportError, AttributeError):
                    # an object of a class from the run's code: read it with that code on the path
                    if not _add_run_code_to_path(self.run_dir):
                        raise
                    f.seek(0)
                    return cloudpickle.load(f)
            except (ImportError, AttributeError) as exc:
                ours = "%d.%d" % sys.version_info[:2]
                theirs = self._status.get("python") or "unknown"
                raise JobError(
                    f"run {self.run_dir.name} COMPLETED, but its result (written by Python {theirs}, read "
                    f"by Python {ours}) holds an object whose code is not importable here "
                    f"({type(exc).__name__}: {exc}) and the run kept no code snapshot "
                    f"that has it. Put the run's code dirs on the path (PYTHONPATH="
                    f"{os.pathsep.join(_code_sources(self.manifest)) or 'THE_CODE_DIR'}) and read it "
                    "again, or return plain data (dict, list, str, numbers)",
                    State.COMPLETED,
                    self.run_dir,
                ) from exc
            except Exception as exc:
                # e.g. written by an image's other Python (a by-reference run) with objects
                # this one cannot rebuild
                ours = "%d.%d" % sys.version_info[:2]
                theirs = self._status.get("python") or "unknown"
                raise JobError(
                    f"run {self.run_dir.name} COMPLETED, but its result.pkl cannot be read here "
                    f"(written by Python {theirs}, read by Python {ours}): {type(exc).__name__}: "
                    f"{exc}. Return plain data (dict, list, str, numbers) or objects of classes "
                    "importable on both sides, or write larger outputs into doodad_config.base_log_dir",
                    State.COMPLETED,
                    self.run_dir,
                ) from exc

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        """Wait, then return the remote exception (None if the run completed).

        A run that ended without an exception of its own (CANCELLED, TIMEOUT, PREEMPTED)
        gives a :class:`JobError` saying how (:class:`JobCancelled` when cancelled).
        """
        state = self.wait(timeout)
        return None if state is State.COMPLETED else self._failure(state)

    def _failure(self, state: State) -> BaseException:
        """The exception that stands for a run that ended in ``state`` (not COMPLETED)."""
        if "run_dir" not in self.__dict__:  # a dropped batch's handle
            return JobCancelled(self.__dict__["_not_launched"], State.CANCELLED, None)  # type: ignore[arg-type]
        message = self._status.get("message") or f"ended as {state.value}"
        if state is State.CANCELLED:
            return JobCancelled(f"run {self.run_dir.name} CANCELLED: {message}", state, self.run_dir)
        if state is not State.FAILED:
            return JobError(f"run {self.run_dir.name} {state.value}: {message}", state, self.run_dir)
        error = records.read_json(self.run_dir / records.ERROR)
        if error is None:
            return JobError(f"run {self.run_dir.name} FAILED: {message}", state, self.run_dir)
        exc: Optional[BaseException] = None
        try:
            import cloudpickle

            with open(self.run_dir / records.EXCEPTION, "rb") as f:
                try:
                    exc = cloudpickle.load(f)
                except (ImportError, AttributeError):
                    if not _add_run_code_to_path(self.run_dir):  # its class from the run's code
                        raise
                    f.seek(0)
                    exc = cloudpickle.load(f)
        except Exception:
            exc = None
        if isinstance(exc, BaseException) and not isinstance(exc, Exception):
            # SystemExit, KeyboardInterrupt, ... of the run: re-raised here they would end or
            # interrupt the launcher, so they come back as an ordinary exception
            exc = None
        if not isinstance(exc, BaseException):
            exc = RemoteError(
                f"{error['type']}: {error['message']}\n\nRemote traceback:\n{error['traceback']}"
            )
        exc.__cause__ = RemoteTraceback(error["traceback"])
        return exc

    def stdout(self) -> str:
        """Everything the function printed to stdout so far (fetched first from a remote run)."""
        self._fetch_unfinished()
        return _read_text(self.run_dir / records.STDOUT)

    def stderr(self) -> str:
        """Everything the function printed to stderr so far (fetched first from a remote run)."""
        self._fetch_unfinished()
        return _read_text(self.run_dir / records.STDERR)

    def fetch(self) -> None:
        """Bring what the run wrote so far into its local run directory, for modes whose runs
        execute on another machine (``ssh``: only new or changed files travel); a no-op
        elsewhere::

            job.fetch(); open(job.run_dir / "progress.csv").read()
        """
        if self._fetches_outputs():
            self.mode.fetch([self])

    def _fetches_outputs(self) -> bool:
        if self._mode is not None:
            return bool(getattr(self._mode, "fetches_outputs", False))
        from .modes import get_mode_class

        try:
            return bool(get_mode_class(self.manifest.get("mode", "")).fetches_outputs)
        except (ValueError, FileNotFoundError):
            return False

    def _fetch_unfinished(self) -> None:
        # a finished run's outputs came back with the poll that saw it finish
        if self._refresh_from_file() not in TERMINAL_STATES and self._fetches_outputs():
            self.mode.fetch([self])

    def cancel(self) -> bool:
        """Ask the run to stop, queued or running; False if it had already ended.

        The state becomes CANCELLED (and the Future side cancelled) once the runner or the
        backend has recorded it, usually within a poll.
        """
        if self.done():
            return False
        cancel_all([self])
        return True

    def close(self) -> None:
        """Stop the run if it is unfinished and release what its backend holds; see :func:`close_all`."""
        close_all([self])

    def __enter__(self) -> Job:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        """Leaving ``with run_experiment(...) as job:`` closes the run (:meth:`close`), however the
        block ends; its exception (Ctrl-C included) propagates."""
        close_all([self])
        return False

    # -- the Future side -----------------------------------------------------------------
    def add_done_callback(self, fn: Callable[[futures.Future], object]) -> None:
        """Call ``fn(job)`` once the run has ended (at once if it has), from the watcher thread."""
        self._wake_future()
        super().add_done_callback(fn)

    def _wake_future(self) -> None:
        """Create the Future's fields (once, even from racing threads) and have them completed."""
        fields = self.__dict__
        if "_done_callbacks" in fields:
            return
        for name, make in _FUTURE_FIELDS.items():
            fields.setdefault(name, make())  # atomic: racing threads end up with the same objects
        if "run_dir" in fields:
            self._track()
        elif "_not_launched" in fields:
            self._finish_cancelled()

    def _track(self) -> None:
        """Settle the Future side now if the outcome is known, else hand the job to a watcher."""
        if self._run_state in TERMINAL_STATES:
            self._settle()
            return
        if self._watcher is None:
            self._watcher = _Watcher()
        self._watcher.watch(self)

    def _settle(self) -> None:
        """Complete the Future side from the run's terminal state (no-op until it is used)."""
        if "_done_callbacks" not in self.__dict__ or self._run_state not in TERMINAL_STATES:
            return
        if self._state in _FUTURE_DONE:
            return
        state = self._run_state
        if state is State.CANCELLED:
            self._finish_cancelled()
            return
        try:
            if state is State.COMPLETED:
                futures.Future.set_result(self, None)  # result() reads result.pkl when asked
            else:
                futures.Future.set_exception(self, self._failure(state))
        except futures.InvalidStateError:
            pass  # another thread settled it first

    def _finish_cancelled(self) -> None:
        with self._condition:
            if self._state in _FUTURE_DONE:
                return
            self._state = _fbase.CANCELLED_AND_NOTIFIED
            for waiter in self._waiters:
                waiter.add_cancelled(self)
            self._condition.notify_all()
        self._invoke_callbacks()


class _Watcher:
    """Completes the Future side of many Jobs from ONE thread, polling them the way
    :func:`wait_all` does (status files often, the backend once per poll interval).

    The thread starts when the first job is handed over and ends when none is left; one
    watcher serves a launch (or an :class:`easylaunch.Executor` and all its launches).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: Dict[int, Job] = {}
        self._thread: Optional[threading.Thread] = None
        self._nudge = threading.Event()

    def watch(self, job: Job) -> None:
        """Poll ``job`` until it ends, then settle its Future side."""
        with self._lock:
            self._jobs[id(job)] = job
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="easylaunch-watcher", daemon=True)
                self._thread.start()
        self._nudge.set()

    def stop(self) -> None:
        """Stop watching (the thread ends after its current poll)."""
        with self._lock:
            self._jobs.clear()
        self._nudge.set()

    @property
    def watching(self) -> int:
        """How many jobs are being watched."""
        return len(self._jobs)

    def _run(self) -> None:
        interval = 0.01
        backend_due = 0.0
        while True:
            with self._lock:
                jobs = list(self._jobs.values())
                if not jobs:
                    self._thread = None
                    return
            began_cpu = time.thread_time()
            now = time.monotonic()
            ask_backend = now >= backend_due
            try:
                max_interval = float(getattr(jobs[0].mode, "poll_interval", 1.0))
                spacing = poll_spacing(jobs[0].mode)
                refresh_states(jobs, backend=ask_backend)
            except Exception:  # a backend hiccup (sacct timing out, ...) must not end the watching
                _log.warning("easylaunch: polling %d run(s) failed; retrying", len(jobs), exc_info=True)
                max_interval, ask_backend, spacing = 5.0, True, _POLL_SPACING
                gone = [j for j in jobs if not j.run_dir.is_dir()]
                with self._lock:
                    for job in gone:  # deleted run directories will never end
                        self._jobs.pop(id(job), None)
            finished = [j for j in jobs if j._run_state in TERMINAL_STATES]
            for job in finished:
                try:
                    job._settle()
                except Exception:
                    _log.warning("easylaunch: settling %r failed", job, exc_info=True)
            with self._lock:
                for job in finished:
                    self._jobs.pop(id(job), None)
            cost = time.thread_time() - began_cpu
            if ask_backend:
                backend_due = time.monotonic() + max(max_interval, spacing * cost)
            if not finished:
                interval = min(max_interval, interval * 1.25)
            # at least `spacing` times what the poll cost, even when nudged
            time.sleep(spacing * cost)
            self._nudge.wait(max(0.0, interval - spacing * cost))
            self._nudge.clear()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _by_mode(jobs: Iterable[Job]) -> Dict[str, List[Job]]:
    groups: Dict[str, List[Job]] = {}
    for job in jobs:
        groups.setdefault(job.manifest.get("mode", "?") if job._mode is None else job._mode.name, []).append(
            job
        )
    return groups


def refresh_states(jobs: Sequence[Job], backend: bool = True) -> None:
    """Update many jobs at once: status files, then ONE backend poll per mode (skipped when
    ``backend`` is False)."""
    unfinished = [
        j
        for j in jobs
        if j._refresh_from_file() not in TERMINAL_STATES and j._run_state is not State.GENERATED
    ]
    if not backend:
        return
    for _name, group in _by_mode(unfinished).items():
        answers = group[0].mode.poll(group)
        for job in group:
            answer = answers.get(job.run_dir)
            if answer is not None and answer is not job._run_state:
                # the mode recorded a transition (easylaunch.transitions): read it back
                job._status = records.read_status(job.run_dir)
            job._apply_backend(answer)


def cancel_all(jobs: Sequence[Job]) -> None:
    """Cancel many jobs with one backend call per mode."""
    live = [j for j in jobs if not j.done()]
    for job in live:
        (job.run_dir / records.CANCEL_MARK).touch()
    for _name, group in _by_mode(live).items():
        group[0].mode.cancel(group)


def cleanup_all(jobs: Sequence[Job]) -> None:
    """Let each backend release what it still holds for these ended runs (containers); one
    call per mode, safe to repeat."""
    for _name, group in _by_mode(jobs).items():
        group[0].mode.cleanup(group)


#: seconds close_all() waits beyond the runs' cancel_grace for them to be over
CLOSE_MARGIN = 5.0


def close_all(jobs: Sequence[Job]) -> None:
    """What leaving a ``with`` block of a Job or Sweep does: cancel every unfinished run, wait
    until each is over (bounded: its ``cancel_grace`` plus a few seconds, the time the backend
    takes to kill a run that ignores the cancel), then call each mode's ``cleanup()`` so that
    nothing is left behind (processes, containers, temporary files). A run that had finished
    keeps its outcome; the others end CANCELLED. Runs written for a backend easylaunch cannot
    reach (GENERATED) are marked CANCELLED here only."""
    from .batch import cancel_grace

    jobs = list(jobs)
    if not jobs:
        return
    try:
        cancel_all(jobs)
        waiting = [j for j in jobs if j._refresh_from_file() is not State.GENERATED]
        grace = max(cancel_grace(j.manifest.get("options") or {}, j.mode.settings) for j in jobs)
        try:
            wait_all(waiting, timeout=grace + CLOSE_MARGIN, progress=False)
        except TimeoutError as exc:
            import warnings

            warnings.warn(f"easylaunch: leaving the with block: {exc}", RuntimeWarning, stacklevel=3)
    finally:
        cleanup_all(jobs)


class _Progress:
    """A progress bar on a terminal, a line every 30 s otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total = total
        self.bar = None
        self.last_line = 0.0
        self.enabled = enabled and total > 0
        if self.enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("[bold]easylaunch[/]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                transient=False,
            )
            self.task = self.bar.add_task("", total=total)
            self.bar.start()

    def update(self, counts: Counter) -> None:
        if not self.enabled:
            return
        done = sum(n for s, n in counts.items() if s in TERMINAL_STATES)
        text = " ".join(f"{s.value.lower()}={n}" for s, n in sorted(counts.items()))
        if self.bar is not None:
            self.bar.update(self.task, completed=done, description=text)
        elif time.monotonic() - self.last_line > 30 or done == self.total:
            self.last_line = time.monotonic()
            print(f"easylaunch: {done}/{self.total} done ({text})", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


#: a poll is followed by a pause of at least this many times the CPU time it took
_POLL_SPACING = 20


def poll_spacing(mode: Any) -> float:
    """How many times its CPU time a backend poll of ``mode`` is followed by a pause: the mode's
    ``poll_spacing`` (smaller for modes whose runs use other machines' CPUs), else 20."""
    return float(getattr(mode, "poll_spacing", None) or _POLL_SPACING)


def wait_all(jobs: Sequence[Job], timeout: Optional[float] = None, progress: bool = True) -> None:
    """Poll until every job is terminal; raises TimeoutError naming how many are left."""
    if not jobs:
        return
    generated = [j for j in jobs if j._refresh_from_file() is State.GENERATED]
    if generated:
        raise JobError(
            f"{len(generated)} run(s) were only written, not submitted (state GENERATED), e.g. "
            f"{generated[0].run_dir}; submit them as the bundle's README says, then "
            "`easylaunch collect` the results",
            State.GENERATED,
            generated[0].run_dir,
        )
    deadline = None if timeout is None else time.monotonic() + timeout
    # Status files (only the unfinished ones are re-read) are polled often at first, so that a
    # short run is seen as soon as it ends; the pace is kept while runs keep finishing and
    # slows down gently (x1.25 per idle poll) up to the mode's poll_interval, and reading
    # never takes more than about 1/_POLL_SPACING of a CPU (the runs need it). The
    # backend (process liveness, sacct) is asked once per poll_interval, or less often when
    # its answer takes long (the mode's poll_spacing times the CPU time it took).
    max_interval = max(getattr(j.mode, "poll_interval", 1.0) for j in jobs[:1])
    spacing = poll_spacing(jobs[0].mode)
    interval = min(0.01, max_interval)
    backend_due = time.monotonic() + max_interval
    scan_cost = 0.0
    bar = None
    waited = False
    try:
        pending = list(jobs)
        while True:
            began = time.monotonic()
            began_cpu = time.thread_time()  # CPU time: a poll preempted by the runs is not slow
            ask_backend = began >= backend_due
            refresh_states(pending, backend=ask_backend)
            still = [j for j in pending if j._run_state not in TERMINAL_STATES]
            progressed = len(still) < len(pending)
            pending = still
            if bar is None and pending:
                bar = _Progress(len(jobs), progress and len(jobs) > 1)
            if bar is not None:
                bar.update(Counter(j._run_state for j in jobs))
            if not pending:
                if waited:
                    # runs ended while we waited: let each backend release what it still holds
                    # (containers); a wait on runs that had ended already costs nothing
                    for _name, group in _by_mode(jobs).items():
                        group[0].mode.cleanup(group)
                return
            waited = True
            now = time.monotonic()
            cost = time.thread_time() - began_cpu
            if ask_backend:
                backend_due = now + max(max_interval, spacing * cost)
            else:
                scan_cost = cost
            if deadline is not None and now >= deadline:
                raise WaitTimeout(f"{len(pending)} of {len(jobs)} run(s) still unfinished after {timeout} s")
            if not progressed:
                interval = min(max_interval, interval * 1.25)
            pause = max(interval, _POLL_SPACING * scan_cost)
            time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - now)))
    finally:
        if bar is not None:
            bar.close()


class Sweep(list):
    """The Jobs of one launch, in variant order, with batch operations."""

    def wait(self, timeout: Optional[float] = None, progress: bool = True) -> Sweep:
        """Wait for every run (progress display on a terminal); returns self."""
        wait_all(self, timeout=timeout, progress=progress)
        return self

    def states(self) -> List[State]:
        """Current state of each run (one backend poll for all)."""
        refresh_states(self)
        return [j._run_state for j in self]  # type: ignore[misc]

    def results(self, timeout: Optional[float] = None, return_exceptions: bool = False) -> List[Any]:
        """Wait, then the results in order; the first failure is raised unless ``return_exceptions``."""
        self.wait(timeout)
        out = []
        for job in self:
            try:
                out.append(job.result())
            except BaseException as exc:
                if not return_exceptions:
                    raise
                out.append(exc)
        return out

    def cancel(self) -> None:
        """Cancel every unfinished run."""
        cancel_all(self)

    def close(self) -> None:
        """Stop every unfinished run and release what the backends hold; see :func:`close_all`."""
        close_all(self)

    def __enter__(self) -> Sweep:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        """Leaving ``with run_sweep(...) as sweep:`` closes every run (:meth:`close`)."""
        close_all(self)
        return False

    def to_frame(self) -> Any:
        """A pandas DataFrame: run, state, one column per (dotted) variant key, result."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("to_frame() needs pandas: pip install pandas") from exc
        rows = []
        for job, state in zip(self, self.states()):
            row: Dict[str, Any] = {"run": job.run_dir.name, "state": state.value}
            row.update(_flatten(job.variant))
            row["result"] = job.result() if state is State.COMPLETED else None
            rows.append(row)
        return pd.DataFrame(rows)

    def counts(self) -> Counter:
        """How many runs are in each state, by state name."""
        return Counter(state.value for state in self.states())


def find_runs(exp_dir: Path) -> List[Path]:
    """Run directories directly inside ``exp_dir``, oldest first."""
    if not exp_dir.is_dir():
        return []
    return sorted(p for p in exp_dir.iterdir() if p.is_dir() and records.is_run_dir(p))


def load_experiment(exp_name: str, base_log_dir: Optional[str] = None) -> Sweep:
    """All runs of an experiment (every launch of it), oldest first.

    ``load_experiment("demo").to_frame()`` gives a pandas DataFrame (when pandas is installed).
    """
    from .config import load_settings, log_root

    exp_dir = log_root(base_log_dir, load_settings()) / exp_name
    if not exp_dir.is_dir():
        raise FileNotFoundError(f"no experiment {exp_name!r} under {exp_dir.parent}")
    watcher = _Watcher()  # one for the whole experiment, should its Future side be used
    return Sweep(Job.load(p, _watcher=watcher) for p in find_runs(exp_dir))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _code_sources(manifest: dict) -> List[str]:
    """The code dirs a run's manifest names: its snapshot's roots, else its git directories,
    else the directory it was launched from."""
    roots = [str(r) for r in ((manifest.get("code_snapshot") or {}).get("roots") or []) if r]
    roots = roots or [str(g["directory"]) for g in manifest.get("git") or [] if g.get("directory")]
    return roots or ([str(manifest["cwd"])] if manifest.get("cwd") else [])


def _add_run_code_to_path(run_dir: Path) -> bool:
    """Put the code the run ran with at the end of ``sys.path`` (its snapshot, unpacked once per
    content, else its recorded import roots that still exist); True if anything was added.
    Nothing already imported is replaced: only what fails to import here comes from there."""
    from . import payload, snapshot

    path = run_dir / records.PAYLOAD
    try:
        header = payload.read_header(path)
    except Exception:
        return False
    info = header.get("snapshot") or header.get("kept_snapshot")
    entries: List[str] = []
    if info:
        try:
            entries = snapshot.import_paths(info, path)
        except (OSError, snapshot.SnapshotError):
            entries = []
    entries += [p for p in header.get("sys_path") or [] if os.path.isdir(p)]
    added = [p for p in entries if p not in sys.path]
    sys.path.extend(added)
    if added:
        import importlib

        importlib.invalidate_caches()
    return bool(added)
