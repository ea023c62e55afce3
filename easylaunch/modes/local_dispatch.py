"""Detached queue of the local schedulers: starts a sweep's processes, ``max_parallel`` at a time.

    python -m easylaunch.modes.local_dispatch <exp>/.batches/<id>/queue.json

``queue.json`` (written by :mod:`easylaunch.modes.local`, mode 0600) holds one entry per
process: its ``argv`` (a runner, or a packed task of several runs; plain or in a container),
the ``env`` entries that differ from the launcher's, the ``runs`` it serves and where its own
output goes. An entry whose runs were all cancelled (or are no longer PENDING) before its turn
is skipped. Children are started with ``posix_spawn`` in their own session and reaped by pid,
so no slot is ever lost; when one exits, its runs that recorded nothing are settled through
:mod:`easylaunch.transitions` with the exit code. It lives in its own session, so it outlives
the launch script.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List

from .. import records, transitions
from ..procs import process_token, waitstatus_to_exitcode
from ..spec import State


def startable(runs: List[Path]) -> List[Path]:
    """The entry's runs that still wait to start (cancelled ones are recorded CANCELLED)."""
    out = []
    for run_dir in runs:
        if (run_dir / records.CANCEL_MARK).exists():
            transitions.cancelled_before_start(run_dir)
            continue
        if records.read_status(run_dir).get("state") == State.PENDING:
            out.append(run_dir)
    return out


def spawn(entry: dict, base_env: Dict[str, str]) -> int:
    """Start one entry's process in a new session; returns its pid."""
    env = dict(base_env)
    env.update(entry.get("env") or {})
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    actions = [(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)]
    for fd, path in ((1, entry.get("stdout")), (2, entry.get("stderr"))):
        actions.append((os.POSIX_SPAWN_OPEN, fd, path or os.devnull, flags, 0o644))
    argv = entry["argv"]
    return os.posix_spawnp(argv[0], argv, env, file_actions=actions, setsid=True)


def settle_after_exit(entry: dict, pid: int, exit_code: int) -> None:
    """The entry's process ended: its runs that recorded no outcome get one."""
    who = f"process {pid} ({os.path.basename(entry['argv'][0])})"
    for run in entry["runs"]:
        run_dir = Path(run)
        state = transitions.current(run_dir)
        if state is State.RUNNING:
            transitions.died_without_record(run_dir, who, exit_code=exit_code)
        elif state is State.PENDING:
            if (run_dir / records.CANCEL_MARK).exists():
                transitions.cancelled_before_start(run_dir)
            else:
                transitions.not_started(
                    run_dir,
                    State.FAILED,
                    f"{who} ended ({transitions.exit_description(exit_code)}) before this run started; "
                    f"see its output in {entry.get('stderr') or 'its log'}",
                )


def main(queue_file: str) -> int:
    queue = records.read_json(queue_file)
    # the launcher also writes it once it has our pid: written here, it is never missing
    # after a launcher that dies in between
    records.atomic_write_json(
        Path(queue_file).parent / "supervisor.json",
        {"pid": os.getpid(), "token": process_token(os.getpid()), "kind": "dispatcher"},
    )
    limit = int(queue["max_parallel"])
    base_env = dict(os.environ)
    running: Dict[int, dict] = {}

    def reap_one() -> None:
        pid, status = os.waitpid(-1, 0)
        entry = running.pop(pid, None)
        if entry is not None:
            settle_after_exit(entry, pid, waitstatus_to_exitcode(status))

    for entry in queue["entries"]:
        while len(running) >= limit:
            reap_one()
        if not startable([Path(r) for r in entry["runs"]]):
            continue
        try:
            pid = spawn(entry, base_env)
        except OSError as exc:
            for run in entry["runs"]:
                transitions.refused(Path(run), "this machine", f"cannot start {entry['argv'][0]}: {exc}")
            continue
        running[pid] = entry
    while running:
        reap_one()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
