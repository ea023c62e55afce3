"""Shared fixtures. Tests run against the installed package (scripts/test.sh installs it).

Services (Slurm, Apptainer, ...) are started by scripts/test.sh; a test that needs one calls
``require_service("slurm")``: it skips when the service is absent on a developer machine and
FAILS under CI (CI=true), so a broken harness can never pass silently.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SERVICE_FLAGS = {
    "slurm": "EASYLAUNCH_TEST_SLURM",
    "apptainer": "EASYLAUNCH_TEST_APPTAINER",
}


def require_service(name: str) -> None:
    """Skip (locally) or fail (in CI) unless scripts/test.sh started service ``name``."""
    flag = SERVICE_FLAGS[name]
    if os.environ.get(flag):
        return
    message = f"service {name!r} not started (run the suite through scripts/test.sh)"
    if os.environ.get("CI"):
        pytest.fail(message + " -- CI must run every service test")
    pytest.skip(message)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each test gets its own cwd, log dir and no user config file."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("EASYLAUNCH_CONFIG", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    logs = tmp_path / "logs"
    monkeypatch.setenv("EASYLAUNCH_LOG_DIR", str(logs))
    return logs


@pytest.fixture
def log_dir(isolated) -> Path:
    """The log dir runs of this test go to (via $EASYLAUNCH_LOG_DIR)."""
    return isolated


@pytest.fixture
def run_script(tmp_path):
    """Write a launch script and run it with this interpreter; returns CompletedProcess."""

    def _run(source: str, name: str = "launch.py", timeout: float = 120, env: dict | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess:
        script = (cwd or tmp_path) / name
        script.write_text(textwrap.dedent(source))
        full_env = dict(os.environ)
        full_env.update(env or {})
        return subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                              timeout=timeout, env=full_env, cwd=str(cwd or tmp_path))

    return _run


@pytest.fixture
def run_dirs(log_dir):
    """Return a function listing every run directory (holding status.json) under the log dir."""

    def _list(root: Path | None = None) -> list[Path]:
        root = Path(root) if root is not None else log_dir
        if not root.is_dir():
            return []
        return sorted(p.parent for p in root.rglob("status.json"))

    return _list


def wait_for(predicate, timeout: float = 60.0, what: str = "condition", interval: float = 0.02):
    """Poll until ``predicate()`` is truthy and return its value; AssertionError on timeout."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def wait_until():
    """Return ``wait(predicate, timeout=20, what=...)``: poll until predicate() is truthy."""

    def _wait(predicate, timeout: float = 20.0, what: str = "condition"):
        return wait_for(predicate, timeout, what)

    return _wait
