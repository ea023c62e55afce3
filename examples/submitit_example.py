"""A typical submitit script. It runs on easylaunch after changing only its import:

    import easylaunch.submitit_compat as submitit      # instead of: import submitit

    python examples/submitit_example.py                 # Slurm if sbatch is here, else local
    EXAMPLE_CLUSTER=local EXAMPLE_FOLDER=/tmp/logs python examples/submitit_example.py

It maps a function over 10 inputs (one job array), batches two submissions, re-raises a failing
job's exception, and runs a checkpointable callable that outlives its Slurm time limit once:
its checkpoint() at the limit requeues it, and the resumed attempt finishes.
"""

import os
import time

import submitit


def add(a, b):
    return a + b


def fail(x):
    raise ValueError(f"cannot handle {x}")


class LongTask(submitit.helpers.Checkpointable):
    """Sleeps past the time limit once; requeued by its checkpoint, it then finishes."""

    def __init__(self):
        self.checkpoints = 0

    def __call__(self, seconds):
        if self.checkpoints == 0:
            time.sleep(seconds)  # on Slurm: longer than the job's time limit
        return f"done after {self.checkpoints} checkpoint(s)"

    def checkpoint(self, seconds):
        self.checkpoints += 1
        print(f"checkpoint {self.checkpoints}: requeueing", flush=True)
        return super().checkpoint(seconds)


def main():
    folder = os.environ.get("EXAMPLE_FOLDER", "submitit_logs/%j")
    executor = submitit.AutoExecutor(folder=folder, cluster=os.environ.get("EXAMPLE_CLUSTER"))
    # a one-minute limit; USR2 (the checkpoint signal) 25 s before it: Slurm checks every 30 s,
    # so it comes 5 to 35 s after a job starts
    executor.update_parameters(
        name="example", timeout_min=1, slurm_signal_delay_s=25, slurm_array_parallelism=8, cpus_per_task=1
    )
    long_job = executor.submit(LongTask(), 300 if executor.cluster == "slurm" else 1)

    jobs = executor.map_array(add, range(10), range(10, 20))
    print("job ids:", [job.job_id for job in jobs[:2]], "...")
    print("sums:", [job.result() for job in jobs])

    with executor.batch():
        pair = [executor.submit(add, 1, 2), executor.submit(add, a=3, b=4)]
    print("batch:", [job.result() for job in pair])

    failing = executor.submit(fail, 7)
    try:
        failing.result()
    except Exception as exc:  # submitit raises FailedJobError, easylaunch the job's own ValueError
        print("failed as expected:", "cannot handle 7" in str(exc))

    print("long task:", long_job.result(), long_job.state)


if __name__ == "__main__":
    main()
