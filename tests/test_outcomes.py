"""Outcomes that must not get lost, on every mode: sys.exit() of a run, tracebacks of functions
defined in the launch script, results holding the user's own classes (issue 7, items 8, 9, 10a).

Each test runs a real launch script (the function defined in it, as users write them) in a
fresh interpreter, on local, local_pool, slurm, docker and ssh.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from conftest import require_service

pytestmark = [pytest.mark.timeout(300)]

MODES = ["local", "local_pool", "slurm", "docker", "ssh"]

SLURM_CONFIG = """
SLURM_CONFIGS = {"cpu": {"partition": %r, "time_in_mins": 10}}
"""


class Target:
    """How a launch script reaches ``mode``: its options (a Python literal) and environment."""

    def __init__(self, mode: str, tmp_path: Path):
        self.mode = mode
        self.env: dict = {}
        self.options = ""
        self.cleanup = None
        if mode == "slurm":
            require_service("slurm")
            config = tmp_path / "slurm_config.py"
            config.write_text(SLURM_CONFIG % os.environ.get("EASYLAUNCH_TEST_SLURM_PARTITION", "debug"))
            self.env["EASYLAUNCH_CONFIG"] = str(config)
        elif mode == "docker":
            require_service("docker")
            self.options = (
                f"docker_image={os.environ['EASYLAUNCH_TEST_DOCKER_IMAGE']!r}, "
                f"docker_host={os.environ['EASYLAUNCH_TEST_DOCKER_HOST']!r}, "
            )
        elif mode == "ssh":
            require_service("ssh")
            E = os.environ.__getitem__
            remote_logs = f"{E('EASYLAUNCH_TEST_SSH_HOME')}/t-{uuid.uuid4().hex[:10]}"
            entry = {
                "hostname": E("EASYLAUNCH_TEST_SSH_HOST"),
                "port": int(E("EASYLAUNCH_TEST_SSH_PORT")),
                "username": E("EASYLAUNCH_TEST_SSH_USER"),
                "key_file": E("EASYLAUNCH_TEST_SSH_KEY"),
                "known_hosts": E("EASYLAUNCH_TEST_SSH_KNOWN_HOSTS"),
                "log_dir": remote_logs,
            }
            config = tmp_path / "ssh_config.py"
            config.write_text(f"SSH_HOSTS = {{'test': {entry!r}}}\n")
            self.env["EASYLAUNCH_CONFIG"] = str(config)
            self.env.pop("SSH_AUTH_SOCK", None)
            self.options = "ssh_host='test', "
            self.remote_logs = remote_logs

    def close(self) -> None:
        if self.mode == "ssh":
            import paramiko

            E = os.environ.__getitem__
            client = paramiko.SSHClient()
            client.load_host_keys(E("EASYLAUNCH_TEST_SSH_KNOWN_HOSTS"))
            client.connect(
                E("EASYLAUNCH_TEST_SSH_HOST"),
                port=int(E("EASYLAUNCH_TEST_SSH_PORT")),
                username=E("EASYLAUNCH_TEST_SSH_USER"),
                key_filename=E("EASYLAUNCH_TEST_SSH_KEY"),
                look_for_keys=False,
                allow_agent=False,
            )
            try:
                _, out, _ = client.exec_command(f"rm -rf '{self.remote_logs}'")
                out.channel.recv_exit_status()
            finally:
                client.close()


@pytest.fixture(params=MODES)
def target(request, tmp_path):
    t = Target(request.param, tmp_path)
    yield t
    t.close()


@pytest.fixture
def launch(tmp_path, log_dir):
    """Write ``proj/launch.py`` (the code dir: the script's own directory) and run it."""

    def _launch(source: str, target: Target, files: dict | None = None, timeout: float = 240):
        proj = tmp_path / "proj"
        proj.mkdir(exist_ok=True)
        for name, text in (files or {}).items():
            (proj / name).write_text(textwrap.dedent(text))
        script = proj / "launch.py"
        script.write_text(
            textwrap.dedent(source).replace("OPTIONS", target.options).replace("MODE", target.mode)
        )
        env = dict(os.environ, **target.env)
        env.pop("SSH_AUTH_SOCK", None)
        proc = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=str(tmp_path),
        )
        return proc, script

    return _launch


def run_dirs(log_dir: Path, exp: str) -> list:
    return sorted(p.parent for p in (log_dir / exp).glob("*/manifest.json"))


# -- item 9: sys.exit() ------------------------------------------------------------------------

EXIT_SCRIPT = """\
import sys
from easylaunch import FunctionExit, run_sweep


def leave(doodad_config, variant):
    print("leaving with", variant["code"], flush=True)
    sys.exit(variant["code"])


sweep = run_sweep(leave, [{"code": 0}, {"code": 3}, {"code": "bad input"}, {"code": None}],
                  exp_name="exits", mode="MODE", OPTIONS)
sweep.wait()
print("STATES", [s.value for s in sweep.states()])
try:
    sweep[1].result()
except FunctionExit as exc:
    print("RAISED", type(exc).__name__, exc.code, exc.exit_code)
out = sweep.results(return_exceptions=True)
print("RESULTS", [type(r).__name__ for r in out])
try:
    sweep.results()
except Exception as exc:
    print("FIRST", type(exc).__name__)
print("AFTER")
"""


def test_sys_exit_zero_completes_and_nonzero_fails_without_ending_the_launcher(target, launch, log_dir):
    proc, _ = launch(EXIT_SCRIPT, target)
    # a run's SystemExit never ends the launch script: the lines after result() are printed
    assert "AFTER" in proc.stdout, proc.stdout + proc.stderr
    assert "STATES ['COMPLETED', 'FAILED', 'FAILED', 'COMPLETED']" in proc.stdout, proc.stdout
    assert "RAISED FunctionExit 3 3" in proc.stdout
    assert "RESULTS ['NoneType', 'FunctionExit', 'FunctionExit', 'NoneType']" in proc.stdout
    assert "FIRST FunctionExit" in proc.stdout
    assert proc.returncode == 0, proc.stderr
    statuses = [json.loads((d / "status.json").read_text()) for d in run_dirs(log_dir, "exits")]
    assert [s["exit_code"] for s in statuses] == [0, 3, 1, 0]
    assert "sys.exit(3)" in statuses[1]["message"]
    assert "sys.exit('bad input')" in statuses[2]["message"]


def test_sys_exit_in_process_mode_is_not_a_system_exit(launch, tmp_path, log_dir):
    script = """\
    import sys
    from easylaunch import FunctionExit, run_experiment


    def leave(doodad_config, variant):
        sys.exit(variant["code"])


    print("ZERO", run_experiment(leave, exp_name="here0", mode="here_no_doodad", variant={"code": 0}).state.value)
    try:
        run_experiment(leave, exp_name="here3", mode="here_no_doodad", variant={"code": 3})
    except FunctionExit as exc:
        print("HERE", exc.code)
    print("AFTER")
    """
    proc, _ = launch(script, Target("local", tmp_path))
    assert "ZERO COMPLETED" in proc.stdout, proc.stdout + proc.stderr
    assert "HERE 3" in proc.stdout and "AFTER" in proc.stdout, proc.stdout + proc.stderr


# -- item 10a: tracebacks of functions defined in the launch script ----------------------------

TRACEBACK_SCRIPT = """\
from easylaunch import run_experiment


def helper(x):
    return 1 / x  # THE FAILING LINE


def train(doodad_config, variant):
    return helper(variant["x"])


job = run_experiment(train, exp_name="tb", mode="MODE", variant={"x": 0}, skip_wait=True, OPTIONS)
job.wait()
try:
    job.result()
except ZeroDivisionError as exc:
    print("CAUSE-START")
    print(exc.__cause__)
    print("CAUSE-END")
"""


def test_traceback_of_a_script_function_names_the_script_and_its_line(target, launch, log_dir):
    proc, script = launch(TRACEBACK_SCRIPT, target)
    assert proc.returncode == 0, proc.stderr
    (run,) = run_dirs(log_dir, "tb")
    error = json.loads((run / "error.json").read_text())
    expected = f'File "{script}", line 5, in helper\n    return 1 / x  # THE FAILING LINE'
    for where, text in (
        ("error.json", error["traceback"]),
        ("stderr.log", (run / "stderr.log").read_text()),
        ("result()'s cause", proc.stdout.split("CAUSE-START")[1].split("CAUSE-END")[0]),
    ):
        assert "<dynamic-code>" not in text, (where, text)
        assert expected in text, (where, text)
        assert f'File "{script}", line 9, in train' in text, (where, text)
