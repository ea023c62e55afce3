"""``here_no_doodad``: call the function in this very process (breakpoints and pdb work).

The run directory is still written (manifest, payload, status, logs, result). The function's
exception is recorded and then re-raised to the caller, as a plain call would.
"""

from __future__ import annotations

from typing import Sequence

from .. import runner, transitions
from ..batch import Batch
from ..job import Job
from ..plan import LaunchPlan
from ..spec import State
from .base import Mode
from .process import launcher_sys_path


class HereMode(Mode):
    name = "here_no_doodad"
    waits_by_default = True

    def launch(self, batch: Batch, plan: LaunchPlan) -> None:
        # let `python -m easylaunch.runner payload.pkl` import the script's modules, as in local
        batch.payload_sys_path = launcher_sys_path()
        batch.materialize()
        batch.started = True  # a failing function must not remove its (recorded) run directory
        config = batch.doodad_config()
        extra = batch.payload_extra()  # timeout: interrupts the call, re-raised as TimeoutError
        for i, run in enumerate(batch.runs):
            try:
                runner.execute(
                    run.run_dir,
                    lambda run=run: (batch.fn, config, run.variant, extra),
                    capture="python",
                    reraise=True,
                )
            except BaseException:
                # the exception ends the sweep: the runs after it will never start
                for later in batch.runs[i + 1 :]:
                    transitions.not_started(
                        later.run_dir, State.CANCELLED, f"not run: run {run.name} raised first"
                    )
                raise

    def cancel(self, jobs: Sequence[Job]) -> None:
        """In-process runs are over by the time anyone holds their handle."""
