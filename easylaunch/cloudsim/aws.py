"""cloudsim aws: plays the EC2 instances created in moto (or any EC2 endpoint that stores user data).

    python -m easylaunch.cloudsim aws --endpoint http://127.0.0.1:5000 [--runner process|docker]

Every ``--interval`` seconds it lists the pending/running instances; each new one gets an
:class:`~easylaunch.cloudsim.players.InstancePlayer` (its user data run for real) and an IMDSv2
metadata server (session token required; instance-id, placement/region, the instance profile's
temporary credentials, ``spot/instance-action``). An instance terminated in the emulator (by
the launcher, or by itself) loses its processes at once. A control endpoint on 127.0.0.1
(printed at start, ``--control-port``) delivers faults::

    POST /interrupt?id=i-...&window=120   spot interruption notice; the VM dies `window` s later
    POST /kill?id=i-...                   the VM dies now, without notice
    GET  /instances                       what is being played

    GET  /planted                         the instance-profile keys it hands out

The credentials its metadata server hands out are made up at start (the emulator accepts any);
tests look for them in every generated script, manifest, log, tag and object (they must never
be found there).
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import secrets
import threading
import time
import urllib.parse
from typing import Any, Dict, Optional

from .players import Sim, json_answer, text_answer


def _planted() -> Dict[str, str]:
    """Fresh keys for the instance profile, per cloudsim process (not in any source file, so a
    scan that finds them found a leak): ``GET /planted`` on the control endpoint tells them."""
    return {
        "AccessKeyId": "ASIA" + secrets.token_hex(8).upper(),
        "SecretAccessKey": secrets.token_urlsafe(30),
        "Token": "planted-" + secrets.token_urlsafe(40),
    }


class AwsSim(Sim):
    """The player of one EC2 endpoint."""

    cloud = "aws"
    step_error = "the emulator did not answer"

    def __init__(
        self,
        endpoint: str,
        work_dir: str,
        runner: str = "process",
        image: str = "",
        regions: Optional[list] = None,
        interval: float = 0.5,
    ):
        import boto3

        super().__init__(work_dir, runner, image, interval)
        self.endpoint = endpoint.rstrip("/")
        self.regions = regions or ["us-east-1"]
        session = boto3.session.Session(
            aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
            aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
        )
        self.ec2 = {r: session.client("ec2", region_name=r, endpoint_url=self.endpoint) for r in self.regions}
        self.info: Dict[str, Dict[str, Any]] = {}
        self.notices: Dict[str, Dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.keys = _planted()
        self.iam = session.client("iam", region_name=self.regions[0], endpoint_url=self.endpoint)

    # -- metadata ------------------------------------------------------------------
    def _imds(self, ident: str):
        tokens: set = set()
        info = self.info[ident]

        def handler(method: str, path: str, headers: Dict[str, str]):
            path = urllib.parse.urlsplit(path).path
            if method == "PUT" and path == "/latest/api/token":
                if "x-aws-ec2-metadata-token-ttl-seconds" not in headers:
                    return text_answer("missing TTL header", 400)
                token = secrets.token_urlsafe(24)
                tokens.add(token)
                return text_answer(token)
            if headers.get("x-aws-ec2-metadata-token") not in tokens:
                return text_answer("Unauthorized (IMDSv2: PUT /latest/api/token first)", 401)
            prefix = "/latest/meta-data/"
            if not path.startswith(prefix):
                return text_answer("not found", 404)
            what = path[len(prefix) :]
            role = info.get("role")
            if what == "instance-id":
                return text_answer(ident)
            if what == "placement/region":
                return text_answer(info["region"])
            if what == "instance-type":
                return text_answer(info.get("type", ""))
            if what == "iam/security-credentials/":
                return text_answer(role) if role else text_answer("not found", 404)
            if role and what == f"iam/security-credentials/{role}":
                expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=6)
                return json_answer(
                    {
                        "Code": "Success",
                        "Type": "AWS-HMAC",
                        **self.keys,
                        "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ"),
                    }
                )
            if what == "spot/instance-action":
                notice = self.notices.get(ident)
                if notice:
                    return json_answer({"action": "terminate", "time": notice["time_iso"]})
                return text_answer("not found", 404)
            return text_answer("not found", 404)

        return handler

    # -- instances -----------------------------------------------------------------
    def _start(self, region: str, inst: Dict[str, Any]) -> None:
        ident = inst["InstanceId"]
        client = self.ec2[region]
        data = client.describe_instance_attribute(InstanceId=ident, Attribute="userData")
        raw = (data.get("UserData") or {}).get("Value")
        if not raw:
            self.info[ident] = {"region": region, "skipped": "no user data"}
            return
        script = base64.b64decode(raw).decode(errors="replace")
        profile = (inst.get("IamInstanceProfile") or {}).get("Arn", "")
        role = None
        if profile:
            try:  # IMDS names the profile's role
                roles = self.iam.get_instance_profile(InstanceProfileName=profile.rsplit("/", 1)[-1])
                role = roles["InstanceProfile"]["Roles"][0]["RoleName"]
            except Exception:
                role = profile.rsplit("/", 1)[-1]
        self.info[ident] = {
            "region": region,
            "type": inst.get("InstanceType"),
            "role": role,
            "spot": inst.get("InstanceLifecycle") == "spot",
        }
        meta = self.play(ident, script, {"AWS_ENDPOINT_URL": self.endpoint}, self._imds(ident))
        print(f"cloudsim aws: playing {ident} ({region}, metadata {meta.url})", flush=True)

    def interrupt(self, ident: str, window: float) -> Dict[str, Any]:
        when = time.time() + window
        stamp = datetime.datetime.fromtimestamp(when, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.notices[ident] = {"time": when, "time_iso": stamp, "given": time.time()}
        print(f"cloudsim aws: spot interruption notice to {ident} (ends in {window:g} s)", flush=True)
        return {"id": ident, "ends": when}

    def kill(self, ident: str, why: str = "killed without notice") -> Dict[str, Any]:
        player = self.players.get(ident)
        if player is not None:
            player.kill()
        region = self.info.get(ident, {}).get("region", self.regions[0])
        try:
            self.ec2[region].terminate_instances(InstanceIds=[ident])
        except Exception:
            pass
        print(f"cloudsim aws: {ident} {why}", flush=True)
        return {"id": ident, "killed": True}

    def step(self) -> None:
        with self.lock:
            live = set()
            for region, client in self.ec2.items():
                pages = client.get_paginator("describe_instances").paginate(
                    Filters=[{"Name": "instance-state-name", "Values": ["pending", "running"]}]
                )
                for page in pages:
                    for res in page.get("Reservations") or []:
                        for inst in res.get("Instances") or []:
                            live.add(inst["InstanceId"])
                            if inst["InstanceId"] not in self.info:
                                self._start(region, inst)
            for ident, player in list(self.players.items()):
                notice = self.notices.get(ident)
                if notice and time.time() >= notice["time"] and player.alive():
                    self.kill(ident, "reclaimed at the end of its notice window")
                elif ident not in live and player.alive():
                    player.kill()
                    print(
                        f"cloudsim aws: {ident} terminated in the emulator: its processes are gone",
                        flush=True,
                    )

    def describe(self) -> Dict[str, Any]:
        return {
            "instances": [
                {
                    **p.describe(),
                    **self.info.get(i, {}),
                    "metadata": self.meta[i].url,
                    "notice": self.notices.get(i),
                }
                for i, p in self.players.items()
            ]
        }

    def planted(self) -> Dict[str, str]:
        return self.keys

    def command(self, method: str, path: str, query: Dict[str, str]):
        if method == "POST" and path == "/interrupt":
            return json_answer(self.interrupt(query["id"], float(query.get("window", 120))))
        if method == "POST" and path == "/kill":
            with self.lock:
                return json_answer(self.kill(query["id"]))
        return None

    def banner(self) -> str:
        return f"playing instances of {self.endpoint} ({', '.join(self.regions)}), runner {self.runner}"


def describe_json(sim: AwsSim) -> str:
    return json.dumps(sim.describe(), indent=1)
