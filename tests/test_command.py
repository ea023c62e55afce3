"""easylaunch.Command: a command line as a job (argv rendering, exit codes, signals, transport)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from easylaunch import Command, CommandFailed, State, grid, payload, run_experiment, run_sweep
from easylaunch.command import render_args
from easylaunch.procs import alive

ECHO_ARGS = [sys.executable, "-c", "import json, os, sys; print(json.dumps([sys.argv[1:], os.getcwd()]))"]


def test_render_args_launcher_style():
    variant = {"model_name": "resnet_v1_50", "batch___size": 32}
    assert render_args(variant) == ["--model_name=resnet_v1_50", "--batch-size=32"]
    assert render_args(variant, style="space") == ["--model_name", "resnet_v1_50", "--batch-size", "32"]
    assert render_args({"fast": True, "debug": False, "skip": None}) == ["--fast"]
    assert render_args({"ids": [1, 2], "opt": {"lr": 0.1}}) == ["--ids=1", "--ids=2", "--opt.lr=0.1"]
    with pytest.raises(ValueError, match="args_style"):
        render_args({}, style="dashes")


def test_command_refuses_bad_input_before_launch(log_dir):
    with pytest.raises(ValueError, match="empty"):
        Command([])
    with pytest.raises(TypeError, match="every item must be a str"):
        Command(["echo", 3])
    with pytest.raises(TypeError, match="env"):
        Command(["echo"], env={"A": 1})
    with pytest.raises(ValueError, match="args_style"):
        Command(["echo"], args_style="x")
    assert not list(log_dir.glob("*/*"))


def test_shell_string_quotes_values():
    cmd = Command("printf '%s\\n'", args={"x": "a b;c $(id)"})
    assert cmd.command_line({"y": 1}) == "printf '%s\\n' '--x=a b;c $(id)' --y=1"
    assert Command(["prog"]).command_line({"x": "a b;c"}) == ["prog", "--x=a b;c"]


@pytest.mark.parametrize("mode", ["local", "local_pool", "here_no_doodad"])
def test_command_runs_in_run_dir_with_variant_args(log_dir, mode):
    cmd = Command(ECHO_ARGS, args={"epochs": 3})
    job = run_experiment(
        cmd, exp_name="cmd", mode=mode, variant={"model_name": "m", "batch___size": 32, "fast": True}
    )
    assert job.wait(timeout=30) is State.COMPLETED
    assert job.result() == 0
    argv, cwd = json.loads((job.run_dir / "stdout.log").read_text().strip().splitlines()[-1])
    assert argv == ["--epochs=3", "--model_name=m", "--batch-size=32", "--fast"]
    assert Path(cwd).resolve() == job.run_dir.resolve()


def test_command_failure_has_code_and_stderr_tail(log_dir):
    script = "import sys\nfor i in range(30): print('line', i, file=sys.stderr)\nsys.exit(7)"
    job = run_experiment(Command([sys.executable, "-c", script]), exp_name="cmd", mode="local")
    assert job.wait(timeout=30) is State.FAILED
    status = job.status
    assert status["exit_code"] == 7
    assert "exited with code 7" in status["message"]
    assert "line 29" in status["message"] and "line 5\n" not in status["message"]
    with pytest.raises(Exception) as info:
        job.result()
    assert "exited with code 7" in str(info.value)
    # the whole stderr is in the log
    assert "line 0" in (job.run_dir / "stderr.log").read_text()


def test_command_sweep_and_env(log_dir):
    cmd = Command(
        [sys.executable, "-c", "import os, sys; print(os.environ['GREETING'], sys.argv[1:])"],
        env={"GREETING": "hello"},
        args_style="space",
    )
    sweep = run_sweep(cmd, grid({"seed": [0, 1]}), exp_name="cmd", mode="local_pool")
    assert sweep.results(timeout=30) == [0, 0]
    outs = sorted((j.run_dir / "stdout.log").read_text().strip() for j in sweep)
    assert outs == ["hello ['--seed', '0']", "hello ['--seed', '1']"]


def test_command_timeout_stops_the_child(log_dir):
    script = "import os, time\nopen('child.pid', 'w').write(str(os.getpid()))\ntime.sleep(60)"
    job = run_experiment(Command([sys.executable, "-c", script]), exp_name="cmd", mode="local", timeout=1.5)
    assert job.wait(timeout=30) is State.TIMEOUT
    pid = int((job.run_dir / "child.pid").read_text())
    deadline = time.time() + 10
    while alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


def test_command_cancel_stops_the_child(log_dir):
    script = "import os, time\nopen('child.pid', 'w').write(str(os.getpid()))\ntime.sleep(60)"
    job = run_experiment(
        Command([sys.executable, "-c", script]), exp_name="cmd", mode="local", skip_wait=True
    )
    pid_file = job.run_dir / "child.pid"
    deadline = time.time() + 20
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline, "the command did not start"
        time.sleep(0.05)
    pid = int(pid_file.read_text())
    job.cancel()
    assert job.wait(timeout=30) is State.CANCELLED
    deadline = time.time() + 10
    while alive(pid) and time.time() < deadline:
        time.sleep(0.05)
    assert not alive(pid)


def test_command_travels_by_reference():
    cmd = Command(["python", "train.py"], args={"a": 1}, env={"X": "1"}, args_style="space")
    ref = json.loads(payload.encode_function(cmd, payload.REFERENCE))
    back = payload.resolve_reference(ref)
    assert isinstance(back, Command) and back.reference() == cmd.reference()
    assert back.command_line({"b": 2}) == ["python", "train.py", "--a", "1", "--b", "2"]
    assert cmd.job_type() == ["python", "train.py"]


def test_command_failed_pickles():
    import pickle

    exc = pickle.loads(pickle.dumps(CommandFailed("boom", 3, "tail")))
    assert (str(exc), exc.exit_code, exc.stderr_tail) == ("boom", 3, "tail")


def test_missing_program_is_failed_127(log_dir):
    job = run_experiment(Command(["/no/such/program-xyz"]), exp_name="cmd", mode="local")
    assert job.wait(timeout=30) is State.FAILED
    assert job.status["exit_code"] == 127 and "could not start" in job.status["message"]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "easylaunch.cli", *args], capture_output=True, text=True, timeout=120, cwd=cwd
    )


TRAIN_PY = """import os, sys
print(os.getcwd())
with open(os.path.join(os.environ["EASYLAUNCH_RUN_DIR"], "out.txt"), "w") as f:
    f.write(" ".join(sys.argv[1:]))
"""


def test_cli_command_runs_where_it_was_typed(log_dir, tmp_path):
    # `easylaunch run -- python train.py` from a project directory finds train.py (the README's
    # first example; it used to run in the run directory and not find it), and what it writes to
    # $EASYLAUNCH_RUN_DIR lands in its run directory
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text(TRAIN_PY)
    proc = cli("run", "--mode", "local_pool", "--name", "typed", "--", sys.executable, "train.py", "--epochs=3",
               cwd=project)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[0])
    assert (run_dir / "stdout.log").read_text().strip() == str(project)
    assert (run_dir / "out.txt").read_text() == "--epochs=3"
    # the code dir is the project, not where the easylaunch script lives
    assert f"no git info recorded for: {project}" in proc.stderr, proc.stderr


def test_a_command_cwd_that_is_nowhere_is_named(log_dir, tmp_path):
    job = run_experiment(Command(["true"], cwd=str(tmp_path / "gone")), exp_name="nowhere", mode="local")
    assert job.state == State.FAILED
    message = job.status["message"]
    assert f"Command(cwd='{tmp_path / 'gone'}'): no such directory on this machine" in message, message
    assert "code_dirs_to_mount" in message


def test_cli_run_exits_with_the_commands_code(log_dir):
    proc = cli("run", "--name", "clirun", "--", sys.executable, "-c", "import sys; print('out'); sys.exit(4)")
    assert proc.returncode == 4, proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[0])
    assert (run_dir / "stdout.log").read_text().strip() == "out"
    assert "exited with code 4" in proc.stderr
    ok = cli("run", "--name", "clirun", "-O", "max_parallel=2", "--", "true")
    assert ok.returncode == 0, ok.stderr


def test_cli_sweep_grid_summary_and_exit_code(log_dir):
    script = "import sys; print(sys.argv[1:]); sys.exit(int('--seed=1' in sys.argv))"
    proc = cli(
        "sweep",
        "--grid",
        "lr=1e-3,1e-4",
        "--grid",
        "seed=0:2",
        "--mode",
        "local_pool",
        "--name",
        "clisw",
        "--",
        sys.executable,
        "-c",
        script,
    )
    assert proc.returncode == 1, proc.stderr
    assert "completed=2 failed=2" in proc.stdout
    assert proc.stdout.count("COMPLETED") == 2 and proc.stdout.count("FAILED") == 2
    outs = sorted(p.read_text().strip() for p in (log_dir / "clisw").glob("*/stdout.log"))
    assert outs == sorted(str(["--lr=" + lr, "--seed=" + s]) for lr in ("0.001", "0.0001") for s in "01")
    good = cli("sweep", "--grid", "x=a,b", "--name", "clisw2", "--args-style", "space", "--", "true")
    assert good.returncode == 0 and "completed=2" in good.stdout


def test_cli_bad_grid_is_refused_before_anything_runs(log_dir):
    from easylaunch.cli_launch import parse_grid

    assert parse_grid(["lr=1e-3,0.1", "seed=0:6:2", "name=a"]) == {
        "lr": [0.001, 0.1],
        "seed": [0, 2, 4],
        "name": ["a"],
    }
    for bad in ("lr", "lr=", "=1", "seed=3:3"):
        proc = cli("sweep", "--grid", bad, "--name", "bad", "--", "true")
        assert proc.returncode == 2 and "--grid" in proc.stderr, (bad, proc.stderr)
    proc = cli("run", "--name", "bad")
    assert proc.returncode == 2 and "after '--'" in proc.stderr
    assert not (log_dir / "bad").exists()
