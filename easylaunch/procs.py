"""Process identity and liveness, cheap enough for the runner's start-up path.

A pid alone is ambiguous once it is reused, so runs record ``(pid, token)`` where the token
is the process start time; :func:`alive` checks both::

    token = process_token(os.getpid())
    assert alive(os.getpid(), token)
    kill_run(pid, signal.SIGKILL)   # the run's process group if it leads one, else its process tree

Standard library only: the runner's watchdog and the packed task runner use it on the target
(Python 3.8+).
"""

from __future__ import annotations

import os
import signal
from typing import List, Optional


def process_token(pid: int) -> Optional[str]:
    """The process start time as an opaque string, or None when no such process exists."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # the command name may hold spaces and parentheses: split after the last ')'
        return stat[stat.rindex(b")") + 2 :].split()[19].decode()
    except FileNotFoundError:
        return None
    except OSError:
        pass
    try:
        import psutil

        return repr(psutil.Process(pid).create_time())
    except Exception:
        return None


def waitstatus_to_exitcode(status: int) -> int:
    """``os.waitstatus_to_exitcode`` (Python 3.9+), also on 3.8: the exit code, or -N for signal N."""
    convert = getattr(os, "waitstatus_to_exitcode", None)
    if convert is not None:
        return convert(status)
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    raise ValueError(f"invalid wait status {status!r}")


def alive(pid: Optional[int], token: Optional[str] = None) -> bool:
    """True when ``pid`` runs and (if given) started at ``token``; zombies count as dead."""
    if not pid:
        return False
    current = process_token(pid)
    if current is None:
        return False
    if token is not None and current != token:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        if stat[stat.rindex(b")") + 2 :].split()[0] == b"Z":
            return False
    except OSError:
        pass
    return True


def terminate(pid: int, token: Optional[str], sig: int = signal.SIGTERM, group: bool = True) -> bool:
    """Send ``sig`` to the process (and its process group when it leads one). False if gone."""
    if not alive(pid, token):
        return False
    try:
        if group and os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def descendants(pid: int) -> List[int]:
    """Every process below ``pid`` (children, their children, ...), from one scan of /proc."""
    children: dict = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out: List[int] = []
    todo = list(children.get(pid, ()))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children.get(child, ()))
    return out


def kill_run(pid: int, sig: int = signal.SIGKILL, spare: Optional[int] = None) -> bool:
    """Send ``sig`` to a run's processes; False when ``pid`` is gone.

    A run that leads its own process group (a local runner in its own session, a forked pool or
    task child) is signalled as that group: what its function started goes too. Otherwise (a
    runner inside a container, one started by hand from a shell) the group is not the run's
    alone, so ``pid`` and its process tree are signalled instead, stopped first so that none of
    them forks away meanwhile. ``spare`` (a watchdog's own pid) is left out.
    """
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return False
    try:
        if pgid == pid and pgid != os.getpgrp():
            os.killpg(pgid, sig)
            return True
        tree = [p for p in descendants(pid) if p != spare]
        if sig == signal.SIGKILL:
            for p in [pid, *tree]:
                _signal_quietly(p, signal.SIGSTOP)
            tree = [p for p in descendants(pid) if p != spare]  # forked before the stop
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    for p in tree:
        _signal_quietly(p, sig)
    return True


def _signal_quietly(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
