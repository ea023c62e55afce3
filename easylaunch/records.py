"""The run directory: its file names, atomic writes, and reading state back.

Layout of ``<log dir>/<exp_name>/<run name>/`` (documented in README.md)::

    manifest.json    what was launched and how (mode, options, variant, git, versions, backend ids)
    variant.json     the variant alone
    payload.pkl      function + DoodadConfig + variant (mode 0600)
    status.json      state, timestamps, host, pid, exit code, attempt (written by launcher and runner)
    stdout.log       the function's standard output
    stderr.log       the function's standard error
    result.pkl       the return value (cloudpickle), when COMPLETED
    error.json       exception type, message and traceback text, when FAILED
    exception.pkl    the exception object itself, when it could be pickled
    git/             one ``.diff`` and one ``.staged.diff`` per code directory
    cancel.requested present once somebody asked for the run to be cancelled
    events.jsonl     this run's lines of the transaction log (see easylaunch.txlog)

Every JSON file is written to a temporary name and renamed into place, so a reader never
sees half a file.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from . import txlog

MANIFEST = "manifest.json"
VARIANT = "variant.json"
PAYLOAD = "payload.pkl"
STATUS = "status.json"
STDOUT = "stdout.log"
STDERR = "stderr.log"
RESULT = "result.pkl"
ERROR = "error.json"
EXCEPTION = "exception.pkl"
GIT_DIR = "git"
CANCEL_MARK = "cancel.requested"
#: per batch, in ``<exp>/.batches/<batch id>/``: what the manifests will say, written before them
LAUNCH_RECORD = "launch.json"

PRIVATE_MODE = 0o600

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | _CLOEXEC


def atomic_write_bytes(path: Path | str, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a mix."""
    # the temp file is made like tempfile.mkstemp's (exclusive, 0600, same directory) without
    # importing tempfile, which costs the runner's start-up several ms
    directory, name = os.path.split(os.fspath(path))
    while True:
        tmp = os.path.join(directory, f".{name}.{os.urandom(6).hex()}.tmp")
        try:
            fd = os.open(tmp, _TMP_FLAGS, 0o600)
        except FileExistsError:  # pragma: no cover - 48 random bits
            continue
        break
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_json(path: Path | str, obj: Any, mode: int = 0o644) -> None:
    """Atomically write ``obj`` as indented JSON (non-JSON values are written with ``repr``)."""
    data = json.dumps(obj, indent=1, sort_keys=True, default=repr).encode()
    atomic_write_bytes(path, data + b"\n", mode)


def read_json(path: Path | str, default: Any = None) -> Any:
    """Read a JSON file, or return ``default`` when it does not exist (yet)."""
    # os-level reads: half the cost of open() for the small files polled by the thousand
    try:
        fd = os.open(path, os.O_RDONLY | _CLOEXEC)
    except FileNotFoundError:
        return default
    try:
        data = os.read(fd, 1 << 16)
        if len(data) == 1 << 16:
            chunks = [data]
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            data = b"".join(chunks)
    finally:
        os.close(fd)
    return json.loads(data)


def read_status(run_dir: Path | str) -> dict:
    """The run's status record; a run with none yet is PENDING (launchers write none)."""
    return read_json(os.path.join(run_dir, STATUS), {}) or {"state": "PENDING"}  # bundle copies have none


def write_status(run_dir: Path | str, state: str, **fields: Any) -> dict:
    """Record a state transition: merges ``fields`` into the existing status, stamps the time."""
    run_dir = Path(run_dir)
    status = read_status(run_dir)
    before = {
        "state": status.get("state", "PENDING"),
        "attempt": status.get("attempt"),
        "resources": status.get("resources"),
    }
    status.update(fields)
    status["state"] = str(state)
    status["updated"] = time.time()
    history = status.setdefault("history", [])
    if not history or history[-1][0] != str(state):
        history.append([str(state), status["updated"]])
    atomic_write_json(run_dir / STATUS, status)
    txlog.record_status(run_dir, before, status)
    return status


def write_same_status(run_dirs: list, status: dict, scratch: Path) -> None:
    """Give every run in ``run_dirs`` the same status record, atomically and cheaply.

    The record is written once into ``scratch`` (a directory on the same file system) and
    hard-linked into each run: a link appears complete at once, and the runner's next atomic
    rewrite gives the run a file of its own.
    """
    status = dict(status, updated=time.time())
    template = Path(scratch) / f".status-{os.getpid()}-{time.monotonic_ns()}.json"
    atomic_write_json(template, status)
    try:
        for run_dir in run_dirs:
            target = os.path.join(run_dir, STATUS)
            try:
                os.link(template, target)
            except FileExistsError:
                tmp = f"{target}.{os.getpid()}.tmp"
                os.link(template, tmp)
                os.replace(tmp, target)
            except OSError:  # no hard links here
                atomic_write_json(target, status)
    finally:
        template.unlink()


def _launch_record_path(run_dir: Path) -> Path | None:
    """``<exp>/.batches/<batch id>/launch.json`` for a run dir named ``<stamp>_<batch id>_<index>``."""
    parts = run_dir.name.rsplit("_", 2)
    if len(parts) != 3 or not parts[2].isdigit() or not parts[1].isalnum():
        return None
    return run_dir.parent / ".batches" / parts[1] / LAUNCH_RECORD


def manifest_from_launch(run_dir: Path | str) -> dict | None:
    """The manifest of a run whose launcher died before writing it, rebuilt from its batch's
    launch record (see :meth:`easylaunch.batch.Batch.record_launch`); None without one."""
    run_dir = Path(run_dir)
    path = _launch_record_path(run_dir)
    record = read_json(path) if path is not None and (run_dir / STATUS).exists() else None
    if record is None:
        return None
    index = int(run_dir.name.rsplit("_", 1)[1])
    return {
        **record.get("manifest", {}),
        "index": index,
        "run_name": run_dir.name,
        "run_dir": str(run_dir),
        "variant": read_json(run_dir / VARIANT, {}),
        "backend": {**record.get("backend_common", {}), **record.get("backend", {}).get(str(index), {})},
        "incomplete": "the launcher stopped before it wrote this run's manifest (rebuilt from its launch record)",
    }


def read_manifest(run_dir: Path | str) -> dict:
    """The run's manifest; raises FileNotFoundError naming the directory when it has none.

    A run whose launcher died before writing it gets the manifest its batch's launch record
    describes (marked ``incomplete``)."""
    manifest = read_json(Path(run_dir) / MANIFEST)
    if manifest is None:
        manifest = manifest_from_launch(run_dir)
    if manifest is None:
        raise FileNotFoundError(
            f"{run_dir} is not an easylaunch run directory (no {MANIFEST}); "
            "pass a directory that `easylaunch ls` lists"
        )
    return manifest


def update_manifest(run_dir: Path | str, updates: Mapping[str, Any]) -> dict:
    """Merge ``updates`` into the manifest (used by modes to record backend ids)."""
    manifest = read_manifest(run_dir)
    for key, value in updates.items():
        if isinstance(value, Mapping) and isinstance(manifest.get(key), dict):
            manifest[key].update(value)
        else:
            manifest[key] = value
    atomic_write_json(Path(run_dir) / MANIFEST, manifest)
    return manifest


def is_run_dir(path: Path | str) -> bool:
    """True when ``path`` holds a manifest, or is a run of a launch record whose launcher died
    before it wrote the manifest."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return True
    record = _launch_record_path(path)
    return record is not None and record.is_file() and (path / STATUS).is_file()


#: a run directory's name: ``<YYYYmmdd-HHMMSS.mmm>_<batch id>_<index>``
_RUN_NAME = re.compile(r"^\d{8}-\d{6}\.\d{3}_[0-9a-f]{6}_\d+$")


def half_made_runs(exp_dir: Path | str, min_age: float = 0.0) -> list[Path]:
    """Run directories a launch began and never finished: the launcher was killed (SIGKILL, a
    lost machine) between making them and writing their manifests or launch record, so no
    run will ever start there and :func:`is_run_dir` does not list them. Only those untouched
    for ``min_age`` seconds (a launch still writing its runs is not half-made)::

        for d in half_made_runs(log_dir / "demo", min_age=600):
            shutil.rmtree(d)          # what `easylaunch clean demo` does
    """
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        return []
    now = time.time()
    found = []
    for d in sorted(exp_dir.iterdir()):
        if not _RUN_NAME.match(d.name) or not d.is_dir() or is_run_dir(d):
            continue
        try:
            newest = max([d.stat().st_mtime] + [f.stat().st_mtime for f in d.iterdir()])
        except OSError:
            continue  # removed meanwhile
        if now - newest >= min_age:
            found.append(d)
    return found


def hostname() -> str:
    """This machine's name as recorded in status files."""
    if sys.platform.startswith("linux"):
        # what socket.gethostname() returns on Linux, without importing socket in the runner
        return os.uname().nodename
    import socket

    return socket.gethostname()
