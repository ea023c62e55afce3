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
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from . import cloud_store, records, transitions
from .spec import TERMINAL_STATES, State

NOTICE_FILE = "preemption.notice"
LOCAL_SPEC = "cloud-spec.json"
#: seconds between two looks at the metadata server for a spot / preemption notice
NOTICE_POLL = 1.0


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
        self.lock = threading.Lock()
        self.last_sync: Optional[float] = None
        self.puts = 0

    def _files(self, run: str) -> Dict[str, Tuple[int, int]]:
        out: Dict[str, Tuple[int, int]] = {}
        base = os.path.join(self.root, self.exp, run)
        for top, dirs, files in os.walk(base):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in files:
                if name.startswith("."):
                    continue
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

    def sync(self) -> int:
        """One pass over every run; returns the number of objects written."""
        with self.lock:
            n = 0
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
                    self.store.put(f"{self.exp_key}/{key}", data)
                    self.sent[key] = (len(data), sig.st_mtime_ns) if len(data) == sig.st_size else files[rel]
                    n += 1
            self.puts += n
            self.last_sync = time.time()
            return n


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
        self.runs = [r for g in self.spec["groups"] for r in g]
        self.syncer = Syncer(self.store, self.root, self.exp, self.runs, self.spec["exp_key"])
        self.state: Dict[str, Any] = {"instance": self.spec["instance"], "started": time.time()}
        self.notice: Optional[str] = None

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

    def on_notice(self, what: str, agent_proc: subprocess.Popen) -> None:
        """The instance is going away: stop the runs as a requeue (their checkpoint() hooks run),
        record them PREEMPTED, sync at once."""
        from .procs import alive

        _log(f"notice: {what.strip()[:200]}")
        self.notice = what
        records.atomic_write_bytes(os.path.join(self.batch_dir, NOTICE_FILE), what.encode())
        agent_proc.kill()  # it would start queued tasks, and call a requeued run FAILED
        agent_proc.wait()
        self.put_state(notice=time.time(), notice_text=what[:500])
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
        deadline = time.time() + float(self.spec.get("notice_wait") or 60)
        while waiting and time.time() < deadline:  # the checkpoints are being written
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
                saved = "; its checkpoint was saved" if records.read_status(d).get("requeues") else ""
                transitions.settle(
                    d,
                    State.PREEMPTED,
                    f"the instance was reclaimed ({self.spec['provider']} notice: "
                    f"{what.strip()[:120]}){saved}",
                )
        self.syncer.sync()

    def run(self) -> int:
        self.put_state(instance_id=self.instance.ident(), phase="setup")
        self.setup()
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
                    self.on_notice(what, proc)
                    break
            if time.time() >= next_sync:
                try:
                    self.cancel_marks()
                    self.syncer.sync()
                    self.put_state()
                except cloud_store.StoreError as err:
                    _log(f"sync failed, will retry: {err}")
                next_sync = time.time() + interval
            time.sleep(NOTICE_POLL)
        self.syncer.sync()
        self.put_state(phase="done", done=time.time())
        _log(f"all runs ended and synced ({self.syncer.puts} objects written)")
        if self.spec.get("terminate", True) and self.notice is None:
            try:
                self.instance.terminate()
            except cloud_store.StoreError as err:
                _log(f"could not terminate this instance: {err}")
                return 1
        return 0


def sync_once(root: str) -> int:
    """One more sync of every run of this instance (GCE's shutdown script calls it)."""
    spec = records.read_json(os.path.join(root, LOCAL_SPEC))
    store = cloud_store.open_store(spec["store"], region=spec.get("region") or "us-east-1")
    syncer = Syncer(store, root, spec["exp"], [r for g in spec["groups"] for r in g], spec["exp_key"])
    return syncer.sync()


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
    args = parser.parse_args(argv)
    if args.cmd == "sync":
        _log(f"synced {sync_once(args.root)} object(s)")
        return 0
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    return CloudAgent(args.store, args.spec, args.root).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
