"""Record the outputs of the real Slurm commands the launcher runs, for the offline tests.

    source /tmp/easylaunch-services/slurm.env && python tests/data/slurm/record.py

(needs the real cluster of scripts/services/slurm.sh; rewrites the files next to this one and
cancels what it submitted). What it records, in the forms easylaunch.slurm_cli asks for:

- an array of 10 tasks, ``--array=0-9%2``: task 0 exits 0, task 1 exits 3, the others sleep;
  task 3 (running) and task 8 (pending) are scancelled, so sacct shows every kind of line,
  the pending ones compressed as ``ID_[5-7,9%2]``: ``sbatch_parsable.out``, ``sacct_array.out``,
  ``squeue_array.out``; then the whole array is scancelled: ``sacct_array_cancelled.out``;
- sbatch refusing an unknown partition: ``sbatch_invalid_partition.err``;
- sacct on a cluster without accounting (a copy of slurm.conf with accounting_storage/none):
  ``sacct_accounting_disabled.err``;
- ``scontrol show config`` and ``sinfo -h -o %C [-p debug]``.

``recorded.json`` says which job id the outputs belong to and each command's exit status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SCRIPT = """#!/bin/bash
case $SLURM_ARRAY_TASK_ID in
0) exit 0 ;;
1) exit 3 ;;
*) sleep 300 ;;
esac
"""


def run(*argv: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)


def states(job_id: str) -> dict:
    out = run("squeue", "-h", "-r", "-o", "%i|%T", "-j", job_id).stdout
    return dict(line.split("|") for line in out.split())


def wait(predicate, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.3)


def main() -> None:
    meta = {"recorded": time.strftime("%Y-%m-%d %H:%M:%S"), "slurm": run("sinfo", "--version").stdout.strip()}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "array.sh"
        script.write_text(SCRIPT)
        start = time.time()
        sub = run("sbatch", "--parsable", "--array=0-9%2", f"--output={tmp}/%A_%a.out", str(script))
        assert sub.returncode == 0, sub.stderr
        (HERE / "sbatch_parsable.out").write_text(sub.stdout)
        job = sub.stdout.strip().split(";")[0]
        meta["array_job_id"] = job
        try:
            wait(
                lambda: {f"{job}_2", f"{job}_3"} <= {k for k, v in states(job).items() if v == "RUNNING"},
                "2, 3",
            )
            run("scancel", f"{job}_3")
            wait(lambda: states(job).get(f"{job}_4") == "RUNNING", "task 4 to start")
            run("scancel", f"{job}_8")
            wait(lambda: f"{job}_8" not in states(job), "task 8 to go")
            since = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start - 120))
            for _ in range(100):  # until slurmdbd lists the finished tasks
                sacct = run("sacct", "-X", "-n", "-P", "-o", "JobID,State", "-S", since, "-j", job)
                if f"{job}_1|FAILED" in sacct.stdout and f"{job}_3|CANCELLED" in sacct.stdout:
                    break
                time.sleep(0.3)
            (HERE / "sacct_array.out").write_text(sacct.stdout)
            squeue = run("squeue", "-h", "-r", "-o", "%i|%T", "-j", job)
            (HERE / "squeue_array.out").write_text(squeue.stdout)
            meta["sacct_array"] = sacct.returncode
            meta["squeue_array"] = squeue.returncode
            # then the whole array: the pending range is CANCELLED as one line too; task 8,
            # cancelled while pending, is in neither sacct nor squeue
            run("scancel", job)
            for _ in range(100):
                done = run("sacct", "-X", "-n", "-P", "-o", "JobID,State", "-S", since, "-j", job)
                if "RUNNING" not in done.stdout and "PENDING" not in done.stdout:
                    break
                time.sleep(0.3)
            (HERE / "sacct_array_cancelled.out").write_text(done.stdout)
            meta["sacct_array_cancelled"] = done.returncode
        finally:
            run("scancel", job)
        bad = run("sbatch", "--parsable", "--partition=nosuchpartition", str(script))
        (HERE / "sbatch_invalid_partition.err").write_text(bad.stderr)
        meta["sbatch_invalid_partition"] = bad.returncode
        conf = Path(tmp) / "slurm.conf"
        original = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text()
        conf.write_text(
            "\n".join(
                "AccountingStorageType=accounting_storage/none"
                if line.startswith("AccountingStorageType=")
                else line
                for line in original.splitlines()
            )
            + "\n"
        )
        off = run(
            "sacct",
            "-X",
            "-n",
            "-P",
            "-o",
            "JobID,State",
            "-j",
            job,
            env=dict(os.environ, SLURM_CONF=str(conf)),
        )
        (HERE / "sacct_accounting_disabled.err").write_text(off.stderr)
        meta["sacct_accounting_disabled"] = off.returncode
    config = run("scontrol", "show", "config")
    (HERE / "scontrol_show_config.out").write_text(config.stdout)
    (HERE / "sinfo_cpus.out").write_text(run("sinfo", "-h", "-o", "%C").stdout)
    (HERE / "sinfo_cpus_debug.out").write_text(run("sinfo", "-h", "-o", "%C", "-p", "debug").stdout)
    (HERE / "recorded.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
