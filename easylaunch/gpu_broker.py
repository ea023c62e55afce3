"""The GPU broker: one per log dir, shared by every launch script and ``easylaunch gpu-run``.

    with acquire(log_dir, "train.py::fit", gpus=[0, 1], policy="pack") as lease:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(lease.gpu)   # the runner does this
        ...                                                   # the run; the broker measures it
    # leaving the block (or the process dying) releases the GPU

A run asks the broker, over a unix socket in the log dir (``.gpu_broker/sock``), for a GPU for
its job type; the answer comes once :class:`easylaunch.gpu_sched.Scheduler` admits it. The
connection stays open for the run's whole life: the reservation ends when the run says so or
when the connection drops (its process died), never because a later run reserved.

The broker measures every run holding a GPU: the GPU memory of the client's process tree
(the client's pid comes from the socket itself, SO_PEERCRED, so it is the broker's view of the
pid even for a client in a container), every 10 ms while a run profiles its type, every
0.25 s otherwise. A GPU process is matched to a run by walking up its parents to a client's
pid, once per pid (cached until the next 0.25 s sample), so a 10 ms sample is one GPU query. The peak becomes (or grows) the type's profile, kept in ``.gpu_profiles.json``
in the log dir, so the next sweep of that type packs at once. Memory used on a GPU by processes
outside any reservation counts as taken.

The broker is started on demand by the first client (``python -m easylaunch.gpu_broker
LOG_DIR``, detached, its log in ``.gpu_broker/log``) and ends once nothing has been connected
for ``EASYLAUNCH_GPU_BROKER_IDLE`` seconds (default 10).

Inventory and usage: NVML through ``nvidia-ml-py`` when installed, else the injected
inventory of :mod:`easylaunch.gpu_fake` (``EASYLAUNCH_FAKE_GPUS``), which wins when set.

Target-side code: Python 3.8+, standard library only (pynvml optional).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .gpu_sched import Scheduler, Unfit
from .monitor import ProcReader

#: the broker's directory in the log dir (containers mount it): its socket, start lock and log
BROKER_DIR = ".gpu_broker"
SOCKET_NAME = BROKER_DIR + "/sock"
LOCK_NAME = BROKER_DIR + "/lock"
LOG_NAME = BROKER_DIR + "/log"
PROFILES_NAME = ".gpu_profiles.json"
IDLE_ENV = "EASYLAUNCH_GPU_BROKER_IDLE"
DEFAULT_IDLE = 10.0
PROFILE_PERIOD = 0.01
HOLD_PERIOD = 0.25
START_TIMEOUT = 20.0


class BrokerError(RuntimeError):
    """The broker refused a request (the message says why and what to change)."""


# -- inventory and usage ----------------------------------------------------------------------


def _nvml() -> Any:
    try:
        import pynvml  # nvidia-ml-py, optional
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    return pynvml


def inventory() -> Dict[int, int]:
    """``{gpu id: total bytes}`` of this machine: the injected fake GPUs, else NVML's, else {}."""
    from . import gpu_fake

    fake = gpu_fake.inventory()
    if fake is not None:
        return dict(enumerate(fake))
    nv = _nvml()
    if nv is None:
        return {}
    out = {}
    for i in range(nv.nvmlDeviceGetCount()):
        out[i] = int(nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(i)).total)
    return out


def processes() -> List[Tuple[int, int, int]]:
    """``(pid, bytes, gpu)`` of every process using GPU memory (fake usage files, or NVML)."""
    from . import gpu_fake

    if gpu_fake.inventory() is not None:
        return gpu_fake.per_process()
    nv = _nvml()
    if nv is None:
        return []
    out = []
    for i in range(nv.nvmlDeviceGetCount()):
        handle = nv.nvmlDeviceGetHandleByIndex(i)
        for getter in (nv.nvmlDeviceGetComputeRunningProcesses, nv.nvmlDeviceGetGraphicsRunningProcesses):
            try:
                for p in getter(handle):
                    if p.usedGpuMemory:
                        out.append((int(p.pid), int(p.usedGpuMemory), i))
            except Exception:
                pass
    return out


def resolve_gpus(spec: Any, where: str = "option gpus") -> List[int]:
    """The GPU ids ``gpus=`` stands for: ``'auto'`` (every GPU here), a count (the first n) or a
    list of ids; ValueError naming the problem and the fix."""
    have = inventory()
    known = sorted(have)
    hint = "install nvidia-ml-py where there are NVIDIA GPUs, or set EASYLAUNCH_FAKE_GPUS for tests"
    if isinstance(spec, str) and spec.strip().lower() == "auto":
        if not known:
            raise ValueError(f"{where}='auto' found no GPU on this machine ({hint})")
        return known
    if isinstance(spec, str):
        try:
            spec = [int(x) for x in spec.split(",") if x.strip()]
        except ValueError:
            raise ValueError(
                f"{where}={spec!r} must be 'auto', a count, or GPU ids such as [0, 1] or '0,1'"
            ) from None
    if isinstance(spec, bool):
        raise ValueError(f"{where}={spec!r} must be 'auto', a count, or a list of GPU ids")
    if isinstance(spec, int):
        if spec < 1:
            raise ValueError(f"{where}={spec!r}: a GPU count must be at least 1")
        if spec > len(known):
            raise ValueError(
                f"{where}={spec} asks for {spec} GPUs but this machine has {len(known)} ({hint})"
            )
        return known[:spec]
    if isinstance(spec, (list, tuple)):
        ids = []
        for x in spec:
            if isinstance(x, bool) or not isinstance(x, int) or x < 0:
                raise ValueError(f"{where}={list(spec)!r}: GPU ids are non-negative integers")
            if x not in have:
                raise ValueError(
                    f"{where}={list(spec)!r}: there is no GPU {x} here (GPUs: {known or 'none'}; {hint})"
                )
            if x not in ids:
                ids.append(x)
        if not ids:
            raise ValueError(f"{where}=[] names no GPU; give ids, a count, or 'auto'")
        return ids
    raise ValueError(f"{where}={spec!r} must be 'auto', a count, or a list of GPU ids")


# -- profiles ---------------------------------------------------------------------------------


def read_profiles(log_dir: Path) -> Dict[str, int]:
    """``{job type: peak bytes}`` from the log dir's ``.gpu_profiles.json`` ({} when none)."""
    try:
        data = json.loads((Path(log_dir) / PROFILES_NAME).read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for key, entry in (data.get("profiles") or {}).items():
        try:
            out[str(key)] = int(entry["peak_bytes"])
        except (KeyError, TypeError, ValueError):
            continue
    return out


def write_profile(log_dir: Path, job_type: str, peak: int) -> int:
    """Fold ``peak`` into the stored profile of ``job_type`` (a profile only grows)."""
    path = Path(log_dir) / PROFILES_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    profiles = data.setdefault("profiles", {})
    entry = profiles.get(job_type) or {}
    peak = max(int(peak), int(entry.get("peak_bytes") or 0))
    profiles[job_type] = {"peak_bytes": peak, "runs": int(entry.get("runs") or 0) + 1, "updated": time.time()}
    data["version"] = 1
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return peak


# -- sockets ----------------------------------------------------------------------------------


class _Addr:
    """A unix socket path usable however long the log dir's path is (AF_UNIX allows ~107
    bytes): through ``/proc/self/fd/N`` of the directory when the path is too long."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.fd: Optional[int] = None

    def __enter__(self) -> str:
        text = str(self.path)
        if len(os.fsencode(text)) < 100:
            return text
        self.fd = os.open(str(self.path.parent), os.O_RDONLY)
        return f"/proc/self/fd/{self.fd}/{self.path.name}"

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _peer_pid(conn: socket.socket) -> int:
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", creds)[0]
    except (AttributeError, OSError):
        return 0


def _send(conn: socket.socket, msg: dict) -> None:
    conn.sendall((json.dumps(msg) + "\n").encode())


# -- the broker -------------------------------------------------------------------------------


class _Client:
    def __init__(self, conn: socket.socket, key: int):
        self.conn, self.key = conn, key
        self.pid = _peer_pid(conn)
        self.buf = b""
        self.job_type: Optional[str] = None
        self.granted = False


class Broker:
    """The server (``python -m easylaunch.gpu_broker LOG_DIR``); :func:`acquire` starts it."""

    def __init__(self, log_dir: Path, idle: Optional[float] = None):
        self.log_dir = Path(log_dir)
        self.idle = float(os.environ.get(IDLE_ENV, DEFAULT_IDLE) if idle is None else idle)
        totals = inventory()
        self.sched = Scheduler(totals, profiles=read_profiles(self.log_dir))
        self.clients: Dict[int, _Client] = {}
        self.sel = selectors.DefaultSelector()
        self.next_key = 0
        self.last_busy = time.monotonic()
        self.keep_until = 0.0
        self.next_sample = 0.0
        self.next_profile = 0.0
        self.owners: Dict[int, Optional[int]] = {}  # pid -> reservation key (None: foreign)

    def log(self, text: str) -> None:
        print(time.strftime("%H:%M:%S ") + text, flush=True)

    # -- measuring ----------------------------------------------------------------------------
    def _ppid(self, pid: int) -> int:
        stat = ProcReader.stat(pid)  # the fields after the command: state, ppid, ...
        try:
            return int(stat[1]) if stat else 0
        except (ValueError, IndexError):
            return 0

    def _owner(self, pid: int, roots: Dict[int, int]) -> Optional[int]:
        """The reservation whose run ``pid`` descends from (its nearest client ancestor), or
        None for a foreign process. Cached per pid until the next full sample: a 10 ms
        profile sample is one GPU query and a few dictionary lookups, no /proc walk."""
        if pid in self.owners:
            return self.owners[pid]
        chain, p, key = [], pid, None
        for _ in range(64):  # deeper than any real process tree
            if p in roots:
                key = roots[p]
                break
            if p in self.owners:
                key = self.owners[p]
                break
            chain.append(p)
            p = self._ppid(p)
            if p <= 1:
                break
        for q in chain:
            self.owners[q] = key
        return key

    def measure(self, only_profiling: bool = False) -> None:
        """Usage of every reservation's processes (grows it) and of foreign processes
        (``only_profiling``: of the profiling runs only, the 10 ms samples)."""
        if not only_profiling:
            self.owners = {}  # pids are reused: a full sample looks again
        granted = {c.key: c.pid for c in self.clients.values() if c.granted and c.pid}
        if only_profiling:
            profiling = {k for k, r in self.sched.reservations.items() if r.profiling}
            granted = {key: pid for key, pid in granted.items() if key in profiling}
        roots = {pid: key for key, pid in granted.items()}
        used: Dict[int, int] = {}
        foreign: Dict[int, int] = {}
        for pid, nbytes, gpu in processes():
            key = self._owner(pid, roots)
            if key is None or key not in granted:
                foreign[gpu] = foreign.get(gpu, 0) + nbytes
            else:
                used[key] = used.get(key, 0) + nbytes
        for key in granted:
            self.sched.grow(key, used.get(key, 0))
        if not only_profiling:
            self.sched.foreign = foreign

    # -- requests -----------------------------------------------------------------------------
    def handle(self, client: _Client, msg: dict) -> None:
        op = msg.get("op")
        if op == "acquire":
            if client.job_type is not None:
                _send(client.conn, {"error": "one acquire per connection"})
                return
            client.job_type = str(msg.get("type") or "unknown")
            try:
                self.sched.request(client.key, client.job_type, msg.get("gpus"), msg.get("policy") or "pack")
            except Unfit as exc:
                _send(client.conn, {"error": str(exc)})
                client.job_type = None
                return
            self.log(f"request {client.key} pid {client.pid} type {client.job_type!r}")
            self.schedule()
            if not client.granted:
                why = "profile" if self.sched.is_profiling(client.job_type) else "memory"
                _send(client.conn, {"wait": why})
        elif op == "release":
            self.finish(client, failed=bool(msg.get("failed")), reply=True)
        elif op == "status":
            _send(client.conn, dict(self.sched.snapshot(), pid=os.getpid()))
        elif op == "keep":
            self.keep_until = max(self.keep_until, time.monotonic() + float(msg.get("seconds") or 0))
            _send(client.conn, {"ok": True})
        else:
            _send(client.conn, {"error": f"unknown op {op!r}"})

    def schedule(self) -> None:
        if self.sched.waiting:
            self.measure()
        for grant in self.sched.admit():
            client = self.clients.get(grant.key)  # type: ignore[call-overload]
            if client is None:
                self.sched.release(grant.key)
                continue
            client.granted = True
            self.log(
                f"grant {client.key} GPU {grant.gpu} {grant.nbytes} bytes"
                + (" (profiling its type)" if grant.profiling else "")
            )
            try:
                _send(
                    client.conn,
                    {"gpu": grant.gpu, "bytes": grant.nbytes, "profiling": grant.profiling},
                )
            except OSError:
                pass  # its EOF comes next and releases it
        for key, message in self.sched.refused:
            client = self.clients.get(key)  # type: ignore[call-overload]
            if client is not None:
                try:
                    _send(client.conn, {"error": message})
                except OSError:
                    pass
        self.sched.refused.clear()

    def finish(self, client: _Client, failed: bool, reply: bool) -> None:
        """The client's run ended (``release``) or its connection dropped (its process died)."""
        if client.granted:
            self.measure()
            res = self.sched.reservations.get(client.key)
            peak = res.peak if res is not None else 0
            before = self.sched.profiles.get(client.job_type or "")
            profile = self.sched.release(client.key, failed=failed)
            if profile is not None and profile != before and client.job_type:
                write_profile(self.log_dir, client.job_type, profile)
            self.log(
                f"release {client.key} peak {peak} bytes{' (failed)' if failed else ''}; "
                f"profile of {client.job_type!r}: {profile}"
            )
            client.granted = False
            if reply:
                try:
                    _send(client.conn, {"ok": True, "peak": peak, "profile": profile})
                except OSError:
                    pass
        else:
            self.sched.withdraw(client.key)
        client.job_type = None
        self.schedule()

    def drop(self, client: _Client) -> None:
        self.clients.pop(client.key, None)
        try:
            self.sel.unregister(client.conn)
        except (KeyError, ValueError):
            pass
        client.conn.close()
        if client.granted or client.job_type is not None:
            self.log(f"client {client.key} (pid {client.pid}) is gone")
            self.finish(client, failed=True, reply=False)
        self.last_busy = time.monotonic()

    # -- the loop -----------------------------------------------------------------------------
    def serve(self) -> int:
        path = self.log_dir / SOCKET_NAME
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with _Addr(path) as addr:
            try:
                os.unlink(addr)
            except FileNotFoundError:
                pass
            server.bind(addr)
        server.listen(64)
        server.setblocking(False)
        self.sel.register(server, selectors.EVENT_READ, None)
        self.log(f"broker {os.getpid()} serving GPUs {self.sched.totals} in {self.log_dir}")
        try:
            while True:
                profiling = any(r.profiling for r in self.sched.reservations.values())
                wait = HOLD_PERIOD
                if self.sched.reservations:
                    due = min(self.next_sample, self.next_profile) if profiling else self.next_sample
                    wait = max(0.0, due - time.monotonic())
                for sel_key, _ in self.sel.select(timeout=wait):
                    if sel_key.data is None:
                        self._accept(server)
                    else:
                        self._read(sel_key.data)
                now = time.monotonic()
                if self.sched.reservations and now >= self.next_sample:
                    self.measure()
                    self.schedule()  # foreign usage may have gone
                    self.next_sample = now + HOLD_PERIOD
                    self.next_profile = now + PROFILE_PERIOD
                elif profiling and now >= self.next_profile:
                    self.measure(only_profiling=True)  # the profile's peak: every 10 ms
                    self.next_profile = now + PROFILE_PERIOD
                if self.clients:
                    self.last_busy = now
                elif now - self.last_busy >= self.idle and now >= self.keep_until:
                    if self._retire(server, path):
                        return 0
        finally:
            server.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(True)
            self.next_key += 1
            client = _Client(conn, self.next_key)
            self.clients[client.key] = client
            self.sel.register(conn, selectors.EVENT_READ, client)

    def _read(self, client: _Client) -> None:
        try:
            data = client.conn.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.drop(client)
            return
        client.buf += data
        while b"\n" in client.buf:
            line, client.buf = client.buf.split(b"\n", 1)
            try:
                msg = json.loads(line)
            except ValueError:
                msg = {"op": None}
            try:
                self.handle(client, msg)
            except OSError:
                self.drop(client)
                return

    def _retire(self, server: socket.socket, path: Path) -> bool:
        """Idle: remove the socket under the start lock, unless a client came meanwhile."""
        with open(self.log_dir / LOCK_NAME, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._accept(server)
            if self.clients:
                return False
            with _Addr(path) as addr:
                try:
                    os.unlink(addr)
                except FileNotFoundError:
                    pass
            self.log(f"broker {os.getpid()} idle for {self.idle:g} s: exiting")
            return True


# -- the client -------------------------------------------------------------------------------


def _connect(path: Path) -> Optional[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _Addr(path) as addr:
            sock.connect(addr)
        return sock
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
            return None
        raise


def connect(log_dir: Path, start: bool = True) -> socket.socket:
    """A connection to the log dir's broker, started first when none runs."""
    log_dir = Path(log_dir)
    path = log_dir / SOCKET_NAME
    sock = _connect(path)
    if sock is not None or not start:
        if sock is None:
            raise BrokerError(f"no GPU broker runs in {log_dir}")
        return sock
    (log_dir / BROKER_DIR).mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(log_dir / LOCK_NAME, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _connect(path)
        if sock is not None:
            return sock
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(
            [root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
        )
        with open(log_dir / LOG_NAME, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "easylaunch.gpu_broker", str(log_dir)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            sock = _connect(path)
            if sock is not None:
                return sock
            if proc.poll() is not None:
                break
            time.sleep(0.01)
        raise BrokerError(
            f"the GPU broker for {log_dir} did not start (exit {proc.poll()}); see {log_dir / LOG_NAME}"
        )


class Lease:
    """A GPU held for one run: ``gpu`` (its id), ``nbytes`` reserved, ``profiling`` (whether this
    run profiles its type and holds the GPU whole). Release it with :meth:`release` or by
    leaving the ``with`` block; a process that dies releases it with its connection."""

    def __init__(
        self, sock: socket.socket, reader: Any, gpu: int, nbytes: int, profiling: bool, waited: float
    ):
        self.sock, self.reader = sock, reader
        self.gpu, self.nbytes, self.profiling, self.waited = gpu, nbytes, profiling, waited
        self.released: Optional[dict] = None

    def release(self, failed: bool = False) -> dict:
        """End the reservation; returns the broker's answer (``peak``, ``profile``)."""
        if self.released is not None:
            return self.released
        self.released = {}
        try:
            _send(self.sock, {"op": "release", "failed": bool(failed)})
            line = self.reader.readline()
            self.released = json.loads(line) if line else {}
        except (OSError, ValueError):
            pass
        finally:
            self.reader.close()
            self.sock.close()
        return self.released

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        self.release(failed=exc_type is not None)


def acquire(
    log_dir: Path,
    job_type: str,
    gpus: Optional[Sequence[int]] = None,
    policy: str = "pack",
    on_wait: Optional[Any] = None,
    start: bool = True,
) -> Lease:
    """Wait until the broker gives this process a GPU for ``job_type`` (ids ``gpus``, default all).

    ``on_wait(reason)`` is called once if the run has to wait (``'profile'``: another run of
    its type profiles it; ``'memory'``: no GPU has room). BrokerError when it is refused.
    ``start=False`` (runs in containers) never starts a broker: the host's must run."""
    began = time.monotonic()
    for attempt in range(5):
        try:
            sock = connect(log_dir, start=start)
        except BrokerError:
            if start or attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
            continue
        reader = sock.makefile("r")
        _send(
            sock, {"op": "acquire", "type": job_type, "gpus": list(gpus) if gpus else None, "policy": policy}
        )
        while True:
            line = reader.readline()
            if not line:
                break  # the broker retired as we connected: ask the next one
            msg = json.loads(line)
            if "error" in msg:
                sock.close()
                raise BrokerError(msg["error"])
            if "wait" in msg:
                if on_wait is not None:
                    on_wait(msg["wait"])
                continue
            return Lease(
                sock,
                reader,
                int(msg["gpu"]),
                int(msg["bytes"]),
                bool(msg["profiling"]),
                time.monotonic() - began,
            )
        sock.close()
        time.sleep(0.05 * (attempt + 1))
    raise BrokerError(f"the GPU broker of {log_dir} closed every connection; see {Path(log_dir) / LOG_NAME}")


def status(log_dir: Path) -> Optional[dict]:
    """The broker's state (GPUs, profiles, reservations, waiting runs), or None if none runs."""
    try:
        sock = connect(log_dir, start=False)
    except BrokerError:
        return None
    with sock:
        _send(sock, {"op": "status"})
        line = sock.makefile("r").readline()
    return json.loads(line) if line else None


def keep_alive(log_dir: Path, seconds: float) -> None:
    """Start the broker if needed and keep it for at least ``seconds`` (runs about to start)."""
    with connect(log_dir) as sock:
        _send(sock, {"op": "keep", "seconds": seconds})
        sock.makefile("r").readline()


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m easylaunch.gpu_broker LOG_DIR", file=sys.stderr)
        return 2
    return Broker(Path(args[0])).serve()


if __name__ == "__main__":
    sys.exit(main())
