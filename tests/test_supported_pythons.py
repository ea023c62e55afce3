"""The launcher's Python versions: declared once (setup.cfg), refused clearly below them, and
tested on every supported minor this machine has (scripts/test.sh runs the offline tests and
the quickstart on each one scripts/pythons.sh lists).

The target side (runner, task runner) keeps Python 3.8+: tests/test_python_versions.py.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import _PYENV_ROOT, find_python

import easylaunch

ROOT = Path(__file__).resolve().parents[1]
#: the launcher's supported minors, as the project declares them (written out: the test can fail)
SUPPORTED = ["3.11", "3.12", "3.13"]


def setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg


def test_setup_cfg_declares_the_supported_minors_and_no_others():
    cfg = setup_cfg()
    assert cfg["options"]["python_requires"].strip() == ">=" + SUPPORTED[0]
    classifiers = cfg["metadata"]["classifiers"].split("\n")
    minors = [
        m.group(1)
        for c in classifiers
        if (m := re.fullmatch(r"\s*Programming Language :: Python :: (3\.\d+)\s*", c))
    ]
    assert minors == SUPPORTED
    from easylaunch.api import LAUNCHER_PYTHON

    assert "%d.%d" % LAUNCHER_PYTHON == SUPPORTED[0]
    assert "%d.%d" % sys.version_info[:2] in SUPPORTED  # this test run is on one of them


def test_pythons_sh_lists_every_supported_minor_pyenv_has(tmp_path):
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "pythons.sh")],
        env={**os.environ, "PYENV_ROOT": str(_PYENV_ROOT)},
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    ).stdout
    listed = dict(line.split(" ", 1) for line in out.splitlines())
    have = [m for m in SUPPORTED if list(_PYENV_ROOT.glob(f"versions/{m}.*/bin/python{m}"))]
    assert list(listed) == have
    for minor, exe in listed.items():
        version = subprocess.run(
            [exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        ).stdout.strip()
        assert version == minor
    # a fake pyenv with only unsupported and supported minors: only the supported ones, oldest first
    fake = tmp_path / "pyenv"
    for version in ("3.9.18", "3.13.0", "3.12.1", "3.12.9", "2.7.18"):
        minor = ".".join(version.split(".")[:2])
        exe = fake / "versions" / version / "bin" / f"python{minor}"
        exe.parent.mkdir(parents=True)
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "pythons.sh")],
        env={**os.environ, "PYENV_ROOT": str(fake)},
        stdout=subprocess.PIPE,
        text=True,
        check=True,
    ).stdout
    assert out.splitlines() == [
        f"3.12 {fake}/versions/3.12.9/bin/python3.12",
        f"3.13 {fake}/versions/3.13.0/bin/python3.13",
    ]


def test_test_sh_runs_the_offline_tests_on_the_other_minors():
    text = (ROOT / "scripts" / "test.sh").read_text()
    assert "scripts/pythons.sh" in text and "examples/local_sweep.py" in text
    offline = re.search(r'^OFFLINE_TESTS="([^"]+)"', text, re.M).group(1).split()
    assert "test_supported_pythons.py" in offline
    for name in offline:
        assert (ROOT / "tests" / name).is_file(), name


@pytest.mark.parametrize("minor", ["3.9", "3.10"])
def test_an_older_python_is_refused_with_a_clear_error(minor, tmp_path):
    exe = find_python(minor)
    if exe is None:
        pytest.skip(f"no Python {minor} here")
    # the package as a source checkout (no install: pip would refuse it by python_requires)
    shutil.copytree(Path(easylaunch.__file__).parent, tmp_path / "easylaunch")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run(
        [exe, "-c", "from easylaunch import run_experiment"], env=env, stderr=subprocess.PIPE, text=True
    )
    assert proc.returncode == 1
    assert f"easylaunch's launcher needs Python {SUPPORTED[0]} or later (this is {minor})" in proc.stderr
    assert "AttributeError" not in proc.stderr
    # the target side still imports there (the runner runs on 3.8+)
    proc = subprocess.run([exe, "-c", "import easylaunch.runner, easylaunch.taskrunner"], env=env)
    assert proc.returncode == 0


def test_an_in_process_run_leaves_no_error_for_the_finalizer(tmp_path):
    """Python 3.13 logs what io's finalizer raises (3.11/3.12 in dev mode): a here_no_doodad run's
    stdout/stderr tees, collected once the run ended, flushed their closed log files."""
    script = tmp_path / "launch.py"
    script.write_text(
        "import gc\n"
        "from easylaunch import run_experiment\n"
        "def fn(doodad_config, variant):\n"
        "    print('hello from the run')\n"
        "    return 1\n"
        f"job = run_experiment(fn, 'here_no_doodad', 'tee', base_log_dir={str(tmp_path / 'logs')!r})\n"
        "assert job.result() == 1\n"
        "gc.collect()\n"
        "print('stdout.log:', (job.run_dir / 'stdout.log').read_text().strip())\n"
    )
    proc = subprocess.run(
        [sys.executable, "-X", "dev", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "stdout.log: hello from the run" in proc.stdout
    assert "closed file" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
