"""``python -m easylaunch.runner PAYLOAD``: re-runs, version checks, signals, failures."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest

from easylaunch import Job, JobError, State, run_experiment

RUNNER = [sys.executable, "-m", "easylaunch.runner"]


class CustomError(Exception):
    """Raised by a run; must come back to the caller as this very type."""


def count_calls(doodad_config, variant):
    counter = Path(variant["counter"])
    n = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(n))
    print("call", n)
    return n


def sleep_when_told(doodad_config, variant):
    """Returns at once on the first launch; sleeps when re-run with EL_TEST_SLEEP set."""
    if os.environ.get("EL_TEST_SLEEP"):
        Path(doodad_config.base_log_dir, "sleeping").touch()
        time.sleep(60)
    return "quick"


def raise_custom(doodad_config, variant):
    x = variant["x"]
    raise CustomError(f"custom failure {x}")  # SOURCE-LINE-MARK


def return_unpicklable(doodad_config, variant):
    import threading

    return threading.Lock()


def read_status(run_dir) -> dict:
    return json.loads(Path(run_dir, "status.json").read_text())


def runner(payload, *args, env=None, **kwargs) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(
        [*RUNNER, str(payload), *args], capture_output=True, text=True, timeout=60, env=full_env, **kwargs
    )


# -- re-running a payload --------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["local", "local_pool", "here_no_doodad"])
def test_runner_reruns_a_payload_directly(mode, tmp_path, log_dir):
    counter = tmp_path / "counter"
    job = run_experiment(count_calls, exp_name="rerun", mode=mode, variant={"counter": str(counter)})
    assert job.result() == 1
    # from another directory, as a user (or a scheduler) would
    proc = runner(job.run_dir / "payload.pkl", cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert "call 2" in proc.stdout  # echoed unless --quiet
    assert counter.read_text() == "2"
    reloaded = Job.load(job.run_dir)
    assert reloaded.state is State.COMPLETED
    assert reloaded.result() == 2
    status = read_status(job.run_dir)
    assert status["attempt"] == 2
    assert status["exit_code"] == 0
    assert [h[0] for h in status["history"]] == ["PENDING", "RUNNING", "COMPLETED", "RUNNING", "COMPLETED"]
    assert "call 1" in reloaded.stdout() and "call 2" in reloaded.stdout()


def test_runner_quiet_does_not_echo(tmp_path, log_dir):
    job = run_experiment(
        count_calls, exp_name="quiet", mode="local", variant={"counter": str(tmp_path / "c")}
    )
    proc = runner(job.run_dir / "payload.pkl", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "call 2" in Job.load(job.run_dir).stdout()


def test_runner_usage_error():
    proc = subprocess.run(RUNNER, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "usage" in proc.stderr


@pytest.mark.parametrize("field, fake", [("cloudpickle", "0.0.1-tampered"), ("python", "2.7")])
def test_version_mismatch_is_refused_naming_both_versions(field, fake, tmp_path, log_dir):
    job = run_experiment(count_calls, exp_name="ver", mode="local", variant={"counter": str(tmp_path / "c")})
    payload = job.run_dir / "payload.pkl"
    header = pickle.loads(payload.read_bytes())
    header[field] = fake
    payload.write_bytes(pickle.dumps(header))
    proc = runner(payload)
    assert proc.returncode == 2
    ours = cloudpickle.__version__ if field == "cloudpickle" else "%d.%d" % sys.version_info[:2]
    assert fake in proc.stderr and ours in proc.stderr
    status = read_status(job.run_dir)
    assert status["state"] == "FAILED"
    assert status["exit_code"] == 2
    assert fake in status["message"] and ours in status["message"]
    assert (tmp_path / "c").read_text() == "1"  # the function did not run again
    assert Job.load(job.run_dir).state is State.FAILED


def test_runner_refuses_a_file_that_is_not_a_payload(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "payload.pkl").write_bytes(pickle.dumps({"format": 999}))
    proc = runner(run_dir / "payload.pkl")
    assert proc.returncode == 2
    assert read_status(run_dir)["state"] == "FAILED"


def test_wait_go_without_go_byte_exits_3(tmp_path, log_dir):
    job = run_experiment(count_calls, exp_name="go", mode="local", variant={"counter": str(tmp_path / "c")})
    proc = runner(job.run_dir / "payload.pkl", "--wait-go", stdin=subprocess.DEVNULL)
    assert proc.returncode == 3
    assert read_status(job.run_dir)["state"] == "FAILED"
    assert (tmp_path / "c").read_text() == "1"


# -- signals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sig, state",
    [(signal.SIGTERM, State.CANCELLED), (signal.SIGINT, State.CANCELLED), (signal.SIGUSR2, State.TIMEOUT)],
    ids=["SIGTERM", "SIGINT", "SIGUSR2"],
)
def test_signal_to_a_running_runner_is_recorded(sig, state, log_dir, wait_until):
    job = run_experiment(sleep_when_told, exp_name="sig", mode="local", variant={})
    assert job.result() == "quick"
    env = dict(os.environ, EL_TEST_SLEEP="1")
    proc = subprocess.Popen(
        [*RUNNER, str(job.run_dir / "payload.pkl"), "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: (job.run_dir / "sleeping").exists(), what="the function to start")
        status = read_status(job.run_dir)
        assert status["state"] == "RUNNING" and status["pid"] == proc.pid
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig
    status = read_status(job.run_dir)
    assert status["state"] == state.value
    assert status["exit_code"] == 128 + sig
    error = json.loads((job.run_dir / "error.json").read_text())
    assert signal.Signals(sig).name in error["message"]
    loaded = Job.load(job.run_dir)
    assert loaded.state is state
    with pytest.raises(JobError) as info:
        loaded.result()
    assert info.value.state is state


def test_sigterm_to_a_local_run_cancels_it(log_dir, wait_until, monkeypatch):
    monkeypatch.setenv("EL_TEST_SLEEP", "1")
    job = run_experiment(sleep_when_told, exp_name="term", mode="local", variant={}, skip_wait=True)
    wait_until(lambda: (job.run_dir / "sleeping").exists(), what="the function to start")
    pid = read_status(job.run_dir)["pid"]
    os.kill(pid, signal.SIGTERM)
    assert job.wait(timeout=30) is State.CANCELLED
    status = read_status(job.run_dir)
    assert status["exit_code"] == 143
    assert status["ended"] >= status["started"]


# -- failures --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["local", "local_pool"])
def test_exception_comes_back_with_its_type_and_remote_traceback(mode, log_dir):
    job = run_experiment(raise_custom, exp_name="exc", mode=mode, variant={"x": 5})
    assert job.state is State.FAILED
    with pytest.raises(CustomError, match="custom failure 5") as info:
        job.result()
    cause = info.value.__cause__
    assert cause is not None
    assert "SOURCE-LINE-MARK" in str(cause)
    assert "raise_custom" in str(cause)
    exc = job.exception()
    assert isinstance(exc, CustomError) and str(exc) == "custom failure 5"
    assert "SOURCE-LINE-MARK" in str(exc.__cause__)
    status = read_status(job.run_dir)
    assert status["exit_code"] == 1
    assert "CustomError: custom failure 5" in status["message"]
    assert "SOURCE-LINE-MARK" in job.stderr()


def test_exception_whose_class_cannot_be_rebuilt_is_a_remote_error(log_dir):
    job = run_experiment(raise_custom, exp_name="exc2", mode="local", variant={"x": 1})
    (job.run_dir / "exception.pkl").write_bytes(b"not a pickle")
    exc = Job.load(job.run_dir).exception()
    assert type(exc).__name__ == "RemoteError"
    assert "CustomError" in str(exc) and "custom failure 1" in str(exc) and "SOURCE-LINE-MARK" in str(exc)


def test_unpicklable_return_value_fails_the_run(log_dir):
    job = run_experiment(return_unpicklable, exp_name="ret", mode="local")
    assert job.state is State.FAILED
    with pytest.raises(TypeError, match="cannot be pickled"):
        job.result()
