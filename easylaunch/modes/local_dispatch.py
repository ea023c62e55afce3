"""Detached queue of the ``local`` mode: runs a sweep's payloads, ``max_parallel`` at a time.

    python -m easylaunch.modes.local_dispatch <exp>/.batches/<id>/queue.json

Skips runs that were cancelled (or are no longer PENDING) before their turn. It lives in its
own session, so it outlives the launch script.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from .. import records
from ..spec import State
from .process import runner_env


def main(queue_file: str) -> int:
    queue = records.read_json(queue_file)
    limit = int(queue["max_parallel"])
    python = queue.get("python") or sys.executable
    env = runner_env()
    running: set[int] = set()
    for payload in queue["payloads"]:
        while len(running) >= limit:
            pid, _ = os.wait()
            running.discard(pid)
        run_dir = Path(payload).parent
        if (run_dir / records.CANCEL_MARK).exists():
            records.write_status(
                run_dir, State.CANCELLED, ended=time.time(), message="cancelled before it started"
            )
            continue
        if records.read_status(run_dir).get("state") != State.PENDING:
            continue
        proc = subprocess.Popen(
            [python, "-m", "easylaunch.runner", payload, "--quiet"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        running.add(proc.pid)
    while running:
        pid, _ = os.wait()
        running.discard(pid)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
