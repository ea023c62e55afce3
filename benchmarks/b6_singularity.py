"""B6 for Apptainer: one ``local_singularity`` run until the function's first line, and 100
trivial variants packed vs one container per variant.

    .venv/bin/python benchmarks/b6_singularity.py [--quick] [--image SIF] [--parallel 2] [-n 8]

Side by side in one run, with the same image:
- floor: ``apptainer exec IMAGE python3 -c pass`` (median of several), and the same with the
  flags the mode adds (``--cleanenv --contain`` and its binds) for reference;
- B6a: ``run_experiment(mode='local_singularity')`` from the call until the function's first
  line (the function returns ``time.time()`` taken there), interleaved with the floor;
- B6b: 100 trivial variants with ``run_sweep(mode='local_singularity')`` until every result is
  read: packed (``expected_duration`` picks k) against one container per variant, the doodad
  way, whose floor is the exec floor x 100 / parallelism, also measured with
  ``variants_per_task=1``. Goal: packed >= 10x faster than the doodad way.

Needs the Apptainer of ``bash scripts/services/apptainer.sh start`` (its env file names the
test image: ``source /tmp/easylaunch-services/apptainer.env``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Table, fmt_ms, machine, median, p90, parse_args, temp_root  # noqa: E402

GOAL_B = 10.0


def first_line(doodad_config, variant):
    return time.time()


def trivial(doodad_config, variant):
    return variant["i"]


def binary() -> str:
    found = shutil.which("apptainer") or shutil.which("singularity")
    if not found:
        raise SystemExit("no apptainer/singularity on PATH: source /tmp/easylaunch-services/apptainer.env")
    return found


def floor_once(image: str, flags: list) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [binary(), "exec", *flags, image, "python3", "-c", "pass"], check=True, stdout=subprocess.DEVNULL
    )
    return time.perf_counter() - t0


def main() -> int:
    def extra(p):
        p.add_argument("--image", default=os.environ.get("EASYLAUNCH_TEST_SINGULARITY_IMAGE", ""))
        p.add_argument("--parallel", type=int, default=2)
        p.add_argument("-n", type=int, default=8)

    args = parse_args(__doc__.splitlines()[0], extra)
    if not args.image:
        raise SystemExit("pass --image IMAGE.sif (or source /tmp/easylaunch-services/apptainer.env)")
    n = 3 if args.quick else args.n
    import cloudpickle

    from easylaunch import run_experiment, run_sweep

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    print(machine())
    with temp_root("easylaunch-b6s-", args.keep) as root:
        code = root / "code"
        code.mkdir()
        (code / "mod.py").write_text("X = 1\n")
        logs = root / "logs"
        common = dict(
            mode="local_singularity",
            singularity_image=args.image,
            base_log_dir=str(logs),
            code_dirs_to_mount=[str(code)],
        )
        same_flags = ["--cleanenv", "--contain", "-B", f"{logs}/.snapshots:{logs}/.snapshots:ro"]
        # warm-up: page cache, bytecode, the unpacked snapshot
        run_experiment(first_line, exp_name="b6warm", **common).result()
        floor_once(args.image, [])
        floors, flagged, launches = [], [], []
        for _ in range(n):  # interleaved, so load changes hit all three
            floors.append(floor_once(args.image, []))
            flagged.append(floor_once(args.image, same_flags))
            t0 = time.time()
            job = run_experiment(first_line, exp_name="b6a", **common)
            launches.append(job.result() - t0)
        floor = median(floors)
        table = Table(f"B6a (Apptainer): one run until the function's first line (median of {n})")
        table.add("floor: apptainer exec IMAGE python3 -c pass", fmt_ms(floor), f"p90 {fmt_ms(p90(floors))}")
        table.add(
            "  the same with --cleanenv --contain -B store:ro",
            fmt_ms(median(flagged)),
            f"{median(flagged) / floor:.2f}x the floor",
        )
        table.add(
            "run_experiment(mode='local_singularity')",
            fmt_ms(median(launches)),
            f"p90 {fmt_ms(p90(launches))}; {median(launches) / floor:.2f}x the floor",
        )
        table.print()

        variants = [{"i": i} for i in range(100)]
        t0 = time.perf_counter()
        sweep = run_sweep(
            trivial,
            variants,
            exp_name="b6b",
            max_parallel=args.parallel,
            expected_duration=0.05,
            skip_wait=True,
            **common,
        )
        assert sweep.results() == list(range(100))
        packed = time.perf_counter() - t0
        k = sweep[0].manifest["backend"]["task_runs"]
        doodad_floor = floor * 100 / args.parallel
        table = Table(
            f"B6b (Apptainer): 100 trivial variants, {args.parallel} containers at once, all results read"
        )
        table.add(
            f"packed (expected_duration -> {k} per container)",
            f"{packed:.2f} s",
            f"{doodad_floor / packed:.1f}x faster than the doodad floor (goal >= {GOAL_B:g}x)",
        )
        table.add("doodad floor: exec floor x 100 / parallelism", f"{doodad_floor:.2f} s", "")
        if not args.quick:
            t0 = time.perf_counter()
            sweep = run_sweep(
                trivial,
                variants,
                exp_name="b6one",
                max_parallel=args.parallel,
                variants_per_task=1,
                skip_wait=True,
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
