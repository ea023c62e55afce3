"""easylaunch.Executor (concurrent.futures / submitit style) and Job as a concurrent.futures.Future.

Runs on the real local modes (local, local_pool, here_no_doodad); the Slurm side of the
Executor is in test_submitit_compat.py.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import pickle
import signal
import threading
import time
from pathlib import Path

import pytest

import easylaunch
from easylaunch import DelayedSubmission, Executor, Job, JobCancelled, JobError, State, run_sweep
from easylaunch.executor import SUBMITIT_NAMES, _Call, submitit_table
from easylaunch.job import NotLaunchedError, RemoteTraceback

pytestmark = pytest.mark.filterwarnings("ignore:not in a git repository")

# -- functions the runs call (module level: the runner imports them by reference) ------------


def scale(x, factor=1):
    config = easylaunch.current()
    return {"value": x * factor, "run_dir": config.base_log_dir if config else None, "pid": os.getpid()}


def boom(x):
    raise ValueError(f"boom {x}")


def nap(seconds, tag=None):
    time.sleep(seconds)
    return tag


def wait_for_file(path, limit=60):
    Path(path + ".started").touch()
    deadline = time.time() + limit
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.02)
    return "released"


class Point:
    """Not JSON: shows up as its repr in variant.json, travels as itself in the payload."""

    def __init__(self, x):
        self.x = x

    def __repr__(self):
        return f"Point({self.x})"


def norm(p, scale=1):
    return abs(p.x) * scale


class Resumable:
    """submitit-style checkpointable callable."""

    def __init__(self, done=0):
        self.done = done

    def __call__(self, steps):
        return self.done + steps

    def checkpoint(self, steps):
        return DelayedSubmission(Resumable(self.done + 100), steps + 1)


class Declines(Resumable):
    def checkpoint(self, steps):
        return None


# -- the Executor on local modes ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["local", "local_pool", "here_no_doodad"])
def test_submit_map_batch_and_current(mode, log_dir):
    assert easylaunch.current() is None
    with Executor(mode=mode, exp_name="ex") as ex:
        job = ex.submit(scale, 3, factor=2)
        assert isinstance(job, cf.Future) and isinstance(job, Job)
        out = job.result(timeout=60)
        assert out["value"] == 6
        assert out["run_dir"] == str(job.run_dir)  # easylaunch.current() inside the run
        assert [r["value"] for r in ex.map(scale, [1, 2, 3], [10, 10, 10], timeout=60)] == [10, 20, 30]
        jobs = ex.map_array(scale, range(4))
        assert sorted(j.result()["value"] for j in cf.as_completed(jobs, timeout=60)) == [0, 1, 2, 3]
        with ex.batch():
            batched = [ex.submit(scale, i) for i in range(3)] + [ex.submit(boom, 7)]
        done, not_done = cf.wait(batched, timeout=60)
        assert len(done) == 4 and not not_done
    assert easylaunch.current() is None
    # one launch per map_array and per batch: their runs share one batch id
    assert len({j.manifest["batch_id"] for j in jobs}) == 1
    assert len({j.manifest["batch_id"] for j in batched}) == 1
    assert jobs[0].manifest["batch_id"] != batched[0].manifest["batch_id"]
    assert [j.result()["value"] for j in batched[:3]] == [0, 1, 2]
    assert [j.result()["run_dir"] for j in batched[:3]] == [str(j.run_dir) for j in batched[:3]]
    with pytest.raises(ValueError, match="boom 7") as info:
        batched[-1].result()
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert batched[-1].state is State.FAILED
    # the manifest names the user's function, the variant records the call
    assert jobs[1].manifest["function"] == f"{__name__}.scale"
    assert jobs[1].variant == {"function": f"{__name__}.scale", "args": [1], "kwargs": {}}
    assert job.variant["kwargs"] == {"factor": 2}


def test_variant_is_json_friendly_while_the_real_arguments_travel(log_dir):
    with Executor(mode="local_pool", exp_name="args") as ex:
        job = ex.submit(norm, Point(-4), scale=[1, 2][1])
        assert job.result(timeout=60) == 8
    data = json.loads((job.run_dir / "variant.json").read_text())
    assert data == {"function": f"{__name__}.norm", "args": ["Point(-4)"], "kwargs": {"scale": 2}}
    assert json.loads((job.run_dir / "manifest.json").read_text())["variant"] == data


def test_bad_calls_are_refused_before_anything_is_written(log_dir, run_dirs):
    ex = Executor(mode="local", exp_name="bad")
    with pytest.raises(TypeError, match="cannot be called with these arguments"):
        ex.submit(scale, 1, 2, 3)
    with pytest.raises(TypeError, match="needs a callable"):
        ex.submit(42)
    with pytest.raises(ValueError, match="exp_name"):
        Executor(exp_name="../up")
    with pytest.raises(ValueError, match="unknown mode 'slrum'.*'slurm'"):
        Executor(mode="slrum")
    assert run_dirs() == []


def test_map_timeout_and_unstarted_runs_are_cancelled(log_dir, tmp_path):
    release = str(tmp_path / "go")
    with Executor(mode="local", exp_name="maptimeout", max_parallel=1) as ex:
        results = ex.map(wait_for_file, [release, release + "2", release + "3"], timeout=1.0)
        deadline = time.monotonic() + 60  # a loaded machine may take longer than the timeout to start it
        while not Path(release + ".started").exists():
            assert time.monotonic() < deadline, "the first run never started"
            time.sleep(0.05)
        with pytest.raises(cf.TimeoutError):
            next(results)
        results.close()  # as with a thread pool: runs not started yet are cancelled
        Path(release).touch()
        jobs = ex.jobs
        assert jobs[0].result(timeout=60) == "released"
        assert [j.wait(timeout=60) for j in jobs[1:]] == [State.CANCELLED, State.CANCELLED]
        assert not Path(release + "2.started").exists()


def test_wait_first_exception_and_callbacks(log_dir):
    calls = []
    seen = threading.Event()
    with Executor(mode="local_pool", exp_name="fx") as ex:
        slow = ex.submit(nap, 30)
        bad = ex.submit(boom, 1)
        bad.add_done_callback(lambda f: (calls.append((f, threading.current_thread().name)), seen.set()))
        done, not_done = cf.wait([slow, bad], timeout=60, return_when=cf.FIRST_EXCEPTION)
        assert done == {bad} and not_done == {slow}
        assert seen.wait(10)
        assert calls == [(bad, "easylaunch-watcher")]  # once, from the executor's one watcher thread
        assert isinstance(bad.exception(), ValueError)
        late = []
        bad.add_done_callback(late.append)  # already done: called at once, here
        assert late == [bad]
        assert slow.running() or slow.state is State.PENDING
        assert slow.cancel() is True
        assert slow.wait(timeout=30) is State.CANCELLED
        assert slow.cancelled() and slow.done()
        assert slow.cancel() is False  # over
        with pytest.raises(cf.CancelledError) as info:
            slow.result()
        assert isinstance(info.value, JobCancelled) and isinstance(info.value, JobError)
        assert set(cf.as_completed([slow, bad], timeout=10)) == {slow, bad}


def test_batch_rules(log_dir, run_dirs):
    ex = Executor(mode="local_pool", exp_name="batchrules")
    with ex.batch():
        job = ex.submit(scale, 1)
        with pytest.raises(NotLaunchedError, match="inside `with executor.batch\\(\\):`"):
            job.run_dir  # noqa: B018
        assert "not launched" in repr(job)
        with pytest.raises(RuntimeError, match="Changing parameters"):
            ex.update_parameters(max_parallel=2)
        with pytest.raises(RuntimeError, match="Nesting"):
            with ex.batch():
                pass
        waiting = []
        job.add_done_callback(waiting.append)  # completed once the batch has launched and run
    assert job.result(timeout=60)["value"] == 1
    for _ in range(100):
        if waiting:
            break
        time.sleep(0.05)
    assert waiting == [job]
    before = run_dirs()
    with pytest.raises(KeyError):
        with ex.batch():
            dropped = ex.submit(scale, 2)
            raise KeyError("stop")
    assert run_dirs() == before  # dropped: nothing launched
    assert cf.wait([dropped], timeout=5).done == {dropped}  # its Future ends cancelled
    assert dropped.cancelled() and dropped.done() and dropped.cancel() is False
    with pytest.raises(JobCancelled, match="dropped"):
        dropped.result()
    with pytest.raises(NotLaunchedError, match="dropped"):
        dropped.run_dir  # noqa: B018
    with pytest.warns(RuntimeWarning, match="No submission"):
        with ex.batch():
            pass
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(scale, 1)


def test_shutdown_cancel_futures_cancels_only_queued_runs(log_dir, tmp_path):
    release = str(tmp_path / "go")
    ex = Executor(mode="local", exp_name="shutdown", max_parallel=1)
    jobs = ex.map_array(wait_for_file, [release] * 3)
    for _ in range(500):
        if Path(release + ".started").exists():
            break
        time.sleep(0.02)
    threading.Timer(1.0, lambda: Path(release).touch()).start()
    ex.shutdown(wait=True, cancel_futures=True)
    assert [j.last_state for j in jobs] == [State.COMPLETED, State.CANCELLED, State.CANCELLED]
    assert all(j.done() for j in jobs)


def test_here_mode_failure_is_in_the_future_not_raised_by_submit(log_dir):
    with Executor(mode="here_no_doodad", exp_name="here") as ex:
        job = ex.submit(boom, 3)  # runs right here, inside submit
        assert job.done() and isinstance(job.exception(), ValueError)


# -- Job as a Future, for every launch ---------------------------------------------------------


def plain(doodad_config, variant):
    return variant["x"] * 2


def test_run_sweep_jobs_work_with_concurrent_futures(log_dir):
    sweep = run_sweep(
        plain, [{"x": i} for i in range(5)], exp_name="plain", mode="local_pool", skip_wait=True
    )
    assert all("_condition" not in j.__dict__ for j in sweep)  # no lock per Job until used
    assert sorted(f.result() for f in cf.as_completed(sweep, timeout=60)) == [0, 2, 4, 6, 8]
    loaded = Job.load(sweep[2].run_dir)
    assert cf.wait([loaded], timeout=10).done == {loaded} and loaded.result() == 4
    # a Job stays a picklable handle on its run directory, Future side or not
    again = pickle.loads(pickle.dumps(sweep[3]))
    assert again.result() == 6 and again.run_dir == sweep[3].run_dir


def test_many_jobs_are_cheap_until_waited_on(tmp_path):
    began = time.perf_counter()
    jobs = [Job(tmp_path / f"r{i}", _resolved=True) for i in range(10000)]
    took = time.perf_counter() - began
    assert all(
        set(j.__dict__) == {"run_dir", "_mode", "_manifest", "_status", "_run_state", "_watcher"}
        for j in jobs
    )
    assert took < 2.0, f"10,000 Job handles took {took:.2f} s"


# -- checkpoints: the wrapper and the hook -------------------------------------------------


def test_checkpoint_is_forwarded_to_the_wrapped_callable():
    call = _Call([Resumable(5)])
    assert getattr(_Call([scale]), "checkpoint", None) is None  # plain functions: no checkpoint
    variant = {"fn": 0, "args": (1,), "kwargs": {}}
    assert call(None, variant) == 6
    resumed = call.checkpoint(None, variant)
    assert isinstance(resumed, _Call) and resumed(None, variant) == 105 + 2  # its own arguments
    assert _Call([Declines()]).checkpoint(None, variant) is None
    assert pickle.loads(pickle.dumps(resumed))(None, {}) == 107


def test_a_declined_checkpoint_ends_as_timeout(tmp_path):
    from easylaunch import records
    from easylaunch.environments import JobEnvironment
    from easylaunch.runner import RunInterrupted
    from easylaunch.taskrunner import make_checkpoint_hook

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records.write_status(run_dir, State.RUNNING, attempt=1)
    hook = make_checkpoint_hook(3, JobEnvironment())
    usr2 = RunInterrupted(signal.SIGUSR2)
    variant = {"fn": 0, "args": (1,), "kwargs": {}}
    assert hook(run_dir, _Call([Declines()]), None, variant, usr2) is None  # -> recorded as TIMEOUT
    assert hook(run_dir, _Call([scale]), None, variant, usr2) is None


# -- parameters: easylaunch's and submitit's names ---------------------------------------------


def test_submitit_names_map_to_easylaunch_options():
    ex = Executor(mode="slurm", exp_name="p")
    ex.update_parameters(
        timeout_min=30,
        slurm_partition="debug",
        slurm_array_parallelism=4,
        cpus_per_task=2,
        gpus_per_node=1,
        mem_gb=0.5,
        name="renamed",
        slurm_additional_parameters={"mail_type": "END", "exclusive": True, "comment": "two words"},
        slurm_signal_delay_s=30,
        slurm_max_num_timeout=1,
        tasks_per_node=1,
    )
    assert ex.exp_name == "renamed"
    assert ex.parameters == {
        "time_in_mins": 30,
        "max_parallel": 4,
        "use_gpu": True,
        "signal_before_timeout": 30,
        "max_requeue": 1,
        "slurm_options": {
            "partition": "debug",
            "n_cpus_per_task": 2,
            "n_gpus": 1,
            "mem": "512M",
            "extra_flags": "--comment='two words' --exclusive --mail-type=END",
        },
    }
    ex.update_parameters(slurm_comment="c", mem_gb=4, slurm_options={"qos": "normal"})
    assert ex.parameters["slurm_options"]["mem"] == "4G"
    assert ex.parameters["slurm_options"]["qos"] == "normal"
    assert ex.parameters["slurm_options"]["extra_flags"].endswith("--comment=c")


def test_parameter_errors_name_the_fix():
    ex = Executor(mode="slurm")
    with pytest.raises(TypeError, match="unknown parameter 'slurm_partiton'; did you mean 'slurm_partition'"):
        ex.update_parameters(slurm_partiton="x")
    with pytest.raises(TypeError, match="did you mean 'max_parallel'"):
        ex.update_parameters(max_paralel=3)
    with pytest.raises(TypeError, match="slurm_setup.*no easylaunch counterpart"):
        ex.update_parameters(slurm_setup=["module load x"])
    with pytest.raises(ValueError, match="tasks_per_node=4: only 1"):
        ex.update_parameters(tasks_per_node=4)
    with pytest.raises(TypeError, match="max_parallel=.*expects int"):
        ex.update_parameters(slurm_array_parallelism="many")
    local = Executor(mode="local")
    with pytest.raises(
        TypeError, match="'timeout_min' \\(it sets easylaunch's 'time_in_mins'\\) is not used by mode 'local'"
    ):
        local.update_parameters(timeout_min=5)
    local.update_parameters(gpus_per_node=0, slurm_array_parallelism=None)  # None: unset
    assert local.parameters == {"use_gpu": False}  # the GPU count itself is Slurm's


def test_readme_has_the_mapping_table():
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    assert submitit_table() in text, (
        "README's submitit table is stale: paste easylaunch.executor.submitit_table()"
    )
    assert all(f"`{name}`" in text for name in SUBMITIT_NAMES)


def test_import_stays_light():
    import subprocess
    import sys

    code = (
        "import sys, easylaunch; first = sorted(m for m in sys.modules if m == 'easylaunch' or m.startswith('easylaunch.')); "
        "easylaunch.Executor, easylaunch.current, easylaunch.Job; import easylaunch.submitit_compat; "
        "print(first, 'hydra' in sys.modules, 'concurrent.futures' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.split() == ["['easylaunch']", "False", "True"]  # names load lazily; never hydra
