"""The one interface every backend implements.

A mode is a class with a unique ``name``, the options it takes, and four operations that
each work on many runs at once::

    class MyMode(Mode):
        name = "mine"
        options = (Option("queue", (str,), "default", "queue to submit to"),)

        def launch(self, batch): ...        # write scripts, submit once per batch
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

    def __init__(self, settings: Settings):
        self.settings = settings

    def check(self, batch: Batch) -> None:
        """Validate everything the backend needs before any directory is written."""

    def launch(self, batch: Batch) -> None:
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
