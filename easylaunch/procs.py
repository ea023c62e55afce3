"""Process identity and liveness, cheap enough for the runner's start-up path.

A pid alone is ambiguous once it is reused, so runs record ``(pid, token)`` where the token
is the process start time; :func:`alive` checks both::

    token = process_token(os.getpid())
    assert alive(os.getpid(), token)
"""

from __future__ import annotations

import os
import signal
from typing import Optional


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
