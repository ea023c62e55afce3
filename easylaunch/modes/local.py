"""``local``: one runner subprocess per run on this machine.

As in doodad, run_experiment waits for the run unless ``skip_wait=True``; runs are started in
their own session, so they survive the launch script. Up to ``max_parallel`` runs start
directly; larger sweeps hand their queue to a detached dispatcher process
(``python -m easylaunch.modes.local_dispatch``) so queued runs are not lost when the launch
script exits.

To reach the function fast, a lone run's interpreter is started *before* the payload is
written; it imports while the launcher captures git state, then waits for one byte on stdin.
"""

from __future__ import annotations

import subprocess
import sys

from .. import records
from ..batch import Batch
from ..procs import process_token
from .process import SUPERVISOR_FILE, ProcessMode, launcher_sys_path, runner_env


class LocalMode(ProcessMode):
    name = "local"

    def launch(self, batch: Batch) -> None:
        limit = self.max_parallel(batch.options)
        echo = not batch.options.get("skip_wait") and len(batch.runs) == 1
        batch.payload_sys_path = launcher_sys_path()
        env = runner_env()
        out = None if echo else subprocess.DEVNULL
        if len(batch.runs) <= limit:
            procs = []
            batch.started = True
            for run in batch.runs:
                cmd = [sys.executable, "-m", "easylaunch.runner", str(run.payload_path), "--wait-go"]
                if not echo:
                    cmd.append("--quiet")
                proc = subprocess.Popen(
                    cmd, stdin=subprocess.PIPE, stdout=out, stderr=out, env=env, start_new_session=True
                )
                batch.backend[run.index] = {"pid": proc.pid, "token": process_token(proc.pid)}
                procs.append(proc)
            try:
                batch.materialize()
            finally:
                for proc in procs:
                    # after a failed materialize the runner reads EOF and records FAILED
                    try:
                        proc.stdin.write(b"g") if batch.materialized else None
                        proc.stdin.close()
                    except OSError:
                        pass
            return
        sweep_dir = batch.sweep_dir
        sweep_dir.mkdir(parents=True, exist_ok=True)
        batch.backend_common = {"supervisor_file": str(sweep_dir / SUPERVISOR_FILE)}
        batch.materialize()
        queue = sweep_dir / "queue.json"
        records.atomic_write_json(
            queue,
            {
                "payloads": [str(r.payload_path) for r in batch.runs],
                "max_parallel": limit,
                "python": sys.executable,
            },
        )
        batch.started = True
        with open(sweep_dir / "dispatcher.log", "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "easylaunch.modes.local_dispatch", str(queue)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                start_new_session=True,
            )
        records.atomic_write_json(
            sweep_dir / SUPERVISOR_FILE,
            {"pid": proc.pid, "token": process_token(proc.pid), "kind": "dispatcher"},
        )
