"""Emulated clouds for the ec2/gcp tests: a moto server of the test session's own (from the venv
scripts/services/cloud.sh makes), the shared GCS emulator, and ``python -m easylaunch.cloudsim``
playing the instances (their boot scripts run for real here, as local processes); what both
test files share: the functions the runs call, a fault proxy, the clouds and their fixtures."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Dict, List, Optional

import cloudpickle
import pytest
from conftest import require_service, wait_for

from easylaunch.cloudsim.players import free_port, wait_http

cloudpickle.register_pickle_by_value(sys.modules[__name__])

VENV = Path(os.environ.get("EASYLAUNCH_TEST_CLOUD_VENV") or "/var/cache/easylaunch-test/cloud-venv")
#: the launcher's keys in the tests: planted (made up per test session, so that they are in no
#: source file or diff), for the credential scan to find them anywhere they leak
LAUNCHER_KEY = "AKIA" + secrets.token_hex(8).upper()
LAUNCHER_SECRET = secrets.token_urlsafe(30)


# -- what the runs call (by value: the instances have no tests/ directory) ----------------------


def slow(doodad_config, variant):
    """Writes progress, then runs ``steps`` steps of 0.1 s (default: until stopped); resumes
    from ``resume_from``."""
    import os
    import time

    start = variant.get("resume_from", 0)
    with open(os.path.join(doodad_config.base_log_dir, "progress.txt"), "a") as f:
        f.write(f"start {start}\n")
    for step in range(start, start + variant.get("steps", 10**6)):
        with open(os.path.join(doodad_config.base_log_dir, "step.txt"), "w") as f:
            f.write(str(step))
        time.sleep(0.1)
    return "done"


class Resumable:
    """A function with doodad/submitit's checkpoint hook: resume where the last step was
    (taking ``checkpoint_seconds`` to save it, as a big model does)."""

    def __call__(self, doodad_config, variant):
        return slow(doodad_config, variant)

    def checkpoint(self, doodad_config, variant):
        import os
        import time

        step = int(open(os.path.join(doodad_config.base_log_dir, "step.txt")).read())
        time.sleep(variant.get("checkpoint_seconds", 0))
        resumed = dict(variant, resume_from=step, steps=5)

        def resume(dc, _v, _variant=resumed):
            return slow(dc, _variant)

        return resume


def wait_synced(job, what: str = "step.txt", timeout: float = 120) -> None:
    """Until the run's instance has synced ``what`` to the bucket (and it is fetched here)."""

    def ok():
        job.fetch()
        return (job.run_dir / what).exists()

    wait_for(ok, timeout, f"{job.run_dir.name} to have synced {what}")


# -- a fault proxy ----------------------------------------------------------------------------

#: a FaultProxy answer: close the connection without a word (an endpoint that died)
DROP = "drop"


class FaultProxy:
    """Forwards to ``target``, except the requests ``fault(method, path, body)`` answers itself:
    ``(status, body)`` (an error document, ``content_type``), or :data:`DROP`."""

    def __init__(self, target: str, fault: Callable, content_type: str = "text/xml"):
        outer = self
        self.hits = 0
        self.target = target.rstrip("/")

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                answer = fault(self.command, self.path, body)
                if answer == DROP:
                    outer.hits += 1
                    self.close_connection = True
                    return
                if answer is not None:
                    outer.hits += 1
                    status, data = answer
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                req = urllib.request.Request(
                    outer.target + self.path,
                    data=body or None,
                    method=self.command,
                    headers={k: v for k, v in self.headers.items() if k.lower() != "host"},
                )
                try:
                    with urllib.request.urlopen(req, timeout=60) as resp:
                        status, data, headers = resp.status, resp.read(), dict(resp.headers)
                except urllib.error.HTTPError as err:
                    status, data, headers = err.code, err.read(), dict(err.headers)
                except OSError as err:
                    status, data, headers = 502, str(err).encode(), {}
                self.send_response(status)
                for k, v in headers.items():
                    if k.lower() not in (
                        "content-length",
                        "transfer-encoding",
                        "connection",
                        "server",
                        "date",
                    ):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _any

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Refusal:
    """A FaultProxy's ``fault``: while armed, the bucket's requests (``match(method, path)``)
    are refused, one dropped connection then one 503, in turn (an endpoint restarting). The
    instance arms it itself by POSTing ``/__refuse__?seconds=S`` to the proxy (at the moment
    its function ends, say); ``refused`` lists ``(time, method, path, how)``."""

    def reset(self, match: Callable[[str, str], bool]) -> None:
        self.until = 0.0
        self.armed_at.clear()
        self.refused.clear()
        self.passed.clear()
        self.match = match

    def __init__(self):
        self.until = 0.0
        self.armed_at: List[float] = []
        self.refused: List[tuple] = []
        #: ``(time, method, unquoted path)`` of the bucket's requests let through
        self.passed: List[tuple] = []
        self.match: Callable[[str, str], bool] = lambda method, path: False

    def arm(self, seconds: float) -> None:
        self.armed_at.append(time.time())
        self.until = time.time() + seconds

    def disarm(self) -> None:
        """Answer again from now on (a test that refuses until it has seen what it waits for)."""
        self.until = 0.0

    def __call__(self, method: str, path: str, body: bytes):
        parts = urllib.parse.urlsplit(path)
        if parts.path == "/__refuse__":
            self.arm(float(dict(urllib.parse.parse_qsl(parts.query)).get("seconds", 5)))
            return 200, b"armed"
        if not self.match(method, path):
            return None
        if time.time() < self.until:
            how = DROP if len(self.refused) % 2 == 0 else 503
            self.refused.append((time.time(), method, path, how))
            if how == DROP:
                return DROP
            return 503, b"<Error><Code>SlowDown</Code><Message>restarting</Message></Error>"
        self.passed.append((time.time(), method, urllib.parse.unquote(path)))
        return None


def cloud_python() -> str:
    """The cloud venv's Python (moto, the GCS emulator); skip (or fail in CI) without it."""
    exe = VENV / "bin" / "python"
    if not exe.exists():
        os.environ.pop("EASYLAUNCH_TEST_CLOUD_VENV", None)
        require_service("cloud")
    return str(exe)


class Proc:
    """A process of the test session (an emulator, cloudsim), stopped by its pid."""

    def __init__(self, args: List[str], log: Path, env: Optional[Dict[str, str]] = None):
        self.args, self.log, self.env = args, log, env
        self.start()

    def start(self) -> None:
        self.out = open(self.log, "ab")
        self.proc = subprocess.Popen(
            self.args,
            stdout=self.out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
            start_new_session=True,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.out.close()


class AwsCloud:
    """moto + cloudsim aws; ``env`` is what a launcher sets to use them."""

    def __init__(self, work: Path, refusal: Optional[Refusal] = None):
        py = cloud_python()
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.moto = Proc(
            [py, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)], work / "moto.log"
        )
        wait_http(self.url + "/moto-api/")
        # with a refusal, cloudsim and its instances reach moto through a fault proxy (the
        # launcher directly): the tests refuse the instances' bucket requests for a while
        self.refusal = refusal
        self.proxy = FaultProxy(self.url, refusal) if refusal is not None else None
        played = self.proxy.url if self.proxy else self.url
        self.env = {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": LAUNCHER_KEY,
            "AWS_SECRET_ACCESS_KEY": LAUNCHER_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        sim_env = {**os.environ, **self.env}
        self.sim_log = work / "cloudsim.log"
        self.sim = Proc(
            [
                sys.executable,
                "-m",
                "easylaunch.cloudsim",
                "aws",
                "--endpoint",
                played,
                "--work-dir",
                str(work / "instances"),
                "--interval",
                "0.3",
            ],
            self.sim_log,
            sim_env,
        )
        self.control = self._control_url()
        import boto3

        session = boto3.session.Session(
            aws_access_key_id=LAUNCHER_KEY, aws_secret_access_key=LAUNCHER_SECRET, region_name="us-east-1"
        )
        self.ec2 = session.client("ec2", endpoint_url=self.url)
        self.s3 = session.client("s3", endpoint_url=self.url)
        self.iam = session.client("iam", endpoint_url=self.url)
        self.iam.create_role(RoleName="easylaunch-role", AssumeRolePolicyDocument="{}")
        self.iam.create_instance_profile(InstanceProfileName="easylaunch-s3")
        self.iam.add_role_to_instance_profile(InstanceProfileName="easylaunch-s3", RoleName="easylaunch-role")
        self.ami = self.ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]

    def _control_url(self) -> str:
        deadline = time.time() + 30
        while time.time() < deadline:
            text = self.sim_log.read_text() if self.sim_log.exists() else ""
            m = re.search(r"control (http://127\.0\.0\.1:\d+)", text)
            if m:
                return m.group(1)
            if self.sim.proc.poll() is not None:
                raise RuntimeError(f"cloudsim aws exited: {text[-2000:]}")
            time.sleep(0.1)
        raise RuntimeError("cloudsim aws printed no control address")

    def call(self, path: str, method: str = "POST") -> dict:
        req = urllib.request.Request(
            self.control + path, method=method, data=b"" if method == "POST" else None
        )
        return json.loads(urllib.request.urlopen(req, timeout=60).read())

    def instances(self) -> List[dict]:
        return self.call("/instances", "GET")["instances"]

    def new_bucket(self, name: str) -> str:
        self.s3.create_bucket(Bucket=name)
        return name

    def config(self, path: Path, bucket: str, **extra: object) -> Path:
        values = {
            "AWS_S3_PATH": f"s3://{bucket}/el",
            "REGION_TO_GPU_AWS_IMAGE_ID": {"us-east-1": self.ami},
            "AWS_IAM_INSTANCE_PROFILE_NAME": "easylaunch-s3",
            "INSTANCE_TYPE": "t3.micro",
            **extra,
        }
        path.write_text("".join(f"{k} = {v!r}\n" for k, v in values.items()))
        return path

    def live_instances(self, exp: Optional[str] = None) -> List[dict]:
        filters = [{"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]}]
        if exp:
            filters.append({"Name": "tag:easylaunch-exp", "Values": [exp]})
        return [
            i for r in self.ec2.describe_instances(Filters=filters)["Reservations"] for i in r["Instances"]
        ]

    def all_instances(self) -> List[dict]:
        return [i for r in self.ec2.describe_instances()["Reservations"] for i in r["Instances"]]

    def objects(self, bucket: str) -> Dict[str, bytes]:
        out = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents") or []:
                out[item["Key"]] = self.s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        return out

    def played(self, ident: str) -> dict:
        """What cloudsim knows of instance ``ident`` (its directory: boot.log, ...)."""
        return [p for p in self.instances() if p["id"] == ident][0]

    def stop(self) -> None:
        self.sim.stop()
        self.moto.stop()
        if self.proxy is not None:
            self.proxy.close()


def _bucket_name(request) -> str:
    return re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{os.getpid() % 1000}"


def _use_aws(cloud: AwsCloud, monkeypatch, tmp_path, request) -> AwsCloud:
    for k, v in cloud.env.items():
        monkeypatch.setenv(k, v)
    cloud.bucket = cloud.new_bucket(_bucket_name(request))
    cloud.config_path = cloud.config(tmp_path / "easylaunch_config.py", cloud.bucket)
    monkeypatch.setenv("EASYLAUNCH_CONFIG", str(cloud.config_path))
    return cloud


@pytest.fixture(scope="session")
def aws_cloud(tmp_path_factory):
    cloud = AwsCloud(tmp_path_factory.mktemp("aws"))
    yield cloud
    cloud.stop()


@pytest.fixture
def aws(aws_cloud, monkeypatch, tmp_path, request):
    """The session's AWS emulation, this test's bucket and config file, the launcher's env."""
    return _use_aws(aws_cloud, monkeypatch, tmp_path, request)


@pytest.fixture(scope="module")
def aws_refusing_cloud(tmp_path_factory):
    cloud = AwsCloud(tmp_path_factory.mktemp("aws-refusing"), refusal=Refusal())
    yield cloud
    cloud.stop()


@pytest.fixture
def aws_refusing(aws_refusing_cloud, monkeypatch, tmp_path, request):
    """As ``aws``, on a moto of its own whose instances reach the bucket through a proxy that
    refuses their requests to this test's bucket while ``aws_refusing.refusal`` is armed."""
    cloud = _use_aws(aws_refusing_cloud, monkeypatch, tmp_path, request)
    bucket = cloud.bucket
    cloud.refusal.reset(lambda method, path: path.startswith(f"/{bucket}/") or path.startswith(f"/{bucket}?"))
    return cloud


# -- Google Cloud: cloudsim gcp + the GCS emulator ------------------------------------------------

PROJECT = "el-test-project"
IMAGE = "debian-12-bookworm-v20241112"


class GcpCloud:
    """cloudsim gcp on a free port, against the shared GCS emulator (through a fault proxy for
    its instances when a refusal is given)."""

    def __init__(self, work: Path, refusal: Optional[Refusal] = None):
        require_service("cloud")
        self.gcs = os.environ.get("EASYLAUNCH_TEST_GCS_URL") or ""
        if not self.gcs:
            pytest.skip("no GCS emulator (EASYLAUNCH_TEST_GCS_URL)")
        work.mkdir(parents=True, exist_ok=True)
        self.refusal = refusal
        self.proxy = FaultProxy(self.gcs, refusal, "application/json") if refusal is not None else None
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / "cloudsim-gcp.log"
        args = [
            sys.executable,
            "-m",
            "easylaunch.cloudsim",
            "gcp",
            "--port",
            str(self.port),
            "--storage",
            self.proxy.url if self.proxy else self.gcs,
        ]
        args += ["--work-dir", str(work / "instances"), "--interval", "0.3"]
        self.sim = Proc(args, self.log, dict(os.environ))
        wait_http(self.url + "/compute/v1/projects/p/zones")
        deadline = time.time() + 30
        while not (m := re.search(r"control (http://127\.0\.0\.1:\d+)", self.log.read_text())):
            assert time.time() < deadline, self.log.read_text()
            time.sleep(0.1)
        self.control = m.group(1)
        self.env = {
            "STORAGE_EMULATOR_HOST": self.gcs,
            "EASYLAUNCH_GCP_COMPUTE_ENDPOINT": self.url,
            "CLOUDSDK_CORE_PROJECT": PROJECT,
        }
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        os.environ.setdefault("STORAGE_EMULATOR_HOST", self.gcs)
        self.storage = storage.Client(project=PROJECT, credentials=AnonymousCredentials())

    def call(self, path: str, method: str = "POST"):
        req = urllib.request.Request(
            self.control + path, method=method, data=b"" if method == "POST" else None
        )
        return json.loads(urllib.request.urlopen(req, timeout=60).read())

    def instances(self, exp: str = "", zone: str = "us-west1-a"):
        """The live instances of ``exp`` as the Compute endpoint lists them."""
        from easylaunch.modes import gcp

        url = f"{self.url}/compute/v1/projects/{PROJECT}/zones/{zone}/instances"
        items = json.loads(urllib.request.urlopen(url, timeout=30).read()).get("items") or []
        return [i for i in items if not exp or i["labels"].get("easylaunch-exp") == gcp.label_value(exp)]

    def played(self, name: str) -> dict:
        """What cloudsim knows of instance ``name`` (its directory, whether it was preempted)."""
        return [p for p in self.call("/instances", "GET")["instances"] if p["name"] == name][0]

    def inserts(self):
        return [
            r
            for r in self.call("/requests", "GET")
            if r["method"] == "POST" and r["path"].endswith("/instances")
        ]

    def objects(self, bucket: str):
        return {b.name: b.download_as_bytes() for b in self.storage.list_blobs(bucket)}

    def config(self, path: Path, bucket: str, **extra):
        values = {
            "GCP_BUCKET_NAME": bucket,
            "GCP_IMAGE_NAME": IMAGE,
            "GCP_IMAGE_PROJECT": "debian-cloud",
            "GCP_DEFAULT_KWARGS": {"zone": "us-west1-a", "instance_type": "e2-small"},
            **extra,
        }
        path.write_text("".join(f"{k} = {v!r}\n" for k, v in values.items()))
        return path

    def stop(self):
        self.sim.stop()
        if self.proxy is not None:
            self.proxy.close()


def _use_gcp(cloud: GcpCloud, monkeypatch, tmp_path, request):
    for k, v in cloud.env.items():
        monkeypatch.setenv(k, v)
    name = _bucket_name(request)
    bucket = cloud.storage.create_bucket(name)
    cloud.bucket = name
    cloud.config_path = cloud.config(tmp_path / "easylaunch_config.py", name)
    monkeypatch.setenv("EASYLAUNCH_CONFIG", str(cloud.config_path))
    yield cloud
    for blob in list(cloud.storage.list_blobs(name)):
        blob.delete()
    bucket.delete()


@pytest.fixture(scope="module")
def gcp_cloud(tmp_path_factory):
    cloud = GcpCloud(tmp_path_factory.mktemp("gcp"))
    yield cloud
    cloud.stop()


@pytest.fixture
def cloud(gcp_cloud, monkeypatch, tmp_path, request):
    """cloudsim gcp of this module, this test's bucket and config file, the launcher's env."""
    yield from _use_gcp(gcp_cloud, monkeypatch, tmp_path, request)


@pytest.fixture(scope="module")
def gcp_refusing_cloud(tmp_path_factory):
    cloud = GcpCloud(tmp_path_factory.mktemp("gcp-refusing"), refusal=Refusal())
    yield cloud
    cloud.stop()


@pytest.fixture
def gcp_refusing(gcp_refusing_cloud, monkeypatch, tmp_path, request):
    """As ``cloud``, with a cloudsim gcp of its own whose instances reach the bucket through a
    proxy that refuses their requests to this test's bucket while its refusal is armed."""
    gen = _use_gcp(gcp_refusing_cloud, monkeypatch, tmp_path, request)
    cloud = next(gen)
    bucket = cloud.bucket
    cloud.refusal.reset(lambda method, path: f"/b/{bucket}/" in path)
    yield cloud
    next(gen, None)


def boot_without_its_code(mode: str, dry_exp: str, fn, log_dir: Path, work: Path, env: Dict[str, str]) -> str:
    """Render ``mode``'s boot script with a dry run (experiment ``dry_exp``) and run it here as
    an instance whose bucket answers nothing (``env``: its metadata URL and endpoints); checks
    that it fails and that it says it ended the instance; returns its boot.log."""
    import easylaunch

    easylaunch.run_experiment(fn, exp_name=dry_exp, mode=mode, variant={}, dry_run=True, skip_wait=True)
    (script,) = (log_dir / dry_exp).rglob("instance-0.boot.sh")
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(work),
        "EASYLAUNCH_INSTANCE_ROOT": str(work / "vm"),
        "EASYLAUNCH_STORE_RETRY_SECONDS": "1",
        **env,
    }
    script.chmod(0o700)  # executed as cloud-init and GCE's runner do: the shebang chooses bash
    proc = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=120)
    boot = (work / "vm" / "boot.log").read_text()
    assert proc.returncode == 1, boot
    assert "easylaunch: fetching the code failed: " in boot and "easylaunch: ended this instance" in boot
    return boot


def in_container(doodad_config, variant):
    import os

    return os.path.exists("/.dockerenv"), open("/etc/os-release").read().split("\n")[0]


def run_in_docker_on_the_instance(mode: str, exp: str):
    """A run with ``docker_image=`` on a played instance of ``mode``: it runs inside the image,
    through the instance's dockerd. Returns its job."""
    import easylaunch
    from easylaunch import State

    require_service("docker")
    image = os.environ.get("EASYLAUNCH_TEST_DOCKER_IMAGE") or "local/debian-python:bookworm"
    job = easylaunch.run_experiment(
        in_container, exp_name=exp, mode=mode, variant={}, docker_image=image, sync_interval=1, skip_wait=True
    )
    assert job.wait(180) == State.COMPLETED, job.status
    inside, release = job.result()
    assert inside and "Debian" in release
    return job
