"""Mode ``local_singularity`` (alias ``singularity``) against the REAL Apptainer of
scripts/services/apptainer.sh: the local scheduler with each runner inside ``apptainer exec``.

The image (a SIF, and the same root as a sandbox directory) holds Debian's python3 and
cloudpickle only: neither easylaunch nor this file. The job functions are pickled by value and
must not touch pytest; easylaunch reaches the container as the zip the mode ships.
"""

from __future__ import annotations

import errno
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
from conftest import require_service, wait_for
from txlog_checks import check_complete

from easylaunch import Job, State, records, run_sweep
from easylaunch.modes.singularity import LocalSingularityMode
from easylaunch.procs import alive

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.timeout(180), pytest.mark.filterwarnings("ignore:not in a git repository")]


# -- job functions (run inside the container) -----------------------------------------------------


def inside(doodad_config, variant):
    out = Path(doodad_config.base_log_dir, "out.txt")
    out.write_text(f"written inside {variant.get('i')}")
    print("hello from the container", variant.get("i"), flush=True)
    probe = variant.get("probe")
    return {
        "i": variant.get("i"),
        "container": os.environ.get("APPTAINER_CONTAINER"),
        "executable": sys.executable,
        "run_dir": doodad_config.base_log_dir,
        "pid": os.getpid(),
        "probe_visible": os.path.exists(probe) if probe else None,
        "host_var": os.environ.get("EL_TEST_HOST_ONLY"),
        "pre_var": os.environ.get("EL_PRE"),
        "cwd_visible": os.path.exists(variant["cwd"]) if variant.get("cwd") else None,
    }


def write_into(doodad_config, variant):
    target = Path(variant["dir"], f"from-{variant['i']}.txt")
    try:
        target.write_text("written by the run")
    except OSError as exc:
        return {"written": False, "errno": exc.errno, "read": Path(variant["dir"], "data.txt").read_text()}
    return {"written": True, "read": Path(variant["dir"], "data.txt").read_text()}


def sleeper(doodad_config, variant):
    if variant.get("ignore_term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if variant.get("ignore_usr2"):
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    Path(doodad_config.base_log_dir, "pid").write_text(str(os.getpid()))
    print("sleeping", flush=True)
    time.sleep(variant.get("sleep", 120))
    return "woke up"


def trivial(doodad_config, variant):
    return variant["i"]


# -- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path, monkeypatch, log_dir):
    """The test SIF, a config file naming it, and a tiny code dir (code_dirs_to_mount)."""
    require_service("apptainer")
    sif = os.environ["EASYLAUNCH_TEST_SINGULARITY_IMAGE"]
    wanted = os.environ.get("EASYLAUNCH_TEST_IMAGE_CLOUDPICKLE_VERSION")
    if wanted and wanted != cloudpickle.__version__:
        pytest.fail(f"the test image has cloudpickle {wanted}, this venv {cloudpickle.__version__}")
    return sif


def launch(fn, variants, code_dir=None, **options):
    """run_sweep on local_singularity with a code dir of its own (no snapshot of the tests)."""
    options.setdefault("exp_name", "sing")
    options.setdefault("mode", "local_singularity")
    if code_dir is not None:
        options.setdefault("code_dirs_to_mount", [str(code_dir)])
    return run_sweep(fn, variants, **options)


@pytest.fixture
def code(tmp_path) -> Path:
    code = tmp_path / "code"
    code.mkdir()
    (code / "helper.py").write_text("VALUE = 1\n")
    return code


def processes_mentioning(text: str) -> list:
    """Live (not zombie) processes whose command line holds ``text``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = (
                Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmdline and state != "Z":
            found.append((int(entry), cmdline))
    return found


def queue_of(job) -> dict:
    return records.read_json(job.run_dir.parent / ".batches" / job.manifest["batch_id"] / "queue.json")


def write_config(tmp_path, monkeypatch, text: str) -> Path:
    config = tmp_path / "easylaunch_config.py"
    config.write_text(text)
    monkeypatch.setenv("EASYLAUNCH_CONFIG", str(config))
    return config


# -- runs and sweeps --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["local_singularity", "singularity"])
def test_one_run_inside_the_image(mode, image, code, tmp_path, log_dir):
    (job,) = launch(inside, [{"i": 7}], code, mode=mode, singularity_image=image)
    res = job.result(timeout=60)
    assert res["container"] == image and res["executable"] == "/usr/bin/python3" != sys.executable
    assert res["run_dir"] == str(job.run_dir) and res["i"] == 7
    out = job.run_dir / "out.txt"
    assert out.read_text() == "written inside 7"
    assert out.stat().st_uid == os.getuid() and out.stat().st_gid == os.getgid()
    assert "hello from the container 7" in job.stdout()
    backend = job.manifest["backend"]
    command = backend["command"]
    assert command[1:4] == ["exec", "--cleanenv", "--contain"] and image in command and "--nv" not in command
    assert f"{log_dir}/.snapshots:{log_dir}/.snapshots:ro" in command
    assert str(job.run_dir) in command  # bound read-write at the same path
    wait_for(lambda: not alive(backend["pid"], backend["token"]), 10, "the container to exit")


def test_sandbox_directory_image(image, code, log_dir):
    sandbox = os.environ["EASYLAUNCH_TEST_SINGULARITY_SANDBOX"]
    (job,) = launch(inside, [{"i": 1}], code, singularity_image=sandbox, skip_wait=True)
    assert job.result(timeout=60)["container"] == sandbox


def test_sweep_within_and_beyond_max_parallel_and_packed(image, code, log_dir):
    # 2 at once directly, then 5 through the dispatcher, then 5 packed 2 per container
    direct = launch(inside, [{"i": i} for i in range(2)], code, singularity_image=image, max_parallel=2)
    queued = launch(inside, [{"i": i} for i in range(5)], code, singularity_image=image, max_parallel=2)
    packed = launch(
        inside,
        [{"i": i} for i in range(5)],
        code,
        singularity_image=image,
        max_parallel=2,
        variants_per_task=2,
    )
    for sweep, n in ((direct, 2), (queued, 5), (packed, 5)):
        results = sweep.results(timeout=120)
        assert [r["i"] for r in results] == list(range(n))
        assert all(r["container"] == image for r in results)
        assert [r["run_dir"] for r in results] == [str(j.run_dir) for j in sweep]
        assert len({r["pid"] for r in results}) == n  # each run its own process, packed too
        check_complete(sweep[0].run_dir.parent, [j.run_dir for j in sweep])  # the transaction log
    assert [j.manifest["backend"]["task"] for j in packed] == [0, 0, 1, 1, 2]
    entries = queue_of(packed[0])["entries"]
    tasks_file = str(packed[0].run_dir.parent / ".batches" / packed[0].manifest["batch_id"] / "tasks.json")
    assert [e["argv"][-5:] for e in entries] == [
        ["--tasks", tasks_file, "--index", str(i), "--quiet"] for i in range(3)
    ]
    assert [e["runs"] for e in entries] == [[str(j.run_dir) for j in packed[i : i + 2]] for i in (0, 2, 4)]
    for entry, group in zip(entries, (packed[0:2], packed[2:4], packed[4:])):
        assert entry["argv"][1] == "exec" and image in entry["argv"]
        for job in group:  # each container binds its own run directories, read-write
            assert str(job.run_dir) in entry["argv"]


def test_expected_duration_packs_by_max_parallel(image, code, log_dir):
    sweep = launch(
        trivial,
        [{"i": i} for i in range(6)],
        code,
        singularity_image=image,
        max_parallel=2,
        expected_duration=0.01,
    )
    assert sweep.results(timeout=120) == list(range(6))
    assert {j.manifest["backend"]["task_runs"] for j in sweep} == {3}


def test_only_binds_and_the_runners_environment_are_visible(image, code, tmp_path, log_dir, monkeypatch):
    host_only = tmp_path / "host-only.txt"  # under /tmp, which Apptainer would share by default
    host_only.write_text("secret of the host")
    monkeypatch.setenv("EL_TEST_HOST_ONLY", "should not cross")
    (job,) = launch(
        inside, [{"i": 0, "probe": str(host_only), "cwd": os.getcwd()}], code, singularity_image=image
    )
    res = job.result(timeout=60)
    assert res["probe_visible"] is False  # --contain: the host's /tmp is not there
    assert res["cwd_visible"] is False  # nor the launch's working directory
    assert res["host_var"] is None  # --cleanenv


def test_non_code_dirs_read_only_by_default_writable_when_asked(image, code, tmp_path, log_dir, monkeypatch):
    ro, rw = tmp_path / "data-ro", tmp_path / "data-rw"
    for d in (ro, rw):
        d.mkdir()
        (d / "data.txt").write_text(f"data of {d.name}")
    write_config(
        tmp_path,
        monkeypatch,
        f"NON_CODE_DIRS_TO_MOUNT = [dict(local_dir={str(ro)!r}, mount_point='/data/ro'),\n"
        f"    dict(local_dir={str(rw)!r}, mount_point='/data/rw', read_only=False)]\n",
    )
    sweep = launch(
        write_into, [{"i": 0, "dir": "/data/ro"}, {"i": 1, "dir": "/data/rw"}], code, singularity_image=image
    )
    first, second = sweep.results(timeout=60)
    assert first == {"written": False, "errno": errno.EROFS, "read": "data of data-ro"}
    assert second == {"written": True, "read": "data of data-rw"}
    assert (rw / "from-1.txt").read_text() == "written by the run"
    assert not (ro / "from-0.txt").exists()


def test_singularity_pre_cmds_run_first_on_the_host(image, code, tmp_path, log_dir, monkeypatch):
    marker = tmp_path / "pre cmds ran"
    write_config(
        tmp_path,
        monkeypatch,
        f"SINGULARITY_PRE_CMDS = [{'touch ' + shlex.quote(str(marker))!r},\n"
        "    'export APPTAINERENV_EL_PRE=set-by-pre-cmds']\n",
    )
    (job,) = launch(inside, [{"i": 0}], code, singularity_image=image)
    assert job.result(timeout=60)["pre_var"] == "set-by-pre-cmds"
    assert marker.exists()
    assert not any("APPTAINERENV_EL_PRE" in w for w in job.manifest["backend"]["command"])


# -- stopping -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ignore_term", [False, True], ids=["cancel", "cancel-ignored"])
def test_cancel_a_running_container(ignore_term, image, code, log_dir):
    (job,) = launch(
        sleeper, [{"ignore_term": ignore_term}], code, singularity_image=image, skip_wait=True, cancel_grace=1
    )
    wait_for(lambda: (job.run_dir / "pid").exists(), 60, "the function to start")
    t0 = time.monotonic()
    job.cancel()
    assert job.wait(timeout=20) is State.CANCELLED
    message = records.read_status(job.run_dir)["message"]
    if ignore_term:
        assert time.monotonic() - t0 >= 1.0
        assert "killed (SIGKILL)" in message
    else:
        assert message == "RunInterrupted: interrupted by SIGTERM"
    wait_for(lambda: not processes_mentioning(str(job.run_dir)), 15, "the container's processes to be gone")
    assert not alive(int((job.run_dir / "pid").read_text()))


@pytest.mark.parametrize("ignore_usr2", [False, True], ids=["interrupted", "killed"])
def test_timeout_inside_the_container(ignore_usr2, image, code, log_dir):
    t0 = time.monotonic()
    (job,) = launch(
        sleeper, [{"ignore_usr2": ignore_usr2}], code, singularity_image=image, timeout=2, cancel_grace=1
    )
    assert job.wait(timeout=30) is State.TIMEOUT
    assert time.monotonic() - t0 < 20
    message = records.read_status(job.run_dir)["message"]
    if ignore_usr2:
        assert "did not stop within 1 s of the interrupt, so its processes were killed" in message
    else:
        assert message == "RunInterrupted: timeout of 2 s reached"
    assert "sleeping" in job.stdout()
    wait_for(lambda: not processes_mentioning(str(job.run_dir)), 15, "the container to be gone")


def test_with_block_stops_the_containers(image, code, log_dir):
    with pytest.raises(RuntimeError, match="leaving"):
        with launch(
            sleeper,
            [{}, {}, {}],
            code,
            singularity_image=image,
            skip_wait=True,
            max_parallel=2,
            variants_per_task=1,
        ) as sweep:
            wait_for(lambda: (sweep[0].run_dir / "pid").exists(), 60, "a run to start")
            raise RuntimeError("leaving the block")
    assert [Job.load(j.run_dir).state for j in sweep] == [State.CANCELLED] * 3
    exp_dir = str(sweep[0].run_dir.parent)
    assert processes_mentioning(exp_dir) == []  # no runner, no apptainer, no dispatcher


# -- bad input ----------------------------------------------------------------------------------


def test_missing_image_is_refused_before_anything_is_written(image, code, tmp_path, log_dir, run_dirs):
    missing = tmp_path / "nope.sif"
    with pytest.raises(FileNotFoundError, match="nope.sif"):
        launch(trivial, [{"i": 0}], code, singularity_image=str(missing))
    with pytest.raises(ValueError, match="needs an image"):
        launch(trivial, [{"i": 0}], code)
    assert run_dirs() == [] and not log_dir.exists()


def test_use_gpu_without_a_gpu_runtime_is_refused(image, code, log_dir, run_dirs):
    if LocalSingularityMode.gpu_available(None):
        pytest.skip("this machine has an NVIDIA driver")
    with pytest.raises(RuntimeError, match="no NVIDIA GPU runtime"):
        launch(trivial, [{"i": 0}], code, singularity_image=image, use_gpu=True)
    assert run_dirs() == [] and not log_dir.exists()


def test_use_gpu_adds_nv(image, code, log_dir, monkeypatch):
    # no GPU here: the device inventory is what is injected, the container runs for real
    monkeypatch.setattr(LocalSingularityMode, "gpu_available", lambda self: True)
    single = launch(trivial, [{"i": 0}], code, singularity_image=image, use_gpu=True)
    queued = launch(
        trivial, [{"i": i} for i in range(3)], code, singularity_image=image, use_gpu=True, max_parallel=1
    )
    assert single.results(timeout=60) == [0] and queued.results(timeout=120) == [0, 1, 2]
    assert single[0].manifest["backend"]["command"][1:3] == ["exec", "--nv"]
    assert [e["argv"][1:3] for e in queue_of(queued[0])["entries"]] == [["exec", "--nv"]] * 3
    assert all(j.manifest["backend"]["command"][1:3] == ["exec", "--nv"] for j in queued)


# -- images of another Python, or without Python ----------------------------------------------------

IMAGES = Path("/var/cache/easylaunch-test/images")  # root file systems scripts/services builds


@pytest.fixture(scope="module")
def sandboxes(tmp_path_factory):
    """Sandbox images unpacked from the harness's root file systems: Debian bullseye (another
    Python minor, with cloudpickle) and busybox (a shell, no Python)."""
    require_service("apptainer")
    out = {}
    for name in ("bullseye", "busybox"):
        tar = IMAGES / f"{name}.tar"
        if not tar.is_file():
            message = f"{tar} is missing (built by scripts/services/docker.sh start)"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
        root = tmp_path_factory.mktemp(f"sandbox-{name}")
        subprocess.run(["tar", "-xf", str(tar), "-C", str(root)], check=True)
        for d in ("dev", "proc", "sys", "tmp", "etc"):
            (root / d).mkdir(exist_ok=True)
        out[name] = str(root)
    return out


def test_other_python_image_runs_a_module_function_by_reference(sandboxes, tmp_path, log_dir):
    code = tmp_path / "proj"
    code.mkdir()
    (code / "sing_trainer.py").write_text(
        "import sys\n\n\ndef train(doodad_config, variant):\n"
        "    return {'python': '%d.%d' % sys.version_info[:2], 'lr': variant['lr']}\n"
    )
    sys.path.insert(0, str(code))
    try:
        import sing_trainer
    finally:
        sys.path.remove(str(code))
    image = sandboxes["bullseye"]
    sweep = launch(
        sing_trainer.train, [{"lr": 0.1}, {"lr": 0.2}], code, singularity_image=image, variants_per_task=2
    )
    results = sweep.results(timeout=120)
    other = results[0]["python"]
    assert other != "%d.%d" % sys.version_info[:2] and [r["lr"] for r in results] == [0.1, 0.2]
    assert sweep[0].manifest["transport"] == "reference" and sweep[0].manifest["target_python"] == other
    # a function pickled by value cannot cross minors: refused before anything is written
    with pytest.raises(Exception, match=f"Python {other}"):
        launch(inside, [{"i": 0}], code, singularity_image=image, exp_name="byvalue")
    assert not (log_dir / "byvalue").exists()


def test_image_without_python_is_refused(sandboxes, code, log_dir, run_dirs):
    with pytest.raises(RuntimeError, match="Python 3.8 or later"):
        launch(trivial, [{"i": 0}], code, singularity_image=sandboxes["busybox"])
    assert run_dirs() == []
