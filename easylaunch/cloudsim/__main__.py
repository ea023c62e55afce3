"""``python -m easylaunch.cloudsim aws|gcp ...``: rehearse a cloud launch on this machine.

    python -m easylaunch.cloudsim aws --endpoint http://127.0.0.1:5000      # moto server
    python -m easylaunch.cloudsim gcp --port 9024 --storage http://127.0.0.1:9023

Runs in the foreground until stopped (SIGINT/SIGTERM). See :mod:`easylaunch.cloudsim`.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m easylaunch.cloudsim")
    sub = parser.add_subparsers(dest="cloud", required=True)
    for name in ("aws", "gcp"):
        p = sub.add_parser(name)
        p.add_argument(
            "--runner",
            choices=("process", "docker"),
            default="process",
            help="run each instance's boot script as a local process or in a local container",
        )
        p.add_argument("--image", default="", help="the container image of --runner docker")
        p.add_argument(
            "--work-dir", default="/tmp/easylaunch-cloudsim", help="where instances keep their files"
        )
        p.add_argument("--control-port", type=int, default=0, help="port of the fault-control endpoint")
        p.add_argument("--interval", type=float, default=0.5, help="seconds between looks at the emulator")
        if name == "aws":
            p.add_argument("--endpoint", required=True, help="the EC2 endpoint (moto server)")
            p.add_argument("--regions", default="us-east-1", help="comma-separated regions to play")
        else:
            p.add_argument("--port", type=int, required=True, help="port of the Compute endpoint")
            p.add_argument("--storage", required=True, help="the GCS emulator's URL")
    args = parser.parse_args(argv)
    if args.cloud == "aws":
        from .aws import AwsSim

        sim = AwsSim(
            args.endpoint, args.work_dir, args.runner, args.image, args.regions.split(","), args.interval
        )
    else:
        from .gcp import GcpSim

        sim = GcpSim(args.port, args.storage, args.work_dir, args.runner, args.image, args.interval)

    def stop(*_: object) -> None:
        sim.stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return sim.run(args.control_port)


if __name__ == "__main__":
    sys.exit(main())
