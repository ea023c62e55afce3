"""B8-cloud: 100 variants with num_exps_per_instance=10 on mode='ec2' and mode='gcp', rehearsed
under cloudsim, every cloud call counted on the launcher side.

    .venv/bin/python benchmarks/b8_cloud.py [--quick] [--keep] [--only ec2,gcp] [-n 100] [--per 10]

Needs the cloud venv of scripts/services/cloud.sh ($EASYLAUNCH_TEST_CLOUD_VENV, default
/var/cache/easylaunch-test/cloud-venv: moto and gcp-storage-emulator). The script starts
emulators of its own on free ports (a fresh moto server, a fresh in-memory GCS emulator) and
``python -m easylaunch.cloudsim aws|gcp`` to play the instances (their boot scripts run for real
here, as local processes: bash + the standard-library agent + one warm task runner each), so
nothing it does touches the shared emulators. Per cloud:

- a sweep of ``-n`` trivial variants (``expected_duration=0.01``: one warm task per instance) of
  a code dir with a git diff, ``num_exps_per_instance=--per``, from the launch call until every
  result is read through the Job handles (so every result.pkl came back from the bucket);
- a second, smaller sweep of the same code (its code uploads must be 0).

What is counted, exactly, in this process (the launcher), by hooking the SDKs:
- EC2 / S3 / IAM: every client botocore creates gets handlers on its event system:
  ``provide-client-params`` counts each API call by operation name (a page of a paginated
  listing is one call), with the object key for PutObject; ``before-send`` adds each HTTP
  request's body bytes (Content-Length).
- GCE / GCS: ``requests.Session.send`` (the transport of google-cloud-compute's REST client and
  of google-cloud-storage) classifies each HTTP request by method and path: Compute
  ``instances.insert`` / ``instances.list`` / ..., GCS upload (object name from the query or
  the multipart body), object metadata GET (``get_blob``: the HEAD of GCS), listing page,
  download; body bytes as sent. The Compute calls are checked against what the cloudsim
  endpoint says it received (``GET /requests`` of its control endpoint).
- ``CloudMode.poll`` is wrapped so that the calls of each backend poll made while waiting are
  known separately (Describe / instances.list, bucket listing pages, object GETs).

PUTs are told apart by key: code objects (``<prefix>/.snapshots/``: the code snapshot and
the easylaunch + cloudpickle zips the instance imports), payload objects (``.batches/<id>/``:
one archive of an instance's run directories and its spec; a boot script too large for the
instance metadata), the bucket write probe of ``check()``.

doodad's way, computed alongside from doodad's algorithm (vitchyr/doodad,
``doodad/easy_launch/python_function.py`` ``run_experiment`` and ``doodad/mode.py``
``EC2SpotDocker`` / ``GCPDocker.launch_command``; the version whose keywords easylaunch takes):
one ``run_experiment`` call per variant, each one instance (``request_spot_instances`` + a
``create_tags`` on EC2; ``images().get`` + ``instances().insert`` on GCE): doodad's
``num_exps_per_instance`` starts copies of the SAME command on an instance, so different
variants never share one; 100 variants = 100 instances. The variant's payload (base64 of the
cloudpickled function, variant and config, git diffs included) is part of each instance's
command, i.e. one upload per variant (in its user data / metadata; on EC2 a script over
10,000 characters is put in S3 as one object per variant, under a fresh uuid). Code mounts are
tarred (uncompressed), named by their MD5 and uploaded once per launching process after an
existence check (``aws s3 ls`` / ``blob.exists``): here 2 mounts (the code dir, and doodad's
own ``easy_launch/`` dir that holds its ``run_experiment.py``), 0 PUTs on a later sweep of the
same files. doodad has no job handle and never polls: the outputs are fetched by hand
(``aws s3 sync`` / ``gsutil rsync`` of the log prefix). Its bytes are a lower bound: the tar of
the code dir once (doodad's own dir not counted) + the base64 of each run's payload.pkl (the
~3 KB of shell doodad writes around each payload not counted).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, Table, machine, make_git_repo, parse_args, temp_root  # noqa: E402

from easylaunch.cloudsim.players import free_port, wait_http  # noqa: E402

PROJECT = "b8-cloud-project"
GCE_IMAGE = "debian-12-bookworm-v20241112"
DOODAD_CODE_MOUNTS = 2  # the code dir + doodad's easy_launch/ (the target mount)


def trivial(doodad_config, variant):
    return variant["i"]


# -- counting on the launcher side -------------------------------------------------------------


class Meter:
    """Every cloud call this process makes, by name; object PUTs by kind; bytes sent."""

    def __init__(self) -> None:
        self.active = False
        self.calls: Counter = Counter()
        self.sent: Counter = Counter()  # request body bytes, by service
        self.puts: Counter = Counter()  # by kind: code, payload, probe, other
        self.put_bytes: Counter = Counter()
        self.polls: List[Tuple[int, Counter]] = []
        self.code_sizes: Dict[str, int] = {}
        #: (start perf_counter, seconds, CPU seconds) of each poll
        self.poll_times: List[Tuple[float, float, float]] = []

    def reset(self) -> None:
        self.calls, self.sent, self.puts, self.put_bytes = Counter(), Counter(), Counter(), Counter()
        self.polls, self.poll_times, self.code_sizes = [], [], {}

    def call(self, name: str) -> None:
        if self.active:
            self.calls[name] += 1

    def put(self, key: str, nbytes: int) -> None:
        if not self.active:
            return
        kind = (
            "code"
            if "/.snapshots/" in "/" + key
            else "payload"
            if "/.batches/" in "/" + key
            else "probe"
            if "write-probe" in key
            else "other"
        )
        self.puts[kind] += 1
        self.put_bytes[kind] += nbytes
        if kind == "code":
            self.code_sizes[key.rsplit("/", 1)[-1]] = nbytes

    def bytes_out(self, service: str, nbytes: int) -> None:
        if self.active:
            self.sent[service] += nbytes


def _body_len(body: Any, headers: Any) -> int:
    length = headers.get("Content-Length") if headers is not None else None
    if length:
        return int(length)
    if isinstance(body, (bytes, bytearray)):
        return len(body)
    if isinstance(body, str):
        return len(body.encode())
    return 0


def hook_botocore(meter: Meter) -> None:
    """Count every call of every botocore client created from now on (by operation name)."""
    import botocore.session

    original = botocore.session.Session.create_client

    def create_client(self, *args, **kwargs):
        client = original(self, *args, **kwargs)
        service = client.meta.service_model.service_name

        def on_call(params, model, **_):
            meter.call(f"{service}.{model.name}")
            if model.name == "PutObject":
                body = params.get("Body", b"")
                meter.put(params.get("Key", ""), len(body) if isinstance(body, (bytes, bytearray)) else 0)

        def on_send(request, **_):
            meter.bytes_out(service, _body_len(request.body, request.headers))

        client.meta.events.register("provide-client-params", on_call)
        client.meta.events.register("before-send", on_send)
        return client

    botocore.session.Session.create_client = create_client


NAME_IN_BODY = re.compile(rb'"name"\s*:\s*"([^"]+)"')


def google_call(method: str, url: str) -> str:
    """The name of one google-cloud HTTP request (Compute v1 REST or the GCS JSON API)."""
    parts = urllib.parse.urlsplit(url)
    path, query = parts.path, urllib.parse.parse_qs(parts.query)
    if path.startswith("/compute/v1/"):
        segs = path.strip("/").split("/")
        if "instances" in segs:
            tail = segs[segs.index("instances") + 1 :]
            if not tail:
                return "compute.instances." + ("insert" if method == "POST" else "list")
            return f"compute.instances.{method.lower()}"
        if "operations" in segs:
            return "compute.operations." + ("wait" if segs[-1] == "wait" else "get")
        kind = next((s for s in ("zones", "images", "machineTypes", "acceleratorTypes") if s in segs), "?")
        if kind == "zones" and ("machineTypes" in segs or "acceleratorTypes" in segs):
            kind = "machineTypes" if "machineTypes" in segs else "acceleratorTypes"
        return f"compute.{kind}.get"
    if path.startswith("/upload/storage/v1/"):
        return "gcs.upload"
    if path.startswith("/download/storage/v1/") or query.get("alt") == ["media"]:
        return "gcs.download"
    if re.match(r"^/storage/v1/b/[^/]+/o/.+", path):
        return "gcs.object." + {"GET": "metadata", "DELETE": "delete"}.get(method, method.lower())
    if re.match(r"^/storage/v1/b/[^/]+/o/?$", path):
        return "gcs.list"
    if re.match(r"^/storage/v1/b/[^/]+/?$", path):
        return "gcs.bucket.get"
    return f"google.other {method} {path}"


def hook_requests(meter: Meter) -> None:
    """Count every HTTP request of the google-cloud libraries (their transport is requests)."""
    import requests

    original = requests.Session.send

    def send(self, request, **kwargs):
        name = google_call(request.method, request.url)
        meter.call(name)
        body = request.body or b""
        nbytes = _body_len(body, request.headers)
        meter.bytes_out(name.split(".")[0], nbytes)
        if name == "gcs.upload":
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.url).query)
            key = (query.get("name") or [""])[0]
            if not key and isinstance(body, (bytes, bytearray)):
                m = NAME_IN_BODY.search(body[:4096])
                key = m.group(1).decode() if m else ""
            meter.put(key, nbytes)
        return original(self, request, **kwargs)

    requests.Session.send = send


def hook_polls(meter: Meter) -> None:
    """Keep what each backend poll of a cloud mode called, separately."""
    from easylaunch.modes import cloud

    original = cloud.CloudMode.poll

    def poll(self, jobs):
        before = Counter(meter.calls)
        t0, cpu0 = time.perf_counter(), time.thread_time()
        try:
            return original(self, jobs)
        finally:
            if meter.active:
                meter.polls.append((len(jobs), meter.calls - before))
                meter.poll_times.append((t0, time.perf_counter() - t0, time.thread_time() - cpu0))

    cloud.CloudMode.poll = poll


# -- emulators and players (this script's own, on free ports) ------------------------------------


class Procs:
    """The processes this script starts, stopped by their pids at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: List[Tuple[subprocess.Popen, Any]] = []

    def start(self, name: str, args: List[str], env: Optional[Dict[str, str]] = None) -> Path:
        log = self.root / f"{name}.log"
        out = open(log, "ab")
        proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        self.procs.append((proc, out))
        return log

    def stop(self) -> None:
        for proc, out in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            out.close()


def control_url(log: Path, what: str) -> str:
    deadline = time.time() + 60
    while time.time() < deadline:
        m = re.search(r"control (http://127\.0\.0\.1:\d+)", log.read_text() if log.exists() else "")
        if m:
            return m.group(1)
        time.sleep(0.1)
    raise RuntimeError(f"{what} printed no control address: {log.read_text()[-2000:]}")


def control(url: str, path: str) -> Any:
    return json.loads(urllib.request.urlopen(url + path, timeout=60).read())


def wait_players_gone(url: str, timeout: float = 120) -> None:
    """Until every instance cloudsim plays has ended (the next cloud gets the CPUs)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not [i for i in control(url, "/instances")["instances"] if i["alive"]]:
            return
        time.sleep(0.5)
    print(f"(instances still alive after {timeout} s)")


def sim_env(extra: Dict[str, str]) -> Dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def setup_aws(procs: Procs, venv_py: str, root: Path) -> Dict[str, Any]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs.start("moto", [venv_py, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)])
    wait_http(url + "/moto-api/")
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "b8cloud",
        "AWS_SECRET_ACCESS_KEY": "b8cloud-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(env)
    log = procs.start(
        "cloudsim-aws",
        [sys.executable, "-m", "easylaunch.cloudsim", "aws", "--endpoint", url,
         "--work-dir", str(root / "aws-instances"), "--interval", "0.3"],
        sim_env(env),
    )  # fmt: skip
    ctl = control_url(log, "cloudsim aws")
    import boto3

    session = boto3.session.Session(region_name="us-east-1")
    s3, ec2, iam = (session.client(s, endpoint_url=url) for s in ("s3", "ec2", "iam"))
    s3.create_bucket(Bucket="b8-cloud")
    iam.create_role(RoleName="b8-role", AssumeRolePolicyDocument="{}")
    iam.create_instance_profile(InstanceProfileName="b8-s3")
    iam.add_role_to_instance_profile(InstanceProfileName="b8-s3", RoleName="b8-role")
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    config = root / "aws_config.py"
    values = {
        "AWS_S3_PATH": "s3://b8-cloud/el",
        "REGION_TO_GPU_AWS_IMAGE_ID": {"us-east-1": ami},
        "AWS_IAM_INSTANCE_PROFILE_NAME": "b8-s3",
        "INSTANCE_TYPE": "t3.micro",
    }
    config.write_text("".join(f"{k} = {v!r}\n" for k, v in values.items()))

    def created(exp: str) -> int:
        res = ec2.describe_instances(Filters=[{"Name": "tag:easylaunch-exp", "Values": [exp]}])
        return sum(len(r["Instances"]) for r in res["Reservations"])

    return {"config": config, "control": ctl, "created": created}


def setup_gcp(procs: Procs, venv: Path, root: Path) -> Dict[str, Any]:
    gcs_port, port = free_port(), free_port()
    gcs = f"http://127.0.0.1:{gcs_port}"
    procs.start(
        "gcs",
        [str(venv / "bin" / "gcp-storage-emulator"), "start", "--host", "127.0.0.1", "--port", str(gcs_port),
         "--in-memory"],
    )  # fmt: skip
    wait_http(gcs + "/storage/v1/b")
    env = {
        "STORAGE_EMULATOR_HOST": gcs,
        "EASYLAUNCH_GCP_COMPUTE_ENDPOINT": f"http://127.0.0.1:{port}",
        "CLOUDSDK_CORE_PROJECT": PROJECT,
    }
    os.environ.update(env)
    log = procs.start(
        "cloudsim-gcp",
        [sys.executable, "-m", "easylaunch.cloudsim", "gcp", "--port", str(port), "--storage", gcs,
         "--work-dir", str(root / "gcp-instances"), "--interval", "0.3"],
        sim_env(env),
    )  # fmt: skip
    wait_http(f"http://127.0.0.1:{port}/compute/v1/projects/p/zones")
    ctl = control_url(log, "cloudsim gcp")
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    storage.Client(project=PROJECT, credentials=AnonymousCredentials()).create_bucket("b8-cloud")
    config = root / "gcp_config.py"
    values = {
        "GCP_BUCKET_NAME": "gs://b8-cloud/el",
        "GCP_IMAGE_NAME": GCE_IMAGE,
        "GCP_IMAGE_PROJECT": "debian-cloud",
        "GCP_DEFAULT_KWARGS": {"zone": "us-west1-a", "instance_type": "e2-small"},
    }
    config.write_text("".join(f"{k} = {v!r}\n" for k, v in values.items()))

    def created(exp: str) -> int:
        label = re.sub(r"[^a-z0-9_-]+", "-", exp.lower())[:63]
        return sum(
            1
            for r in control(ctl, "/requests")
            if r["method"] == "POST"
            and r["path"].endswith("/instances")
            and (r["body"].get("labels") or {}).get("easylaunch-exp") == label
        )

    return {"config": config, "control": ctl, "created": created}


# -- one sweep --------------------------------------------------------------------------------


def sweep(meter: Meter, mode: str, exp: str, n: int, per: int, code: Path, logs: Path) -> Dict[str, Any]:
    from easylaunch import run_sweep

    meter.reset()
    meter.active = True
    t0 = time.perf_counter()
    try:
        jobs = run_sweep(
            trivial,
            [{"i": i} for i in range(n)],
            exp_name=exp,
            mode=mode,
            num_exps_per_instance=per,
            expected_duration=0.01,
            code_dirs_to_mount=[str(code)],
            base_log_dir=str(logs),
            skip_wait=True,
        )
        launched = time.perf_counter() - t0
        launch_calls = Counter(meter.calls)
        results = jobs.results(timeout=600)
        total = time.perf_counter() - t0
    finally:
        meter.active = False
    assert results == list(range(n)), results
    for job in jobs:
        assert (job.run_dir / "result.pkl").is_file(), job.run_dir
    return {
        "launched": launched,
        "total": total,
        "launch_calls": launch_calls,
        "calls": Counter(meter.calls),
        "sent": Counter(meter.sent),
        "puts": Counter(meter.puts),
        "put_bytes": Counter(meter.put_bytes),
        "polls": list(meter.polls),
        "poll_times": [(t - t0, d, c) for t, d, c in meter.poll_times],
        "stats": dict(jobs[0].mode.stats),
        "payload_b64": sum(4 * ((os.path.getsize(j.run_dir / "payload.pkl") + 2) // 3) for j in jobs),
        "code_keys": list(jobs[0].manifest["backend"]["cloud"]["code"]),
        "code_sizes": dict(meter.code_sizes),
    }


def tar_size(path: Path) -> int:
    """doodad's code mount: an uncompressed tar of the directory (``MountLocal.gzip``, with its
    default filters: names ending in .pyc .log .git .mp4 .idea, directories named data)."""
    drop_ext, drop_dir = (".pyc", ".log", ".git", ".mp4", ".idea"), ("data",)

    def keep(info: tarfile.TarInfo) -> Optional[tarfile.TarInfo]:
        if info.name.endswith(drop_ext) or any(info.name.endswith("/" + d) for d in drop_dir):
            return None
        return info

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(str(path), arcname=path.name, filter=keep)
    return len(buf.getvalue())


def kib(n: float) -> str:
    return f"{n / 1024:.1f} KiB"


def per_poll(polls: List[Tuple[int, Counter]], names: Tuple[str, ...]) -> str:
    """min-max (total) of the calls named ``names`` per poll."""
    counts = [sum(c.get(name, 0) for name in names) for _, c in polls]
    if not counts:
        return "no poll"
    lo, hi = min(counts), max(counts)
    return (f"{lo}" if lo == hi else f"{lo}-{hi}") + f" ({sum(counts)} in {len(counts)} polls)"


CLOUD = {
    "ec2": dict(
        create=("ec2.RunInstances",),
        describe=("ec2.DescribeInstances",),
        listing=("s3.ListObjectsV2",),
        get=("s3.GetObject",),
        head=("s3.HeadObject",),
        service=("ec2", "s3"),
        doodad_create="RequestSpotInstances + CreateTags",
    ),
    "gcp": dict(
        create=("compute.instances.insert",),
        describe=("compute.instances.list",),
        listing=("gcs.list",),
        get=("gcs.download",),
        head=("gcs.object.metadata",),
        service=("compute", "gcs"),
        doodad_create="images.get + instances.insert",
    ),
}


def report(mode: str, n: int, per: int, first: Dict[str, Any], second: Dict[str, Any], n2: int,
           created: int, code_tar: int) -> None:  # fmt: skip
    c = CLOUD[mode]
    calls, polls = first["calls"], first["polls"]
    instances = sum(calls.get(x, 0) for x in c["create"])
    want = -(-n // per)
    t = Table(f"B8-cloud, mode={mode!r}: {n} trivial variants, num_exps_per_instance={per}, under cloudsim")
    t.add("wall time: launch call -> all results read", f"{first['total']:.1f} s", "", "n/a (no job handle)")
    t.add("  launch call returned", f"{first['launched']:.1f} s")
    t.add(
        f"instances created ({'/'.join(c['create'])} calls)",
        f"{instances} (cloud lists {created})",
        str(want),
        f"{n} ({c['doodad_create']} x {n})",
        f"{n / max(1, instances):.0f}x fewer",
    )
    keys = first["code_keys"]
    t.add(
        "code-object PUTs, first sweep",
        f"{first['puts']['code']} ({len(keys)} objects: snapshot + easylaunch, cloudpickle zips)",
        "1 per content",
        f"{DOODAD_CODE_MOUNTS} (one tar per code mount)",
    )
    t.add(
        f"code-object PUTs, second sweep of the same code ({n2} variants)",
        str(second["puts"]["code"]),
        "0",
        "0 (MD5-named tars, existence checked)",
    )
    t.add(
        f"code HEADs ({'/'.join(c['head'])}), first / second sweep",
        f"{sum(first['calls'].get(x, 0) for x in c['head'])} / "
        f"{sum(second['calls'].get(x, 0) for x in c['head'])}",
        "1 per code object",
        f"{DOODAD_CODE_MOUNTS} / {DOODAD_CODE_MOUNTS} (ls / exists)",
    )
    t.add(
        "payload PUTs (one archive of its run dirs per instance)",
        str(first["puts"]["payload"]),
        f"<= {want}",
        f"{n} (one per variant)",
        f"{n / max(1, first['puts']['payload']):.0f}x fewer",
    )
    t.add("other PUTs (bucket write probe of check())", str(first["puts"]["probe"] + first["puts"]["other"]))
    t.add(
        "API calls per poll: " + "/".join(c["describe"]),
        per_poll(polls, c["describe"]),
        "1",
        "n/a (doodad never polls)",
    )
    t.add(
        "API calls per poll: bucket listing (" + "/".join(c["listing"]) + " pages)",
        per_poll(polls, c["listing"]),
        "1",
    )
    t.add("  object GETs per poll (changed outputs fetched)", per_poll(polls, c["get"]))
    others = Counter()
    for _, p in polls:
        others.update({k: v for k, v in p.items() if k not in c["describe"] + c["listing"] + c["get"]})
    t.add(
        "  any other call while polling", ", ".join(f"{k} {v}" for k, v in sorted(others.items())) or "none"
    )
    put_total = sum(first["put_bytes"].values())
    doodad_bytes = code_tar + first["payload_b64"]
    t.add(
        "bytes PUT to the bucket (code / payload), first sweep",
        f"{kib(put_total)} ({kib(first['put_bytes']['code'])} / {kib(first['put_bytes']['payload'])})",
        "",
        f">= {kib(doodad_bytes)} (code tar {kib(code_tar)} + {n} payloads)",
    )
    t.add(
        "bytes PUT to the bucket, second sweep",
        f"{kib(sum(second['put_bytes'].values()))} ({n2} variants)",
    )
    sent = sum(first["sent"].get(s, 0) for s in c["service"])
    t.add(
        "request body bytes sent (every call: PUTs, instance creation, polls), first sweep",
        f"{kib(sent)} (" + ", ".join(f"{s} {kib(first['sent'].get(s, 0))}" for s in c["service"]) + ")",
    )
    t.add(
        "API calls in all, first sweep (launch / while waiting)",
        f"{sum(calls.values())} ({sum(first['launch_calls'].values())} / "
        f"{sum(calls.values()) - sum(first['launch_calls'].values())})",
    )
    t.print()
    print("  every call of the first sweep: " + ", ".join(f"{k} {v}" for k, v in sorted(calls.items())))
    print("  second sweep: " + ", ".join(f"{k} {v}" for k, v in sorted(second["calls"].items())))
    print(f"  mode.stats (first sweep): {first['stats']}")
    print("  code objects put: " + ", ".join(f"{k} {kib(v)}" for k, v in first["code_sizes"].items()))
    print(
        "  polls of the first sweep (start after the launch call, seconds, CPU seconds, runs, calls): "
        + "; ".join(
            f"{t:.1f} s {d:.2f} s {cpu:.2f} s {runs} runs {sum(calls.values())} calls"
            for (t, d, cpu), (runs, calls) in zip(first["poll_times"], polls)
        )
    )


def main() -> int:
    def extra(p):
        p.add_argument("--only", default="ec2,gcp", help="comma-separated: ec2, gcp")
        p.add_argument("-n", type=int, default=100, help="variants of the first sweep")
        p.add_argument("--per", type=int, default=10, help="num_exps_per_instance")
        p.add_argument("--second", type=int, default=10, help="variants of the second sweep (same code)")

    args = parse_args(__doc__.splitlines()[0], extra)
    n, per, n2 = (20, 10, 10) if args.quick else (args.n, args.per, args.second)
    venv = Path(os.environ.get("EASYLAUNCH_TEST_CLOUD_VENV") or "/var/cache/easylaunch-test/cloud-venv")
    if not (venv / "bin" / "python").exists():
        print(f"needs the cloud venv of scripts/services/cloud.sh (moto, gcp-storage-emulator): no {venv}")
        return 2
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    print(machine())
    meter = Meter()
    hook_botocore(meter)
    hook_requests(meter)
    hook_polls(meter)
    with temp_root("easylaunch-b8cloud-", args.keep) as root:
        procs = Procs(root)
        try:
            code = make_git_repo(root / "code", files=20)
            code_tar = tar_size(code)
            logs = root / "logs"
            for mode in [m.strip() for m in args.only.split(",") if m.strip()]:
                cloud = (
                    setup_aws(procs, str(venv / "bin" / "python"), root)
                    if mode == "ec2"
                    else setup_gcp(procs, venv, root)
                )
                os.environ["EASYLAUNCH_CONFIG"] = str(cloud["config"])
                first = sweep(meter, mode, f"b8-{mode}", n, per, code, logs)
                created = cloud["created"](f"b8-{mode}")
                wait_players_gone(cloud["control"])
                second = sweep(meter, mode, f"b8-{mode}-again", n2, per, code, logs)
                wait_players_gone(cloud["control"])
                report(mode, n, per, first, second, n2, created, code_tar)
            print(machine())
        finally:
            procs.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
