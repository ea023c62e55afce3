"""The machine-local modes: here_no_doodad (in process), local (runner subprocesses, detached
dispatcher for sweeps larger than max_parallel) and local_pool (forking supervisor)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from easylaunch import Job, State, grid, load_experiment, run_experiment, run_sweep
from easylaunch.procs import alive

# -- functions run by the tests (module level: pickled by reference, imported by the runner) --


def identify(doodad_config, variant):
    print("identify", variant.get("i"), flush=True)
    return {"pid": os.getpid(), "i": variant.get("i"), "dir": doodad_config.base_log_dir}


def fail_here(doodad_config, variant):
    print("about to fail", flush=True)
    raise KeyError("missing-%s" % variant["k"])


def start_then_block(doodad_config, variant):
    """Marks its start, then blocks until the go file exists (or for a long time)."""
    Path(doodad_config.base_log_dir, "started").touch()
    deadline = time.time() + variant.get("max_wait", 60)
    while not os.path.exists(variant["go"]) and time.time() < deadline:
        time.sleep(0.02)
    return variant.get("i")


def die_or_return(doodad_config, variant):
    how = variant.get("die")
    if how == "exit":
        os._exit(3)
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    return variant["i"] * 10


def started(run_dir) -> bool:
    return (Path(run_dir) / "started").exists()


def status_of(run_dir) -> dict:
    return json.loads((Path(run_dir) / "status.json").read_text())


def supervisor_gone(job) -> bool:
    info = json.loads(Path(job.manifest["backend"]["supervisor_file"]).read_text())
    return not alive(info["pid"], info["token"])


# -- here_no_doodad --------------------------------------------------------------------------


def test_here_runs_in_this_process_and_writes_the_run_dir(log_dir, capsys):
    job = run_experiment(identify, exp_name="here", mode="here_no_doodad", variant={"i": 4})
    assert job.state is State.COMPLETED
    out = job.result()
    assert out["pid"] == os.getpid()
    assert out["dir"] == str(job.run_dir)
    for name in ("manifest.json", "variant.json", "payload.pkl", "status.json", "stdout.log", "result.pkl"):
        assert (job.run_dir / name).is_file(), name
    assert "identify 4" in job.stdout()
    assert "identify 4" in capsys.readouterr().out  # still printed where the caller sees it
    assert status_of(job.run_dir)["pid"] == os.getpid()


def test_here_exception_propagates_and_the_run_dir_stays(log_dir):
    with pytest.raises(KeyError, match="missing-z"):
        run_experiment(fail_here, exp_name="here-fail", mode="here_no_doodad", variant={"k": "z"})
    runs = load_experiment("here-fail")
    assert len(runs) == 1
    job = runs[0]
    assert job.state is State.FAILED
    assert (job.run_dir / "manifest.json").is_file()
    error = json.loads((job.run_dir / "error.json").read_text())
    assert error["type"] == "KeyError" and "missing-z" in error["message"]
    assert "about to fail" in job.stdout()
    with pytest.raises(KeyError):
        job.result()


def test_here_sweep_runs_every_variant_in_order(log_dir):
    sweep = run_sweep(identify, grid({"i": range(4)}), exp_name="here-sweep", mode="here_no_doodad")
    assert [r["i"] for r in sweep.results()] == [0, 1, 2, 3]
    assert {r["pid"] for r in sweep.results()} == {os.getpid()}


# -- local -----------------------------------------------------------------------------------


def test_local_waits_by_default(log_dir):
    job = run_experiment(identify, exp_name="loc", mode="local", variant={"i": 1})
    # no wait() call: the status file already holds the outcome
    assert status_of(job.run_dir)["state"] == "COMPLETED"
    assert job.result()["pid"] != os.getpid()
    assert "identify 1" in job.stdout()


def test_local_skip_wait_returns_at_once(tmp_path, log_dir):
    go = tmp_path / "go"
    job = run_experiment(
        start_then_block, exp_name="loc", mode="local", variant={"go": str(go), "i": 7}, skip_wait=True
    )
    # the function cannot finish before the go file exists
    assert status_of(job.run_dir)["state"] in ("PENDING", "RUNNING")
    assert not job.done()
    go.touch()
    assert job.wait(timeout=30) is State.COMPLETED
    assert job.result() == 7


def test_local_sweep_within_max_parallel_runs_together(tmp_path, log_dir):
    go = tmp_path / "go"
    sweep = run_sweep(
        start_then_block,
        [{"go": str(go), "i": i} for i in range(2)],
        exp_name="loc",
        mode="local",
        max_parallel=2,
        skip_wait=True,
    )
    # both must be running at the same time for either to see the other's start
    deadline = time.time() + 30
    while not all(started(j.run_dir) for j in sweep) and time.time() < deadline:
        time.sleep(0.02)
    assert all(started(j.run_dir) for j in sweep)
    go.touch()
    assert sweep.results(timeout=30) == [0, 1]


def test_local_run_failure_and_dead_process(log_dir):
    job = run_experiment(die_or_return, exp_name="loc-dead", mode="local", variant={"i": 1, "die": "exit"})
    assert job.state is State.FAILED
    assert "exited without recording" in status_of(job.run_dir)["message"]
    assert not (job.run_dir / "result.pkl").exists()


LAUNCH_AND_EXIT = """
    import json, os, sys, time
    from pathlib import Path
    from easylaunch import run_experiment, run_sweep

    def blocker(doodad_config, variant):
        # defined in the launch script's __main__: pickled by value
        Path(doodad_config.base_log_dir, "started").touch()
        deadline = time.time() + 60
        while not os.path.exists(variant["go"]) and time.time() < deadline:
            time.sleep(0.02)
        return {{"i": variant["i"], "main": __name__}}

    go = sys.argv[1] if len(sys.argv) > 1 else {go!r}
    mode = {mode!r}
    if {n} == 1:
        jobs = [run_experiment(blocker, exp_name="detached", mode=mode, variant={{"go": go, "i": 0}},
                               skip_wait=True)]
    else:
        jobs = run_sweep(blocker, [{{"go": go, "i": i}} for i in range({n})], exp_name="detached",
                         mode=mode, skip_wait=True, max_parallel={max_parallel})
    print(json.dumps([str(j.run_dir) for j in jobs]))
"""


@pytest.mark.parametrize("mode", ["local", "local_pool"])
def test_skip_wait_run_survives_the_launch_script(mode, tmp_path, log_dir, run_script):
    go = tmp_path / "go"
    proc = run_script(LAUNCH_AND_EXIT.format(go=str(go), mode=mode, n=1, max_parallel=1), timeout=30)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = json.loads(proc.stdout.strip().splitlines()[-1])
    job = Job.load(run_dir)
    assert not job.done()  # the script is gone; the run blocks until the go file exists
    go.touch()
    assert job.wait(timeout=30) is State.COMPLETED
    assert job.result() == {"i": 0, "main": "__main__"}


COUNTING = """
    import fcntl, json, os, sys, time
    from pathlib import Path
    from easylaunch import run_sweep

    def counted(doodad_config, variant):
        # a counter under an fcntl lock records how many runs were inside at once
        path = variant["counter"]

        def update(delta):
            with open(path, "a+") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                f.seek(0)
                cur, peak = map(int, (f.read().split() or ["0", "0"]))
                cur += delta
                peak = max(peak, cur)
                f.seek(0)
                f.truncate()
                f.write(f"{{cur}} {{peak}}")

        update(+1)
        Path(doodad_config.base_log_dir, "started").touch()
        deadline = time.time() + 60
        while not os.path.exists(variant["go"]) and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        update(-1)
        return variant["i"]

    jobs = run_sweep(counted, [{{"go": sys.argv[1], "counter": sys.argv[2], "i": i}} for i in range(6)],
                     exp_name="limited", mode={mode!r}, max_parallel=2, skip_wait=True)
    print(json.dumps([str(j.run_dir) for j in jobs]))
"""


@pytest.mark.parametrize("mode", ["local", "local_pool"])
def test_sweep_larger_than_max_parallel_is_limited_and_outlives_the_script(
    mode, tmp_path, log_dir, run_script, wait_until
):
    go, counter = tmp_path / "go", tmp_path / "counter"
    script = tmp_path / "counting.py"
    script.write_text(textwrap.dedent(COUNTING.format(mode=mode)))
    proc = subprocess.run(
        [sys.executable, str(script), str(go), str(counter)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    run_dirs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(run_dirs) == 6
    # the script has exited; the first runs block on the go file, the rest are queued
    jobs = [Job.load(d) for d in run_dirs]
    wait_until(lambda: sum(started(d) for d in run_dirs) >= 2, what="two runs to start")
    time.sleep(0.3)  # a run started beyond the limit would show up here
    assert sum(started(d) for d in run_dirs) == 2
    assert sum(status_of(d)["state"] == "PENDING" for d in run_dirs) >= 4
    go.touch()
    for i, job in enumerate(jobs):
        assert job.wait(timeout=60) is State.COMPLETED
        assert job.result() == i
    cur, peak = map(int, counter.read_text().split())
    assert cur == 0
    assert peak == 2


def test_local_cancel_running_and_queued(tmp_path, log_dir, wait_until):
    never = str(tmp_path / "never")
    sweep = run_sweep(
        start_then_block,
        [{"go": never, "i": i} for i in range(3)],
        exp_name="cancel",
        mode="local",
        max_parallel=1,
        skip_wait=True,
    )
    running, queued, queued2 = sweep
    wait_until(lambda: started(running.run_dir), what="the first run to start")
    queued.cancel()
    assert queued.state is State.CANCELLED
    queued2.cancel()
    running.cancel()
    assert running.wait(timeout=30) is State.CANCELLED
    sweep.cancel()  # a no-op for runs that are over
    assert sweep.wait(timeout=30).states() == [State.CANCELLED] * 3
    assert status_of(running.run_dir)["exit_code"] == 143
    # the dispatcher skips the cancelled runs and ends; they never started
    wait_until(lambda: supervisor_gone(running), what="the dispatcher to exit")
    for job in (queued, queued2):
        status = status_of(job.run_dir)
        assert status["state"] == "CANCELLED"
        assert "RUNNING" not in [h[0] for h in status["history"]]
        assert not started(job.run_dir)
    assert Job.load(queued.run_dir).state is State.CANCELLED


def test_local_cancel_single_running_run(tmp_path, log_dir, wait_until):
    job = run_experiment(
        start_then_block,
        exp_name="cancel1",
        mode="local",
        variant={"go": str(tmp_path / "never")},
        skip_wait=True,
    )
    wait_until(lambda: started(job.run_dir), what="the run to start")
    job.cancel()
    assert job.wait(timeout=30) is State.CANCELLED
    assert status_of(job.run_dir)["exit_code"] == 143
    assert Job.load(job.run_dir).state is State.CANCELLED


# -- local_pool ------------------------------------------------------------------------------


def test_local_pool_single_run(log_dir):
    job = run_experiment(identify, exp_name="pool1", mode="local_pool", variant={"i": 9})
    assert job.state is State.COMPLETED
    out = job.result()
    assert out["i"] == 9 and out["pid"] != os.getpid() and out["dir"] == str(job.run_dir)
    assert "identify 9" in job.stdout()
    for name in (
        "manifest.json",
        "variant.json",
        "payload.pkl",
        "status.json",
        "stdout.log",
        "stderr.log",
        "result.pkl",
    ):
        assert (job.run_dir / name).is_file(), name


def test_local_pool_sweep_of_50(log_dir, run_dirs):
    sweep = run_sweep(identify, grid({"i": range(50)}), exp_name="pool50", mode="local_pool")
    assert len(sweep) == 50
    assert sweep.states() == [State.COMPLETED] * 50
    results = sweep.results()
    assert [r["i"] for r in results] == list(range(50))
    pids = {r["pid"] for r in results}
    assert len(pids) == 50 and os.getpid() not in pids  # each run its own process
    assert sorted(run_dirs()) == sorted(j.run_dir for j in sweep)
    for i, job in enumerate(sweep):
        assert results[i]["dir"] == str(job.run_dir)
        for name in ("manifest.json", "variant.json", "payload.pkl", "status.json", "result.pkl"):
            assert (job.run_dir / name).is_file(), (i, name)
        assert f"identify {i}\n" in job.stdout()
        assert json.loads((job.run_dir / "variant.json").read_text()) == {"i": i}
        assert status_of(job.run_dir)["pid"] == results[i]["pid"]


def test_local_pool_dead_children_fail_others_complete(log_dir):
    variants = [{"i": 0}, {"i": 1, "die": "exit"}, {"i": 2}, {"i": 3, "die": "kill"}, {"i": 4}]
    sweep = run_sweep(die_or_return, variants, exp_name="pooldie", mode="local_pool", max_parallel=2)
    assert sweep.states() == [State.COMPLETED, State.FAILED, State.COMPLETED, State.FAILED, State.COMPLETED]
    results = sweep.results(return_exceptions=True)
    assert [results[i] for i in (0, 2, 4)] == [0, 20, 40]
    for i in (1, 3):
        assert "exited without recording" in status_of(sweep[i].run_dir)["message"]
        assert Job.load(sweep[i].run_dir).state is State.FAILED


def test_local_pool_cancel_running_and_queued(tmp_path, log_dir, wait_until):
    never = str(tmp_path / "never")
    sweep = run_sweep(
        start_then_block,
        [{"go": never, "i": i} for i in range(3)],
        exp_name="poolcancel",
        mode="local_pool",
        max_parallel=1,
        skip_wait=True,
    )
    wait_until(lambda: started(sweep[0].run_dir), what="the first run to start")
    sweep.cancel()
    assert sweep.wait(timeout=30).states() == [State.CANCELLED] * 3
    assert status_of(sweep[0].run_dir)["exit_code"] == 143
    wait_until(lambda: supervisor_gone(sweep[0]), what="the pool supervisor to exit")
    for job in sweep[1:]:
        assert status_of(job.run_dir)["state"] == "CANCELLED"
        assert not started(job.run_dir)
        assert "RUNNING" not in [h[0] for h in status_of(job.run_dir)["history"]]


MAIN_FUNCTION = """
    import json
    from easylaunch import run_sweep

    def from_main(doodad_config, variant):
        print("main says", variant["i"])
        return {{"i": variant["i"], "module": __name__}}

    sweep = run_sweep(from_main, [{{"i": i}} for i in range(3)], exp_name="mainfn", mode={mode!r})
    print(json.dumps({{"results": sweep.results(), "dirs": [str(j.run_dir) for j in sweep]}}))
"""


@pytest.mark.parametrize("mode", ["local", "local_pool"])
def test_function_defined_in_the_launch_scripts_main(mode, log_dir, run_script):
    proc = run_script(MAIN_FUNCTION.format(mode=mode), timeout=60)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert data["results"] == [{"i": i, "module": "__main__"} for i in range(3)]
    for i, run_dir in enumerate(data["dirs"]):
        job = Job.load(run_dir)
        assert job.state is State.COMPLETED
        assert f"main says {i}" in job.stdout()


def test_here_sweep_stopped_by_an_exception_leaves_no_run_pending(log_dir):
    variants = [{"k": "ok", "i": 0}, {"k": "bad", "i": 1}, {"k": "ok", "i": 2}]

    def fail_on_bad(doodad_config, variant):
        if variant["k"] == "bad":
            raise KeyError("bad variant")
        return variant["i"]

    with pytest.raises(KeyError):
        run_sweep(fail_on_bad, variants, exp_name="here-stop", mode="here_no_doodad")
    runs = sorted(load_experiment("here-stop"), key=lambda j: j.run_dir.name)
    assert [j.variant["i"] for j in runs] == [0, 1, 2]
    assert runs[0].result() == 0
    assert runs[1].state is State.FAILED
    # the variant after the failure never ran, and must not wait forever as PENDING
    assert runs[2].wait(timeout=5) is State.CANCELLED
    assert "RUNNING" not in [h[0] for h in status_of(runs[2].run_dir)["history"]]


@pytest.mark.parametrize("value", [0, -1])
def test_max_parallel_must_be_positive(value, log_dir, run_dirs):
    with pytest.raises(ValueError, match="max_parallel"):
        run_sweep(identify, [{"i": 0}, {"i": 1}], exp_name="mp", mode="local", max_parallel=value)
    with pytest.raises(ValueError, match="max_parallel"):
        run_sweep(identify, [{"i": 0}, {"i": 1}], exp_name="mp", mode="local_pool", max_parallel=value)
    assert run_dirs() == []
