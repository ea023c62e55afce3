"""Replay recorded Slurm outputs through :class:`easylaunch.slurm_cli.SlurmCLI` (no cluster).

The recordings in tests/data/slurm/ come from the real cluster (tests/data/slurm/record.py)::

    replay = Replay(sbatch=recorded_id(), sacct=(0, recorded("sacct_array.out"), ""))
    cli = replay.cli()                 # a SlurmCLI that answers from ``replay``
    ... replay.calls("sacct")          # the argv of every sacct call made

An answer is ``(returncode, stdout, stderr)``, a string (stdout, exit status 0), or a callable
``argv -> answer``. Commands without an answer get a harmless default (empty output; scontrol
and sinfo fail, as on a cluster that hides its configuration).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple, Union

from easylaunch.slurm_cli import CommandResult, SlurmCLI

DATA = Path(__file__).resolve().parent / "data" / "slurm"
Answer = Union[str, Tuple[int, str, str], Callable[[List[str]], "Answer"]]
DEFAULTS: Dict[str, Tuple[int, str, str]] = {
    "sbatch": (0, "4242\n", ""),
    "sacct": (0, "", ""),
    "squeue": (0, "", ""),
    "scancel": (0, "", ""),
    "scontrol": (1, "", "scontrol: error: (replay) no answer recorded"),
    "sinfo": (1, "", "sinfo: error: (replay) no answer recorded"),
}


def recorded(name: str) -> str:
    """A file recorded from the real cluster."""
    return (DATA / name).read_text()


def recorded_meta() -> dict:
    return json.loads(recorded("recorded.json"))


class Replay:
    """A SlurmCLI runner answering from recorded outputs; it keeps every call."""

    def __init__(self, **answers: Answer):
        self.answers: Dict[str, Answer] = dict(answers)
        self.log: List[List[str]] = []

    def __call__(self, argv: Sequence[str], timeout: float) -> CommandResult:
        argv = [str(a) for a in argv]
        self.log.append(argv)
        answer = self.answers.get(
            argv[0], DEFAULTS.get(argv[0], (127, "", f"{argv[0]}: not a Slurm command"))
        )
        while callable(answer):
            answer = answer(argv)
        if isinstance(answer, str):
            answer = (0, answer, "")
        rc, out, err = answer
        return CommandResult(tuple(argv), rc, out, err)

    def calls(self, command: str) -> List[List[str]]:
        return [argv for argv in self.log if argv[0] == command]

    def cli(self) -> SlurmCLI:
        return SlurmCLI(runner=self, which=lambda name: f"/replay/bin/{name}")
