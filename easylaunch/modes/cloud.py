"""The shared layer of modes ``ec2`` and ``gcp``: sweeps packed on cloud instances, outputs in a bucket.

A provider (:class:`Provider`: EC2 + S3 in :mod:`.ec2`, GCE + GCS in :mod:`.gcp`) answers the
cloud's questions (create, describe, terminate instances; put, list, get objects); this module
does the rest, the same for both::

    sweep = run_sweep(train, variants, exp_name="demo", mode="ec2", num_exps_per_instance=10,
                      max_parallel=2, spot_price=0.2, skip_wait=True)
    sweep.wait(); sweep.results()       # outputs come back from the bucket into the run dirs

- ``check()`` validates everything before anything exists: options, credentials, region, image,
  instance type, bucket (exists and writable), the money guard (more than config
  ``MAX_INSTANCES`` instances is refused, naming the number and the key).
- ``launch()`` puts the code in the bucket once per content (``<prefix>/.snapshots/``: the
  snapshot and the easylaunch / cloudpickle zips, HEAD before PUT), then per instance ONE
  archive (its run directories and its spec), renders the boot script (``cloud_boot.sh.j2``;
  a stub that fetches it from the bucket when it exceeds the provider's metadata limit) and
  creates the instance, tagged with the experiment, batch and runs. ``dry_run=True`` prints
  the instances, types, prices and the boot script and creates nothing (runs GENERATED).
- On the instance :mod:`easylaunch.cloud_agent` runs the runs and syncs them to the bucket.
- ``poll()`` is ONE describe of all instances (one per region / zone an experiment was
  launched in) and, after it, ONE listing of the experiment's objects for all runs; changed
  objects come back into the local run directories (status last). A run
  whose instance is gone without its record becomes PREEMPTED (the instance had a notice) or
  FAILED (killed without notice: its outputs are those of the last sync).
- ``max_recoveries=K`` relaunches preempted runs on new instances (attempt+1 in the same run
  directory, resuming from the checkpoint payload the instance synced); :func:`recover` does
  the same later from the run directories alone (``easylaunch recover EXP``), and
  :func:`recover_when_ready` first waits for an instance still syncing in its notice window.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import re
import sys
import tarfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import records, transitions
from ..batch import Batch
from ..job import Job
from ..options import Option
from ..plan import LaunchPlan, groups, variants_per_task
from ..runtimes import DockerRuntime, PlainRuntime
from ..shipping import ship
from ..spec import TERMINAL_STATES, State
from .base import Mode

#: the hidden per-run file that remembers which bucket objects are already here
FETCHED = ".cloud-fetched.json"
#: the MD5 (and S3 ETag) of an empty object
EMPTY_MD5 = hashlib.md5(b"").hexdigest()
#: instance states of an instance that is gone or going: its runs end with what it synced,
#: unless it is still syncing (see ENDED and final_sync_done)
GONE = {
    "terminated",
    "shutting-down",
    "stopped",
    "stopping",
    "TERMINATED",
    "STOPPING",
    "STOPPED",
    "SUSPENDED",
    "missing",
}

#: instance states after which its processes are gone (not going): nothing more can come
ENDED = {"terminated", "stopped", "TERMINATED", "SUSPENDED", "missing"}


def final_sync_done(inst_state: Dict[str, Any]) -> bool:
    """The instance's record says its final sync (at the end, or on a notice) is over."""
    return bool((inst_state.get("final_sync") or {}).get("done"))


class CloudError(RuntimeError):
    """The cloud refused something or is misconfigured; the message names it and the fix."""


def state_key(batch_key: str, index: int) -> str:
    """The bucket key of an instance's own record (written by its agent)."""
    return f"{batch_key}/instance-{index}.state.json"


def fetch_source() -> str:
    """easylaunch/cloud_store.py, zlib + base64: the boot script's inlined bucket client."""
    source = (Path(__file__).resolve().parent.parent / "cloud_store.py").read_bytes()
    return base64.b64encode(zlib.compress(source, 9)).decode()


@dataclass
class Instance:
    """One instance of a launch: its runs, in warm task groups."""

    index: int
    runs: List[Any]
    groups: List[List[Any]]
    name: str = ""
    script: str = ""
    archive_key: str = ""


@dataclass
class CloudPlan(LaunchPlan):
    """What check() resolved: the provider's facts and the packing."""

    resolved: Dict[str, Any] = field(default_factory=dict)
    per_instance: int = 1
    n_instances: int = 1
    max_parallel: int = 1
    docker_image: Optional[str] = None
    dry_run: bool = False


class Provider:
    """One cloud: instances and a bucket. Subclasses implement every method."""

    name = ""
    #: the store URL scheme (``s3``, ``gs``)
    scheme = ""
    #: the instance metadata address the boot script uses by default
    metadata_url = ""
    #: the largest boot script the instance metadata holds (bytes)
    metadata_limit = 16 * 1024
    #: the option / config key that names the bucket, for messages
    bucket_key = ""

    def __init__(self, settings: Any, options: Dict[str, Any]):
        self.settings = settings
        self.options = options
        self.calls: Dict[str, int] = {}

    def count(self, what: str) -> None:
        self.calls[what] = self.calls.get(what, 0) + 1

    # where
    def bucket(self) -> Tuple[str, str]:
        """``(bucket, prefix)``; ValueError naming the key when unset."""
        raise NotImplementedError

    def store_url(self) -> str:
        bucket, prefix = self.bucket()
        return f"{self.scheme}://{bucket}/{prefix}".rstrip("/")

    def key(self, rel: str) -> str:
        prefix = self.bucket()[1]
        return f"{prefix}/{rel}" if prefix else rel

    # storage (keys are full object names)
    def head(self, key: str) -> Optional[int]:
        raise NotImplementedError

    def put(self, key: str, data: bytes) -> None:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def list(self, prefix: str) -> Dict[str, Tuple[int, str]]:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        raise NotImplementedError

    def check_bucket(self) -> None:
        """The bucket exists and this launcher can write it (a probe object, removed)."""
        raise NotImplementedError

    # compute
    def resolve(self, batch: Batch, n_instances: int) -> Dict[str, Any]:
        """Validate and resolve region/zone, image, instance type, spot; raise CloudError/ValueError."""
        raise NotImplementedError

    def create(self, name: str, script: str, tags: Dict[str, str], resolved: Dict[str, Any]) -> str:
        """Create one instance; returns its id."""
        raise NotImplementedError

    def describe(self, ids: Sequence[str], resolved: Dict[str, Any]) -> Dict[str, str]:
        """``id -> state`` of these instances in ONE call (``missing`` for unknown ones)."""
        raise NotImplementedError

    def terminate(self, ids: Sequence[str], resolved: Dict[str, Any]) -> None:
        raise NotImplementedError

    def strays(self, exp: Optional[str], resolved: Dict[str, Any]) -> List[Dict[str, Any]]:
        """Instances easylaunch made (of ``exp``) that still exist, running or stopped:
        ``[{"id", "name", "state", "exp", "batch", "runs"}]`` (``runs``: the run names it
        serves, comma-separated)."""
        raise NotImplementedError

    def describe_plan(self, resolved: Dict[str, Any], n: int) -> List[str]:
        """Lines for a dry run: types, spot prices, cost per hour where the API gives it."""
        return []

    def console_hint(self, ident: str, resolved: Dict[str, Any]) -> str:
        """The command that shows an instance's boot output (its boot script's messages)."""
        raise NotImplementedError

    # the place strays are looked for (``easylaunch cloud cleanup``)
    @classmethod
    def with_location(
        cls, options: Dict[str, Any], region: Optional[str] = None, zone: Optional[str] = None
    ) -> Dict[str, Any]:
        """``options`` pointed at the CLI's ``--region`` / ``--zone``; ValueError naming the
        option this cloud has when it is given the other one."""
        raise NotImplementedError

    def location(self) -> str:
        """Where :meth:`strays` looks (for messages), e.g. ``region us-east-1``."""
        raise NotImplementedError


def _safe_name(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:limit] or "x"


class CloudMode(Mode):
    """Runs on cloud instances (see the module docstring); subclasses name their Provider."""

    waits_by_default = True
    poll_interval = 2.0
    #: the runs use the instances' CPUs, and a poll's CPU time is mostly the outputs it brought
    #: back: at 20x, the poll that fetched a sweep's first results delayed the next by ~16 s (B8)
    poll_spacing = 2.0
    fetches_outputs = True
    provider_class: type = Provider
    common_options = (
        Option("instance_type", (str,), None, "instance / machine type (default: config)"),
        Option("spot_price", (int, float), None, "spot: max price in USD/hour; 0 or None for the config's"),
        Option("num_exps_per_instance", (int,), 1, "variants per instance", 1),
        Option("max_parallel", (int,), None, "runs at once on each instance (default 1)", 1),
        Option("sync_interval", (int, float), 15, "seconds between syncs of the outputs to the bucket", 1),
        Option(
            "final_sync_timeout",
            (int, float),
            600,
            "seconds the instance keeps retrying its final sync when the bucket does not take it",
            1,
        ),
        Option(
            "docker_image",
            (str,),
            None,
            "run inside this Docker image on the instance ('' for the VM's Python)",
        ),
        Option("docker_options", (dict,), None, "Docker extras on the instance, as for local_docker"),
        Option("dry_run", (bool,), False, "print instances, prices and the boot script; create nothing"),
        Option("max_recoveries", (int,), 0, "relaunch preempted runs on new instances this many times", 0),
        Option("terminate", (bool,), True, "the instance ends itself when its runs are done"),
        Option("skip_wait", (bool,), False, "return at once; the runs go on in the cloud"),
        Option("variants_per_task", (int,), None, "variants run one after another by one warm task", 1),
        Option("expected_duration", (int, float), None, "expected seconds per variant", 0.001),
    )

    def __init__(self, settings: Any):
        super().__init__(settings)
        self._lock = threading.RLock()
        self._providers: Dict[str, Provider] = {}
        self.stats: Dict[str, int] = {}

    def provider(self, options: Dict[str, Any]) -> Provider:
        key = json.dumps(options, sort_keys=True, default=str)
        if key not in self._providers:
            self._providers[key] = self.provider_class(self.settings, options)
        return self._providers[key]

    def _stat(self, what: str, n: int = 1) -> None:
        self.stats[what] = self.stats.get(what, 0) + n

    # -- check -----------------------------------------------------------------------
    def check(self, batch: Batch) -> CloudPlan:
        opts = batch.options
        per = int(opts.get("num_exps_per_instance") or 1)
        n = math.ceil(len(batch.variants) / per)
        limit = int(self.settings.get("MAX_INSTANCES") or 10)
        if n > limit and not opts.get("dry_run"):
            raise ValueError(
                f"mode {self.name!r}: this launch would start {n} instances ({len(batch.variants)} variants, "
                f"num_exps_per_instance={per}) and config MAX_INSTANCES is {limit}. Raise "
                f"num_exps_per_instance, or set MAX_INSTANCES = {n} in the config file if you mean it"
            )
        from .docker import image_and_options

        image, docker_options = image_and_options(opts, self.settings, "in Docker on the instance")
        provider = self.provider(opts)
        resolved = provider.resolve(batch, n)
        resolved["docker_options"] = docker_options
        if not opts.get("dry_run"):
            provider.check_bucket()
        max_parallel = int(opts.get("max_parallel") or 1)
        runtime: Any = DockerRuntime(image=image) if image else PlainRuntime(python="python3")
        return CloudPlan(
            runtime=runtime,
            variants_per_task=variants_per_task(opts, per, max_parallel),
            resolved=resolved,
            per_instance=per,
            n_instances=n,
            max_parallel=max_parallel,
            docker_image=image or None,
            dry_run=bool(opts.get("dry_run")),
        )

    # -- launch ----------------------------------------------------------------------
    def launch(self, batch: Batch, plan: CloudPlan) -> None:
        with self._lock:
            self._launch(batch, plan)

    def _ship_code(self, provider: Provider, batch: Batch, dry: bool) -> Tuple[List[str], List[str]]:
        """Code objects in the bucket, once per content; returns (zip keys, all code keys)."""
        shipment = ship(batch, batch.log_root / ".snapshots", zips=True, same_machine=False)
        files = list(shipment.zips)
        if shipment.snapshot:
            files.append(Path(shipment.snapshot["archive"]))
        keys = []
        for path in files:
            key = provider.key(f".snapshots/{path.name}")
            keys.append(key)
            if dry:
                continue
            size = provider.head(key)
            self._stat("code_heads")
            if size != path.stat().st_size:
                data = path.read_bytes()
                provider.put(key, data)
                self._stat("code_puts")
                self._stat("upload_bytes", len(data))
        zips = keys[: len(shipment.zips)]
        return zips, keys

    def _archive(self, batch: Batch, inst: Instance, spec: Dict[str, Any]) -> bytes:
        """ONE gzip tar: this instance's run directories and its spec (paths relative to the exp dir)."""
        buf = io.BytesIO()
        now = int(time.time())
        with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
            data = json.dumps(spec).encode()
            info = tarfile.TarInfo("spec.json")
            info.size, info.mtime, info.mode = len(data), now, 0o600
            tar.addfile(info, io.BytesIO(data))
            for run in inst.runs:
                run_dir = Path(run.run_dir) if not isinstance(run, Path) else run
                base = run_dir.name
                for top, dirs, files in os.walk(run_dir):
                    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                    rel_top = os.path.relpath(top, run_dir)
                    for name in sorted(files):
                        if name.startswith("."):
                            continue
                        path = os.path.join(top, name)
                        rel = name if rel_top == "." else f"{rel_top}/{name}"
                        st = os.stat(path)
                        with open(path, "rb") as f:
                            info = tarfile.TarInfo(f"{base}/{rel}")
                            info.size, info.mtime, info.mode = (
                                st.st_size,
                                int(st.st_mtime),
                                st.st_mode & 0o777,
                            )
                            tar.addfile(info, f)
        return buf.getvalue()

    def _spec(self, common: Dict[str, Any], inst: Instance, exp: str, batch_id: str) -> Dict[str, Any]:
        return {
            **{
                k: common[k]
                for k in (
                    "provider",
                    "region",
                    "zone",
                    "project",
                    "compute",
                    "zips",
                    "code",
                    "sync_interval",
                    "max_parallel",
                    "docker",
                    "terminate",
                    "notice_wait",
                    "notice_window",
                    "notice_margin",
                    "final_sync_timeout",
                )
                if k in common
            },
            "exp": exp,
            "exp_key": common["exp_key"],
            "batch_id": batch_id,
            "instance": inst.index,
            "groups": [[Path(r.run_dir).name for r in g] for g in inst.groups],
            "state_key": state_key(common["batch_key"], inst.index),
        }

    def _render(
        self, provider: Provider, common: Dict[str, Any], inst: Instance, exp: str, batch_id: str
    ) -> Tuple[str, Optional[str]]:
        """The boot script, or a stub and the full script's key when it is too large."""
        from ..templating import render

        values = dict(
            provider=provider.name,
            index=inst.index,
            exp=exp,
            batch_id=batch_id,
            metadata_url=provider.metadata_url,
            region=common.get("region") or "",
            store_url=provider.store_url().rsplit("/", 0)[0],
            fetch_source=fetch_source(),
            compute_url=common.get("compute") or "",
            terminate="1" if common.get("terminate", True) else "0",
        )
        bucket = provider.bucket()[0]
        values["store_url"] = f"{provider.scheme}://{bucket}"
        script = render(
            "cloud_boot.sh.j2",
            zips=common["zips"],
            spec_key=inst.archive_key,
            docker_image=common.get("docker", {}).get("image") if common.get("docker") else None,
            **values,
        )
        limit = int(common.get("metadata_limit") or provider.metadata_limit)
        if len(script.encode()) <= limit:
            return script, None
        key = common["batch_key"] + f"/instance-{inst.index}.boot.sh"
        stub = render("cloud_stub.sh.j2", script_key=key, **values)
        return stub, script

    def _common(
        self, provider: Provider, batch: Batch, plan: CloudPlan, zips: List[str], code: List[str]
    ) -> Dict[str, Any]:
        resolved = plan.resolved
        docker = None
        if plan.docker_image:
            from .docker import host_config

            docker = {
                "image": plan.docker_image,
                "gpu": bool(batch.options.get("use_gpu")),
                "gpu_id": batch.options.get("gpu_id") if batch.options.get("use_gpu") else None,
                "env": {
                    str(k): str(v) for k, v in (resolved.get("docker_options", {}).get("env") or {}).items()
                },
                "options": host_config(resolved.get("docker_options") or {}),
            }
        return {
            "provider": provider.name,
            "mode": self.name,
            "store": provider.store_url(),
            "region": resolved.get("region"),
            "zone": resolved.get("zone"),
            "project": resolved.get("project"),
            "compute": resolved.get("compute"),
            "zips": zips,
            "code": code,
            "sync_interval": float(batch.options.get("sync_interval") or 15),
            "max_parallel": plan.max_parallel,
            "docker": docker,
            "terminate": batch.options.get("terminate", True) is not False,
            "notice_wait": resolved.get("notice_wait", 90 if provider.name == "aws" else 20),
            "notice_window": resolved.get("notice_window", 120 if provider.name == "aws" else 30),
            "notice_margin": resolved.get("notice_margin", 5),
            "final_sync_timeout": float(batch.options.get("final_sync_timeout") or 600),
            "batch_key": provider.key(f"{batch.exp_name}/.batches/{batch.batch_id}"),
            "exp_key": provider.key(batch.exp_name),
            "resolved": {k: v for k, v in resolved.items() if k != "docker_options"},
            "variants_per_task": plan.variants_per_task,
            "max_recoveries": int(batch.options.get("max_recoveries") or 0),
        }

    def _launch(self, batch: Batch, plan: CloudPlan) -> None:
        provider = self.provider(batch.options)
        dry = plan.dry_run
        zips, code = self._ship_code(provider, batch, dry)
        common = self._common(provider, batch, plan, zips, code)
        instances = [
            Instance(i, runs, groups(runs, plan.variants_per_task))
            for i, runs in enumerate(groups(batch.runs, plan.per_instance))
        ]
        for inst in instances:
            inst.name = f"easylaunch-{_safe_name(batch.exp_name, 24)}-{batch.batch_id.lower()}-{inst.index}"
            inst.archive_key = common["batch_key"] + f"/instance-{inst.index}.tar.gz"
            for run in inst.runs:
                batch.backend[run.index] = {"instance": inst.index, "instance_name": inst.name}
        batch.backend_common = {"cloud": common}
        if dry:
            self._dry_run(provider, batch, plan, common, instances)
            return
        batch.materialize()
        created: List[str] = []
        put_keys: List[str] = []
        try:
            for inst in instances:
                spec = self._spec(common, inst, batch.exp_name, batch.batch_id)
                archive = self._archive(batch, inst, spec)
                provider.put(inst.archive_key, archive)
                put_keys.append(inst.archive_key)
                self._stat("payload_puts")
                self._stat("upload_bytes", len(archive))
                script, full = self._render(provider, common, inst, batch.exp_name, batch.batch_id)
                if full is not None:
                    key = common["batch_key"] + f"/instance-{inst.index}.boot.sh"
                    provider.put(key, full.encode())
                    put_keys.append(key)
                    self._stat("payload_puts")
                tags = {
                    "easylaunch": "1",
                    "easylaunch-exp": batch.exp_name,
                    "easylaunch-batch": batch.batch_id,
                    "easylaunch-runs": ",".join(Path(r.run_dir).name for r in inst.runs),
                    "Name": inst.name,
                }
                ident = provider.create(inst.name, script, tags, plan.resolved)
                self._stat("instances_created")
                created.append(ident)
                batch.started = True
                for run in inst.runs:
                    batch.backend[run.index]["instance_id"] = ident
                    records.update_manifest(
                        run.run_dir, {"backend": {"cloud": common, **batch.backend[run.index]}}
                    )
        except BaseException as exc:
            # nothing half-made: instances created so far end, their objects go (code stays)
            prefixes = [common["batch_key"] + "/"]
            prefixes += [f"{common['exp_key']}/{run.name}/" for run in batch.runs]
            if created:
                try:
                    provider.terminate(created, plan.resolved)
                    # an instance that booted may still write (its state object): wait until
                    # it has ended (not only going), then take what it wrote too
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline:
                        states = provider.describe(created, plan.resolved)
                        if all(v in ENDED for v in states.values()):
                            break
                        time.sleep(1)
                    for prefix in prefixes:
                        put_keys.extend(provider.list(prefix))
                except Exception:
                    pass
            for key in dict.fromkeys(put_keys):
                try:
                    provider.delete(key)
                except Exception:
                    pass
            if created:
                # a PUT the instance sent as it ended may land after that listing
                _remove_until_quiet(provider, prefixes)
            batch.started = False
            if isinstance(exc, CloudError):
                raise
            if isinstance(exc, Exception) and not isinstance(exc, (ValueError, TypeError, PermissionError)):
                raise CloudError(
                    f"mode {self.name!r}: launching failed: {type(exc).__name__}: {exc}"
                ) from exc
            raise

    def _dry_run(
        self,
        provider: Provider,
        batch: Batch,
        plan: CloudPlan,
        common: Dict[str, Any],
        instances: List[Instance],
    ) -> None:
        lines = [
            f"easylaunch dry run (mode {self.name!r}): {len(instances)} instance(s) for {len(batch.runs)} run(s); "
            "nothing is created"
        ]
        lines += provider.describe_plan(plan.resolved, len(instances))
        batch.materialize()
        out_dir = batch.sweep_dir
        out_dir.mkdir(parents=True, exist_ok=True)
        for inst in instances:
            script, full = self._render(provider, common, inst, batch.exp_name, batch.batch_id)
            path = out_dir / f"instance-{inst.index}.boot.sh"
            records.atomic_write_bytes(path, (full or script).encode(), records.PRIVATE_MODE)
            lines.append(
                f"  instance {inst.index} {inst.name}: runs {', '.join(Path(r.run_dir).name for r in inst.runs)}; "
                f"boot script {path} ({len((full or script).encode())} bytes"
                + (", sent as a stub that fetches it from the bucket)" if full else ")")
            )
        if instances:
            script, full = self._render(provider, common, instances[0], batch.exp_name, batch.batch_id)
            lines.append("---- boot script of instance 0 ----")
            lines.append(full or script)
        print("\n".join(lines), file=sys.stdout)
        transitions.generated(
            [r.run_dir for r in batch.runs], "dry run: nothing was created in the cloud", out_dir
        )

    # -- state and outputs -----------------------------------------------------------
    @staticmethod
    def _ours(jobs: Sequence[Job]) -> List[Job]:
        return [j for j in jobs if "instance_id" in (j.manifest.get("backend") or {})]

    def _provider_of(self, job: Job) -> Provider:
        return self.provider(dict(job.manifest.get("options") or {}))

    def _sync(self, jobs: Sequence[Job], live: bool) -> Dict[Path, Optional[State]]:
        out: Dict[Path, Optional[State]] = {}
        by_exp: Dict[Tuple[str, str], List[Job]] = {}
        for job in self._ours(jobs):
            common = job.manifest["backend"]["cloud"]
            by_exp.setdefault((common["store"], common["exp_key"]), []).append(job)
        recover: List[Job] = []
        for (_store, exp_key), members in by_exp.items():
            provider = self._provider_of(members[0])
            try:
                # the instances first, then the bucket: an instance seen gone has written all
                # it will write, so the listing that follows holds its runs' last records (the
                # other order lists, sees the instance end, and fails a run that had completed)
                states = self._describe(members) if live else {}
                listing = provider.list(exp_key + "/")
                self._stat("listings")
            except Exception as exc:
                print(f"easylaunch: polling {self.name} failed ({exc}); will retry", file=sys.stderr)
                continue
            inst_states: Dict[str, Dict[str, Any]] = {}  # one read per gone instance per poll
            for job in members:
                changed = self._fetch_run(provider, job, exp_key, listing)
                state = transitions.current(job.run_dir)
                if changed:
                    out[job.run_dir] = state
                if not live or state in TERMINAL_STATES:
                    if state == State.PREEMPTED and live:
                        recover.append(job)
                    continue
                backend = job.manifest["backend"]
                ident = backend["instance_id"]
                if states.get(ident, "missing") in GONE:
                    batch_key = backend["cloud"]["batch_key"]
                    if ident not in inst_states:
                        inst_states[ident] = self._instance_state(
                            provider, batch_key, backend["instance"], listing
                        )
                    inst_state = inst_states[ident]
                    last = inst_state.get("last_sync")
                    when = time.strftime("%H:%M:%S", time.localtime(last)) if last else "never"
                    if inst_state.get("notice"):
                        if states.get(ident, "missing") not in ENDED and not final_sync_done(inst_state):
                            continue  # going (GCE: STOPPING) and still syncing in its notice window
                        out[job.run_dir] = _reclaimed(job.run_dir, ident, inst_state)
                        recover.append(job)
                    else:
                        if states.get(ident, "missing") not in ENDED:
                            # going (GCE's STOPPING at a preemption, before its agent has
                            # recorded the notice; a shutdown script syncing): judged once ended
                            continue
                        failed = inst_state.get("error")  # its agent's last word (cloud_agent._give_up)
                        why = f"its agent failed: {failed}" if failed else ""
                        if state_key(batch_key, backend["instance"]) not in listing:
                            # no record at all: its boot script failed before the agent started
                            why = (
                                "it never started its agent (no python3 on the image? the bucket not "
                                "readable by its role?); its boot output: "
                                + provider.console_hint(ident, backend["cloud"].get("resolved") or {})
                            )
                        out[job.run_dir] = transitions.backend_ended(
                            job.run_dir,
                            f"instance {ident} (outputs as of its last sync at {when})",
                            states.get(ident, "missing"),
                            State.FAILED,
                            why,
                        )
        if recover:
            self._auto_recover(recover, out)
        return out

    def _describe(self, members: Sequence[Job]) -> Dict[str, str]:
        """``instance id -> state`` of these runs' instances: ONE describe per place (provider
        and region / zone) they were launched in, i.e. one for a sweep. Runs of an experiment
        launched in two zones are described in both (one zone's listing says nothing of the
        other's instances: they would look gone)."""
        places: Dict[str, Tuple[Provider, Dict[str, Any], set]] = {}
        for job in members:
            backend = job.manifest["backend"]
            resolved = backend["cloud"].get("resolved") or {}
            provider = self._provider_of(job)
            where = [id(provider)] + [resolved.get(k) for k in ("project", "region", "zone")]
            place = places.setdefault(json.dumps(where, default=str), (provider, resolved, set()))
            place[2].add(backend["instance_id"])
        states: Dict[str, str] = {}
        for provider, resolved, ids in places.values():
            states.update(provider.describe(sorted(ids), resolved))
            self._stat("describes")
        return states

    def _instance_state(
        self, provider: Provider, batch_key: str, index: int, listing: Dict[str, Tuple[int, str]]
    ) -> Dict[str, Any]:
        key = state_key(batch_key, index)
        if key not in listing:
            return {}  # the instance never wrote one (listed after it was gone)
        try:
            return json.loads(provider.get(key))
        except Exception:
            return {}

    def _fetch_run(
        self, provider: Provider, job: Job, exp_key: str, listing: Dict[str, Tuple[int, str]]
    ) -> bool:
        """Download the run's changed objects (status last); True when its status changed."""
        prefix = f"{exp_key}/{job.run_dir.name}/"
        fetched_path = job.run_dir / FETCHED
        fetched = records.read_json(fetched_path, {}) or {}
        todo = [
            (k[len(prefix) :], v)
            for k, v in listing.items()
            if k.startswith(prefix) and fetched.get(k[len(prefix) :]) != v[1]
        ]
        # the launcher's own: the manifest (an instance's copy lacks the instance id), the marks
        todo = [t for t in todo if t[0] not in (records.CANCEL_MARK, records.MANIFEST)]
        todo.sort(key=lambda t: t[0] == records.STATUS)
        status_changed = False
        missed = False
        for rel, (size, md5) in todo:
            parts = rel.split("/")
            if not rel or any(p in ("", ".", "..") for p in parts) or "\\" in rel:
                continue
            if rel == records.STATUS and missed:
                break  # status last here too: not before the objects it describes
            if size == 0 and md5 in ("", EMPTY_MD5):
                data = b""  # the listing said it all (the empty logs of a quiet run): no GET
            else:
                try:
                    data = provider.get(prefix + rel)
                except Exception:
                    missed = True
                    continue
                self._stat("object_gets")
            if md5 and len(md5) == 32 and hashlib.md5(data).hexdigest() != md5:
                missed = True
                continue  # changed while it was read: next poll
            local = job.run_dir.joinpath(*parts)
            if rel == records.STATUS:
                try:
                    new_state = State(json.loads(data).get("state", State.PENDING))
                except ValueError:
                    continue
                if transitions.current(job.run_dir) in TERMINAL_STATES and new_state not in TERMINAL_STATES:
                    fetched[rel] = md5
                    continue
                status_changed = True
            local.parent.mkdir(parents=True, exist_ok=True)
            mode = records.PRIVATE_MODE if rel.startswith("payload") else 0o644
            records.atomic_write_bytes(local, data, mode)
            fetched[rel] = md5
        if todo:
            records.atomic_write_json(fetched_path, fetched)
        return status_changed

    def poll(self, jobs: Sequence[Job]) -> Dict[Path, Optional[State]]:
        """ONE describe of all instances + ONE listing of the experiment's objects."""
        with self._lock:
            return self._sync(jobs, live=True)

    def fetch(self, jobs: Sequence[Job]) -> None:
        with self._lock:
            self._sync(jobs, live=False)

    def cancel(self, jobs: Sequence[Job]) -> None:
        """A cancel mark per run in the bucket (the instance stops that run at its next sync);
        an instance whose runs are all cancelled or finished is terminated at once."""
        with self._lock:
            by_instance: Dict[Tuple[str, str], List[Job]] = {}
            for job in self._ours(jobs):
                backend = job.manifest["backend"]
                provider = self._provider_of(job)
                key = f"{backend['cloud']['exp_key']}/{job.run_dir.name}/{records.CANCEL_MARK}"
                try:
                    provider.put(key, b"")
                except Exception as exc:
                    print(
                        f"easylaunch: writing the cancel mark of {job.run_dir.name} failed: {exc}",
                        file=sys.stderr,
                    )
                by_instance.setdefault((backend["cloud"]["batch_key"], backend["instance_id"]), []).append(
                    job
                )
            for (_b, ident), members in by_instance.items():
                job = members[0]
                backend = job.manifest["backend"]
                siblings = [job.run_dir.parent / name for name in self._instance_runs(job)]
                cancelled = {m.run_dir.name for m in members}
                if all(
                    s.name in cancelled
                    or (s / records.CANCEL_MARK).exists()
                    or transitions.current(s) in TERMINAL_STATES
                    for s in siblings
                ):
                    provider = self._provider_of(job)
                    try:
                        provider.terminate([ident], backend["cloud"].get("resolved") or {})
                    except Exception as exc:
                        print(f"easylaunch: terminating instance {ident} failed: {exc}", file=sys.stderr)
                        continue
                    for s in siblings:
                        if transitions.current(s) not in TERMINAL_STATES:
                            transitions.settle(
                                s, State.CANCELLED, f"cancelled: instance {ident} was terminated"
                            )

    @staticmethod
    def _instance_runs(job: Job) -> List[str]:
        backend = job.manifest["backend"]
        exp_dir = job.run_dir.parent
        names = []
        for d in exp_dir.iterdir():
            if d.is_dir() and not d.name.startswith("."):
                b = (records.read_manifest(d) or {}).get("backend") or {}
                if b.get("instance_id") == backend["instance_id"]:
                    names.append(d.name)
        return names

    # -- recovery --------------------------------------------------------------------
    def _auto_recover(self, jobs: List[Job], out: Dict[Path, Optional[State]]) -> None:
        todo = []
        for job in jobs:
            job_manifest = records.read_manifest(job.run_dir)
            common = job_manifest["backend"]["cloud"]
            done = int(records.read_status(job.run_dir).get("recoveries", 0))
            if done < int(common.get("max_recoveries") or 0):
                todo.append(job.run_dir)
        if todo:
            for run_dir in recover(todo, self):
                out[run_dir] = State.PENDING

    def _relaunch(self, dirs: List[Path]) -> List[Path]:
        with self._lock:
            return _relaunch_impl(self, dirs)

    def cleanup(self, jobs: Sequence[Job]) -> None:
        """Nothing is held locally; instances end themselves (``easylaunch cloud cleanup`` finds strays)."""


def _reclaimed(run_dir: Path, ident: str, inst_state: Dict[str, Any]) -> State:
    """The launcher's record of a run whose instance had a notice and is gone (or done syncing)
    without the run's own PREEMPTED."""
    last = inst_state.get("last_sync")
    when = time.strftime("%H:%M:%S", time.localtime(last)) if last else "never"
    return transitions.settle(
        run_dir,
        State.PREEMPTED,
        f"instance {ident} was reclaimed after a notice; outputs as of its last sync ({when})",
    )


def _recoverable(mode: CloudMode, dirs: List[Path]) -> Dict[Path, str]:
    """One look at these runs (one listing + one describe per experiment): ``run -> ""`` for a
    PREEMPTED run that may be relaunched now, ``run -> why`` for one to wait for (its instance
    had a notice and is still syncing in its window); runs that are neither are left out.

    Ready: the run's own PREEMPTED came from its instance's notice sync (written after its
    other objects, the checkpoint among them, which is here), or the instance's record says
    its final sync is over, or the instance has ended (nothing more can come)."""
    out: Dict[Path, str] = {}
    by_exp: Dict[Tuple[str, str], List[Path]] = {}
    for d in dirs:
        backend = (records.read_manifest(d) or {}).get("backend") or {}
        if "instance_id" in backend:
            by_exp.setdefault((backend["cloud"]["store"], backend["cloud"]["exp_key"]), []).append(d)
    for (_store, exp_key), members in by_exp.items():
        manifest = records.read_manifest(members[0])
        provider = mode.provider(dict(manifest.get("options") or {}))
        resolved = manifest["backend"]["cloud"].get("resolved") or {}
        listing = provider.list(exp_key + "/")
        backends = {d: records.read_manifest(d)["backend"] for d in members}
        states = provider.describe(sorted({b["instance_id"] for b in backends.values()}), resolved)
        for d in members:
            backend = backends[d]
            ident = backend["instance_id"]
            if transitions.current(d) in TERMINAL_STATES - {State.PREEMPTED}:
                continue
            mode._fetch_run(provider, _DirRun(d), exp_key, listing)  # type: ignore[arg-type]
            status = records.read_status(d)
            state = transitions.current(d)
            if state in TERMINAL_STATES and state != State.PREEMPTED:
                continue
            inst_state = mode._instance_state(
                provider, backend["cloud"]["batch_key"], backend["instance"], listing
            )
            there = states.get(ident, "missing")
            ended, synced = there in ENDED, final_sync_done(inst_state)
            if state != State.PREEMPTED:
                if not inst_state.get("notice"):
                    continue  # working: nothing to recover
                if ended or synced:
                    _reclaimed(d, ident, inst_state)
                    out[d] = ""
                    continue
            elif ended or synced:
                out[d] = ""
                continue
            elif (status.get("notice_sync") or {}).get("attempt") == status.get("attempt"):
                # the instance's own PREEMPTED of this attempt, synced after the run's other objects
                saved = d / f"payload.attempt{int(status.get('attempt') or 1)}.pkl"
                if not status["notice_sync"].get("checkpoint") or saved.exists():
                    out[d] = ""
                    continue
            since = time.time() - float(inst_state.get("notice") or time.time())
            out[d] = (
                f"instance {ident} ({there}) had a notice {since:.0f} s ago and is still syncing in its "
                "notice window"
            )
    return out


def recover_when_ready(
    run_dirs: Sequence[Path],
    timeout: float = 300.0,
    say: Any = None,
    interval: float = 2.0,
) -> Tuple[List[Path], Dict[Path, str]]:
    """Relaunch the PREEMPTED runs among ``run_dirs``, and those whose instance had a notice,
    once each may be (see :func:`_recoverable`): while an instance is still in its notice
    window, the payload here is not yet the checkpoint it is syncing. Waits up to ``timeout``
    seconds, ``say(line)`` every few seconds meanwhile. Returns ``(relaunched, {run: why not})``."""
    from ..config import load_settings
    from . import get_mode_class

    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    by_mode: Dict[str, List[Path]] = {}
    for d in map(Path, run_dirs):
        m = records.read_manifest(d) or {}
        if "instance_id" in (m.get("backend") or {}):
            by_mode.setdefault(m["mode"], []).append(d)
    modes = {name: get_mode_class(name)(load_settings()) for name in by_mode}
    t0 = time.monotonic()
    looks: Dict[Path, str] = {}
    said = -1e9
    while True:
        looks = {}
        for name, dirs in by_mode.items():
            looks.update(_recoverable(modes[name], dirs))
        waiting = {d: why for d, why in looks.items() if why}
        spent = time.monotonic() - t0
        if not waiting or spent >= timeout:
            break
        if spent - said >= 5 or said < 0:
            first = next(iter(waiting.items()))
            say(
                f"easylaunch recover: waiting for {len(waiting)} run(s) before relaunching them: "
                f"{first[0].name}: {first[1]} ({spent:.0f} s of --timeout {timeout:.0f} s)"
            )
            said = spent
        time.sleep(min(interval, max(0.1, timeout - spent)))
    ready = [d for d, why in looks.items() if not why]
    done: List[Path] = []
    for name, dirs in by_mode.items():
        done += recover([d for d in ready if d in dirs], modes[name])
    return done, {d: why for d, why in looks.items() if why}


def recover(run_dirs: Sequence[Path], mode: Optional[CloudMode] = None) -> List[Path]:
    """Relaunch these PREEMPTED runs on new instances (one per ``num_exps_per_instance`` of them),
    from their run directories alone: attempt+1 in the same directory, from the payload the
    instance synced (a checkpoint when the function saved one). Returns the runs relaunched."""
    from ..config import load_settings
    from . import get_mode_class

    by_batch: Dict[Tuple[str, str], List[Path]] = {}
    for d in map(Path, run_dirs):
        if transitions.current(d) != State.PREEMPTED:
            continue
        m = records.read_manifest(d)
        by_batch.setdefault((m["mode"], m["backend"]["cloud"]["batch_key"]), []).append(d)
    done: List[Path] = []
    for (mode_name, _key), dirs in by_batch.items():
        mode_obj = mode or get_mode_class(mode_name)(load_settings())
        done += mode_obj._relaunch(dirs)
    return done


def _relaunch_impl(mode: CloudMode, dirs: List[Path]) -> List[Path]:
    manifest = records.read_manifest(dirs[0])
    options = dict(manifest.get("options") or {})
    common = dict(manifest["backend"]["cloud"])
    provider = mode.provider(options)
    resolved = common.get("resolved") or {}
    per = int(options.get("num_exps_per_instance") or 1)
    k = int(common.get("variants_per_task") or 1)
    exp = manifest["exp_name"]
    relaunched: List[Path] = []
    for chunk in groups(dirs, per):
        attempt_id = f"r{int(time.time() * 1000) % 10**9}"
        runs = [_DirRun(d) for d in chunk]
        inst = Instance(int(time.time() * 1000) % 10**6, runs, groups(runs, k))
        batch_id = manifest["batch_id"]
        inst.name = f"easylaunch-{_safe_name(exp, 24)}-{batch_id.lower()}-{attempt_id}"
        inst.archive_key = common["batch_key"] + f"/instance-{inst.index}.tar.gz"
        for d in chunk:
            n = int(records.read_status(d).get("recoveries", 0)) + 1
            transitions.recovering(d, f"preempted; recovering on a new instance (recovery {n})", recoveries=n)
            fetched = records.read_json(d / FETCHED, {}) or {}
            fetched.pop(records.STATUS, None)
            records.atomic_write_json(d / FETCHED, fetched)
        spec = mode._spec(common, inst, exp, batch_id)
        archive = mode._archive(None, inst, spec)  # type: ignore[arg-type]
        provider.put(inst.archive_key, archive)
        mode._stat("payload_puts")
        script, full = mode._render(provider, common, inst, exp, batch_id)
        if full is not None:
            provider.put(common["batch_key"] + f"/instance-{inst.index}.boot.sh", full.encode())
        tags = {
            "easylaunch": "1",
            "easylaunch-exp": exp,
            "easylaunch-batch": batch_id,
            "easylaunch-runs": ",".join(d.name for d in chunk),
            "Name": inst.name,
        }
        ident = provider.create(inst.name, script, tags, resolved)
        mode._stat("instances_created")
        for d in chunk:
            records.update_manifest(
                d,
                {
                    "backend": {
                        "cloud": common,
                        "instance": inst.index,
                        "instance_name": inst.name,
                        "instance_id": ident,
                    }
                },
            )
        relaunched += chunk
    return relaunched


class _DirRun:
    """A run known by its directory alone (recovery)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir


def _remove_until_quiet(
    provider: Provider, prefixes: List[str], quiet: float = 2.0, rounds: int = 10
) -> None:
    """Delete every object under ``prefixes``, again and again until a listing ``quiet``
    seconds after the last deletion finds nothing: an upload an instance sent just before it
    was deleted can land after the instance is gone (it was in flight)."""
    for n in range(rounds):
        try:
            found = [key for prefix in prefixes for key in provider.list(prefix)]
        except Exception:
            return
        if not found and n:
            return
        for key in found:
            try:
                provider.delete(key)
            except Exception:
                pass
        time.sleep(quiet)
