"""Emulated clouds for the ec2/gcp tests: a moto server / GCS emulator of the test session's own
(from the venv scripts/services/cloud.sh makes) and ``python -m easylaunch.cloudsim`` playing
the instances (their boot scripts run for real here, as local processes)."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from conftest import require_service

VENV = Path(os.environ.get("EASYLAUNCH_TEST_CLOUD_VENV") or "/var/cache/easylaunch-test/cloud-venv")
#: the launcher's keys in the tests: planted (made up per test session, so that they are in no
#: source file or diff), for the credential scan to find them anywhere they leak
LAUNCHER_KEY = "AKIA" + secrets.token_hex(8).upper()
LAUNCHER_SECRET = secrets.token_urlsafe(30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)


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

    def __init__(self, work: Path):
        py = cloud_python()
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.moto = Proc(
            [py, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)], work / "moto.log"
        )
        wait_http(self.url + "/moto-api/")
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
                self.url,
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

    def stop(self) -> None:
        self.sim.stop()
        self.moto.stop()


@pytest.fixture(scope="session")
def aws_cloud(tmp_path_factory):
    cloud = AwsCloud(tmp_path_factory.mktemp("aws"))
    yield cloud
    cloud.stop()


@pytest.fixture
def aws(aws_cloud, monkeypatch, tmp_path, request):
    """The session's AWS emulation, this test's bucket and config file, the launcher's env."""
    for k, v in aws_cloud.env.items():
        monkeypatch.setenv(k, v)
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{os.getpid() % 1000}"
    aws_cloud.bucket = aws_cloud.new_bucket(name)
    aws_cloud.config_path = aws_cloud.config(tmp_path / "easylaunch_config.py", aws_cloud.bucket)
    monkeypatch.setenv("EASYLAUNCH_CONFIG", str(aws_cloud.config_path))
    return aws_cloud
