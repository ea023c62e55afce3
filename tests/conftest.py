"""Shared fixtures. Tests run against the installed package (scripts/test.sh installs it).

Services (Slurm, Apptainer, ...) are started by scripts/test.sh; a test that needs one calls
``require_service("slurm")``: it skips when the service is absent on a developer machine and
FAILS under CI (CI=true), so a broken harness can never pass silently.

Container engines (dockerd, Podman's Docker-compatible socket): after every test, the containers
labelled ``MANAGED_LABEL`` that the test left on an engine that is up are removed and the test
fails ("left behind: ..."); at the end of the session, images named ``easylaunch-tmp*`` likewise.
"""

from __future__ import annotations

import functools
import os
import pwd
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SERVICE_FLAGS = {
    "slurm": "EASYLAUNCH_TEST_SLURM",
    "apptainer": "EASYLAUNCH_TEST_APPTAINER",
    "docker": "EASYLAUNCH_TEST_DOCKER",
    "podman": "EASYLAUNCH_TEST_PODMAN",
    "ssh": "EASYLAUNCH_TEST_SSH",
    "cloud": "EASYLAUNCH_TEST_CLOUD_VENV",
}

MANAGED_LABEL = "io.easylaunch.managed"
"""The label on every container easylaunch creates (the product code uses the same name)."""

TMP_IMAGE_PREFIX = "easylaunch-tmp"
"""Temporary images easylaunch builds are named ``easylaunch-tmp...``: none may outlive a session."""

ENGINE_HOSTS = {"docker": "EASYLAUNCH_TEST_DOCKER_HOST", "podman": "EASYLAUNCH_TEST_PODMAN_HOST"}
"""Container engine -> the env var (set by its scripts/services env file) holding its socket URL."""


def require_service(name: str) -> None:
    """Skip (locally) or fail (in CI) unless scripts/test.sh started service ``name``."""
    flag = SERVICE_FLAGS[name]
    if os.environ.get(flag):
        return
    message = f"service {name!r} not started (run the suite through scripts/test.sh)"
    if os.environ.get("CI"):
        pytest.fail(message + " -- CI must run every service test")
    pytest.skip(message)


#: Python minors a target may run (the runner supports 3.8+): an image usually has its own
TARGET_MINORS = ("3.8", "3.9", "3.10", "3.11", "3.12", "3.13")
LAUNCHER_MINOR = "%d.%d" % sys.version_info[:2]
#: pyenv's root, fixed before the tests point $HOME elsewhere
_PYENV_ROOT = Path(os.environ.get("PYENV_ROOT") or Path(pwd.getpwuid(os.getuid()).pw_dir) / ".pyenv")


@functools.lru_cache(maxsize=None)
def find_python(minor: str) -> str | None:
    """An interpreter of Python ``minor`` ("3.8"): ``$EASYLAUNCH_TEST_PYTHON_3_8``, pyenv's
    ``versions/3.8.*``, or ``python3.8`` on PATH; checked by running it. None when there is none."""
    candidates = [os.environ.get("EASYLAUNCH_TEST_PYTHON_" + minor.replace(".", "_"))]
    candidates += [str(p) for p in sorted((_PYENV_ROOT / "versions").glob(f"{minor}.*/bin/python{minor}"))]
    candidates.append(shutil.which(f"python{minor}"))
    for exe in filter(None, candidates):
        try:
            out = subprocess.run(
                [exe, "-S", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out == minor:
            return exe
    return None


def require_python(minor: str) -> str:
    """The interpreter of Python ``minor``, or skip naming where it was looked for.

    Python 3.8 is the floor the target side must support: under CI (CI=true) its absence FAILS
    the test instead, so the check can never pass silently; other minors skip with the reason.
    """
    exe = find_python(minor)
    if exe is not None:
        return exe
    message = (
        f"no Python {minor} interpreter (looked at $EASYLAUNCH_TEST_PYTHON_{minor.replace('.', '_')}, "
        f"{_PYENV_ROOT}/versions/{minor}.*/bin/python{minor} and python{minor} on PATH)"
    )
    if os.environ.get("CI") and minor == TARGET_MINORS[0]:
        pytest.fail(message + " -- CI must test the oldest target Python")
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

    def _run(
        source: str,
        name: str = "launch.py",
        timeout: float = 120,
        env: dict | None = None,
        cwd: Path | None = None,
    ) -> subprocess.CompletedProcess:
        script = (cwd or tmp_path) / name
        script.write_text(textwrap.dedent(source))
        full_env = dict(os.environ)
        full_env.update(env or {})
        return subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            cwd=str(cwd or tmp_path),
        )

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


# ---- container engines: nothing left behind ---------------------------------------------


def engine_client(engine: str, timeout: float = 60.0):
    """A ``docker.DockerClient`` for ``engine`` ("docker" or "podman") as scripts/services started it.

    Skips (fails in CI) when the service is not up::

        client = engine_client("podman")
        client.containers.run(os.environ["EASYLAUNCH_TEST_PODMAN_IMAGE"], ["true"], remove=True)
    """
    require_service(engine)
    import docker

    return docker.DockerClient(base_url=os.environ[ENGINE_HOSTS[engine]], timeout=timeout)


class _EngineWatch:
    """Finds what this session leaves on one container engine.

    A labelled container that did not exist when the session started is this session's: under CI
    (CI=true, one session per machine) all of them; elsewhere the engine may be shared with other
    pytest sessions and manual runs, so only those that mount a directory of this session's base
    temp dir (every easylaunch container mounts its run directory, and tests keep their runs under
    tmp_path). Temporary images: those named after the session started (removed under CI only).
    """

    def __init__(self, engine: str, basetemp: Path):
        self.engine = engine
        self.url = os.environ[ENGINE_HOSTS[engine]]
        self.basetemp = str(basetemp.resolve())
        self._client = None
        self.initial_containers = {c["Id"] for c in self.containers()}
        self.initial_images = self.tmp_images()

    def _call(self, what: str, fn):
        """fn(client), retried for up to 30 s while the engine does not answer (e.g. restarting)."""
        try:
            import docker
        except ImportError:
            pytest.fail("the docker SDK is missing: pip install '.[test]'", pytrace=False)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self._client is None:
                    self._client = docker.DockerClient(base_url=self.url, timeout=10)
                return fn(self._client)
            except Exception as exc:  # docker.errors.DockerException, requests' ConnectionError
                if getattr(exc, "status_code", None) == 404:
                    raise
                if time.monotonic() > deadline:
                    pytest.fail(f"could not {what} on {self.engine} ({self.url}): {exc}", pytrace=False)
                time.sleep(0.5)

    def containers(self) -> list[dict]:
        return self._call(
            "list containers labelled " + MANAGED_LABEL,
            lambda c: c.api.containers(all=True, filters={"label": MANAGED_LABEL}),
        )

    def tmp_images(self) -> set[str]:
        """The image names (repo:tag) on this engine whose repository starts with TMP_IMAGE_PREFIX."""

        def is_tmp(tag: str) -> bool:
            repo = tag.rsplit(":", 1)[0] if ":" in tag.rsplit("/", 1)[-1] else tag
            return repo.rsplit("/", 1)[-1].startswith(TMP_IMAGE_PREFIX)

        images = self._call("list images", lambda c: c.api.images())
        return {t for i in images for t in i.get("RepoTags") or () if is_tmp(t)}

    def _ours(self, container: dict) -> bool:
        if container["Id"] in self.initial_containers:
            return False
        if os.environ.get("CI"):
            return True
        return any(
            (m.get("Source") or "") == self.basetemp
            or (m.get("Source") or "").startswith(self.basetemp + "/")
            for m in container.get("Mounts") or ()
        )

    def remove_leftovers(self) -> list[str]:
        """Remove this session's labelled containers; return a description of each."""
        found = []
        for c in self.containers():
            if not self._ours(c):
                continue
            name = (c.get("Names") or ["?"])[0].lstrip("/")
            found.append(
                f"{self.engine} container {name} ({c['Id'][:12]}, image {c.get('Image')}, "
                f"{c.get('State')}, {MANAGED_LABEL}={c.get('Labels', {}).get(MANAGED_LABEL)!r})"
            )
            self._remove(lambda cl, i=c["Id"]: cl.api.remove_container(i, force=True, v=True))
        return found

    def new_tmp_images(self, remove: bool) -> list[str]:
        """Temporary image names that appeared during the session; ``remove`` removes them (by
        name: an image with other names keeps those)."""
        found = sorted(self.tmp_images() - self.initial_images)
        if remove:
            for tag in found:
                self._remove(lambda cl, t=tag: cl.api.remove_image(t, force=True))
        return [f"{self.engine} image {tag}" for tag in found]

    def _remove(self, fn) -> None:
        try:
            self._call("remove a leftover", fn)
        except Exception as exc:
            if getattr(exc, "status_code", None) != 404:  # already gone
                raise


@pytest.fixture(scope="session")
def _engine_watches(tmp_path_factory):
    """One _EngineWatch per container engine that is up; fails the session if temp images remain."""
    basetemp = tmp_path_factory.getbasetemp()
    watches = [_EngineWatch(e, basetemp) for e in ENGINE_HOSTS if os.environ.get(SERVICE_FLAGS[e])]
    yield watches
    # An image names no session: outside CI another session's may be in use, so it stays.
    ci = bool(os.environ.get("CI"))
    left = [d for w in watches for d in w.new_tmp_images(remove=ci)]
    if left:
        done = "now removed" if ci else "not removed: this engine may be shared, remove them by hand"
        pytest.fail(f"temporary images left behind ({done}): " + "; ".join(left), pytrace=False)


@pytest.fixture(autouse=True)
def _no_leftover_containers(_engine_watches):
    """After each test: no container labelled MANAGED_LABEL may remain (removed, then the test fails).

    Fixtures a test requests are torn down before this check. A container may not outlive the
    test that made it (no module- or session-scoped containers).
    """
    yield
    left = [d for w in _engine_watches for d in w.remove_leftovers()]
    if left:
        pytest.fail("left behind (now removed): " + "; ".join(left), pytrace=False)
