"""Mode ``local_docker`` / ``docker`` against the REAL dockerd and Podman (through its Docker API).

Both daemons and their images are started/built by scripts/services/docker.sh and podman.sh.
Every test that leaves a container labelled io.easylaunch.managed fails (conftest). The job
functions are pickled by value (the images have neither pytest nor this file).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
from conftest import ENGINE_HOSTS, engine_client, require_service, wait_for
from txlog_checks import check_complete

from easylaunch import State, records, run_experiment, run_sweep
from easylaunch.modes.docker import Engine, host_config
from easylaunch.runtimes import DockerRuntime, Mount

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.timeout(240), pytest.mark.filterwarnings("ignore:not in a git repository")]

ENGINES = ["docker", "podman"]
IMAGE_VARS = {"docker": "EASYLAUNCH_TEST_DOCKER_IMAGE", "podman": "EASYLAUNCH_TEST_PODMAN_IMAGE"}


def image_of(engine: str, kind: str = "") -> str:
    return os.environ[IMAGE_VARS[engine] + (f"_{kind}" if kind else "")]


@pytest.fixture(params=ENGINES)
def engine(request):
    require_service(request.param)
    return request.param


@pytest.fixture
def code(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "helper.py").write_text("VALUE = 1\n")
    return code


def opts(engine: str, code: Path, **more) -> dict:
    """The options of a launch on ``engine``."""
    return {
        "docker_image": image_of(engine),
        "docker_host": os.environ[ENGINE_HOSTS[engine]],
        "code_dirs_to_mount": [str(code)],
        **more,
    }


# -- job functions (run inside the containers) ---------------------------------------------------


def where_am_i(doodad_config, variant):
    import os
    import sys

    print("inside", variant, flush=True)
    with open(os.path.join(doodad_config.base_log_dir, "out.txt"), "w") as f:
        f.write("written inside\n")
    seen = {p: os.path.exists(p) for p in variant.get("probe", [])}
    return {
        "x": variant.get("x"),
        "uid": os.getuid(),
        "gid": os.getgid(),
        "python": "%d.%d" % sys.version_info[:2],
        "hostname": os.uname().nodename,
        "seen": seen,
        "env": {k: os.environ.get(k) for k in variant.get("env", [])},
        "pid": os.getpid(),
    }


def write_to(doodad_config, variant):
    with open(variant["path"], "w") as f:
        f.write("x")
    return "wrote"


def misbehave(doodad_config, variant):
    import os

    kind = variant["kind"]
    if kind == "ok":
        return "ok"
    if kind == "raise":
        raise ValueError("boom in a container")
    if kind == "sleep":
        print("sleeping", flush=True)
        time.sleep(variant.get("sleep", 60))
        return "slept"
    if kind == "oom":
        blocks = []
        for _ in range(400):
            blocks.append(bytearray(1 << 20))  # 1 MiB each, touched
        return len(blocks)
    if kind == "exit":
        os._exit(3)
    raise AssertionError(kind)


# -- the runtime's container config (pure) -----------------------------------------------------------


def test_container_config_mounts_user_env_and_gpus():
    rt = DockerRuntime(
        image="img",
        mounts=[Mount("/data", "/mnt/data"), Mount("/logs/run", read_only=False)],
        user="1000:1000",
        gpu=True,
        gpu_id=1,
        env={"A": "b"},
        options=host_config({"shm_size": "1g", "mem_limit": "512m", "cpus": 1.5}),
    )
    config = rt.container_config(["--tasks", "/t.json", "--index", "0"], ["/s/easylaunch.zip", "/s/cp.zip"])
    assert config["Image"] == "img"
    assert config["Cmd"] == ["python3", "-m", "easylaunch.runner", "--tasks", "/t.json", "--index", "0"]
    assert "PYTHONPATH=/s/easylaunch.zip:/s/cp.zip" in config["Env"] and "A=b" in config["Env"]
    assert config["User"] == "1000:1000"
    host = config["HostConfig"]
    assert host["Mounts"] == [
        {"Type": "bind", "Source": "/data", "Target": "/mnt/data", "ReadOnly": True},
        {"Type": "bind", "Source": "/logs/run", "Target": "/logs/run", "ReadOnly": False},
    ]
    assert host["DeviceRequests"] == [{"Driver": "nvidia", "Capabilities": [["gpu"]], "DeviceIDs": ["1"]}]
    assert host["ShmSize"] == 1 << 30 and host["Memory"] == host["MemorySwap"] == 512 << 20
    assert host["NanoCpus"] == 1_500_000_000 and "NetworkMode" not in host
    assert host_config({"network": "none"})["NetworkMode"] == "none"
    assert DockerRuntime(image="i", gpu=True).device_requests()[0]["Count"] == -1
    assert DockerRuntime(image="i").device_requests() == []
    with pytest.raises(ValueError, match="is not a size"):
        host_config({"mem_limit": "lots"})


# -- runs on both engines ------------------------------------------------------------------------------


def test_one_run_and_a_packed_sweep(engine, code, log_dir, tmp_path):
    host_only = tmp_path / "only-on-the-host"
    host_only.mkdir()
    job = run_experiment(
        where_am_i,
        exp_name="dk",
        mode="docker",
        variant={"x": 1, "probe": [str(host_only), str(code)]},
        **opts(engine, code),
    )
    assert job.state is State.COMPLETED, job.status
    out = job.result()
    assert out["x"] == 1
    # the caller's uid:gid, so every output file is the caller's
    assert (out["uid"], out["gid"]) == (os.getuid(), os.getgid())
    assert (job.run_dir / "out.txt").stat().st_uid == os.getuid()
    assert (job.run_dir / "out.txt").read_text() == "written inside\n"
    # a container: its own hostname; what is not mounted is not there (the live code dir either)
    assert out["hostname"] != os.uname().nodename
    assert out["seen"] == {str(host_only): False, str(code): False}
    assert "inside" in job.stdout()
    manifest = job.manifest
    assert manifest["mode"] == "docker" and manifest["backend"]["variants_per_task"] == 1
    # a sweep packed 4 to a container (expected_duration), max_parallel containers at once
    sweep = run_sweep(
        where_am_i,
        [{"x": i} for i in range(8)],
        exp_name="dk",
        mode="local_docker",
        **opts(engine, code, max_parallel=2, expected_duration=15),
    )
    assert [r["x"] for r in sweep.results()] == list(range(8))
    names = {j.manifest["backend"]["container_name"] for j in sweep}
    assert len(names) == 2 and sweep[0].manifest["backend"]["variants_per_task"] == 4
    # packed runs share their container's process tree but run in separate forked processes
    results = sweep.results()
    assert (
        len({(r["hostname"], r["pid"]) for r in results}) == 8 and len({r["hostname"] for r in results}) == 2
    )
    # the transaction log: complete, each run's worker its container
    rows = check_complete(sweep[0].run_dir.parent, [j.run_dir for j in [job, *sweep]])
    workers = {r["run"]: r["worker"] for r in rows}
    assert {workers[j.run_dir.name] for j in sweep} == {f"container {n}" for n in names}
    assert all(
        workers[j.run_dir.name] == f"container {j.manifest['backend']['container_name']}" for j in sweep
    )


def test_the_docker_sdk_transport_runs_the_same_launch(engine, code, log_dir, monkeypatch):
    """tcp:// and ssh:// daemons go through the docker SDK: the same launch, polls and cleanup."""
    monkeypatch.setenv("EASYLAUNCH_DOCKER_SDK", "1")
    from easylaunch.modes import docker as docker_mode

    assert docker_mode.Engine(os.environ[ENGINE_HOSTS[engine]])._sdk is not None
    sweep = run_sweep(
        misbehave, [{"kind": "ok"}, {"kind": "raise"}], exp_name="sdk", mode="docker", **opts(engine, code)
    )
    assert sweep.states() == [State.COMPLETED, State.FAILED]
    assert not docker_mode.Engine(os.environ[ENGINE_HOSTS[engine]]).containers(
        [f"io.easylaunch.batch={sweep[0].manifest['batch_id']}"]
    )


def test_mounts_read_only_by_default_and_run_dir_writable(engine, code, log_dir, tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    config = tmp_path / "config.py"
    config.write_text(
        "NON_CODE_DIRS_TO_MOUNT = [\n"
        f"    {{'local_dir': {str(data)!r}, 'mount_point': '/data'}},\n"
        f"    {{'local_dir': {str(scratch)!r}, 'mount_point': '/scratch', 'read_only': False}},\n"
        "]\n"
    )
    monkeypatch.setenv("EASYLAUNCH_CONFIG", str(config))
    sweep = run_sweep(
        write_to,
        [{"path": "/data/x"}, {"path": "/scratch/x"}],
        exp_name="mnt",
        mode="docker",
        **opts(engine, code),
    )
    sweep.wait()
    assert sweep.states() == [State.FAILED, State.COMPLETED]
    assert "Read-only file system" in str(sweep[0].exception())
    assert (scratch / "x").read_text() == "x" and not (data / "x").exists()
    # the code snapshot is read-only too
    snap = records.read_manifest(sweep[1].run_dir)
    assert snap["mode"] == "docker"


def test_failures_and_outputs_are_recorded(engine, code, log_dir):
    sweep = run_sweep(
        misbehave,
        [{"kind": "ok"}, {"kind": "raise"}, {"kind": "exit"}],
        exp_name="bad",
        mode="docker",
        **opts(engine, code, variants_per_task=3),
    )
    sweep.wait()
    assert sweep.states() == [State.COMPLETED, State.FAILED, State.FAILED]
    with pytest.raises(ValueError, match="boom in a container"):
        sweep[1].result()
    assert "exit code 3" in sweep[2].status["message"]


def test_cancel_a_running_container_run(engine, code, log_dir):
    job = run_experiment(
        misbehave,
        exp_name="cx",
        mode="docker",
        variant={"kind": "sleep"},
        skip_wait=True,
        **opts(engine, code),
    )
    wait_for(lambda: "sleeping" in job.stdout(), 60, "the run to start")
    job.cancel()
    assert job.wait(60) is State.CANCELLED
    daemon = Engine(os.environ[ENGINE_HOSTS[engine]])
    wait_for(
        lambda: not daemon.containers([f"io.easylaunch.batch={job.manifest['batch_id']}"]),
        30,
        "the container to be removed",
    )


def test_oom_kill_is_failed_with_out_of_memory(engine, code, log_dir):
    job = run_experiment(
        misbehave,
        exp_name="oom",
        mode="docker",
        variant={"kind": "oom"},
        **opts(engine, code, docker_options={"mem_limit": "64m"}),
    )
    assert job.state is State.FAILED
    assert "out of memory" in job.status["message"], job.status


# -- bad input: clear errors, nothing left behind --------------------------------------------------------


def _nothing_written(log_dir: Path) -> None:
    assert not log_dir.exists() or not [p for p in log_dir.rglob("manifest.json")]
    assert not log_dir.exists() or not [p for p in log_dir.iterdir() if not p.name.startswith(".")]


@pytest.mark.parametrize(
    "kind, options, message",
    [
        ("image", {"docker_image": "local/easylaunch-pythn:bookworm"}, "is not on the daemon.*Did you mean"),
        (
            "daemon",
            {"docker_host": "unix:///nonexistent/docker.sock"},
            "no Docker daemon answers at unix:///nonexistent",
        ),
        ("nopython", {"docker_image": "NOPYTHON"}, "has no python3"),
        ("nosh", {"docker_image": "NOSH"}, "no working /bin/sh"),
        ("gpu", {"use_gpu": True}, "no GPU runtime"),
        ("gpus", {"gpus": "auto"}, "gpus='auto' found no GPU"),  # this machine has none
        (
            "mount",
            {"local_input_dir_to_mount_point_dict": {"/nonexistent/data": "/data"}},
            "mount source /nonexistent/data",
        ),
        (
            "options",
            {"docker_options": {"mem_limt": "1g"}},
            "unknown key 'mem_limt'.*did you mean 'mem_limit'",
        ),
        ("noimage", {"docker_image": None}, "needs an image"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(engine, code, log_dir, kind, options, message):
    o = opts(engine, code)
    for key, value in options.items():
        if value == "NOPYTHON":
            value = image_of(engine, "NOPYTHON")
        elif value == "NOSH":
            value = image_of(engine, "NOSH")
        o[key] = value
    if o.get("docker_image") is None:
        o.pop("docker_image")
    with pytest.raises(Exception, match=message):
        run_experiment(where_am_i, exp_name="refused", mode="docker", variant={"x": 1}, **o)
    _nothing_written(log_dir)


@pytest.mark.parametrize("engine_name", ENGINES)
def test_gpu_request_reaches_the_daemon(engine_name, log_dir):
    """No GPU here: create (not start) the container the mode would, and read back what the
    daemon stored."""
    require_service(engine_name)
    if engine_name == "podman":
        pytest.skip(
            "Podman's Docker API accepts DeviceRequests but does not keep them (GPUs go through CDI there)"
        )
    rt = DockerRuntime(image=image_of(engine_name), gpu=True, gpu_id=0, labels={"io.easylaunch.managed": "1"})
    engine = Engine(os.environ[ENGINE_HOSTS[engine_name]])
    container = engine.create(rt.container_config(["--version"]), f"easylaunch-gpu-{os.getpid()}")
    try:
        attrs = engine_client(engine_name).api.inspect_container(container)
        requests = attrs["HostConfig"]["DeviceRequests"]
        assert requests[0]["Driver"] == "nvidia" and requests[0]["DeviceIDs"] == ["0"]
        assert requests[0]["Capabilities"] == [["gpu"]]
    finally:
        engine.remove(container)


# -- faults ---------------------------------------------------------------------------------------------


def test_container_killed_from_outside_is_failed_with_its_exit_code(code, log_dir):
    require_service("docker")
    job = run_experiment(
        misbehave,
        exp_name="kill",
        mode="docker",
        variant={"kind": "sleep"},
        skip_wait=True,
        **opts("docker", code),
    )
    wait_for(lambda: "sleeping" in job.stdout(), 60, "the run to start")
    name = job.manifest["backend"]["container_name"]
    subprocess.run(
        ["docker", "-H", os.environ["EASYLAUNCH_TEST_DOCKER_HOST"], "kill", name],
        check=True,
        capture_output=True,
    )
    assert job.wait(60) is State.FAILED
    assert "killed by SIGKILL" in job.status["message"] and job.status["exit_code"] == 137


LAUNCH = """
import sys, time
sys.path.insert(0, {tests!r})
import cloudpickle, test_docker
from easylaunch import run_sweep
cloudpickle.register_pickle_by_value(test_docker)
sweep = run_sweep(test_docker.misbehave, [{{"kind": "sleep", "sleep": 2}} for _ in range(6)],
                  exp_name="killed", mode="docker", skip_wait=True, max_parallel=2,
                  docker_image={image!r}, docker_host={host!r}, code_dirs_to_mount=[{code!r}])
print("LAUNCHED", flush=True)
time.sleep(600)
"""


def test_launcher_killed_mid_sweep_loses_nothing(code, log_dir, tmp_path):
    require_service("docker")
    script = tmp_path / "launch.py"
    script.write_text(
        LAUNCH.format(
            tests=str(Path(__file__).parent),
            image=image_of("docker"),
            host=os.environ["EASYLAUNCH_TEST_DOCKER_HOST"],
            code=str(code),
        )
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert "LAUNCHED" in proc.stdout.readline()
    finally:
        proc.kill()
        proc.wait()
    # the started containers finish, the queued ones are started by the keeper: all 6 complete
    out = subprocess.run(
        [sys.executable, "-m", "easylaunch.cli", "ls", "killed"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    from easylaunch import load_experiment

    sweep = load_experiment("killed")
    assert len(sweep) == 6
    sweep.wait(120)
    assert sweep.states() == [State.COMPLETED] * 6


def test_dockerd_restart_mid_sweep_ends_every_run_truthfully(code, log_dir):
    require_service("docker")
    sweep = run_sweep(
        misbehave,
        [{"kind": "sleep", "sleep": 20} for _ in range(4)],
        exp_name="restart",
        mode="docker",
        skip_wait=True,
        **opts("docker", code, max_parallel=2),
    )
    wait_for(lambda: sum("sleeping" in j.stdout() for j in sweep) >= 2, 60, "two runs to start")
    here = Path(__file__).resolve().parents[1] / "scripts" / "services" / "docker.sh"
    subprocess.run(["bash", str(here), "restart"], check=True, capture_output=True, timeout=120)
    sweep.wait(180)  # no hang
    assert len(sweep.states()) == 4
    # every run has a true record: what its runner wrote (CANCELLED by the daemon's SIGTERM)
    # or its exit code; none hangs
    for job in sweep:
        assert job.state in (State.COMPLETED, State.FAILED, State.CANCELLED), job.status
        if job.state is not State.COMPLETED:
            assert job.status.get("message"), job.status


# -- an image with another Python minor: the function travels by reference ------------------------


def test_other_python_image_runs_a_module_function_by_reference(engine, tmp_path, log_dir):
    code = tmp_path / "proj"
    code.mkdir()
    (code / "docker_trainer.py").write_text(
        "import sys\n\n\n"
        "def train(doodad_config, variant):\n"
        "    print('training on', sys.version_info[:2], flush=True)\n"
        "    return {'python': '%d.%d' % sys.version_info[:2], 'lr': variant['lr']}\n"
    )
    sys.modules.pop("docker_trainer", None)  # the other engine's run imported its own copy
    sys.path.insert(0, str(code))
    try:
        import docker_trainer as trainer
    finally:
        sys.path.remove(str(code))
    other = os.environ[f"EASYLAUNCH_TEST_{engine.upper()}_OTHER_PYTHON_VERSION"]
    options = {**opts(engine, code), "docker_image": image_of(engine, "OTHER_PYTHON")}
    sweep = run_sweep(trainer.train, [{"lr": 0.1}, {"lr": 0.2}], exp_name="byref", mode="docker", **options)
    assert [r["python"] for r in sweep.results()] == [other, other]
    assert [r["lr"] for r in sweep.results()] == [0.1, 0.2]
    assert sweep[0].manifest["transport"] == "reference" and sweep[0].manifest["target_python"] == other
    assert "training on" in sweep[0].stdout()
    # a function of the launch script (__main__ here: pickled by value) cannot cross minors
    with pytest.raises(Exception, match=f"Python {other}"):
        run_experiment(where_am_i, exp_name="byref2", mode="docker", variant={"x": 1}, **options)
    assert not (log_dir / "byref2").exists()


def test_timeout_and_with_block_leave_nothing_behind(engine, code, log_dir):
    job = run_experiment(
        misbehave, exp_name="to", mode="docker", variant={"kind": "sleep"}, timeout=3, **opts(engine, code)
    )
    assert job.state is State.TIMEOUT, job.status
    assert "sleeping" in job.stdout()
    daemon = Engine(os.environ[ENGINE_HOSTS[engine]])
    with run_experiment(
        misbehave,
        exp_name="with",
        mode="docker",
        variant={"kind": "sleep"},
        skip_wait=True,
        **opts(engine, code),
    ) as running:
        wait_for(lambda: "sleeping" in running.stdout(), 60, "the run to start")
    assert running.state is State.CANCELLED
    assert not daemon.containers([f"io.easylaunch.batch={running.manifest['batch_id']}"])


def hold_100mb(doodad_config, variant):
    block = bytearray(100 * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(1.5)
    return len(block)


def test_runs_are_monitored_inside_containers(engine, code, log_dir):
    """The runner samples its process tree inside the container (/proc there, no psutil needed)."""
    job = run_experiment(hold_100mb, exp_name="mon", mode="local_docker", **opts(engine, code, monitor=0.25))
    assert job.wait(timeout=120) is State.COMPLETED
    res = job.status["resources"]
    assert res["samples"] >= 3 and res["peak_rss_bytes"] >= 100 * 1024 * 1024
    assert (job.run_dir / "resources.csv").read_text().startswith("t,due,")


def uses_fake_gpu(doodad_config, variant):
    import os
    import time

    from easylaunch import gpu_fake

    gpu_fake.use(variant["mib"] * 1024 * 1024)
    start = time.time()
    time.sleep(variant["secs"])
    return {
        "start": start,
        "end": time.time(),
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpu_id": doodad_config.gpu_id,
    }


def test_gpu_packing_inside_containers(code, log_dir, monkeypatch, tmp_path):
    """gpus= on local_docker: each container's runner asks the host's broker through the
    mounted broker directory; the broker measures it by its host pid (SO_PEERCRED)."""
    require_service("docker")
    monkeypatch.setenv("EASYLAUNCH_FAKE_GPUS", "1000")
    monkeypatch.setenv("EASYLAUNCH_FAKE_GPU_USAGE", str(tmp_path / "gpu-usage"))
    monkeypatch.setenv("EASYLAUNCH_GPU_BROKER_IDLE", "1")
    sweep = run_sweep(
        uses_fake_gpu,
        [{"mib": 400, "secs": 1.0, "i": i} for i in range(3)],
        exp_name="gpu",
        mode="local_docker",
        **opts("docker", code, gpus="auto", max_parallel=3, variants_per_task=1),
    )
    assert [j.wait(timeout=180) for j in sweep] == [State.COMPLETED] * 3, [
        j.status.get("message") for j in sweep
    ]
    runs = sorted(((j.result(), j.status["gpu"]) for j in sweep), key=lambda rg: rg[0]["start"])
    assert all(r["visible"] == "0" and r["gpu_id"] == 0 for r, _ in runs)
    (first, g0), (second, g1), (third, g2) = runs
    assert g0["profiling"] and not g1["profiling"] and not g2["profiling"]
    assert second["start"] >= first["end"] and third["start"] >= first["end"]
    assert second["start"] < third["end"] and third["start"] < second["end"]  # packed: 2 x 400 MiB
    profiles = json.loads((log_dir / ".gpu_profiles.json").read_text())["profiles"]
    assert [p["peak_bytes"] for p in profiles.values()] == [400 * 1024 * 1024]
