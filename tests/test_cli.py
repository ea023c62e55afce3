"""The `easylaunch` command against real runs (launched through the installed package)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from easylaunch import Job, State, run_experiment, run_sweep


def cli(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "easylaunch.cli", *args], capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"easylaunch {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def double(doodad_config, variant):
    print("value", variant["x"])
    if variant["x"] < 0:
        raise ArithmeticError("negative x")
    return variant["x"] * 2


def sleepy(doodad_config, variant):
    print("sleeping", flush=True)
    time.sleep(60)


def test_ls_lists_experiments_and_runs(log_dir):
    run_sweep(double, [{"x": 1}, {"x": -1}], exp_name="clitest", mode="local")
    out = cli("ls").stdout
    assert "clitest" in out and "completed=1" in out and "failed=1" in out
    runs = cli("ls", "clitest").stdout
    assert runs.count("COMPLETED") == 1 and runs.count("FAILED") == 1
    assert "x=1" in runs and "x=-1" in runs and "local" in runs


def test_status_result_logs(log_dir):
    ok = run_experiment(double, exp_name="clitest", mode="local", variant={"x": 21})
    bad = run_experiment(double, exp_name="clitest", mode="local", variant={"x": -3})
    status = json.loads(cli("status", ok.run_dir.name, "--json").stdout)
    assert status["state"] == "COMPLETED" and status["variant"] == {"x": 21} and status["exit_code"] == 0
    assert cli("result", str(ok.run_dir)).stdout.strip() == "42"
    failed = cli("result", bad.run_dir.name, check=False)
    assert failed.returncode == 1 and "ArithmeticError: negative x" in failed.stderr
    assert "double" in failed.stderr  # the remote traceback names the function
    assert cli("logs", ok.run_dir.name).stdout.strip() == "value 21"
    assert "ArithmeticError" in cli("logs", bad.run_dir.name, "--stderr").stdout


def test_unknown_run_is_a_clear_error(log_dir):
    proc = cli("status", "no-such-run", check=False)
    assert proc.returncode != 0 and "no run 'no-such-run'" in proc.stderr


def test_logs_follow_and_cancel_experiment(log_dir):
    job = run_experiment(sleepy, exp_name="clicancel", mode="local", variant={}, skip_wait=True)
    follower = subprocess.Popen(
        [sys.executable, "-m", "easylaunch.cli", "logs", "-f", job.run_dir.name],
        stdout=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 30
    # RUNNING is recorded before the function's first line: a cancel then may beat its print
    while "sleeping" not in job.stdout() and time.time() < deadline:
        time.sleep(0.1)
    assert "cancel requested for 1" in cli("cancel", "clicancel").stdout
    assert job.wait(timeout=30) is State.CANCELLED
    out, _ = follower.communicate(timeout=30)
    assert follower.returncode == 0 and "sleeping" in out


def test_relaunch_from_manifest_on_another_mode(log_dir):
    job = run_experiment(double, exp_name="clire", mode="local", variant={"x": 5})
    new_dir = Path(
        cli("relaunch", job.run_dir.name, "--mode", "here_no_doodad").stdout.strip().splitlines()[-1]
    )
    again = Job.load(new_dir)
    assert again.manifest["mode"] == "here_no_doodad" and again.result() == 10
    assert again.variant == {"x": 5} and new_dir != job.run_dir


def test_init_writes_config_that_loads(tmp_path):
    target = tmp_path / "cfg.py"
    assert "wrote" in cli("init", str(target)).stdout
    assert (target.stat().st_mode & 0o777) == 0o600
    assert cli("init", str(target), check=False).returncode == 1  # no silent overwrite
    from easylaunch.config import load_settings

    settings = load_settings(target)
    assert settings["SLURM_CONFIGS"] == {} and settings.source == target


def test_config_example_is_the_rendered_documentation():
    from easylaunch.cli import render_config_example

    example = Path(__file__).resolve().parents[1] / "config_example.py"
    assert example.read_text() == render_config_example()


def test_templates_are_installed_with_the_package():
    from importlib import resources

    names = {p.name for p in resources.files("easylaunch.templates").iterdir()}
    assert "slurm_array.sh.j2" in names


@pytest.mark.skipif(
    not os.environ.get("CI") and not os.environ.get("EASYLAUNCH_TEST_NONEDITABLE"),
    reason="slow: builds a wheel into a fresh venv (always runs in CI)",
)
def test_non_editable_install_finds_templates(tmp_path):
    root = Path(__file__).resolve().parents[1]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run([str(venv / "bin/pip"), "install", "-q", "--no-deps", str(root)], check=True, timeout=300)
    code = (
        "from easylaunch.templating import render; import easylaunch, sys;"
        "from easylaunch.runtimes import RunnerCommand;"
        "assert 'site-packages' in easylaunch.__file__, easylaunch.__file__;"
        "print(render('slurm_array.sh.j2', version='v', exp_name='e', batch_id='b', first_group=0,"
        " last_group=0, tasks_file='/t f', job_name='j', array_spec='0-0', output_pattern='/o',"
        " signal_seconds=9, requeue=False, directives=[], runner=RunnerCommand(['py']),"
        " args=['--tasks', '/t f']))"
    )
    out = subprocess.run([str(venv / "bin/python"), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "--tasks '/t f'" in out.stdout
