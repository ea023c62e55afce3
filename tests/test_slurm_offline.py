"""Mode ``slurm`` without a cluster: every Slurm command goes through ``SlurmCLI``, and here it
answers from outputs recorded on the real cluster (tests/data/slurm/, see record.py there).

The logic that does not need Slurm to run (state mapping, array ranges, MaxArraySize chunks,
packing, the squeue fallback, sbatch's refusals, cancel targets) is tested here, always; the
same behaviours against the real cluster stay in test_slurm.py. The rendered scripts are
compared with golden files (``EASYLAUNCH_UPDATE_GOLDEN=1`` rewrites them).
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from pathlib import Path

import pytest
from slurm_replay import Replay, recorded, recorded_meta

import easylaunch
from easylaunch import Job, State, records, run_sweep
from easylaunch.job import Sweep
from easylaunch.slurm_cli import (
    CommandResult,
    SlurmCLI,
    SubmitError,
    expand_job_field,
    parse_max_array_size,
    parse_sbatch_parsable,
    parse_sinfo_cpus,
    run_command,
)

slurm_mode = importlib.import_module("easylaunch.modes.slurm")
pytestmark = pytest.mark.filterwarnings("ignore:not in a git repository")

HERE = Path(__file__).resolve().parent
GOLDEN = HERE / "data" / "golden"
ARRAY = recorded_meta()["array_job_id"]  # the job id the recorded outputs belong to


def trivial(doodad_config, variant):
    return variant["x"]


@pytest.fixture
def replay(monkeypatch):
    """The Replay every SlurmMode of this test talks to (through run_sweep and the Jobs too)."""
    r = Replay(sbatch=recorded("sbatch_parsable.out"))
    monkeypatch.setattr(slurm_mode, "SlurmCLI", lambda: r.cli())
    return r


@pytest.fixture
def launch(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "helper.py").write_text("X = 1\n")
    config = tmp_path / "config.py"
    config.write_text(
        'SLURM_CONFIGS = {"cpu": {"partition": "debug", "time_in_mins": 10, '
        '"extra_flags": "--comment \'two words\' --qos normal"}}\n'
    )

    def _launch(n: int, exp: str = "off", **opts):
        opts.setdefault("base_log_dir", str(tmp_path / "logs"))
        return run_sweep(
            trivial,
            [{"x": i} for i in range(n)],
            exp_name=exp,
            mode="slurm",
            config_file=str(config),
            code_dirs_to_mount=[str(code)],
            **opts,
        )

    return _launch


def fresh(sweep) -> None:
    """Forget the mode's cached sacct answer (it asks at most every 5 s)."""
    sweep[0].mode._sacct_cache = (0.0, set(), {})


# -- parsers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, state, expected",
    [
        ("123", "RUNNING", {"123": "RUNNING"}),
        ("123_4", "CANCELLED by 0", {"123_4": "CANCELLED"}),
        ("123_[5-7,9%2]", "PENDING", {f"123_{t}": "PENDING" for t in (5, 6, 7, 9)}),
        ("123_[1,3-4]", "PENDING", {"123_1": "PENDING", "123_3": "PENDING", "123_4": "PENDING"}),
        (
            "123_[0-2%10]",
            "CANCELLED by 0",
            {"123_0": "CANCELLED", "123_1": "CANCELLED", "123_2": "CANCELLED"},
        ),
    ],
)
def test_array_job_fields_expand_to_tasks(field, state, expected):
    out = {}
    expand_job_field(field, state, out)
    assert out == expected


def test_recorded_outputs_parse():
    assert parse_sbatch_parsable(recorded("sbatch_parsable.out")) == ARRAY
    assert parse_sbatch_parsable("77;cluster2\n") == "77"
    with pytest.raises(SubmitError, match="no job id"):
        parse_sbatch_parsable("sbatch: warning: something\n")
    assert parse_max_array_size(recorded("scontrol_show_config.out")) == 1001
    assert parse_sinfo_cpus(recorded("sinfo_cpus_debug.out")) == 8
    assert parse_sinfo_cpus("") is None


def test_run_command_reports_a_missing_binary_and_a_timeout():
    missing = run_command(["easylaunch-no-such-binary", "x"])
    assert missing.returncode == 127 and "easylaunch-no-such-binary" in missing.stderr
    slow = run_command([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.2)
    assert slow.returncode == 124 and "did not answer" in slow.stderr


# -- submission ------------------------------------------------------------------------------------


def test_one_sbatch_per_sweep_and_the_recorded_states_map_to_runs(replay, launch):
    replay.answers["sacct"] = recorded("sacct_array.out")
    sweep = launch(10, max_parallel=2)
    (call,) = replay.calls("sbatch")
    script = Path(call[-1])
    assert call == ["sbatch", "--parsable", str(script)]
    assert "#SBATCH --array=0-9%2\n" in script.read_text()
    assert [j.job_id for j in sweep] == [f"{ARRAY}_{i}" for i in range(10)]
    assert [j.manifest["backend"]["array_job_id"] for j in sweep] == [ARRAY] * 10

    assert sweep[0].mode._query(list(sweep)) == {
        f"{ARRAY}_0": "COMPLETED",
        f"{ARRAY}_1": "FAILED",
        f"{ARRAY}_2": "RUNNING",
        f"{ARRAY}_3": "CANCELLED",
        f"{ARRAY}_4": "RUNNING",
        **{f"{ARRAY}_{t}": "PENDING" for t in (5, 6, 7, 9)},
    }
    (sacct,) = replay.calls("sacct")
    assert sacct[:6] == ["sacct", "-X", "-n", "-P", "-o", "JobID,State"] and sacct[-2:] == ["-j", ARRAY]
    assert sacct[6] == "-S"  # bounded by the submit time
    fresh(sweep)
    states = sweep.states()
    assert len(replay.calls("sacct")) == 2  # ONE call for the whole sweep
    # a task that ended without its runner's record (nothing ran here) is FAILED, whatever Slurm says
    assert states == [State.FAILED, State.FAILED, State.PENDING, State.CANCELLED] + [State.PENDING] * 6
    message = records.read_status(sweep[0].run_dir)["message"]
    assert message == f"Slurm task {ARRAY}_0 ended as COMPLETED without this run's record"
    assert Job.load(sweep[3].run_dir).state is State.CANCELLED

    # the whole array scancelled: the pending range comes back as one CANCELLED line
    replay.answers["sacct"] = recorded("sacct_array_cancelled.out")
    fresh(sweep)
    states = sweep.states()
    assert [states[i] for i in (2, 4, 5, 6, 7, 9)] == [State.CANCELLED] * 6


def test_accounting_disabled_falls_back_to_squeue_for_good(replay, launch):
    replay.answers["sacct"] = (1, "", recorded("sacct_accounting_disabled.err"))
    replay.answers["squeue"] = recorded("squeue_array.out")
    sweep = launch(10)
    states = sweep.states()
    # in the queue: still PENDING here; gone from it without a record: FAILED
    gone = {0, 1, 3, 8}
    assert states == [State.FAILED if i in gone else State.PENDING for i in range(10)]
    assert records.read_status(sweep[8].run_dir)["message"].endswith(
        "ended as GONE without this run's record"
    )
    fresh(sweep)
    sweep.states()
    assert len(replay.calls("sacct")) == 1 and len(replay.calls("squeue")) == 2  # sacct is not asked again
    squeue = replay.calls("squeue")[0]
    assert squeue == ["squeue", "-h", "-r", "-o", "%i|%T", "-j", ARRAY]


def test_sacct_failing_otherwise_asks_squeue_and_keeps_trying_sacct(replay, launch):
    replay.answers["sacct"] = (1, "", "sacct: error: slurm_persist_conn_open_without_init: failed to open")
    replay.answers["squeue"] = recorded("squeue_array.out")
    sweep = launch(10)
    states = sweep.states()
    assert states == [State.PENDING] * 10  # nothing is concluded from a sacct that did not answer
    fresh(sweep)
    sweep.states()
    assert len(replay.calls("sacct")) == 2


def test_sbatch_rejection_is_verbatim_and_leaves_nothing(replay, launch, tmp_path):
    replay.answers["sbatch"] = (1, "", recorded("sbatch_invalid_partition.err"))
    with pytest.raises(SubmitError) as info:
        launch(2)
    text = str(info.value)
    assert "slurm config 'cpu'" in text
    assert recorded("sbatch_invalid_partition.err").strip() in text
    assert not list((tmp_path / "logs").rglob("status.json"))
    assert replay.calls("scancel") == []


def test_the_cli_says_a_refusal_without_a_traceback(replay, tmp_path, monkeypatch, capsys):
    # easylaunch's own errors (SubmitError here) reach the command line as their message; an
    # error that is not easylaunch's keeps its traceback
    from easylaunch import cli

    replay.answers["sbatch"] = (1, "", recorded("sbatch_invalid_partition.err"))
    config = tmp_path / "config.py"
    config.write_text('SLURM_CONFIGS = {"cpu": {"partition": "nosuch", "time_in_mins": 10}}\n')
    monkeypatch.chdir(tmp_path)
    argv = ["sweep", "--grid", "x=1,2", "--mode", "slurm", "--no-progress", "-O", f"config_file={str(config)!r}",
            "-O", f"base_log_dir={str(tmp_path / 'logs')!r}", "--", "true"]  # fmt: skip
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("easylaunch: sbatch rejected the job (slurm config 'cpu'"), err
    assert recorded("sbatch_invalid_partition.err").strip() in err and "Traceback" not in err
    assert "EASYLAUNCH_DEBUG=1 shows the traceback" in err
    assert not list((tmp_path / "logs").rglob("status.json"))
    monkeypatch.setenv("EASYLAUNCH_DEBUG", "1")
    with pytest.raises(SubmitError):
        cli.main(argv)
    replay.answers["sbatch"] = lambda argv: (_ for _ in ()).throw(RuntimeError("a bug"))
    monkeypatch.delenv("EASYLAUNCH_DEBUG")
    with pytest.raises(RuntimeError, match="a bug"):  # not easylaunch's: the traceback stays
        cli.main(argv)


def test_max_array_size_splits_the_sweep(replay, launch):
    config = re.sub(r"(?m)^(MaxArraySize\s*=\s*)\d+", r"\g<1>3", recorded("scontrol_show_config.out"))
    replay.answers["scontrol"] = config
    ids = iter(["100", "101", "102"])
    replay.answers["sbatch"] = lambda argv: f"{next(ids)}\n"
    sweep = launch(7)
    calls = replay.calls("sbatch")
    assert len(calls) == 3 and replay.calls("scontrol") == [["scontrol", "show", "config"]]
    texts = [Path(c[-1]).read_text() for c in calls]
    assert [
        "#SBATCH --array=0-2\n" in texts[0],
        "#SBATCH --array=0-2\n" in texts[1],
        "#SBATCH --array=0-0\n" in texts[2],
    ] == [True] * 3
    assert ['"$((SLURM_ARRAY_TASK_ID + %d))"' % off in t for off, t in zip((0, 3, 6), texts)] == [True] * 3
    assert [j.job_id for j in sweep] == ["100_0", "100_1", "100_2", "101_0", "101_1", "101_2", "102_0"]


def test_a_later_chunk_refused_cancels_the_submitted_ones(replay, launch, tmp_path):
    replay.answers["scontrol"] = re.sub(
        r"(?m)^(MaxArraySize\s*=\s*)\d+", r"\g<1>2", recorded("scontrol_show_config.out")
    )
    answers = iter([(0, "100\n", ""), (0, "101\n", ""), (1, "", "sbatch: error: third chunk refused\n")])
    replay.answers["sbatch"] = lambda argv: next(answers)
    with pytest.raises(SubmitError, match="third chunk refused"):
        launch(5)
    assert replay.calls("scancel") == [["scancel", "100", "101"]]
    assert not list((tmp_path / "logs").rglob("status.json"))


def test_sbatch_not_on_path_is_refused_before_anything(monkeypatch, launch, tmp_path):
    monkeypatch.setattr(slurm_mode, "SlurmCLI", lambda: SlurmCLI(runner=Replay(), which=lambda name: None))
    with pytest.raises(RuntimeError, match=r"sbatch is not on PATH.*mode='sss'"):
        launch(1)
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").rglob("status.json"))


# -- packing ---------------------------------------------------------------------------------------


def test_expected_duration_packs_by_the_partitions_cpus(replay, launch):
    replay.answers["sinfo"] = recorded("sinfo_cpus_debug.out")  # 8 CPUs
    k = lambda sweep: sweep[0].manifest["backend"]["variants_per_task"]  # noqa: E731
    many = launch(24, exp="many", expected_duration=0.5)
    assert k(many) == 3 and len({j.job_id for j in many}) == 8  # as many tasks as CPUs
    assert replay.calls("sinfo")[0] == ["sinfo", "-h", "-o", "%C", "-p", "debug"]
    assert k(launch(4, exp="long", expected_duration=600)) == 1
    assert k(launch(8, exp="few", expected_duration=0.5, max_parallel=2)) == 4
    assert k(launch(8, exp="wide", expected_duration=0.5, slurm_options={"n_cpus_per_task": 2})) == 2
    assert k(launch(500, exp="huge", expected_duration=0.5)) == 63  # ceil(500 / 8) < 120 a minute
    replay.answers["sinfo"] = (1, "", "sinfo: error: unreachable")
    assert k(launch(8, exp="blind", expected_duration=0.5)) == 8  # one slot assumed: a minute's worth


def test_packed_tasks_are_cancelled_whole_or_through_their_marks(replay, launch):
    sweep = launch(6, variants_per_task=3)
    assert [j.job_id for j in sweep] == [f"{ARRAY}_0"] * 3 + [f"{ARRAY}_1"] * 3
    Sweep(sweep[5:6]).cancel()  # one run of a packed task: its mark stops it inside the task
    assert replay.calls("scancel") == []
    assert (sweep[5].run_dir / records.CANCEL_MARK).exists()
    Sweep(sweep[0:4]).cancel()  # all of task 0, part of task 1
    assert replay.calls("scancel") == [["scancel", f"{ARRAY}_0"]]
    # run 4 is the last live run of task 1: its task-mates are CANCELLED already, so its mark suffices
    sweep.cancel()
    assert len(replay.calls("scancel")) == 1
    assert sweep.states() == [State.CANCELLED] * 6  # cancelled before they started
    whole = launch(6, exp="whole", variants_per_task=3)
    whole.cancel()
    assert replay.calls("scancel")[-1] == ["scancel", f"{ARRAY}_0", f"{ARRAY}_1"]


# -- golden scripts --------------------------------------------------------------------------------


def normalize(text: str, tmp_path: Path, batch_id: str) -> str:
    text = text.replace(str(tmp_path), "<TMP>").replace(batch_id, "<BATCH>")
    text = text.replace(sys.executable, "<PYTHON>").replace(easylaunch.__version__, "<VERSION>")
    # the scripts check for the launcher's minor: the same golden file on every supported one
    major, minor = sys.version_info[:2]
    text = text.replace(f"({major}, {minor})", "(<MAJOR>, <MINOR>)").replace(
        f'"{major}.{minor}"', '"<MINOR>"'
    )
    text = re.sub(r"(easylaunch|cloudpickle)-([0-9.]+-)?[0-9a-f]{20}\.zip", r"\1-<HASH>.zip", text)
    return re.sub(r"\d{8}-\d{6}\.\d{3}_<BATCH>", "<RUN>", text)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("EASYLAUNCH_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"no golden file {path}: run with EASYLAUNCH_UPDATE_GOLDEN=1 to write it"
    expected = path.read_text()
    assert text == expected, (
        f"{name} differs from its golden file {path}; if the change is intended, regenerate with "
        "EASYLAUNCH_UPDATE_GOLDEN=1 and review the diff"
    )


@pytest.fixture
def image(tmp_path, monkeypatch):
    """An image file and a `singularity` on PATH (never run: nothing is submitted here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "singularity").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "singularity").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    path = tmp_path / "python.sif"
    path.write_text("")
    return path


@pytest.mark.parametrize("variant", ["plain", "image"])
def test_golden_slurm_array_script(variant, replay, launch, tmp_path, request):
    opts = {"max_parallel": 2, "variants_per_task": 2}
    if variant == "image":
        opts["singularity_image"] = str(request.getfixturevalue("image"))
    sweep = launch(5, exp="golden", **opts)
    (call,) = replay.calls("sbatch")
    batch = sweep[0].manifest["batch_id"]
    check_golden(f"slurm_{variant}.sbatch", normalize(Path(call[-1]).read_text(), tmp_path, batch))


@pytest.mark.parametrize("mode", ["sss", "htp"])
def test_golden_bundle_scripts(mode, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "helper.py").write_text("X = 1\n")
    config = tmp_path / "config.py"
    config.write_text(
        'SLURM_CONFIGS = {"cpu": {"partition": "debug", "time_in_mins": 10, "max_num_cores_per_node": 4, '
        '"extra_flags": "--comment \'two words\' --qos normal"}}\n'
        'SSS_PRE_CMDS = ["module load python"]\n'
    )
    sweep = run_sweep(
        trivial,
        [{"x": i} for i in range(3)],
        exp_name="golden",
        mode=mode,
        config_file=str(config),
        code_dirs_to_mount=[str(code)],
        base_log_dir=str(tmp_path / "logs"),
    )
    bundle = Path(sweep[0].manifest["backend"]["bundle"])
    batch = sweep[0].manifest["batch_id"]
    names = ["submit.sh"] + sorted(p.relative_to(bundle).as_posix() for p in bundle.glob("jobs/*.s*"))
    for name in names:
        check_golden(
            f"{mode}_{name.replace('/', '_')}", normalize((bundle / name).read_text(), tmp_path, batch)
        )


def test_golden_files_are_all_used():
    """A golden file no test writes any more is a leftover: remove it."""
    expected = {"slurm_plain.sbatch", "slurm_image.sbatch", "sss_submit.sh", "htp_submit.sh"}
    expected |= {"sss_jobs_sss_000000.sbatch", "htp_jobs_htp.sbatch", "htp_jobs_run_task.sh"}
    assert {p.name for p in GOLDEN.iterdir()} == expected


def test_command_result_is_what_a_runner_returns():
    cli = SlurmCLI(
        runner=lambda argv, timeout: CommandResult(tuple(argv), 0, "5\n", ""), which=lambda n: "/x"
    )
    assert cli.sbatch("/tmp/x.sbatch", hold=True) == "5"
    assert cli.available()
