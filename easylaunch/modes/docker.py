"""``local_docker`` (alias ``docker``): runs in Docker or Podman containers on this machine.

Through the Docker SDK against ``docker_host=`` / ``$DOCKER_HOST`` (default: the local
socket), so the same mode drives dockerd and Podman's Docker-compatible socket::

    sweep = run_sweep(train, variants, exp_name="demo", mode="docker",
                      docker_image="python:3.11", max_parallel=4, expected_duration=5)

Each container runs the warm task runner (``python3 -m easylaunch.runner --tasks``) on one
group of ``variants_per_task`` runs (chosen from ``expected_duration`` like on Slurm), each
forked with its own run directory, state, result and cancel: the container start and the
imports are paid once per group. The image needs only Python 3: easylaunch and cloudpickle
come as zips, the code from the launch's snapshot (read-only mounts), each run directory is
mounted read-write at its own path, and the container runs as the caller's uid:gid so every
output file is the caller's. ``NON_CODE_DIRS_TO_MOUNT`` (and doodad's
``local_input_dir_to_mount_point_dict``) are mounted read-only unless ``read_only=False``.

Containers are labelled ``io.easylaunch.managed``/``.exp``/``.batch``/``.task``. A detached
keeper (``python -m easylaunch.modes.docker KEEPFILE``) starts queued groups as slots free up
(``max_parallel``), records what a container's runner could not (OOM kill, ``docker kill``,
a daemon restart) through :mod:`easylaunch.transitions`, and removes every container once it
has exited; a poller that finds an exited container does the same, so nothing is left behind
even when the keeper is gone.
"""

from __future__ import annotations

import difflib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .. import records, transitions, txlog
from ..batch import Batch
from ..gpu_options import GPU_OPTIONS, gpu_request
from ..job import Job
from ..options import Option
from ..plan import LaunchPlan, groups, variants_per_task
from ..procs import alive, process_token
from ..runtimes import DockerRuntime, Mount, check_mount_sources, mounts_from_config
from ..shipping import ship
from ..spec import TERMINAL_STATES, State
from .base import Mode

MANAGED = "io.easylaunch.managed"
LABEL_EXP = "io.easylaunch.exp"
LABEL_BATCH = "io.easylaunch.batch"
LABEL_TASK = "io.easylaunch.task"
KEEPER_FILE = "docker.json"
#: where the snapshot is unpacked, shared by the batch's containers (host path = container path)
UNPACK_DIR = ".snapshots-unpacked"

#: docker_options keys and what they become in the Docker API
DOCKER_OPTIONS = {
    "shm_size": "size of /dev/shm, e.g. '2g'",
    "mem_limit": "memory limit, e.g. '512m' (an out-of-memory kill ends the run FAILED, 'out of memory')",
    "memswap_limit": "memory + swap limit",
    "cpus": "CPUs the container may use (float)",
    "env": "extra environment variables for the runs (dict)",
    "network": "network mode: 'none', 'host', or a network name (default: the daemon's)",
    "extra_hosts": "extra /etc/hosts entries (dict)",
}


class DockerError(RuntimeError):
    """The Docker/Podman daemon refused something; the message says what and how to fix it."""


@dataclass
class DockerPlan(LaunchPlan):
    """What ``check()`` resolved: the daemon, the image and its Python."""

    base_url: str = ""
    image_id: str = ""
    max_parallel: int = 1
    extra_mounts: List[Mount] = field(default_factory=list)


def _client(base_url: str, timeout: float = 60):
    """The docker SDK's client (polls, the keeper, the one-off image probe)."""
    try:
        import docker
    except ImportError:
        raise ImportError(
            "mode 'local_docker' needs the Docker SDK: pip install 'easylaunch[docker]'"
        ) from None
    return docker.DockerClient(base_url=base_url, timeout=timeout)


def base_url_for(options: dict, settings: Any) -> str:
    """``docker_host`` option, else config DOCKER_HOST, else ``$DOCKER_HOST``, else the local socket."""
    return (
        options.get("docker_host")
        or settings.get("DOCKER_HOST")
        or os.environ.get("DOCKER_HOST")
        or "unix:///var/run/docker.sock"
    )


class EngineError(RuntimeError):
    """The daemon answered a request with an error status."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{message} (HTTP {status})")
        self.status = status
        self.message = message


class Engine:
    """The few Engine API calls a launch makes (ping, image inspect, create, start, remove).

    On a unix socket they are plain HTTP from the standard library: importing the docker SDK
    alone costs ~150 ms, more than the container's own start. Other daemon URLs (tcp://, ssh://)
    go through the SDK's low-level client (``$EASYLAUNCH_DOCKER_SDK=1`` makes every URL use it).
    Bodies are the Engine API's, the same for dockerd and Podman (see
    :meth:`easylaunch.runtimes.DockerRuntime.container_config`).
    """

    def __init__(self, base_url: str, timeout: float = 60):
        self.base_url = base_url
        self.timeout = timeout
        self._sdk = None
        if not base_url.startswith("unix://") or os.environ.get("EASYLAUNCH_DOCKER_SDK") == "1":
            self._sdk = _client(base_url, timeout).api

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        import http.client
        import socket

        class _Unix(http.client.HTTPConnection):
            def connect(conn) -> None:  # noqa: N805 - nested subclass
                conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.sock.settimeout(self.timeout)
                conn.sock.connect(self.base_url[len("unix://") :])

        conn = _Unix("localhost", timeout=self.timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        if response.status >= 400:
            try:
                message = json.loads(raw).get("message") or raw.decode(errors="replace")
            except ValueError:
                message = raw.decode(errors="replace")
            raise EngineError(response.status, message.strip())
        if "json" not in (response.getheader("Content-Type") or ""):
            return raw.decode("latin-1")  # /_ping answers "OK"; logs are bytes
        return json.loads(raw) if raw.strip() else None

    def _do(
        self, sdk: Callable[[Any], Any], method: str, path: str, body: Any = None, missing: tuple = ()
    ) -> Any:
        """One API call: ``sdk(api_client)`` through the SDK, else ``method path`` over the
        socket; an error whose status is in ``missing`` (404: no such thing) gives None."""
        try:
            if self._sdk is None:
                return self._call(method, path, body)
            import docker

            try:
                return sdk(self._sdk)
            except docker.errors.APIError as exc:
                raise EngineError(exc.status_code or 500, str(exc.explanation or exc)) from None
        except EngineError as exc:
            if exc.status in missing:
                return None
            raise

    def ping(self) -> None:
        self._do(lambda api: api.ping(), "GET", "/_ping")

    def image(self, name: str) -> Optional[dict]:
        """The image's inspect record, None when the daemon has no such image."""
        return self._do(
            lambda api: api.inspect_image(name), "GET", f"/images/{_q(name)}/json", missing=(404,)
        )

    def tags(self) -> List[str]:
        images = self._do(lambda api: api.images(), "GET", "/images/json") or []
        return sorted({t for img in images for t in (img.get("RepoTags") or []) if t != "<none>:<none>"})

    def runtimes(self) -> Dict[str, Any]:
        return (self._do(lambda api: api.info(), "GET", "/info") or {}).get("Runtimes") or {}

    def create(self, config: Dict[str, Any], name: str) -> str:
        return self._do(
            lambda api: api.create_container_from_config(config, name),
            "POST",
            f"/containers/create?name={_q(name)}",
            config,
        )["Id"]

    def start(self, container: str) -> None:
        self._do(lambda api: api.start(container), "POST", f"/containers/{container}/start")

    def remove(self, container: str) -> None:
        """Remove a container (killing it first); one already gone or going is fine."""
        self._do(
            lambda api: api.remove_container(container, force=True),
            "DELETE",
            f"/containers/{container}?force=1",
            missing=(404, 409),
        )

    def containers(self, labels: Sequence[str]) -> List[dict]:
        """Every container (any state) with all of ``labels`` (``key`` or ``key=value``)."""
        filters = {"label": list(labels)}
        return (
            self._do(
                lambda api: api.containers(all=True, filters=filters),
                "GET",
                f"/containers/json?all=1&filters={_q(json.dumps(filters))}",
            )
            or []
        )

    def inspect(self, container: str) -> Optional[dict]:
        return self._do(
            lambda api: api.inspect_container(container),
            "GET",
            f"/containers/{container}/json",
            missing=(404,),
        )

    def kill(self, container: str, sig: str = "SIGKILL") -> None:
        """Signal a container; one gone or not running any more is fine."""
        self._do(
            lambda api: api.kill(container, signal=sig),
            "POST",
            f"/containers/{container}/kill?signal={sig}",
            missing=(404, 409),
        )

    def wait(self, container: str, timeout: float) -> Optional[int]:
        """The exit code once the container exited; None after ``timeout`` seconds."""
        old, self.timeout = self.timeout, timeout
        try:
            answer = self._do(
                lambda api: api.wait(container, timeout=timeout), "POST", f"/containers/{container}/wait"
            )
            return (answer or {}).get("StatusCode")
        except Exception:  # a socket timeout, the SDK's ReadTimeout
            return None
        finally:
            self.timeout = old

    def logs(self, container: str) -> bytes:
        """stdout and stderr of a container started without a TTY (the stream demultiplexed)."""
        path = f"/containers/{container}/logs?stdout=1&stderr=1"
        raw = self._do(lambda api: api.logs(container, stdout=True, stderr=True), "GET", path)
        if self._sdk is not None:
            return raw
        raw = raw.encode("latin-1") if isinstance(raw, str) else b""
        out, i = [], 0
        while i + 8 <= len(raw):  # [stream, 0, 0, 0, size (4 bytes, big endian)] + payload
            size = int.from_bytes(raw[i + 4 : i + 8], "big")
            out.append(raw[i + 8 : i + 8 + size])
            i += 8 + size
        return b"".join(out)


def _q(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


def connect(base_url: str, timeout: float = 60) -> Engine:
    """An engine that answered a ping; DockerError saying which daemon and how to start one."""
    engine = Engine(base_url, timeout)
    try:
        engine.ping()
    except Exception as exc:  # OSError (no socket), EngineError, the SDK's ConnectionError
        raise DockerError(
            f"no Docker daemon answers at {base_url} ({type(exc).__name__}: {str(exc)[:200]}). "
            "Start one (`sudo systemctl start docker`, `dockerd &`, or for Podman "
            "`podman system service --time=0 unix:///run/podman/podman.sock &`) or point "
            "docker_host=... / $DOCKER_HOST at a running daemon"
        ) from None
    return engine


def find_image(engine: Engine, name: str) -> dict:
    """The local image ``name``; DockerError listing close local names when it is not there."""
    image = engine.image(name)
    if image is not None:
        return image
    tags = engine.tags()
    close = difflib.get_close_matches(name, tags, n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    shown = ", ".join(tags[:10]) + (" ..." if len(tags) > 10 else "") if tags else "none"
    raise DockerError(
        f"image {name!r} is not on the daemon at {engine.base_url}.{hint} Local images: {shown}. "
        f"Pull or build it first (`docker pull {name}` / `docker build -t {name} .`)"
    )


_PROBE = (
    "command -v python3 >/dev/null 2>&1 || exit 127; "
    "exec python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'"
)


def image_python(engine: Engine, image_id: str, name: str) -> str:
    """The image's Python minor, found once per image id and cached in the user's cache dir."""
    from ..snapshot import cache_dir

    cache = cache_dir().parent / "docker-images.json"
    known = records.read_json(cache, {}) or {}
    if image_id in known:
        return known[image_id]
    config = {
        "Image": image_id,
        "Cmd": ["/bin/sh", "-c", _PROBE],
        "Entrypoint": [],
        "Labels": {MANAGED: "probe"},
        "HostConfig": {"NetworkMode": "none"},
    }
    probe = f"easylaunch-probe-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        container = engine.create(config, probe)
    except EngineError as exc:
        raise DockerError(f"could not create a container of image {name!r}: {exc.message}") from None
    try:
        try:
            engine.start(container)
        except EngineError as exc:
            text = exc.message.lower()
            if "no such file" in text or "not found" in text or "executable" in text:
                raise DockerError(
                    f"image {name!r} has no working /bin/sh ({exc.message[:160]}); easylaunch needs a "
                    "POSIX shell and python3 in the image"
                ) from None
            raise DockerError(f"could not start a container of image {name!r}: {exc.message[:300]}") from None
        code = engine.wait(container, 60)
        out = engine.logs(container)
    finally:
        engine.remove(container)  # a failed start leaves a created container
    if code == 127:
        raise DockerError(
            f"image {name!r} has no python3 on its PATH; easylaunch runs `python3 -m easylaunch.runner` "
            "in the container: use an image with Python 3.8 or later"
        )
    version = out.decode(errors="replace").strip().splitlines()[-1] if out.strip() else ""
    if code != 0 or not version[:1].isdigit():
        raise DockerError(
            f"image {name!r}: python3 did not say its version (exit {code}, output {out[:200]!r})"
        )
    known[image_id] = version
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        records.atomic_write_json(cache, known)
    except OSError:
        pass  # only a cache
    return version


def image_and_options(
    opts: Dict[str, Any], settings: Any, where: str
) -> Tuple[Optional[str], Dict[str, Any]]:
    """The Docker image a run uses where Docker is optional (an SSH host, a cloud instance):
    ``docker_image=``, else config ``DOODAD_DOCKER_IMAGE`` / ``GPU_DOODAD_DOCKER_IMAGE`` by
    ``use_gpu``, else None (no Docker); and its checked ``docker_options``::

        image, docker_options = image_and_options(opts, settings, "on the host's Docker")
    """
    image = opts.get("docker_image")
    if image is None:
        image = settings.get("GPU_DOODAD_DOCKER_IMAGE" if opts.get("use_gpu") else "DOODAD_DOCKER_IMAGE")
    if image:
        return str(image), _check_docker_options(opts.get("docker_options"))
    if opts.get("docker_options"):
        raise ValueError(f"docker_options needs docker_image (runs {where})")
    return None, {}


def _check_docker_options(value: Any) -> Dict[str, Any]:
    opts = dict(value or {})
    for key in opts:
        if key not in DOCKER_OPTIONS:
            close = difflib.get_close_matches(key, DOCKER_OPTIONS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"docker_options: unknown key {key!r}{hint}; accepted: "
                + "; ".join(f"{k}: {v}" for k, v in DOCKER_OPTIONS.items())
            )
    if "env" in opts and not (isinstance(opts["env"], dict) and all(isinstance(k, str) for k in opts["env"])):
        raise ValueError(f"docker_options['env'] = {opts['env']!r} must be a dict of names to values")
    return opts


def parse_bytes(value: Any, what: str) -> int:
    """``512m``, ``2g``, ``1024`` -> bytes (as docker's ``--memory`` reads them)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    units = {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "b")
    number = number[:-1] if number.endswith("b") and unit == "b" else number
    try:
        return int(float(number) * units[unit])
    except ValueError:
        raise ValueError(
            f"docker_options[{what!r}] = {value!r} is not a size such as '512m' or '2g'"
        ) from None


def host_config(opts: Dict[str, Any]) -> Dict[str, Any]:
    """docker_options as Engine API HostConfig entries (the daemon's default network unless
    asked: ``none`` costs every container start ~150 ms more here)."""
    out: Dict[str, Any] = {}
    if opts.get("network"):
        out["NetworkMode"] = opts["network"]
    if opts.get("shm_size") is not None:
        out["ShmSize"] = parse_bytes(opts["shm_size"], "shm_size")
    if opts.get("mem_limit") is not None:
        out["Memory"] = parse_bytes(opts["mem_limit"], "mem_limit")
        # no swap beyond the limit unless asked: an out-of-memory run is then killed, not slowed
        out["MemorySwap"] = out["Memory"]
    if opts.get("memswap_limit") is not None:
        out["MemorySwap"] = parse_bytes(opts["memswap_limit"], "memswap_limit")
    if opts.get("cpus") is not None:
        out["NanoCpus"] = int(float(opts["cpus"]) * 1e9)
    if opts.get("extra_hosts"):
        out["ExtraHosts"] = [f"{host}:{ip}" for host, ip in dict(opts["extra_hosts"]).items()]
    return out


class DockerMode(Mode):
    """Docker/Podman containers on this machine (see the module docstring)."""

    name = "local_docker"
    waits_by_default = True
    poll_interval = 0.5
    # containers start before the payloads are written (the start overlaps the launcher's
    # git capture); their task runner waits for each payload
    starts_before_payloads = True
    options = (
        Option(
            "docker_image",
            (str,),
            None,
            "image (default: config DOODAD_DOCKER_IMAGE / GPU_DOODAD_DOCKER_IMAGE)",
        ),
        Option("docker_options", (dict,), None, "extras: " + ", ".join(DOCKER_OPTIONS)),
        Option(
            "docker_host",
            (str,),
            None,
            "daemon URL (default: config DOCKER_HOST, $DOCKER_HOST, local socket)",
        ),
        Option(
            "local_input_dir_to_mount_point_dict",
            (dict,),
            None,
            "doodad's {host dir: container path}, mounted read-only",
        ),
        Option("skip_wait", (bool,), False, "return at once; the runs go on after the script exits"),
        Option("max_parallel", (int,), None, "containers at once (default: MAX_PARALLEL or CPU count)", 1),
        Option("variants_per_task", (int,), None, "variants run one after another in one container", 1),
        Option(
            "expected_duration",
            (int, float),
            None,
            "expected seconds per variant: picks variants_per_task",
            0.001,
        ),
        *GPU_OPTIONS,
    )

    # -- validation ------------------------------------------------------------------
    def check(self, batch: Batch) -> DockerPlan:
        opts = batch.options
        name = opts.get("docker_image") or self.settings.get(
            "GPU_DOODAD_DOCKER_IMAGE" if opts.get("use_gpu") else "DOODAD_DOCKER_IMAGE"
        )
        if not name:
            key = "GPU_DOODAD_DOCKER_IMAGE" if opts.get("use_gpu") else "DOODAD_DOCKER_IMAGE"
            raise ValueError(
                f"mode {self.name!r} needs an image: pass docker_image=... or set {key} in the config file"
            )
        docker_opts = _check_docker_options(opts.get("docker_options"))
        mounts = mounts_from_config(self.settings.get("NON_CODE_DIRS_TO_MOUNT"), "NON_CODE_DIRS_TO_MOUNT")
        for local_dir, mount_point in (opts.get("local_input_dir_to_mount_point_dict") or {}).items():
            mounts.append(Mount(os.path.abspath(os.path.expanduser(str(local_dir))), str(mount_point)))
        check_mount_sources(mounts, "NON_CODE_DIRS_TO_MOUNT / local_input_dir_to_mount_point_dict")
        limit = opts.get("max_parallel") or self.settings.get("MAX_PARALLEL") or os.cpu_count() or 1
        base_url = base_url_for(opts, self.settings)
        engine = connect(base_url)
        image_id = find_image(engine, name)["Id"]
        if opts.get("use_gpu") and not _has_gpu_runtime(engine):
            raise DockerError(
                f"use_gpu=True but the daemon at {base_url} has no GPU runtime (no 'nvidia' in "
                "`docker info` Runtimes): install the NVIDIA Container Toolkit, or run without use_gpu"
            )
        gpu_env, gpu_host = self._gpu_sharing(batch, engine, base_url)
        all_gpus = bool(gpu_host.pop("all_gpus", False))
        python = image_python(engine, image_id, name)
        from ..payload import python_version

        runtime = DockerRuntime(
            image=image_id,
            mounts=mounts,
            user=f"{os.getuid()}:{os.getgid()}",
            gpu=bool(opts.get("use_gpu")) or all_gpus,
            gpu_id=opts.get("gpu_id") if opts.get("use_gpu") and batch.gpu_request is None else None,
            env={**gpu_env, **{str(k): str(v) for k, v in (docker_opts.get("env") or {}).items()}},
            options={**gpu_host, **host_config(docker_opts)},
        )
        plan = DockerPlan(
            runtime=runtime,
            variants_per_task=variants_per_task(opts, len(batch.variants), int(limit)),
            target_python=None if python == python_version() else python,
            base_url=base_url,
            image_id=image_id,
            max_parallel=int(limit),
            extra_mounts=mounts,
        )
        return plan

    def _gpu_sharing(
        self, batch: Batch, engine: Engine, base_url: str
    ) -> Tuple[Dict[str, str], Dict[str, Any]]:
        """With ``gpus=``: every GPU in the container (the runner picks one with the host's
        broker, through the mounted broker directory); the environment and HostConfig entries
        that needs. The injected fake GPUs of the tests instead pass their variables and
        share the host's pid namespace (their usage files are named by pid, as NVML reports
        host pids)."""
        request = gpu_request(batch.fn, batch.options, batch.log_root)
        if request is None:
            return {}, {}
        from .. import gpu_fake

        batch.gpu_request = {**request, "start": False}
        if gpu_fake.inventory() is None:
            if not _has_gpu_runtime(engine):
                raise DockerError(
                    f"gpus={batch.options.get('gpus')!r} but the daemon at {base_url} has no GPU runtime "
                    "(no 'nvidia' in `docker info` Runtimes): install the NVIDIA Container Toolkit"
                )
            return {}, {"all_gpus": True}
        env = {"EASYLAUNCH_FAKE_GPUS": os.environ["EASYLAUNCH_FAKE_GPUS"]}
        if gpu_fake.usage_dir():
            env["EASYLAUNCH_FAKE_GPU_USAGE"] = str(gpu_fake.usage_dir())
        return env, {"PidMode": "host"}

    def _gpu_mounts(self, batch: Batch) -> List[Mount]:
        """The broker's directory (and the fake usage files), started here if need be: the
        runners in the containers never start one."""
        if batch.gpu_request is None:
            return []
        from .. import gpu_broker, gpu_fake

        gpu_broker.keep_alive(batch.log_root, 120.0)  # until the keeper holds it
        mounts = [Mount(str(batch.log_root / gpu_broker.BROKER_DIR), read_only=False)]
        usage = gpu_fake.usage_dir()
        if gpu_fake.inventory() is not None and usage:
            Path(usage).mkdir(parents=True, exist_ok=True)
            mounts.append(Mount(str(usage), read_only=False))
        return mounts

    # -- launch ------------------------------------------------------------------------
    def launch(self, batch: Batch, plan: DockerPlan) -> None:
        runtime = plan.runtime
        assert isinstance(runtime, DockerRuntime)
        store = batch.log_root / ".snapshots"
        shipment = ship(batch, store, zips=True, same_machine=False)
        unpacked = batch.log_root / UNPACK_DIR
        unpacked.mkdir(exist_ok=True)
        sweep_dir = batch.sweep_dir
        sweep_dir.mkdir(parents=True, exist_ok=True)
        task_groups = groups(batch.runs, plan.variants_per_task)
        tasks_file = sweep_dir / "tasks.json"
        records.atomic_write_json(
            tasks_file, {"groups": [[str(r.payload_path) for r in g] for g in task_groups]}
        )
        # what every container sees: code (read-only), the batch's task list, its runs (read-write)
        common = [
            Mount(str(store), read_only=True),
            Mount(str(unpacked), read_only=False),
            Mount(str(sweep_dir), read_only=True),
            *self._gpu_mounts(batch),
        ]
        env = {
            "HOME": "/tmp",
            "EASYLAUNCH_SNAPSHOT_CACHE": str(unpacked),
            "EASYLAUNCH_PAYLOAD_WAIT": "120",
            "EASYLAUNCH_CONTAINER": "docker",
        }
        configs = []
        for i, group in enumerate(task_groups):
            name = f"easylaunch-{batch.exp_name[:40]}-{batch.batch_id}-{i}"
            task_runtime = DockerRuntime(
                **{
                    **runtime.__dict__,
                    "mounts": [
                        *common,
                        *[Mount(str(r.run_dir), read_only=False) for r in group],
                        *runtime.mounts,
                    ],
                    # the worker of the transaction log: the container
                    "env": {**env, txlog.ENV_WORKER: f"container {name}", **runtime.env},
                    "labels": {
                        MANAGED: "1",
                        LABEL_EXP: batch.exp_name,
                        LABEL_BATCH: batch.batch_id,
                        LABEL_TASK: str(i),
                    },
                }
            )
            config = task_runtime.container_config(
                ["--tasks", str(tasks_file), "--index", str(i), "--quiet"], [str(z) for z in shipment.zips]
            )
            configs.append({"name": name, "body": config})
        for i, group in enumerate(task_groups):
            for run in group:
                batch.backend[run.index] = {
                    "task": i,
                    "task_runs": len(group),
                    "container_name": configs[i]["name"],
                }
        batch.backend_common = {
            "docker_host": plan.base_url,
            "image": plan.image_id,
            "image_name": batch.options.get("docker_image"),
            "variants_per_task": plan.variants_per_task,
            "keeper_file": str(sweep_dir / KEEPER_FILE),
        }
        keep = {
            "base_url": plan.base_url,
            "batch_id": batch.batch_id,
            "max_parallel": plan.max_parallel,
            "timeout": batch.options.get("timeout"),
            "groups": [[str(r.run_dir) for r in g] for g in task_groups],
            "configs": configs,
            "started": [],
            # the keeper holds a connection to the GPU broker: it stays while containers may ask
            "gpu_broker": str(batch.log_root) if batch.gpu_request is not None else None,
        }
        engine = Engine(plan.base_url)
        started: List[str] = []
        try:
            # the first containers start now, before the payloads exist: their start-up overlaps
            # the git capture and payload writing below (their task runner waits for a payload)
            started.extend(_create_and_start_all(engine, configs[: min(plan.max_parallel, len(configs))]))
            keep["started"] = list(range(len(started)))
            records.atomic_write_json(sweep_dir / KEEPER_FILE, keep, records.PRIVATE_MODE)
            batch.materialize()
            _spawn_keeper(sweep_dir / KEEPER_FILE)
            batch.started = True
        except BaseException:
            # nothing ran yet (every runner was still waiting for its payload): undo it all
            for container in started:
                try:
                    engine.remove(container)
                except Exception:
                    pass
            raise

    # -- state -------------------------------------------------------------------------
    def _containers(self, jobs: Sequence[Job]) -> Tuple[Engine, Dict[Tuple[str, str], dict]]:
        """ONE list call for the containers of these runs' batches, by (batch, task)."""
        backend = jobs[0].manifest.get("backend") or {}
        engine = Engine(str(backend.get("docker_host") or base_url_for({}, self.settings)), timeout=20)
        batches = sorted({str(j.manifest.get("batch_id")) for j in jobs})
        labels = [f"{LABEL_BATCH}={batches[0]}"] if len(batches) == 1 else [MANAGED]
        found: Dict[Tuple[str, str], dict] = {}
        for c in engine.containers(labels):
            found[
                ((c.get("Labels") or {}).get(LABEL_BATCH, ""), (c.get("Labels") or {}).get(LABEL_TASK, ""))
            ] = c
        return engine, found

    @staticmethod
    def _key(job: Job) -> Tuple[str, str]:
        return (str(job.manifest.get("batch_id", "")), str(job.manifest["backend"]["task"]))

    @staticmethod
    def _ours(jobs: Sequence[Job]) -> List[Job]:
        return [j for j in jobs if "task" in (j.manifest.get("backend") or {})]

    def poll(self, jobs: Sequence[Job]) -> Dict[Path, Optional[State]]:
        jobs = self._ours(jobs)
        if not jobs:
            return {}
        try:
            engine, found = self._containers(jobs)
        except Exception:
            return {}  # the daemon is away (restarting?): the status files are all we know
        out: Dict[Path, Optional[State]] = {}
        keepers: Dict[str, bool] = {}
        for job in jobs:
            backend = job.manifest["backend"]
            container = found.get(self._key(job))
            state = job.last_status.get("state", State.PENDING)
            if container is not None:
                if container.get("State") in ("exited", "dead"):
                    out[job.run_dir] = settle_exited(
                        engine, container["Id"], [job.run_dir], backend["container_name"]
                    )
                    if all(transitions.current(d) in TERMINAL_STATES for d in _group_dirs(job)):
                        engine.remove(container["Id"])
                continue
            if state == State.PENDING and (job.run_dir / records.CANCEL_MARK).exists():
                out[job.run_dir] = transitions.cancelled_before_start(job.run_dir)
                continue
            keeper_file = backend.get("keeper_file", "")
            if keeper_file not in keepers:
                keepers[keeper_file] = _keeper_alive(Path(keeper_file))
            if keepers[keeper_file]:
                continue  # queued, or between its exit and the keeper's record
            fresh = transitions.current(job.run_dir)
            if fresh in TERMINAL_STATES:
                out[job.run_dir] = fresh
            elif fresh == State.PENDING:
                out[job.run_dir] = transitions.starter_gone(job.run_dir, "the docker keeper")
            else:
                out[job.run_dir] = transitions.died_without_record(
                    job.run_dir, f"container {backend.get('container_name')} (gone)"
                )
        return out

    def cancel(self, jobs: Sequence[Job]) -> None:
        """Cancel marks stop single runs inside a container; a container whose runs are all
        cancelled is stopped (SIGTERM to its task runner, which records CANCELLED)."""
        jobs = self._ours(jobs)
        if not jobs:
            return
        try:
            engine, found = self._containers(jobs)
        except Exception:
            return
        by_task: Dict[Tuple[str, str], List[Job]] = {}
        for job in jobs:
            by_task.setdefault(self._key(job), []).append(job)
        for key, members in by_task.items():
            container = found.get(key)
            total = int(members[0].manifest["backend"].get("task_runs", 1))
            if container is not None and container.get("State") == "running" and len(members) >= total:
                engine.kill(container["Id"], "SIGTERM")

    def cleanup(self, jobs: Sequence[Job]) -> None:
        """Remove the containers of these runs. An exited one goes at once; one still running
        is left alone while any run of its group (``variants_per_task``) has not ended, else it
        gets a few seconds to exit by itself and is then removed (killed)."""
        jobs = self._ours(jobs)
        if not jobs:
            return
        try:
            engine, found = self._containers(jobs)
        except Exception:
            return
        by_task: Dict[Tuple[str, str], List[Job]] = {}
        for job in jobs:
            by_task.setdefault(self._key(job), []).append(job)
        for key, members in by_task.items():
            container = found.get(key)
            if container is None:
                continue
            if container.get("State") not in ("exited", "dead"):
                if not all(transitions.current(d) in TERMINAL_STATES for d in _group_dirs(members[0])):
                    continue
                engine.wait(container["Id"], 5)
            name = members[0].manifest["backend"]["container_name"]
            settle_exited(engine, container["Id"], [j.run_dir for j in members], name)
            engine.remove(container["Id"])
            # gone when this returns, also when the keeper's removal was already under way
            deadline = time.monotonic() + 10
            while engine.inspect(container["Id"]) is not None and time.monotonic() < deadline:
                time.sleep(0.05)


def _group_dirs(job: Job) -> List[Path]:
    """Every run directory of ``job``'s container (its packed group), from the keeper file."""
    backend = job.manifest.get("backend") or {}
    info = records.read_json(backend.get("keeper_file") or "", {}) or {}
    try:
        return [Path(d) for d in info["groups"][int(backend["task"])]]
    except (KeyError, IndexError, ValueError, TypeError):
        return [job.run_dir]


class DockerAliasMode(DockerMode):
    """``docker``: another name of ``local_docker`` (doodad's)."""

    name = "docker"


# -- shared by the launcher, the keeper and pollers --------------------------------------------


def _has_gpu_runtime(engine: Engine) -> bool:
    if os.environ.get("EASYLAUNCH_DOCKER_ASSUME_GPU") == "1":  # tests: see what the daemon is sent
        return True
    try:
        return "nvidia" in engine.runtimes()
    except Exception:
        return False


def create_and_start(engine: Engine, config: Dict[str, Any]) -> str:
    """Create and start one container (``{"name", "body"}``); DockerError with the daemon's
    words when it refuses (a container it created but could not start is removed)."""
    name = config["name"]
    try:
        container = engine.create(config["body"], name)
    except EngineError as exc:
        raise DockerError(f"the daemon refused to create container {name}: {exc.message}") from None
    try:
        engine.start(container)
    except EngineError as exc:
        try:
            engine.remove(container)
        except Exception:
            pass
        raise DockerError(f"the daemon refused to start container {name}: {exc.message}") from None
    return container


def _create_and_start_all(engine: Engine, configs: Sequence[Dict[str, Any]]) -> List[str]:
    """``create_and_start`` of each config, at the same time (the daemon's start of one
    container is mostly waiting: two at once take about as long as one); the containers' ids
    in order. When any is refused, those that did start are removed and its error is raised."""
    if len(configs) <= 1:
        return [create_and_start(engine, c) for c in configs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(len(configs), 8)) as pool:
        futures = [pool.submit(create_and_start, engine, c) for c in configs]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        for f in futures:
            if f.exception() is None:
                try:
                    engine.remove(f.result())
                except Exception:
                    pass
        raise errors[0]
    return [f.result() for f in futures]


def settle_exited(engine: Engine, container: str, run_dirs: Sequence[Path], name: str) -> State:
    """Record what an exited container's runner could not (its exit code, an OOM kill) for the
    runs of ``run_dirs`` that have no outcome yet; returns the state of the last of them."""
    try:
        state = (engine.inspect(container) or {}).get("State") or {}
    except Exception:
        state = {}
    code = state.get("ExitCode")
    oom = bool(state.get("OOMKilled"))
    result = State.FAILED
    for run_dir in run_dirs:
        result = transitions.container_exited(run_dir, f"container {name}", code, oom_killed=oom)
    return result


def _spawn_keeper(keep_file: Path) -> None:
    """Start the detached keeper of a batch (outlives the launch script)."""
    from .process import runner_env

    log = open(keep_file.parent / "keeper.log", "ab")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "easylaunch.modes.docker", str(keep_file)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=runner_env(),
            start_new_session=True,
        )
    finally:
        log.close()
    records.atomic_write_json(
        keep_file.parent / "keeper.pid", {"pid": proc.pid, "token": process_token(proc.pid)}
    )


def _keeper_alive(keep_file: Path) -> bool:
    info = records.read_json(keep_file.parent / "keeper.pid")
    if not info:
        return False
    return alive(info.get("pid"), info.get("token"))


def keep(keep_file: Path) -> int:  # pragma: no cover - runs detached (covered through the tests)
    """The keeper loop: start queued groups as slots free up, settle and remove exited containers.

    Survives a daemon restart (keeps asking, with a pause; containers the restart stopped are
    settled from their exit codes). Gives up on the daemon after 10 minutes: the runs it could
    not finish are then FAILED with the reason.
    """
    info = records.read_json(keep_file)
    engine = Engine(info["base_url"], timeout=30)
    holder = None
    if info.get("gpu_broker"):
        from .. import gpu_broker

        holder = gpu_broker.connect(Path(info["gpu_broker"]))  # noqa: F841 - held open until we exit
    batch_id = info["batch_id"]
    limit = int(info["max_parallel"])
    groups_dirs = [[Path(d) for d in g] for g in info["groups"]]
    configs = info["configs"]
    running = set(info.get("started") or [])
    queue = [i for i in range(len(configs)) if i not in running]
    timeout = info.get("timeout")
    started_at: Dict[int, float] = {i: time.time() for i in running}
    down_since: Optional[float] = None
    while queue or running:
        try:
            present: Dict[int, dict] = {}
            for c in engine.containers([f"{LABEL_BATCH}={batch_id}"]):
                try:
                    present[int((c.get("Labels") or {}).get(LABEL_TASK, "-1"))] = c
                except ValueError:
                    continue
            down_since = None
            for i in sorted(running):
                c = present.get(i)
                name = configs[i]["name"]
                if c is None:  # removed by a poller (which settled it), or from outside
                    for d in groups_dirs[i]:
                        transitions.died_without_record(d, f"container {name} (removed from outside)")
                    running.discard(i)
                elif c.get("State") in ("exited", "dead"):
                    settle_exited(engine, c["Id"], groups_dirs[i], name)
                    engine.remove(c["Id"])
                    running.discard(i)
                elif timeout and time.time() - started_at.get(i, time.time()) > float(timeout) + 60:
                    engine.kill(c["Id"])  # backstop: the runner's own timer should have ended it
            while queue and len(running) < limit:
                i = queue.pop(0)
                dirs = groups_dirs[i]
                if all(transitions.current(d) in TERMINAL_STATES for d in dirs):
                    continue
                if all((d / records.CANCEL_MARK).exists() for d in dirs):
                    for d in dirs:
                        transitions.cancelled_before_start(d)
                    continue
                try:
                    create_and_start(engine, configs[i])
                except DockerError as exc:
                    for d in dirs:
                        transitions.refused(d, "the Docker daemon", str(exc))
                    continue
                running.add(i)
                started_at[i] = time.time()
            time.sleep(0.2)
        except Exception as exc:  # the daemon went away (restart?): ask again in a moment
            down_since = down_since or time.time()
            print(f"easylaunch keeper: daemon unreachable ({exc}); retrying", file=sys.stderr, flush=True)
            if time.time() - down_since > 600:
                for i in [*running, *queue]:
                    for d in groups_dirs[i]:
                        transitions.died_without_record(
                            d, f"the Docker daemon at {engine.base_url} (unreachable for 10 min)"
                        )
                return 1
            time.sleep(1.0)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(keep(Path(sys.argv[1])))
