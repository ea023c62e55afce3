"""Mode ec2 against a real moto server, its instances played by cloudsim: each instance's user
data runs for real here (a local process), with an IMDSv2 endpoint of its own, and spot
interruptions / kills are delivered through cloudsim's control endpoint."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import cloudpickle
import pytest
from cloudsim_fixtures import (  # noqa: F401 (fixtures)
    DROP,
    LAUNCHER_KEY,
    LAUNCHER_SECRET,
    FaultProxy,
    Resumable,
    aws,
    aws_cloud,
    aws_refusing,
    aws_refusing_cloud,
    boot_without_its_code,
    run_in_docker_on_the_instance,
    slow,
    wait_synced,
)
from conftest import wait_for

import easylaunch
from easylaunch import State, cloud_store

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


# -- the instance agent's final sync against a flaky store (no services) ------------------------


class FlakyStore(cloud_store.Store):
    """An in-memory bucket whose first ``refuse`` PUTs get no answer and which loses the first
    copy of each key in ``lose`` (stored, then gone: an endpoint restarted without it)."""

    def __init__(self, refuse=0, lose=()):
        self.objects, self.puts, self.refuse, self.lose = {}, [], refuse, set(lose)

    def put(self, key, data):
        if self.refuse > 0:
            self.refuse -= 1
            raise cloud_store.StoreError(f"PUT {key}: no answer (ConnectionRefusedError)")
        self.puts.append(key)
        if key in self.lose:
            self.lose.discard(key)
        else:
            self.objects[key] = data
        return hashlib.md5(data).hexdigest()

    def list(self, prefix=""):
        return {
            k: (len(v), hashlib.md5(v).hexdigest()) for k, v in self.objects.items() if k.startswith(prefix)
        }


def _instance_root(tmp_path):
    root = tmp_path / "instance"
    for run in ("run-a", "run-b"):
        d = root / "exp" / run
        (d / "deep").mkdir(parents=True)
        (d / "out.txt").write_text(run)
        (d / "deep" / "w.bin").write_bytes(os.urandom(2048))
        (d / "status.json").write_text('{"state": "COMPLETED"}')
    return root


def test_final_sync_retries_until_all_is_there_status_last(tmp_path, capsys):
    from easylaunch import cloud_agent

    root = _instance_root(tmp_path)
    store = FlakyStore(refuse=3, lose={"el/exp/run-a/deep/w.bin"})
    syncer = cloud_agent.Syncer(store, str(root), "exp", ["run-a", "run-b"], "el/exp")
    records = []
    t0 = time.monotonic()
    ok = cloud_agent.sync_until(syncer, time.monotonic() + 30, "end of the runs", records.append)
    assert ok and len(records) == 1  # the instance record once, after everything
    for run in ("run-a", "run-b"):
        for rel in ("out.txt", "deep/w.bin", "status.json"):
            assert store.objects[f"el/exp/{run}/{rel}"] == (root / "exp" / run / rel).read_bytes()
        # the status after every other object of its run, also when one had to go again
        mine = [i for i, k in enumerate(store.puts) if k.startswith(f"el/exp/{run}/")]
        last_status = max(i for i in mine if store.puts[i].endswith("/status.json"))
        assert last_status == max(mine), store.puts
    assert store.puts.count("el/exp/run-a/deep/w.bin") == 2  # lost once, checked, sent again
    assert store.puts.count("el/exp/run-a/status.json") == 2
    err = capsys.readouterr().err
    assert "final sync (end of the runs): attempt 1 failed: " in err and "retrying in 0.5 s" in err
    assert "missing or with another checksum in the bucket (run-a/deep/w.bin)" in err
    assert f"done on attempt {records[0]}" in err
    assert time.monotonic() - t0 < 20


def test_final_sync_gives_up_at_its_deadline(tmp_path, capsys):
    from easylaunch import cloud_agent

    root = _instance_root(tmp_path)
    store = FlakyStore(refuse=10**6)
    syncer = cloud_agent.Syncer(store, str(root), "exp", ["run-a", "run-b"], "el/exp")
    t0 = time.monotonic()
    assert not cloud_agent.sync_until(syncer, time.monotonic() + 3, "notice", lambda n: None)
    assert 2.9 < time.monotonic() - t0 < 4
    err = capsys.readouterr().err
    assert "final sync (notice): GIVING UP after" in err and "6 file(s) not synced" in err
    assert err.count("failed: ") >= 3 and store.objects == {}


def test_an_agent_that_fails_saves_what_it_can_and_ends_its_instance(tmp_path, capsys):
    # e.g. the bucket refused the agent's first write: without this the instance ran on (and
    # cost) with nobody left to sync its runs or to end it
    from easylaunch import cloud_agent

    root = _instance_root(tmp_path)
    store = FlakyStore(refuse=1)  # the first write fails, later ones pass
    agent = object.__new__(cloud_agent.CloudAgent)
    ended = []
    agent.store, agent.state = store, {"instance": 0}
    agent.spec = {"state_key": "el/.batches/b/instance-0.state.json"}
    agent.syncer = cloud_agent.Syncer(store, str(root), "exp", ["run-a", "run-b"], "el/exp")
    agent.instance = types.SimpleNamespace(terminate=lambda: ended.append(True))
    try:
        agent.put_state(phase="setup")
    except cloud_store.StoreError as exc:
        assert agent.give_up(exc) == 1
    assert ended == [True]
    state = json.loads(store.objects["el/.batches/b/instance-0.state.json"])
    assert state["phase"] == "failed" and "no answer" in state["error"]
    for run in ("run-a", "run-b"):
        assert store.objects[f"el/exp/{run}/out.txt"] == run.encode()
        assert store.puts.index(f"el/exp/{run}/status.json") > store.puts.index(f"el/exp/{run}/out.txt")
    err = capsys.readouterr().err
    assert "the agent failed: " in err and "ended this instance" in err


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
        # a boot that powers off (no python3 on the image) terminates the instance, not stops it
        attr = aws.ec2.describe_instance_attribute(
            InstanceId=inst["InstanceId"], Attribute="instanceInitiatedShutdownBehavior"
        )
        assert attr["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate", attr
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


def test_a_boot_that_cannot_fetch_its_code_ends_its_instance(aws, log_dir, tmp_path):
    # e.g. an instance profile that cannot read the bucket: the agent never starts, and nothing
    # would sync, report or end the instance (it would run, and cost, until cleanup). The boot
    # script (rendered by a dry run) runs here as the playing instance, with a bucket endpoint
    # that answers nothing: it ends that instance through its metadata service and the EC2 API.
    from easylaunch.cloudsim.players import free_port

    job = easylaunch.run_experiment(
        slow, exp_name="ec2-nofetch", mode="ec2", variant={}, sync_interval=1, skip_wait=True
    )
    ident = job.manifest["backend"]["instance_id"]
    wait_for(lambda: job.state == State.RUNNING, 60, "the run to start on its instance")
    boot_without_its_code(
        "ec2",
        "ec2-nofetch-dry",
        train,
        log_dir,
        tmp_path,
        {
            **{k: v for k, v in os.environ.items() if k.startswith("AWS_") and "ENDPOINT" not in k},
            "EASYLAUNCH_METADATA_URL": aws.played(ident)["metadata"],
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}",  # nothing listens there
            "AWS_ENDPOINT_URL_EC2": aws.url,
        },
    )
    wait_for(lambda: aws.live_instances("ec2-nofetch") == [], 60, "the instance to be terminated")
    assert job.wait(120) == State.FAILED
    assert ident in job.status["message"]


@pytest.mark.parametrize("terminate", [True, False])
def test_a_boot_on_an_image_without_python_powers_the_instance_off(aws, log_dir, tmp_path, terminate):
    # an AMI without python3: the agent cannot start, and nothing would sync, report or end the
    # instance; the boot script powers it off (launched with shutdown behaviour terminate: checked
    # in test_ec2_sweep_packs_runs_and_brings_every_output_back). The
    # rendered script runs here with a PATH of bash's tools but no Python, and a shutdown that
    # records its arguments.
    exp = f"ec2-nopython-{terminate}"
    easylaunch.run_experiment(
        train, exp_name=exp, mode="ec2", variant={}, dry_run=True, skip_wait=True, terminate=terminate
    )
    (script,) = (log_dir / exp).rglob("instance-0.boot.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("mkdir", "date"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    said = tmp_path / "shutdown.args"
    (bin_dir / "shutdown").write_text(f'#!/bin/bash\necho "$@" > {shlex.quote(str(said))}\n')
    (bin_dir / "shutdown").chmod(0o755)
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "EASYLAUNCH_INSTANCE_ROOT": str(tmp_path / "vm")}
    script.chmod(0o700)  # executed as cloud-init does: the shebang chooses bash
    proc = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=60)
    boot = (tmp_path / "vm" / "boot.log").read_text()
    assert proc.returncode == 1, (proc.stderr, boot)
    assert "easylaunch: no python3 on this image: the agent cannot start" in boot, boot
    if terminate:
        assert "powering off" in boot and said.read_text() == "-h now\n", boot
    else:
        assert "the instance stays up" in boot and not said.exists(), boot


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


def test_no_credentials_says_where_it_looked(aws, monkeypatch, tmp_path, log_dir):
    # the real sign-in path: no keys, no emulator, no profile, a HOME without ~/.aws
    home = tmp_path / "empty-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_CONFIG_FILE",
        "AWS_ENDPOINT_URL",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(easylaunch.modes.cloud.CloudError) as err:
        easylaunch.run_experiment(train, exp_name="ec2-nocred", mode="ec2", variant={"lr": 1})
    message = str(err.value)
    for place in (
        "no AWS credentials found",
        "$AWS_ACCESS_KEY_ID (not set) + $AWS_SECRET_ACCESS_KEY (not set)",
        "$AWS_PROFILE (not set)",
        f"{home}/.aws/credentials (no such file; $AWS_SHARED_CREDENTIALS_FILE moves it)",
        f"{home}/.aws/config (no such file; $AWS_CONFIG_FILE moves it)",
        "instance metadata",
        "aws configure",
    ):
        assert place in message, (place, message)
    nothing_created(aws, "ec2-nocred")
    assert not (log_dir / "ec2-nocred").exists()


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


def write_then_refuse(doodad_config, variant):
    """Writes ``files`` files, then has the bucket refuse the instance for ``seconds``: all of
    this run's objects go in the final sync (``sync_interval`` is longer than the run)."""
    import hashlib
    import os
    import urllib.request

    sums = {}
    for i in range(variant["files"]):
        data = bytes([i % 256]) * (4096 * (i + 1))
        with open(os.path.join(doodad_config.base_log_dir, f"part-{i}.bin"), "wb") as f:
            f.write(data)
        sums[f"part-{i}.bin"] = hashlib.md5(data).hexdigest()
    refuse = variant["refuse"] + f"/__refuse__?seconds={variant['seconds']}"
    urllib.request.urlopen(urllib.request.Request(refuse, data=b"", method="POST"), timeout=10).read()
    return sums


def _log_times(log: str, pattern: str):
    """``HH:MM:SS`` of the agent's log lines matching ``pattern``, as seconds of the day."""
    import re

    out = []
    for line in log.splitlines():
        if re.search(pattern, line):
            h, m, sec = (int(x) for x in line[:8].split(":"))
            out.append(h * 3600 + m * 60 + sec)
    return out


def test_final_sync_retries_while_the_bucket_refuses_and_loses_nothing(aws_refusing):
    cloud = aws_refusing
    job = easylaunch.run_experiment(
        write_then_refuse,
        exp_name="ec2-refused",
        mode="ec2",
        variant={"files": 12, "refuse": cloud.proxy.url, "seconds": 6},
        sync_interval=60,
        skip_wait=True,
    )
    assert job.wait(180) == State.COMPLETED, job.status
    sums = job.result()
    assert len(sums) == 12
    for name, md5 in sums.items():
        assert hashlib.md5((job.run_dir / name).read_bytes()).hexdigest() == md5, name
    ident = job.manifest["backend"]["instance_id"]
    wait_for(lambda: cloud.live_instances("ec2-refused") == [], 60, "the instance to terminate itself")
    # the bucket refused the final sync for a while (dropped connections and 503s, in turn) ...
    refused = cloud.refusal.refused
    assert len(refused) >= 4 and {r[3] for r in refused} == {DROP, 503}, refused
    boot_log = Path(cloud.played(ident)["root"]) / "boot.log"
    wait_for(lambda: "all runs ended and synced" in boot_log.read_text(), 30, "the agent's last line")
    log = boot_log.read_text()
    assert "final sync (end of the runs): attempt 1 failed: " in log, log
    assert "retrying in 0.5 s" in log and "done on attempt" in log, log
    # ... every object is there with its checksum, the run's status after its files, the
    # instance's record last
    objects = cloud.objects(cloud.bucket)
    run_key = f"{job.manifest['backend']['cloud']['exp_key']}/{job.run_dir.name}"
    for name, md5 in sums.items():
        assert hashlib.md5(objects[f"{run_key}/{name}"]).hexdigest() == md5
    puts = [(t, path) for t, method, path in cloud.refusal.passed if method == "PUT"]
    last = {path.rsplit("/", 1)[-1]: t for t, path in puts if f"/{job.run_dir.name}/" in path}
    assert max(v for k, v in last.items() if k != "status.json") <= last["status.json"]
    state_key = job.manifest["backend"]["cloud"]["batch_key"] + "/instance-0.state.json"
    assert max(t for t, path in puts) == max(t for t, path in puts if path.endswith(state_key))
    state = json.loads(objects[state_key])
    assert state["phase"] == "done" and state["final_sync"]["attempts"] >= 3, state
    failed, done = _log_times(log, r"attempt \d+ failed"), _log_times(log, r"done on attempt")
    print(
        f"final sync refused {refused[-1][0] - refused[0][0]:.1f} s ({len(refused)} requests refused); "
        f"{len(failed)} failed attempts, done {done[0] - failed[0]} s after the first failure, on attempt "
        f"{state['final_sync']['attempts']}"
    )


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
    wait_synced(job)
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
    wait_synced(job)
    aws.call(f"/interrupt?id={job.manifest['backend']['instance_id']}&window=20")
    assert job.wait(90) == State.PREEMPTED
    assert "notice" in job.status["message"]


def test_instance_killed_without_notice_fails_with_last_sync(aws):
    job = easylaunch.run_experiment(
        slow, exp_name="ec2-kill", mode="ec2", variant={}, sync_interval=1, skip_wait=True
    )
    wait_synced(job)
    aws.call(f"/kill?id={job.manifest['backend']['instance_id']}")
    assert job.wait(60) == State.FAILED
    assert "last sync" in job.status["message"] and "terminated" in job.status["message"]
    assert (job.run_dir / "progress.txt").read_text() == "start 0\n"  # what was synced is here


def test_cancel_terminates_the_instance(aws):
    job = easylaunch.run_experiment(
        slow, exp_name="ec2-cancel", mode="ec2", variant={}, sync_interval=1, skip_wait=True
    )
    wait_synced(job)
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


def test_docker_image_on_the_instance_runs_through_dockerd(aws):
    run_in_docker_on_the_instance("ec2", "ec2-docker")


# -- secrets ----------------------------------------------------------------------------------


def test_a_duet_runs_as_a_job_on_an_instance(aws, tmp_path):
    # the duet as a job on ec2: the played instance (a process here, its Docker daemon this
    # machine's) runs it with the shipped easylaunch only, and the results come back from the bucket
    import uuid

    from conftest import require_service
    from test_duet import README_CONFIG, cli, write

    require_service("docker")
    suite = f"ec2{uuid.uuid4().hex[:6]}"
    images = {"busybox": os.environ["EASYLAUNCH_TEST_DOCKER_IMAGE_NOPYTHON"],
              "python": os.environ["EASYLAUNCH_TEST_DOCKER_IMAGE"]}  # fmt: skip
    path = write(tmp_path, README_CONFIG.format(suite=suite, engine="docker", **images))
    out = tmp_path / "out"
    proc = cli(str(path), "--outdir", str(out), "--mode", "ec2", "-O", "sync_interval=1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    assert len(names) == 3 * 2 + 2 and all(n.startswith(f"{suite}.a-benchmark.") for n in names), names
    assert "MemTotal" in (out / "artifacts" / "meminfo").read_text()
    wait_for(lambda: aws.live_instances("duet") == [], 60, "the instance to terminate itself")


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
    wait_synced(job)
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
    wait_synced(job)
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


def test_recover_during_the_notice_window_waits_for_the_checkpoint(aws, capsys):
    from easylaunch import cli

    job = easylaunch.run_experiment(
        Resumable(),
        exp_name="ec2-recover-early",
        mode="ec2",
        variant={"x": 1, "checkpoint_seconds": 6},  # a checkpoint that takes a while to save
        sync_interval=1,
        skip_wait=True,
    )
    wait_synced(job)
    first = job.manifest["backend"]["instance_id"]
    state_key = job.manifest["backend"]["cloud"]["batch_key"] + "/instance-0.state.json"
    aws.call(f"/interrupt?id={first}&window=60")
    t0 = time.time()

    def noticed():
        try:
            return json.loads(aws.s3.get_object(Bucket=aws.bucket, Key=state_key)["Body"].read()).get(
                "notice"
            )
        except Exception:
            return None

    wait_for(noticed, 30, "the instance's record of its notice")
    # the user recovers at once, while the instance (running, in its 2-minute window) is still
    # saving and syncing the checkpoint: recover waits for it
    capsys.readouterr()
    assert cli.main(["recover", "ec2-recover-early"]) == 0
    out, err = capsys.readouterr()
    waited = time.time() - t0
    assert "easylaunch recover: waiting for 1 run(s) before relaunching them" in err, err
    assert f"instance {first} (running) had a notice" in err, err
    assert f"relaunched {job.run_dir.name} (attempt 2)" in out, out
    assert waited < 60  # on the instance's notice sync, not at its end
    again = easylaunch.Job.load(job.run_dir)
    assert again.wait(180) == State.COMPLETED, again.status
    progress = (job.run_dir / "progress.txt").read_text().split()
    assert progress[:2] == ["start", "0"] and progress[2] == "start" and int(progress[3]) > 0  # resumed
    print(f"recover waited {waited:.1f} s after the spot notice (checkpoint 6 s)")
