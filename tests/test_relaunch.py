"""Runs are reproducible from their directory (issue 7 items 8, 11, 12): every mode keeps the
code that ran as a content-addressed snapshot, a relaunch runs that code (not today's), and a
result holding an object of the user's class reads back anywhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import require_service

from easylaunch import Job, JobError, State

MYLIB = """
class Result:
    def __init__(self, value):
        self.value = value

TAG = "v1"

def work(doodad_config, variant):
    print("tag", TAG, flush=True)
    return Result((variant["x"] * 2, TAG))
"""

LAUNCH = """
import sys
from easylaunch import run_experiment
from mylib import work
opts = eval(sys.argv[2]) if len(sys.argv) > 2 else {}
job = run_experiment(work, exp_name="repro", mode=sys.argv[1], variant={"x": 21}, **opts)
print("RUN", job.run_dir, flush=True)
"""

CONSOLE = str(Path(sys.executable).parent / "easylaunch")


@pytest.fixture(autouse=True)
def forget_mylib(monkeypatch):
    """A result read in this process puts the run's code on sys.path: undone after each test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    sys.modules.pop("mylib", None)


def project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    (root / "mylib.py").write_text(MYLIB)
    (root / "launch.py").write_text(LAUNCH)
    for args in (
        ["init", "-q"],
        ["add", "."],
        ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
    ):
        subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)
    return root


def launch(root: Path, mode: str, **opts) -> Path:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "launch.py", mode, repr(opts)],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return Path(proc.stdout.split("RUN ", 1)[1].split()[0])


def console(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed `easylaunch` console script, from a directory that holds no code."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([CONSOLE, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=180)


def relaunched(out: str) -> Job:
    job = Job.load(out.strip().splitlines()[-1])
    assert job.wait(timeout=180) is State.COMPLETED, job.status
    return job


@pytest.mark.parametrize("mode", ["local", "local_pool"])
def test_local_runs_keep_their_code_and_relaunch_it(tmp_path, log_dir, mode):
    root = project(tmp_path)
    run = launch(root, mode)
    manifest = json.loads((run / "manifest.json").read_text())
    snap = manifest["code_snapshot"]
    assert snap["roots"] == [str(root)] and Path(snap["archive"]).is_file(), manifest
    assert oct(Path(snap["archive"]).stat().st_mode & 0o777) == "0o600"
    # the same code launched again is stored once
    archives = sorted(p.name for p in Path(snap["archive"]).parent.glob("*.tar.gz"))
    again = launch(root, mode)
    assert sorted(p.name for p in Path(snap["archive"]).parent.glob("*.tar.gz")) == archives
    assert json.loads((again / "manifest.json").read_text())["code_snapshot"]["id"] == snap["id"]

    # edited, then deleted: the result still reads back, the relaunch runs what ran
    (root / "mylib.py").write_text(MYLIB.replace('TAG = "v1"', 'TAG = "v2"'))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shown = console("result", str(run), cwd=elsewhere)
    assert shown.returncode == 0 and "Result" in shown.stdout, shown.stdout + shown.stderr
    proc = console("relaunch", str(run), cwd=elsewhere)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = relaunched(proc.stdout)
    assert job.stdout().strip() == "tag v1"
    assert job.manifest["relaunch_of"] == str(run) and job.manifest["code_snapshot"]["id"] == snap["id"]
    assert job.manifest["git"][0]["directory"] == str(root)
    (root / "mylib.py").unlink()
    proc = console("relaunch", str(run), cwd=elsewhere)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert relaunched(proc.stdout).stdout().strip() == "tag v1"
    result = Job.load(run).result()  # this process never imported mylib
    assert type(result).__name__ == "Result" and result.value == (42, "v1")


def test_result_without_the_code_says_what_is_missing(tmp_path, log_dir, monkeypatch):
    root = project(tmp_path)
    shutil.rmtree(root / ".git")  # outside git every file counts against the limit
    # too large to keep: a warning, the run goes on
    monkeypatch.setenv("EASYLAUNCH_SNAPSHOT_MAX_MB", "0.0000001")
    proc = subprocess.run(
        [sys.executable, "launch.py", "local"], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "no code snapshot kept" in proc.stderr
    run = Path(proc.stdout.split("RUN ", 1)[1].split()[0])
    assert Job.load(run).state is State.COMPLETED
    (root / "mylib.py").unlink()
    with pytest.raises(JobError, match="not importable here.*PYTHONPATH"):
        Job.load(run).result()
    shown = console("result", str(run), cwd=tmp_path)
    assert shown.returncode != 0 and "Traceback" not in shown.stderr, shown.stderr
    assert "PYTHONPATH" in shown.stderr


def test_slurm_run_relaunched_from_the_console_script(tmp_path, log_dir, monkeypatch):
    require_service("slurm")
    config = tmp_path / "config.py"
    config.write_text('SLURM_CONFIGS = {"cpu": {"partition": "debug", "time_in_mins": 10}}\n')
    monkeypatch.setenv("EASYLAUNCH_CONFIG", str(config))
    root = project(tmp_path)
    run = launch(root, "slurm", slurm_config_name="cpu")
    assert Job.load(run).wait(timeout=180) is State.COMPLETED
    (root / "mylib.py").write_text(MYLIB.replace('TAG = "v1"', 'TAG = "v2"'))
    proc = console("relaunch", str(run), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = relaunched(proc.stdout)
    assert job.stdout().strip() == "tag v1" and job.result().value == (42, "v1")
    assert job.manifest["code_snapshot"]["id"] == Job.load(run).manifest["code_snapshot"]["id"]
