"""The launch plan: what a mode's ``check()`` resolved, handed to its ``launch()``.

``check()`` validates everything before any directory exists and returns a plan; the api then
writes the run directories and calls ``launch(batch, plan)``. Modes extend the plan with their
own resolved facts (a Slurm config, an image's Python)::

    @dataclass
    class SlurmPlan(LaunchPlan):
        config_name: str = "cpu"
        config: SlurmConfig = ...

    def check(self, batch) -> SlurmPlan: ...
    def launch(self, batch, plan: SlurmPlan) -> None: ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, TypeVar

from .runtimes import Runtime


@dataclass
class LaunchPlan:
    """What every mode's launch needs to know beyond the batch itself."""

    #: the environment the runner starts in (None: this machine's interpreter)
    runtime: Optional[Runtime] = None
    #: variants run one after another by one warm task (1: one task per variant)
    variants_per_task: int = 1
    #: the Python minor (``3.9``) where the runner executes, when known and not the launcher's
    target_python: Optional[str] = None


#: a packed task should run at least this long: its start-up is then a small part of it
TARGET_TASK_SECONDS = 60.0

T = TypeVar("T")


def variants_per_task(options: Mapping[str, Any], n_runs: int, slots: int) -> int:
    """How many variants one warm task runs: ``variants_per_task`` when given, else chosen from
    ``expected_duration`` (seconds per variant) so that a task lasts about a minute while every
    one of ``slots`` parallel slots still gets work; 1 when neither is set."""
    if options.get("variants_per_task"):
        return int(options["variants_per_task"])
    duration = options.get("expected_duration")
    if not duration:
        return 1
    k = max(1, math.floor(TARGET_TASK_SECONDS / float(duration)))
    return max(1, min(k, math.ceil(n_runs / max(1, slots))))


def groups(items: Sequence[T], k: int) -> List[List[T]]:
    """``items`` in consecutive groups of ``k`` (the last one may be shorter)."""
    return [list(items[i : i + k]) for i in range(0, len(items), k)]
