"""B10: what resource monitoring costs (issue 9 §2): the monitor thread's CPU time over a long run,
and short runs' sweeps with monitoring on (the default) and off, side by side.

    .venv/bin/python benchmarks/b10_monitor.py [--quick] [--seconds 60] [-n 300] [--repeat 3]

- A run of ``--seconds`` (default 60; 10 with --quick) whose function sleeps while a child
  process holds 50 MB, at the default period (1 s) and at 0.1 s: the monitor thread's own CPU
  time (``time.thread_time()`` in the thread, reported in status.json as
  ``resources.monitor_cpu_seconds``) over the run's wall time. Goal <= 0.5 % of one core at 1 s.
- A local_pool sweep of ``-n`` trivial variants with the default ``monitor=1.0`` against the same
  sweep with ``monitor=0``, interleaved: a run shorter than one period must pay nothing (goal:
  within 5 %).
- With ``--b2``, the same for B2's sweep itself (b2_local_pool_sweep.py: 1000 variants of a git
  code dir, every result read through the Sweep handle).
- With ``--b4`` (needs the Slurm service: source /tmp/easylaunch-services/slurm.env), the same
  for B4's packed Slurm sweep (``--b4-n`` variants, default 1000, as b8_txlog.py runs it).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Table, bytecode_cache, machine, median, parse_args, temp_root  # noqa: E402

GOAL_PERCENT = 0.5
GOAL_RATIO = 1.05
HOLDER = "import time\nblock = bytearray(50 * 1024 * 1024)\nfor i in range(0, len(block), 4096): block[i] = 1\ntime.sleep(3600)\n"


def sleeps_beside_a_child(doodad_config, variant):
    child = subprocess.Popen([sys.executable, "-c", HOLDER])
    try:
        time.sleep(variant["seconds"])
    finally:
        child.kill()
        child.wait()


def trivial(doodad_config, variant):
    return variant["i"]


def long_run(logs: Path, seconds: float, period: float) -> dict:
    from easylaunch import State, run_experiment

    job = run_experiment(
        sleeps_beside_a_child,
        exp_name="b10",
        mode="local",
        variant={"seconds": seconds},
        base_log_dir=str(logs),
        monitor=period,
    )
    assert job.wait(timeout=seconds + 60) is State.COMPLETED, job.status.get("message")
    res = job.status["resources"]
    wall = job.status["ended"] - job.status["started"]
    return {"percent": 100.0 * res["monitor_cpu_seconds"] / wall, "samples": res["samples"], "wall": wall}


def sweep(logs: Path, n: int, monitor: float, tag: str) -> float:
    from easylaunch import run_sweep

    t0 = time.perf_counter()
    s = run_sweep(
        trivial,
        [{"i": i} for i in range(n)],
        exp_name=f"b10-{tag}",
        mode="local_pool",
        base_log_dir=str(logs),
        monitor=monitor,
    )
    assert s.results() == list(range(n))
    return time.perf_counter() - t0


def main() -> int:
    def extra(p):
        p.add_argument("--seconds", type=float, default=None, help="length of the long run (default 60)")
        p.add_argument("-n", type=int, default=300, help="variants of the short-run sweeps (default 300)")
        p.add_argument("--repeat", type=int, default=None, help="sweeps per setting (default 3)")
        p.add_argument("--b2", action="store_true", help="also B2's local_pool sweep, monitor on/off")
        p.add_argument("--b4", action="store_true", help="also B4's packed Slurm sweep, monitor on/off")
        p.add_argument("--b4-n", type=int, default=1000, help="variants of the B4 sweeps (default 1000)")

    args = parse_args(__doc__.splitlines()[0], extra)
    seconds = args.seconds or (10.0 if args.quick else 60.0)
    repeat = args.repeat or (1 if args.quick else 3)
    print(machine())
    table = Table(
        f"B10: resource monitoring's cost ({seconds:g} s runs; sweeps of {args.n}, median of {repeat})"
    )
    ok = True
    with temp_root("easylaunch-b10-", args.keep) as root:
        print(bytecode_cache(root, not args.no_bytecode_cache))
        for period in (1.0, 0.1):
            r = long_run(root / "logs", seconds, period)
            goal = f"<= {GOAL_PERCENT} %" if period == 1.0 else ""
            if period == 1.0:
                ok &= r["percent"] <= GOAL_PERCENT
            table.add(
                f"monitor thread CPU, period {period:g} s ({r['samples']} samples)",
                f"{r['percent']:.3f} % of a core",
                goal,
                "",
                ("OK" if r["percent"] <= GOAL_PERCENT else "OVER") if goal else "",
            )

        def compare(name: str, once) -> bool:
            """``once(monitor, i)`` -> seconds; interleaved off/on (the machine is shared)."""
            on, off = [], []
            for i in range(repeat):
                off.append(once(0, i))
                on.append(once(1.0, i))
                print(f"{name} #{i}: off {off[-1]:.3f} s, on {on[-1]:.3f} s", flush=True)
            ratio = median(on) / median(off)
            table.add(f"{name}, monitor=0", f"{median(off):.3f} s")
            table.add(
                f"{name}, monitor=1.0 (default)",
                f"{median(on):.3f} s",
                f"<= {GOAL_RATIO}x",
                "vs monitor=0",
                f"{ratio:.3f}x",
            )
            return ratio <= GOAL_RATIO

        ok &= compare(
            f"local_pool sweep of {args.n}",
            lambda m, i: sweep(root / "logs", args.n, m, f"{'on' if m else 'off'}{i}"),
        )
        if args.b2 or args.b4:
            from common import make_git_repo

            repo = make_git_repo(root / "repo")
        if args.b2:
            from b2_local_pool_sweep import sweep_once

            ok &= compare(
                "B2 local_pool sweep of 1000",
                lambda m, i: sweep_once("local_pool", 1000, root / "logs", repo, f"b2-{m}-{i}", monitor=m)[
                    "total"
                ],
            )
        if args.b4:
            from b8_txlog import b4_once

            ok &= compare(
                f"B4 packed Slurm sweep of {args.b4_n}",
                lambda m, i: b4_once(args.b4_n, root, repo, f"{'on' if m else 'off'}{i}", trivial, monitor=m),
            )
    table.print()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
