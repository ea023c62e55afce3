"""Mode gcp against cloudsim gcp (a Compute v1 endpoint of the test's own that validates what it is
sent and plays each instance: its startup script runs for real here) and the GCS emulator."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cloudpickle
import pytest
from cloudsim_fixtures import (  # noqa: F401 (fixtures)
    IMAGE,
    PROJECT,
    FaultProxy,
    Resumable,
    boot_without_its_code,
    cloud,
    gcp_cloud,
    gcp_refusing,
    gcp_refusing_cloud,
    run_in_docker_on_the_instance,
    slow,
    wait_synced,
)
from conftest import wait_for

import easylaunch
from easylaunch import State
from easylaunch.cloudsim import gcp as sim
from easylaunch.modes import gcp

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def function(doodad_config, variant):
    """doodad's easy_launch README example, writing a file as a real experiment does."""
    import os

    print("The learning rate is", variant["learning_rate"])
    print("You are ", variant["parameter"])
    print("Save to ", doodad_config.base_log_dir)
    with open(os.path.join(doodad_config.base_log_dir, "out.txt"), "w") as f:
        f.write(f"lr={variant['learning_rate']}\n")
    return variant["learning_rate"] * 2


# -- fast: what the mode sends, checked by the endpoint's rules (no services) -----------------

RESOLVED = {
    "project": PROJECT,
    "zone": "us-west1-a",
    "image": f"projects/debian-cloud/global/images/{IMAGE}",
    "instance_type": "e2-small",
    "accelerators": [],
    "provisioning_model": "SPOT",
    "disk_size_gb": 20,
    "service_account": "default",
    "network": "global/networks/default",
}
TAGS = {
    "easylaunch": "1",
    "easylaunch-exp": "My Exp_1",
    "easylaunch-batch": "B7X2",
    "easylaunch-runs": "run-0,run-1",
    "Name": "x",
}


def _provider():
    return gcp.GcpProvider({}, {})


def test_spot_body_has_the_real_api_shape_and_rules():
    body = _provider().body("easylaunch-my-exp-b7x2-0", "#!/bin/bash\necho hi\n", TAGS, RESOLVED)
    sim.check_instance(json.loads(json.dumps(body)), PROJECT, "us-west1-a")
    assert body["scheduling"] == {
        "automaticRestart": False,
        "onHostMaintenance": "TERMINATE",
        "provisioningModel": "SPOT",
        "instanceTerminationAction": "DELETE",
    }
    assert body["labels"] == {"easylaunch": "1", "easylaunch-exp": "my-exp_1", "easylaunch-batch": "b7x2"}
    items = {i["key"]: i["value"] for i in body["metadata"]["items"]}
    assert items["easylaunch-runs"] == "run-0,run-1" and "cloud_agent sync" in items["shutdown-script"]
    assert body["serviceAccounts"][0]["scopes"] == list(gcp.SCOPES)
    # the body goes through the client library's own Instance type unchanged
    from google.cloud import compute_v1

    resource = compute_v1.Instance.from_json(json.dumps(body), ignore_unknown_fields=False)
    assert json.loads(compute_v1.Instance.to_json(resource))["scheduling"]["provisioningModel"] == "SPOT"


def test_gpu_body_adds_accelerators_and_terminate_on_maintenance():
    resolved = dict(
        RESOLVED,
        provisioning_model="STANDARD",
        accelerators=[{"type": "zones/us-west1-a/acceleratorTypes/nvidia-tesla-t4", "count": 1}],
    )
    body = _provider().body("easylaunch-gpu-0", "true", TAGS, resolved)
    sim.check_instance(body, PROJECT, "us-west1-a")
    assert body["guestAccelerators"] == [
        {"acceleratorType": "zones/us-west1-a/acceleratorTypes/nvidia-tesla-t4", "acceleratorCount": 1}
    ]
    assert body["scheduling"]["onHostMaintenance"] == "TERMINATE"
    preemptible = _provider().body(
        "easylaunch-p-0", "true", TAGS, dict(RESOLVED, provisioning_model="PREEMPTIBLE")
    )
    sim.check_instance(preemptible, PROJECT, "us-west1-a")
    assert preemptible["scheduling"]["preemptible"] is True


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda b: b.update(machine_type=b.pop("machineType")), r'Unknown name "machine_type"'),
        (lambda b: b["scheduling"].update(automaticRestart=True), r"cannot be automatically restarted"),
        (lambda b: b["scheduling"].update(provisioningModel="spot"), r"not one of SPOT, STANDARD"),
        (lambda b: b["disks"][0]["initializeParams"].update(diskSizeGb="twenty"), r"TYPE_INT64"),
        (lambda b: b["labels"].update({"Exp": "A B"}), r"Label keys and values"),
        (lambda b: b.update(name="Bad_Name"), r"Must be a match of regex"),
        (lambda b: b["metadata"].update(items={"startup-script": "x"}), r"expected a list"),
        (
            lambda b: b.update(
                guestAccelerators=[{"acceleratorType": "nvidia-tesla-t4", "acceleratorCount": 1}]
            ),
            r"Accelerator type does not exist",
        ),
    ],
)
def test_the_endpoint_rejects_bodies_the_real_api_rejects(change, message):
    body = json.loads(json.dumps(_provider().body("easylaunch-x-0", "true", TAGS, RESOLVED)))
    change(body)
    with pytest.raises(sim.ApiError, match=message):
        sim.check_instance(body, PROJECT, "us-west1-a")


def test_names_and_labels_follow_gce_rules():
    for text in ("9-lives", "Exp With Spaces", "a" * 100, "x--", "_"):
        name = gcp.instance_name(text)
        assert sim.NAME_RE.match(name), name
    labels = gcp.labels_of({"easylaunch-exp": "ÜBER exp/1" + "z" * 80, "9key": "v"})
    for k, v in labels.items():
        assert sim.LABEL_KEY_RE.match(k) and sim.LABEL_VALUE_RE.match(v), (k, v)


def test_import_easylaunch_imports_no_google_library():
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import easylaunch, sys; print([m for m in sys.modules if m.startswith('google')])",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "[]"


def test_no_project_is_a_clear_error_before_anything(tmp_path, monkeypatch, log_dir):
    for var in ("CLOUDSDK_CORE_PROJECT", "GOOGLE_CLOUD_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    config = tmp_path / "easylaunch_config.py"
    config.write_text(f"GCP_BUCKET_NAME = 'b-x'\nGCP_IMAGE_NAME = {IMAGE!r}\n")
    monkeypatch.setenv("EASYLAUNCH_CONFIG", str(config))
    monkeypatch.setenv("EASYLAUNCH_GCP_COMPUTE_ENDPOINT", "http://127.0.0.1:9")  # never reached
    with pytest.raises(ValueError, match=r"no GCP project.*gcp_kwargs=\{'project'.*CLOUDSDK_CORE_PROJECT"):
        easylaunch.run_experiment(function, exp_name="gcp-noproj", mode="gcp", variant={"learning_rate": 1})
    with pytest.raises(ValueError, match=r"unknown key 'zoen' in gcp_kwargs. Did you mean 'zone'"):
        easylaunch.run_experiment(
            function, exp_name="gcp-noproj", mode="gcp", variant={}, gcp_kwargs={"zoen": "us-west1-a"}
        )
    assert not (log_dir / "gcp-noproj").exists()


# -- cloudsim gcp + the GCS emulator ---------------------------------------------------------------


def test_a_boot_that_cannot_fetch_its_code_ends_its_instance(cloud, log_dir, tmp_path):
    # as on ec2 (test_cloud.py): the startup script, rendered by a dry run, runs here as the
    # playing instance with a bucket endpoint that answers nothing, and deletes that instance
    # through its metadata server (name, zone, project, token) and the Compute API
    from easylaunch.cloudsim.players import free_port

    job = easylaunch.run_experiment(
        slow, exp_name="gcp-nofetch", mode="gcp", variant={}, sync_interval=1, skip_wait=True
    )
    name = job.manifest["backend"]["instance_id"]
    wait_for(lambda: job.state == State.RUNNING, 60, "the run to start on its instance")
    boot_without_its_code(
        "gcp",
        "gcp-nofetch-dry",
        function,
        log_dir,
        tmp_path,
        {
            "EASYLAUNCH_METADATA_URL": cloud.played(name)["metadata"],
            "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        },
    )
    wait_for(lambda: cloud.instances("gcp-nofetch") == [], 60, "the instance to be deleted")
    assert job.wait(120) == State.FAILED
    assert name in job.status["message"]


def nothing_created(cloud, exp):
    assert cloud.instances(exp) == []
    # the content-addressed code stays (it is shared by every launch of the same code)
    leftovers = [k for k in cloud.objects(cloud.bucket) if not ("/" + k).count("/.snapshots/")]
    assert leftovers == [], leftovers


def test_readme_example_completes_with_outputs_back(cloud):
    t0 = time.time()
    job = easylaunch.run_experiment(
        function,
        exp_name="gcp-test-doodad-easy-launch",
        mode="gcp",
        variant=dict(learning_rate=1e-4, parameter="awesome"),
        use_gpu=False,
        sync_interval=1,
    )
    elapsed = time.time() - t0
    assert job.state == State.COMPLETED, job.status
    assert job.result() == 2e-4
    assert (job.run_dir / "out.txt").read_text() == "lr=0.0001\n"
    assert "The learning rate is 0.0001" in job.stdout()
    print(f"README example under cloudsim gcp: {elapsed:.1f} s")
    # the instance deleted itself after its final sync
    wait_for(
        lambda: cloud.instances("gcp-test-doodad-easy-launch") == [], 30, "the instance to delete itself"
    )
    (insert,) = [
        r
        for r in cloud.inserts()
        if r["body"].get("labels", {}).get("easylaunch-exp") == "gcp-test-doodad-easy-launch"
    ]
    body = insert["body"]
    assert body["scheduling"]["provisioningModel"] == "SPOT"
    assert body["scheduling"]["instanceTerminationAction"] == "DELETE"
    assert body["labels"]["easylaunch-batch"] == job.manifest["batch_id"].lower()
    assert body["machineType"] == "zones/us-west1-a/machineTypes/e2-small"
    # no credential in what the instance was given
    planted = cloud.call("/planted", "GET")["token"]
    assert planted not in json.dumps(body)


def test_sweep_packs_num_exps_per_instance(cloud):
    before = len(cloud.inserts())
    sweep = easylaunch.run_sweep(
        function,
        [{"learning_rate": i, "parameter": "p"} for i in range(5)],
        exp_name="gcp-sweep",
        mode="gcp",
        num_exps_per_instance=2,
        max_parallel=2,
        sync_interval=1,
        skip_wait=True,
    )
    sweep.wait(timeout=240)
    assert sweep.states() == [State.COMPLETED] * 5, [j.status for j in sweep]
    assert sweep.results() == [0, 2, 4, 6, 8]
    for i, job in enumerate(sweep):
        assert (job.run_dir / "out.txt").read_text() == f"lr={i}\n"
    assert len(cloud.inserts()) - before == 3  # ceil(5 / 2)
    assert sweep[0].mode.stats["payload_puts"] == 3


@pytest.mark.parametrize(
    "kwargs, config, message",
    [
        ({"gcp_kwargs": {"zone": "us-wset1-a"}}, {}, r"unknown zone 'us-wset1-a'.*Did you mean 'us-west1-a'"),
        (
            {},
            {"GCP_IMAGE_NAME": "no-such-image"},
            r"image 'no-such-image' not found in project 'debian-cloud'",
        ),
        ({"instance_type": "e2-gigantic"}, {}, r"unknown machine type 'e2-gigantic'"),
        ({}, {"GCP_BUCKET_NAME": "no-such-bucket-here"}, r"bucket 'no-such-bucket-here' .*does not exist"),
        (
            {
                "use_gpu": True,
                "gcp_kwargs": {"gpu_kwargs": {"gpu_model": "nvidia-h900"}, "image_name": IMAGE},
            },
            {},
            r"GPU model 'nvidia-h900' is not offered in zone",
        ),
    ],
)
def test_bad_input_is_refused_before_anything(cloud, kwargs, config, message, log_dir):
    if config:
        cloud.config(cloud.config_path, cloud.bucket, **config)
    before = len(cloud.inserts())
    with pytest.raises((ValueError, RuntimeError), match=message):
        easylaunch.run_experiment(
            function, exp_name="gcp-bad", mode="gcp", variant={"learning_rate": 1}, **kwargs
        )
    assert len(cloud.inserts()) == before
    nothing_created(cloud, "gcp-bad")
    assert not (log_dir / "gcp-bad").exists()


@pytest.mark.parametrize(
    "fault, message",
    [
        ("reason=ZONE_RESOURCE_POOL_EXHAUSTED&after=1", r"ZONE_RESOURCE_POOL_EXHAUSTED.*another zone"),
        ("reason=QUOTA_EXCEEDED&after=1&http=403", r"QUOTA_EXCEEDED.*higher quota"),
    ],
)
def test_capacity_or_quota_error_leaves_nothing_behind(cloud, fault, message, log_dir):
    cloud.call(f"/fail?{fault}")  # the second insert fails: the first instance must go again
    before = len(cloud.inserts())
    with pytest.raises(RuntimeError, match=message):
        easylaunch.run_sweep(slow, [{"x": 1}, {"x": 2}], exp_name="gcp-capacity", mode="gcp", sync_interval=1)
    assert len(cloud.inserts()) - before == 2
    wait_for(lambda: cloud.instances("gcp-capacity") == [], 30, "the first instance to be deleted")
    nothing_created(cloud, "gcp-capacity")
    assert not (log_dir / "gcp-capacity").exists()


def test_preemption_mid_run_is_preempted_with_outputs_synced(cloud):
    job = easylaunch.run_experiment(
        slow, exp_name="gcp-preempt", mode="gcp", variant={}, sync_interval=1, skip_wait=True
    )

    wait_synced(job)
    name = job.manifest["backend"]["instance_id"]
    cloud.call(f"/preempt?name={name}&window=15")
    assert job.wait(90) == State.PREEMPTED, job.status
    assert "preempted" in job.status["message"] or "notice" in job.status["message"]
    assert int((job.run_dir / "step.txt").read_text()) > 0
    assert (job.run_dir / "progress.txt").read_text() == "start 0\n"
    wait_for(lambda: cloud.instances("gcp-preempt") == [], 30, "the Spot instance to be deleted")


def test_a_body_of_the_wrong_shape_is_rejected_by_the_endpoint(cloud):
    body = _provider().body("easylaunch-shape-0", "true", TAGS, RESOLVED)
    body["scheduling"]["provisioning_model"] = body["scheduling"].pop("provisioningModel")
    req = urllib.request.Request(
        f"{cloud.url}/compute/v1/projects/{PROJECT}/zones/us-west1-a/instances",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400
    assert 'Unknown name "provisioning_model"' in json.loads(err.value.read())["error"]["message"]
    assert cloud.instances() == [] or all(i["name"] != "easylaunch-shape-0" for i in cloud.instances())


def test_dry_run_prints_the_plan_and_creates_nothing(cloud, capsys):
    before = len(cloud.inserts())
    sweep = easylaunch.run_sweep(
        function,
        [{"learning_rate": i, "parameter": "p"} for i in range(4)],
        exp_name="gcp-dry",
        mode="gcp",
        num_exps_per_instance=2,
        dry_run=True,
        skip_wait=True,
    )
    out = capsys.readouterr().out
    assert "2 instance(s) for 4 run(s)" in out
    assert f"project {PROJECT}, zone us-west1-a" in out and "type e2-small, spot" in out
    assert "easylaunch.cloud_agent run" in out
    assert sweep.states() == [State.GENERATED] * 4
    assert len(cloud.inserts()) == before
    assert list(cloud.objects(cloud.bucket)) == []


def test_startup_script_over_the_metadata_limit_becomes_a_stub(cloud, monkeypatch):
    dry = easylaunch.run_experiment(
        function,
        exp_name="gcp-stub",
        mode="gcp",
        variant={"learning_rate": 3, "parameter": "p"},
        dry_run=True,
        skip_wait=True,
    )
    full = (dry.run_dir.parent / ".batches" / dry.manifest["batch_id"] / "instance-0.boot.sh").read_bytes()
    monkeypatch.setattr(gcp.GcpProvider, "metadata_limit", len(full) - 1)
    job = easylaunch.run_experiment(
        function,
        exp_name="gcp-stub",
        mode="gcp",
        variant={"learning_rate": 3, "parameter": "p"},
        sync_interval=1,
        skip_wait=True,
    )
    name = job.manifest["backend"]["instance_id"]
    (insert,) = [r for r in cloud.inserts() if r["body"]["name"] == name]
    items = {i["key"]: i["value"] for i in insert["body"]["metadata"]["items"]}
    assert (
        len(items["startup-script"].encode()) < len(full)
        and "boot script in the bucket" in items["startup-script"]
    )
    assert job.wait(120) == State.COMPLETED and job.result() == 6


def test_cancel_deletes_the_instance(cloud):
    job = easylaunch.run_experiment(
        slow, exp_name="gcp-cancel", mode="gcp", variant={}, sync_interval=1, skip_wait=True
    )

    wait_synced(job)
    assert job.cancel()
    assert job.wait(60) == State.CANCELLED
    wait_for(lambda: cloud.instances("gcp-cancel") == [], 30, "the instance to be deleted")


def test_no_credential_in_any_script_metadata_log_or_object(cloud, log_dir):
    token = cloud.call("/planted", "GET")["token"]
    sweep = easylaunch.run_sweep(
        function,
        [{"learning_rate": 1, "parameter": "a"}, {"learning_rate": 2, "parameter": "b"}],
        exp_name="gcp-secrets",
        mode="gcp",
        sync_interval=1,
        skip_wait=True,
    )
    sweep.wait(120)
    assert sweep.states() == [State.COMPLETED] * 2
    texts = {str(p): p.read_bytes() for p in Path(log_dir).rglob("*") if p.is_file()}
    for r in cloud.inserts():
        texts[f"insert {r['body'].get('name')}"] = json.dumps(r["body"]).encode()
    for key, data in cloud.objects(cloud.bucket).items():
        texts[f"gs {key}"] = data
    for inst in cloud.call("/instances", "GET")["instances"]:
        for p in Path(inst["dir"]).rglob("*"):
            if p.is_file() and p.suffix in (".log", ".json", ".sh", ".txt"):
                texts[str(p)] = p.read_bytes()
    assert len(texts) > 20
    assert [where for where, data in texts.items() if token.encode() in data] == []


def test_preempted_run_is_recovered_from_its_checkpoint(cloud):
    job = easylaunch.run_experiment(
        Resumable(),
        exp_name="gcp-recover",
        mode="gcp",
        variant={},
        sync_interval=1,
        skip_wait=True,
        max_recoveries=1,
    )

    wait_synced(job)
    first = job.manifest["backend"]["instance_id"]
    cloud.call(f"/preempt?name={first}&window=15")
    assert job.wait(180) == State.COMPLETED, job.status
    status = json.loads((job.run_dir / "status.json").read_text())
    assert status["recoveries"] == 1 and "PREEMPTED" in [h[0] for h in status["history"]]
    progress = (job.run_dir / "progress.txt").read_text().split()
    assert progress[:2] == ["start", "0"] and progress[2] == "start" and int(progress[3]) > 0
    second = json.loads((job.run_dir / "manifest.json").read_text())["backend"]["instance_id"]
    assert second != first


def test_cloud_cleanup_finds_gcp_instances_by_label(cloud, capsys):
    from easylaunch import cli

    # launched in another zone than the config's (us-west1-a): cleanup finds it where it was
    # launched (the runs' manifests), with no --mode and no --zone
    job = easylaunch.run_experiment(
        slow,
        exp_name="gcp-clean",
        mode="gcp",
        variant={},
        sync_interval=1,
        skip_wait=True,
        gcp_kwargs={"zone": "us-west1-b"},
    )
    wait_synced(job)
    name = job.manifest["backend"]["instance_id"]
    capsys.readouterr()
    assert cli.main(["cloud", "cleanup", "gcp-clean"]) == 0
    out = capsys.readouterr().out
    assert f"would spare {name}" in out and "1 of its runs unfinished here" in out, out
    # --zone overrides the place (the old CLI); --region is ec2's
    assert cli.main(["cloud", "cleanup", "gcp-clean", "--mode", "gcp", "--zone", "us-west1-a"]) == 0
    out = capsys.readouterr().out
    assert "no live gcp instance made by easylaunch for 'gcp-clean'" in out, out
    assert f"looked in gcp project {PROJECT}, zone us-west1-a" in out, out
    assert cli.main(["cloud", "cleanup", "gcp-clean", "--region", "us-west1"]) == 2
    assert "--region 'us-west1' is an option of --mode ec2" in capsys.readouterr().err
    assert cli.main(["cloud", "cleanup", "--mode", "ec2", "--zone", "us-west1-b"]) == 2
    assert "--zone 'us-west1-b' is an option of --mode gcp" in capsys.readouterr().err
    assert cli.main(["cloud", "cleanup", "gcp-clean", "--mode", "gcp", "--zone", "us-west1-b"]) == 0
    assert f"would spare {name}" in capsys.readouterr().out
    assert cli.main(["cloud", "cleanup", "gcp-clean", "--terminate", "--force"]) == 0
    assert f"terminating {name}" in capsys.readouterr().out
    wait_for(lambda: cloud.instances("gcp-clean", zone="us-west1-b") == [], 30, "the instance to be deleted")
    assert job.wait(60) in (State.FAILED, State.CANCELLED, State.PREEMPTED)


# -- bad input: the bucket, the credentials --------------------------------------------------------


def test_bucket_not_writable_is_refused_before_any_instance(cloud, monkeypatch, log_dir):
    def fault(method, path, body):
        if method in ("POST", "PUT") and path.startswith(f"/upload/storage/v1/b/{cloud.bucket}/"):
            return 403, json.dumps(
                {
                    "error": {
                        "code": 403,
                        "message": "el-launcher@el-test-project.iam.gserviceaccount.com does not have "
                        "storage.objects.create access to the Google Cloud Storage object.",
                        "errors": [{"reason": "forbidden", "domain": "global", "message": "forbidden"}],
                    }
                }
            ).encode()
        return None

    proxy = FaultProxy(cloud.gcs, fault, "application/json")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)  # the launcher's storage; Compute direct
    before = len(cloud.inserts())
    try:
        with pytest.raises(
            PermissionError,
            match=rf"bucket '{cloud.bucket}' of GCP_BUCKET_NAME is not writable .*storage.objects.create"
            r".*Grant roles/storage.objectAdmin on it, or set GCP_BUCKET_NAME to a writable bucket",
        ):
            easylaunch.run_experiment(function, exp_name="gcp-ro", mode="gcp", variant={"learning_rate": 1})
    finally:
        proxy.close()
    assert proxy.hits >= 1
    assert len(cloud.inserts()) == before
    nothing_created(cloud, "gcp-ro")
    assert list(cloud.objects(cloud.bucket)) == []  # not even the code: the check comes first
    assert not (log_dir / "gcp-ro").exists()


def test_no_credentials_names_where_it_looked_and_creates_nothing(cloud, monkeypatch, tmp_path, log_dir):
    # the real sign-in path: no emulator, no key file, no gcloud ADC file (an empty HOME)
    home = tmp_path / "empty-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in (
        "STORAGE_EMULATOR_HOST",
        "EASYLAUNCH_GCP_COMPUTE_ENDPOINT",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "CLOUDSDK_CONFIG",
    ):
        monkeypatch.delenv(var, raising=False)
    before = len(cloud.inserts())
    with pytest.raises(easylaunch.modes.cloud.CloudError) as err:
        easylaunch.run_experiment(function, exp_name="gcp-nocred", mode="gcp", variant={"learning_rate": 1})
    message = str(err.value)
    for place in (
        "no Google credentials found",
        "$GOOGLE_APPLICATION_CREDENTIALS (not set)",
        f"{home}/.config/gcloud/application_default_credentials.json (no such file",
        "$CLOUDSDK_CONFIG moves it",
        "metadata server",
        "gcloud auth application-default login",
    ):
        assert place in message, (place, message)
    assert len(cloud.inserts()) == before
    nothing_created(cloud, "gcp-nocred")
    assert list(cloud.objects(cloud.bucket)) == []
    assert not (log_dir / "gcp-nocred").exists()


# -- the final sync when the bucket refuses; recover during a notice window ------------------------


def test_notice_sync_retries_inside_the_window_while_the_bucket_refuses(gcp_refusing):
    cloud = gcp_refusing
    job = easylaunch.run_experiment(
        Resumable(), exp_name="gcp-refused", mode="gcp", variant={}, sync_interval=1, skip_wait=True
    )
    wait_synced(job)
    name = job.manifest["backend"]["instance_id"]
    root = Path(cloud.played(name)["root"])
    t0 = time.time()
    # the bucket refuses the instance from the notice on, until its final sync has failed once:
    # a fixed spell (6 s) ended before the final sync began when the CI machine was loaded (a
    # periodic sync in flight at the notice retries for 5 s first), and then nothing failed
    cloud.refusal.arm(120)
    # GCE's own window (30 s), which the agent counts on: a shorter one reclaimed the instance
    # before the agent's deadline when the CI machine was loaded
    cloud.call(f"/preempt?name={name}&window=30")
    try:
        wait_for(
            lambda: "final sync (notice): attempt 1 failed: " in (root / "boot.log").read_text(),
            25,
            "the final sync's first attempt to be refused",
        )
    finally:
        cloud.refusal.disarm()
    assert job.wait(90) == State.PREEMPTED, job.status
    wait_synced(job, "payload.attempt1.pkl", 30)  # the checkpoint came through
    status = job.status
    assert status["notice_sync"] == {"attempt": 1, "checkpoint": True}, status
    assert "its checkpoint was saved" in status["message"]
    refused = cloud.refusal.refused
    assert len(refused) >= 3 and refused[0][0] >= t0, refused
    wait_for(lambda: "done on attempt" in (root / "boot.log").read_text(), 30, "the agent's last line")
    log = (root / "boot.log").read_text()
    assert "final sync (notice): attempt 1 failed: " in log, log
    # the shutdown script left the notice to the agent (two writers would race)
    wait_for(lambda: "waiting for its final sync" in (root / "shutdown.log").read_text(), 30, "shutdown.log")
    batch_key = job.manifest["backend"]["cloud"]["batch_key"]
    state = json.loads(cloud.objects(cloud.bucket)[f"{batch_key}/instance-0.state.json"])
    # inside the window (GCE's is 30 s; the agent keeps 5 s of it free)
    assert state["final_sync"]["why"] == "notice" and state["final_sync"]["done"] - t0 < 25, state
    print(
        f"notice sync: refused {refused[-1][0] - refused[0][0]:.1f} s ({len(refused)} requests), done "
        f"{state['final_sync']['done'] - t0:.1f} s after the notice, on attempt {state['final_sync']['attempts']}"
    )
    wait_for(lambda: cloud.instances("gcp-refused") == [], 60, "the Spot instance to be deleted")


def test_recover_waits_while_the_instance_syncs_its_checkpoint(cloud, capsys):
    # cloudsim, as GCE, says STOPPING from the preemption to the end of the window
    from easylaunch import cli, transitions

    job = easylaunch.run_experiment(
        Resumable(),
        exp_name="gcp-recover-wait",
        mode="gcp",
        variant={"checkpoint_seconds": 8},  # a big model: its checkpoint takes a while
        sync_interval=1,
        skip_wait=True,
    )
    wait_synced(job)
    first = job.manifest["backend"]["instance_id"]
    batch_key = job.manifest["backend"]["cloud"]["batch_key"]
    cloud.call(f"/preempt?name={first}&window=40")
    t0 = time.time()

    def noticed():
        blob = cloud.storage.bucket(cloud.bucket).get_blob(f"{batch_key}/instance-0.state.json")
        return blob is not None and json.loads(blob.download_as_bytes()).get("notice")

    wait_for(noticed, 20, "the instance's record of its notice")
    # the launcher sees the notice and STOPPING, while the checkpoint is still being saved: not
    # PREEMPTED yet (it would be relaunched from the payload it started with)
    job.mode.poll([job])
    assert transitions.current(job.run_dir) == State.RUNNING, job.status
    assert not (job.run_dir / "payload.attempt1.pkl").exists()
    before = len(cloud.inserts())
    capsys.readouterr()
    assert cli.main(["recover", "gcp-recover-wait", "--timeout", "1"]) == 1
    err = capsys.readouterr().err
    assert f"{job.run_dir.name} not relaunched: instance {first} (STOPPING) had a notice" in err, err
    assert "still syncing in its notice window, after 1 s (--timeout)" in err, err
    assert len(cloud.inserts()) == before  # nothing relaunched
    assert cli.main(["recover", "gcp-recover-wait"]) == 0
    out, err = capsys.readouterr()
    waited = time.time() - t0
    assert "easylaunch recover: waiting for 1 run(s) before relaunching them" in err, err
    assert f"relaunched {job.run_dir.name} (attempt 2)" in out, out
    assert waited < 40  # relaunched on the instance's final sync, before its end
    assert (job.run_dir / "payload.attempt1.pkl").exists()
    again = easylaunch.Job.load(job.run_dir)
    assert again.wait(180) == State.COMPLETED, again.status
    assert again.status["attempt"] == 2 and again.result() == "done"
    progress = (job.run_dir / "progress.txt").read_text().split()
    assert progress[:2] == ["start", "0"] and progress[2] == "start" and int(progress[3]) > 0  # resumed
    assert json.loads((job.run_dir / "manifest.json").read_text())["backend"]["instance_id"] != first
    print(f"recover waited {waited:.1f} s after the notice (checkpoint 8 s)")


# -- Docker on the instance ----------------------------------------------------------------------


def test_docker_image_on_the_instance_runs_through_dockerd(cloud):
    job = run_in_docker_on_the_instance("gcp", "gcp-docker")
    name = job.manifest["backend"]["instance_id"]
    (insert,) = [r for r in cloud.inserts() if r["body"]["name"] == name]
    items = {i["key"]: i["value"] for i in insert["body"]["metadata"]["items"]}
    assert "docker" in items["startup-script"]  # the boot script checks for the client
    wait_for(lambda: cloud.instances("gcp-docker") == [], 30, "the instance to delete itself")
