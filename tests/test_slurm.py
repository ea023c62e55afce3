"""The ``slurm`` and ``slurm_singularity`` modes against the REAL single-node Slurm (and Apptainer).

No mocks: every test submits to the cluster started by scripts/services/slurm.sh (8 one-CPU
slots, partitions ``debug`` and ``short``, slurmdbd so sacct works). PATH shims are used only to
*count* calls of the real binaries, to hide sbatch, or to make a second sbatch call fail.

The job functions below are pickled by value (the image used by the singularity tests has
neither pytest nor this file), so they must not touch pytest.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import cloudpickle
import pytest
from conftest import require_service
from conftest import wait_for as _wait_for
from txlog_checks import check_complete, check_csv, check_png

from easylaunch import Job, State, records, run_sweep, timeline, txlog
from easylaunch.cli import main
from easylaunch.modes.slurm import SlurmMode, SubmitError
from easylaunch.slurm_config import SlurmConfigError

# the predicates here ask squeue/scontrol: poll them gently
wait_for = functools.partial(_wait_for, interval=0.2)

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.timeout(240), pytest.mark.filterwarnings("ignore:not in a git repository")]

TERMINAL = {State.COMPLETED, State.FAILED, State.CANCELLED, State.TIMEOUT, State.PREEMPTED}

CONFIG = """
SLURM_CONFIGS = {
    "cpu": {"partition": "debug", "time_in_mins": 10},
    "shortq": {
        "account_name": "root",
        "partition": "short",
        "time_in_mins": 7,
        "max_num_cores_per_node": 8,
        "n_cpus_per_task": 2,
        "n_nodes": 1,
        "mem": "64M",
        "qos": "normal",
        "extra_flags": "--comment 'easylaunch test' --nice=5",  # doodad style: flag, space, value
    },
    "gpu": {"partition": "short", "n_gpus": 1, "time_in_mins": 5},
    "nopart": {"partition": "nosuchpartition"},
}
SINGULARITY_IMAGE = _image
"""


# -- job functions (run on the cluster) ---------------------------------------------------------


def square(doodad_config, variant):
    print(f"stdout of {variant['x']}")
    print(f"stderr of {variant['x']}", file=sys.stderr)
    return variant["x"] ** 2


def trivial(doodad_config, variant):
    return variant["x"]


def timed_sleep(doodad_config, variant):
    start = time.time()
    time.sleep(variant.get("sleep", 0))
    return {"start": start, "end": time.time(), "x": variant.get("x")}


def misbehave(doodad_config, variant):
    kind = variant["kind"]
    print(f"{kind} starting in {doodad_config.base_log_dir}", flush=True)
    Path(doodad_config.base_log_dir, "own-file.txt").write_text(kind)
    if kind == "raise":
        raise ValueError("boom from a packed variant")
    if kind == "exit":
        os._exit(3)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "killtask":  # the whole task (runner included) dies: only Slurm can tell
        os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "sleep":
        time.sleep(variant.get("sleep", 30))
    return f"{kind} ok"


def where_am_i(doodad_config, variant):
    return {
        "executable": sys.executable,
        "container": os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER"),
        "run_dir": doodad_config.base_log_dir,
        "job": os.environ.get("SLURM_ARRAY_JOB_ID"),
        "cloudpickle": cloudpickle.__version__,
    }


def wait_for_signal(doodad_config, variant):
    print("started", flush=True)
    Path(doodad_config.base_log_dir, "started").touch()
    for _ in range(600):
        time.sleep(0.1)
    return "never interrupted"


def ignore_usr2(doodad_config, variant):
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    print("ignoring USR2", flush=True)
    time.sleep(300)
    return "not stopped"


class Counter:
    """Checkpointable: counts ``steps`` ticks; ``checkpoint`` returns a Counter resuming there."""

    def __init__(self, steps: int, done: int = 0, tick: float = 0.25):
        self.steps, self.done, self.tick = steps, done, tick

    def __call__(self, doodad_config, variant):
        print(f"resuming at {self.done}", flush=True)
        Path(doodad_config.base_log_dir, f"started-at-{self.done}").touch()
        while self.done < self.steps:
            time.sleep(self.tick)
            self.done += 1
            Path(doodad_config.base_log_dir, "progress").write_text(str(self.done))
        return {"done": self.done}

    def checkpoint(self, doodad_config, variant):
        print(f"checkpoint at {self.done}", flush=True)
        return Counter(self.steps, self.done, self.tick)


# -- helpers -----------------------------------------------------------------------------------


def sh(*cmd: str, check: bool = True) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed: {proc.stderr}")
    return proc.stdout


def show_job(job_id: str) -> dict:
    out = sh("scontrol", "-o", "show", "job", job_id, check=False)
    return dict(tok.split("=", 1) for tok in out.split() if "=" in tok)


def squeue_names() -> str:
    return sh("squeue", "-h", "-o", "%j %i %T")


def backend(job: Job) -> dict:
    return job.manifest["backend"]


def array_ids(sweep) -> list:
    return sorted({backend(j)["array_job_id"] for j in sweep}, key=int)


@pytest.fixture
def slurm(tmp_path, monkeypatch, log_dir, request):
    """Config file (SLURM_CONFIGS, SINGULARITY_IMAGE) via $EASYLAUNCH_CONFIG and a tiny code dir."""
    require_service("slurm")
    if any("slow" in getattr(item, "fixturenames", ()) for item in request.session.items):
        request.getfixturevalue("slow")  # the background scenarios start with the first Slurm test
    image = os.environ.get("EASYLAUNCH_TEST_SINGULARITY_IMAGE", "")
    config = tmp_path / "easylaunch_config.py"
    config.write_text(f"_image = {image!r}\n" + CONFIG)
    monkeypatch.setenv("EASYLAUNCH_CONFIG", str(config))
    code = tmp_path / "code"
    code.mkdir()
    (code / "helper.py").write_text("VALUE = 1\n")
    exp = f"el{os.getpid()}x{int(time.time() * 1000) % 10**8}"
    state = SimpleNamespace(code=code, config=config, exp=exp, log_dir=log_dir, tmp=tmp_path, jobs=[])

    def launch(fn, variants, **options):
        options.setdefault("code_dirs_to_mount", [str(code)])
        sweep = run_sweep(
            fn, variants, exp_name=options.pop("exp_name", exp), mode=options.pop("mode", "slurm"), **options
        )
        state.jobs.extend(array_ids(sweep))
        return sweep

    state.launch = launch
    yield state
    if state.jobs:  # never leave anything queued for the next test
        subprocess.run(["scancel", *state.jobs], capture_output=True, timeout=30)


def counting_shim(tmp_path: Path, monkeypatch, name: str) -> Path:
    """Put a ``name`` wrapper first on PATH that logs each call, then runs the real binary."""
    real = subprocess.run(["which", name], capture_output=True, text=True).stdout.strip()
    shim_dir = tmp_path / f"shim-{name}"
    shim_dir.mkdir(exist_ok=True)
    log = tmp_path / f"{name}.calls"
    log.touch()
    shim = shim_dir / name
    shim.write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec {real} "$@"\n')
    shim.chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim_dir}:{os.environ['PATH']}")
    return log


def calls(log: Path) -> int:
    return len(log.read_text().splitlines())


# -- submission, rendering, directives ---------------------------------------------------------


def test_sweep_is_one_array_job_with_results_logs_and_manifest(slurm, tmp_path, monkeypatch):
    sbatch_log = counting_shim(tmp_path, monkeypatch, "sbatch")
    sweep = slurm.launch(square, [{"x": i} for i in range(5)])
    assert calls(sbatch_log) == 1
    assert "--parsable" in sbatch_log.read_text()
    ids = array_ids(sweep)
    assert len(ids) == 1
    assert [j.job_id for j in sweep] == [f"{ids[0]}_{i}" for i in range(5)]
    assert sweep.results(timeout=90) == [0, 1, 4, 9, 16]
    for i, job in enumerate(sweep):
        assert job.state is State.COMPLETED
        assert job.stdout() == f"stdout of {i}\n"
        assert job.stderr() == f"stderr of {i}\n"
        b = Job.load(job.run_dir).manifest["backend"]
        assert b["job_id"] == f"{ids[0]}_{i}" and b["array_job_id"] == ids[0] and b["slurm_config"] == "cpu"
        status = records.read_status(job.run_dir)
        assert status["attempt"] == 1 and status["exit_code"] == 0
    # sacct agrees, once slurmdbd has caught up (the status files were faster)
    expected = sorted(f"{ids[0]}_{i}|COMPLETED" for i in range(5))
    wait_for(
        lambda: sorted(sh("sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ids[0]).split()) == expected,
        30,
        "sacct to report the tasks COMPLETED",
    )
    # one script, rendered from the template
    scripts = list((sweep[0].run_dir.parent / ".batches").glob("*/submit_*.sbatch"))
    assert len(scripts) == 1
    text = scripts[0].read_text()
    assert "#SBATCH --array=0-4\n" in text and "#SBATCH --partition=debug" in text
    assert "#SBATCH --signal=B:USR2@90" in text and "--time=10" in text


def test_named_config_directives_reach_slurm(slurm):
    sweep = slurm.launch(trivial, [{"x": 1}, {"x": 2}], slurm_config_name="shortq", hold=True, max_parallel=1)
    (job_id,) = array_ids(sweep)
    info = show_job(job_id)
    assert info["Partition"] == "short"
    assert info["TimeLimit"] == "00:07:00"
    assert info["NumCPUs"] == "2" and info["NumNodes"] in ("1", "1-1")
    assert "mem=64M" in info["TRES"]
    assert info["QOS"] == "normal" and info["Account"] == "root"
    assert info["Comment"] == "easylaunch"  # `scontrol -o` splits at spaces: see the full value below
    assert "Comment=easylaunch test " in sh("scontrol", "show", "job", job_id)
    assert info["Nice"] == "5"
    assert info["Priority"] == "0" and info["JobState"] == "PENDING"  # held
    assert info["ArrayTaskId"] == "0-1%1"
    assert sweep.states() == [State.PENDING, State.PENDING]
    assert backend(sweep[0])["slurm_config"] == "shortq"
    sh("scontrol", "release", job_id)
    assert sweep.results(timeout=90) == [1, 2]


def test_hostile_log_dir_and_sbatch_values_arrive_intact(slurm):
    """Issue 7 items 14/15: a log dir with blanks, quotes, '$', '#', '%' and unicode, and an
    extra_flags value with all of those, reach sbatch intact (one #SBATCH renderer)."""
    comment = 'it\'s "q" #1 $(touch PWNED) `x` back\\slash 100% ü'
    logs = slurm.tmp / 'logs it\'s "q" $(touch PWNED) #h 100%x ü'
    sweep = slurm.launch(
        square,
        [{"x": 3}],
        base_log_dir=str(logs),
        slurm_options={"extra_flags": "--comment=" + shlex.quote(comment)},
    )
    (job_id,) = array_ids(sweep)
    assert sweep[0].run_dir.is_relative_to(logs)
    assert sweep.results(timeout=90) == [9]
    text = sh("scontrol", "show", "job", job_id)
    assert f"Comment={comment}" in [line.strip() for line in text.splitlines()], text
    outputs = list((sweep[0].run_dir.parent / ".batches").glob("*/slurm/*.out"))
    assert [p.name for p in outputs] == [f"{job_id}_0.out"], outputs  # '%' of the path kept, %A/%a replaced
    assert not list(slurm.tmp.rglob("PWNED"))


def test_time_in_mins_option_overrides_and_takes_slurm_time_strings(slurm):
    sweep = slurm.launch(trivial, [{"x": 3}], slurm_config_name="shortq", time_in_mins="0:02:30", hold=True)
    info = show_job(array_ids(sweep)[0])
    assert info["TimeLimit"] == "00:03:00"  # rounded up to whole minutes
    assert info["Partition"] == "short"
    sweep.cancel()
    assert sweep[0].wait(timeout=30) is State.CANCELLED


def test_chunks_only_where_max_array_size_demands(slurm, monkeypatch, tmp_path):
    sbatch_log = counting_shim(tmp_path, monkeypatch, "sbatch")
    monkeypatch.setattr(SlurmMode, "max_array_size", lambda self: 2)
    sweep = slurm.launch(trivial, [{"x": i} for i in range(5)])
    assert calls(sbatch_log) == 3
    ids = array_ids(sweep)
    assert len(ids) == 3
    assert [j.job_id for j in sweep] == [
        f"{ids[0]}_0",
        f"{ids[0]}_1",
        f"{ids[1]}_0",
        f"{ids[1]}_1",
        f"{ids[2]}_0",
    ]
    assert sweep.results(timeout=90) == [0, 1, 2, 3, 4]


def test_max_array_size_is_read_from_the_cluster(slurm):
    out = sh("scontrol", "show", "config")
    expected = int(next(line.split("=")[1] for line in out.splitlines() if line.startswith("MaxArraySize")))
    assert SlurmMode({}).max_array_size() == expected


def test_max_parallel_limits_concurrent_tasks(slurm):
    sweep = slurm.launch(timed_sleep, [{"sleep": 2, "x": i} for i in range(4)], max_parallel=2)
    assert show_job(array_ids(sweep)[0])["ArrayTaskThrottle"] == "2"
    spans = [(r["start"], r["end"]) for r in sweep.results(timeout=120)]
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, delta in events:
        running += delta
        peak = max(peak, running)
    assert peak <= 2


# -- packing -----------------------------------------------------------------------------------


def test_packed_task_isolates_failing_variants(slurm):
    kinds = ["ok", "raise", "exit", "kill", "ok"]
    sweep = slurm.launch(misbehave, [{"kind": k} for k in kinds], variants_per_task=5)
    ids = array_ids(sweep)
    assert len(ids) == 1 and {j.job_id for j in sweep} == {f"{ids[0]}_0"}
    sweep.wait(timeout=90)
    assert sweep.states() == [State.COMPLETED, State.FAILED, State.FAILED, State.FAILED, State.COMPLETED]
    assert sweep[0].result() == "ok ok" and sweep[4].result() == "ok ok"
    with pytest.raises(ValueError, match="boom from a packed variant"):
        sweep[1].result()
    assert "(exit code 3)" in records.read_status(sweep[2].run_dir)["message"]
    assert "(killed by SIGKILL)" in records.read_status(sweep[3].run_dir)["message"]
    assert records.read_status(sweep[3].run_dir)["exit_code"] == -signal.SIGKILL
    for job, kind in zip(sweep, kinds):  # each variant had its own run dir and logs
        assert (job.run_dir / "own-file.txt").read_text() == kind
        assert job.stdout().startswith(f"{kind} starting in {job.run_dir}")
        assert records.read_status(job.run_dir)["attempt"] == 1


def test_cancel_one_packed_variant_leaves_its_task_mates(slurm):
    variants = [{"kind": "ok"}, {"kind": "sleep", "sleep": 60}, {"kind": "ok"}]
    sweep = slurm.launch(misbehave, variants, variants_per_task=3)
    wait_for(lambda: sweep[1].stdout(), 60, "the sleeping variant to start")
    sweep[1].cancel()
    assert sweep[1].wait(timeout=30) is State.CANCELLED
    assert sweep[2].result(timeout=30) == "ok ok"
    assert sweep.states() == [State.COMPLETED, State.CANCELLED, State.COMPLETED]


def test_expected_duration_picks_variants_per_task(slurm):
    cpus = int(os.environ.get("EASYLAUNCH_TEST_SLURM_CPUS", "8"))
    n = 3 * cpus
    sweep = slurm.launch(trivial, [{"x": i} for i in range(n)], expected_duration=0.5)
    k = backend(sweep[0])["variants_per_task"]
    assert k == 3  # as many tasks as slots (a minute's work per task would be 120 variants)
    assert len({j.job_id for j in sweep}) == cpus
    assert sweep.results(timeout=90) == list(range(n))
    long = slurm.launch(
        trivial, [{"x": i} for i in range(4)], expected_duration=600, exp_name=slurm.exp + "b"
    )
    assert backend(long[0])["variants_per_task"] == 1
    assert long.results(timeout=90) == [0, 1, 2, 3]
    # two at a time: two tasks of 4 keep both busy; two CPUs per task on 8: four slots
    few = slurm.launch(
        trivial, [{"x": i} for i in range(8)], expected_duration=0.5, max_parallel=2, exp_name=slurm.exp + "c"
    )
    wide = slurm.launch(
        trivial,
        [{"x": i} for i in range(8)],
        expected_duration=0.5,
        exp_name=slurm.exp + "d",
        slurm_options={"n_cpus_per_task": 2},
    )
    assert backend(few[0])["variants_per_task"] == 4 and backend(wide[0])["variants_per_task"] == 2
    assert few.results(timeout=90) == wide.results(timeout=90) == list(range(8))


def test_task_waits_for_a_payload_written_after_submission(slurm, monkeypatch):
    """The array is submitted before the payloads are written: an early task waits for them."""
    monkeypatch.setenv("EASYLAUNCH_PAYLOAD_WAIT", "60")  # exported by sbatch into the task
    sweep = slurm.launch(
        misbehave, [{"kind": "ok"}, {"kind": "ok"}, {"kind": "ok"}], hold=True, variants_per_task=3
    )
    late, missing = sweep[0].run_dir / "payload.pkl", sweep[2].run_dir / "payload.pkl"
    late.rename(late.with_suffix(".later"))
    missing.unlink()
    # as if the launcher (this process) were still writing payloads (liveness.py)
    from easylaunch.liveness import LAUNCHER_FILE, identity

    launcher_file = sweep[0].run_dir.parent / ".batches" / sweep[0].manifest["batch_id"] / LAUNCHER_FILE
    assert json.loads(launcher_file.read_text())["done"] is True
    records.atomic_write_json(launcher_file, {**identity(), "done": False})
    sh("scontrol", "release", array_ids(sweep)[0])
    wait_for(lambda: "RUNNING" in show_job(sweep[0].job_id).get("JobState", ""), 60, "the task to start")
    time.sleep(1)
    assert sweep[0].state is State.PENDING  # waiting for its payload, not failed
    late.with_suffix(".later").rename(late)
    wait_for(lambda: sweep[1].state is State.COMPLETED, 60, "the second run")
    assert sweep[2].state is State.PENDING  # still waiting: the launcher is alive, not done
    records.atomic_write_json(launcher_file, {**identity(), "done": True})
    sweep.wait(timeout=20)  # gives up at once now, not after PAYLOAD_WAIT
    assert sweep.states() == [State.COMPLETED, State.COMPLETED, State.FAILED]
    assert "was never written" in records.read_status(sweep[2].run_dir)["message"]


# -- state polling -----------------------------------------------------------------------------


def test_sacct_calls_per_poll_do_not_grow_with_sweep_size(slurm, tmp_path, monkeypatch):
    sacct_log = counting_shim(tmp_path, monkeypatch, "sacct")
    small = slurm.launch(timed_sleep, [{"x": i} for i in range(5)], hold=True)
    big = slurm.launch(timed_sleep, [{"x": i} for i in range(40)], hold=True, exp_name=slurm.exp + "big")
    for sweep in (small, big):  # one poll of a held sweep: one sacct call whatever its size
        before = calls(sacct_log)
        assert sweep.states() == [State.PENDING] * len(sweep)
        assert calls(sacct_log) - before == 1
        assert "-S" in sacct_log.read_text().splitlines()[-1]
    counts = {}
    for sweep in (small, big):
        sh("scontrol", "release", array_ids(sweep)[0])
        before = calls(sacct_log)
        t0 = time.monotonic()
        sweep.wait(timeout=120)
        counts[len(sweep)] = (calls(sacct_log) - before, time.monotonic() - t0)
        assert sweep.states() == [State.COMPLETED] * len(sweep)
    print("sacct calls while waiting (calls, seconds):", counts)
    for n, (count, elapsed) in counts.items():  # at most one call per 5 s, never one per job
        assert count <= elapsed / 5 + 2, (n, count, elapsed)
    assert counts[40][0] < 40


def test_squeue_fallback_without_accounting(slurm, tmp_path, monkeypatch):
    sacct_log = counting_shim(tmp_path, monkeypatch, "sacct")
    squeue_log = counting_shim(tmp_path, monkeypatch, "squeue")
    sweep = slurm.launch(misbehave, [{"kind": "ok"}, {"kind": "kill"}, {"kind": "sleep", "sleep": 60}])
    sweep[0]._mode._accounting = False
    wait_for(lambda: sweep[2].stdout(), 60, "the sleeping run to start")
    assert sweep[2].state is State.RUNNING
    sh("scancel", sweep[2].job_id)
    sweep.wait(timeout=60)
    assert sweep.states() == [State.COMPLETED, State.FAILED, State.CANCELLED]
    assert calls(sacct_log) == 0 and calls(squeue_log) >= 1


def test_task_killed_without_any_record_is_failed_via_sacct(slurm):
    sweep = slurm.launch(misbehave, [{"kind": "killtask"}, {"kind": "ok"}], variants_per_task=2)
    assert sweep[0].wait(timeout=60) is State.FAILED
    assert sweep[1].wait(timeout=60) is State.FAILED
    for job in sweep:
        status = records.read_status(job.run_dir)
        assert status["state"] == State.FAILED
        assert status["message"] == f"Slurm task {job.job_id} ended as FAILED without this run's record"


def test_finished_run_is_seen_through_its_status_file_while_task_runs(slurm):
    sweep = slurm.launch(misbehave, [{"kind": "ok"}, {"kind": "sleep", "sleep": 60}], variants_per_task=2)
    assert sweep[0].wait(timeout=60) is State.COMPLETED
    task = show_job(sweep[0].job_id)
    assert task["JobState"] == "RUNNING"  # the Slurm task is still busy with the second variant
    sweep.cancel()
    assert sweep[1].wait(timeout=30) is State.CANCELLED


# -- cancel ------------------------------------------------------------------------------------


def test_scancel_one_task_by_hand(slurm):
    sweep = slurm.launch(misbehave, [{"kind": "sleep", "sleep": 60}, {"kind": "ok"}])
    wait_for(lambda: sweep[0].stdout(), 60, "the run to start")
    sh("scancel", sweep[0].job_id)
    assert sweep[0].wait(timeout=30) is State.CANCELLED
    assert records.read_status(sweep[0].run_dir)["state"] == State.CANCELLED  # the runner recorded it
    assert sweep[1].result(timeout=30) == "ok ok"


def test_sweep_cancel_running_and_pending(slurm):
    sweep = slurm.launch(misbehave, [{"kind": "sleep", "sleep": 60}] * 3, max_parallel=1)
    wait_for(lambda: any(j.stdout() for j in sweep), 60, "a run to start")
    assert sorted(s.value for s in sweep.states()) == ["PENDING", "PENDING", "RUNNING"]
    sweep.cancel()
    sweep.wait(timeout=30)
    assert sweep.states() == [State.CANCELLED] * 3
    wait_for(lambda: array_ids(sweep)[0] not in squeue_names(), 30, "the array to leave the queue")
    for job in sweep:  # also on disk, for a later Job.load or `easylaunch ls`
        assert records.read_status(job.run_dir)["state"] == State.CANCELLED
        assert Job.load(job.run_dir).state is State.CANCELLED


# -- singularity -------------------------------------------------------------------------------


@pytest.fixture
def image(slurm):
    require_service("apptainer")
    image = os.environ["EASYLAUNCH_TEST_SINGULARITY_IMAGE"]
    wanted = os.environ.get("EASYLAUNCH_TEST_IMAGE_CLOUDPICKLE_VERSION") or os.environ.get(
        "EASYLAUNCH_TEST_CLOUDPICKLE_VERSION"
    )
    if wanted and wanted != cloudpickle.__version__:
        pytest.fail(
            f"the test image has cloudpickle {wanted}, this venv {cloudpickle.__version__}: rebuild it "
            "with EASYLAUNCH_TEST_CLOUDPICKLE_VERSION=<venv's> bash scripts/services/apptainer.sh start"
        )
    return image


@pytest.mark.parametrize("how", ["slurm_singularity", "singularity_image"])
def test_runner_runs_inside_singularity_on_slurm(slurm, image, how):
    if how == "slurm_singularity":  # SINGULARITY_IMAGE from the config file
        sweep = slurm.launch(where_am_i, [{"x": 0}, {"x": 1}], mode="slurm_singularity", variants_per_task=2)
    else:
        sweep = slurm.launch(where_am_i, [{"x": 0}], singularity_image=image)
    for job, res in zip(sweep, sweep.results(timeout=120)):
        assert res["container"], res
        assert res["executable"] == "/usr/bin/python3" != sys.executable
        assert res["run_dir"] == str(job.run_dir)
        assert res["job"] == backend(job)["array_job_id"]
    script = next((sweep[0].run_dir.parent / ".batches").glob("*/submit_*.sbatch")).read_text()
    assert " exec -B " in script and image in script


# -- code snapshot -----------------------------------------------------------------------------


SNAPSHOT_SCRIPT = """
import json, sys
from easylaunch import run_sweep
import mymod

sweep = run_sweep(mymod.report, [{"x": 1}], exp_name="snap", mode="slurm", hold=True)
print(json.dumps({"job": sweep[0].manifest["backend"]["array_job_id"], "run_dir": str(sweep[0].run_dir)}))
"""


def test_code_edited_after_launch_does_not_change_a_held_job(slurm, run_script):
    repo = slurm.tmp / "repo"
    repo.mkdir()
    (repo / "mymod.py").write_text("VALUE = 'at launch'\n\ndef report(cfg, variant):\n    return VALUE\n")
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@x",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@x",
    )
    for cmd in (["git", "init", "-q"], ["git", "add", "mymod.py"], ["git", "commit", "-q", "-m", "m"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env, capture_output=True)
    proc = run_script(SNAPSHOT_SCRIPT, cwd=repo)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    slurm.jobs.append(info["job"])
    assert show_job(info["job"])["JobState"] == "PENDING"
    (repo / "mymod.py").write_text(
        "VALUE = 'edited after launch'\n\ndef report(cfg, variant):\n    return VALUE\n"
    )
    sh("scontrol", "release", info["job"])
    job = Job.load(info["run_dir"])
    assert job.result(timeout=90) == "at launch"


# -- time limits, checkpoints, requeue -----------------------------------------------------------
#
# Requeued jobs wait ~10 s (cred_expire) and are then started by the backfill scheduler, which
# runs every 30 s; a time limit takes a minute. These scenarios therefore run in the background,
# each in its own process (`python test_slurm.py NAME ...`, so that no test's PATH shim or
# monkeypatch reaches them), started as soon as the first Slurm test of a session that selected
# any of them sets up; the tests below collect their outcome and check the run directories.


def _signal_when(job, predicate, what, sig="USR2", timeout=90):
    wait_for(predicate, timeout, what)
    sh("scancel", f"--signal={sig}", "--batch", job.job_id)


def scenario_time_limit_usr2(launch):
    """time_in_mins=1, signal_before_timeout=50: Slurm's USR2 comes well before the limit."""
    t0 = time.time()
    sweep = launch(wait_for_signal, [{"x": 0}], time_in_mins=1, signal_before_timeout=50)
    sweep.wait(timeout=120)
    return {"run_dirs": [str(j.run_dir) for j in sweep], "t0": t0, "waited": time.time() - t0}


def scenario_time_limit_sigterm(launch):
    """A function that ignores USR2: Slurm's SIGTERM at the limit is still a TIMEOUT."""
    t0 = time.time()
    sweep = launch(
        ignore_usr2, [{"x": 0}, {"x": 1}], time_in_mins=1, signal_before_timeout=45, variants_per_task=2
    )
    sweep.wait(timeout=150)
    return {"run_dirs": [str(j.run_dir) for j in sweep], "t0": t0, "waited": time.time() - t0}


def scenario_checkpoint(launch):
    sweep = launch(Counter(steps=24), [{"x": 0}], max_requeue=2)
    job = sweep[0]
    _signal_when(job, lambda: int(_read(job.run_dir / "progress") or 0) >= 3, "progress")
    wait_for(lambda: records.read_status(job.run_dir).get("requeues") == 1, 30, "the requeue record")
    job.wait(timeout=150)
    return {"run_dirs": [str(job.run_dir)]}


def scenario_max_requeue(launch):
    sweep = launch(Counter(steps=400), [{"x": 0}], max_requeue=1)
    job = sweep[0]
    for attempt in (1, 2):  # signal each attempt as soon as its function runs

        def running(attempt=attempt):
            return job.stdout().count("resuming at") == attempt

        _signal_when(job, running, f"attempt {attempt} to run")
        if attempt == 1:
            wait_for(lambda: records.read_status(job.run_dir).get("requeues") == 1, 30, "requeue")
    job.wait(timeout=60)
    return {"run_dirs": [str(job.run_dir)]}


def scenario_requeue_by_hand(launch):
    variants = [{"kind": "ok"}, {"kind": "sleep", "sleep": 4}, {"kind": "ok"}]
    sweep = launch(misbehave, variants, variants_per_task=3)
    wait_for(lambda: (sweep[1].run_dir / "own-file.txt").exists(), 60, "the second variant to start")
    first = sweep[0].state.value
    sh("scontrol", "requeue", sweep[0].job_id)
    wait_for(
        lambda: records.read_status(sweep[1].run_dir)["state"] == State.PENDING,
        30,
        "the interrupted run back to PENDING",
    )
    during = {k: v for k, v in show_job(sweep[0].job_id).items() if k in ("JobState", "Reason", "Restarts")}
    sweep.wait(timeout=150)
    return {"run_dirs": [str(j.run_dir) for j in sweep], "first": first, "during": during}


SCENARIOS = {
    "time_limit_usr2": scenario_time_limit_usr2,
    "time_limit_sigterm": scenario_time_limit_sigterm,
    "checkpoint": scenario_checkpoint,
    "max_requeue": scenario_max_requeue,
    "requeue_by_hand": scenario_requeue_by_hand,
}
_ENV_AT_IMPORT = dict(os.environ)


@pytest.fixture(scope="module")
def slow(tmp_path_factory):
    """Start every background scenario; returns ``get(name)`` -> its outcome (waits for it)."""
    require_service("slurm")
    root = tmp_path_factory.mktemp("slow")
    config = root / "easylaunch_config.py"
    config.write_text("_image = ''\n" + CONFIG)
    (root / "code").mkdir()
    (root / "code" / "helper.py").write_text("VALUE = 1\n")
    tag = f"slow{os.getpid()}"
    env = dict(_ENV_AT_IMPORT, HOME=str(root / "home"))
    procs = {}
    for name in SCENARIOS:
        log = open(root / f"{name}.log", "w")
        cmd = [
            sys.executable,
            __file__,
            name,
            str(config),
            str(root / "code"),
            str(root / "logs"),
            tag,
            str(root / f"{name}.json"),
        ]
        procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(root))
        log.close()

    def get(name: str, timeout: float = 200) -> dict:
        try:
            procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"scenario {name} still running after {timeout} s; log: {(root / f'{name}.log').read_text()}"
            )
        data = records.read_json(root / f"{name}.json")
        if not data or "error" in data:
            pytest.fail(
                f"scenario {name} failed:\n{(data or {}).get('error')}\n{(root / f'{name}.log').read_text()}"
            )
        return data

    yield get
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for name in SCENARIOS:
        subprocess.run(["scancel", f"--name={tag}-{name}"], capture_output=True, timeout=30)


def test_usr2_on_demand_records_timeout(slurm):
    sweep = slurm.launch(wait_for_signal, [{"x": 0}, {"x": 1}], variants_per_task=2)
    wait_for(lambda: (sweep[0].run_dir / "started").exists(), 60, "the run to start")
    sh("scancel", "--signal=USR2", "--batch", sweep[0].job_id)
    sweep.wait(timeout=30)
    assert sweep.states() == [State.TIMEOUT, State.TIMEOUT]
    assert "before this run started" in records.read_status(sweep[1].run_dir)["message"]
    assert records.read_json(sweep[0].run_dir / records.ERROR)["message"] == "interrupted by SIGUSR2"


def test_time_limit_signal_records_timeout(slow):
    out = slow("time_limit_usr2")
    (run_dir,) = out["run_dirs"]
    assert Job.load(run_dir).state is State.TIMEOUT
    status = records.read_status(run_dir)
    assert status["exit_code"] == 128 + signal.SIGUSR2
    assert status["ended"] - out["t0"] < 55, "USR2 should come (up to a minute early) before the limit"


def test_time_limit_sigterm_without_usr2_is_timeout_too(slow):
    out = slow("time_limit_sigterm")
    first, second = out["run_dirs"]
    assert [Job.load(d).state for d in out["run_dirs"]] == [State.TIMEOUT, State.TIMEOUT]
    status = records.read_status(first)
    assert status["message"] == "Slurm's time limit was reached (SIGTERM)"
    assert status["exit_code"] == 128 + signal.SIGTERM and status["ended"] - out["t0"] >= 55
    assert "before this run started" in records.read_status(second)["message"]


def test_checkpointable_function_is_requeued_and_resumes(slow):
    (run_dir,) = slow("checkpoint")["run_dirs"]
    run_dir = Path(run_dir)
    job = Job.load(run_dir)
    assert job.result(timeout=10) == {"done": 24}
    status = records.read_status(run_dir)
    assert status["attempt"] == 2 and status["requeues"] == 1
    resumed_at = sorted(int(p.name.rsplit("-", 1)[1]) for p in run_dir.glob("started-at-*"))
    assert resumed_at[0] == 0 and resumed_at[1] >= 3
    assert (run_dir / "payload.attempt1.pkl").exists()
    out = job.stdout()  # the resumed attempt appended to the same log
    assert out.startswith("resuming at 0\n")
    assert f"checkpoint at {resumed_at[1]}\nresuming at {resumed_at[1]}\n" in out
    assert [s for s, _ in status["history"]] == ["PENDING", "RUNNING", "PENDING", "RUNNING", "COMPLETED"]
    assert job.manifest["backend"]["job_id"] in sh(
        "sacct", "-X", "-n", "-D", "-o", "JobID", "-j", job.manifest["backend"]["job_id"]
    )


def test_checkpoint_stops_after_max_requeue(slow):
    (run_dir,) = slow("max_requeue")["run_dirs"]
    assert Job.load(run_dir).state is State.TIMEOUT
    status = records.read_status(run_dir)
    assert status["requeues"] == 1 and status["attempt"] == 2
    assert not (Path(run_dir) / "payload.attempt2.pkl").exists()  # no second checkpoint was taken


def test_scontrol_requeue_by_hand_reruns_unfinished_runs(slow):
    out = slow("requeue_by_hand")
    assert out["first"] == "COMPLETED"
    assert out["during"]["Restarts"] == "1", out["during"]
    assert [Job.load(d).state for d in out["run_dirs"]] == [State.COMPLETED] * 3
    statuses = [records.read_status(d) for d in out["run_dirs"]]
    assert [s["attempt"] for s in statuses] == [1, 2, 1]  # the finished run was not run twice
    history = [state for state, _ in statuses[1]["history"]]
    assert history == ["PENDING", "RUNNING", "PENDING", "RUNNING", "COMPLETED"]


def test_requeued_run_shows_both_attempts_in_the_transaction_log(slow, tmp_path):
    out = slow("requeue_by_hand")
    run_dirs = [Path(d) for d in out["run_dirs"]]
    rows = check_complete(run_dirs[0].parent, run_dirs)
    mine = sorted((r for r in rows if r["run"] == run_dirs[1].name), key=lambda r: r["attempt"])
    assert [(r["attempt"], r["state"]) for r in mine] == [(1, "REQUEUED"), (2, "COMPLETED")]
    assert mine[0]["ended"] <= mine[1]["submitted"] <= mine[1]["started"]
    events = [e["event"] for e in txlog.read_lines(run_dirs[1] / txlog.RUN_LOG)]
    assert events == ["STARTED", "DONE", "REQUEUED", "RECOVERED", "STARTED", "DONE"]
    table = tmp_path / "a.csv"
    timeline.write_csv(rows, table)
    check_csv(table, rows, run_dirs)


def test_packed_sweep_transaction_log_is_complete(slurm, tmp_path):
    variants = [{"kind": "ok"}] * 4 + [{"kind": "raise"}, {"kind": "exit"}]
    sweep = slurm.launch(misbehave, variants, variants_per_task=3)
    sweep.wait(timeout=120)
    assert sweep.states() == [State.COMPLETED] * 4 + [State.FAILED] * 2
    exp_dir = sweep[0].run_dir.parent
    rows = check_complete(exp_dir, [j.run_dir for j in sweep])
    # a worker per array task, each running its three runs one after the other in slot 0
    tasks = {backend(j)["job_id"] for j in sweep}
    assert {r["worker"] for r in rows} == {f"slurm {t}" for t in tasks} and {r["slot"] for r in rows} == {0}
    pending = [e for e in txlog.read_experiment(exp_dir) if e["event"] == "PENDING"]
    assert sorted(e["job_id"] for e in pending) == sorted(backend(j)["job_id"] for j in sweep)
    png, table = tmp_path / "w.png", tmp_path / "a.csv"
    assert main(["timeline", str(exp_dir), "--mode", "workers", "-o", str(png), "--csv", str(table)]) == 0
    check_png(png)
    check_csv(table, rows, [j.run_dir for j in sweep])


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


# -- bad input: refused before anything is submitted --------------------------------------------


def _nothing_left(slurm):
    assert not list(slurm.log_dir.rglob("status.json"))
    assert slurm.exp not in squeue_names()


def test_unknown_config_name_lists_known_ones(slurm):
    with pytest.raises(SlurmConfigError, match="unknown slurm_config_name 'nope'.*cpu, gpu, nopart, shortq"):
        slurm.launch(trivial, [{"x": 1}], slurm_config_name="nope")
    _nothing_left(slurm)


@pytest.mark.parametrize("bad", ["abc", "1:2:3:4", "90min", 0, -5, True])
def test_malformed_time_limit(slurm, bad):
    with pytest.raises((SlurmConfigError, TypeError), match="time_in_mins"):
        slurm.launch(trivial, [{"x": 1}], time_in_mins=bad)
    _nothing_left(slurm)


def test_sbatch_not_on_path(slurm, monkeypatch, tmp_path):
    bare = tmp_path / "bare-bin"
    bare.mkdir()
    (bare / "git").symlink_to("/usr/bin/git")
    monkeypatch.setenv("PATH", str(bare))
    with pytest.raises(RuntimeError, match=r"sbatch is not on PATH.*mode='sss'"):
        slurm.launch(trivial, [{"x": 1}])
    monkeypatch.undo()
    _nothing_left(slurm)


def test_options_the_mode_does_not_take(slurm):
    with pytest.raises(TypeError, match="slurm"):
        slurm.launch(trivial, [{"x": 1}], ssh_host="somewhere")
    with pytest.raises(TypeError, match="did you mean 'slurm_config_name'"):
        slurm.launch(trivial, [{"x": 1}], slurm_config_nam="cpu")
    with pytest.raises(ValueError, match="max_parallel"):
        slurm.launch(trivial, [{"x": 1}], max_parallel=0)
    _nothing_left(slurm)


def test_sbatch_rejection_is_verbatim_and_leaves_nothing(slurm):
    with pytest.raises(SubmitError) as info:
        slurm.launch(trivial, [{"x": 1}, {"x": 2}], slurm_config_name="nopart")
    text = str(info.value)
    assert "'nopart'" in text and "sbatch: error: invalid partition specified: nosuchpartition" in text
    _nothing_left(slurm)
    with pytest.raises(SubmitError) as info:  # no GPU on this cluster
        slurm.launch(trivial, [{"x": 1}], use_gpu=True)
    assert "'gpu'" in str(info.value) and "sbatch: error:" in str(info.value)
    _nothing_left(slurm)


def test_second_chunk_rejected_cancels_the_first(slurm, monkeypatch, tmp_path):
    log = tmp_path / "sbatch.calls"
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    (shim_dir / "sbatch").write_text(
        f"#!/bin/sh\necho x >> {log}\n"
        f'if [ "$(wc -l < {log})" -ge 2 ]; then echo "sbatch: error: second chunk refused" >&2; exit 1; fi\n'
        'exec /usr/bin/sbatch "$@"\n'
    )
    (shim_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim_dir}:{os.environ['PATH']}")
    monkeypatch.setattr(SlurmMode, "max_array_size", lambda self: 2)
    with pytest.raises(SubmitError, match="second chunk refused"):
        slurm.launch(timed_sleep, [{"x": i, "sleep": 30} for i in range(4)], hold=True)
    assert len(log.read_text().split()) == 2
    _nothing_left(slurm)


if __name__ == "__main__":  # a background scenario: NAME CONFIG CODE LOGS TAG OUT
    import traceback

    name, config_file, code_dir, logs, tag, out_file = sys.argv[1:7]

    def _launch(fn, variants, **options):
        return run_sweep(
            fn,
            variants,
            exp_name=f"{tag}-{name}",
            mode="slurm",
            config_file=config_file,
            base_log_dir=logs,
            code_dirs_to_mount=[code_dir],
            **options,
        )

    try:
        outcome = SCENARIOS[name](_launch)
    except BaseException:
        outcome = {"error": traceback.format_exc()}
    records.atomic_write_json(out_file, outcome)


def hold_100mb(doodad_config, variant):
    block = bytearray(100 * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    time.sleep(1.5)
    return len(block)


def test_runs_are_monitored_on_slurm(slurm):
    """Resource monitoring works in packed Slurm tasks: samples in resources.csv, peak in status."""
    sweep = slurm.launch(hold_100mb, [{"i": 0}, {"i": 1}], slurm_config_name="cpu", monitor=0.25)
    assert set(sweep.wait(timeout=180).states()) == {State.COMPLETED}
    for job in sweep:
        res = job.status["resources"]
        assert res["samples"] >= 3 and res["peak_rss_bytes"] >= 100 * 1024 * 1024
        assert (job.run_dir / "resources.csv").read_text().startswith("t,due,")
