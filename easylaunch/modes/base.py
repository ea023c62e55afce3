"""The one interface every backend implements.

A mode is a class with a unique ``name``, the options it takes, and four operations that
each work on many runs at once::

    class MyMode(Mode):
        name = "mine"
        options = (Option("queue", (str,), "default", "queue to submit to"),)

        def check(self, batch) -> LaunchPlan: ...   # validate, resolve; nothing written yet
        def launch(self, batch, plan): ...  # write scripts, submit once per batch
        def poll(self, jobs): ...           # {run_dir: State} for unfinished jobs, one backend call
        def cancel(self, jobs): ...
        def fetch(self, jobs): ...          # copy outputs back (no-op when already local)

Register it in ``easylaunch/modes/__init__.py``. Nothing else branches on mode names.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Dict, Optional, Sequence, Tuple

from ..config import Settings
from ..options import Option
from ..plan import LaunchPlan
from ..spec import State

if TYPE_CHECKING:
    from ..batch import Batch
    from ..job import Job


class Mode:
    """Base class of backends. Subclasses set ``name`` and override the operations."""

    name: ClassVar[str] = ""
    options: ClassVar[Tuple[Option, ...]] = ()
    #: run_experiment() waits for completion unless skip_wait=True (doodad's local behaviour)
    waits_by_default: ClassVar[bool] = False
    #: seconds between polls while waiting
    poll_interval: ClassVar[float] = 1.0
    #: a backend poll is followed by a pause of at least this many times the CPU time it took
    #: (the runs on this machine need the CPU); smaller where the runs use other machines'
    poll_spacing: ClassVar[float] = 20.0
    #: the backend may start a run while launch() is still writing payloads (Slurm submits
    #: first, so that each manifest is written once with its job id): payloads are then
    #: written atomically and the target waits for a missing one
    starts_before_payloads: ClassVar[bool] = False
    #: the runs write their outputs on another machine: ``fetch()`` brings them into the local
    #: run directories (Job.stdout() and ``easylaunch logs`` ask for it)
    fetches_outputs: ClassVar[bool] = False

    def __init__(self, settings: Settings):
        self.settings = settings

    def check(self, batch: Batch) -> LaunchPlan:
        """Validate everything the backend needs before any directory is written; return what
        was resolved, for :meth:`launch`."""
        return LaunchPlan()

    def launch(self, batch: Batch, plan: LaunchPlan) -> None:
        """Start or submit every run of ``batch``; call ``batch.materialize()`` when ready."""
        raise NotImplementedError

    def poll(self, jobs: Sequence[Job]) -> Dict[Path, Optional[State]]:
        """Backend view of unfinished jobs; None for a run means 'trust its status file'."""
        return {}

    def cancel(self, jobs: Sequence[Job]) -> None:
        """Ask the backend to stop these runs."""
        raise NotImplementedError

    def fetch(self, jobs: Sequence[Job]) -> None:
        """Bring the runs' outputs into their local run directories."""

    def cleanup(self, jobs: Sequence[Job]) -> None:
        """Release what the backend still holds for these finished or cancelled runs
        (containers, processes, temporary files); called when a ``with`` block of their
        Job/Sweep ends. Must be safe to call twice."""
