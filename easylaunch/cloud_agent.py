"""Target side of modes ``ec2`` and ``gcp``: what runs on the cloud instance after its boot script.

Python 3.8+, standard library and easylaunch's target side only::

    PYTHONPATH=EASYLAUNCH.zip:CLOUDPICKLE.zip python3 -m easylaunch.cloud_agent run \\
        --store s3://BUCKET/PREFIX --spec EXP/.batches/BATCH/instance-3.json --root /var/lib/easylaunch
    ... cloud_agent sync --root ROOT     # one more sync now (GCE's shutdown script)

``run`` reads the instance's spec from the bucket, downloads the code snapshot and the ONE
archive of this instance's run directories, and starts :mod:`easylaunch.ssh_agent`'s agent on
them (``max_parallel`` warm task runners, on the VM's Python or in Docker through the VM's
daemon). While it works, every run directory is synced to the bucket: everything the function
wrote (no suffix list), files whose size or mtime changed, each upload checked by MD5 on the
server, ``status.json`` last. It syncs every ``sync_interval`` seconds, at once when the cloud
announces the end of the instance (EC2 ``spot/instance-action``, GCE ``instance/preempted``),
and at the end, after every run has finished (it waits for all of them). On a notice the runs
are stopped as a requeue (their ``checkpoint()`` hook, when the function has one, saves the
resume payload) and recorded PREEMPTED; the launcher may then recover them on a new instance.
Cancel marks put in the bucket by the launcher reach the runs at the next sync. When all is
synced the instance terminates (EC2) or deletes (GCE) itself.

The agent's own record, ``<batch>/instance-K.state.json`` in the bucket, says the instance id,
the last sync, the notice and the end, so the launcher knows what a dead instance left.

The final syncs (at the end, and on a notice) do not give up when the bucket does not answer
or refuses for a while: each pass is retried with backoff (every retry logged on the agent's
stderr, the instance's ``boot.log``), until every object is in the bucket with its checksum
(one listing compares them), each run's ``status.json`` after its other files and the
instance's record last; or until a deadline: the notice window (EC2: the time in
``spot/instance-action``, 2 minutes; GCE: 30 s) minus ``notice_margin``, or
``final_sync_timeout`` seconds at the end. The record's ``final_sync`` says it is done (the
launcher's ``easylaunch recover`` waits for that, or for the instance's end).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import cloud_store, records, transitions
from .spec import TERMINAL_STATES, State

NOTICE_FILE = "preemption.notice"
LOCAL_SPEC = "cloud-spec.json"
#: touched by the agent every NOTICE_POLL: the shutdown script's sync leaves the notice to it
HEARTBEAT = "agent.alive"
#: written by the agent when its final sync has ended (``{"why", "ok", "at"}``)
FINAL_MARK = "final-sync.json"
#: seconds between two looks at the metadata server for a spot / preemption notice
NOTICE_POLL = 1.0
#: how long the cloud lets an instance live after its notice, when the notice does not say
NOTICE_WINDOW = {"aws": 120.0, "gcp": 30.0}
#: seconds of the notice window kept free at its end (the final sync must be over by then)
NOTICE_MARGIN = 5.0
#: seconds the final sync at the end of the runs keeps retrying (spec ``final_sync_timeout``)
FINAL_SYNC_TIMEOUT = 600.0
#: a periodic sync gives up after this many seconds without an answer (the next one retries);
#: the notice is not watched meanwhile
PERIODIC_RETRY = 5.0
#: what a failed pass of a sync may raise: retried
RETRYABLE = (cloud_store.StoreError, OSError, http.client.HTTPException, ValueError)


class SyncIncomplete(cloud_store.StoreError):
    """Some objects of a sync pass were not written (the others were)."""


def _log(msg: str) -> None:
    print(time.strftime("%H:%M:%S ") + msg, file=sys.stderr, flush=True)


class Instance:
    """This VM as its provider's metadata service describes it."""

    def __init__(self, spec: Dict[str, Any]):
        self.spec = spec
        self.provider = spec["provider"]
        if self.provider == "aws":
            self.imds = cloud_store.ImdsV2()
        else:
            self.gce = cloud_store.GceMetadata()

    def ident(self) -> str:
        if self.provider == "aws":
            return str(self.imds.get("instance-id"))
        return str(self.gce.get("instance/name"))

    def notice(self) -> Optional[str]:
        """What the cloud says about this instance's coming end, None while there is nothing."""
        try:
            if self.provider == "aws":
                return self.imds.get("spot/instance-action", missing_ok=True)
            value = self.gce.get("instance/preempted", missing_ok=True)
            return value if value and value.strip().upper() == "TRUE" else None
        except cloud_store.StoreError:
            return None

    def terminate(self) -> None:
        if self.provider == "aws":
            cloud_store.ec2_terminate(self.ident(), self.spec["region"])
        else:
            cloud_store.gce_delete(
                self.spec["compute"], self.spec["project"], self.spec["zone"], self.ident()
            )


class Syncer:
    """Pushes the instance's run directories to the bucket (changed files, status last)."""

    def __init__(self, store: cloud_store.Store, root: str, exp: str, runs: List[str], exp_key: str):
        self.store, self.root, self.exp, self.runs, self.exp_key = store, root, exp, runs, exp_key
        self.sent: Dict[str, Tuple[int, int]] = {}
        #: key (run/rel) -> (size, MD5 hex) of what this agent wrote
        self.md5: Dict[str, Tuple[int, str]] = {}
        self.lock = threading.Lock()
        self.last_sync: Optional[float] = None
        self.puts = 0

    def _files(self, run: str) -> Dict[str, Tuple[int, int]]:
        out: Dict[str, Tuple[int, int]] = {}
        base = os.path.join(self.root, self.exp, run)
        for top, dirs, files in os.walk(base):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if name.startswith(".") or (top == base and name == records.MANIFEST):
                    continue  # hidden, or the launcher's own record (it has the instance id)
                path = os.path.join(top, name)
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                out[os.path.relpath(path, base).replace(os.sep, "/")] = (st.st_size, st.st_mtime_ns)
        return out

    def mark_sent(self) -> None:
        """What is on disk now came from the bucket: nothing to send back."""
        for run in self.runs:
            for rel, sig in self._files(run).items():
                self.sent[f"{run}/{rel}"] = sig

    def pending(self) -> int:
        """How many files differ from what was sent."""
        return sum(
            1
            for run in self.runs
            for rel, sig in self._files(run).items()
            if self.sent.get(f"{run}/{rel}") != sig
        )

    def sync(self, keep_going: bool = True) -> int:
        """One pass over every run; returns the number of objects written.

        A run whose object cannot be written is left there for this pass (its ``status.json``
        is never sent ahead of its other files); the other runs go on (not without
        ``keep_going``); then :class:`SyncIncomplete` names what failed."""
        with self.lock:
            n = 0
            failed: List[str] = []
            for run in self.runs:
                files = self._files(run)
                order = sorted(files, key=lambda rel: rel == records.STATUS)  # status last
                for rel in order:
                    key = f"{run}/{rel}"
                    if self.sent.get(key) == files[rel]:
                        continue
                    path = os.path.join(self.root, self.exp, run, *rel.split("/"))
                    try:
                        with open(path, "rb") as f:
                            data = f.read()
                        sig = os.stat(path)
                    except OSError:
                        continue
                    try:
                        md5 = self.store.put(f"{self.exp_key}/{key}", data)
                    except RETRYABLE as err:
                        failed.append(f"{key}: {err}")
                        break  # the rest of this run (its status last) waits for the next pass
                    self.sent[key] = (len(data), sig.st_mtime_ns) if len(data) == sig.st_size else files[rel]
                    self.md5[key] = (len(data), md5)
                    n += 1
                if failed and not keep_going:
                    break
            self.puts += n
            if failed:
                raise SyncIncomplete(
                    f"{len(failed)} run(s) not fully synced ({n} object(s) written): "
                    + "; ".join(failed)[:600]
                )
            self.last_sync = time.time()
            return n

    def verify(self) -> List[str]:
        """One listing: the objects this agent wrote that the bucket lacks or holds with another
        checksum (an endpoint that lost them); they and their run's status are sent again."""
        listing = self.store.list(f"{self.exp_key}/")
        bad = []
        with self.lock:
            for key, (size, md5) in self.md5.items():
                there = listing.get(f"{self.exp_key}/{key}")
                if there is None:
                    bad.append(key)
                elif there[1] and len(there[1]) == 32 and md5:
                    if there[1] != md5:
                        bad.append(key)
                elif there[0] != size:
                    bad.append(key)
            for key in bad:
                self.sent.pop(key, None)
                self.sent.pop(f"{key.split('/', 1)[0]}/{records.STATUS}", None)  # status after them again
        return bad


def sync_until(
    syncer: Syncer,
    deadline: float,
    why: str,
    last: Optional[Callable[[int], None]] = None,
) -> bool:
    """Sync, verify, then ``last(attempts)`` (the instance's record), retried with backoff until
    everything is written or ``deadline`` (:func:`time.monotonic`); each retry logged. Every
    request of a pass is tried once: the retries are these passes."""
    attempt, delay, t0 = 0, 0.5, time.monotonic()
    while True:
        attempt += 1
        try:
            with syncer.store.bounded(retry_for=0, deadline=deadline):
                syncer.sync()
                bad = syncer.verify()
                if bad:
                    raise cloud_store.StoreError(
                        f"{len(bad)} object(s) missing or with another checksum in the bucket "
                        f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); sending them again"
                    )
                if last is not None:
                    last(attempt)
        except RETRYABLE as err:
            left = deadline - time.monotonic()
            if left <= 0.05:
                _log(
                    f"final sync ({why}): GIVING UP after {attempt} attempt(s) in {time.monotonic() - t0:.1f} s "
                    f"(deadline reached); {syncer.pending()} file(s) not synced; last error: {err}"
                )
                return False
            wait = min(delay, left)
            _log(
                f"final sync ({why}): attempt {attempt} failed: {err}; {syncer.pending()} file(s) still to "
                f"send; retrying in {wait:.1f} s ({left:.0f} s left before the deadline)"
            )
            time.sleep(wait)
            delay = min(delay * 2, 5.0)
            continue
        if attempt > 1:
            _log(
                f"final sync ({why}): done on attempt {attempt}, {time.monotonic() - t0:.1f} s after the first"
            )
        return True


def _unpack(data: bytes, root: str) -> None:
    import io
    import tarfile

    from .ssh_agent import _safe_members, write_member

    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in _safe_members(tar, root):
            if m.name != "spec.json":
                write_member(tar, m, root)


def _agent_file(spec: Dict[str, Any], root: str, batch_dir: str, zips: List[str]) -> Dict[str, Any]:
    """The ssh agent's ``agent.json`` for this instance's runs, with this instance's paths."""
    from .runtimes import DockerRuntime, Mount, PlainRuntime

    exp_dir = os.path.join(root, spec["exp"])
    groups = [[os.path.join(exp_dir, r) for r in g] for g in spec["groups"]]
    tasks_file = os.path.join(batch_dir, "tasks.json")
    env = {
        "EASYLAUNCH_SNAPSHOT_CACHE": os.path.join(root, ".snapshots-unpacked"),
        "EASYLAUNCH_ENVIRONMENT": "cloud",
        "EASYLAUNCH_PREEMPT_NOTICE": os.path.join(batch_dir, NOTICE_FILE),
    }
    agent: Dict[str, Any] = {
        "batch_id": spec["batch_id"],
        "exp": spec["exp"],
        "python": sys.executable,
        "max_parallel": int(spec.get("max_parallel") or 1),
        "groups": groups,
        "tasks_file": tasks_file,
    }
    docker = spec.get("docker")
    if docker:
        agent.update(
            runtime="docker", docker_host=docker.get("host") or "unix:///var/run/docker.sock", containers=[]
        )
        for i, group in enumerate(groups):
            rt = DockerRuntime(
                image=docker["image"],
                mounts=[
                    Mount(os.path.join(root, ".snapshots"), None, True),
                    Mount(os.path.join(root, ".zips"), None, True),
                    Mount(os.path.join(root, ".snapshots-unpacked"), None, False),
                    Mount(batch_dir, None, False),
                    *[Mount(d, None, False) for d in group],
                ],
                gpu=bool(docker.get("gpu")),
                gpu_id=docker.get("gpu_id"),
                env={"HOME": "/tmp", **env, **(docker.get("env") or {})},
                labels={
                    "io.easylaunch.managed": "1",
                    "io.easylaunch.exp": spec["exp"],
                    "io.easylaunch.batch": spec["batch_id"],
                    "io.easylaunch.task": str(i),
                },
                options=dict(docker.get("options") or {}),
                python=docker.get("python") or "python3",
            )
            body = rt.container_config(["--tasks", tasks_file, "--index", str(i), "--quiet"], zips)
            name = f"easylaunch-{spec['exp'][:40]}-{spec['batch_id']}-{spec['instance']}-{i}"
            agent["containers"].append({"name": name, "body": body})
    else:
        cmd = PlainRuntime(python=sys.executable).command(zips)
        agent.update(
            runtime="plain", command=[str(w) for w in cmd.prefix], env={**env, "PYTHONPATH": ":".join(zips)}
        )
    return agent


class CloudAgent:
    """One instance's life: set up, run, sync, notice, final sync, terminate."""

    def __init__(self, store_url: str, archive_key: str, root: str):
        import io
        import tarfile

        self.root = os.path.abspath(root)
        region = os.environ.get("EASYLAUNCH_REGION") or "us-east-1"
        self.store = cloud_store.open_store(store_url, region=region)
        self.archive = self.store.get(archive_key)
        with tarfile.open(fileobj=io.BytesIO(self.archive), mode="r:gz") as tar:
            member = tar.extractfile("spec.json")
            self.spec: Dict[str, Any] = json.loads(member.read())  # type: ignore[union-attr]
        self.exp = self.spec["exp"]
        self.batch_dir = os.path.join(
            self.root, self.exp, ".batches", self.spec["batch_id"], str(self.spec["instance"])
        )
        self.instance = Instance(self.spec)
        self.provider_name = str(self.spec.get("provider") or "aws")
        self.runs = [r for g in self.spec["groups"] for r in g]
        self.syncer = Syncer(self.store, self.root, self.exp, self.runs, self.spec["exp_key"])
        self.state: Dict[str, Any] = {"instance": self.spec["instance"], "started": time.time()}
        self.notice: Optional[str] = None

    def give_up(self, exc: BaseException) -> int:
        """After a failure of :meth:`run`: save what can be saved, end the instance (exit 1)."""
        return _give_up(self, exc)

    def put_state(self, **fields: Any) -> None:
        self.state.update(fields, last_sync=self.syncer.last_sync, puts=self.syncer.puts)
        self.store.put(self.spec["state_key"], json.dumps(self.state).encode())

    def setup(self) -> None:
        os.makedirs(self.batch_dir, exist_ok=True)
        for sub in (".snapshots", ".snapshots-unpacked", ".zips"):  # Docker binds them: they must exist
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        for key in self.spec.get("code") or []:
            local = os.path.join(self.root, ".snapshots", os.path.basename(key))
            if not os.path.exists(local):
                records.atomic_write_bytes(local, self.store.get(key))
        _unpack(self.archive, os.path.join(self.root, self.exp))
        self.archive = b""
        self.syncer.mark_sent()
        zips = [os.path.join(self.root, ".zips", os.path.basename(z)) for z in self.spec["zips"]]
        agent = _agent_file(self.spec, self.root, self.batch_dir, zips)
        tasks = {"groups": [[os.path.join(d, records.PAYLOAD) for d in g] for g in agent["groups"]]}
        records.atomic_write_json(os.path.join(self.batch_dir, "tasks.json"), tasks)
        records.atomic_write_json(os.path.join(self.batch_dir, "agent.json"), agent, 0o600)
        records.atomic_write_json(os.path.join(self.root, LOCAL_SPEC), {"store": self.store.url, **self.spec})

    def cancel_marks(self) -> None:
        """Cancel marks the launcher put in the bucket: give them to the runs."""
        from .ssh_agent import cancel

        exp_key = self.spec["exp_key"]
        listing = self.store.list(f"{exp_key}/")
        marked = []
        for run in self.runs:
            local = os.path.join(self.root, self.exp, run)
            if f"{exp_key}/{run}/{records.CANCEL_MARK}" in listing and not os.path.exists(
                os.path.join(local, records.CANCEL_MARK)
            ):
                marked.append({"dir": local, "batch": self.batch_dir})
        if marked:
            _log(f"cancel requested for {len(marked)} run(s)")
            cancel({"runs": marked})
            for m in marked:  # the mark came from the bucket: not sent back
                rel = f"{os.path.basename(m['dir'])}/{records.CANCEL_MARK}"
                st = os.stat(os.path.join(m["dir"], records.CANCEL_MARK))
                self.syncer.sent[rel] = (st.st_size, st.st_mtime_ns)

    def notice_deadline(self, what: str) -> float:
        """When the final sync of a notice must be over (:func:`time.monotonic`): the end the
        notice names (EC2's ``time``), else the provider's window, minus ``notice_margin``."""
        import datetime

        now_wall, now = time.time(), time.monotonic()
        window = float(self.spec.get("notice_window") or NOTICE_WINDOW.get(self.provider_name, 30.0))
        end = now + window
        try:
            stamp = json.loads(what).get("time", "")
            when = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")
            left = when.replace(tzinfo=datetime.timezone.utc).timestamp() - now_wall
            if 0 < left < window:
                end = now + left
        except (ValueError, AttributeError, TypeError):
            pass
        margin = float(self.spec.get("notice_margin") or NOTICE_MARGIN)
        return max(now + 1.0, end - margin)

    def put_state_soon(self, seconds: float = 3.0, **fields: Any) -> None:
        """The instance's record now if the bucket answers within ``seconds``; else later."""
        self.state.update(fields)
        try:
            with self.store.bounded(retry_for=seconds, deadline=time.monotonic() + seconds):
                self.put_state()
        except RETRYABLE as err:
            _log(f"could not write this instance's record yet ({err}); the next sync will")

    def final_sync(self, why: str, deadline: float, **fields: Any) -> bool:
        """Every run synced and verified, then the instance's record (``final_sync`` set),
        retried until ``deadline``; the local mark says how it went (the shutdown script)."""

        def record(attempts: int) -> None:
            self.put_state(**fields, final_sync={"why": why, "done": time.time(), "attempts": attempts})

        ok = sync_until(self.syncer, deadline, why, record)
        if not ok:
            self.put_state_soon(**fields, final_sync={"why": why, "failed": time.time()})
        records.atomic_write_json(
            os.path.join(self.root, FINAL_MARK), {"why": why, "ok": ok, "at": time.time()}
        )
        return ok

    def heartbeat(self) -> None:
        """Touch the heartbeat every NOTICE_POLL from a thread of its own (the main one may be
        busy with a notice for a while) until the final sync has ended."""
        path = os.path.join(self.root, HEARTBEAT)

        def beat() -> None:
            while not os.path.exists(os.path.join(self.root, FINAL_MARK)):
                try:
                    with open(path, "a"):
                        pass
                    os.utime(path)
                except OSError:
                    pass
                time.sleep(NOTICE_POLL)

        threading.Thread(target=beat, daemon=True, name="heartbeat").start()

    def on_notice(self, what: str, agent_proc: subprocess.Popen) -> bool:
        """The instance is going away: stop the runs as a requeue (their checkpoint() hooks run),
        record them PREEMPTED, sync at once (retried inside the notice window). True when all
        is in the bucket."""
        from .procs import alive

        sync_deadline = self.notice_deadline(what)
        _log(f"notice: {what.strip()[:200]} (final sync due in {sync_deadline - time.monotonic():.0f} s)")
        self.notice = what
        records.atomic_write_bytes(os.path.join(self.batch_dir, NOTICE_FILE), what.encode())
        agent_proc.kill()  # it would start queued tasks, and call a requeued run FAILED
        agent_proc.wait()
        notice_at = time.time()
        requeues = {
            run: int(records.read_status(os.path.join(self.root, self.exp, run)).get("requeues") or 0)
            for run in self.runs
        }
        state = records.read_json(os.path.join(self.batch_dir, "state.json"), {}) or {}
        agent = records.read_json(os.path.join(self.batch_dir, "agent.json"), {}) or {}
        engine = None
        waiting: List[Dict[str, Any]] = []
        for task in (state.get("tasks") or {}).values():
            try:
                if "pid" in task:
                    os.killpg(int(task["pid"]), signal.SIGTERM)
                elif "container" in task:
                    from .ssh_remote import DockerSocket

                    engine = engine or DockerSocket(agent["docker_host"], timeout=10)
                    engine.kill(task["container"], "SIGTERM")
                waiting.append(task)
            except Exception:
                pass
        # the launcher learns of the notice while the checkpoints are being written
        self.put_state_soon(2.0, notice=notice_at, notice_text=what[:500])
        # a fifth of what is left of the window stays for the sync
        reserve = max(2.0, 0.2 * (sync_deadline - time.monotonic()))
        deadline = min(time.monotonic() + float(self.spec.get("notice_wait") or 60), sync_deadline - reserve)
        while waiting and time.monotonic() < deadline:
            time.sleep(0.2)
            still = []
            for task in waiting:
                if "pid" in task:
                    if alive(task.get("pid"), task.get("token")):
                        still.append(task)
                else:
                    try:
                        st = (engine.inspect(task["container"]) or {}).get("State") or {}  # type: ignore[union-attr]
                        if st.get("Running"):
                            still.append(task)
                        else:
                            engine.remove(task["container"])  # type: ignore[union-attr]
                    except Exception:
                        pass
            waiting = still
        for run in self.runs:
            d = os.path.join(self.root, self.exp, run)
            if transitions.current(d) not in TERMINAL_STATES:
                status = records.read_status(d)
                saved = int(status.get("requeues") or 0) > requeues[run]
                transitions.settle(
                    d,
                    State.PREEMPTED,
                    f"the instance was reclaimed ({self.spec['provider']} notice: "
                    f"{what.strip()[:120]}){'; its checkpoint was saved' if saved else ''}",
                    # the launcher's `easylaunch recover`: this PREEMPTED is the instance's own,
                    # synced after the run's other objects (its checkpoint among them)
                    notice_sync={"attempt": status.get("attempt"), "checkpoint": saved},
                )
        return self.final_sync("notice", sync_deadline, phase="preempted")

    def run(self) -> int:
        self.put_state(instance_id=self.instance.ident(), phase="setup")
        self.setup()
        self.heartbeat()
        log = open(os.path.join(self.batch_dir, "agent.log"), "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "easylaunch.ssh_agent", "run", self.batch_dir],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd=self.batch_dir,
            env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
        )
        log.close()
        self.put_state(phase="running")
        interval = float(self.spec.get("sync_interval") or 15)
        next_sync = time.time() + interval
        while proc.poll() is None:
            if self.notice is None:
                what = self.instance.notice()
                if what:
                    # the cloud reclaims the instance at the end of the window: no terminate
                    return 0 if self.on_notice(what, proc) else 1
            if time.time() >= next_sync:
                try:
                    with self.store.bounded(retry_for=PERIODIC_RETRY):
                        self.cancel_marks()
                        self.syncer.sync(keep_going=False)
                        self.put_state()
                except RETRYABLE as err:
                    _log(f"sync failed, the next one retries: {err}")
                next_sync = time.time() + interval
            time.sleep(NOTICE_POLL)
        timeout = float(self.spec.get("final_sync_timeout") or FINAL_SYNC_TIMEOUT)
        ok = self.final_sync("end of the runs", time.monotonic() + timeout, phase="done", done=time.time())
        if ok:
            _log(f"all runs ended and synced ({self.syncer.puts} objects written)")
        else:
            _log(
                f"all runs ended; the bucket took not all of their outputs in {timeout:.0f} s "
                "(final_sync_timeout): the launcher sees them as of their last sync"
            )
        if self.spec.get("terminate", True):
            try:
                self.instance.terminate()
            except cloud_store.StoreError as err:
                _log(f"could not terminate this instance: {err}")
                return 1
        return 0 if ok else 1


#: seconds an agent that failed spends saving what it can before it ends its instance
GIVE_UP_SECONDS = 60.0


def _give_up(agent: "CloudAgent", exc: BaseException) -> int:
    """The agent failed (a bug, a bucket that refuses its first write, Ctrl-C): sync what the runs
    wrote and say why in the instance's record, both best effort within GIVE_UP_SECONDS, then
    end the instance, which would otherwise run (and cost) with nobody to sync or end it."""
    import traceback

    _log("the agent failed: " + "".join(traceback.format_exception_only(type(exc), exc)).strip())
    traceback.print_exc()
    deadline = time.monotonic() + GIVE_UP_SECONDS
    try:
        with agent.store.bounded(retry_for=10.0, deadline=deadline):
            agent.syncer.sync(keep_going=True)
    except BaseException as err:  # noqa: BLE001 - best effort, the instance ends anyway
        _log(f"could not sync the runs' outputs: {err}")
    try:
        with agent.store.bounded(retry_for=10.0, deadline=deadline):
            agent.put_state(phase="failed", error=f"{type(exc).__name__}: {exc}"[:2000], done=time.time())
    except BaseException as err:  # noqa: BLE001
        _log(f"could not record the failure: {err}")
    if agent.spec.get("terminate", True):
        try:
            agent.instance.terminate()
            _log("ended this instance (nothing would sync or end it now)")
        except BaseException as err:  # noqa: BLE001
            _log(f"could not terminate this instance: {err}; end it with `easylaunch cloud cleanup`")
    return 1


def _agent_alive(root: str, fresh: float = 5.0) -> bool:
    """The agent touched its heartbeat in the last ``fresh`` seconds (works across the PID
    namespaces of a container and its host)."""
    try:
        return time.time() - os.stat(os.path.join(root, HEARTBEAT)).st_mtime < fresh
    except OSError:
        return False


def sync_once(root: str, seconds: float = 25.0) -> int:
    """One more sync of every run of this instance (GCE's shutdown script calls it), retried for
    ``seconds``. While the agent is alive it handles the notice itself (two writers would race):
    this waits for its final sync instead. Returns the objects written (-1: not all)."""
    if _agent_alive(root):
        _log("the agent is alive: it syncs on the notice; waiting for its final sync")
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            mark = records.read_json(os.path.join(root, FINAL_MARK))
            if mark:
                _log(
                    f"the agent's final sync ({mark.get('why')}) ended: {'ok' if mark.get('ok') else 'NOT all synced'}"
                )
                return 0
            if not _agent_alive(root):
                break
            time.sleep(0.5)
        else:
            return 0
    spec = records.read_json(os.path.join(root, LOCAL_SPEC))
    store = cloud_store.open_store(spec["store"], region=spec.get("region") or "us-east-1")
    syncer = Syncer(store, root, spec["exp"], [r for g in spec["groups"] for r in g], spec["exp_key"])
    ok = sync_until(syncer, time.monotonic() + seconds, "shutdown script")
    return syncer.puts if ok else -1


def main(argv: List[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m easylaunch.cloud_agent")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("--store", required=True)
    run.add_argument("--spec", required=True, help="the key of this instance's archive (runs + spec.json)")
    run.add_argument("--root", required=True)
    sync = sub.add_parser("sync")
    sync.add_argument("--root", required=True)
    sync.add_argument("--seconds", type=float, default=25.0, help="retry for this long (GCE: 30 s notice)")
    args = parser.parse_args(argv)
    if args.cmd == "sync":
        n = sync_once(args.root, args.seconds)
        _log(f"synced {n} object(s)" if n >= 0 else "not everything could be synced")
        return 0 if n >= 0 else 1
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    agent = CloudAgent(args.store, args.spec, args.root)  # fails before anything runs: no spec
    try:
        return agent.run()
    except BaseException as exc:
        return agent.give_up(exc)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
