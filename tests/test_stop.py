"""Ending runs on the machine-local modes: ``timeout=``, cancel escalation (issue 7 item 4), and
``with`` blocks of Job and Sweep that leave nothing behind.

Real processes only: the functions below misbehave for real (ignore SIGTERM and SIGUSR2,
swallow the interrupt, start children) and the tests check the status records, the logs and
that no process of the run is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from conftest import wait_for

from easylaunch import Job, JobError, State, load_experiment, records, run_experiment, run_sweep
from easylaunch.procs import alive

pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:not in a git repository")]

LOCAL_MODES = ["local", "local_pool"]


# -- functions run by the tests (module level: imported by the runner) -------------------------


def sleep_then_return(doodad_config, variant):
    Path(doodad_config.base_log_dir, "started").touch()
    print("before the timeout", flush=True)
    time.sleep(variant.get("sleep", 30))
    return "slept"


def stubborn(doodad_config, variant):
    """Ignores SIGTERM and SIGUSR2, swallows every exception, and has a child process."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    child = subprocess.Popen(["sleep", "300"])
    Path(doodad_config.base_log_dir, "pids.json").write_text(
        json.dumps({"runner": os.getpid(), "child": child.pid})
    )
    print("stubborn and running", flush=True)
    Path(doodad_config.base_log_dir, "started").touch()
    deadline = time.time() + variant.get("for", 120)
    while time.time() < deadline:
        try:
            time.sleep(0.05)
        except BaseException:  # noqa: B036 - the point: it swallows the interrupt
            pass
    return "returned anyway"


def ignore_sigterm(doodad_config, variant):
    """Ignores SIGTERM (only), then returns after ``for`` seconds."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(doodad_config.base_log_dir, "pids.json").write_text(json.dumps({"runner": os.getpid()}))
    Path(doodad_config.base_log_dir, "started").touch()
    time.sleep(variant.get("for", 60))
    return "finished after the cancel"


def quick(doodad_config, variant):
    return variant.get("i")


class Resumable:
    """Counts to ``steps``; ``checkpoint`` returns a Resumable that resumes where it was."""

    def __init__(self, steps: int, done: int = 0):
        self.steps, self.done = steps, done

    def __call__(self, doodad_config, variant):
        print(f"resuming at {self.done}", flush=True)
        while self.done < self.steps:
            time.sleep(0.05)
            self.done += 1
        return {"done": self.done}

    def checkpoint(self, doodad_config, variant):
        print(f"checkpoint at {self.done}", flush=True)
        return Resumable(self.steps, self.done)


# -- helpers -----------------------------------------------------------------------------------


def started(job) -> bool:
    return (job.run_dir / "started").exists()


def pids(job) -> dict:
    return json.loads((job.run_dir / "pids.json").read_text())


def gone(pid: int) -> bool:
    return not alive(pid)


def status(job) -> dict:
    return records.read_status(job.run_dir)


# -- timeout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [*LOCAL_MODES, "here_no_doodad"])
def test_timeout_ends_the_run_as_timeout_with_its_output(mode, log_dir):
    t0 = time.monotonic()
    if mode == "here_no_doodad":
        with pytest.raises(TimeoutError, match="timeout of 1 s"):
            run_experiment(sleep_then_return, exp_name="to", mode=mode, timeout=1)
        (job,) = load_experiment("to")
    else:
        job = run_experiment(sleep_then_return, exp_name="to", mode=mode, timeout=1)
    elapsed = time.monotonic() - t0
    assert job.state is State.TIMEOUT
    assert 1.0 <= elapsed < 8, elapsed
    st = status(job)
    assert st["message"] == "RunInterrupted: timeout of 1 s reached"
    assert st["exit_code"] == 128 + signal.SIGUSR2
    assert st["ended"] - st["started"] < 3
    assert "before the timeout\n" in job.stdout()
    assert records.read_json(job.run_dir / "error.json")["message"] == "timeout of 1 s reached"
    with pytest.raises(JobError) as info:
        job.result()
    assert info.value.state is State.TIMEOUT
    if mode != "here_no_doodad":
        wait_for(lambda: not alive(st["pid"], st.get("pid_token")), 10, "the runner to exit")


@pytest.mark.parametrize("mode", LOCAL_MODES)
def test_timeout_backstop_kills_a_function_that_ignores_the_interrupt(mode, log_dir):
    t0 = time.monotonic()
    job = run_experiment(stubborn, exp_name="tob", mode=mode, timeout=1, cancel_grace=1)
    elapsed = time.monotonic() - t0
    assert job.state is State.TIMEOUT
    assert 2.0 <= elapsed < 10, elapsed
    st = status(job)
    assert "did not stop within 1 s of the interrupt" in st["message"]
    assert "killed (SIGKILL)" in st["message"]
    assert st["exit_code"] == 128 + signal.SIGKILL
    assert "stubborn and running\n" in job.stdout()
    p = pids(job)
    wait_for(lambda: gone(p["runner"]) and gone(p["child"]), 10, "the run's processes to be gone")
    assert not (job.run_dir / "result.pkl").exists()


def test_timeout_backstop_keeps_output_of_an_echoing_runner(tmp_path, log_dir, run_script):
    # a single waiting local run echoes through a pipe and a tee thread: what was written before
    # the kill must reach stdout.log even when that thread could not run
    proc = run_script(
        """
        import json, signal, time
        from easylaunch import run_experiment

        def noisy(doodad_config, variant):
            for i in range(200):
                print("line", i, flush=True)
            sum(range(10**12))  # one C call holding the interpreter: no handler, no tee thread runs

        job = run_experiment(noisy, exp_name="echo", mode="local", timeout=1, cancel_grace=0.5)
        print(json.dumps({"state": job.state.value, "run_dir": str(job.run_dir)}))
        """,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["state"] == "TIMEOUT"
    assert "line 199\n" in proc.stdout  # echoed to the launch script
    log = Path(out["run_dir"], "stdout.log").read_text()
    assert [f"line {i}" for i in range(200)] == log.splitlines()


def test_timeout_with_checkpoint_saves_it_and_relaunch_resumes(log_dir):
    from easylaunch.api import relaunch

    job = run_experiment(Resumable(steps=60), exp_name="tock", mode="local", timeout=1)
    assert job.state is State.TIMEOUT
    st = status(job)
    assert "a checkpoint was saved" in st["message"]
    assert f"easylaunch relaunch {job.run_dir}" in st["message"]
    assert (job.run_dir / "payload.attempt1.pkl").is_file()
    out = job.stdout()
    assert out.startswith("resuming at 0\n") and "checkpoint at " in out
    at = int(out.split("checkpoint at ")[1].split()[0])
    assert 5 <= at < 60
    resumed = relaunch(str(job.run_dir), skip_wait=False, timeout=30)
    assert resumed.run_dir != job.run_dir
    assert resumed.result() == {"done": 60}
    assert resumed.stdout().startswith(f"resuming at {at}\n")


def test_timeout_applies_to_each_run_of_a_packed_task(log_dir):
    sweep = run_sweep(
        sleep_then_return,
        [{"sleep": 30}, {"sleep": 0}, {"sleep": 30}],
        exp_name="topack",
        mode="local",
        variants_per_task=3,
        timeout=1,
    )
    assert sweep.states() == [State.TIMEOUT, State.COMPLETED, State.TIMEOUT]
    assert len({j.manifest["backend"]["pid"] for j in sweep}) == 1  # one task ran all three
    assert sweep[1].result() == "slept"


@pytest.mark.parametrize("value", [0, -1])
def test_timeout_and_cancel_grace_are_checked_before_anything_is_written(value, log_dir, run_dirs):
    with pytest.raises(ValueError, match="timeout"):
        run_experiment(quick, exp_name="bad", mode="local", timeout=value)
    with pytest.raises(ValueError, match="cancel_grace"):
        run_experiment(quick, exp_name="bad", mode="local", cancel_grace=value - 1)
    assert run_dirs() == []


# -- cancel escalation (issue 7 item 4) ----------------------------------------------------------


@pytest.mark.parametrize("mode", LOCAL_MODES)
def test_cancel_escalates_to_sigkill_after_the_grace(mode, log_dir):
    job = run_experiment(stubborn, exp_name="esc", mode=mode, skip_wait=True, cancel_grace=1)
    wait_for(lambda: started(job), 30, "the run to start")
    t0 = time.monotonic()
    job.cancel()
    assert job.wait(timeout=15) is State.CANCELLED
    assert 1.0 <= time.monotonic() - t0 < 8
    st = status(job)
    assert "did not stop within 1 s of SIGTERM and was killed (SIGKILL)" in st["message"]
    p = pids(job)
    wait_for(lambda: gone(p["runner"]) and gone(p["child"]), 10, "the run's processes to be gone")
    time.sleep(0.5)
    assert status(job)["state"] == "CANCELLED"  # nothing overwrote it later


@pytest.mark.parametrize("mode", LOCAL_MODES)
def test_run_returning_after_a_cancel_is_cancelled_not_completed(mode, log_dir):
    job = run_experiment(ignore_sigterm, exp_name="late", mode=mode, variant={"for": 1}, skip_wait=True)
    wait_for(lambda: started(job), 30, "the run to start")
    job.cancel()
    assert job.wait(timeout=20) is State.CANCELLED
    wait_for(lambda: gone(pids(job)["runner"]), 10, "the runner to exit")
    st = status(job)
    assert st["state"] == "CANCELLED"
    assert "COMPLETED" not in [s for s, _ in st["history"]]
    assert "result was discarded" in st["message"]
    assert not (job.run_dir / "result.pkl").exists()


def test_cancel_grace_from_the_config_file(tmp_path, log_dir, monkeypatch):
    config = tmp_path / "easylaunch_config.py"
    config.write_text("CANCEL_GRACE = 0.5\n")
    monkeypatch.setenv("EASYLAUNCH_CONFIG", str(config))
    job = run_experiment(ignore_sigterm, exp_name="cfg", mode="local", skip_wait=True)
    wait_for(lambda: started(job), 30, "the run to start")
    t0 = time.monotonic()
    job.cancel()
    assert job.wait(timeout=15) is State.CANCELLED
    assert time.monotonic() - t0 < 4
    assert "within 0.5 s of SIGTERM" in status(job)["message"]


def test_cancel_of_a_packed_local_run_escalates_and_spares_its_task_mates(log_dir):
    variants = [{"for": 60}, {"sleep": 0}]
    sweep = run_sweep(
        stubborn_or_quick,
        variants,
        exp_name="escpack",
        mode="local",
        variants_per_task=2,
        skip_wait=True,
        cancel_grace=1,
    )
    wait_for(lambda: started(sweep[0]), 30, "the first packed run to start")
    sweep[0].cancel()
    assert sweep[0].wait(timeout=15) is State.CANCELLED
    assert sweep[1].wait(timeout=30) is State.COMPLETED  # the task went on with the next run
    assert "killed (SIGKILL)" in status(sweep[0])["message"]
    wait_for(lambda: gone(pids(sweep[0])["child"]), 10, "the cancelled run's child to be gone")


def stubborn_or_quick(doodad_config, variant):
    if "for" in variant:
        return stubborn(doodad_config, variant)
    return "quick"


def test_cancel_escalates_after_the_launch_script_exited(tmp_path, log_dir, run_script):
    # cancel() returns at once; the kill after the grace does not need the launch script
    proc = run_script(
        f"""
        import json, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from easylaunch import run_experiment
        from test_stop import stubborn

        job = run_experiment(stubborn, exp_name="exited", mode="local", skip_wait=True, cancel_grace=1)
        while not Path(job.run_dir, "started").exists():
            time.sleep(0.01)
        t0 = time.monotonic()
        job.cancel()
        print(json.dumps({{"run_dir": str(job.run_dir), "cancel_took": time.monotonic() - t0}}))
        """,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cancel_took"] < 1
    job = Job.load(out["run_dir"])
    assert job.wait(timeout=15) is State.CANCELLED
    assert "killed (SIGKILL)" in status(job)["message"]
    p = pids(job)
    wait_for(lambda: gone(p["runner"]) and gone(p["child"]), 10, "the run's processes to be gone")


# -- with blocks --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", LOCAL_MODES)
def test_with_job_cancels_and_cleans_up_on_normal_exit(mode, log_dir):
    with run_experiment(sleep_then_return, exp_name="with", mode=mode, skip_wait=True) as job:
        wait_for(lambda: started(job), 30, "the run to start")
    assert Job.load(job.run_dir).state is State.CANCELLED
    st = status(job)
    assert not alive(st["pid"], st.get("pid_token"))  # cleanup() waited for it
    assert "RunInterrupted: interrupted by SIGTERM" == st["message"]


@pytest.mark.parametrize("how", [KeyError, KeyboardInterrupt])
def test_with_sweep_propagates_the_exception_and_leaves_nothing(how, log_dir):
    with pytest.raises(how):
        with run_sweep(
            stubborn,
            [{"i": i} for i in range(3)],
            exp_name="withx",
            mode="local",
            max_parallel=2,
            skip_wait=True,
            cancel_grace=1,
        ) as sweep:
            wait_for(lambda: started(sweep[0]) and started(sweep[1]), 30, "two runs to start")
            raise how("leaving the block")
    assert [Job.load(j.run_dir).state for j in sweep] == [State.CANCELLED] * 3
    for job in sweep[:2]:
        p = pids(job)
        assert gone(p["runner"]) and gone(p["child"])
    assert not started(sweep[2])  # the queued one never started
    info = records.read_json(Path(sweep[0].manifest["backend"]["supervisor_file"]))
    assert not alive(info["pid"], info["token"])  # the dispatcher is gone too


def test_with_block_keeps_a_finished_run(log_dir):
    with run_experiment(quick, exp_name="withdone", mode="local", variant={"i": 3}) as job:
        pass
    assert job.state is State.COMPLETED and job.result() == 3
    with run_sweep(quick, [{"i": 0}, {"i": 1}], exp_name="withdone", mode="local_pool") as sweep:
        pass
    assert sweep.results() == [0, 1]


def test_with_here_no_doodad_is_a_no_op(log_dir):
    with run_experiment(quick, exp_name="withhere", mode="here_no_doodad", variant={"i": 5}) as job:
        assert job.state is State.COMPLETED
    assert job.result() == 5


def test_local_packing_runs_k_variants_per_process(log_dir):
    sweep = run_sweep(
        quick,
        [{"i": i} for i in range(7)],
        exp_name="pack",
        mode="local",
        variants_per_task=3,
        max_parallel=2,
    )
    assert sweep.results() == list(range(7))
    backends = [j.manifest["backend"] for j in sweep]
    assert [b["task"] for b in backends] == [0, 0, 0, 1, 1, 1, 2]
    assert [b["task_runs"] for b in backends] == [3, 3, 3, 3, 3, 3, 1]
    assert all("--tasks" in b["command"] for b in backends)
    assert len({status(j)["pid"] for j in sweep}) == 7  # each run forked in its own process
    by_duration = run_sweep(
        quick,
        [{"i": i} for i in range(40)],
        exp_name="pack",
        mode="local",
        expected_duration=0.01,
        max_parallel=2,
    )
    assert by_duration.results() == list(range(40))
    assert {j.manifest["backend"]["task_runs"] for j in by_duration} == {20}  # 40 over 2 slots
