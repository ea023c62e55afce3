"""Plain data shared by the launcher and the runner: DoodadConfig, GitInfo and job states.

``DoodadConfig`` and ``GitInfo`` keep exactly doodad easy_launch's fields, so a doodad
launch script runs after changing only its import::

    from easylaunch import DoodadConfig, GitInfo

    def fn(doodad_config: DoodadConfig, variant: dict) -> float:
        print("writing to", doodad_config.base_log_dir)
        return variant["lr"] * 2
"""

from __future__ import annotations

import enum
from typing import Any, List, NamedTuple, Union


class GitInfo(NamedTuple):
    """State of one code directory's git repository at launch time."""

    directory: str
    code_diff: str
    code_diff_staged: str
    commit_hash: str
    branch_name: str


class DoodadConfig(NamedTuple):
    """What the experiment function learns about its run.

    ``base_log_dir`` is the run's own directory as seen where the function runs:
    write every output there.
    """

    exp_name: str
    base_log_dir: str
    use_gpu: bool
    gpu_id: Union[int, str]
    git_infos: List[GitInfo]
    script_name: str
    extra_launch_info: dict


class State(str, enum.Enum):
    """Life-cycle state of one run. Compares equal to its name: ``State.COMPLETED == "COMPLETED"``."""

    GENERATED = "GENERATED"  # script or bundle written, not submitted by easylaunch
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    PREEMPTED = "PREEMPTED"

    def __str__(self) -> str:
        return self.value

    @property
    def terminal(self) -> bool:
        """True once the run can no longer change state by itself."""
        return self in TERMINAL_STATES


TERMINAL_STATES = frozenset({State.COMPLETED, State.FAILED, State.CANCELLED, State.TIMEOUT, State.PREEMPTED})


class FunctionExit(RuntimeError):
    """The function called ``sys.exit()`` with a failure code (non-zero, or a message).

    The run is recorded FAILED with that exit code, and this (an ordinary exception) stands for
    it everywhere the run's exception is re-raised (``job.result()``, ``sweep.results()``, an
    in-process run): a run's SystemExit never ends the launcher. ``sys.exit(0)`` and
    ``sys.exit()`` are a normal return (COMPLETED, result None)::

        try:
            job.result()
        except FunctionExit as exc:
            exc.code          # what the function passed to sys.exit(), e.g. 3 or "bad input"
            exc.exit_code     # the recorded exit code: the int, or 1 for a message
    """

    def __init__(self, code: Any):
        self.code = code
        self.exit_code = code if isinstance(code, int) and not isinstance(code, bool) else 1
        super().__init__(f"the function called sys.exit({code!r})")

    def __reduce__(self) -> tuple:
        return (type(self), (self.code,))
