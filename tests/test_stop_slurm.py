"""``timeout=`` and cancel escalation where runs are packed on the REAL Slurm: ``slurm`` array
tasks, and the sss / htp bundles submitted there (the same runner and task runner, so the
same rules: TIMEOUT at the run's own deadline, SIGKILL of a cancelled run that ignores SIGTERM
after its cancel_grace, task-mates untouched).

The job functions are pickled by value (the bundle's cluster Python has neither this file nor
pytest), so they must not touch pytest.
"""

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
from conftest import require_service, wait_for

from easylaunch import State, records, run_sweep
from easylaunch.procs import alive

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.timeout(240), pytest.mark.filterwarnings("ignore:not in a git repository")]

HERE = Path(__file__).resolve().parent


def nap(doodad_config, variant):
    if variant.get("ignore_term"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(doodad_config.base_log_dir, "pid").write_text(str(os.getpid()))
    print("napping", variant["s"], flush=True)
    time.sleep(variant["s"])
    return variant["s"]


@pytest.fixture
def slurm(tmp_path, monkeypatch, log_dir):
    require_service("slurm")
    config = tmp_path / "easylaunch_config.py"
    config.write_text('SLURM_CONFIGS = {"cpu": {"partition": "debug", "time_in_mins": 5}}\n')
    monkeypatch.setenv("EASYLAUNCH_CONFIG", str(config))
    code = tmp_path / "code"
    code.mkdir()
    (code / "helper.py").write_text("VALUE = 1\n")
    jobs: list = []

    def launch(fn, variants, **options):
        sweep = run_sweep(
            fn,
            variants,
            exp_name=f"stop{os.getpid()}",
            mode="slurm",
            code_dirs_to_mount=[str(code)],
            **options,
        )
        jobs.extend({j.manifest["backend"]["array_job_id"] for j in sweep})
        return sweep

    yield launch
    if jobs:
        subprocess.run(["scancel", *jobs], capture_output=True, timeout=30)


def test_timeout_of_packed_slurm_runs(slurm):
    sweep = slurm(nap, [{"s": 60}, {"s": 0}], variants_per_task=2, timeout=2)
    assert sweep.wait(timeout=120).states() == [State.TIMEOUT, State.COMPLETED]
    status = records.read_status(sweep[0].run_dir)
    assert status["message"] == "RunInterrupted: timeout of 2 s reached"
    assert status["ended"] - status["started"] < 10
    assert "napping 60" in sweep[0].stdout()
    assert sweep[1].result() == 0  # its task-mate ran after it, in the same task


def test_cancel_of_a_packed_slurm_run_that_ignores_sigterm(slurm):
    sweep = slurm(nap, [{"s": 120, "ignore_term": True}, {"s": 0}], variants_per_task=2, cancel_grace=1)
    wait_for(lambda: (sweep[0].run_dir / "pid").exists(), 90, "the first run to start")
    pid = int((sweep[0].run_dir / "pid").read_text())
    t0 = time.monotonic()
    sweep[0].cancel()  # its task-mate must go on: only the cancel mark, no scancel
    assert sweep[0].wait(timeout=30) is State.CANCELLED
    assert time.monotonic() - t0 >= 1.0
    message = records.read_status(sweep[0].run_dir)["message"]
    assert "did not stop within 1 s of SIGTERM and was killed (SIGKILL)" in message
    wait_for(lambda: not alive(pid), 10, "the cancelled run's process to be gone")
    assert sweep[1].result(timeout=60) == 0


LAUNCH = """
import json, os, signal, sys, time
import cloudpickle
from easylaunch import run_sweep

def nap(doodad_config, variant):
    print("napping", variant["s"], flush=True)
    time.sleep(variant["s"])
    return variant["s"]

mode, opts = sys.argv[1], json.loads(sys.argv[2])
sweep = run_sweep(nap, [{{"s": 60}}, {{"s": 0}}], exp_name={exp!r}, mode=mode, timeout=2, **opts)
print("BUNDLE", sweep[0].manifest["backend"]["bundle"])
print("RUNS", json.dumps([j.run_dir.name for j in sweep]))
"""


@pytest.mark.parametrize("mode", ["sss", "htp"])
def test_timeout_of_bundle_runs_on_slurm(mode, tmp_path, log_dir):
    require_service("slurm")
    from test_bundles import plain_python, wait_states

    exp = f"{mode}_timeout"
    project = tmp_path / "proj"
    project.mkdir()
    (project / "launch.py").write_text(textwrap.dedent(LAUNCH.format(exp=exp)))
    config = tmp_path / "config.py"
    config.write_text(
        'SLURM_CONFIGS = {"cpu": {"partition": "debug", "time_in_mins": 5, "max_num_cores_per_node": 2}}\n'
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(EASYLAUNCH_CONFIG=str(config), PATH=f"{HERE / 'bin'}:{os.environ['PATH']}")
    opts = {"python": plain_python(), **({"variants_per_task": 2} if mode == "sss" else {})}
    proc = subprocess.run(
        [sys.executable, "launch.py", mode, json.dumps(opts)],
        cwd=project,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    bundle = Path(proc.stdout.split("BUNDLE ", 1)[1].split("\n", 1)[0])
    names = json.loads(proc.stdout.split("RUNS ", 1)[1].split("\n", 1)[0])
    submitted = subprocess.run(
        ["bash", str(bundle / "submit.sh")], cwd="/", capture_output=True, text=True, env=env, timeout=60
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    runs = [bundle / "logs" / exp / name for name in names]
    try:
        states = wait_states(runs, timeout=150)
    finally:
        ids = (bundle / "submitted.txt").read_text().split() if (bundle / "submitted.txt").exists() else []
        subprocess.run(["scancel", *[i for i in ids if i.isdigit()]], capture_output=True, timeout=30)
    assert [states[r] for r in runs] == ["TIMEOUT", "COMPLETED"], [records.read_status(r) for r in runs]
    assert records.read_status(runs[0])["message"] == "RunInterrupted: timeout of 2 s reached"
    assert "napping 60" in (runs[0] / "stdout.log").read_text()
