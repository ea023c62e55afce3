"""The one entry point that executes a run on any target.

    python -m easylaunch.runner RUN_DIR/payload.pkl [--wait-go] [--quiet]

It loads the payload (refusing a Python/cloudpickle mismatch), builds the DoodadConfig for
where it runs (``base_log_dir`` = the payload's directory), tees the function's stdout and
stderr into the run directory, records every state transition in ``status.json``, and writes
``result.pkl`` or the traceback. SIGTERM/SIGINT are recorded as CANCELLED, SIGUSR2 (sent by a
scheduler before the time limit) as TIMEOUT.

Exit codes: 0 completed, 1 the function raised, 2 payload refused, 3 launcher vanished,
128+N killed by signal N.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

from . import records
from .procs import process_token
from .spec import DoodadConfig, State

SIGNAL_STATES = {
    signal.SIGTERM: State.CANCELLED,
    signal.SIGINT: State.CANCELLED,
    signal.SIGUSR2: State.TIMEOUT,
}


class RunInterrupted(BaseException):
    """Raised inside the function when the runner receives a stop signal."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.state = SIGNAL_STATES[signum]


def _raise_interrupt(signum: int, frame: Any) -> None:
    # one stop is enough: later signals (scancel signals every process, the task master
    # forwards too) must not interrupt the recording of this one
    for sig in SIGNAL_STATES:
        signal.signal(sig, signal.SIG_IGN)
    raise RunInterrupted(signum)


class FdTee:
    """Route a file descriptor through a pipe into a log file (and, if ``echo``, the old target).

    Works at the descriptor level, so output of C extensions and child processes is captured.
    """

    def __init__(self, fd: int, path: Path, echo: bool):
        self.fd = fd
        self.echo = echo
        self.log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.orig_fd = os.dup(fd)
        self.read_fd: Optional[int] = None
        self.thread: Optional[threading.Thread] = None
        if not echo:
            # nothing to copy anywhere else: point the descriptor at the log file itself
            # (same bytes in the log, no pipe and no thread; matters for many short runs)
            os.dup2(self.log_fd, fd)
            return
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, fd)
        os.close(write_fd)
        self.read_fd = read_fd
        self.thread = threading.Thread(target=self._pump, name=f"easylaunch-tee-{fd}", daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        echo = self.echo
        while True:
            try:
                data = os.read(self.read_fd, 65536)
            except OSError:
                break
            if not data:
                break
            os.write(self.log_fd, data)
            if echo:
                try:
                    os.write(self.orig_fd, data)
                except OSError:
                    echo = False

    def close(self) -> None:
        """Restore the descriptor and drain what is left in the pipe."""
        os.dup2(self.orig_fd, self.fd)
        if self.thread is not None:
            self.thread.join(timeout=5.0)
        for fd in (self.read_fd, self.orig_fd, self.log_fd):
            if fd is None:
                continue
            try:
                os.close(fd)
            except OSError:
                pass


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def _streams_to_fds() -> None:
    """Make sys.stdout/sys.stderr write to descriptors 1/2, which the FdTee captures.

    A forked run (local_pool) inherits the launcher's streams, which need not be the
    descriptors: a notebook's or a test runner's streams write elsewhere.
    """
    for name, fd in (("stdout", 1), ("stderr", 2)):
        try:
            ok = getattr(sys, name).fileno() == fd
        except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation included
            ok = False
        if not ok:
            setattr(sys, name, open(fd, "w", buffering=1, encoding="utf-8", errors="replace", closefd=False))


def record_failure(run_dir: Path, exc: BaseException, state: State, exit_code: int) -> None:
    """Write error.json (+ exception.pkl when picklable) and the final status."""
    tb_text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    records.atomic_write_json(
        run_dir / records.ERROR,
        {
            "type": type(exc).__qualname__,
            "module": type(exc).__module__,
            "message": str(exc),
            "traceback": tb_text,
        },
    )
    if state is State.FAILED:
        try:
            import cloudpickle

            records.atomic_write_bytes(run_dir / records.EXCEPTION, cloudpickle.dumps(exc))
        except Exception:
            pass
    records.write_status(
        run_dir, state, ended=time.time(), exit_code=exit_code, message=f"{type(exc).__name__}: {exc}"
    )


class PyTee(io.TextIOBase):
    """Python-level tee of a text stream into a log file (for in-process runs)."""

    def __init__(self, stream: Any, path: Path):
        self.stream = stream
        self.log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")

    def write(self, text: str) -> int:
        self.log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.log.flush()
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


def execute(
    run_dir: Path,
    load: Callable[[], tuple[Callable, DoodadConfig, Any]],
    echo: bool = True,
    capture: str = "fd",
    reraise: bool = False,
    on_interrupt: Optional[
        Callable[[Path, Callable, DoodadConfig, Any, "RunInterrupted"], Optional[int]]
    ] = None,
) -> int:
    """Run one payload in this process and record everything; returns the exit code.

    ``load`` returns ``(function, DoodadConfig, variant)``; it is called after output capture
    starts so that import errors land in stderr.log and error.json. ``capture`` is ``"fd"``
    (descriptor-level tee, for runner processes), ``"python"`` (sys.stdout/sys.stderr only, for
    in-process runs) or ``"none"``. ``reraise`` re-raises the function's exception after
    recording it (in-process debugging). ``on_interrupt(run_dir, fn, config, variant, exc)`` may
    take over a stop signal (checkpoint + requeue on Slurm): it returns an exit code once it has
    recorded the state itself, or None to record the signal's state as usual.
    """
    run_dir = Path(run_dir)
    if (run_dir / records.CANCEL_MARK).exists():
        records.write_status(
            run_dir, State.CANCELLED, ended=time.time(), message="cancelled before it started"
        )
        return 128 + signal.SIGTERM
    previous = records.read_status(run_dir)
    pid = os.getpid()
    records.write_status(
        run_dir,
        State.RUNNING,
        attempt=int(previous.get("attempt", 0)) + 1,
        host=records.hostname(),
        pid=pid,
        pid_token=process_token(pid),
        started=time.time(),
        ended=None,
        exit_code=None,
        message=None,
    )
    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        old_handlers = {sig: signal.signal(sig, _raise_interrupt) for sig in SIGNAL_STATES}
    tees: list = []
    saved_streams = (sys.stdout, sys.stderr)
    if capture == "python":
        sys.stdout = PyTee(sys.stdout, run_dir / records.STDOUT)
        sys.stderr = PyTee(sys.stderr, run_dir / records.STDERR)
    elif capture == "fd":
        _flush_std()
        tees = [FdTee(1, run_dir / records.STDOUT, echo), FdTee(2, run_dir / records.STDERR, echo)]
        _streams_to_fds()
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, io.TextIOWrapper):
                stream.reconfigure(line_buffering=True)

    def settle() -> None:
        # every byte of output reaches the logs BEFORE a final state is recorded: a reader
        # that sees the state must find the complete stdout.log/stderr.log
        _flush_std()
        while tees:
            tees.pop().close()

    try:
        try:
            if old_handlers:
                # a forking parent (the Slurm task runner) may have blocked the stop signals
                # until now, so that none is lost before the handlers above were in place
                signal.pthread_sigmask(signal.SIG_UNBLOCK, list(SIGNAL_STATES))
            fn, config, variant = load()
            config = config._replace(base_log_dir=str(run_dir))
            result = fn(config, variant)
        except RunInterrupted as exc:
            _flush_std()
            if on_interrupt is not None and "fn" in locals():
                # still captured: what checkpoint() prints belongs in the run's logs
                code = on_interrupt(run_dir, fn, config, variant, exc)
                if code is not None:
                    settle()
                    return code
            settle()
            record_failure(run_dir, exc, exc.state, 128 + exc.signum)
            if reraise:
                raise KeyboardInterrupt(str(exc)) from exc
            return 128 + exc.signum
        except BaseException as exc:  # the function's own failure, SystemExit included
            traceback.print_exc()
            settle()
            record_failure(run_dir, exc, State.FAILED, 1)
            if reraise:
                raise
            return 1
        settle()
        try:
            import cloudpickle

            records.atomic_write_bytes(run_dir / records.RESULT, cloudpickle.dumps(result))
        except Exception as exc:
            exc2 = TypeError(f"the function returned an object that cannot be pickled: {exc}")
            record_failure(run_dir, exc2, State.FAILED, 1)
            return 1
        records.write_status(run_dir, State.COMPLETED, ended=time.time(), exit_code=0)
        return 0
    finally:
        settle()
        if capture == "python":
            for stream in (sys.stdout, sys.stderr):
                stream.log.close()  # type: ignore[attr-defined]
        if capture != "none":
            sys.stdout, sys.stderr = saved_streams
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


def load_payload_file(path: Path, header: Optional[dict] = None) -> tuple[Callable, DoodadConfig, Any]:
    """Read, version-check and unpickle a payload file (``header``: already read and checked)."""
    from . import payload

    if header is None:
        header = payload.read_header(path)
        payload.check_versions(header)
    for entry in reversed(header.get("sys_path") or []):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    if header.get("snapshot"):
        from . import snapshot

        snapshot.activate(header["snapshot"], path)
    return payload.load_callable(header, Path(path).parent)


def main(argv: Optional[list[str]] = None) -> int:
    """Command-line entry: ``python -m easylaunch.runner PAYLOAD [--wait-go] [--quiet]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--tasks" in args:
        from .taskrunner import main as tasks_main

        return tasks_main(args)
    wait_go = "--wait-go" in args
    quiet = "--quiet" in args
    paths = [a for a in args if not a.startswith("--")]
    if len(paths) != 1:
        print("usage: python -m easylaunch.runner PAYLOAD [--wait-go] [--quiet]", file=sys.stderr)
        return 2
    payload_path = Path(paths[0]).resolve()
    run_dir = payload_path.parent
    # imported before waiting for the go byte: cloudpickle is most of the runner's start-up
    from . import payload

    if wait_go:
        # the launcher starts us before the payload is written, to overlap our imports with its
        # git capture; it writes one byte on stdin when the payload is in place
        if not os.read(0, 1):
            records.write_status(
                run_dir,
                State.FAILED,
                ended=time.time(),
                exit_code=3,
                message="the launcher exited before the payload was written",
            )
            return 3

    try:
        header = payload.read_header(payload_path)
        payload.check_versions(header)
    except (payload.PayloadVersionError, OSError, EOFError) as exc:
        print(f"easylaunch runner: {exc}", file=sys.stderr)
        records.write_status(run_dir, State.FAILED, ended=time.time(), exit_code=2, message=str(exc))
        return 2
    return execute(run_dir, lambda: load_payload_file(payload_path, header), echo=not quiet)


if __name__ == "__main__":
    sys.exit(main())
