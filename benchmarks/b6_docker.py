"""B6: containers. One run until the function's first line, and a packed 100-variant sweep.

    .venv/bin/python benchmarks/b6_docker.py [--quick] [--image IMAGE] [--host URL] [--parallel 2]

Side by side in one run, against the same daemon and image:
- floor: ``docker run --rm IMAGE python3 -c pass`` (the CLI; median of several);
- B6a: ``run_experiment(mode='docker')`` from the call until the function's first line
  (the function returns ``time.time()`` taken on its first line). Goal: <= 1.3x the floor.
- B6b: 100 trivial variants with ``run_sweep(mode='docker')``, until every result is read:
  packed (``expected_duration`` picks k) against one container per variant (the doodad way;
  its floor is the docker-run floor x 100 / parallelism, and it is also measured with
  ``variants_per_task=1``). Goal: packed >= 10x faster than the doodad way.

Needs a running daemon (``bash scripts/services/docker.sh start``) and the docker SDK.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Table, fmt_ms, machine, median, p90, parse_args, temp_root  # noqa: E402

GOAL_A = 1.3
GOAL_B = 10.0


def first_line(doodad_config, variant):
    return time.time()


def trivial(doodad_config, variant):
    return variant["i"]


def floor_once(host: str, image: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        ["docker", "-H", host, "run", "--rm", image, "python3", "-c", "pass"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def main() -> int:
    def extra(p):
        p.add_argument(
            "--image",
            default=os.environ.get("EASYLAUNCH_TEST_DOCKER_IMAGE", "local/easylaunch-python:bookworm"),
        )
        p.add_argument(
            "--host", default=os.environ.get("EASYLAUNCH_TEST_DOCKER_HOST", "unix:///var/run/docker.sock")
        )
        p.add_argument("--parallel", type=int, default=2)
        p.add_argument("-n", type=int, default=10)

    args = parse_args(__doc__.splitlines()[0], extra)
    n = 3 if args.quick else args.n
    import cloudpickle

    from easylaunch import run_experiment, run_sweep

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    print(machine())
    with temp_root("easylaunch-b6-", args.keep) as root:
        code = root / "code"
        code.mkdir()
        (code / "mod.py").write_text("X = 1\n")
        logs = root / "logs"
        common = dict(
            docker_image=args.image,
            docker_host=args.host,
            base_log_dir=str(logs),
            code_dirs_to_mount=[str(code)],
        )
        # warm-up: image probe cached, daemon warm, bytecode compiled
        floor_once(args.host, args.image)
        run_experiment(first_line, exp_name="b6warm", mode="docker", **common).result()
        floors, launches = [], []
        for _ in range(n):  # interleaved, so load changes hit both
            floors.append(floor_once(args.host, args.image))
            t0 = time.time()
            job = run_experiment(first_line, exp_name="b6a", mode="docker", **common)
            launches.append(job.result() - t0)
        table = Table(f"B6a: one docker run until the function's first line (median of {n})")
        table.add(
            "floor: docker run --rm IMAGE python3 -c pass",
            fmt_ms(median(floors)),
            f"p90 {fmt_ms(p90(floors))}",
        )
        ratio = median(launches) / median(floors)
        table.add(
            "run_experiment(mode='docker')",
            fmt_ms(median(launches)),
            f"p90 {fmt_ms(p90(launches))}; {ratio:.2f}x the floor (goal <= {GOAL_A}x)",
        )
        table.print()

        variants = [{"i": i} for i in range(100)]
        t0 = time.perf_counter()
        sweep = run_sweep(
            trivial,
            variants,
            exp_name="b6b",
            mode="docker",
            max_parallel=args.parallel,
            expected_duration=0.05,
            **common,
        )
        assert sweep.results() == list(range(100))
        packed = time.perf_counter() - t0
        k = sweep[0].manifest["backend"]["variants_per_task"]
        doodad_floor = median(floors) * 100 / args.parallel
        table = Table(f"B6b: 100 trivial variants, {args.parallel} containers at once, all results read")
        table.add(
            f"packed (expected_duration -> {k} per container)",
            f"{packed:.2f} s",
            f"{doodad_floor / packed:.1f}x faster than the doodad floor (goal >= {GOAL_B}x)",
        )
        table.add("doodad floor: docker-run floor x 100 / parallelism", f"{doodad_floor:.2f} s", "")
        if not args.quick:
            t0 = time.perf_counter()
            sweep = run_sweep(
                trivial,
                variants,
                exp_name="b6one",
                mode="docker",
                max_parallel=args.parallel,
                variants_per_task=1,
                **common,
            )
            assert sweep.results() == list(range(100))
            one = time.perf_counter() - t0
            table.add(
                "one container per variant (variants_per_task=1)",
                f"{one:.2f} s",
                f"packed is {one / packed:.1f}x faster",
            )
        table.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
