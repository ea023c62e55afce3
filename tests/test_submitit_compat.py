"""``import easylaunch.submitit_compat as submitit``: a submitit script, unchanged but for its
import, on the local mode and on the REAL Slurm (checkpoint + requeue at the time limit).

The Slurm run of the example takes a minute or so (a USR2 5-35 s into the job, then Slurm's
requeue delay), so it starts in the background when this module starts and is checked last.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_service

import easylaunch
import easylaunch.submitit_compat as submitit
from easylaunch import Job, State, records

pytestmark = pytest.mark.filterwarnings("ignore:not in a git repository")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "submitit_example.py"


def converted_example(directory: Path) -> Path:
    """The example with its one import changed, and nothing else."""
    source = EXAMPLE.read_text()
    assert source.count("\nimport submitit\n") == 1
    converted = source.replace("\nimport submitit\n", "\nimport easylaunch.submitit_compat as submitit\n")
    path = directory / "submitit_example.py"
    path.write_text(converted)
    return path


def start_example(directory: Path, cluster: str | None) -> subprocess.Popen:
    script = converted_example(directory)
    env = dict(os.environ, EXAMPLE_FOLDER=str(directory / "logs" / "%j"), HOME=str(directory / "home"))
    for name in ("EXAMPLE_CLUSTER", "EASYLAUNCH_CONFIG", "EASYLAUNCH_LOG_DIR"):
        env.pop(name, None)
    if cluster:
        env["EXAMPLE_CLUSTER"] = cluster
    return subprocess.Popen(
        [sys.executable, str(script)],
        cwd=str(directory),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def check_example_output(out: str, checkpoints: int) -> None:
    assert "sums: [10, 12, 14, 16, 18, 20, 22, 24, 26, 28]" in out
    assert "batch: [3, 7]" in out
    assert "failed as expected: True" in out
    assert f"long task: done after {checkpoints} checkpoint(s) COMPLETED" in out


def example_runs(directory: Path) -> dict:
    """The example's runs, by what they ran."""
    exp = directory / "logs" / "example"
    jobs = [Job.load(p) for p in sorted(exp.iterdir()) if (p / "manifest.json").exists()]
    by: dict = {}
    for job in jobs:
        by.setdefault(job.variant["function"].rsplit(".", 1)[1], []).append(job)
    return by


@pytest.fixture(scope="module")
def slurm_example(tmp_path_factory):
    """The example on the real Slurm, started once, in the background."""
    if not os.environ.get("EASYLAUNCH_TEST_SLURM"):
        yield None
        return
    directory = tmp_path_factory.mktemp("submitit-slurm")
    proc = start_example(directory, None)  # AutoExecutor picks Slurm: sbatch is on PATH
    yield directory, proc
    if proc.poll() is None:
        proc.kill()
        proc.communicate()
    subprocess.run(["scancel", "--name=example"], capture_output=True, timeout=30)


@pytest.fixture(autouse=True, scope="module")
def _start_slurm_example_early(slurm_example):
    return slurm_example


def test_example_script_runs_locally_unchanged_but_for_its_import(tmp_path):
    proc = start_example(tmp_path, "local")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    check_example_output(out, checkpoints=0)
    assert "timeout_min=1 is ignored: mode 'local' has no time limit" in err
    runs = example_runs(tmp_path)
    assert len(runs["add"]) == 12 and len(runs["fail"]) == 1 and len(runs["LongTask"]) == 1
    mapped = [j for j in runs["add"] if len(j.variant["args"]) == 2 and j.variant["args"][1] >= 10]
    assert len({j.manifest["batch_id"] for j in mapped}) == 1  # map_array: one launch
    assert runs["fail"][0].state is State.FAILED
    assert "cannot handle 7" in runs["fail"][0].stderr()


def test_auto_executor_chooses_and_maps(tmp_path, monkeypatch):
    ex = submitit.AutoExecutor(folder=tmp_path / "logs" / "%j", cluster="local", slurm_max_num_timeout=2)
    assert ex.folder == tmp_path / "logs" and ex.mode == "local" and ex.cluster == "local"
    ex.update_parameters(slurm_partition="debug", cpus_per_task=2, mem_gb=8, name="named")
    assert ex.parameters == {"base_log_dir": str(tmp_path / "logs")} and ex.exp_name == "named"
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    assert submitit.AutoExecutor.which() == "local"
    assert submitit.AutoExecutor(tmp_path, cluster="local_pool").mode == "local_pool"  # any mode
    slurm = submitit.SlurmExecutor(folder=tmp_path, max_num_timeout=1)
    slurm.update_parameters(partition="short", time=5, mem="2G", array_parallelism=3, job_name="j")
    slurm.update_parameters(additional_parameters={"comment": "x"}, signal_delay_s=20, gpus_per_node=0)
    assert slurm.parameters == {
        "base_log_dir": str(tmp_path),
        "max_requeue": 1,
        "slurm_options": {"partition": "short", "mem": "2G", "extra_flags": "--comment=x", "n_gpus": 0},
        "time_in_mins": 5,
        "max_parallel": 3,
        "signal_before_timeout": 20,
        "use_gpu": False,
    }
    assert slurm.exp_name == "j"
    with pytest.raises(TypeError, match="did you mean 'slurm_partition'"):
        slurm.update_parameters(partiton="x")
    with pytest.raises(ValueError, match="python=.*not supported"):
        submitit.SlurmExecutor(folder=tmp_path, python="/usr/bin/python3")
    with pytest.raises(ValueError, match="no directory before"):
        submitit.AutoExecutor(folder="%j")


def where(tag):
    env = submitit.JobEnvironment()
    return {
        "tag": tag,
        "job_id": env.job_id,
        "rank": env.global_rank,
        "run": str(easylaunch.current().base_log_dir),
    }


def test_jobs_have_submitits_methods_and_environment(tmp_path):
    ex = submitit.LocalExecutor(folder=tmp_path)
    jobs = ex.submit_array([lambda: 1, lambda: 2])
    assert len({j.manifest["batch_id"] for j in jobs}) == 1
    assert [j.results() for j in jobs] == [[1], [2]]
    job = ex.submit(where, "x")
    out = job.result()
    assert out == {"tag": "x", "job_id": job.run_dir.name, "rank": 0, "run": str(job.run_dir)}
    assert job.paths.result_pickle.exists() and job.paths.stdout == job.run_dir / "stdout.log"
    assert job.task(0) is job and job.num_tasks == 1 and job.cancel(check=True) is False
    with pytest.raises(RuntimeError, match="only available inside a job"):
        submitit.JobEnvironment()
    debug = submitit.DebugExecutor(folder=tmp_path)
    assert debug.submit(pow, 2, 5).result() == 32
    assert submitit.helpers.DelayedSubmission(pow, 2, 3).result() == 8


# -- the real Slurm ------------------------------------------------------------------------


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout


def test_executor_parameters_reach_slurm_and_cancel_is_a_future_cancel(log_dir):
    require_service("slurm")
    ex = easylaunch.Executor(mode="slurm", exp_name="exslurm", hold=True)
    ex.update_parameters(
        slurm_partition=os.environ.get("EASYLAUNCH_TEST_SLURM_OTHER_PARTITION", "short"),
        timeout_min=3,
        slurm_additional_parameters={"comment": "two words"},
        cpus_per_task=2,
    )
    job = ex.submit(pow, 2, 3)
    try:
        fields = dict(
            tok.split("=", 1) for tok in sh("scontrol", "-o", "show", "job", job.job_id).split() if "=" in tok
        )
        assert fields["Partition"] == os.environ.get("EASYLAUNCH_TEST_SLURM_OTHER_PARTITION", "short")
        assert fields["TimeLimit"] == "00:03:00"
        assert fields["NumCPUs"] == "2"
        assert "Comment=two words" in sh("scontrol", "show", "job", job.job_id)
        assert job.running() is False and job.cancel() is True
        assert job.wait(timeout=60) is State.CANCELLED
        assert job.cancelled()
    finally:
        sh("scancel", job.manifest["backend"]["array_job_id"])


def test_example_script_on_slurm_checkpoints_at_the_time_limit(slurm_example):
    require_service("slurm")
    directory, proc = slurm_example
    try:
        out, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the example did not finish on Slurm:\n{out}\n{err}")
    assert proc.returncode == 0, err
    check_example_output(out, checkpoints=1)
    runs = example_runs(directory)
    mapped = [j for j in runs["add"] if len(j.variant["args"]) == 2 and j.variant["args"][1] >= 10]
    assert len(mapped) == 10
    assert len({j.manifest["backend"]["array_job_id"] for j in mapped}) == 1  # one array job
    assert re.fullmatch(r"\d+_\d", mapped[0].job_id)
    (long_job,) = runs["LongTask"]
    status = records.read_status(long_job.run_dir)
    assert status["state"] == "COMPLETED" and status["requeues"] == 1 and status["attempt"] == 2
    assert [s for s, _ in status["history"]] == ["PENDING", "RUNNING", "PENDING", "RUNNING", "COMPLETED"]
    assert "checkpoint 1: requeueing" in long_job.stdout()
    assert (long_job.run_dir / "payload.attempt1.pkl").exists()
