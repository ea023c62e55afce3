"""Mode ec2 against a real moto server, its instances played by cloudsim: each instance's user
data runs for real here (a local process), with an IMDSv2 endpoint of its own, and spot
interruptions / kills are delivered through cloudsim's control endpoint."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cloudpickle
import pytest
from cloudsim_fixtures import LAUNCHER_KEY, LAUNCHER_SECRET, aws, aws_cloud  # noqa: F401 (fixtures)
from conftest import require_service, wait_for

import easylaunch
from easylaunch import State

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def train(doodad_config, variant):
    import os

    with open(os.path.join(doodad_config.base_log_dir, "out.txt"), "w") as f:
        f.write(f"lr={variant['lr']}\n")
    os.makedirs(os.path.join(doodad_config.base_log_dir, "deep", "er"), exist_ok=True)
    with open(os.path.join(doodad_config.base_log_dir, "deep", "er", "weights.bin"), "wb") as f:
        f.write(bytes(range(256)) * 4)  # no suffix list decides what comes back
    print("training", variant["lr"])
    return variant["lr"] * 2


def slow(doodad_config, variant):
    """Writes progress, then runs until stopped; resumes from its checkpoint when it has one."""
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
    """A function with doodad/submitit's checkpoint hook: resume where the last step was."""

    def __call__(self, doodad_config, variant):
        return slow(doodad_config, variant)

    def checkpoint(self, doodad_config, variant):
        import os

        step = int(open(os.path.join(doodad_config.base_log_dir, "step.txt")).read())
        resumed = dict(variant, resume_from=step, steps=5)

        def resume(dc, _v, _variant=resumed):
            return slow(dc, _variant)

        return resume


def nothing_created(aws, exp):
    assert aws.live_instances(exp) == []
    objects = aws.objects(aws.bucket)
    leftovers = [k for k in objects if "/.snapshots/" not in k]
    assert leftovers == [], leftovers


# -- the sweep ------------------------------------------------------------------------------


def test_ec2_sweep_packs_runs_and_brings_every_output_back(aws):
    sweep = easylaunch.run_sweep(
        train,
        [{"lr": i} for i in range(5)],
        exp_name="ec2-basic",
        mode="ec2",
        num_exps_per_instance=2,
        max_parallel=2,
        sync_interval=1,
        skip_wait=True,
    )
    sweep.wait(timeout=180)
    assert sweep.states() == [State.COMPLETED] * 5, [j.status for j in sweep]
    assert sweep.results() == [0, 2, 4, 6, 8]
    for i, job in enumerate(sweep):
        assert (job.run_dir / "out.txt").read_text() == f"lr={i}\n"
        assert (job.run_dir / "deep" / "er" / "weights.bin").read_bytes() == bytes(range(256)) * 4
        assert "training" in job.stdout()
    created = aws.all_instances()
    ours = [
        i
        for i in created
        if {"Key": "easylaunch-exp", "Value": sweep[0].manifest["exp_name"]} in i.get("Tags", [])
    ]
    assert len(ours) == 3  # ceil(5 / 2)
    for inst in ours:
        tags = {t["Key"]: t["Value"] for t in inst["Tags"]}
        assert tags["easylaunch-batch"] == sweep[0].manifest["batch_id"]
        assert tags["easylaunch-runs"]
        assert inst.get("InstanceLifecycle") == "spot"
        played = [p for p in aws.instances() if p["id"] == inst["InstanceId"]][0]
        assert played["role"] == "easylaunch-role"  # its only credentials: the instance profile's
    # every instance ended itself after its final sync
    wait_for(lambda: aws.live_instances(sweep[0].manifest["exp_name"]) == [], 30, "instances to terminate")
    # one code upload per content, one payload archive per instance
    stats = sweep[0].mode.stats
    assert stats["payload_puts"] == 3
    code = sweep[0].manifest["backend"]["cloud"]["code"]  # easylaunch + cloudpickle zips, the snapshot
    assert stats["code_puts"] == len(code) and len(code) >= 2
    again = easylaunch.run_sweep(
        train, [{"lr": 9}], exp_name="ec2-basic-again", mode="ec2", sync_interval=1, skip_wait=True
    )
    assert again[0].mode.stats.get("code_puts", 0) == 0
    assert again[0].wait(120) == State.COMPLETED


def test_poll_is_one_describe_and_one_listing(aws):
    sweep = easylaunch.run_sweep(
        slow,
        [{"steps": 20}, {"steps": 20}, {"steps": 20}],
        exp_name="ec2-poll",
        mode="ec2",
        num_exps_per_instance=1,
        sync_interval=1,
        skip_wait=True,
    )
    mode = sweep[0].mode
    provider = mode.provider(dict(sweep[0].manifest["options"]))
    before = dict(provider.calls)
    mode.poll(list(sweep))
    delta = {k: provider.calls.get(k, 0) - before.get(k, 0) for k in provider.calls}
    assert delta.get("describe") == 1 and delta.get("list") == 1, delta
    sweep.wait(timeout=120)
    assert sweep.states() == [State.COMPLETED] * 3


# -- money, dry run -------------------------------------------------------------------------


def test_more_instances_than_max_instances_is_refused_before_anything(aws, log_dir):
    with pytest.raises(ValueError, match=r"11 instances.*MAX_INSTANCES is 10"):
        easylaunch.run_sweep(train, [{"lr": i} for i in range(11)], exp_name="ec2-money", mode="ec2")
    nothing_created(aws, "ec2-money")
    assert not (log_dir / "ec2-money").exists()


def test_dry_run_prints_plan_and_creates_nothing(aws, capsys):
    sweep = easylaunch.run_sweep(
        train,
        [{"lr": i} for i in range(4)],
        exp_name="ec2-dry",
        mode="ec2",
        num_exps_per_instance=2,
        dry_run=True,
        skip_wait=True,
    )
    out = capsys.readouterr().out
    assert "2 instance(s) for 4 run(s)" in out
    assert "t3.micro" in out and "spot (max 0.3000 USD/h)" in out
    assert "easylaunch.cloud_agent run" in out  # the rendered boot script
    assert sweep.states() == [State.GENERATED] * 4
    assert aws.all_instances() == [] or aws.live_instances("ec2-dry") == []
    assert [k for k in aws.objects(aws.bucket)] == []


def test_boot_script_too_large_becomes_a_stub(aws, monkeypatch):
    from easylaunch.modes import ec2

    dry = easylaunch.run_experiment(
        train, exp_name="ec2-stub", mode="ec2", variant={"lr": 3}, dry_run=True, skip_wait=True
    )
    full = (dry.run_dir.parent / ".batches" / dry.manifest["batch_id"] / "instance-0.boot.sh").read_bytes()
    limit = len(full) - 1  # the whole script no longer fits
    monkeypatch.setattr(ec2.Ec2Provider, "metadata_limit", limit)
    job = easylaunch.run_experiment(train, exp_name="ec2-stub", mode="ec2", variant={"lr": 3}, skip_wait=True)
    ident = job.manifest["backend"]["instance_id"]
    data = aws.ec2.describe_instance_attribute(InstanceId=ident, Attribute="userData")["UserData"]["Value"]
    user_data = base64.b64decode(data).decode()
    assert len(user_data.encode()) <= limit and "boot script in the bucket" in user_data
    key = job.manifest["backend"]["cloud"]["batch_key"] + "/instance-0.boot.sh"
    assert "easylaunch.cloud_agent run" in aws.objects(aws.bucket)[key].decode()
    assert job.wait(120) == State.COMPLETED and job.result() == 6


# -- bad input: a clear error, nothing created ------------------------------------------------


def test_no_credentials_says_where_it_looked(aws, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(
        easylaunch.modes.cloud.CloudError if hasattr(easylaunch, "modes") else Exception,
        match=r"no AWS credentials.*AWS_ACCESS_KEY_ID.*~/.aws/credentials",
    ):
        easylaunch.run_experiment(train, exp_name="ec2-nocred", mode="ec2", variant={"lr": 1})
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", LAUNCHER_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", LAUNCHER_SECRET)
    nothing_created(aws, "ec2-nocred")


@pytest.mark.parametrize(
    "kwargs, config, message",
    [
        ({"region": "us-esat-1"}, {}, r"unknown region 'us-esat-1'. Did you mean .* us-east-1, "),
        ({"image_id": "ami-0000000000deadbee"}, {}, r"AMI 'ami-0000000000deadbee' not found in region"),
        ({"instance_type": "t3.gigantic"}, {}, r"unknown instance type 't3.gigantic'"),
        (
            {},
            {"AWS_S3_PATH": "s3://no-such-bucket-here/x"},
            r"bucket 'no-such-bucket-here' .* does not exist",
        ),
        ({}, {"AWS_IAM_INSTANCE_PROFILE_NAME": "nope"}, r"instance profile 'nope'.*does not exist"),
        ({}, {"AWS_S3_PATH": None}, r"set AWS_S3_PATH"),
    ],
)
def test_bad_input_is_refused_before_anything(aws, kwargs, config, message, log_dir):
    if config:
        aws.config(aws.config_path, aws.bucket, **config)
    with pytest.raises((ValueError, RuntimeError), match=message):
        easylaunch.run_experiment(train, exp_name="ec2-bad", mode="ec2", variant={"lr": 1}, **kwargs)
    nothing_created(aws, "ec2-bad")
    assert not (log_dir / "ec2-bad").exists()


class FaultProxy:
    """Forwards to moto, except the requests ``fault(method, path, body)`` answers itself
    (the error documents AWS sends: a capacity error, AccessDenied)."""

    def __init__(self, target: str, fault):
        outer = self
        self.hits = 0

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                answer = fault(self.command, self.path, body)
                if answer is not None:
                    outer.hits += 1
                    status, data = answer
                else:
                    req = urllib.request.Request(
                        target + self.path,
                        data=body or None,
                        method=self.command,
                        headers={k: v for k, v in self.headers.items() if k.lower() != "host"},
                    )
                    try:
                        with urllib.request.urlopen(req, timeout=60) as resp:
                            status, data = resp.status, resp.read()
                            headers = dict(resp.headers)
                    except urllib.error.HTTPError as err:
                        status, data, headers = err.code, err.read(), dict(err.headers)
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
                    self.wfile.write(data)
                    return
                self.send_response(status)
                self.send_header("Content-Type", "text/xml")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_capacity_error_leaves_nothing_behind(aws, monkeypatch, log_dir):
    calls = {"n": 0}

    def fault(method, path, body):
        if b"Action=RunInstances" in body:
            calls["n"] += 1
            if calls["n"] == 2:  # the first instance was created: it must be terminated again
                return 400, (
                    b"<Response><Errors><Error><Code>InsufficientInstanceCapacity</Code><Message>We currently do "
                    b"not have sufficient t3.micro capacity</Message></Error></Errors><RequestID>x</RequestID></Response>"
                )
        return None

    proxy = FaultProxy(aws.url, fault)
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", proxy.url)  # EC2 through the proxy, S3 direct
    try:
        with pytest.raises(RuntimeError, match=r"InsufficientInstanceCapacity.*another instance_type"):
            easylaunch.run_sweep(train, [{"lr": 1}, {"lr": 2}], exp_name="ec2-capacity", mode="ec2")
    finally:
        proxy.close()
    assert calls["n"] == 2
    nothing_created(aws, "ec2-capacity")
    assert not (log_dir / "ec2-capacity").exists()


def test_bucket_not_writable(aws, monkeypatch):
    def fault(method, path, body):
        if method == "PUT" and path.startswith(f"/{aws.bucket}/"):
            return 403, b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
        return None

    proxy = FaultProxy(aws.url, fault)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    try:
        with pytest.raises(PermissionError, match=r"not writable.*AccessDenied.*s3:PutObject"):
            easylaunch.run_experiment(train, exp_name="ec2-ro", mode="ec2", variant={"lr": 1})
    finally:
        proxy.close()
    nothing_created(aws, "ec2-ro")


# -- faults ---------------------------------------------------------------------------------


def _running(job, what="step.txt"):
    def ok():
        job.fetch()
        return (job.run_dir / what).exists()

    wait_for(ok, 120, f"{job.run_dir.name} to have synced {what}")


def test_spot_interruption_preempts_then_recovers_from_checkpoint(aws):
    job = easylaunch.run_experiment(
        Resumable(),
        exp_name="ec2-spot",
        mode="ec2",
        variant={"x": 1},
        sync_interval=1,
        skip_wait=True,
        max_recoveries=1,
    )
    _running(job)
    first = job.manifest["backend"]["instance_id"]
    aws.call(f"/interrupt?id={first}&window=30")
    t0 = time.time()
    wait_for(
        lambda: (
            job.mode.poll([job]) is not None
            and job.status.get("recoveries") == 1
            or (job.run_dir / "payload.attempt1.pkl").exists()
        ),
        60,
        "the preemption to be recorded",
    )
    assert job.wait(180) == State.COMPLETED, job.status
    assert time.time() - t0 < 180
    status = json.loads((job.run_dir / "status.json").read_text())
    assert status["attempt"] == 2 and status["recoveries"] == 1
    history = [h[0] for h in status["history"]]
    assert "PREEMPTED" in history, history
    progress = (job.run_dir / "progress.txt").read_text().split()
    assert progress[0:2] == ["start", "0"] and progress[2] == "start" and int(progress[3]) > 0  # resumed
    assert (job.run_dir / "payload.attempt1.pkl").exists()  # the checkpoint replaced the payload
    second = json.loads((job.run_dir / "manifest.json").read_text())["backend"]["instance_id"]
    assert second != first
    # the notice reached the runs within the window: the final sync preceded the reclaim
    inst = [i for i in aws.instances() if i["id"] == first][0]
    assert inst["notice"] and not inst["alive"]


def test_spot_interruption_without_recovery_is_preempted(aws):
    job = easylaunch.run_experiment(
        slow, exp_name="ec2-spot2", mode="ec2", variant={}, sync_interval=1, skip_wait=True
    )
    _running(job)
    aws.call(f"/interrupt?id={job.manifest['backend']['instance_id']}&window=20")
    assert job.wait(90) == State.PREEMPTED
    assert "notice" in job.status["message"]


def test_instance_killed_without_notice_fails_with_last_sync(aws):
    job = easylaunch.run_experiment(
        slow, exp_name="ec2-kill", mode="ec2", variant={}, sync_interval=1, skip_wait=True
    )
    _running(job)
    aws.call(f"/kill?id={job.manifest['backend']['instance_id']}")
    assert job.wait(60) == State.FAILED
    assert "last sync" in job.status["message"] and "terminated" in job.status["message"]
    assert (job.run_dir / "progress.txt").read_text() == "start 0\n"  # what was synced is here


def test_cancel_terminates_the_instance(aws):
    job = easylaunch.run_experiment(
        slow, exp_name="ec2-cancel", mode="ec2", variant={}, sync_interval=1, skip_wait=True
    )
    _running(job)
    assert job.cancel()
    assert job.wait(60) == State.CANCELLED
    wait_for(lambda: aws.live_instances("ec2-cancel") == [], 30, "the instance to be terminated")


def test_launcher_killed_after_submit_recovers_from_the_bucket(aws, tmp_path, log_dir):
    script = tmp_path / "launch.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import cloudpickle, test_cloud
        cloudpickle.register_pickle_by_value(test_cloud)
        import easylaunch
        sweep = easylaunch.run_sweep(test_cloud.train, [{{"lr": 1}}, {{"lr": 2}}], exp_name="ec2-orphan",
                                     mode="ec2", sync_interval=1, skip_wait=True)
        print("LAUNCHED", flush=True)
        time.sleep(600)
    """)
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=os.environ.copy()
    )
    try:
        assert proc.stdout.readline().strip() == "LAUNCHED"
    finally:
        proc.kill()
        proc.wait()
    sweep = easylaunch.load_experiment("ec2-orphan")
    assert len(sweep) == 2
    sweep.wait(timeout=120)
    assert sorted(sweep.results()) == [2, 4]
    out = subprocess.run(
        [sys.executable, "-m", "easylaunch.cli", "ls", "ec2-orphan"], capture_output=True, text=True
    )
    assert out.stdout.count("COMPLETED") >= 2, out.stdout + out.stderr


# -- Docker on the instance ---------------------------------------------------------------------


def in_container(doodad_config, variant):
    import os

    return os.path.exists("/.dockerenv"), open("/etc/os-release").read().split("\n")[0]


def test_docker_image_on_the_instance_runs_through_dockerd(aws):
    require_service("docker")
    image = os.environ.get("EASYLAUNCH_TEST_DOCKER_IMAGE") or "local/debian-python:bookworm"
    job = easylaunch.run_experiment(
        in_container,
        exp_name="ec2-docker",
        mode="ec2",
        variant={},
        docker_image=image,
        sync_interval=1,
        skip_wait=True,
    )
    assert job.wait(180) == State.COMPLETED, job.status
    inside, release = job.result()
    assert inside and "Debian" in release


# -- secrets ----------------------------------------------------------------------------------


def test_no_credential_in_any_script_manifest_log_tag_or_object(aws, log_dir):
    planted = aws.call("/planted", "GET")
    sweep = easylaunch.run_sweep(
        train, [{"lr": 1}, {"lr": 2}], exp_name="ec2-secrets", mode="ec2", sync_interval=1, skip_wait=True
    )
    sweep.wait(120)
    assert sweep.states() == [State.COMPLETED] * 2
    secrets = [LAUNCHER_KEY, LAUNCHER_SECRET, *planted.values()]
    texts = {}
    for path in Path(log_dir).rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes()
    for inst in aws.all_instances():
        raw = aws.ec2.describe_instance_attribute(InstanceId=inst["InstanceId"], Attribute="userData")
        texts[f"user data of {inst['InstanceId']}"] = base64.b64decode(
            (raw.get("UserData") or {}).get("Value") or ""
        )
        texts[f"tags of {inst['InstanceId']}"] = json.dumps(inst.get("Tags")).encode()
    for key, data in aws.objects(aws.bucket).items():
        texts[f"s3 {key}"] = data
    for inst in aws.instances():  # what the instances wrote on their disks: boot logs, agent logs
        for path in Path(inst["dir"]).rglob("*"):
            if path.is_file() and path.suffix in (".log", ".json", ".sh", ".txt"):
                texts[str(path)] = path.read_bytes()
    assert len(texts) > 20
    found = [(where, s) for where, data in texts.items() for s in secrets if s.encode() in data]
    assert found == []
    # the instances did use the planted keys (the scan looks for something real)
    assert any(i["role"] for i in aws.instances())
    # payloads and boot scripts are private
    for path in Path(log_dir).rglob("payload.pkl"):
        assert path.stat().st_mode & 0o077 == 0


# -- after-care: easylaunch cloud cleanup, easylaunch recover ---------------------------------


def test_cloud_cleanup_lists_spares_busy_instances_and_terminates(aws, capsys):
    from easylaunch import cli

    job = easylaunch.run_experiment(
        slow, exp_name="ec2-clean", mode="ec2", variant={}, sync_interval=1, skip_wait=True
    )
    _running(job)
    ident = job.manifest["backend"]["instance_id"]
    capsys.readouterr()
    assert cli.main(["cloud", "cleanup", "ec2-clean"]) == 0  # a dry run by default
    out = capsys.readouterr().out
    assert f"would spare {ident}" in out and "1 of its runs unfinished here" in out and "dry run" in out
    assert cli.main(["cloud", "cleanup", "ec2-clean", "--terminate"]) == 0
    assert f"sparing {ident}" in capsys.readouterr().out
    assert [i["InstanceId"] for i in aws.live_instances("ec2-clean")] == [ident]  # still working
    assert cli.main(["cloud", "cleanup", "ec2-clean", "--terminate", "--force"]) == 0
    assert f"terminating {ident}" in capsys.readouterr().out
    wait_for(lambda: aws.live_instances("ec2-clean") == [], 30, "the instance to be terminated")
    assert job.wait(60) in (State.FAILED, State.CANCELLED)
    assert cli.main(["cloud", "cleanup", "ec2-clean"]) == 0
    assert "no live ec2 instance made by easylaunch for 'ec2-clean'" in capsys.readouterr().out


def test_recover_relaunches_preempted_runs_from_their_directories(aws, capsys):
    from easylaunch import cli

    job = easylaunch.run_experiment(
        Resumable(), exp_name="ec2-recover", mode="ec2", variant={"x": 1}, sync_interval=1, skip_wait=True
    )
    _running(job)
    first = job.manifest["backend"]["instance_id"]
    aws.call(f"/interrupt?id={first}&window=30")
    assert job.wait(120) == State.PREEMPTED  # max_recoveries=0: it waits for a recover

    def checkpointed():
        job.fetch()
        return (job.run_dir / "payload.attempt1.pkl").exists()

    wait_for(checkpointed, 60, "the checkpoint the instance synced in its notice window")
    capsys.readouterr()
    assert cli.main(["recover", "ec2-recover"]) == 0  # later, from the run directories alone
    assert f"relaunched {job.run_dir.name} (attempt 2)" in capsys.readouterr().out
    again = easylaunch.Job.load(job.run_dir)
    assert again.wait(240) == State.COMPLETED, again.status
    assert again.status["attempt"] == 2 and again.result() == "done"
    assert json.loads((job.run_dir / "manifest.json").read_text())["backend"]["instance_id"] != first
    progress = (job.run_dir / "progress.txt").read_text().split()
    assert progress[:2] == ["start", "0"] and progress[2] == "start" and int(progress[3]) > 0  # resumed
    assert cli.main(["recover", "ec2-recover"]) == 0
    assert "no PREEMPTED run" in capsys.readouterr().out
