"""Named points where a test can make the launcher die, to check what the runs become.

    EASYLAUNCH_FAILPOINT=local.after_materialize python launch.py   # SIGKILLs itself there
    EASYLAUNCH_FAILPOINT=batch.create_dirs:interrupt python launch.py  # KeyboardInterrupt there

A point is named ``<module>.<moment>``; ``:interrupt`` raises KeyboardInterrupt (a Ctrl-C)
instead of the SIGKILL, ``:term`` sends SIGTERM. Unset (always, outside tests) each point
costs one dictionary lookup. Standard library only (the task runner has points too).
"""

from __future__ import annotations

import os
import signal

ENV = "EASYLAUNCH_FAILPOINT"


def point(name: str) -> None:
    """Die here if ``$EASYLAUNCH_FAILPOINT`` names this point."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    target, _, how = wanted.partition(":")
    if target != name:
        return
    if how == "interrupt":
        raise KeyboardInterrupt(f"failpoint {name}")
    os.kill(os.getpid(), signal.SIGTERM if how == "term" else signal.SIGKILL)
    if how == "term":
        return  # the handler (if any) runs now
    signal.pause()  # pragma: no cover - SIGKILL is not delivered asynchronously
