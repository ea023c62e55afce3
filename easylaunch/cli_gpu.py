"""``easylaunch gpu-run -- CMD ...``: a command holds a GPU from the log dir's broker while it runs.

    easylaunch gpu-run -- python train.py --epochs 3      # for doit, make, shell loops
    easylaunch gpu-run --gpus 0,1 --policy spread -- ./eval.sh
    easylaunch gpu-run --status                           # the broker's GPUs, profiles, reservations

The command waits for a GPU exactly as a run of ``gpus=`` does (same broker, same profiles,
same log dir), starts with ``CUDA_VISIBLE_DEVICES`` set to it, and gives it back when it exits
(or when this process is killed). Its job type is its first two arguments (``python train.py``)
unless ``--type`` names one. Exits with the command's exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys


def cmd_gpu_run(args: argparse.Namespace) -> int:
    from . import gpu_broker
    from .cli import _root

    root = _root(args)
    if args.status:
        state = gpu_broker.status(root)
        print(json.dumps(state, indent=1) if state is not None else f"no GPU broker runs in {root}")
        return 0
    argv = list(args.cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise ValueError("gpu-run needs a command: easylaunch gpu-run -- CMD ARG ...")
    from .cli_launch import parse_value

    # as for `easylaunch run --gpus`: 2 is a count, 0,1 or [1] are ids, auto is every GPU
    gpus = gpu_broker.resolve_gpus(parse_value(args.gpus) if args.gpus is not None else "auto", "--gpus")
    job_type = args.type or " ".join(argv[:2])

    def waiting(reason: str) -> None:
        print(f"easylaunch gpu-run: waiting for a GPU ({reason})", file=sys.stderr, flush=True)

    root.mkdir(parents=True, exist_ok=True)
    try:
        lease = gpu_broker.acquire(root, job_type, gpus, args.policy, waiting)
    except gpu_broker.BrokerError as exc:
        raise ValueError(str(exc)) from None
    with lease:
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(lease.gpu))
        proc = subprocess.Popen(argv, env=env)
        forward = {
            sig: signal.signal(sig, lambda s, f: proc.send_signal(s))
            for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            code = proc.wait()
        finally:
            for sig, old in forward.items():
                signal.signal(sig, old)
        lease.release(failed=code != 0)
    return code if code >= 0 else 128 - code


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("gpu-run", help="run a command on a GPU given by the log dir's GPU broker")
    p.add_argument("--gpus", help="'auto' (default), a count (2), or ids (0,1 or [1])")
    p.add_argument("--policy", default="pack", choices=("pack", "spread"))
    p.add_argument("--type", help="job type for its memory profile (default: the first two arguments)")
    p.add_argument("--status", action="store_true", help="print the broker's state and exit")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")
    p.set_defaults(func=cmd_gpu_run)
