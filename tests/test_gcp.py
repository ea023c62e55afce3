"""Mode gcp against cloudsim gcp (a Compute v1 endpoint of the test's own that validates what it is
sent and plays each instance: its startup script runs for real here) and the GCS emulator."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cloudpickle
import pytest
from cloudsim_fixtures import Proc, free_port, wait_http
from conftest import require_service, wait_for

import easylaunch
from easylaunch import State
from easylaunch.cloudsim import gcp as sim
from easylaunch.modes import gcp

cloudpickle.register_pickle_by_value(sys.modules[__name__])

PROJECT = "el-test-project"
IMAGE = "debian-12-bookworm-v20241112"


def function(doodad_config, variant):
    """doodad's easy_launch README example, writing a file as a real experiment does."""
    import os

    print("The learning rate is", variant["learning_rate"])
    print("You are ", variant["parameter"])
    print("Save to ", doodad_config.base_log_dir)
    with open(os.path.join(doodad_config.base_log_dir, "out.txt"), "w") as f:
        f.write(f"lr={variant['learning_rate']}\n")
    return variant["learning_rate"] * 2


def slow(doodad_config, variant):
    import os
    import time

    with open(os.path.join(doodad_config.base_log_dir, "progress.txt"), "a") as f:
        f.write("start\n")
    for step in range(10**6):
        with open(os.path.join(doodad_config.base_log_dir, "step.txt"), "w") as f:
            f.write(str(step))
        time.sleep(0.1)


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


class GcpCloud:
    """cloudsim gcp on a free port, against the shared GCS emulator."""

    def __init__(self, work: Path):
        require_service("cloud")
        self.gcs = os.environ.get("EASYLAUNCH_TEST_GCS_URL") or ""
        if not self.gcs:
            pytest.skip("no GCS emulator (EASYLAUNCH_TEST_GCS_URL)")
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
            self.gcs,
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
        url = f"{self.url}/compute/v1/projects/{PROJECT}/zones/{zone}/instances"
        items = json.loads(urllib.request.urlopen(url, timeout=30).read()).get("items") or []
        return [i for i in items if not exp or i["labels"].get("easylaunch-exp") == gcp.label_value(exp)]

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


@pytest.fixture(scope="module")
def gcp_cloud(tmp_path_factory):
    cloud = GcpCloud(tmp_path_factory.mktemp("gcp"))
    yield cloud
    cloud.stop()


@pytest.fixture
def cloud(gcp_cloud, monkeypatch, tmp_path, request):
    for k, v in gcp_cloud.env.items():
        monkeypatch.setenv(k, v)
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + f"-{os.getpid() % 1000}"
    bucket = gcp_cloud.storage.create_bucket(name)
    gcp_cloud.bucket = name
    gcp_cloud.config_path = gcp_cloud.config(tmp_path / "easylaunch_config.py", name)
    monkeypatch.setenv("EASYLAUNCH_CONFIG", str(gcp_cloud.config_path))
    yield gcp_cloud
    for blob in list(gcp_cloud.storage.list_blobs(name)):
        blob.delete()
    bucket.delete()


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

    def synced():
        job.fetch()
        return (job.run_dir / "step.txt").exists()

    wait_for(synced, 120, "the run to have synced step.txt")
    name = job.manifest["backend"]["instance_id"]
    cloud.call(f"/preempt?name={name}&window=15")
    assert job.wait(90) == State.PREEMPTED, job.status
    assert "preempted" in job.status["message"] or "notice" in job.status["message"]
    assert int((job.run_dir / "step.txt").read_text()) > 0
    assert (job.run_dir / "progress.txt").read_text() == "start\n"
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

    def synced():
        job.fetch()
        return (job.run_dir / "step.txt").exists()

    wait_for(synced, 120, "the run to have synced step.txt")
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


def counted(doodad_config, variant):
    """Runs `steps` steps (0.1 s each) from `resume_from`."""
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
    """doodad/submitit's checkpoint hook: resume where the last step was."""

    def __call__(self, doodad_config, variant):
        return counted(doodad_config, variant)

    def checkpoint(self, doodad_config, variant):
        import os

        step = int(open(os.path.join(doodad_config.base_log_dir, "step.txt")).read())
        resumed = dict(variant, resume_from=step, steps=5)

        def resume(dc, _v, _variant=resumed):
            return counted(dc, _variant)

        return resume


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

    def synced():
        job.fetch()
        return (job.run_dir / "step.txt").exists()

    wait_for(synced, 120, "the run to have synced step.txt")
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

    job = easylaunch.run_experiment(
        slow, exp_name="gcp-clean", mode="gcp", variant={}, sync_interval=1, skip_wait=True
    )

    def synced():
        job.fetch()
        return (job.run_dir / "step.txt").exists()

    wait_for(synced, 120, "the run to have synced step.txt")
    name = job.manifest["backend"]["instance_id"]
    capsys.readouterr()
    assert cli.main(["cloud", "cleanup", "gcp-clean", "--mode", "gcp"]) == 0
    out = capsys.readouterr().out
    assert f"would spare {name}" in out and "1 of its runs unfinished here" in out, out
    assert cli.main(["cloud", "cleanup", "gcp-clean", "--mode", "gcp", "--terminate", "--force"]) == 0
    assert f"terminating {name}" in capsys.readouterr().out
    wait_for(lambda: cloud.instances("gcp-clean") == [], 30, "the instance to be deleted")
    assert job.wait(60) in (State.FAILED, State.CANCELLED, State.PREEMPTED)
