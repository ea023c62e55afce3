"""The run directory (manifest, payload, status, logs, result, error) and the Job/Sweep handles."""

from __future__ import annotations

import json
import os
import pickle
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pandas as pd
import pytest

from easylaunch import Job, JobError, State, Sweep, grid, load_experiment, run_experiment, run_sweep

MANIFEST_KEYS = {
    "mode",
    "options",
    "variant",
    "git",
    "python",
    "packages",
    "host",
    "user",
    "command",
    "launched",
    "backend",
}
STATUS_KEYS = {
    "state",
    "created",
    "updated",
    "started",
    "ended",
    "host",
    "pid",
    "exit_code",
    "attempt",
    "history",
}


def chatty(doodad_config, variant):
    print("out-line", variant["x"], flush=True)
    print("err-line", variant["x"], file=sys.stderr, flush=True)
    os.system("echo child-out-hi")
    os.system("echo child-err-hi 1>&2")
    return {"double": variant["x"] * 2, "pid": os.getpid()}


def square(doodad_config, variant):
    return variant["lr"] ** 2


def wait_for_file_then_return(doodad_config, variant):
    Path(doodad_config.base_log_dir, "started").touch()
    deadline = time.time() + 60
    while not os.path.exists(variant["go"]) and time.time() < deadline:
        time.sleep(0.02)
    return "went"


def raise_value_error(doodad_config, variant):
    raise ValueError("boom-%d" % variant["x"])


def return_secret_info(doodad_config, variant):
    return dict(doodad_config.extra_launch_info)


def tick(doodad_config, variant):
    time.sleep(0.01)
    return variant["i"]


# -- run directory contents ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["local", "local_pool"])
def test_run_directory_contents_of_a_completed_run(mode, log_dir, run_dirs):
    job = run_experiment(chatty, exp_name="contents", mode=mode, variant={"x": 21})
    run_dir = job.run_dir
    assert run_dirs() == [run_dir]
    assert run_dir.parent == log_dir / "contents"

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert MANIFEST_KEYS <= set(manifest)
    assert manifest["mode"] == mode
    assert manifest["variant"] == {"x": 21}
    assert manifest["options"]["use_gpu"] is False and "skip_wait" in manifest["options"]
    assert isinstance(manifest["git"], list)
    assert manifest["python"] == sys.version.split()[0]
    assert manifest["packages"]["cloudpickle"] == cloudpickle.__version__
    assert "easylaunch" in manifest["packages"]
    assert manifest["host"] == socket.gethostname()
    assert isinstance(manifest["user"], str) and manifest["user"]
    assert manifest["command"] == sys.argv
    assert abs(manifest["launched"] - time.time()) < 3600
    assert isinstance(manifest["backend"], dict) and manifest["backend"]
    assert manifest["exp_name"] == "contents" and manifest["run_dir"] == str(run_dir)

    assert json.loads((run_dir / "variant.json").read_text()) == {"x": 21}

    payload = run_dir / "payload.pkl"
    assert stat.S_IMODE(payload.stat().st_mode) == 0o600
    header = pickle.loads(payload.read_bytes())
    assert header["cloudpickle"] == cloudpickle.__version__

    status = json.loads((run_dir / "status.json").read_text())
    assert STATUS_KEYS <= set(status)
    assert status["state"] == "COMPLETED"
    assert status["exit_code"] == 0
    assert status["attempt"] == 1
    assert status["host"] == socket.gethostname()
    assert status["pid"] == job.result()["pid"] != os.getpid()
    assert status["created"] <= status["started"] <= status["ended"] <= status["updated"]
    assert [h[0] for h in status["history"]] == ["PENDING", "RUNNING", "COMPLETED"]

    out = (run_dir / "stdout.log").read_text()
    err = (run_dir / "stderr.log").read_text()
    assert "out-line 21" in out and "child-out-hi" in out
    assert "err-line 21" in err and "child-err-hi" in err
    assert "err-line" not in out and "out-line" not in err
    assert job.stdout() == out and job.stderr() == err

    with open(run_dir / "result.pkl", "rb") as f:
        assert cloudpickle.load(f)["double"] == 42
    assert not (run_dir / "error.json").exists()
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_failed_run_writes_error_json_with_traceback(log_dir):
    job = run_experiment(raise_value_error, exp_name="fail", mode="local", variant={"x": 7})
    assert job.state is State.FAILED
    error = json.loads((job.run_dir / "error.json").read_text())
    assert error["type"] == "ValueError"
    assert error["message"] == "boom-7"
    assert 'raise ValueError("boom-%d" % variant["x"])' in error["traceback"]
    assert "raise_value_error" in error["traceback"]
    status = json.loads((job.run_dir / "status.json").read_text())
    assert status["state"] == "FAILED" and status["exit_code"] == 1
    assert "boom-7" in status["message"]
    assert not (job.run_dir / "result.pkl").exists()
    assert "boom-7" in job.stderr()


def test_no_secret_in_the_manifest(log_dir):
    secret = "SEKRET-1234567890"
    job = run_experiment(
        return_secret_info,
        exp_name="secret",
        mode="local",
        extra_launch_info={"aws_secret_access_key": secret, "api_token": secret, "note": "visible"},
    )
    # the function itself still gets everything it was given
    info = job.result()
    assert info["aws_secret_access_key"] == secret and info["note"] == "visible"
    manifest_text = (job.run_dir / "manifest.json").read_text()
    assert secret not in manifest_text
    assert "aws_secret_access_key" not in manifest_text
    assert "visible" in manifest_text
    # nothing readable by others holds it: only the private payload (and the private result)
    for path in job.run_dir.rglob("*"):
        if path.is_file() and path.name not in ("payload.pkl", "result.pkl"):
            assert secret.encode() not in path.read_bytes(), path.name
    assert stat.S_IMODE((job.run_dir / "payload.pkl").stat().st_mode) == 0o600


def return_variant(doodad_config, variant):
    return variant


def test_secret_looking_variant_keys_and_command_line_values_stay_out_of_the_manifest(
    log_dir, monkeypatch, tmp_path
):
    secret = "SEKRET-0987654321"
    monkeypatch.setattr(sys, "argv", ["launch.py", f"--password={secret}", "--api-token", secret, "--lr=0.1"])
    variant = {"password": secret, "db": {"api_token": secret}, "max_tokens": 7, "tokenizer": "bpe"}
    job = run_experiment(return_variant, exp_name="secret-variant", mode="local", variant=variant)
    assert job.result() == variant  # the function gets the variant whole
    manifest = json.loads((job.run_dir / "manifest.json").read_text())
    assert secret not in json.dumps(manifest)
    # the keys are shown, their values redacted; names that merely contain a word are kept
    assert manifest["variant"] == {
        "password": "<redacted>",
        "db": {"api_token": "<redacted>"},
        "max_tokens": 7,
        "tokenizer": "bpe",
    }
    assert manifest["command"] == [
        "launch.py",
        "--password=<redacted>",
        "--api-token",
        "<redacted>",
        "--lr=0.1",
    ]
    # variant.json keeps what the function needs, readable by its owner only
    assert json.loads((job.run_dir / "variant.json").read_text()) == variant
    assert stat.S_IMODE((job.run_dir / "variant.json").stat().st_mode) == 0o600
    for path in job.run_dir.rglob("*"):
        if path.is_file() and path.name not in ("payload.pkl", "result.pkl", "variant.json"):
            assert secret.encode() not in path.read_bytes(), path.name
    # a variant without such keys stays world-readable, as before
    plain = run_experiment(return_variant, exp_name="plain-variant", mode="local", variant={"lr": 1})
    plain.wait()
    assert stat.S_IMODE((plain.run_dir / "variant.json").stat().st_mode) == 0o644
    # neither `easylaunch ls` nor `status` prints the value
    ls = subprocess.run(
        [sys.executable, "-m", "easylaunch.cli", "status", str(job.run_dir)], capture_output=True, text=True
    )
    assert ls.returncode == 0, ls.stderr
    assert secret not in ls.stdout and "<redacted>" in ls.stdout


def test_sss_bundle_copies_no_secret_in_clear(log_dir, monkeypatch, tmp_path):
    secret = "SEKRET-BUNDLE-42"
    monkeypatch.setattr(sys, "argv", ["launch.py", f"--db-password={secret}"])
    sweep = run_sweep(
        return_variant, [{"aws_secret_access_key": secret, "i": 0}], exp_name="secret-bundle", mode="sss"
    )
    bundle = Path(sweep[0].manifest["backend"]["bundle"])
    files = [p for p in bundle.rglob("*") if p.is_file()]
    (pack,) = [p for p in files if p.suffix == ".tar"]  # the run's variant.json travels in it
    assert stat.S_IMODE(pack.stat().st_mode) == 0o600 and secret.encode() in pack.read_bytes()
    readable = [
        p for p in files if stat.S_IMODE(p.stat().st_mode) & 0o044 and secret.encode() in p.read_bytes()
    ]
    assert not readable, readable


# -- concurrency and atomicity ---------------------------------------------------------------

CONCURRENT_SCRIPT = """
    import json, sys, time
    from easylaunch import run_sweep

    def fn(doodad_config, variant):
        return [variant["who"], variant["i"], doodad_config.base_log_dir]

    who, start_at = sys.argv[1], float(sys.argv[2])
    while time.time() < start_at:
        time.sleep(0.001)
    sweep = run_sweep(fn, [{{"who": who, "i": i}} for i in range(20)], exp_name="same", mode="{mode}")
    print(json.dumps({{"dirs": [str(j.run_dir) for j in sweep], "results": sweep.results()}}))
"""


@pytest.mark.parametrize("mode", ["local_pool", "here_no_doodad"])
def test_simultaneous_launches_never_share_a_directory(mode, tmp_path, log_dir, run_dirs):
    import textwrap

    script = tmp_path / "launch_same.py"
    script.write_text(textwrap.dedent(CONCURRENT_SCRIPT.format(mode=mode)))
    start_at = time.time() + 1.0  # both scripts start launching at the same moment
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), who, repr(start_at)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(tmp_path),
        )
        for who in ("A", "B")
    ]
    outputs = {}
    for who, proc in zip("AB", procs):
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs[who] = json.loads(out.strip().splitlines()[-1])
    all_dirs = outputs["A"]["dirs"] + outputs["B"]["dirs"]
    assert len(all_dirs) == 40 and len(set(all_dirs)) == 40
    assert sorted(map(str, run_dirs())) == sorted(all_dirs)
    for who, data in outputs.items():
        for i, (run_dir, result) in enumerate(zip(data["dirs"], data["results"])):
            assert result == [who, i, run_dir]
            manifest = json.loads(Path(run_dir, "manifest.json").read_text())
            assert manifest["run_dir"] == run_dir
            assert manifest["variant"] == {"who": who, "i": i}
            assert manifest["batch_id"] in Path(run_dir).name
            assert json.loads(Path(run_dir, "variant.json").read_text()) == {"who": who, "i": i}
            assert Job.load(run_dir).state is State.COMPLETED
    batch_ids = {json.loads(Path(d, "manifest.json").read_text())["batch_id"] for d in all_dirs}
    assert len(batch_ids) == 2


def test_status_json_is_always_valid_json_during_a_sweep(log_dir):
    errors: list = []
    reads = [0]
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            for path in log_dir.glob("*/*/status.json"):
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    continue
                try:
                    json.loads(data)
                    reads[0] += 1
                except ValueError as exc:
                    errors.append((str(path), data[:200], exc))

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        sweep = run_sweep(tick, grid({"i": range(30)}), exp_name="atomic", mode="local_pool", max_parallel=4)
        assert sweep.results(timeout=60) == list(range(30))
    finally:
        stop.set()
        thread.join(5)
    assert errors == []
    assert reads[0] > 30
    assert not [p for p in log_dir.rglob("*.tmp")]


# -- Job handle ------------------------------------------------------------------------------


def test_job_handle_lifecycle(tmp_path, log_dir):
    go = tmp_path / "go"
    job = run_experiment(
        wait_for_file_then_return, exp_name="life", mode="local", variant={"go": str(go)}, skip_wait=True
    )
    assert isinstance(job, Job)
    assert job.run_dir.is_dir() and job.run_dir.parent == log_dir / "life"
    assert job.job_id == job.run_dir.name
    assert job.state in (State.PENDING, State.RUNNING)
    assert not job.done()
    with pytest.raises(TimeoutError):
        job.wait(timeout=0.3)
    with pytest.raises(TimeoutError):
        job.result(timeout=0.1)
    assert not job.done()
    go.touch()
    assert job.wait(timeout=30) is State.COMPLETED
    assert job.done()
    assert job.result() == "went"
    assert job.exception() is None
    assert job.variant == {"go": str(go)}
    assert job.stdout() == "" and job.stderr() == ""
    assert job.status["state"] == "COMPLETED"
    assert "COMPLETED" in repr(job)
    job.cancel()  # no-op on a finished run
    assert job.state is State.COMPLETED


def test_job_load_in_a_fresh_process_gives_same_state_and_result(log_dir):
    done = run_experiment(square, exp_name="load", mode="local", variant={"lr": 3})
    failed = run_experiment(raise_value_error, exp_name="load", mode="local", variant={"x": 5})
    code = (
        "import json, sys\n"
        "from easylaunch import Job\n"
        "out = []\n"
        "for d in sys.argv[1:]:\n"
        "    job = Job.load(d)\n"
        "    try:\n"
        "        res = ['ok', job.result()]\n"
        "    except Exception as exc:\n"
        "        res = ['raised', type(exc).__name__, str(exc)]\n"
        "    out.append([job.state.value, job.job_id, res])\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(done.run_dir), str(failed.run_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    (s1, id1, r1), (s2, id2, r2) = json.loads(proc.stdout)
    assert (s1, id1, r1) == ("COMPLETED", done.job_id, ["ok", 9])
    assert (s2, id2, r2) == ("FAILED", failed.job_id, ["raised", "ValueError", "boom-5"])
    assert Job.load(done.run_dir).result() == 9


def test_job_load_refuses_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an easylaunch run directory"):
        Job.load(tmp_path)


def test_load_experiment_returns_every_run_and_a_frame(log_dir):
    first = run_experiment(square, exp_name="exp", mode="local", variant={"lr": 2, "model": {"depth": 1}})
    sweep = run_sweep(square, grid({"lr": [3, 4], "model.depth": [5]}), exp_name="exp", mode="local_pool")
    assert sweep.results() == [9, 16]
    failed = run_experiment(raise_value_error, exp_name="exp", mode="local", variant={"x": 1, "lr": 0})
    run_experiment(square, exp_name="other", mode="local", variant={"lr": 10})

    runs = load_experiment("exp")
    assert isinstance(runs, Sweep)
    assert {j.run_dir for j in runs} == {first.run_dir, failed.run_dir, *(j.run_dir for j in sweep)}
    assert sorted(s.value for s in runs.states()) == ["COMPLETED"] * 3 + ["FAILED"]
    assert runs.counts()[State.COMPLETED] == 3

    frame = runs.to_frame()
    assert {"run", "state", "lr", "model.depth", "result"} <= set(frame.columns)
    assert len(frame) == 4
    by_run = {row["run"]: row for row in frame.to_dict("records")}
    row = by_run[first.run_dir.name]
    assert (row["lr"], row["model.depth"], row["state"], row["result"]) == (2, 1, "COMPLETED", 4)
    assert by_run[failed.run_dir.name]["state"] == "FAILED"
    assert pd.isna(by_run[failed.run_dir.name]["result"])
    assert by_run[sweep[1].run_dir.name]["model.depth"] == 5

    with pytest.raises(FileNotFoundError, match="no experiment"):
        load_experiment("never-launched")


def test_sweep_results_raise_first_failure_unless_asked(log_dir):
    sweep = run_sweep(raise_value_error, [{"x": 1}, {"x": 2}], exp_name="res", mode="local_pool")
    with pytest.raises(ValueError, match="boom-1"):
        sweep.results()
    results = sweep.results(return_exceptions=True)
    assert [type(r) for r in results] == [ValueError, ValueError]
    assert [str(r) for r in results] == ["boom-1", "boom-2"]


def test_result_of_a_cancelled_run_raises_job_error(tmp_path, log_dir, wait_until):
    job = run_experiment(
        wait_for_file_then_return,
        exp_name="jerr",
        mode="local",
        variant={"go": str(tmp_path / "never")},
        skip_wait=True,
    )
    wait_until(lambda: (job.run_dir / "started").exists(), what="the run to start")
    job.cancel()
    assert job.wait(timeout=20) is State.CANCELLED
    with pytest.raises(JobError) as info:
        job.result()
    assert info.value.state is State.CANCELLED
    assert isinstance(job.exception(), JobError)
