"""B2: 1000 trivial variants through run_sweep(fn, variants, mode='local_pool') until every
result is seen through the Sweep handle, against submitit's LocalExecutor and a bare
ProcessPoolExecutor, measured side by side.

    .venv/bin/python benchmarks/b2_local_pool_sweep.py [--quick] [-n 1000] [--repeat 3]

Every run keeps its full run directory (manifest, variant, payload 0600, status with history,
logs, result, git patches of a temp repository with a diff); the script checks all of them.
Goal: local_pool jobs/s >= 50x submitit LocalExecutor's. Also printed: the same sweep through
mode='local' (one fresh interpreter per run), and where local_pool's time goes.
"""

from __future__ import annotations

import concurrent.futures
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ROOT,
    Table,
    bytecode_cache,
    check_run_dir,
    machine,
    make_git_repo,
    median,
    parse_args,
    temp_root,
)

GOAL = 50


def trivial(doodad_config, variant):
    return variant["i"]


def square(i):
    return i * i


def sweep_once(
    mode: str, n: int, logs: Path, repo: Path, exp_name: str, probe: bool = False, **options
) -> dict:
    """One sweep; returns its rate and, with ``probe``, a timeline of where the time went
    (``options``: more options of the sweep, e.g. ``monitor=0`` for b10_monitor.py)."""
    from easylaunch import api, batch, job, run_sweep

    marks: dict = {}
    undo = []

    def wrap(owner, name, key):
        orig = getattr(owner, name)

        def timed(*a, **k):
            t = time.time()
            try:
                return orig(*a, **k)
            finally:
                marks.setdefault(key, []).append((t, time.time()))

        setattr(owner, name, timed)
        undo.append((owner, name, orig))

    if probe:
        wrap(api, "_prepare", "prepare")
        wrap(batch.Batch, "create_dirs", "create_dirs")
        wrap(batch.Batch, "materialize", "materialize")
        wrap(batch, "capture_git_infos", "git")
        wrap(batch, "package_versions", "pkgver")
        wrap(job, "refresh_states", "poll")
        from easylaunch.modes import get_mode_class

        wrap(get_mode_class(mode), "launch", "launch")
    variants = [{"i": i} for i in range(n)]
    try:
        t0 = time.time()
        sweep = run_sweep(
            trivial,
            variants,
            exp_name=exp_name,
            mode=mode,
            base_log_dir=str(logs),
            code_dirs_to_mount=[str(repo)],
            **options,
        )
        t_wait = time.time()
        results = sweep.results()
        t1 = time.time()
    finally:
        for owner, name, orig in reversed(undo):
            setattr(owner, name, orig)
    assert results == list(range(n)), "wrong results"
    out = {"rate": n / (t1 - t0), "total": t1 - t0, "sweep": sweep}
    if probe:
        statuses = [json.loads((j.run_dir / "status.json").read_text()) for j in sweep]
        starts = sorted(s["started"] for s in statuses)
        ends = sorted(s["ended"] for s in statuses)
        polls = marks.get("poll", [])
        wait_polls = [p for p in polls if p[0] >= marks["launch"][-1][1] and p[0] < t_wait]
        out["timeline"] = [
            ("validate + pickle (_prepare)", marks["prepare"][0][1] - marks["prepare"][0][0]),
            (
                "create_dirs (dir, variant.json, PENDING status)",
                marks["create_dirs"][0][1] - marks["create_dirs"][0][0],
            ),
            ("  materialize: git capture", marks["git"][0][1] - marks["git"][0][0]),
            ("  materialize: package_versions()", marks["pkgver"][0][1] - marks["pkgver"][0][0]),
            (
                "materialize (payload 0600, git/, manifest)",
                marks["materialize"][0][1] - marks["materialize"][0][0],
            ),
            ("call -> launch() returned", marks["launch"][-1][1] - t0),
            ("call -> first run started", starts[0] - t0),
            ("first run started -> last run ended", ends[-1] - starts[0]),
            (
                "  runner bookkeeping in the run (mean started->ended)",
                sum(s["ended"] - s["started"] for s in statuses) / n,
            ),
            ("  per run, all included (started->ended span / n)", (ends[-1] - starts[0]) / n),
            ("last run ended -> wait() saw all", t_wait - ends[-1]),
            (
                f"  polls during wait: {len(wait_polls)}, time reading/polling",
                sum(b - a for a, b in wait_polls),
            ),
            ("results(): read 1000 result.pkl", t1 - t_wait),
            ("total", t1 - t0),
        ]
    return out


def fork_cycle(n: int = 200) -> float:
    """Seconds for fork + child exit + reap of this process (about the supervisor's size)."""
    t0 = time.perf_counter()
    for _ in range(n):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    return (time.perf_counter() - t0) / n


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def file_create_cost(directory: Path, n: int = 200) -> float:
    """Seconds per new file (exclusive create) in ``directory``: the filesystem's state.

    On ext4 without a journal, inode allocation skips (one by one) the inodes freed in the
    last minutes, so this grows after large deletions; a run creates ~11 files."""
    directory.mkdir()
    t0 = time.perf_counter()
    for i in range(n):
        os.close(os.open(directory / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    return (time.perf_counter() - t0) / n


def submitit_rate(n: int, folder: Path) -> float:
    import submitit

    executor = submitit.LocalExecutor(folder=str(folder))
    executor.update_parameters(timeout_min=5)
    t0 = time.time()
    jobs = [executor.submit(square, i) for i in range(n)]
    results = [j.result() for j in jobs]
    t1 = time.time()
    assert results == [i * i for i in range(n)]
    return n / (t1 - t0)


def pool_floor(n: int, repeat: int) -> float:
    rates = []
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        list(pool.map(square, range(200)))  # warm: workers started
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = list(pool.map(square, range(n)))
            rates.append(n / (time.perf_counter() - t0))
            assert out[-1] == (n - 1) ** 2
    return median(rates)


def main() -> int:
    def extra(p):
        p.add_argument("-n", type=int, default=1000, help="variants per sweep (1000)")
        p.add_argument("--repeat", type=int, default=None, help="local_pool sweeps (3; --quick 1)")
        p.add_argument("--submitit-jobs", type=int, default=None, help="submitit jobs (100; --quick 30)")
        p.add_argument(
            "--local-jobs", type=int, default=None, help="mode='local' sweep size (n; --quick 100)"
        )

    args = parse_args(__doc__.split("\n\n")[0], extra)
    n = args.n
    repeat = args.repeat or (1 if args.quick else 3)
    n_sub = args.submitit_jobs or (30 if args.quick else 100)
    n_local = args.local_jobs or (100 if args.quick else n)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    print(machine())
    with temp_root("easylaunch-b2-", args.keep) as root:
        print(bytecode_cache(root, not args.no_bytecode_cache))
        repo = make_git_repo(root / "repo")
        logs = root / "logs"
        # warm-up (imports, page cache), not counted
        sweep_once("local_pool", 20, logs, repo, "b2warm")

        create_before = file_create_cost(logs / "fs-probe-before")
        pool_runs = []
        for r in range(repeat):
            pool_runs.append(sweep_once("local_pool", n, logs, repo, f"b2pool{r}", probe=(r == repeat - 1)))
            print(
                f"local_pool sweep {r + 1}/{repeat}: {pool_runs[-1]['total']:.2f} s, {pool_runs[-1]['rate']:.0f} jobs/s",
                flush=True,
            )
            if r < repeat - 1:
                # a launch script holds one sweep, not several: keep the next supervisor (a fork
                # of this process, whose size sets the per-run fork cost) as small as a user's
                pool_runs[-1].pop("sweep")
                gc.collect()
        last = pool_runs[-1]
        bad = 0
        for job in last["sweep"]:
            try:
                check_run_dir(job.run_dir)
            except AssertionError as exc:
                bad += 1
                if bad == 1:
                    print("run dir check failed:", exc)
        assert not bad, f"{bad} run directories incomplete"
        pool_rate = median([r["rate"] for r in pool_runs])
        fork_secs, fork_rss = fork_cycle(), rss_mb()  # this process is about the supervisor's size
        create_after = file_create_cost(logs / "fs-probe-after")

        t = time.time()
        sub_rate = submitit_rate(n_sub, root / "submitit")
        print(f"submitit LocalExecutor: {n_sub} jobs in {time.time() - t:.1f} s", flush=True)
        floor_rate = pool_floor(n, 3)

        local = sweep_once("local", n_local, logs, repo, "b2local")
        print(f"mode='local': {n_local} runs in {local['total']:.1f} s", flush=True)
        for job in list(local["sweep"])[:: max(1, n_local // 20)]:
            check_run_dir(job.run_dir)

        table = Table(
            f"B2: {n} trivial variants, run_sweep -> all results seen (2 runs at a time, full run dirs)"
        )
        table.add(
            f"local_pool jobs/s (median of {repeat})",
            f"{pool_rate:.0f}/s",
            f">= {GOAL}x submitit ({GOAL * sub_rate:.0f}/s)",
            f"submitit {sub_rate:.2f}/s",
            f"{pool_rate / sub_rate:.0f}x",
        )
        table.add("local_pool, each sweep", ", ".join(f"{r['rate']:.0f}" for r in pool_runs) + " /s")
        table.add(f"submitit LocalExecutor ({n_sub} jobs)", f"{sub_rate:.2f}/s")
        table.add(
            f"ProcessPoolExecutor(2).map, {n} calls (floor)",
            f"{floor_rate:.0f}/s",
            "",
            f"local_pool {pool_rate:.0f}/s",
            f"{floor_rate / pool_rate:.0f}x faster",
        )
        table.add(
            f"mode='local' ({n_local} runs, fresh interpreter each)",
            f"{n_local / local['total']:.1f}/s",
            "",
            f"local_pool {pool_rate:.0f}/s",
            f"{pool_rate / (n_local / local['total']):.1f}x slower",
        )
        table.print()
        where = Table(f"B2: where local_pool's time goes (last sweep of {n}; seconds unless marked)")
        for what, secs in last["timeline"]:
            fig = (
                f"{secs * 1000:.2f} ms"
                if what.startswith("  runner") or what.startswith("  per run")
                else f"{secs:.3f} s"
            )
            where.add(what, fig)
        where.add(
            f"  fork + exit + reap of a {fork_rss:.0f} MB process like the supervisor (1 slot)",
            f"{fork_secs * 1000:.2f} ms",
        )
        where.add(
            "  creating one file in the log dir (a run creates ~11): before / after the sweeps",
            f"{create_before * 1e6:.0f} / {create_after * 1e6:.0f} us",
        )
        where.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
