"""Resource monitoring of a run's whole process tree, sampled on a drift-free schedule.

    mon = Monitor(run_dir, period=1.0).start()     # in the runner, when the function starts
    ...                                            # the function runs (children included)
    summary = mon.stop()   # {"samples": 12, "peak_rss_bytes": ..., "cpu_seconds": ..., ...}

Sample k is due at ``start + k * period`` (k = 1, 2, ...); a tick missed because the machine was
busy is skipped, not bunched (SystemSnoop's SmartSample), so the period never drifts. Each
sample is appended to ``resources.csv`` in the run directory as it is taken (a crash keeps what
was sampled): seconds since the start (``t``) and its due time (``due``), the tree's resident
memory (``rss_bytes``, summed over its processes), CPU percent of one core since the previous
sample (``cpu_percent``), disk bytes read and written (``read_bytes``, ``write_bytes``), the
number of processes (``nprocs``) and the GPU memory its processes use (``gpu_bytes``, through
NVML where ``nvidia-ml-py`` is installed, or :mod:`easylaunch.gpu_fake`'s injected usage).

A run shorter than one period takes no sample, and :meth:`Monitor.stop` adds what two system
calls give (CPU seconds of the run and its waited-for children, peak RSS of the largest
process). A run samples itself with a thread (:class:`Monitor`), unless a forking supervisor
(local_pool's, the Slurm task runner) samples all its children with one process beside it
(:class:`Hub`): the run then starts no thread at all (:func:`start` picks).

Where it reads: ``/proc`` on Linux (standard library only, a few small files per process),
else psutil when installed (``pip install easylaunch[monitor]``); with neither, monitoring is
off and the run's stderr says so once. Target-side code: Python 3.8+, standard library only.
"""

from __future__ import annotations

import _thread
import os
import sys
import threading
import time

try:  # a C extension: loaded with this module (imported before local_pool forks), not per run
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None  # type: ignore[assignment]
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Set, Tuple

CSV_NAME = "resources.csv"
COLUMNS = ("t", "due", "time", "rss_bytes", "cpu_percent", "read_bytes", "write_bytes", "nprocs", "gpu_bytes")
DEFAULT_PERIOD = 1.0


# -- process tree readers: pids -> (rss, cpu seconds, read bytes, write bytes) ----------------


class ProcReader:
    """Reads a process tree from ``/proc`` (Linux)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.tick = float(os.sysconf("SC_CLK_TCK"))
        self.children_files = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")

    @staticmethod
    def available() -> bool:
        return os.path.isdir(f"/proc/{os.getpid()}/task")

    def _children(self, pid: int) -> List[int]:
        out: List[int] = []
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return out
        for tid in tasks:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    out.extend(int(c) for c in f.read().split())
            except (OSError, ValueError):
                pass
        return out

    def _all_children(self) -> Dict[int, List[int]]:
        """ppid -> pids, from every /proc/N/stat (kernels without the children files)."""
        tree: Dict[int, List[int]] = {}
        for name in os.listdir("/proc"):
            if not name.isdigit():
                continue
            stat = self.stat(int(name))
            if stat is not None:
                tree.setdefault(int(stat[1]), []).append(int(name))
        return tree

    @staticmethod
    def stat(pid: int) -> Optional[List[bytes]]:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
        except OSError:
            return None
        # fields after the command name, which may hold spaces and parentheses: state is [0]
        return data[data.rindex(b")") + 2 :].split()

    def tree(self, root: int, exclude: Set[int]) -> List[int]:
        pids, todo = [], [root]
        table = None if self.children_files else self._all_children()
        while todo:
            pid = todo.pop()
            if pid in exclude:
                continue
            pids.append(pid)
            todo.extend(self._children(pid) if table is None else table.get(pid, []))
        return pids

    def sample(self, pids: Iterable[int]) -> Tuple[int, float, int, int, List[int]]:
        rss = read = write = 0
        cpu = 0.0
        seen = []
        for pid in pids:
            stat = self.stat(pid)
            if stat is None or stat[0] == b"Z":
                continue
            seen.append(pid)
            # utime stime cutime cstime (fields 14-17 of stat), rss (field 24) in pages
            cpu += sum(int(x) for x in stat[11:15]) / self.tick
            rss += int(stat[21]) * self.page
            try:
                with open(f"/proc/{pid}/io", "rb") as f:
                    for line in f:
                        if line.startswith(b"read_bytes:"):
                            read += int(line.split()[1])
                        elif line.startswith(b"write_bytes:"):
                            write += int(line.split()[1])
            except (OSError, ValueError):
                pass
        return rss, cpu, read, write, seen


class PsutilReader:
    """Reads a process tree through psutil (where there is no /proc)."""

    def __init__(self, psutil: Any) -> None:
        self.psutil = psutil

    def tree(self, root: int, exclude: Set[int]) -> List[int]:
        try:
            proc = self.psutil.Process(root)
            return [root] + [c.pid for c in proc.children(recursive=True) if c.pid not in exclude]
        except self.psutil.Error:
            return []

    def sample(self, pids: Iterable[int]) -> Tuple[int, float, int, int, List[int]]:
        rss = read = write = 0
        cpu = 0.0
        seen = []
        for pid in pids:
            try:
                p = self.psutil.Process(pid)
                with p.oneshot():
                    rss += p.memory_info().rss
                    t = p.cpu_times()
                    cpu += (
                        t.user + t.system + getattr(t, "children_user", 0) + getattr(t, "children_system", 0)
                    )
                    try:
                        io = p.io_counters()
                        read += io.read_bytes
                        write += io.write_bytes
                    except (AttributeError, self.psutil.Error):
                        pass
                seen.append(pid)
            except self.psutil.Error:
                continue
        return rss, cpu, read, write, seen


def make_reader() -> Optional[Any]:
    """The best process reader here, or None (monitoring off)."""
    if ProcReader.available():
        return ProcReader()
    try:
        import psutil
    except ImportError:
        return None
    return PsutilReader(psutil)


def gpu_source() -> Optional[Callable[[List[int]], int]]:
    """A function ``pids -> GPU bytes they use``: injected fake usage, NVML, or None."""
    if os.environ.get("EASYLAUNCH_FAKE_GPUS"):
        from . import gpu_fake

        return gpu_fake.usage_of
    import importlib.util

    if importlib.util.find_spec("pynvml") is None:
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        getters = (pynvml.nvmlDeviceGetComputeRunningProcesses, pynvml.nvmlDeviceGetGraphicsRunningProcesses)
    except Exception:
        return None

    def used(pids: List[int]) -> int:
        wanted = set(pids)
        total = 0
        for h in handles:
            for getter in getters:
                try:
                    for p in getter(h):
                        if p.pid in wanted and p.usedGpuMemory:
                            total += int(p.usedGpuMemory)
                except Exception:
                    pass
        return total

    return used


# -- the monitor ------------------------------------------------------------------------------


def next_tick(k: int, start: float, period: float, now: float) -> int:
    """The index of the next sample due after ``now`` (ticks already past are skipped)::

    next_tick(1, 0.0, 1.0, 0.5) == 1; next_tick(2, 0.0, 1.0, 4.2) == 5
    """
    late = int((now - start) // period) + 1
    return max(k, late)


class _Series:
    """The samples of one process tree: its schedule, its running peaks and its ``resources.csv``.

    ``cpu0``: the tree's CPU seconds at ``start`` (what the first sample's percent is measured
    from). Used by :class:`Monitor` (one series, its own thread) and :class:`Hub` (many).
    """

    def __init__(
        self,
        run_dir: Path,
        period: float,
        root: int,
        exclude: Set[int],
        start_mono: float,
        start_wall: float,
        cpu0: float,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.period = period
        self.root = root
        self.exclude = exclude
        self.start = start_mono
        self.start_wall = start_wall
        self.cpu0 = cpu0
        self.k = 1
        self.prev: Optional[Tuple[float, float]] = None
        self.samples = 0
        self.peak_rss = 0
        self.peak_gpu = 0
        self.cpu_sum = 0.0  # sum of cpu_percent over samples
        self.out: Optional[Any] = None

    def due(self) -> float:
        return self.start + self.k * self.period

    def take(self, reader: Any, gpu: Optional[Callable[[List[int]], int]]) -> None:
        """Take the sample that is due (call at or after :meth:`due`), append it, schedule the next."""
        now = time.monotonic()
        due = self.due()
        try:
            pids = reader.tree(self.root, self.exclude)
            rss, cpu, read, write, seen = reader.sample(pids)
            gpu_bytes = gpu(seen) if gpu is not None else 0
        except Exception:  # a process tree changes under us: skip that tick
            self.k = next_tick(self.k + 1, self.start, self.period, time.monotonic())
            return
        taken = time.monotonic()
        if self.prev is not None and taken > self.prev[0]:
            percent = max(0.0, (cpu - self.prev[1]) / (taken - self.prev[0]) * 100.0)
        else:
            percent = max(0.0, (cpu - self.cpu0) / max(taken - self.start, 1e-9) * 100.0)
        self.prev = (taken, cpu)
        self.samples += 1
        self.peak_rss = max(self.peak_rss, rss)
        self.peak_gpu = max(self.peak_gpu, gpu_bytes)
        self.cpu_sum += percent
        if self.out is None:
            path = self.run_dir / CSV_NAME
            new = not path.exists()
            self.out = open(path, "a", buffering=1)
            if new:
                self.out.write(",".join(COLUMNS) + "\n")
        self.out.write(
            "%.4f,%.4f,%.3f,%d,%.1f,%d,%d,%d,%d\n"
            % (
                now - self.start,
                due - self.start,
                self.start_wall + (now - self.start),
                rss,
                percent,
                read,
                write,
                len(seen),
                gpu_bytes,
            )
        )
        self.k = next_tick(self.k + 1, self.start, self.period, time.monotonic())

    def close(self) -> None:
        if self.out is not None:
            self.out.close()
            self.out = None


def _tree_cpu_now() -> float:
    """CPU seconds of this process and its waited-for children (what a series starts from)."""
    t = os.times()
    return t[0] + t[1] + t[2] + t[3]


def _summary(
    period: float, start_times: Any, samples: int, peak_rss: int, cpu_sum: float, peak_gpu: int
) -> Dict[str, Any]:
    end = os.times()
    cpu_seconds = sum(end[:4]) - sum(start_times[:4])
    summary: Dict[str, Any] = {
        "samples": samples,
        "period": period,
        "cpu_seconds": round(max(0.0, cpu_seconds), 3),
        "peak_rss_bytes": max(peak_rss, _max_rss()),
    }
    if samples:
        summary["mean_cpu_percent"] = round(cpu_sum / samples, 1)
        summary["peak_gpu_bytes"] = peak_gpu
    return summary


def _monitoring_off(reason: str) -> None:
    print(f"easylaunch: resource monitoring is off: {reason}", file=sys.stderr, flush=True)


OFF_REASON = "no /proc and no psutil (pip install 'easylaunch[monitor]')"


class Monitor:
    """Samples the process tree under ``root`` (default: this process) every ``period`` s.

    ``exclude``: pids (and their subtrees) left out, e.g. the runner's watchdog process.
    """

    def __init__(
        self,
        run_dir: Path,
        period: float = DEFAULT_PERIOD,
        root: Optional[int] = None,
        exclude: Iterable[int] = (),
    ) -> None:
        self.run_dir = Path(run_dir)
        self.period = float(period)
        self.root = root or os.getpid()
        self.exclude: Set[int] = set(exclude)
        self.series: Optional[_Series] = None
        self.event = threading.Event()
        self.thread: Optional[Any] = None  # the lock the sampling thread holds while it lives
        self.lock = threading.Lock()
        self.sampling = False  # set by the thread (under lock) once it passed its first tick
        self.start_mono = time.monotonic()
        self.start_times = os.times()
        self.off_reason: Optional[str] = None
        self.own_cpu = 0.0

    def start(self) -> "Monitor":
        self.start_mono = time.monotonic()
        self.start_times = os.times()
        self.series = _Series(
            self.run_dir,
            self.period,
            self.root,
            self.exclude,
            self.start_mono,
            time.time(),
            sum(self.start_times[:4]),
        )
        # a bare thread, not threading.Thread: start() would wait for it to be scheduled and a
        # join for it to end, ~1-4 ms each in a forked child, for runs that mostly end before
        # their first sample (forking supervisors sample their children through a Hub instead)
        alive = _thread.allocate_lock()
        alive.acquire()
        self.thread = alive
        _thread.start_new_thread(self._run, (alive,))
        return self

    def _run(self, alive: Any) -> None:
        try:
            self._loop()
        finally:
            alive.release()

    def _loop(self) -> None:
        series, event = self.series, self.event
        assert series is not None
        # nothing happens before the first tick: a run shorter than one period pays nothing
        if event.wait(series.due() - time.monotonic()):
            return
        with self.lock:  # stop() waits for a thread that sampled, never for one that did not
            if event.is_set():
                return
            self.sampling = True
        reader = make_reader()
        if reader is None:
            self.off_reason = OFF_REASON
            _monitoring_off(self.off_reason)
            return
        gpu = gpu_source()
        try:
            while True:
                wait = series.due() - time.monotonic()
                if wait > 0 and event.wait(wait):
                    return
                series.take(reader, gpu)
        finally:
            series.close()
            self.own_cpu = time.thread_time()  # this thread's CPU time: what monitoring cost

    def stop(self) -> Dict[str, Any]:
        """End sampling; the summary that goes into ``status.json`` under ``resources``."""
        self.event.set()
        with self.lock:
            sampling = self.sampling
        if sampling and self.thread is not None:
            self.thread.acquire(timeout=2.0)  # its last sample is written
        s = self.series
        summary = _summary(
            self.period,
            self.start_times,
            s.samples if s else 0,
            s.peak_rss if s else 0,
            s.cpu_sum if s else 0.0,
            s.peak_gpu if s else 0,
        )
        if s is not None and s.samples:
            summary["monitor_cpu_seconds"] = round(self.own_cpu, 4)
        if self.off_reason:
            summary["off"] = self.off_reason
        return summary


# -- forking supervisors: one sampling thread for all their children --------------------------

#: in a child forked by a supervisor that has a :class:`Hub`: the hub's pipe (see :func:`start`)
_hub_fd: Optional[int] = None


class Hub:
    """One sampling process beside a forking supervisor (local_pool's, the Slurm task runner)
    that samples every forked run's process tree, so that a run creates no thread of its own::

        hub = Hub()                 # in the supervisor, before its first fork
        pid = os.fork()
        if pid == 0:
            hub.adopt()             # in the child: start() below registers with the hub
            ...                     # the runner: monitor.start(run_dir, period)
        ...
        hub.forget(pid)             # in the supervisor, once the child is reaped

    A run tells the hub when it starts and stops through a pipe (one small write each, atomic
    below PIPE_BUF); the hub samples it on the run's own drift-free schedule and appends to its
    ``resources.csv`` under a lock on the run directory, which the run takes too when it
    stops and reads its samples back: the summary counts exactly the samples in the file.

    The hub is a process, not a thread of the supervisor: a thread woken twice per run would
    take the supervisor's GIL while it forks the next runs (a sweep of short runs took 1.3x as
    long). It ignores the stop signals and ends when the pipe's last writer (the supervisor
    and its runs) is gone, so it samples the runs to their end even when the supervisor dies.
    """

    def __init__(self) -> None:
        read_fd, self.write_fd = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the hub process
            code = 1
            try:
                # hold nothing of the supervisor's open (a pipe someone reads to its end)
                devnull = os.open(os.devnull, os.O_RDWR)
                for fd in (0, 1, 2):
                    os.dup2(devnull, fd)
                os.closerange(3, read_fd)
                os.closerange(read_fd + 1, 1 << 16)
                _Sampler(read_fd).run()
                code = 0
            finally:
                os._exit(code)
        os.close(read_fd)
        # a full pipe (the hub gone or behind) must never block a run: it then monitors itself
        os.set_blocking(self.write_fd, False)

    def adopt(self) -> None:
        """In a forked child: runs started here register with this hub (no thread of their own)."""
        global _hub_fd
        _hub_fd = self.write_fd

    def forget(self, pid: int) -> None:
        """The child ``pid`` was reaped: no more samples of it."""
        try:
            os.write(self.write_fd, b"end %d\n" % pid)
        except OSError:  # the hub is gone or behind; the run's own stop message ended its samples
            pass

    def close(self) -> None:
        """No more runs: the hub ends once the runs still holding the pipe are gone."""
        os.close(self.write_fd)


class _Sampler:
    """The hub process's loop: reads the runs' messages, samples each on its schedule."""

    def __init__(self, read_fd: int) -> None:
        self.read_fd = read_fd
        self.series: Dict[int, _Series] = {}
        self.buffer = b""
        self.reader: Any = None
        self.gpu: Optional[Callable[[List[int]], int]] = None
        self.poll: Optional[float] = None  # seconds between reads while runs are sampled

    def run(self) -> None:
        import select
        import signal

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
        # Messages are read at once while no run is sampled; while some are, every quarter of
        # the shortest period seen (a run is known before its first sample is due): a sweep of
        # short runs wakes the hub a few times a second, not twice per run
        next_read = 0.0
        while True:
            due = min((s.due() for s in self.series.values()), default=None)
            now = time.monotonic()
            if due is None:
                timeout = None
            elif self.poll is None:
                timeout = max(0.0, due - now)
            else:
                timeout = max(0.0, min(due, next_read) - now)
            if self.series and self.poll is not None:
                time.sleep(timeout or 0.0)
                readable = time.monotonic() >= next_read
            else:
                readable = bool(select.select([self.read_fd], [], [], timeout)[0])
            if readable:
                if not self._drain():  # every writer is gone: no run is left to sample
                    for series in self.series.values():
                        series.close()
                    return
                next_read = time.monotonic() + (self.poll or 0.0)
            now = time.monotonic()
            for pid, series in list(self.series.items()):
                if series.due() <= now:
                    try:
                        self._take(pid, series)
                    except Exception:  # its run dir gone, a full disk: that run's samples end
                        self.series.pop(pid, None)
                        series.close()

    def _drain(self) -> bool:
        """Read every message waiting; False once the pipe's last writer is gone."""
        import select

        while select.select([self.read_fd], [], [], 0)[0]:
            data = os.read(self.read_fd, 65536)
            if not data:
                return False
            self._messages(data)
        return True

    def _messages(self, data: bytes) -> None:
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            kind, _, rest = line.partition(b" ")
            if kind == b"start":
                pid, period, cpu0, mono, wall, excl, run_dir = rest.split(b" ", 6)
                quarter = min(0.25, max(0.005, float(period) / 4))
                self.poll = quarter if self.poll is None else min(self.poll, quarter)
                exclude = {int(x) for x in excl.split(b",") if x != b"-"}
                self.series[int(pid)] = _Series(
                    Path(os.fsdecode(run_dir)),
                    float(period),
                    int(pid),
                    exclude,
                    float(mono),  # CLOCK_MONOTONIC is the same in every process
                    float(wall),
                    float(cpu0),
                )
            elif kind in (b"stop", b"end"):
                series = self.series.pop(int(rest), None)
                if series is not None:
                    series.close()

    def _take(self, pid: int, series: _Series) -> None:
        import fcntl

        if self.reader is None:
            self.reader = make_reader()
            if self.reader is None:
                _monitoring_off(OFF_REASON)
                self.reader = False
            else:
                self.gpu = gpu_source()
        if self.reader is False:
            self.series.clear()
            return
        try:
            lock = os.open(series.run_dir, os.O_RDONLY)
        except OSError:
            self.series.pop(pid, None)
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            # a stop written before we took the lock is read now: no sample after it (when
            # every writer is gone, the main loop ends on it)
            self._drain()
            if self.series.get(pid) is series:
                series.take(self.reader, self.gpu)
        finally:
            os.close(lock)


class _HubClient:
    """The run's side of a :class:`Hub`: what :class:`Monitor` is, without a thread."""

    def __init__(self, fd: int, run_dir: Path, period: float, exclude: Iterable[int]) -> None:
        self.fd = fd
        self.run_dir = Path(run_dir)
        self.period = float(period)
        self.start_times = os.times()
        self.start_mono = time.monotonic()
        try:
            self.offset = os.stat(self.run_dir / CSV_NAME).st_size  # an earlier attempt's samples
        except OSError:
            self.offset = 0
        path = os.fsencode(os.path.abspath(self.run_dir))
        head = "start %d %r %r %r %r %s " % (
            os.getpid(),
            self.period,
            sum(self.start_times[:4]),
            self.start_mono,
            time.time(),
            ",".join(str(p) for p in exclude) or "-",
        )
        msg = head.encode() + path + b"\n"
        if len(msg) > 4096 or b"\n" in path:  # not one atomic write, or not one line
            raise ValueError(f"cannot register {self.run_dir} with the monitor hub")
        os.write(fd, msg)

    def stop(self) -> Dict[str, Any]:
        import fcntl

        try:
            os.write(self.fd, b"stop %d\n" % os.getpid())
        except OSError:  # the hub is gone or behind: it stops at the reap
            pass
        rows: List[Dict[str, float]] = []
        if time.monotonic() - self.start_mono >= self.period:  # the hub may have sampled
            lock = os.open(self.run_dir, os.O_RDONLY)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                rows = read_samples(self.run_dir, self.offset)
            finally:
                os.close(lock)
        return _summary(
            self.period,
            self.start_times,
            len(rows),
            int(max((r["rss_bytes"] for r in rows), default=0)),
            sum(r["cpu_percent"] for r in rows),
            int(max((r["gpu_bytes"] for r in rows), default=0)),
        )


def start(run_dir: Path, period: float, exclude: Iterable[int] = ()) -> Any:
    """Start monitoring this process's tree for a run: through the supervisor's :class:`Hub`
    when this process was forked by one, else with a :class:`Monitor` thread of its own.
    Returns an object whose ``stop()`` gives the summary."""
    if _hub_fd is not None:
        try:
            return _HubClient(_hub_fd, run_dir, period, exclude)
        except (OSError, ValueError):
            pass
    return Monitor(run_dir, period, exclude=exclude).start()


def _max_rss() -> int:
    """Peak RSS of this process or its largest waited-for child (getrusage; 0 if unknown)."""
    if resource is None:  # pragma: no cover - not POSIX
        return 0
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return scale * max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )


def read_samples(run_dir: Path, offset: int = 0) -> List[Dict[str, float]]:
    """The samples of ``resources.csv`` as dicts of floats (an empty list when there is none);
    ``offset``: only those written after that byte (an earlier attempt's are before it)."""
    path = Path(run_dir) / CSV_NAME
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return []
    lines = data.decode(errors="replace").splitlines()
    if not lines:
        return []
    header = lines[0].split(",")
    if offset:
        lines = [lines[0]] + data[offset:].decode(errors="replace").splitlines()
    out = []
    for line in lines[1:]:
        parts = line.split(",")
        if len(parts) != len(header):
            continue  # a line cut by a crash
        try:
            out.append({h: float(v) for h, v in zip(header, parts)})
        except ValueError:
            continue
    return out
