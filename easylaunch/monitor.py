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

A run shorter than one period takes no sample: the thread only waits, and :meth:`stop` adds
what two system calls give (CPU seconds of the run and its waited-for children, peak RSS of
the largest process).

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
            stat = self._stat(int(name))
            if stat is not None:
                tree.setdefault(int(stat[1]), []).append(int(name))
        return tree

    @staticmethod
    def _stat(pid: int) -> Optional[List[bytes]]:
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
            stat = self._stat(pid)
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
        self.samples = 0
        self.peak_rss = 0
        self.peak_gpu = 0
        self.cpu_sum = 0.0  # sum of cpu_percent over samples
        self.max_error = 0.0
        self.event = threading.Event()
        self.thread: Optional[Any] = None  # the lock the sampling thread holds while it lives
        self.lock = threading.Lock()
        self.sampling = False  # set by the thread (under lock) once it passed its first tick
        self.start_wall = time.time()
        self.start_mono = time.monotonic()
        self.start_times = os.times()
        self.off_reason: Optional[str] = None
        self.own_cpu = 0.0

    def start(self) -> "Monitor":
        self.start_wall = time.time()
        self.start_mono = time.monotonic()
        self.start_times = os.times()
        # a bare thread, not threading.Thread: start() would wait for it to be scheduled and a
        # join for it to end, ~1-4 ms each in a forked child (local_pool), for runs that mostly
        # end before their first sample
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
        start, period, event = self.start_mono, self.period, self.event
        k = 1
        # nothing happens before the first tick: a run shorter than one period pays nothing
        if event.wait(start + period - time.monotonic()):
            return
        with self.lock:  # stop() waits for a thread that sampled, never for one that did not
            if event.is_set():
                return
            self.sampling = True
        reader = make_reader()
        if reader is None:
            self.off_reason = "no /proc and no psutil (pip install 'easylaunch[monitor]')"
            print(f"easylaunch: resource monitoring is off: {self.off_reason}", file=sys.stderr, flush=True)
            return
        gpu = gpu_source()
        path = self.run_dir / CSV_NAME
        new = not path.exists()
        out = open(path, "a", buffering=1)
        try:
            if new:
                out.write(",".join(COLUMNS) + "\n")
            prev: Optional[Tuple[float, float]] = None
            while True:
                now = time.monotonic()
                due = start + k * period
                if now < due:
                    if event.wait(due - now):
                        return
                    now = time.monotonic()
                try:
                    pids = reader.tree(self.root, self.exclude)
                    rss, cpu, read, write, seen = reader.sample(pids)
                    gpu_bytes = gpu(seen) if gpu is not None else 0
                except Exception:  # a process tree changes under us: skip that tick
                    k = next_tick(k + 1, start, period, time.monotonic())
                    continue
                taken = time.monotonic()
                percent = 0.0
                if prev is not None and taken > prev[0]:
                    percent = max(0.0, (cpu - prev[1]) / (taken - prev[0]) * 100.0)
                elif prev is None:
                    own = os.times()
                    used = (own[0] + own[1] + own[2] + own[3]) - sum(self.start_times[:4])
                    percent = max(0.0, used / max(taken - start, 1e-9) * 100.0)
                prev = (taken, cpu)
                self.samples += 1
                self.peak_rss = max(self.peak_rss, rss)
                self.peak_gpu = max(self.peak_gpu, gpu_bytes)
                self.cpu_sum += percent
                self.max_error = max(self.max_error, now - due)
                out.write(
                    "%.4f,%.4f,%.3f,%d,%.1f,%d,%d,%d,%d\n"
                    % (
                        now - start,
                        due - start,
                        self.start_wall + (now - start),
                        rss,
                        percent,
                        read,
                        write,
                        len(seen),
                        gpu_bytes,
                    )
                )
                k = next_tick(k + 1, start, period, time.monotonic())
        finally:
            out.close()
            self.own_cpu = time.thread_time()  # this thread's CPU time: what monitoring cost

    def stop(self) -> Dict[str, Any]:
        """End sampling; the summary that goes into ``status.json`` under ``resources``."""
        self.event.set()
        with self.lock:
            sampling = self.sampling
        if sampling and self.thread is not None:
            self.thread.acquire(timeout=2.0)  # its last sample is written
        end = os.times()
        cpu_seconds = sum(end[:4]) - sum(self.start_times[:4])
        summary: Dict[str, Any] = {
            "samples": self.samples,
            "period": self.period,
            "cpu_seconds": round(max(0.0, cpu_seconds), 3),
            "peak_rss_bytes": max(self.peak_rss, _max_rss()),
        }
        if self.samples:
            summary["mean_cpu_percent"] = round(self.cpu_sum / self.samples, 1)
            summary["peak_gpu_bytes"] = self.peak_gpu
            summary["monitor_cpu_seconds"] = round(self.own_cpu, 4)
        if self.off_reason:
            summary["off"] = self.off_reason
        return summary


def _max_rss() -> int:
    """Peak RSS of this process or its largest waited-for child (getrusage; 0 if unknown)."""
    if resource is None:  # pragma: no cover - not POSIX
        return 0
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return scale * max(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    )


def read_samples(run_dir: Path) -> List[Dict[str, float]]:
    """The samples of ``resources.csv`` as dicts of floats (an empty list when there is none)."""
    path = Path(run_dir) / CSV_NAME
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    if not lines:
        return []
    header = lines[0].split(",")
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
