"""Runs never stuck, output never lost (issue 7 items 1, 3, 5, 6, 7, 10): the launcher killed at
each point of a launch (the failpoints of easylaunch.failpoints), Ctrl-C while run directories
are made, a function that dies right after printing, a full disk, crashed runs' exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cloudpickle
import pytest
from test_ssh import remote  # noqa: F401 - the SSH host fixture

from easylaunch import Job, State
from easylaunch.job import find_runs

pytestmark = [
    pytest.mark.filterwarnings("ignore:not in a git repository"),
    pytest.mark.filterwarnings("ignore:snapshot"),
]

# the job functions travel by value (container images have neither pytest nor this file)
cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: how long a run whose starter died may stay unfinished (the local modes poll every 0.5 s)
BOUND = 15.0

KILLED_LAUNCH = """
    import sys
    from easylaunch import run_sweep

    def quick(doodad_config, variant):
        return variant["i"] * 10

    mode, n, limit, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    opts = dict(variants_per_task=k) if k > 1 else {}
    run_sweep(quick, [{"i": i} for i in range(n)], exp_name="killed", mode=mode,
              max_parallel=limit, skip_wait=True, **opts)
    print("launched")
"""


def launch_with_failpoint(tmp_path, point: str, mode: str, n: int, limit: int, k: int = 1):
    script = tmp_path / "killed_launch.py"
    script.write_text(textwrap.dedent(KILLED_LAUNCH))
    env = dict(os.environ, EASYLAUNCH_FAILPOINT=point)
    return subprocess.run(
        [sys.executable, str(script), mode, str(n), str(limit), str(k)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=str(tmp_path),
    )


def settled_within(exp_dir: Path, bound: float) -> dict:
    """Poll every run of the experiment until each is terminal; {run name: state}. Directories
    the launcher made but never gave a manifest must end too (their status file says how)."""
    deadline = time.monotonic() + bound
    while True:
        jobs = [Job.load(p) for p in find_runs(exp_dir)]
        states = {j.run_dir.name: j.state for j in jobs}
        for d in exp_dir.iterdir() if exp_dir.is_dir() else ():
            if d.name not in states and (d / "status.json").exists():
                states[d.name] = State(json.loads((d / "status.json").read_text())["state"])
        if all(s.value in ("COMPLETED", "FAILED", "CANCELLED") for s in states.values()):
            return states
        if time.monotonic() > deadline:
            raise AssertionError(f"runs still unfinished {bound} s after the launcher died: {states}")
        time.sleep(0.1)


# -- item 1: the launcher dies at any moment of a local launch --------------------------------


@pytest.mark.parametrize(
    "point,mode,n,limit,k",
    [
        ("local.before_materialize", "local", 4, 2, 1),  # no manifest written yet
        ("local.after_materialize", "local", 4, 2, 1),  # dispatcher never started
        ("local.after_dispatcher_start", "local", 4, 2, 1),  # supervisor.json not yet its own
        ("local_pool.before_materialize", "local_pool", 4, 2, 1),
        ("local_pool.after_materialize", "local_pool", 4, 2, 1),  # supervisor never forked
        ("local_pool.after_fork", "local_pool", 4, 2, 1),
        ("local.before_materialize", "local", 4, 4, 2),  # packed tasks wait for payloads
        ("local.after_materialize", "local", 2, 2, 1),  # runners wait for the go byte
    ],
)
def test_launcher_killed_runs_end_within_a_bound(tmp_path, log_dir, point, mode, n, limit, k):
    proc = launch_with_failpoint(tmp_path, point, mode, n, limit, k)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    exp_dir = log_dir / "killed"
    began = time.monotonic()
    states = settled_within(exp_dir, BOUND)
    took = time.monotonic() - began
    assert states, "the launch made no run directory"
    # every directory made is listed (easylaunch ls, load_experiment), manifest or not
    assert sorted(states) == [p.name for p in find_runs(exp_dir)]
    for name, state in states.items():
        status = json.loads((exp_dir / name / "status.json").read_text())
        if state is State.COMPLETED:
            assert Job.load(exp_dir / name).result() == int(name[-3:]) * 10
        else:
            assert state is State.FAILED, (name, state)
            assert status["message"], status
    assert took < BOUND


# -- item 3: the launcher dies after sbatch, before the payloads ------------------------------

SLURM_CONFIG = 'SLURM_CONFIGS = {"cpu": {"partition": "debug", "time_in_mins": 10}}\n'

SLURM_KILLED = """
    import sys
    from easylaunch import run_sweep

    def quick(doodad_config, variant):
        return variant["i"]

    run_sweep(quick, [{"i": i} for i in range(3)], exp_name=sys.argv[1], mode="slurm",
              slurm_config_name="cpu", hold=sys.argv[2] == "hold", code_dirs_to_mount=[sys.argv[3]])
    print("launched")
"""


@pytest.fixture
def slurm_launch(tmp_path, monkeypatch, log_dir):
    """Run SLURM_KILLED with a failpoint; returns (CompletedProcess, exp dir); scancels what it left."""
    from conftest import require_service

    require_service("slurm")
    config = tmp_path / "config.py"
    config.write_text(SLURM_CONFIG)
    monkeypatch.setenv("EASYLAUNCH_CONFIG", str(config))
    code = tmp_path / "code"
    code.mkdir()
    script = tmp_path / "slurm_killed.py"
    script.write_text(textwrap.dedent(SLURM_KILLED))
    exp = f"lc{os.getpid()}x{int(time.time() * 1000) % 10**8}"
    arrays: list = []

    def launch(point: str, hold: bool):
        env = dict(os.environ, EASYLAUNCH_FAILPOINT=point)
        proc = subprocess.run(
            [sys.executable, str(script), exp, "hold" if hold else "run", str(code)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=str(tmp_path),
        )
        for rec in (log_dir / exp / ".batches").glob("*/launch.json"):
            arrays.extend({f["array_job_id"] for f in json.loads(rec.read_text())["backend"].values()})
        return proc, log_dir / exp

    yield launch
    if arrays:
        subprocess.run(["scancel", *arrays], capture_output=True, timeout=30)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "easylaunch.cli", *args], capture_output=True, text=True, timeout=60
    )


def squeue_has(array_id: str) -> bool:
    out = subprocess.run(
        ["squeue", "-h", "-j", array_id, "-o", "%i"], capture_output=True, text=True, timeout=30
    ).stdout
    return bool(out.strip())


def test_slurm_launcher_killed_after_sbatch_runs_are_seen_and_fail_fast(slurm_launch):
    proc, exp_dir = slurm_launch("slurm.before_materialize", hold=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    runs = find_runs(exp_dir)
    assert len(runs) == 3  # listed although no manifest was written
    assert not any((r / "manifest.json").exists() for r in runs)
    listing = cli("ls", exp_dir.name)
    assert listing.returncode == 0, listing.stderr
    assert all(r.name in listing.stdout for r in runs)
    jobs = [Job.load(r) for r in runs]
    array_id = jobs[0].manifest["backend"]["array_job_id"]
    began = time.monotonic()
    for job in jobs:
        assert job.wait(timeout=90) is State.FAILED
        assert "was never written" in job.status["message"], job.status
    # the tasks gave up at once (not after PAYLOAD_WAIT = 300 s): their slots are free
    deadline = time.monotonic() + 60
    while squeue_has(array_id):
        assert time.monotonic() < deadline, "the array still holds its slots"
        time.sleep(0.5)
    assert time.monotonic() - began < 90


def test_slurm_launcher_killed_after_sbatch_cancel_works(slurm_launch):
    proc, exp_dir = slurm_launch("slurm.before_materialize", hold=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    runs = find_runs(exp_dir)
    assert len(runs) == 3
    array_id = Job.load(runs[0]).manifest["backend"]["array_job_id"]
    assert squeue_has(array_id)
    out = cli("cancel", exp_dir.name)
    assert out.returncode == 0, out.stderr
    assert "cancel requested for 3 unfinished run(s) of 3" in out.stdout
    for r in runs:
        assert Job.load(r).wait(timeout=60) is State.CANCELLED
    deadline = time.monotonic() + 30
    while squeue_has(array_id):
        assert time.monotonic() < deadline, "scancel did not reach the array"
        time.sleep(0.5)


# -- item 10: a crashed run records its exit code or signal, on every mode ----------------------


def crash(doodad_config, variant):
    import ctypes
    import os
    import signal

    print("crashing", variant["how"], flush=True)
    if variant["how"] == "exit":
        os._exit(7)
    if variant["how"] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if variant["how"] == "segv":
        ctypes.string_at(0)
    return "survived"


CRASHES = [
    ({"how": "exit"}, "exit code 7", (7,)),
    ({"how": "kill"}, "killed by SIGKILL", (-9, 137)),
    ({"how": "segv"}, "killed by SIGSEGV", (-11, 139)),
]


def check_crashes(jobs) -> None:
    for job, (_variant, words, codes) in zip(jobs, CRASHES):
        assert job.wait(timeout=90) is State.FAILED
        status = job.status
        assert words in status["message"], status
        assert status["exit_code"] in codes, status


@pytest.mark.parametrize(
    "mode,options",
    [
        ("local", {}),  # one runner process per run, started by this launcher
        ("local", {"max_parallel": 1}),  # through the detached dispatcher
        ("local", {"variants_per_task": 3}),  # one packed task
        ("local_pool", {"max_parallel": 2}),
    ],
)
def test_crashed_run_records_its_exit_code_local_modes(log_dir, mode, options):
    from easylaunch import run_sweep

    sweep = run_sweep(crash, [v for v, _, _ in CRASHES], exp_name="crash", mode=mode, **options)
    check_crashes(sweep)


def test_crashed_single_local_run_records_its_exit_code(log_dir):
    from easylaunch import run_experiment

    for variant, words, codes in CRASHES:
        job = run_experiment(crash, exp_name="crash1", mode="local", variant=variant)
        assert job.state is State.FAILED
        assert words in job.status["message"] and job.status["exit_code"] in codes, job.status


@pytest.fixture
def code_dir(tmp_path):
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    return code


def test_crashed_run_records_its_exit_code_slurm(log_dir, tmp_path, monkeypatch, code_dir):
    from conftest import require_service

    from easylaunch import run_sweep

    require_service("slurm")
    config = tmp_path / "config.py"
    config.write_text(SLURM_CONFIG)
    monkeypatch.setenv("EASYLAUNCH_CONFIG", str(config))
    sweep = run_sweep(
        crash,
        [v for v, _, _ in CRASHES],
        exp_name=f"crash{os.getpid()}",
        mode="slurm",
        slurm_config_name="cpu",
        code_dirs_to_mount=[str(code_dir)],
    )
    try:
        check_crashes(sweep)
    finally:
        subprocess.run(["scancel", sweep[0].manifest["backend"]["array_job_id"]], capture_output=True)


@pytest.mark.parametrize("engine", ["docker", "podman"])
@pytest.mark.parametrize("packed", [False, True])
def test_crashed_run_records_its_exit_code_containers(log_dir, code_dir, engine, packed):
    from conftest import ENGINE_HOSTS, require_service

    from easylaunch import run_sweep

    require_service(engine)
    image = os.environ[
        {"docker": "EASYLAUNCH_TEST_DOCKER_IMAGE", "podman": "EASYLAUNCH_TEST_PODMAN_IMAGE"}[engine]
    ]
    sweep = run_sweep(
        crash,
        [v for v, _, _ in CRASHES],
        exp_name="crash",
        mode="docker",
        docker_image=image,
        docker_host=os.environ[ENGINE_HOSTS[engine]],
        code_dirs_to_mount=[str(code_dir)],
        **({"variants_per_task": 3} if packed else {}),
    )
    check_crashes(sweep)


def test_crashed_run_records_its_exit_code_ssh(remote, code_dir):  # noqa: F811 - the fixture
    from easylaunch import run_sweep

    sweep = run_sweep(
        crash,
        [v for v, _, _ in CRASHES],
        exp_name="crash",
        mode="ssh",
        ssh_host="test",
        max_parallel=3,
        code_dirs_to_mount=[str(code_dir)],
    )
    check_crashes(sweep)


def test_crashed_run_records_its_exit_code_local_singularity(log_dir, code_dir):
    from conftest import require_service

    from easylaunch import run_sweep

    require_service("apptainer")
    sweep = run_sweep(
        crash,
        [v for v, _, _ in CRASHES],
        exp_name="crash",
        mode="local_singularity",
        singularity_image=os.environ["EASYLAUNCH_TEST_SINGULARITY_IMAGE"],
        code_dirs_to_mount=[str(code_dir)],
    )
    check_crashes(sweep)


# -- item 6: what a run printed just before dying reaches its log and the terminal -------------

LAST_WORDS = r"""
import os, sys
from easylaunch import run_experiment

def fn(doodad_config, variant):
    for i in range(3000):
        print("line", i)          # no flush: os._exit right after
    os._exit(3)

job = run_experiment(fn, exp_name="lastwords", mode=sys.argv[1], variant={})
print("RUN_DIR", job.run_dir, flush=True)
"""


@pytest.mark.parametrize("mode", ["local", "local_pool"])
def test_output_of_a_run_that_dies_at_once_is_kept(log_dir, tmp_path, mode):
    script = tmp_path / "launch.py"
    script.write_text(LAST_WORDS)
    for _ in range(3):
        proc = subprocess.run(
            [sys.executable, str(script), mode], capture_output=True, text=True, timeout=120, cwd=tmp_path
        )
        run_dir = Path(proc.stdout.split("RUN_DIR ")[1].split()[0])
        assert Job.load(run_dir).wait(timeout=30) is State.FAILED
        logged = (run_dir / "stdout.log").read_text().splitlines()
        assert logged == [f"line {i}" for i in range(3000)], (len(logged), logged[-1:])
        shown = [line for line in proc.stdout.splitlines() if line.startswith("line ")]
        assert shown == logged, (len(shown), proc.stderr[-2000:])


# -- item 5: Ctrl-C or a kill while the run directories are made -------------------------------


@pytest.mark.parametrize(
    "mode,point",
    [
        ("local", "batch.create_dirs"),  # variant.json written, status.json not yet
        ("local", "local.before_materialize"),  # launch recorded, no manifest yet
        ("local_pool", "batch.create_dirs"),
        ("local_pool", "local_pool.before_materialize"),
        ("sss", "batch.create_dirs"),
    ],
)
def test_ctrl_c_while_run_directories_are_made_leaves_nothing(tmp_path, log_dir, mode, point):
    proc = launch_with_failpoint(tmp_path, point + ":interrupt", mode, 40, 2)
    # the interpreter ends a KeyboardInterrupt by re-raising SIGINT (3.8+), else with code 1
    assert proc.returncode in (1, -signal.SIGINT) and "KeyboardInterrupt" in proc.stderr, proc.stderr
    exp_dir = log_dir / "killed"
    left = sorted(p.name for p in exp_dir.iterdir() if not p.name.startswith(".")) if exp_dir.exists() else []
    assert left == [], left
    assert not [p for p in (exp_dir / ".batches").rglob("*") if p.is_file()] if exp_dir.exists() else True


def test_half_made_directories_of_a_killed_launch_are_shown_and_cleaned(tmp_path, log_dir):
    from easylaunch import cli

    proc = launch_with_failpoint(tmp_path, "batch.create_dirs", "local", 6, 2)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    exp_dir = log_dir / "killed"
    made = sorted(p for p in exp_dir.iterdir() if not p.name.startswith("."))
    assert len(made) == 6 and all((d / "variant.json").exists() for d in made)
    assert find_runs(exp_dir) == []  # no manifest, no launch record: no run will ever start there
    old = time.time() - 3600
    for d in made:  # a launch still writing its directories is left alone: make these old
        for f in [*d.iterdir(), d]:
            os.utime(f, (old, old))
    ls = subprocess.run(
        [sys.executable, "-m", "easylaunch.cli", "--log-dir", str(log_dir), "ls", "killed"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "6 half-made run directories" in ls.stderr and "easylaunch clean killed" in ls.stderr, ls.stderr
    assert cli.main(["--log-dir", str(log_dir), "clean", "killed", "--dry-run"]) == 0
    assert all(d.exists() for d in made)
    assert cli.main(["--log-dir", str(log_dir), "clean", "killed"]) == 0
    assert not any(d.exists() for d in made)


# -- item 7: the log dir fills up during a sweep ------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only: skipped elsewhere), unmounted afterwards."""
    where = tmp_path / "small-disk"
    where.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def sleeps_then_returns(doodad_config, variant):
    print("started", variant["i"], flush=True)
    time.sleep(variant["s"])
    return variant["i"]


def test_a_full_log_dir_keeps_state_queries_working(small_disk, capfd):
    from easylaunch import cli, run_sweep

    logs = small_disk / "logs"
    variants = [{"i": i, "s": 2.0 if i < 2 else 0.05} for i in range(6)]
    sweep = run_sweep(
        sleeps_then_returns,
        variants,
        exp_name="full",
        mode="local",
        base_log_dir=str(logs),
        max_parallel=2,
        skip_wait=True,
        code_dirs_to_mount=[],
    )
    wait_deadline = time.monotonic() + 20
    while sweep.counts().get("RUNNING", 0) < 2 and time.monotonic() < wait_deadline:
        time.sleep(0.05)
    filler = small_disk / "filler"
    with pytest.raises(OSError, match="No space left"):
        with open(filler, "wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    # the two running runs cannot write their results, the queued ones cannot start: every
    # query still answers (nothing raises ENOSPC) and every run ends within the bound
    deadline = time.monotonic() + BOUND
    while time.monotonic() < deadline and not all(s.value == "FAILED" for s in sweep.states()):
        time.sleep(0.2)
    assert [s.value for s in sweep.states()] == ["FAILED"] * 6
    assert sum(sweep.counts().values()) == 6
    assert cli.main(["--log-dir", str(logs), "ls", "full"]) == 0
    assert cli.main(["--log-dir", str(logs), "status", sweep[0].run_dir.name]) == 0
    err = capfd.readouterr().err
    assert "cannot record FAILED" in err and "No space left on device" in err, err
    # once there is room again, the next poll records what it could only report
    filler.unlink()
    for job in sweep:
        assert Job.load(job.run_dir).state is State.FAILED
        status = json.loads((job.run_dir / "status.json").read_text())
        assert status["state"] == "FAILED" and status["message"], status
