"""The one entry point that executes a run on any target.

    python -m easylaunch.runner RUN_DIR/payload.pkl [--wait-go] [--quiet]

It loads the payload (refusing a Python/cloudpickle mismatch of a by-value payload; a
by-reference one imports the function from the code snapshot on any Python 3.8+), builds the
DoodadConfig for where it runs (``base_log_dir`` = the payload's directory), tees the
function's stdout and stderr into the run directory, records every state transition in ``status.json``, and writes
``result.pkl`` or the traceback. SIGTERM/SIGINT are recorded as CANCELLED, SIGUSR2 (sent by a
scheduler before the time limit) as TIMEOUT.

A run's own time limit (option ``timeout``, in the payload header's ``extra``) is kept by a
:class:`Watchdog` armed when the function starts: at the deadline the function is interrupted
as by SIGUSR2 (its ``checkpoint()`` hook runs first, see :mod:`easylaunch.taskrunner`), and if
it has not returned ``cancel_grace`` seconds later (a C call that blocks signals, a function
that swallows the exception) the watchdog records TIMEOUT itself and kills the run's processes.

A cancel that took effect wins: once ``cancel.requested`` exists, the runner records CANCELLED
instead of COMPLETED or FAILED (the return value is discarded; error.json keeps the exception).

Exit codes: 0 completed, 1 the function raised (a Command: its own code), 2 payload refused,
3 launcher vanished,
128+N killed by signal N.
"""

from __future__ import annotations

import errno
import io
import math
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, List, Optional

from . import context, records, txlog
from .procs import process_token
from .spec import DoodadConfig, FunctionExit, State

SIGNAL_STATES = {
    signal.SIGTERM: State.CANCELLED,
    signal.SIGINT: State.CANCELLED,
    signal.SIGUSR2: State.TIMEOUT,
}

#: errors of a log dir that cannot be written (full, over quota, read-only, failing)
_DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO)


#: the environment variable that names the running payload (set for the function and what it starts)
PAYLOAD_ENV = "EASYLAUNCH_PAYLOAD"
#: seconds a run gets to stop after a cancel (SIGTERM) or its timeout before it is killed
DEFAULT_CANCEL_GRACE = 10.0
#: seconds between two resource samples (option ``monitor``; 0 turns monitoring off)
DEFAULT_MONITOR_PERIOD = 1.0


class RunInterrupted(BaseException):
    """Raised inside the function when the runner receives a stop signal (or its timeout)."""

    def __init__(self, signum: int, timeout: Optional[float] = None):
        if timeout is not None:
            super().__init__(f"timeout of {timeout:g} s reached")
        else:
            super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.state = SIGNAL_STATES[signum]
        #: the run's own time limit when that is what stopped it
        self.timeout = timeout


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
        self.path = path
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

    def write_direct(self) -> bool:
        """From now on the descriptor writes into the log file itself (the pipe is drained and
        the tee thread ends); True if it echoed, so that someone else (the watchdog) follows
        the log to echo it. Writes then reach the log even while the interpreter is stuck."""
        if self.thread is None:
            return False
        os.dup2(self.log_fd, self.fd)
        self.thread.join(timeout=1.0)  # a child holding the pipe keeps the thread: it still works
        if not self.thread.is_alive():
            self.thread = None
            if self.read_fd is not None:
                os.close(self.read_fd)
                self.read_fd = None
        return True

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


def dumps_outcome(obj: Any) -> bytes:
    """Pickle a result or exception for the launcher to read: cloudpickle where it is present
    (by-value runs always have it), plain pickle otherwise (a by-reference run on an image
    without it); protocol 5 at most, which every Python 3.8+ reads."""
    import pickle

    protocol = min(pickle.HIGHEST_PROTOCOL, 5)
    try:
        import cloudpickle
    except ImportError:
        return pickle.dumps(obj, protocol=protocol)
    return cloudpickle.dumps(obj, protocol=protocol)


def record_failure(run_dir: Path, exc: BaseException, state: State, exit_code: int, **fields: Any) -> None:
    """Write error.json (+ exception.pkl when picklable) and the final status (plus ``fields``)."""
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
            records.atomic_write_bytes(run_dir / records.EXCEPTION, dumps_outcome(exc))
        except Exception:
            pass
    records.write_status(
        run_dir,
        state,
        ended=time.time(),
        exit_code=exit_code,
        message=f"{type(exc).__name__}: {exc}",
        **fields,
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
        if not self.log.closed:
            self.log.flush()
        self.stream.flush()

    def close(self) -> None:
        """Close the log file (the wrapped stream is not ours); io's finalizer calls it too."""
        if not self.closed:
            self.flush()
            self.log.close()
            super().close()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


class Watchdog:
    """A run's ``timeout``: interrupts the function at the deadline, kills it ``grace`` s later.

    Armed when the function starts (``deadline = monotonic() + timeout``, computed once: no
    drift). In a runner process (``in_process=False``) it is a forked process, so that it works
    even when the function holds the interpreter (a C call): at the deadline it sends SIGUSR2 to
    the run; if the run is still there ``grace`` s later it stops the run's processes, copies
    what is left in the output pipes into the logs, records TIMEOUT (through
    :mod:`easylaunch.transitions`, never over an outcome) and kills them
    (:func:`easylaunch.procs.kill_run`). For in-process runs (``here_no_doodad``) it is a thread
    that interrupts the main thread and, after ``grace``, records TIMEOUT: it never kills the
    caller's process.
    """

    def __init__(self, run_dir: Path, timeout: float, grace: float, tees: list, in_process: bool):
        self.run_dir = run_dir
        self.timeout = float(timeout)
        self.grace = float(grace)
        self.deadline = time.monotonic() + self.timeout
        self.in_process = in_process
        #: (log file, echo target) pairs the watchdog process echoes while it runs: an echoing
        #: tee's pipe and thread would lose what they hold when the run is killed
        self.follow = [] if in_process else [(t.path, t.orig_fd) for t in tees if t.write_direct()]
        self.pid: Optional[int] = None
        self.done_fd: Optional[int] = None
        self.event: Optional[threading.Event] = None
        #: the in-process backstop recorded TIMEOUT: the function's late outcome is not recorded
        self.recorded = False

    def expired(self) -> bool:
        """True once the deadline has passed (a SIGUSR2 after it is the timeout's)."""
        return time.monotonic() >= self.deadline

    def start(self, can_interrupt: bool) -> "Watchdog":
        if self.in_process:
            self.event = threading.Event()
            main = threading.main_thread().ident if can_interrupt else None
            threading.Thread(
                target=self._thread, args=(main,), name="easylaunch-timeout", daemon=True
            ).start()
            return self
        read_fd, write_fd = os.pipe()
        _flush_std()
        offsets = [os.stat(path).st_size for path, _ in self.follow]
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the watchdog process
            try:
                os.close(write_fd)
                self._process(os.getppid(), read_fd, offsets)
            finally:
                os._exit(0)
        os.close(read_fd)
        self.pid, self.done_fd = pid, write_fd
        return self

    def stop(self) -> None:
        """The run is over (its outcome recorded): the watchdog ends at once."""
        if self.event is not None:
            self.event.set()
        if self.done_fd is not None:
            try:
                os.write(self.done_fd, b"x")  # a byte, not EOF: the function's children may hold the pipe
                os.close(self.done_fd)
            except OSError:
                pass
            self.done_fd = None
        if self.pid is not None:
            try:
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.pid = None

    def _message(self) -> str:
        return (
            f"timeout of {self.timeout:g} s reached; the function did not stop within {self.grace:g} s "
            "of the interrupt"
        )

    def _thread(self, main: Optional[int]) -> None:
        event = self.event
        assert event is not None
        if _wait_until(lambda left: event.wait(left), self.deadline):
            return
        if main is not None:
            signal.pthread_kill(main, signal.SIGUSR2)
        if _wait_until(lambda left: event.wait(left), self.deadline + self.grace):
            return
        from . import transitions

        # the caller's process is not ours to kill: the run is recorded, the call goes on
        self.recorded = True
        transitions.settle(self.run_dir, State.TIMEOUT, self._message() + " (it runs on in this process)")

    def _process(self, parent: int, done_fd: int, offsets: List[int]) -> None:  # pragma: no cover
        import select

        # hold no write end of the run's output (its readers see EOF when the run ends)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        follow = [(os.open(path, os.O_RDONLY), out) for path, out in self.follow]
        for (fd, _out), offset in zip(follow, offsets):
            os.lseek(fd, offset, os.SEEK_SET)

        def echo() -> None:
            for fd, out in follow:
                while True:
                    data = os.read(fd, 65536)
                    if not data:
                        break
                    try:
                        os.write(out, data)
                    except OSError:
                        break

        for sig in SIGNAL_STATES:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, list(SIGNAL_STATES))
        os.setpgid(0, 0)  # out of the run's process group, which the backstop kills
        watched = [done_fd]
        try:
            watched.append(os.pidfd_open(parent))  # type: ignore[attr-defined]
        except (AttributeError, OSError):
            pass

        def wait(left: float) -> bool:
            if follow:
                left = min(left, 0.02)  # the echo's pace
            elif len(watched) == 1:  # no pidfd (Python 3.8, old kernels): notice the parent's end
                left = min(left, 1.0)
            ready = select.select(watched, [], [], left)[0]
            echo()
            return bool(ready) or os.getppid() != parent

        if _wait_until(wait, self.deadline):
            return
        try:
            os.kill(parent, signal.SIGUSR2)
        except ProcessLookupError:
            return
        if _wait_until(wait, self.deadline + self.grace):
            return
        from . import procs, transitions

        procs.kill_run(parent, signal.SIGSTOP, spare=os.getpid())
        echo()  # the last of what the run wrote, before its record
        transitions.settle(
            self.run_dir,
            State.TIMEOUT,
            self._message() + ", so its processes were killed (SIGKILL)",
            exit_code=128 + signal.SIGKILL,
        )
        procs.kill_run(parent, signal.SIGKILL, spare=os.getpid())


def _wait_until(wait: Callable[[float], bool], deadline: float) -> bool:
    """Call ``wait(seconds_left)`` until it returns True (-> True) or ``deadline`` passes (-> False)."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if wait(left):
            return True


def _default_hook() -> Callable[..., Optional[int]]:
    """The checkpoint hook of a plain runner: as a packed task's, with no requeue budget."""
    from .environments import detect
    from .taskrunner import make_checkpoint_hook

    return make_checkpoint_hook(0, detect())


def _cancel_requested(run_dir: Path) -> bool:
    return (run_dir / records.CANCEL_MARK).exists()


def execute(
    run_dir: Path,
    load: Callable[[], tuple],
    echo: bool = True,
    capture: str = "fd",
    reraise: bool = False,
    on_interrupt: Optional[
        Callable[[Path, Callable, DoodadConfig, Any, "RunInterrupted"], Optional[int]]
    ] = None,
) -> int:
    """Run one payload in this process and record everything; returns the exit code.

    ``load`` returns ``(function, DoodadConfig, variant)`` or ``(function, DoodadConfig, variant,
    extra)`` where ``extra`` is the payload header's ``extra`` (``timeout``, ``cancel_grace``);
    it is called after output capture starts so that import errors land in stderr.log and
    error.json. ``capture`` is ``"fd"`` (descriptor-level tee, for runner processes: the run has
    a process of its own), ``"python"`` (sys.stdout/sys.stderr only, for in-process runs) or
    ``"none"``. ``reraise`` re-raises the function's exception after recording it (in-process
    debugging; a timeout is re-raised as TimeoutError). ``on_interrupt(run_dir, fn, config,
    variant, exc)`` may take over a stop signal (checkpoint + requeue on Slurm): it returns an
    exit code once it has recorded the state itself, or None to record the signal's state as
    usual; by default the packed task runner's hook with no requeue budget (a checkpoint at the
    timeout is saved as the new payload).
    """
    run_dir = Path(run_dir)
    if (run_dir / records.CANCEL_MARK).exists():
        from . import transitions

        transitions.cancelled_before_start(run_dir)
        return 128 + signal.SIGTERM
    previous = records.read_status(run_dir)
    pid = os.getpid()
    host = records.hostname()
    records.write_status(
        run_dir,
        State.RUNNING,
        attempt=int(previous.get("attempt", 0)) + 1,
        host=host,
        **txlog.worker_identity(host),  # worker and slot, for the transaction log
        pid=pid,
        pid_token=process_token(pid),
        python="%d.%d" % sys.version_info[:2],  # which Python wrote result.pkl / exception.pkl
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

    monitor: Any = None
    lease: Any = None  # the GPU held for the run (option gpus=), released when it ends
    succeeded = False
    #: what the final status record adds: {"resources": the monitor's summary}
    final: dict = {}

    def settle() -> None:
        # every byte of output reaches the logs BEFORE a final state is recorded: a reader
        # that sees the state must find the complete stdout.log/stderr.log
        nonlocal monitor, lease
        if lease is not None:
            answer = lease.release(failed=not succeeded)
            lease = None
            if answer.get("peak") is not None:
                final["gpu_peak_bytes"] = answer["peak"]
        if monitor is not None:
            final["resources"] = monitor.stop()
            monitor = None
        _flush_std()
        while tees:
            tees.pop().close()

    entered = None  # easylaunch.current() while the function (and its checkpoint hook) runs
    watchdog: Optional[Watchdog] = None
    try:
        try:
            if old_handlers:
                # a forking parent (the Slurm task runner) may have blocked the stop signals
                # until now, so that none is lost before the handlers above were in place
                signal.pthread_sigmask(signal.SIG_UNBLOCK, list(SIGNAL_STATES))
            loaded = load()
            fn, config, variant = loaded[:3]
            extra = loaded[3] if len(loaded) > 3 else None
            config = config._replace(base_log_dir=str(run_dir))
            if extra and extra.get("gpu"):
                lease = _gpu_lease(run_dir, extra["gpu"])
                config = config._replace(use_gpu=True, gpu_id=lease.gpu)
            entered = context.enter(config)
            # an echoing tee's pipe loses what it holds when the run dies at once (os._exit, a
            # segfault): a watchdog process then follows the logs instead, timeout or not
            echoing = any(t.thread is not None for t in tees)
            if (extra and extra.get("timeout")) or echoing:
                watchdog = Watchdog(
                    run_dir,
                    (extra or {}).get("timeout") or math.inf,
                    (extra or {}).get("cancel_grace") or DEFAULT_CANCEL_GRACE,
                    tees,
                    in_process=capture != "fd",
                ).start(can_interrupt=bool(old_handlers))
            period = (extra or {}).get("monitor", DEFAULT_MONITOR_PERIOD)
            if period:
                from .monitor import start as start_monitor

                spare = [watchdog.pid] if watchdog is not None and watchdog.pid else []
                monitor = start_monitor(run_dir, period, spare)
            try:
                result = fn(config, variant)
            except SystemExit as exit_exc:
                if exit_exc.code is not None and exit_exc.code != 0:
                    raise FunctionExit(exit_exc.code).with_traceback(exit_exc.__traceback__) from None
                result = None  # sys.exit(0) / sys.exit(): success, as for a script
            succeeded = True
        except RunInterrupted as exc:
            _flush_std()
            if watchdog is not None and exc.signum == signal.SIGUSR2 and watchdog.expired():
                exc = RunInterrupted(exc.signum, watchdog.timeout).with_traceback(exc.__traceback__)
            if "fn" in locals():
                # still captured: what checkpoint() prints belongs in the run's logs
                code = (on_interrupt or _default_hook())(run_dir, fn, config, variant, exc)
                if code is not None:
                    settle()
                    _add_to_status(run_dir, final)
                    return code
            settle()
            if watchdog is None or not watchdog.recorded:
                record_failure(run_dir, exc, exc.state, 128 + exc.signum, **final)
            if reraise:
                if exc.timeout is not None:
                    raise TimeoutError(str(exc)) from exc
                raise KeyboardInterrupt(str(exc)) from exc
            return 128 + exc.signum
        except BaseException as exc:  # the function's own failure (sys.exit(N) as FunctionExit)
            if type(exc).__name__ == "CommandFailed":  # its stderr is in the log already
                print("easylaunch: " + str(exc).split("\n")[0], file=sys.stderr)
            else:
                traceback.print_exc()
            settle()
            code = _exit_code_of(exc)
            if watchdog is None or not watchdog.recorded:
                record_failure(run_dir, exc, State.FAILED, code, **final)
                if _cancel_requested(run_dir):
                    _record_cancelled(run_dir, f"then the function raised {type(exc).__name__}: {exc}")
            if reraise:
                raise
            return code
        settle()
        if watchdog is not None and watchdog.recorded:
            _add_to_status(run_dir, final)
            return 128 + signal.SIGUSR2  # the timeout was recorded while the function ran on
        if _cancel_requested(run_dir):
            # the cancel took effect before the outcome: the run never ends COMPLETED after it
            _record_cancelled(run_dir, "the function returned after it; its result was discarded", **final)
            return 128 + signal.SIGTERM
        try:
            records.atomic_write_bytes(run_dir / records.RESULT, dumps_outcome(result))
        except Exception as exc:
            exc2 = TypeError(f"the function returned an object that cannot be pickled: {exc}")
            record_failure(run_dir, exc2, State.FAILED, 1, **final)
            return 1
        records.write_status(run_dir, State.COMPLETED, ended=time.time(), exit_code=0, **final)
        return 0
    finally:
        context.leave(entered)
        if watchdog is not None:
            watchdog.stop()
        settle()
        if capture == "python":
            for stream in (sys.stdout, sys.stderr):
                stream.close()
        if capture != "none":
            sys.stdout, sys.stderr = saved_streams
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)


def _gpu_lease(run_dir: Path, request: dict) -> Any:
    """Wait for the log dir's GPU broker to give this run a GPU (option ``gpus=``); the run's
    children see only it (``CUDA_VISIBLE_DEVICES``), its status names it."""
    from . import gpu_broker

    def waiting(reason: str) -> None:
        why = "another run of its type measures its GPU memory" if reason == "profile" else "no GPU has room"
        print(f"easylaunch: waiting for a GPU ({why})", file=sys.stderr, flush=True)

    lease = gpu_broker.acquire(
        Path(request["dir"]),
        request["type"],
        request.get("gpus"),
        request.get("policy") or "pack",
        waiting,
        start=request.get("start", True),  # a container's runner uses the host's broker
    )
    os.environ["CUDA_VISIBLE_DEVICES"] = str(lease.gpu)
    records.write_status(
        run_dir,
        State.RUNNING,
        gpu={
            "id": lease.gpu,
            "reserved_bytes": lease.nbytes,
            "profiling": lease.profiling,
            "type": request["type"],
            "waited": round(lease.waited, 3),
        },
    )
    return lease


def _exit_code_of(exc: BaseException) -> int:
    """1 for a function's exception; a Command's own exit code (CommandFailed.exit_code), the
    code the function passed to sys.exit() (FunctionExit.exit_code)."""
    code = getattr(exc, "exit_code", None)
    if (isinstance(exc, FunctionExit) or type(exc).__name__ == "CommandFailed") and (
        isinstance(code, int) and 0 < code < 256
    ):
        return code
    return 1


def _record_cancelled(run_dir: Path, what: str, **fields: Any) -> None:
    records.write_status(
        run_dir,
        State.CANCELLED,
        ended=time.time(),
        exit_code=128 + signal.SIGTERM,
        message=f"cancelled: a cancel was requested while the run went on, and {what}",
        **fields,
    )


def _add_to_status(run_dir: Path, fields: dict) -> None:
    """Merge ``fields`` into a status another writer already settled (same state kept)."""
    if fields:
        status = records.read_status(run_dir)
        records.write_status(run_dir, status.get("state") or State.RUNNING, **fields)


def load_payload_run(path: Path, header: Optional[dict] = None) -> tuple:
    """:func:`load_payload_file` plus the header's ``extra`` (timeout, cancel_grace), as
    :func:`execute`'s ``load`` returns it."""
    from . import payload

    if header is None:
        header = payload.read_header(path)
        payload.check_versions(header)
    return (*load_payload_file(path, header), header.get("extra") or {})


def load_payload_file(path: Path, header: Optional[dict] = None) -> tuple[Callable, DoodadConfig, Any]:
    """Read, version-check and unpickle a payload file (``header``: already read and checked)."""
    from . import payload

    if header is None:
        header = payload.read_header(path)
        payload.check_versions(header)
    for entry in reversed(header.get("sys_path") or []):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    # the run's payload, for what the function starts (a Command finds the code's copy by it)
    os.environ[PAYLOAD_ENV] = str(Path(path).resolve())
    info = header.get("snapshot")
    if info:
        from . import snapshot

        snapshot.activate(info, path)
    loaded = payload.load_callable(header, Path(path).parent)
    files = header.get("code_files")
    if files:
        copy_of = None
        if info:
            from . import snapshot

            def copy_of(file: str) -> Optional[str]:
                return snapshot.copy_of(info, path, file)

        payload.prime_source_lines(files, copy_of)
    return loaded


def main(argv: Optional[list[str]] = None) -> int:
    """Command-line entry: ``python -m easylaunch.runner PAYLOAD [--wait-go] [--quiet] [--from-pack PACK]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--tasks" in args:
        from .taskrunner import main as tasks_main

        return tasks_main(args)
    wait_go = "--wait-go" in args
    quiet = "--quiet" in args
    pack: Optional[str] = None
    wants_pack = "--from-pack" in args
    if wants_pack:  # a bundle's run: its directory is made from the pack first
        at = args.index("--from-pack")
        pack = args[at + 1] if at + 1 < len(args) else None
        args = args[:at] + args[at + 2 :]
    paths = [a for a in args if not a.startswith("--")]
    if len(paths) != 1 or (wants_pack and not pack):
        print(
            "usage: python -m easylaunch.runner PAYLOAD [--wait-go] [--quiet] [--from-pack PACK]",
            file=sys.stderr,
        )
        return 2
    payload_path = Path(paths[0]).resolve()
    run_dir = payload_path.parent
    if pack:
        from .packs import PackError, unpack_runs

        try:
            unpack_runs(Path(pack), [run_dir])
        except (PackError, OSError) as exc:
            print(f"easylaunch runner: {exc}", file=sys.stderr)
            return 2
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
    try:
        return execute(run_dir, lambda: load_payload_run(payload_path, header), echo=not quiet)
    except OSError as exc:
        if exc.errno not in _DISK_ERRORS:
            raise
        # the run's logs may be on the same full disk: say it where the starter keeps our stderr,
        # and exit with the code the launcher-side record names
        from .transitions import RECORDS_UNWRITABLE

        try:
            print(f"easylaunch runner: cannot write the records of {run_dir}: {exc}", file=sys.__stderr__)
        except (OSError, ValueError, AttributeError):  # that stream is on the full disk too, or closed
            pass
        return RECORDS_UNWRITABLE


if __name__ == "__main__":
    sys.exit(main())
