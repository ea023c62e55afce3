"""Modes ``sss`` and ``htp``: self-contained bundles, run for real on this machine's Slurm.

The "cluster" is a copy of the bundle in another directory: the original bundle and the launch
script's source are removed or edited before it runs, and its runner is a Python without
easylaunch or cloudpickle (/usr/bin/python3 where that is the same minor version), so a run can
only succeed from what the bundle carries. Results are copied to a third directory and brought
back with ``easylaunch collect``. htp runs ``tests/bin/ht_helper.sh``, a stand-in for BRC's
unpublished site script, inside the real allocation.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import require_service
from shellfakes import sbatch_directive_args
from txlog_checks import check_complete

from easylaunch import Job, JobError, State, load_experiment, records, run_sweep
from easylaunch.bundle import BundleError, collect
from easylaunch.packs import unpack_runs
from easylaunch.slurm_config import SlurmConfigError

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore:not in a git repository")]

HERE = Path(__file__).resolve().parent
TEST_BIN = HERE / "bin"
TERMINAL = {State.COMPLETED, State.FAILED, State.CANCELLED, State.TIMEOUT, State.PREEMPTED}

PROJECT_LIB = """
import os, sys
TAG = "original"

def work(doodad_config, variant):
    print("working on", variant["x"], "in", doodad_config.base_log_dir)
    print("to stderr", variant["x"], file=sys.stderr)
    with open(os.path.join(doodad_config.base_log_dir, "out.txt"), "w") as f:
        f.write("output of %d\\n" % variant["x"])
    return {
        "y": variant["x"] * 10,
        "tag": TAG,
        "pre": os.environ.get("EL_PRE_MARK"),
        "python": sys.executable,
        "cloudpickle": sys.modules["cloudpickle"].__file__,
    }
"""

LAUNCH = """
import sys
from easylaunch import run_sweep, grid
from mylib import work
mode, opts = sys.argv[1], eval(sys.argv[2])
sweep = run_sweep(work, grid({{"x": [1, 2, 3]}}), exp_name={exp!r}, mode=mode, **opts)
print("STATES", [s.value for s in sweep.states()])
print("BUNDLE", sweep[0].manifest["backend"]["bundle"])
"""


HOSTILE_COMMENT = 'it\'s "q" #1 $(touch PWNED) `x` back\\slash ü'
HOSTILE_FLAGS = "--comment=" + shlex.quote(HOSTILE_COMMENT)


def slurm_comment(job_id: str) -> str:
    """The Comment Slurm holds for a job (``scontrol show job`` keeps finished jobs MinJobAge s)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.strip().startswith("Comment="):
            return line.strip()[len("Comment=") :]
    raise AssertionError(f"no Comment in scontrol show job {job_id}:\n{out}")


def plain_python() -> str:
    """A Python of this minor version without easylaunch and cloudpickle, if there is one."""
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if not os.path.exists(cand):
            continue
        probe = subprocess.run(
            [cand, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            env={"PATH": "/usr/bin:/bin"},
        )
        if probe.stdout.strip() == "%d.%d" % sys.version_info[:2]:
            return cand
    return "python3"


def make_project(root: Path, exp: str) -> Path:
    root.mkdir(parents=True)
    (root / "mylib.py").write_text(PROJECT_LIB)
    (root / "launch.py").write_text(LAUNCH.format(exp=exp))
    return root


def launch(project: Path, mode: str, env: dict, **opts) -> Path:
    """Run the project's launch script; returns the bundle directory it wrote."""
    full = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full.update(env)
    proc = subprocess.run(
        [sys.executable, "launch.py", mode, repr(opts)],
        cwd=project,
        capture_output=True,
        text=True,
        env=full,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "STATES ['GENERATED', 'GENERATED', 'GENERATED']" in proc.stdout, proc.stdout
    assert "submitted nothing: wrote bundle" in proc.stderr
    return Path(proc.stdout.split("BUNDLE ", 1)[1].split("\n", 1)[0])


def ship(bundle: Path, cluster: Path, project: Path) -> Path:
    """Copy the bundle to the 'cluster', then make the laptop's copies unusable."""
    cluster.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(bundle, cluster, symlinks=True)
    shutil.rmtree(bundle)
    (project / "mylib.py").write_text("raise ImportError('live code must not be used on the cluster')\n")
    return cluster


def submit(bundle: Path, env: dict, *args: str) -> str:
    full = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    full.update(env)
    proc = subprocess.run(
        ["bash", str(bundle / "submit.sh"), *args],
        cwd="/",
        capture_output=True,
        text=True,
        env=full,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def wait_states(run_dirs, timeout: float = 180.0) -> dict:
    """Poll status.json files until every run is terminal."""
    deadline = time.monotonic() + timeout
    while True:
        states = {d: records.read_status(d).get("state") for d in run_dirs}
        if all(s in TERMINAL for s in states.values()):
            return states
        if time.monotonic() > deadline:
            queue = subprocess.run(["squeue"], capture_output=True, text=True).stdout
            raise AssertionError(f"runs not finished after {timeout} s: {states}\nsqueue:\n{queue}")
        time.sleep(0.5)


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = dict(os.environ)
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "easylaunch.cli", *args], capture_output=True, text=True, env=full, timeout=60
    )


def tmp_entries() -> set:
    return {n for n in os.listdir("/tmp") if not n.startswith("pytest-of-")}


def check_generated(log_dir: Path, exp: str, bundle: Path) -> list:
    """Local runs are GENERATED, wait() says why, payloads are private, the bundle holds them."""
    sweep = load_experiment(exp)
    assert len(sweep) == 3 and sweep.states() == [State.GENERATED] * 3
    with pytest.raises(JobError, match="GENERATED.*submit"):
        sweep[0].wait(timeout=1)
    packs = sorted((bundle / "jobs" / "runs").glob("pack_*.tar"))
    assert packs and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in packs)
    import tarfile

    members = {m.name for p in packs for m in tarfile.open(p).getmembers()}
    for job in sweep:
        assert stat.S_IMODE((job.run_dir / records.PAYLOAD).stat().st_mode) == 0o600
        # the bundle holds no run directory: the task makes it from its pack, with no status
        # (the runner takes the run as PENDING)
        assert not (bundle / "logs" / exp / job.run_dir.name).exists()
        name = job.run_dir.name
        assert {
            f"{name}/{records.PAYLOAD}",
            f"{name}/{records.MANIFEST}",
            f"{name}/{records.VARIANT}",
        } <= members
        assert f"{name}/{records.STATUS}" not in members
        assert job.manifest["backend"]["bundle"] == str(bundle)
    text = (bundle / "README.txt").read_text()
    for needle in ("rsync -a", "submit.sh", "easylaunch collect", str(bundle)):
        assert needle in text
    for script in [bundle / "submit.sh", *bundle.glob("jobs/*.s*")]:
        syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert syntax.returncode == 0, (script, syntax.stderr)
    return list(sweep)


def check_collected(jobs: list, back: Path, log_dir: Path, exp: str, python: str) -> None:
    proc = cli("collect", str(back))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "completed=3" in proc.stdout and "updated=3" in proc.stdout, proc.stdout
    for job in jobs:
        again = Job.load(job.run_dir)
        assert again.state is State.COMPLETED
        x = again.variant["x"]
        result = again.result()
        assert result["y"] == x * 10 and result["tag"] == "original"
        # the runner's cloudpickle came from the bundle, its Python is the cluster's
        assert ".snapshots/cloudpickle-" in result["cloudpickle"], result
        if python.startswith("/"):
            assert result["python"] == python
        assert f"working on {x}" in again.stdout() and f"to stderr {x}" in again.stderr()
        assert (again.run_dir / "out.txt").read_text() == f"output of {x}\n"
        history = [h[0] for h in again.status["history"]]
        assert history[:2] == ["PENDING", "GENERATED"] and history[-2:] == ["RUNNING", "COMPLETED"]
    # the transaction log: SUBMITTED/GENERATED here, the runs' own lines came back with them
    rows = check_complete(jobs[0].run_dir.parent, [j.run_dir for j in jobs])
    assert len(rows) == 3
    ls = cli("ls", exp)
    assert ls.stdout.count("COMPLETED") == 3, ls.stdout
    # collecting again changes nothing
    proc = cli("collect", str(back))
    assert "unchanged=3" in proc.stdout, proc.stdout


# -- sss on the real Slurm ------------------------------------------------------------------------


def test_sss_bundle_runs_on_slurm_from_a_copy(tmp_path, log_dir):
    require_service("slurm")
    exp = "sss_demo"
    project = make_project(tmp_path / "proj", exp)
    python = plain_python()
    config = tmp_path / "config.py"
    config.write_text(
        f'SLURM_CONFIGS = {{"cpu": {{"partition": "debug", "time_in_mins": 5, "extra_flags": {HOSTILE_FLAGS!r}}}}}\n'
        'SSS_PRE_CMDS = ["export EL_PRE_MARK=\\"pre ran: $SLURM_JOB_NAME\\""]\n'
    )
    env = {"EASYLAUNCH_CONFIG": str(config)}
    before = tmp_entries()
    bundle = launch(project, "sss", env, variants_per_task=2, python=python)
    assert tmp_entries() - before == set()
    jobs = check_generated(log_dir, exp, bundle)
    tasks = json.loads((bundle / "jobs" / "tasks.json").read_text())
    assert [len(g) for g in tasks["groups"]] == [2, 1]
    assert all(p.startswith("../logs/") for g in tasks["groups"] for p in g)

    # the cluster: a path with a space and a '$', nothing of the laptop reachable
    cluster = ship(bundle, tmp_path / "clu ster $HOME" / "b", project)
    before = tmp_entries()
    out = submit(cluster, {})
    assert "submitted 3 run(s)" in out
    job_id = (cluster / "submitted.txt").read_text().split()[0]
    assert slurm_comment(job_id) == HOSTILE_COMMENT
    runs = [cluster / "logs" / exp / j.run_dir.name for j in jobs]
    states = wait_states(runs)
    assert set(states.values()) == {"COMPLETED"}, [(d, records.read_status(d)) for d in runs]
    assert tmp_entries() - before == set()
    assert list((cluster / "logs" / exp / ".batches").glob("*/slurm/*.out"))
    # the runs saw SSS_PRE_CMDS; the bundle refuses a second submission
    again = subprocess.run(["bash", str(cluster / "submit.sh")], capture_output=True, text=True)
    assert again.returncode == 2 and "submitted already" in again.stderr

    back = tmp_path / "back"
    shutil.copytree(cluster / "logs", back)
    check_collected(jobs, back, log_dir, exp, python)
    assert Job.load(jobs[0].run_dir).result()["pre"] == "pre ran: sss_demo"


def test_sss_from_a_source_checkout_without_installing(tmp_path, log_dir):
    """``python launch.py`` with the checkout on PYTHONPATH (nothing installed): the templates
    load from the checkout's templates/, the bundle runs on Slurm, the checkout stays clean."""
    require_service("slurm")
    checkout = HERE.parent
    if not (checkout / "templates" / "__init__.py").is_file():
        pytest.skip("not run from a checkout")
    before = {p.name for p in checkout.iterdir()}
    exp = "sss_checkout"
    project = make_project(tmp_path / "proj", exp)
    (project / "which.py").write_text("import easylaunch; print('EASYLAUNCH', easylaunch.__file__)\n")
    config = tmp_path / "config.py"
    config.write_text('SLURM_CONFIGS = {"cpu": {"partition": "debug", "time_in_mins": 5}}\n')
    env = {"EASYLAUNCH_CONFIG": str(config), "PYTHONPATH": str(checkout)}
    which = subprocess.run(
        [sys.executable, "which.py"], cwd=project, capture_output=True, text=True, env={**os.environ, **env}
    )
    assert f"EASYLAUNCH {checkout / 'easylaunch' / '__init__.py'}" in which.stdout, (
        which.stdout + which.stderr
    )
    bundle = launch(project, "sss", env, python=plain_python())
    cluster = ship(bundle, tmp_path / "cluster" / "b", project)
    assert "submitted 3 run(s)" in submit(cluster, {})
    runs = [cluster / "logs" / exp / j.run_dir.name for j in load_experiment(exp)]
    states = wait_states(runs)
    assert set(states.values()) == {"COMPLETED"}, [(d, records.read_status(d)) for d in runs]
    assert {p.name for p in checkout.iterdir()} == before


# -- htp on the real Slurm, with the ht_helper.sh stand-in ---------------------------------------


def test_htp_bundle_runs_with_ht_helper(tmp_path, log_dir):
    require_service("slurm")
    exp = "htp_demo"
    project = make_project(tmp_path / "proj", exp)
    python = plain_python()
    config = tmp_path / "config.py"
    config.write_text(
        'SLURM_CONFIGS = {"cpu": {"partition": "debug", "time_in_mins": 5, "max_num_cores_per_node": 2,\n'
        '                         "extra_flags": "--comment=\'two words\'"}}\n'
    )
    env = {"EASYLAUNCH_CONFIG": str(config)}
    before = tmp_entries()
    bundle = launch(project, "htp", env, python=python, ht_helper_modules="python/3.11 gcc")
    assert tmp_entries() - before == set()
    jobs = check_generated(log_dir, exp, bundle)
    lines = (bundle / "jobs" / "taskfile.txt").read_text().splitlines()
    assert lines == [
        f"bash jobs/run_task.sh logs/{exp}/{j.run_dir.name}/payload.pkl jobs/runs/pack_{i:03d}.tar"
        for i, j in enumerate(jobs)
    ]
    job_script = (bundle / "jobs" / "htp.sbatch").read_text()
    for needle in (
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=2",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --partition=debug",
        "#SBATCH --time=5",
        "ht_helper.sh -m 'python/3.11 gcc' -t \"$TASKFILE\"",
        "if command -v module >/dev/null 2>&1; then",
    ):
        assert needle in job_script, needle

    cluster = ship(bundle, tmp_path / "cluster" / "h", project)
    before = tmp_entries()
    out = submit(cluster, {"PATH": f"{TEST_BIN}:{os.environ['PATH']}"})
    assert "submitted 3 run(s)" in out and "(2 at once)" in out
    job_id = (cluster / "submitted.txt").read_text().strip()
    assert slurm_comment(job_id) == "two words"  # issue 7 item 15: sbatch took the directive
    runs = [cluster / "logs" / exp / j.run_dir.name for j in jobs]
    states = wait_states(runs)
    assert set(states.values()) == {"COMPLETED"}, [(d, records.read_status(d)) for d in runs]
    assert tmp_entries() - before == set()
    slurm_out = next((cluster / "logs" / exp / ".batches").glob("*/slurm/*.out")).read_text()
    assert "3 task(s), 2 at once, 0 failed (modules: python/3.11 gcc)" in slurm_out

    back = tmp_path / "back"
    shutil.copytree(cluster / "logs" / exp, back / exp)
    check_collected(jobs, back, log_dir, exp, python)


def test_htp_with_configured_cluster_paths(tmp_path, log_dir):
    """SSS_LOG_DIR, SLURM_DIRECTORY_FOR_JOB_SCRIPT and TASKFILE_PATH_ON_BRC make the paths absolute."""
    require_service("slurm")
    exp = "htp_paths"
    project = make_project(tmp_path / "proj", exp)
    remote = tmp_path / "remote"
    config = tmp_path / "config.py"
    config.write_text(
        textwrap.dedent(
            f"""
            SLURM_CONFIGS = {{"small": {{"partition": "debug", "time_in_mins": 5, "max_num_cores_per_node": 8}}}}
            SSS_LOG_DIR = {str(remote / "scratch" / "logs")!r}
            SLURM_DIRECTORY_FOR_JOB_SCRIPT = {str(remote / "launch")!r}
            TASKFILE_PATH_ON_BRC = {str(remote / "scratch" / "taskfile_from_doodad.sh")!r}
            """
        )
    )
    env = {"EASYLAUNCH_CONFIG": str(config)}
    bundle = launch(project, "htp", env, python=plain_python(), slurm_config_name="small")
    jobs = [Job.load(d) for d in sorted((log_dir / exp).iterdir()) if records.is_run_dir(d)]
    name = jobs[0].manifest["backend"]["bundle_name"]
    lines = (bundle / "jobs" / "taskfile.txt").read_text().splitlines()
    assert lines[0] == (
        f"bash {remote}/launch/{name}/jobs/run_task.sh {remote}/scratch/logs/{exp}/{jobs[0].run_dir.name}/payload.pkl"
        f" {remote}/launch/{name}/jobs/runs/pack_000.tar"
    )
    assert "#SBATCH --ntasks=3" in (bundle / "jobs" / "htp.sbatch").read_text()

    # copied anywhere else, submit.sh refuses (the taskfile names the configured path)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(bundle, elsewhere)
    wrong = subprocess.run(["bash", str(elsewhere / "submit.sh")], capture_output=True, text=True)
    assert wrong.returncode == 2 and "SLURM_DIRECTORY_FOR_JOB_SCRIPT" in wrong.stderr

    cluster = ship(bundle, remote / "launch" / name, project)
    submit(cluster, {"PATH": f"{TEST_BIN}:{os.environ['PATH']}"})
    assert (remote / "scratch" / "taskfile_from_doodad.sh").read_text() == "\n".join(lines) + "\n"
    runs = [remote / "scratch" / "logs" / exp / j.run_dir.name for j in jobs]
    assert set(wait_states(runs).values()) == {"COMPLETED"}
    sweep = collect(remote / "scratch" / "logs" / exp)
    assert [j.run_dir for j in sweep] == [j.run_dir for j in jobs]
    assert [a.action for a in sweep.collected] == ["updated"] * 3
    assert sorted(r["y"] for r in sweep.results()) == [10, 20, 30]


# -- sss inside the Apptainer image ---------------------------------------------------------------


def test_sss_bundle_in_apptainer_image(tmp_path, log_dir):
    require_service("slurm")
    require_service("apptainer")
    image = os.environ["EASYLAUNCH_TEST_SINGULARITY_IMAGE"]
    exp = "sss_image"
    Path(os.environ["HOME"]).mkdir(exist_ok=True)
    project = make_project(tmp_path / "proj", exp)
    config = tmp_path / "config.py"
    config.write_text(
        textwrap.dedent(
            f"""
            SLURM_CONFIGS = {{"cpu": {{"partition": "debug", "time_in_mins": 5}}}}
            SSS_CPU_IMAGE = {image!r}
            SSS_PRE_CMDS = ['if [ -d /.singularity.d ]; then export EL_PRE_MARK=container; else export EL_PRE_MARK=host; fi']
            """
        )
    )
    env = {"EASYLAUNCH_CONFIG": str(config)}
    bundle = launch(project, "sss", env, max_parallel=3)
    script = (bundle / "jobs" / "sss_000000.sbatch").read_text()
    assert f'-B "$BUNDLE" {image} /bin/bash -c' in script
    assert "#SBATCH --array=0-2%3" in script
    jobs = [Job.load(d) for d in sorted((log_dir / exp).iterdir()) if records.is_run_dir(d)]
    cluster = ship(bundle, tmp_path / "cluster" / "i", project)
    submit(cluster, {})
    runs = [cluster / "logs" / exp / j.run_dir.name for j in jobs]
    states = wait_states(runs)
    assert set(states.values()) == {"COMPLETED"}, [(d, records.read_status(d)) for d in runs]
    sweep = collect(cluster)
    results = sweep.results()
    assert sorted(r["y"] for r in results) == [10, 20, 30]
    assert {r["pre"] for r in results} == {"container"}  # SSS_PRE_CMDS ran inside the image
    assert all(r["python"].startswith("/usr/bin/python3") for r in results)
    # whatever cloudpickle the image has, the runner used the launcher's, from the bundle
    assert all(".snapshots/cloudpickle-" in r["cloudpickle"] for r in results)


# -- bad input: refused before anything is written ------------------------------------------------


def nothing(doodad_config, variant):
    return None


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    def _write(text: str) -> Path:
        path = tmp_path / "easylaunch_config.py"
        path.write_text(textwrap.dedent(text))
        monkeypatch.setenv("EASYLAUNCH_CONFIG", str(path))
        return path

    return _write


def code_dir(tmp_path: Path) -> str:
    path = tmp_path / "code"
    path.mkdir(exist_ok=True)
    (path / "helpers.py").write_text("X = 1\n")
    return str(path)


def assert_nothing_written(log_dir: Path) -> None:
    written = [p for p in log_dir.rglob("*") if p.name != ".snapshots"] if log_dir.exists() else []
    assert not [p for p in written if ".snapshots" not in p.parts], written


@pytest.mark.parametrize("mode", ["sss", "htp"])
def test_bad_input_is_refused_before_writing(mode, log_dir, config_file):
    config_file(
        """
        SLURM_CONFIGS = {"cpu": {"partition": "debug", "max_num_cores_per_node": 4},
                         "big": {"partition": "debug", "max_num_cores_per_node": 4, "time_in_mins": 60}}
        """
    )
    variants = [{"x": 1}, {"x": 2}]
    with pytest.raises(SlurmConfigError, match=r"unknown slurm_config_name 'huge'.*big, cpu"):
        run_sweep(nothing, variants, exp_name="bad", mode=mode, slurm_config_name="huge")
    with pytest.raises(SlurmConfigError, match=r"time_in_mins='1h' is not a time limit"):
        run_sweep(nothing, variants, exp_name="bad", mode=mode, time_in_mins="1h")
    with pytest.raises(
        SlurmConfigError, match="use_gpu=True but slurm config 'gpu'|unknown slurm_config_name 'gpu'"
    ):
        run_sweep(nothing, variants, exp_name="bad", mode=mode, use_gpu=True)
    other = "ht_helper_modules" if mode == "sss" else "variants_per_task"
    with pytest.raises(TypeError, match=rf"option '{other}' is not used by mode '{mode}'"):
        run_sweep(nothing, variants, exp_name="bad", mode=mode, **{other: "x" if mode == "sss" else 2})
    with pytest.raises(TypeError, match="did you mean 'slurm_config_name'"):
        run_sweep(nothing, variants, exp_name="bad", mode=mode, slurm_config_nam="big")
    with pytest.raises(ValueError, match="option python="):
        run_sweep(nothing, variants, exp_name="bad", mode=mode, python="")
    with pytest.raises(ValueError, match="signal_before_timeout=0"):
        run_sweep(nothing, variants, exp_name="bad", mode=mode, signal_before_timeout=0)
    assert_nothing_written(log_dir)


def test_bad_config_paths_and_htp_sizing(log_dir, config_file):
    config_file(
        """
        SLURM_CONFIGS = {"cpu": {"partition": "debug"}}
        SSS_LOG_DIR = "~/scratch/logs"
        """
    )
    with pytest.raises(BundleError, match=r"SSS_LOG_DIR = '~/scratch/logs' must be an absolute path"):
        run_sweep(nothing, [{"x": 1}], exp_name="bad", mode="sss")
    config_file('SLURM_CONFIGS = {"cpu": {"partition": "debug"}}\n')
    with pytest.raises(SlurmConfigError, match="needs max_num_cores_per_node"):
        run_sweep(nothing, [{"x": 1}], exp_name="bad", mode="htp")
    with pytest.raises(ValueError, match="variants_per_task=0"):
        run_sweep(nothing, [{"x": 1}], exp_name="bad", mode="sss", variants_per_task=0)
    assert_nothing_written(log_dir)


# -- without Slurm: quoting, layout, collect rules -------------------------------------------------


def test_values_reaching_a_shell_are_quoted(tmp_path, log_dir, config_file):
    image = "/images/my image;rm -rf ~.sif"
    config_file(
        """
        SLURM_CONFIGS = {"cpu": {"partition": "debug", "max_num_cores_per_node": 2}}
        BRC_EXTRA_SINGULARITY_ARGS = "--writable -B '/a b:/c'"
        SSS_NON_CODE_DIRS_TO_MOUNT = [dict(local_dir="/data/x y", mount_point="/mnt/$d")]
        """
    )
    sweep = run_sweep(
        nothing,
        [{"x": 1}, {"x": 2}],
        exp_name="quoted",
        mode="htp",
        singularity_image=image,
        python="/opt/py thon/bin/python3",
        ht_helper_modules='python/3.11 "x"',
        code_dirs_to_mount=[code_dir(tmp_path)],
    )
    bundle = Path(sweep[0].manifest["backend"]["bundle"])
    task = (bundle / "jobs" / "run_task.sh").read_text()
    assert "'/images/my image;rm -rf ~.sif'" in task
    assert "--writable -B '/a b:/c'" in task and "-B '/data/x y:/mnt/$d'" in task
    assert "'/opt/py thon/bin/python3' -m easylaunch.runner" in task
    job = (bundle / "jobs" / "htp.sbatch").read_text()
    assert 'ht_helper.sh -m \'python/3.11 "x"\' -t "$TASKFILE"' in job
    for script in (bundle / "submit.sh", bundle / "jobs" / "run_task.sh", bundle / "jobs" / "htp.sbatch"):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert sweep.states() == [State.GENERATED, State.GENERATED]
    # cancel can only mark the local runs
    sweep.cancel()
    assert sweep.states() == [State.CANCELLED, State.CANCELLED]
    assert "scancel" in sweep[0].status["message"]


@pytest.mark.parametrize("flags", ["--comment='two words'", "--comment 'two words' --qos normal --nice=-5"])
def test_htp_and_sss_write_the_same_sbatch_directives(flags, tmp_path, log_dir, config_file):
    """Issue 7 item 15: one renderer of #SBATCH lines; sbatch reads back what the config says."""
    config_file(
        f"""
        SLURM_CONFIGS = {{"cpu": {{"partition": "debug", "max_num_cores_per_node": 2, "extra_flags": {flags!r}}}}}
        """
    )
    wanted = shlex.split(flags)
    read = {}
    for mode in ("sss", "htp"):
        sweep = run_sweep(
            nothing, [{"x": 1}], exp_name=f"flags_{mode}", mode=mode, code_dirs_to_mount=[code_dir(tmp_path)]
        )
        (script,) = Path(sweep[0].manifest["backend"]["bundle"]).glob("jobs/*.sbatch")
        args = sbatch_directive_args(script.read_text())
        assert args[-len(wanted) :] == wanted, (mode, args)
        read[mode] = args[-len(wanted) :]
    assert read["sss"] == read["htp"]


def test_collect_rules(tmp_path, log_dir):
    sweep = run_sweep(
        nothing, [{"x": 1}, {"x": 2}], exp_name="rules", mode="sss", code_dirs_to_mount=[code_dir(tmp_path)]
    )
    bundle = Path(sweep[0].manifest["backend"]["bundle"])
    copies = [bundle / "logs" / "rules" / j.run_dir.name for j in sweep]
    # nothing ran yet: collect leaves GENERATED alone
    c = collect(bundle)
    assert [x.action for x in c.collected] == ["not started"] * 2
    assert c.states() == [State.GENERATED] * 2
    # the tasks make their runs' directories from the packs, as on the cluster
    tasks = json.loads((bundle / "jobs" / "tasks.json").read_text())
    for group, pack in zip(tasks["groups"], tasks["packs"]):
        unpack_runs(bundle / "jobs" / pack, [(bundle / "jobs" / p).resolve().parent for p in group])
    assert all((d / records.PAYLOAD).exists() for d in copies)
    c = collect(bundle)
    assert [x.action for x in c.collected] == ["not started"] * 2
    # one run finished on the "cluster", the other is running
    records.write_status(copies[0], State.RUNNING, attempt=1, started=time.time())
    (copies[0] / "result.pkl").write_bytes(__import__("cloudpickle").dumps(42))
    records.write_status(copies[0], State.COMPLETED, ended=time.time(), exit_code=0)
    records.write_status(copies[1], State.RUNNING, attempt=1, started=time.time())
    c = collect(bundle)
    assert [x.action for x in c.collected] == ["updated", "updated"]
    assert c.states() == [State.COMPLETED, State.RUNNING]
    assert c[0].result() == 42
    # a stale copy (still RUNNING) never turns a finished local run back
    stale = tmp_path / "stale" / "rules" / copies[0].name
    shutil.copytree(copies[0], stale)
    records.write_status(stale, State.RUNNING)
    c = collect(tmp_path / "stale")
    assert [x.action for x in c.collected] == ["kept local"] and c.states() == [State.COMPLETED]
    # in the log dir already: in place; to another log dir: new copies
    c = collect(log_dir / "rules")
    assert {x.action for x in c.collected} == {"in place"}
    other = tmp_path / "other-logs"
    c = collect(bundle, base_log_dir=str(other))
    assert [j.run_dir.parent for j in c] == [other / "rules"] * 2 and c[0].result() == 42
    with pytest.raises(FileNotFoundError, match="no run directories"):
        collect(tmp_path / "work")


def test_bundle_snapshot_leaves_out_secrets_and_honours_snapshot_exclude(tmp_path, log_dir, config_file):
    import tarfile

    config_file('SNAPSHOT_EXCLUDE = ["scratch.py"]\n')
    code = Path(code_dir(tmp_path))
    secret = "s3" + "cr3t"  # this file's source travels in the payload: the joined value must not
    (code / ".env").write_text(f"TOKEN={secret}\n")
    (code / "scratch.py").write_text("S = 1\n")
    with pytest.warns(UserWarning, match=r"left out 1 file that look like secrets.*\.env"):
        sweep = run_sweep(nothing, [{"x": 1}], exp_name="snap", mode="sss", code_dirs_to_mount=[str(code)])
    bundle = Path(sweep[0].manifest["backend"]["bundle"])
    archives = [p for p in bundle.rglob("*.tar.gz")]
    assert archives, sorted(bundle.rglob("*"))
    names = [m.name for a in archives for m in tarfile.open(a).getmembers()]
    assert "code/code/helpers.py" in names, names
    assert not [n for n in names if n.endswith((".env", "scratch.py"))], names
    assert not [p for p in bundle.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_packs_round_trip_share_git_files_and_never_overwrite(tmp_path):
    import tarfile

    from easylaunch import packs

    src = tmp_path / "local"
    shared = tmp_path / "shared.diff"
    shared.write_text("diff --git a/x b/x\n")
    long_name = "ü-" + "d" * 120 + ".diff"  # a PAX header
    runs = []
    for i in range(3):
        d = src / f"20261202-000000.000_abcdef_{i:03d}"
        (d / "git").mkdir(parents=True)
        for name in ("manifest.json", "variant.json", "payload.pkl"):
            (d / name).write_bytes(f"{name} {i}".encode())
        os.link(shared, d / "git" / "0-proj.diff")  # a batch's diffs are hard links in each run
        (d / "git" / long_name).write_text(f"long {i}")
        runs.append(d)
    pack = tmp_path / "pack_000.tar"
    assert packs.write_pack(pack, [(d.name, d) for d in runs]) == 15
    assert stat.S_IMODE(pack.stat().st_mode) == 0o600
    with tarfile.open(pack) as tar:  # a standard tar: `tar tf` on the cluster shows it
        members = tar.getmembers()
    links = [m for m in members if m.islnk()]
    assert len(links) == 2 and all(m.linkname.endswith("_000/git/0-proj.diff") for m in links)
    assert all(stat.S_IMODE(m.mode) == 0o600 for m in members)

    cluster = tmp_path / "cluster" / "exp"
    targets = [cluster / d.name for d in runs]
    assert packs.unpack_runs(pack, targets[1:]) == targets[1:]  # a task makes only its own runs
    assert not targets[0].exists()
    for i, t in enumerate(targets[1:], 1):
        assert (t / "payload.pkl").read_bytes() == f"payload.pkl {i}".encode()
        assert (t / "git" / "0-proj.diff").read_text() == shared.read_text()
        assert (t / "git" / long_name).read_text() == f"long {i}"
        assert stat.S_IMODE((t / "payload.pkl").stat().st_mode) == 0o600
    # a requeued task: the run has its payload (and outputs): nothing is rewritten
    (targets[1] / "payload.pkl").write_bytes(b"checkpointed")
    (targets[1] / "out.txt").write_text("kept")
    assert packs.unpack_runs(pack, targets[1:2]) == []
    assert (targets[1] / "payload.pkl").read_bytes() == b"checkpointed"
    with pytest.raises(packs.PackError, match="holds no payload for .*_009"):
        packs.unpack_runs(pack, [cluster / "20261202-000000.000_abcdef_009"])
    with pytest.raises(packs.PackError, match="cannot read the bundle's pack"):
        packs.unpack_runs(tmp_path / "missing.tar", [targets[0]])


def test_pack_plan_is_contiguous_even_and_bounded():
    from easylaunch import packs

    assert packs.plan_packs(0) == []
    assert packs.plan_packs(5, 3) == [0, 0, 1, 1, 2]
    plan = packs.plan_packs(2500, 32)
    assert plan == sorted(plan) and set(plan) == set(range(32))
    sizes = [plan.count(p) for p in range(32)]
    assert max(sizes) - min(sizes) <= 1


def test_a_large_bundle_is_a_handful_of_files(log_dir, tmp_path):
    sweep = run_sweep(
        nothing,
        [{"x": i} for i in range(600)],
        exp_name="many",
        mode="sss",
        code_dirs_to_mount=[code_dir(tmp_path)],
    )
    bundle = Path(sweep[0].manifest["backend"]["bundle"])
    files = [p for p in bundle.rglob("*") if p.is_file()]
    assert len(files) <= 50, sorted(str(p.relative_to(bundle)) for p in files)
    tasks = json.loads((bundle / "jobs" / "tasks.json").read_text())
    assert len(tasks["packs"]) == len(tasks["groups"]) == 600 and len(set(tasks["packs"])) == 32
