"""The escalation of a local cancel: kill what ignored the SIGTERM once its grace has passed.

    python -m easylaunch.modes.reaper '{"grace": 10, "sent": T, "targets": [[run_dir, pid, token], ...]}'

Started detached by :meth:`easylaunch.modes.process.ProcessMode.cancel` for the runs still alive
a moment after their SIGTERM, so that the kill happens even when the launch script exits right
after ``cancel()``. It ends as soon as every target is gone.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from typing import List, Optional, Tuple

from .. import transitions
from ..procs import alive, kill_run


def reap(targets: List[Tuple[str, int, Optional[str]]], grace: float, sent: float) -> None:
    """Wait until ``sent + grace`` for the cancelled runs to exit; kill those that did not
    (recorded CANCELLED first, through transitions), and settle the ones that vanished without
    a record (CANCELLED too: their cancel mark is there)."""
    deadline = time.monotonic() + max(0.0, sent + grace - time.time())
    while time.monotonic() < deadline and any(alive(pid, token) for _, pid, token in targets):
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    for run_dir, pid, token in targets:
        if alive(pid, token):
            transitions.cancel_forced(run_dir, f"runner process {pid}", grace)
            kill_run(pid, signal.SIGKILL)
        else:
            transitions.died_without_record(run_dir, f"runner process {pid}")


def main(argv: List[str]) -> int:
    spec = json.loads(argv[0])
    reap([tuple(t) for t in spec["targets"]], float(spec["grace"]), float(spec["sent"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
