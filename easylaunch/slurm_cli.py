"""Every Slurm command the launcher runs (sbatch, sacct, squeue, scancel, scontrol, sinfo), through
ONE injectable runner, and the parsers of their outputs.

The modes ``slurm`` and ``slurm_singularity`` hold a :class:`SlurmCLI` and call nothing else
(the target side's Slurm facts live in :mod:`easylaunch.environments`)::

    cli = SlurmCLI()                                # runs the real commands
    job_id = cli.sbatch("/logs/e/.batches/b/submit_000000.sbatch", hold=True)   # '4242'
    cli.sacct_states(["4242"], since=time.time() - 600)   # {'4242_0': 'COMPLETED', ...}
    cli.squeue_states(["4242"])                     # {'4242_1': 'RUNNING', ...}
    cli.scancel(["4242_3"])
    cli.max_array_size()                            # 1001 (scontrol show config)
    cli.partition_cpus("debug")                     # 8 (sinfo -o %C)

A test gives it a runner that replays recorded outputs instead of running anything::

    def replay(argv, timeout):
        return CommandResult(argv, 0, recorded[argv[0]], "")

    mode = SlurmMode(settings, cli=SlurmCLI(runner=replay, which=lambda name: "/usr/bin/" + name))
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple


@dataclass(frozen=True)
class CommandResult:
    """What one command did: its argv, exit status and output (text)."""

    argv: Tuple[str, ...]
    returncode: int
    stdout: str = ""
    stderr: str = ""


#: ``runner(argv, timeout) -> CommandResult``; the default runs the command
Runner = Callable[[Sequence[str], float], CommandResult]


class SubmitError(RuntimeError):
    """sbatch refused the job; the message holds its output verbatim."""


class AccountingDisabled(RuntimeError):
    """``sacct`` says this cluster keeps no accounting (no slurmdbd): ask ``squeue`` instead."""


def run_command(argv: Sequence[str], timeout: float = 60) -> CommandResult:
    """Run ``argv`` and capture its output; a missing binary or a timeout is a result too
    (exit status 127 or 124, the reason in stderr), never an exception."""
    argv = tuple(str(a) for a in argv)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except OSError as exc:
        return CommandResult(argv, 127, "", f"{argv[0]}: {exc.strerror or exc}")
    except subprocess.TimeoutExpired:
        return CommandResult(argv, 124, "", f"{argv[0]} did not answer within {timeout:g} s")
    return CommandResult(argv, proc.returncode, proc.stdout, proc.stderr)


# -- parsers (pure: the offline tests feed them recorded outputs) ------------------------------------


def parse_sbatch_parsable(stdout: str) -> str:
    """``sbatch --parsable`` prints ``JOBID`` or ``JOBID;CLUSTER``: the job id."""
    first = stdout.strip().splitlines()[0] if stdout.strip() else ""
    job_id = first.split(";")[0].strip()
    if not re.fullmatch(r"\d+", job_id):
        raise SubmitError(f"sbatch printed no job id: {stdout!r}")
    return job_id


def expand_job_field(job_field: str, state: str, out: Dict[str, str]) -> None:
    """``123_4``, ``123_[5-7,9%2]`` (pending tasks, throttled) or ``123`` -> entries of ``out``
    (``CANCELLED by 0`` -> ``CANCELLED``)."""
    state = state.split()[0] if state.strip() else ""
    job_field = job_field.strip()
    if "_" not in job_field:
        out[job_field] = state
        return
    array_id, _, tasks = job_field.partition("_")
    if not tasks.startswith("["):
        out[f"{array_id}_{tasks}"] = state
        return
    for part in tasks.strip("[]").split("%")[0].split(","):
        if "-" in part:
            lo, hi = part.split("-")
            for t in range(int(lo), int(hi) + 1):
                out[f"{array_id}_{t}"] = state
        elif part:
            out[f"{array_id}_{int(part)}"] = state


def parse_states(stdout: str) -> Dict[str, str]:
    """``JOBID|STATE`` lines (``sacct -P -o JobID,State``, ``squeue -o %i|%T``) -> task -> state."""
    states: Dict[str, str] = {}
    for line in stdout.splitlines():
        parts = line.split("|")
        if len(parts) >= 2 and parts[0].strip():
            expand_job_field(parts[0], parts[1], states)
    return states


def accounting_disabled(stderr: str) -> bool:
    """sacct's refusal on a cluster without accounting (``Slurm accounting storage is disabled``)."""
    text = stderr.lower()
    return "accounting" in text or "slurmdbd" in text


def parse_max_array_size(config: str) -> Optional[int]:
    """``MaxArraySize = N`` from ``scontrol show config``."""
    m = re.search(r"^MaxArraySize\s*=\s*(\d+)", config, re.M)
    return int(m.group(1)) if m else None


def parse_sinfo_cpus(stdout: str) -> Optional[int]:
    """Total CPUs from ``sinfo -h -o %C`` (``allocated/idle/other/total``)."""
    words = stdout.split()
    parts = words[0].split("/") if words else []
    return int(parts[3]) if len(parts) == 4 and parts[3].isdigit() else None


# -- the commands ----------------------------------------------------------------------------------


class SlurmCLI:
    """The launcher's Slurm commands. ``runner`` runs one argv (default: for real, see
    :func:`run_command`); ``which`` finds a binary (default :func:`shutil.which`)."""

    def __init__(
        self, runner: Optional[Runner] = None, which: Optional[Callable[[str], Optional[str]]] = None
    ):
        self.runner: Runner = runner or run_command
        self.which = which or shutil.which

    def run(self, argv: Sequence[str], timeout: float = 60) -> CommandResult:
        """Every Slurm command goes through here."""
        return self.runner(list(argv), timeout)

    def available(self) -> bool:
        """Can this machine submit (is ``sbatch`` on PATH)?"""
        return self.which("sbatch") is not None

    def sbatch(self, script: str, hold: bool = False, what: str = "") -> str:
        """Submit ``script`` (``--parsable``); its job id, or SubmitError with sbatch's output."""
        argv = ["sbatch", "--parsable"] + (["--hold"] if hold else []) + [str(script)]
        result = self.run(argv)
        if result.returncode != 0:
            where = f" ({what})" if what else ""
            raise SubmitError(f"sbatch rejected the job{where}:\n" + (result.stderr or result.stdout).strip())
        return parse_sbatch_parsable(result.stdout)

    def scancel(self, targets: Sequence[str]) -> CommandResult:
        """``scancel`` jobs or array tasks (``123``, ``123_4``)."""
        return self.run(["scancel", *targets])

    def sacct_states(self, array_ids: Sequence[str], since: float) -> Optional[Dict[str, str]]:
        """Task -> state of the arrays, from ONE ``sacct -X`` call bounded by ``since`` (epoch s).
        AccountingDisabled when the cluster keeps no accounting; None when sacct failed otherwise."""
        argv = [
            "sacct",
            "-X",
            "-n",
            "-P",
            "-o",
            "JobID,State",
            "-S",
            time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since)),
            "-j",
            ",".join(array_ids),
        ]
        result = self.run(argv)
        if result.returncode != 0:
            if accounting_disabled(result.stderr):
                raise AccountingDisabled(result.stderr.strip())
            return None
        return parse_states(result.stdout)

    def squeue_states(self, array_ids: Sequence[str]) -> Dict[str, str]:
        """Task -> state of the arrays' tasks still in the queue (one ``squeue -r`` call)."""
        result = self.run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(array_ids)])
        return parse_states(result.stdout) if result.returncode == 0 else {}

    def max_array_size(self, default: int = 1001) -> int:
        """The cluster's MaxArraySize (``scontrol show config``), else Slurm's default."""
        result = self.run(["scontrol", "show", "config"])
        found = parse_max_array_size(result.stdout) if result.returncode == 0 else None
        return found or default

    def partition_cpus(self, partition: Optional[str] = None) -> Optional[int]:
        """CPUs of the partition (of the cluster when None), from ``sinfo -h -o %C``."""
        result = self.run(["sinfo", "-h", "-o", "%C"] + (["-p", partition] if partition else []))
        return parse_sinfo_cpus(result.stdout) if result.returncode == 0 else None
