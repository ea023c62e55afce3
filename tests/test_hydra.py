"""The Hydra launcher plugin (``hydra/launcher=easylaunch``) with a real Hydra app: multirun on
local_pool and on the real Slurm, the jobs' output dirs and ``.hydra`` files, their JobReturns,
Hydra's failure behaviour, every easylaunch option under ``hydra.launcher.*``, and plugin
discovery from a regular and from an editable install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import require_service

from easylaunch import Job, State

pytest.importorskip("hydra", reason="hydra-core is in the test extra")
pytestmark = pytest.mark.filterwarnings("ignore:not in a git repository")

REPO = Path(__file__).resolve().parents[1]
_REAL_HOME = os.environ.get("HOME", "")  # for pip's cache in the editable-install test

APP = """
import os
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig

ConfigStore.instance().store(name="config", node={"lr": 0.1, "seed": 0})


def task(cfg):
    if cfg.lr < 0:
        raise ValueError(f"negative lr {cfg.lr}")
    hydra_cfg = HydraConfig.get()
    Path(hydra_cfg.runtime.output_dir, "task-ran.txt").write_text(f"{cfg.lr} {cfg.seed} {hydra_cfg.job.id}")
    print("training with lr", cfg.lr, "seed", cfg.seed)
    return {"score": cfg.lr * 10 + cfg.seed, "pid": os.getpid(), "cwd": os.getcwd()}


main = hydra.main(version_base="1.3", config_path=None, config_name="config")(task)

if __name__ == "__main__":
    main()
"""

DRIVER = """
import json, sys
from hydra import initialize
from hydra.core.global_hydra import GlobalHydra
from my_app import task

with initialize(version_base="1.3", config_path=None, job_name="my_app"):
    batches = GlobalHydra.instance().hydra.multirun(config_name="config", task_function=task, overrides=sys.argv[1:])
print(json.dumps([
    {"status": r.status.name, "value": r.return_value, "overrides": list(r.overrides), "dir": r.working_dir}
    for batch in batches for r in batch
]))
"""


@pytest.fixture
def app(tmp_path):
    (tmp_path / "my_app.py").write_text(textwrap.dedent(APP))
    (tmp_path / "driver.py").write_text(textwrap.dedent(DRIVER))
    return tmp_path


def run(app_dir: Path, script: str, *args: str, python: str = sys.executable, timeout: float = 180):
    return subprocess.run(
        [python, script, *args], cwd=str(app_dir), capture_output=True, text=True, timeout=timeout
    )


def output_dirs(sweep_dir: Path) -> list:
    return sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)
    )


def runs_of(log_dir: Path, exp: str = "my_app") -> list:
    exp_dir = log_dir / exp
    return [Job.load(p) for p in sorted(exp_dir.iterdir()) if (p / "manifest.json").exists()]


def check_job_dirs(sweep_dir: Path, expected: list) -> None:
    """Each job's Hydra output dir: .hydra files with its config and overrides, its log."""
    import yaml

    dirs = output_dirs(sweep_dir)
    assert [d.name for d in dirs] == [str(i) for i in range(len(expected))]
    for d, (lr, seed) in zip(dirs, expected):
        assert yaml.safe_load((d / ".hydra" / "config.yaml").read_text()) == {"lr": lr, "seed": seed}
        assert yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text()) == [f"lr={lr}", f"seed={seed}"]
        assert (d / ".hydra" / "hydra.yaml").exists()
        assert (d / "my_app.log").exists()
    assert (sweep_dir / "multirun.yaml").exists()


def test_multirun_on_local_pool_is_one_sweep_with_hydra_returns(app, log_dir):
    sweep_dir = app / "multirun"
    proc = run(
        app,
        "driver.py",
        "hydra/launcher=easylaunch",
        "hydra.launcher.mode=local_pool",
        "hydra.launcher.max_parallel=2",
        f"hydra.sweep.dir={sweep_dir}",
        "hydra.job.chdir=true",  # each job runs in its output dir
        "lr=0.1,0.2",
        "seed=0,1",
    )
    assert proc.returncode == 0, proc.stderr
    returns = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = [(0.1, 0), (0.1, 1), (0.2, 0), (0.2, 1)]
    assert [r["status"] for r in returns] == ["COMPLETED"] * 4
    assert [r["value"]["score"] for r in returns] == [lr * 10 + seed for lr, seed in expected]
    assert [r["overrides"] for r in returns] == [[f"lr={lr}", f"seed={seed}"] for lr, seed in expected]
    check_job_dirs(sweep_dir, expected)
    dirs = output_dirs(sweep_dir)
    assert [r["dir"] for r in returns] == [str(d) for d in dirs]
    assert [r["value"]["cwd"] for r in returns] == [str(d) for d in dirs]
    assert len({r["value"]["pid"] for r in returns} | {os.getpid()}) == 5  # each job in its own process
    runs = runs_of(log_dir)
    assert len(runs) == 4 and len({j.manifest["batch_id"] for j in runs}) == 1  # ONE easylaunch sweep
    assert [j.variant for j in runs] == [
        {"overrides": [f"lr={lr}", f"seed={seed}"], "job_num": i} for i, (lr, seed) in enumerate(expected)
    ]
    assert {j.manifest["options"]["max_parallel"] for j in runs} == {2}
    for job, d in zip(runs, dirs):  # the job ran Hydra's run_job in its output dir, id = the run
        assert (d / "task-ran.txt").read_text().endswith(job.run_dir.name)
        assert "training with lr" in job.stdout()


def test_failing_job_shows_hydras_failure_behaviour(app, log_dir):
    sweep_dir = app / "multirun"
    proc = run(
        app, "my_app.py", "-m", "hydra/launcher=easylaunch", f"hydra.sweep.dir={sweep_dir}", "lr=0.5,-1"
    )
    assert proc.returncode == 1
    assert "Error executing job with overrides: ['lr=-1']" in proc.stderr
    assert "ValueError: negative lr -1" in proc.stderr
    ok, bad = runs_of(log_dir)
    assert ok.state is State.COMPLETED and bad.state is State.FAILED
    assert json.loads((bad.run_dir / "error.json").read_text())["type"] == "ValueError"
    assert "negative lr -1" in bad.stderr()  # the traceback is in the run's logs
    assert (output_dirs(sweep_dir)[1] / ".hydra" / "config.yaml").exists()


def test_every_easylaunch_option_is_a_launcher_field(app, log_dir):
    from easylaunch.modes import all_mode_options
    from easylaunch.options import COMMON
    from hydra_plugins.hydra_easylaunch_launcher.config import EasylaunchLauncherConf, option_names

    fields = set(EasylaunchLauncherConf.__dataclass_fields__)
    every = {o.name for o in COMMON} | {o.name for opts in all_mode_options().values() for o in opts}
    assert every - {"skip_wait"} == set(option_names()) and set(option_names()) <= fields
    assert {"mode", "exp_name", "_target_"} <= fields and "skip_wait" not in fields
    sweep = f"hydra.sweep.dir={app / 'm1'}"
    proc = run(app, "my_app.py", "-m", "hydra/launcher=easylaunch", sweep, "hydra.launcher.nosuch=1", "lr=1")
    assert proc.returncode == 1 and "nosuch" in proc.stderr
    proc = run(
        app, "my_app.py", "-m", "hydra/launcher=easylaunch", sweep, "hydra.launcher.time_in_mins=5", "lr=1"
    )
    assert proc.returncode == 1 and "option 'time_in_mins' is not used by mode 'local'" in proc.stderr
    proc = run(
        app,
        "my_app.py",
        "-m",
        "hydra/launcher=easylaunch",
        f"hydra.sweep.dir={app / 'm2'}",
        "hydra.launcher.exp_name=renamed",
        "hydra.launcher.extra_launch_info={team:vision}",
        "hydra.launcher.code_dirs_to_mount=[" + str(app) + "]",
        "lr=1",
    )
    assert proc.returncode == 0, proc.stderr
    (job,) = runs_of(log_dir, "renamed")
    assert job.manifest["options"]["extra_launch_info"] == {"team": "vision"}
    assert job.manifest["options"]["code_dirs_to_mount"] == [str(app)]


def test_the_issues_command_on_slurm_is_one_array(app, log_dir):
    require_service("slurm")
    proc = run(
        app,
        "my_app.py",
        "-m",
        "hydra/launcher=easylaunch",
        "hydra.launcher.mode=slurm",
        "lr=1e-3,1e-4",
        "seed=0,1",
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    (sweep_dir,) = [p for p in (app / "multirun").glob("*/*") if p.is_dir()]
    check_job_dirs(sweep_dir, [(0.001, 0), (0.001, 1), (0.0001, 0), (0.0001, 1)])
    runs = runs_of(log_dir)
    assert len({j.manifest["backend"]["array_job_id"] for j in runs}) == 1  # one Slurm array
    returns = [j.result() for j in runs]  # the JobReturns Hydra got
    assert [r.return_value["score"] for r in returns] == [0.01, 1.01, 0.001, 1.001]
    for job, d in zip(runs, output_dirs(sweep_dir)):
        assert (d / "task-ran.txt").read_text().endswith(job.job_id)  # hydra.job.id: Slurm's id


def test_plugin_is_found_from_regular_and_editable_installs(tmp_path):
    code = (
        "import hydra_plugins.hydra_easylaunch_launcher as m; "
        "from hydra.core.plugins import Plugins; from hydra.plugins.launcher import Launcher; "
        "print(m.__file__); print([c.__name__ for c in Plugins.instance().discover(Launcher)])"
    )
    regular = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "EasylaunchLauncher" in regular.stdout, regular.stderr
    assert "site-packages" in regular.stdout.splitlines()[0]
    # an editable install of a copy of the project, in a venv of its own
    src = tmp_path / "src"
    src.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("easylaunch", "templates", "hydra_plugins"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    if _REAL_HOME:
        env.setdefault("PIP_CACHE_DIR", str(Path(_REAL_HOME) / ".cache" / "pip"))
    install = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-e", f"{src}[hydra]"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    editable = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, timeout=120
    )
    assert "EasylaunchLauncher" in editable.stdout, editable.stderr
    assert editable.stdout.splitlines()[0].startswith(str(src))  # the source tree, not a copy


def test_a_mode_that_only_writes_a_bundle_is_a_clear_error(app, log_dir):
    proc = run(
        app,
        "my_app.py",
        "-m",
        "hydra/launcher=easylaunch",
        "hydra.launcher.mode=sss",
        f"hydra.sweep.dir={app / 'm'}",
        "lr=1",
    )
    assert proc.returncode == 1
    assert "mode 'sss' only wrote a bundle to submit elsewhere" in proc.stderr
    assert "use a mode that runs them" in proc.stderr
