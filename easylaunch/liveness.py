"""Is the launcher still there? For targets that wait on something only the launcher writes.

A Slurm array is submitted before its payloads are written, and local packed tasks start
while the launcher still writes them: a task whose payload is missing must know whether it
may still come. The launcher writes ``launcher.json`` in the batch's directory (who it is:
host, pid, start token) and, while it writes payloads for targets on other machines, touches
it every ``HEARTBEAT`` seconds; once every payload is written it records ``done``::

    beat = Heartbeat(sweep_dir / LAUNCHER_FILE, every=HEARTBEAT)   # launcher side
    beat.start(); ...write payloads...; beat.stop()                # -> {"done": true}

    watch = LauncherWatch(sweep_dir / LAUNCHER_FILE)               # target side
    while not payload.exists():
        if watch.gone(): break                                      # give up at once

The launcher is gone when the file says ``done`` (what is missing now never comes), when it
runs on this host and its process is dead, or, elsewhere, when the file's modification time
has not changed for ``STALE`` seconds (measured on the target's own clock: no clock skew).
Standard library only (runs in the task runner, Python 3.8+).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Optional, Union

from . import records
from .procs import alive, process_token

LAUNCHER_FILE = "launcher.json"
#: seconds between the launcher's touches of its file while it writes payloads
HEARTBEAT = 2.0
#: a launcher on another host whose file was not touched for this long is gone
STALE = float(os.environ.get("EASYLAUNCH_LAUNCHER_STALE", "30"))


def identity() -> dict:
    """This process as a launcher record: host, pid and start token."""
    pid = os.getpid()
    return {"host": records.hostname(), "pid": pid, "token": process_token(pid)}


class Heartbeat:
    """The launcher's side: ``launcher.json`` exists while payloads are being written."""

    def __init__(self, path: Union[str, Path], every: Optional[float] = None):
        self.path = Path(path)
        self.every = every
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "Heartbeat":
        records.atomic_write_json(self.path, {**identity(), "done": False})
        if self.every:
            self._thread = threading.Thread(target=self._beat, name="easylaunch-heartbeat", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def stop(self, done: bool = True) -> None:
        """Every payload is written (``done``), or the launch gave up (``done=False``: the
        file is left to go stale, and same-host targets see the pid end)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if done:
            try:
                records.atomic_write_json(self.path, {**identity(), "done": True})
            except OSError:
                pass


class LauncherWatch:
    """The target's side: ``gone()`` once nothing more will come from the launcher."""

    def __init__(self, path: Union[str, Path], stale: Optional[float] = None):
        self.path = Path(path)
        self.stale = STALE if stale is None else stale
        self._seen: Optional[float] = None  # the file's mtime as last seen
        self._since = time.monotonic()  # when it was first seen with that mtime

    def gone(self) -> bool:
        try:
            info = records.read_json(self.path)
            mtime = os.stat(self.path).st_mtime
        except (OSError, ValueError):
            return False  # no record (an older launcher, a bundle): the caller's own bound applies
        if info is None:
            return False
        if info.get("done"):
            return True
        if info.get("host") == records.hostname():
            return not alive(info.get("pid"), info.get("token"))
        now = time.monotonic()
        if mtime != self._seen:
            self._seen, self._since = mtime, now
            return False
        return now - self._since >= self.stale
