"""Target side of mode ``ssh``: what runs on the SSH host, from the shipped easylaunch zip.

Python 3.8+, standard library and easylaunch's target side only::

    PYTHONPATH=EASYLAUNCH.zip:CLOUDPICKLE.zip python3 -m easylaunch.ssh_agent serve
    # one JSON request a line on stdin, one JSON answer a line on stdout:
    {"cmd": "start", "root": LOG_DIR, "upload": ARCHIVE, "batch_dir": BATCH_DIR}
    {"cmd": "poll", "runs": [...]}      # states and new/changed files of many runs
    {"cmd": "cancel", "runs": [...]}    # cancel marks, and the task process groups to stop
    ... ssh_agent run BATCH_DIR         # the detached agent of one sweep (started by "start")

The launcher keeps one ``serve`` process per connection: a poll is then one request and one
answer over the open channel, no process start on the host. It ends with its channel.

``start`` unpacks the sweep's archive (run directories with their payloads, ``agent.json``,
``tasks.json``) into the remote log dir and starts the agent in its own session, so the runs
survive the SSH connection and the launch script. The agent starts at most ``max_parallel``
task runners (``python3 -m easylaunch.runner --tasks TASKS --index N``, each a packed group of
runs) or Docker containers at once, keeps the rest queued on the host, and records through
:mod:`easylaunch.transitions` what a task could not (killed, container gone). ``poll`` checks
liveness itself (a run whose process is gone without a record becomes FAILED, a queued run
whose agent is gone too), so the host tells the truth even when no agent is left.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from . import records, transitions
from .procs import alive, process_token
from .spec import TERMINAL_STATES, State

AGENT_FILE = "agent.json"
STATE_FILE = "state.json"
#: never sent back: the launcher wrote them (payloads, manifest) or they go the other way
NOT_FETCHED = {records.PAYLOAD, records.MANIFEST, records.CANCEL_MARK}
#: a file at most this large comes back inside the poll's answer; larger ones by SFTP
INLINE_LIMIT = 256 * 1024
#: and at most this much per answer
INLINE_TOTAL = 8 * 1024 * 1024
#: seconds the agent waits for an unreachable Docker daemon before it fails the runs left
DOCKER_GIVE_UP = 600.0


def _read_json(path: str, default: Any = None) -> Any:
    try:
        return records.read_json(path, default)
    except ValueError:
        return default


# -- start --------------------------------------------------------------------------------


def write_member(tar: Any, m: Any, root: str) -> None:
    """Write one checked member ``m`` of the open tarfile ``tar`` (see :func:`_safe_members`)
    under ``root``: a directory, or a file with its mode (0644 when it has none) and mtime,
    overwriting what is there."""
    import shutil

    target = os.path.join(root, m.name)
    if m.isdir():
        os.makedirs(target, exist_ok=True)
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    src = tar.extractfile(m)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, m.mode & 0o777 or 0o644)
    with os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(src, out)  # type: ignore[arg-type]
    os.utime(target, (m.mtime, m.mtime))


def _safe_members(tar: Any, root: str) -> List[Any]:
    members = []
    for m in tar.getmembers():
        name = m.name
        parts = name.split("/")
        if name.startswith("/") or ".." in parts or "\\" in name or not (m.isfile() or m.isdir()):
            raise ValueError(f"refusing archive member {name!r}")
        members.append(m)
    return members


def start(root: str, upload: str, batch_dir: str) -> Dict[str, Any]:
    """Unpack the sweep's archive into ``root`` and start the detached agent of ``batch_dir``;
    ``{"agent_pid": N}``, or ``{"error": ...}`` after undoing the unpacking."""
    import shutil
    import tarfile

    created: List[str] = []
    try:
        with tarfile.open(upload, "r:gz") as tar:
            members = _safe_members(tar, root)
            for m in members:
                top = m.name.split("/")
                # run dirs and the batch dir are new; remember them to undo a failed unpack
                if m.isdir() and (len(top) == 2 or (len(top) == 3 and top[1] == ".batches")):
                    target = os.path.join(root, m.name)
                    if not os.path.isdir(target):
                        created.append(target)
            for m in members:
                write_member(tar, m, root)
    except BaseException as exc:
        for path in reversed(created):
            shutil.rmtree(path, ignore_errors=True)
        _unlink(upload)
        return {"error": f"{type(exc).__name__}: {exc}"}
    _unlink(upload)
    info = _read_json(os.path.join(batch_dir, AGENT_FILE), {})
    log = open(os.path.join(batch_dir, "agent.log"), "ab")
    try:
        proc = subprocess.Popen(
            [info.get("python") or sys.executable, "-m", "easylaunch.ssh_agent", "run", batch_dir],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            cwd=batch_dir,
        )
    finally:
        log.close()
    state = {"agent": {"pid": proc.pid, "token": process_token(proc.pid)}, "tasks": {}}
    records.atomic_write_json(os.path.join(batch_dir, STATE_FILE), state)
    return {"agent_pid": proc.pid}


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# -- the agent ----------------------------------------------------------------------------


class Agent:
    """Starts a sweep's tasks, ``max_parallel`` at once, and settles what they leave unsaid."""

    def __init__(self, batch_dir: str):
        self.batch_dir = batch_dir
        self.info = _read_json(os.path.join(batch_dir, AGENT_FILE))
        self.groups: List[List[str]] = self.info["groups"]
        self.limit = max(1, int(self.info.get("max_parallel") or 1))
        self.docker = self.info.get("runtime") == "docker"
        self.state = _read_json(os.path.join(batch_dir, STATE_FILE), {}) or {}
        self.state.setdefault("tasks", {})
        self.state["agent"] = {"pid": os.getpid(), "token": process_token(os.getpid())}
        self.procs: Dict[int, subprocess.Popen] = {}
        self.containers: Dict[int, str] = {}
        self.orphans: List[str] = []
        self.queue: List[int] = list(range(len(self.groups)))
        self.docker_down_since: Optional[float] = None
        self.engine = None
        if self.docker:
            from .ssh_remote import DockerSocket

            self.engine = DockerSocket(self.info["docker_host"], timeout=30)

    def save(self) -> None:
        records.atomic_write_json(os.path.join(self.batch_dir, STATE_FILE), self.state)

    def launch(self, i: int) -> bool:
        """Start task ``i``; False when it must wait (the Docker daemon does not answer)."""
        if self.docker:
            from .ssh_remote import EngineError

            spec = self.info["containers"][i]
            try:
                cid = self.engine.create(spec["body"], spec["name"])  # type: ignore[union-attr]
                try:
                    self.engine.start(cid)  # type: ignore[union-attr]
                except EngineError:
                    self.engine.remove(cid)  # type: ignore[union-attr]
                    raise
            except EngineError as exc:
                for d in self.groups[i]:
                    transitions.refused(d, f"the Docker daemon at {self.info['docker_host']}", exc.message)
                return True
            except OSError:
                return False  # the daemon is away: check_docker counts how long
            self.containers[i] = cid
            self.state["tasks"][str(i)] = {"container": cid, "name": spec["name"], "started": time.time()}
        else:
            env = dict(os.environ)
            env.update(self.info.get("env") or {})
            argv = [*self.info["command"], "--tasks", self.info["tasks_file"], "--index", str(i), "--quiet"]
            with open(os.path.join(self.batch_dir, f"task-{i}.log"), "ab") as log:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, start_new_session=True
                )
            self.procs[i] = proc
            self.state["tasks"][str(i)] = {
                "pid": proc.pid,
                "token": process_token(proc.pid),
                "started": time.time(),
            }
        self.save()
        return True

    def settle_task(self, i: int, code: Optional[int], who: str, oom: bool = False) -> None:
        """A task ended: record the runs it left without an outcome."""
        for d in self.groups[i]:
            state = transitions.current(d)
            if state in TERMINAL_STATES:
                continue
            status = records.read_status(d)
            if (
                state == State.RUNNING
                and not self.docker
                and alive(status.get("pid"), status.get("pid_token"))
            ):
                self.orphans.append(d)  # the run's own process outlived its task runner
                continue
            if self.docker:
                transitions.container_exited(d, who, code, oom_killed=oom)
            elif state == State.PENDING:
                if os.path.exists(os.path.join(d, records.CANCEL_MARK)):
                    transitions.cancelled_before_start(d)
                else:
                    transitions.not_started(
                        d,
                        State.FAILED,
                        f"{who} ended ({transitions.exit_description(code)}) before this run started",
                    )
            else:
                # the run's process is gone with its task runner: the task's exit says how
                transitions.died_without_record(
                    d, f"runner process {status.get('pid')} ({who})", exit_code=code
                )

    def check_docker(self) -> None:
        from .ssh_remote import EngineError

        try:
            present = {
                c["Id"]: c
                for c in self.engine.containers([f"io.easylaunch.batch={self.info['batch_id']}"])  # type: ignore[union-attr]
            }
        except (OSError, EngineError):
            # the daemon is away (restarting?): ask again, give up after 10 minutes
            self.docker_down_since = self.docker_down_since or time.time()
            if time.time() - self.docker_down_since > DOCKER_GIVE_UP:
                who = f"the Docker daemon at {self.info['docker_host']} (unreachable for 10 min)"
                for i in [*self.containers, *self.queue]:
                    for d in self.groups[i]:
                        transitions.died_without_record(d, who)
                self.containers.clear()
                self.queue.clear()
            return
        self.docker_down_since = None
        for i, cid in list(self.containers.items()):
            c = present.get(cid)
            name = self.info["containers"][i]["name"]
            if c is None:
                self.settle_task(i, None, f"container {name} (removed from outside)")
                del self.containers[i]
            elif c.get("State") in ("exited", "dead"):
                st = (self.engine.inspect(cid) or {}).get("State") or {}  # type: ignore[union-attr]
                self.settle_task(i, st.get("ExitCode"), f"container {name}", bool(st.get("OOMKilled")))
                self.engine.remove(cid)  # type: ignore[union-attr]
                del self.containers[i]

    def run(self) -> int:
        self.save()
        rfd, wfd = os.pipe()
        os.set_blocking(wfd, False)
        os.set_blocking(rfd, False)
        signal.set_wakeup_fd(wfd)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        import select

        queue = self.queue
        while queue or self.procs or self.containers or self.orphans:
            for i, proc in list(self.procs.items()):
                code = proc.poll()
                if code is not None:
                    self.settle_task(i, code, f"task runner {proc.pid}")
                    del self.procs[i]
            if self.docker and self.containers:
                self.check_docker()
            for d in list(self.orphans):
                status = records.read_status(d)
                if not alive(status.get("pid"), status.get("pid_token")):
                    transitions.died_without_record(d, f"runner process {status.get('pid')}")
                    self.orphans.remove(d)
            while queue and len(self.procs) + len(self.containers) < self.limit:
                i = queue.pop(0)
                dirs = self.groups[i]
                if all(transitions.current(d) in TERMINAL_STATES for d in dirs):
                    continue
                if all(os.path.exists(os.path.join(d, records.CANCEL_MARK)) for d in dirs):
                    for d in dirs:
                        transitions.cancelled_before_start(d)
                    continue
                if not self.launch(i):
                    queue.insert(0, i)
                    if not self.containers:
                        self.check_docker()  # counts the daemon's absence even with nothing running
                    break
            if not (queue or self.procs or self.containers or self.orphans):
                break
            try:
                select.select([rfd], [], [], 0.2 if (self.docker or self.orphans) else 1.0)
                while True:
                    os.read(rfd, 512)
            except (BlockingIOError, InterruptedError, OSError):
                pass
        self.state["done"] = time.time()
        self.save()
        return 0


# -- poll ---------------------------------------------------------------------------------


class _Batch:
    """What poll and cancel know of one sweep on this host (read once per request)."""

    def __init__(self, batch_dir: str):
        self.dir = batch_dir
        self.info = _read_json(os.path.join(batch_dir, AGENT_FILE), {}) or {}
        self.state = _read_json(os.path.join(batch_dir, STATE_FILE), {}) or {}
        agent = self.state.get("agent") or {}
        self.agent_alive = alive(agent.get("pid"), agent.get("token"))
        self.docker = self.info.get("runtime") == "docker"
        self.group_of: Dict[str, int] = {
            d: i for i, group in enumerate(self.info.get("groups") or []) for d in group
        }
        self._containers: Optional[Dict[str, dict]] = None

    def task_alive(self, i: int) -> bool:
        task = (self.state.get("tasks") or {}).get(str(i)) or {}
        if "pid" in task:
            return alive(task.get("pid"), task.get("token"))
        if "container" in task:
            c = (self.containers() or {}).get(task["container"])
            return c is not None and c.get("State") not in ("exited", "dead")
        return False

    def containers(self) -> Optional[Dict[str, dict]]:
        if self._containers is None and self.docker:
            from .ssh_remote import DockerSocket

            try:
                engine = DockerSocket(self.info["docker_host"], timeout=10)
                self._containers = {
                    c["Id"]: c for c in engine.containers([f"io.easylaunch.batch={self.info['batch_id']}"])
                }
            except Exception:
                return None
        return self._containers


def _settle_dead(run_dir: str, batch: Optional[_Batch]) -> None:
    """Record what the host knows of a run whose processes are gone (no agent to do it)."""
    status = records.read_status(run_dir)
    state = status.get("state")
    if state in TERMINAL_STATES:
        return
    if batch is not None and batch.docker:
        if batch.agent_alive:
            return
        i = batch.group_of.get(run_dir)
        containers = batch.containers()
        if i is None or containers is None:
            return
        task = (batch.state.get("tasks") or {}).get(str(i)) or {}
        c = containers.get(task.get("container", ""))
        if c is not None and c.get("State") not in ("exited", "dead"):
            return
        if state == State.PENDING and not task:
            transitions.starter_gone(run_dir, "the easylaunch agent")
        else:
            transitions.died_without_record(run_dir, f"container {task.get('name', '?')} (gone)")
        return
    if state == State.RUNNING:
        if not alive(status.get("pid"), status.get("pid_token")):
            transitions.died_without_record(run_dir, f"runner process {status.get('pid')}")
        return
    if state == State.PENDING and batch is not None and not batch.agent_alive:
        i = batch.group_of.get(run_dir)
        if i is not None and batch.task_alive(i):
            return  # its task runner still goes through the group
        if os.path.exists(os.path.join(run_dir, records.CANCEL_MARK)):
            transitions.cancelled_before_start(run_dir)
        else:
            transitions.starter_gone(run_dir, "the easylaunch agent")


def _scan(
    run_dir: str, known: Dict[str, list], status: Optional[bytes], status_stat: Any, budget: list
) -> list:
    """The files of ``run_dir`` that differ from ``known`` (``name -> [size, mtime_ns]``)."""
    out = []
    for top, dirs, files in os.walk(run_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = os.path.join(top, name)
            rel = os.path.relpath(path, run_dir).replace(os.sep, "/")
            if name.startswith(".") or rel in NOT_FETCHED or rel.startswith("payload.attempt"):
                continue
            if rel == records.STATUS and status is not None:
                size, mtime = len(status), status_stat.st_mtime_ns
                if known.get(rel) == [size, mtime]:
                    continue
                out.append({"name": rel, "size": size, "mtime_ns": mtime, "data": _b64(status)})
                continue
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not (st.st_mode & 0o170000 == 0o100000):  # regular files only
                continue
            sig = [st.st_size, st.st_mtime_ns]
            have = known.get(rel)
            if have == sig:
                continue
            entry: Dict[str, Any] = {"name": rel, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
            offset = 0
            if have and rel.endswith(".log") and st.st_size > have[0]:
                offset = have[0]  # logs only grow: send what is new
            if st.st_size - offset <= INLINE_LIMIT and budget[0] >= st.st_size - offset:
                try:
                    with open(path, "rb") as f:
                        f.seek(offset)
                        data = f.read(st.st_size - offset)
                except OSError:
                    continue
                budget[0] -= len(data)
                entry["size"] = offset + len(data)
                if offset:
                    entry["offset"] = offset
                entry["data"] = _b64(data)
            else:
                entry["fetch"] = True
            out.append(entry)
    return out


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def poll(request: Dict[str, Any]) -> Dict[str, Any]:
    """``{"runs": [{"dir", "batch", "files"}]}`` -> ``{"runs": [{"dir", "missing"?, "files"}]}``."""
    batches: Dict[str, _Batch] = {}
    budget = [int(request.get("inline_total") or INLINE_TOTAL)]
    out = []
    for run in request.get("runs") or []:
        run_dir = run["dir"]
        if not os.path.isdir(run_dir):
            out.append({"dir": run_dir, "missing": True})
            continue
        batch = None
        if run.get("batch"):
            if run["batch"] not in batches:
                batches[run["batch"]] = _Batch(run["batch"])
            batch = batches[run["batch"]]
        if run.get("live", True):
            _settle_dead(run_dir, batch)
        status, st = None, None
        try:
            fd = os.open(os.path.join(run_dir, records.STATUS), os.O_RDONLY)
            try:
                st = os.fstat(fd)
                status = os.read(fd, 1 << 20)
            finally:
                os.close(fd)
        except OSError:
            pass
        files = _scan(run_dir, run.get("files") or {}, status, st, budget)
        out.append({"dir": run_dir, "files": files})
    return {"runs": out, "time": time.time()}


# -- cancel -------------------------------------------------------------------------------


def cancel(request: Dict[str, Any]) -> Dict[str, Any]:
    """Cancel marks for ``{"runs": [{"dir", "batch"}]}``; a task whose runs are all marked (or
    finished) is stopped: SIGTERM to its process group, or to its container."""
    batches: Dict[str, List[str]] = {}
    for run in request.get("runs") or []:
        run_dir = run["dir"]
        if not os.path.isdir(run_dir):
            continue
        Path(run_dir, records.CANCEL_MARK).touch()
        batches.setdefault(run.get("batch") or "", []).append(run_dir)
    stopped = 0
    for batch_dir, dirs in batches.items():
        batch = _Batch(batch_dir) if batch_dir else None
        if batch is None:
            continue
        tasks = batch.state.get("tasks") or {}
        for i, group in enumerate(batch.info.get("groups") or []):
            if not set(group) & set(dirs):
                continue
            if not all(
                os.path.exists(os.path.join(d, records.CANCEL_MARK))
                or transitions.current(d) in TERMINAL_STATES
                for d in group
            ):
                continue  # the task runner stops the marked runs itself
            task = tasks.get(str(i)) or {}
            if "pid" in task and alive(task.get("pid"), task.get("token")):
                try:
                    os.killpg(int(task["pid"]), signal.SIGTERM)
                    stopped += 1
                except OSError:
                    pass
            elif "container" in task:
                from .ssh_remote import DockerSocket

                try:
                    DockerSocket(batch.info["docker_host"], timeout=10).kill(task["container"], "SIGTERM")
                    stopped += 1
                except Exception:
                    pass
            elif not batch.agent_alive:
                for d in group:
                    if transitions.current(d) == State.PENDING:
                        transitions.cancelled_before_start(d)
    return {"stopped": stopped}


def handle(request: Dict[str, Any]) -> Dict[str, Any]:
    """One request of ``serve``."""
    command = request.get("cmd")
    if command == "start":
        return start(request["root"], request["upload"], request["batch_dir"])
    if command == "poll":
        return poll(request)
    if command == "cancel":
        return cancel(request)
    if command == "ping":
        return {"pong": True}
    return {"error": f"unknown request {command!r}"}


def serve() -> int:
    """Answer requests, one JSON line each, until stdin closes (the SSH channel went away)."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        line = stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue
        try:
            answer = handle(json.loads(line))
        except Exception as exc:  # an answer in any case: the launcher waits for one
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        stdout.write(json.dumps(answer).encode() + b"\n")
        stdout.flush()


def main(argv: List[str]) -> int:
    if not argv:
        print("usage: python -m easylaunch.ssh_agent serve|run|poll|cancel ...", file=sys.stderr)
        return 2
    command = argv[0]
    if command == "serve" and len(argv) == 1:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return serve()
    if command == "run" and len(argv) == 2:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        return Agent(argv[1]).run()
    if command in ("poll", "cancel"):
        request = json.loads(sys.stdin.read() or "{}")
        answer = poll(request) if command == "poll" else cancel(request)
        sys.stdout.write(json.dumps(answer))
        sys.stdout.flush()
        return 0
    print(f"easylaunch ssh_agent: bad arguments {argv!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
