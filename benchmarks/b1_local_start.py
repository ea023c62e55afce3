"""B1: run_experiment(fn, mode='local') -> the function's first line, against a bare interpreter.

    .venv/bin/python benchmarks/b1_local_start.py [--quick] [-n 20]

The function returns time.time() taken on its first line; the launch figure is that minus the
time just before the call. Every launch does the full work: git capture of a temp repository
with a diff (staged and unstaged), the run directory (manifest, variant, payload 0600, status
history, logs, result).

The floor, measured in the same run and interleaved with the launches: a fresh interpreter
(sys.executable) that imports cloudpickle, unpickles the same function from a file and calls
it. Goal: median <= 1.5x the floor.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ROOT,
    Table,
    bytecode_cache,
    check_run_dir,
    fmt_ms,
    machine,
    make_git_repo,
    median,
    p90,
    parse_args,
    temp_root,
)

GOAL = 1.5

FLOOR_CODE = (
    "import sys, cloudpickle\n"
    "with open(sys.argv[1], 'rb') as f:\n"
    "    fn = cloudpickle.load(f)\n"
    "sys.stdout.write(repr(fn(None, None)))\n"
)

COLD_SCRIPT = """\
import sys, time
t0 = time.time()
from easylaunch import run_experiment
t1 = time.time()


def first_line(doodad_config, variant):
    return time.time()


job = run_experiment(first_line, exp_name="b1cold", mode="local", base_log_dir=sys.argv[1],
                     code_dirs_to_mount=[sys.argv[2]])
print(t1 - t0, job.result() - t1)
"""


def first_line(doodad_config, variant):
    return time.time()


def floor_once(payload: Path) -> float:
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-c", FLOOR_CODE, str(payload)], stdout=subprocess.PIPE, check=True
    ).stdout
    return float(out) - t0


def launch_once(logs: Path, repo: Path, exp_name: str = "b1"):
    from easylaunch import run_experiment

    t0 = time.time()
    job = run_experiment(
        first_line, exp_name=exp_name, mode="local", base_log_dir=str(logs), code_dirs_to_mount=[str(repo)]
    )
    return job.result() - t0, job, t0


def wall(args, n: int) -> float:
    xs = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *args], check=True)
        xs.append(time.perf_counter() - t0)
    return median(xs)


class Probe:
    """Wrap module attributes to time them (the parts breakdown only)."""

    def __init__(self):
        self.times: dict = {}
        self.undo: list = []

    def wrap(self, owner, name: str, key: str, after=None) -> None:
        orig = getattr(owner, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                if after:
                    after()
                self.times.setdefault(key, []).append(time.perf_counter() - t)
                self.times.setdefault(key + "@end", []).append(time.time())

        setattr(owner, name, timed)
        self.undo.append((owner, name, orig))

    def restore(self) -> None:
        for owner, name, orig in reversed(self.undo):
            setattr(owner, name, orig)
        self.undo.clear()


def parts(logs: Path, repo: Path, n: int) -> Table:
    from easylaunch import api, batch
    from easylaunch.modes import local

    table = Table(
        f"B1 parts (median of {n} launches; launcher side in-process, runner side by status/first line)"
    )
    probe = Probe()
    probe.wrap(api, "_prepare", "prepare")
    probe.wrap(batch.Batch, "create_dirs", "create_dirs")
    probe.wrap(local, "process_token", "spawned")  # called right after Popen returns
    probe.wrap(batch, "capture_git_infos", "git")
    probe.wrap(batch, "package_versions", "pkgver")
    probe.wrap(batch.Batch, "materialize", "materialize")
    probe.wrap(local.LocalMode, "launch", "launch")
    spawned, go, started, first = [], [], [], []
    try:
        for _ in range(n):
            dt, job, t0 = launch_once(logs, repo, "b1parts")
            spawned.append(probe.times["spawned@end"][-1] - t0)
            go.append(probe.times["launch@end"][-1] - t0)
            started.append(job.status["started"] - t0)
            first.append(dt)
        names = [
            ("prepare", "validate options + cloudpickle fn/variant"),
            ("create_dirs", "create_dirs (run dir, variant, PENDING status)"),
            ("git", "git capture (5 concurrent git commands)"),
            ("pkgver", "package_versions()"),
            ("materialize", "materialize (git + payload + patches + manifest)"),
        ]
        table.add("launcher: call -> runner spawned (Popen returned)", fmt_ms(median(spawned)))
        for key, what in names:
            table.add("launcher: " + what, fmt_ms(median(probe.times[key])))
        table.add("launcher: call -> go byte sent", fmt_ms(median(go)))
        table.add("runner: call -> RUNNING recorded", fmt_ms(median(started)))
        table.add("runner: call -> first line", fmt_ms(median(first)))
        # the runner already waiting: delay the go byte, time go -> first line
        probe.restore()
        probe.wrap(batch.Batch, "materialize", "materialize_slow", after=lambda: time.sleep(0.25))
        probe.wrap(local.LocalMode, "launch", "launch")
        lat = []
        for _ in range(max(3, n // 2)):
            dt, job, t0 = launch_once(logs, repo, "b1parts")
            lat.append(t0 + dt - probe.times["launch@end"][-1])
        table.add("runner: go byte -> first line (runner already waiting)", fmt_ms(median(lat)))
    finally:
        probe.restore()
    k = 5 if n < 10 else 10
    bare = wall(["-c", "pass"], k)
    cp = wall(["-c", "import cloudpickle"], k)
    rn = wall(["-c", "import easylaunch.runner, easylaunch.payload"], k)
    table.add("child: interpreter start (-c pass)", fmt_ms(bare))
    table.add("child: + import cloudpickle", fmt_ms(cp))
    table.add(
        "child: + import easylaunch.runner, payload",
        fmt_ms(rn),
        peer="vs cloudpickle alone",
        ratio=f"+{(rn - cp) * 1000:.1f} ms",
    )
    return table


def main() -> int:
    args = parse_args(__doc__.split("\n\n")[0], lambda p: p.add_argument("-n", type=int, default=None))
    n = args.n or (8 if args.quick else 20)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    print(machine())
    with temp_root("easylaunch-b1-", args.keep) as root:
        print(bytecode_cache(root, not args.no_bytecode_cache))
        repo = make_git_repo(root / "repo")
        logs = root / "logs"
        import cloudpickle

        payload = root / "floor.pkl"
        payload.write_bytes(cloudpickle.dumps(first_line))

        first_dt, job, _ = launch_once(logs, repo)  # the first launch of this process
        check_run_dir(job.run_dir)
        floor_once(payload)  # warm the page cache
        fl, el = [], []
        for _ in range(n):
            fl.append(floor_once(payload))
            el.append(launch_once(logs, repo)[0])
        f_med, f_p90, e_med, e_p90 = median(fl), p90(fl), median(el), p90(el)

        cold = []
        script = root / "cold_launch.py"
        script.write_text(COLD_SCRIPT)
        for _ in range(4 if args.quick else 8):
            out = subprocess.run(
                [sys.executable, str(script), str(logs), str(repo)],
                stdout=subprocess.PIPE,
                check=True,
                text=True,
            ).stdout.split()
            cold.append((float(out[-2]), float(out[-1])))

        t = Table(
            f"B1: run_experiment(fn, mode='local') -> first line ({n} launches, git capture of a dirty repo)"
        )
        goal = f"<= {GOAL}x floor"
        t.add(
            "launch -> first line, median",
            fmt_ms(e_med),
            goal,
            f"floor {fmt_ms(f_med)}",
            f"{e_med / f_med:.2f}x",
        )
        t.add(
            "launch -> first line, p90",
            fmt_ms(e_p90),
            goal,
            f"floor {fmt_ms(f_p90)}",
            f"{e_p90 / f_p90:.2f}x",
        )
        pair = sorted(e / f for e, f in zip(el, fl))
        t.add(
            "launch_i / floor_i (interleaved pairs), median",
            f"{median(pair):.2f}x",
            goal,
            f"min {pair[0]:.2f}x, max {pair[-1]:.2f}x",
        )
        t.add(
            "first launch of the process (1 sample)",
            fmt_ms(first_dt),
            "",
            f"floor {fmt_ms(f_med)}",
            f"{first_dt / f_med:.2f}x",
        )
        c_imp = median([c[0] for c in cold])
        c_dt = median([c[1] for c in cold])
        t.add(
            f"fresh script: import easylaunch, then call (median of {len(cold)})",
            fmt_ms(c_dt),
            "",
            f"floor {fmt_ms(f_med)}",
            f"{c_dt / f_med:.2f}x",
        )
        t.add("fresh script: import easylaunch (api)", fmt_ms(c_imp))
        p = parts(logs, repo, 5 if args.quick else 10)
        t.print()
        p.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
