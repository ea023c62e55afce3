"""B8: what the transaction log costs the sweeps: B2 (local_pool) and B4 packed (Slurm), each
measured with the log ($EASYLAUNCH_TXLOG=1, the default) and without it ($EASYLAUNCH_TXLOG=0),
interleaved (off, on, off, on, ...) so that the shared machine's load moves both alike.

    .venv-test/bin/python benchmarks/b8_txlog.py [--quick] [-n 1000] [--repeat 3] [--only b2,b4]

Goal: with the log, each sweep within 5% of its figure without it. B4 needs the Slurm service
(source /tmp/easylaunch-services/slurm.env). Also prints the log's size and the time
`easylaunch timeline --stats` takes to read it back.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Table, machine, make_git_repo, median, parse_args, temp_root  # noqa: E402

GOAL = 1.05


def b2_once(n: int, root: Path, repo: Path, tag: str) -> float:
    from b2_local_pool_sweep import sweep_once

    return sweep_once("local_pool", n, root / "logs", repo, f"b2-{tag}")["total"]


def trivial(doodad_config, variant):  # defined here: pickled by value for the Slurm runs
    return variant["i"]


def b4_once(n: int, root: Path, repo: Path, tag: str, fn=None, **options) -> float:
    """B4 packed, as b3_b4_slurm.py measures it: submit -> every result seen (``fn``: the
    function, defined in the calling script so that it is pickled by value; ``options``: more
    options of the sweep, e.g. ``monitor=0`` for b10_monitor.py)."""
    from easylaunch import run_sweep

    t0 = time.time()
    sweep = run_sweep(
        fn or trivial,
        [{"i": i} for i in range(n)],
        exp_name=f"b4-{tag}",
        mode="slurm",
        base_log_dir=str(root / "logs"),
        code_dirs_to_mount=[str(repo)],
        expected_duration=0.01,
        **options,
    )
    results = sweep.results()
    assert results == list(range(n)), "wrong results"
    return time.time() - t0


def read_back(exp_dir: Path) -> tuple:
    from easylaunch import txlog

    t = time.perf_counter()
    rows = txlog.attempts(txlog.read_experiment(exp_dir))
    txlog.stats(rows)
    took = time.perf_counter() - t
    size = sum(p.stat().st_size for p in exp_dir.rglob("*.jsonl"))
    return took, size, len(rows)


def main() -> int:
    def extra(p):
        p.add_argument("-n", type=int, default=None, help="variants per sweep (1000; --quick 200)")
        p.add_argument("--repeat", type=int, default=None, help="sweeps per setting (3; --quick 1)")
        p.add_argument("--only", default="b2,b4", help="b2, b4 or both (default)")

    args = parse_args(__doc__.splitlines()[0], extra)
    n = args.n or (200 if args.quick else 1000)
    repeat = args.repeat or (1 if args.quick else 3)
    only = {s.strip() for s in args.only.split(",")}
    print(machine())
    out: dict = {}
    with temp_root("b8-", keep=args.keep) as root:
        repo = make_git_repo(root / "repo")
        for bench in ("b2", "b4"):
            if bench not in only:
                continue
            times: dict = {"off": [], "on": []}
            for i in range(repeat):
                for setting in ("off", "on"):
                    os.environ["EASYLAUNCH_TXLOG"] = "0" if setting == "off" else "1"
                    tag = f"{setting}{i}"
                    took = b2_once(n, root, repo, tag) if bench == "b2" else b4_once(n, root, repo, tag)
                    times[setting].append(took)
                    print(f"{bench} {setting} #{i}: {took:.3f} s, load {os.getloadavg()[0]:.2f}", flush=True)
            os.environ.pop("EASYLAUNCH_TXLOG", None)
            exp = root / "logs" / f"{bench}-on0"
            out[bench] = (times, read_back(exp))
    t = Table(f"B8: the transaction log's cost, {n} variants, median of {repeat} interleaved sweeps")
    for bench, (times, (read_s, size, rows)) in out.items():
        off, on = median(times["off"]), median(times["on"])
        name = "B2 local_pool" if bench == "b2" else "B4 packed (Slurm)"
        t.add(f"{name} without the log", f"{off:.3f} s", "", ", ".join(f"{x:.3f}" for x in times["off"]))
        t.add(f"{name} with the log", f"{on:.3f} s", "", ", ".join(f"{x:.3f}" for x in times["on"]))
        verdict = "ok" if on / off <= GOAL else "over"
        t.add(f"{name} ratio with / without", f"{on / off:.3f}", f"<= {GOAL} ({verdict})")
        t.add(
            f"{name} log size, read back + stats",
            f"{size / 1024:.0f} KiB, {rows} attempts",
            "",
            f"{read_s * 1000:.0f} ms",
        )
    t.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
