"""Job handles: state, wait, result, logs and cancel, rebuilt from a run directory alone.

job = run_experiment(fn, exp_name="demo", variant={"x": 1}, skip_wait=True)
job.wait()
job.result()                 # the return value, or re-raises the remote exception
job2 = Job.load(job.run_dir) # same run, from the directory alone (e.g. a new session)

sweep = run_sweep(fn, grid({"x": range(10)}), exp_name="demo", mode="local")
sweep.wait()                 # progress bar on a terminal
sweep.results()
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

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


class Job:
    """Handle on one run. Cheap to create; every property reads the run directory."""

    def __init__(self, run_dir: Path | str, mode: Any = None, _resolved: bool = False):
        self.run_dir = Path(run_dir) if _resolved else Path(run_dir).resolve()
        self._mode = mode
        self._manifest: Optional[dict] = None
        self._status: dict = {}
        self._state: Optional[State] = None

    # -- construction ----------------------------------------------------------------
    @classmethod
    def load(cls, run_dir: Path | str) -> Job:
        """Rebuild a handle from a run directory (raises FileNotFoundError if it is not one)."""
        job = cls(run_dir)
        job.manifest  # noqa: B018 - validates the directory
        return job

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

    def __repr__(self) -> str:
        return f"Job({self.run_dir.name!r}, state={self.state.value})"

    # -- state -----------------------------------------------------------------------
    def _refresh_from_file(self) -> State:
        if self._state is not None and self._state in TERMINAL_STATES:
            return self._state
        self._status = records.read_status(self.run_dir)
        raw = self._status.get("state", State.PENDING)
        self._state = State(raw)
        return self._state

    def _apply_backend(self, backend_state: Optional[State]) -> None:
        if backend_state is None or self._state in TERMINAL_STATES:
            return
        self._state = State(backend_state)

    @property
    def state(self) -> State:
        """Current state: the runner's status file, completed by the backend's view."""
        refresh_states([self])
        return self._state  # type: ignore[return-value]

    def done(self) -> bool:
        """True once the run reached a terminal state."""
        return self.state in TERMINAL_STATES

    def wait(self, timeout: Optional[float] = None) -> State:
        """Block until the run ends; TimeoutError after ``timeout`` seconds."""
        wait_all([self], timeout=timeout, progress=False)
        return self._state  # type: ignore[return-value]

    # -- outcome ---------------------------------------------------------------------
    def result(self, timeout: Optional[float] = None) -> Any:
        """Wait, then return the function's return value or re-raise its exception."""
        state = self.wait(timeout)
        if state is State.COMPLETED:
            import cloudpickle

            with open(self.run_dir / records.RESULT, "rb") as f:
                return cloudpickle.load(f)
        exc = self.exception()
        if exc is not None:
            raise exc
        raise JobError(f"run {self.run_dir} ended as {state.value}", state, self.run_dir)

    def exception(self, timeout: Optional[float] = None) -> Optional[BaseException]:
        """Wait, then return the remote exception (None if the run completed)."""
        state = self.wait(timeout)
        if state is State.COMPLETED:
            return None
        error = records.read_json(self.run_dir / records.ERROR)
        message = self._status.get("message") or f"ended as {state.value}"
        if state is not State.FAILED:
            return JobError(f"run {self.run_dir.name} {state.value}: {message}", state, self.run_dir)
        if error is None:
            return JobError(f"run {self.run_dir.name} FAILED: {message}", state, self.run_dir)
        exc: Optional[BaseException] = None
        try:
            import cloudpickle

            with open(self.run_dir / records.EXCEPTION, "rb") as f:
                exc = cloudpickle.load(f)
        except Exception:
            exc = None
        if not isinstance(exc, BaseException):
            exc = RemoteError(
                f"{error['type']}: {error['message']}\n\nRemote traceback:\n{error['traceback']}"
            )
        exc.__cause__ = RemoteTraceback(error["traceback"])
        return exc

    def stdout(self) -> str:
        """Everything the function printed to stdout so far."""
        return _read_text(self.run_dir / records.STDOUT)

    def stderr(self) -> str:
        """Everything the function printed to stderr so far."""
        return _read_text(self.run_dir / records.STDERR)

    def cancel(self) -> None:
        """Ask the run to stop; its state becomes CANCELLED once the runner has exited."""
        cancel_all([self])


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
        j for j in jobs if j._refresh_from_file() not in TERMINAL_STATES and j._state is not State.GENERATED
    ]
    if not backend:
        return
    for _name, group in _by_mode(unfinished).items():
        answers = group[0].mode.poll(group)
        for job in group:
            job._apply_backend(answers.get(job.run_dir))


def cancel_all(jobs: Sequence[Job]) -> None:
    """Cancel many jobs with one backend call per mode."""
    live = [j for j in jobs if not j.done()]
    for job in live:
        (job.run_dir / records.CANCEL_MARK).touch()
    for _name, group in _by_mode(live).items():
        group[0].mode.cancel(group)


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
    # its answer takes long.
    max_interval = max(getattr(j.mode, "poll_interval", 1.0) for j in jobs[:1])
    interval = min(0.01, max_interval)
    backend_due = time.monotonic() + max_interval
    scan_cost = 0.0
    bar = None
    try:
        pending = list(jobs)
        while True:
            began = time.monotonic()
            began_cpu = time.thread_time()  # CPU time: a poll preempted by the runs is not slow
            ask_backend = began >= backend_due
            refresh_states(pending, backend=ask_backend)
            still = [j for j in pending if j._state not in TERMINAL_STATES]
            progressed = len(still) < len(pending)
            pending = still
            if bar is None and pending:
                bar = _Progress(len(jobs), progress and len(jobs) > 1)
            if bar is not None:
                bar.update(Counter(j._state for j in jobs))
            if not pending:
                return
            now = time.monotonic()
            cost = time.thread_time() - began_cpu
            if ask_backend:
                backend_due = now + max(max_interval, _POLL_SPACING * cost)
            else:
                scan_cost = cost
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"{len(pending)} of {len(jobs)} run(s) still unfinished after {timeout} s")
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
        return [j._state for j in self]  # type: ignore[misc]

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
    return Sweep(Job.load(p) for p in find_runs(exp_dir))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
