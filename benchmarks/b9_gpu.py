"""B9: what GPU packing (option gpus=) costs: the broker's CPU, the per-run price of asking it,
and the pure scheduler's admission time. Runs anywhere (two injected fake GPUs).

    .venv-test/bin/python benchmarks/b9_gpu.py [--quick] [-n 300] [--hold 20]

- broker CPU while a run profiles its type (NVML-style sampling every 10 ms) and while runs only
  hold GPUs (every 0.25 s), as % of one core, from the broker's /proc/PID/stat;
- a local_pool sweep of n trivial variants with gpus='auto' (the type already profiled, so every
  run is admitted at once) against the same sweep without gpus=, interleaved;
- Scheduler.admit() over 1000 waiting requests (the broker's decision for one event).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Table, machine, median, parse_args, temp_root  # noqa: E402


def trivial(doodad_config, variant):
    return variant["i"]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def broker_cpu(log_dir: Path, hold: float, profiling: bool) -> float:
    from easylaunch import gpu_broker

    kind = f"bench-{'new' if profiling else 'known'}"
    if not profiling:
        gpu_broker.acquire(log_dir, kind).release()  # now it has a profile
    lease = gpu_broker.acquire(log_dir, kind)
    assert lease.profiling == profiling
    pid = gpu_broker.status(log_dir)["pid"]
    c0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(hold)
    c1, t1 = cpu_seconds(pid), time.monotonic()
    lease.release()
    return (c1 - c0) / (t1 - t0) * 100.0


def sweep_seconds(n: int, log_dir: Path, tag: str, gpus: bool) -> float:
    from easylaunch import run_sweep

    extra = {"gpus": "auto"} if gpus else {}
    t0 = time.time()
    sweep = run_sweep(
        trivial,
        [{"i": i} for i in range(n)],
        exp_name=f"b9-{tag}",
        mode="local_pool",
        base_log_dir=str(log_dir),
        monitor=0,
        **extra,
    )
    assert sweep.results() == list(range(n))
    return time.time() - t0


def admit_seconds(k: int = 1000) -> float:
    from easylaunch.gpu_sched import Scheduler

    gib = 1024**3
    times = []
    for _ in range(5):
        s = Scheduler({i: 80 * gib for i in range(8)}, profiles={f"t{i}": (i + 1) * gib for i in range(10)})
        for j in range(k):
            s.request(j, f"t{j % 10}")
        t0 = time.perf_counter()
        s.admit()
        times.append(time.perf_counter() - t0)
    return median(times)


def main() -> int:
    args = parse_args(
        __doc__.split("\n")[0],
        lambda p: (
            p.add_argument("-n", type=int, default=300),
            p.add_argument("--hold", type=float, default=20.0),
        ),
    )
    n = 50 if args.quick else args.n
    hold = 3.0 if args.quick else args.hold
    repeat = 1 if args.quick else 3
    print(machine())
    with temp_root("easylaunch-b9-", args.keep) as root:
        os.environ["EASYLAUNCH_FAKE_GPUS"] = "80000,80000"
        os.environ["EASYLAUNCH_FAKE_GPU_USAGE"] = str(root / "usage")
        os.environ.setdefault("EASYLAUNCH_GPU_BROKER_IDLE", "2")
        logs = root / "logs"
        logs.mkdir()
        t = Table(f"B9: GPU packing's costs (fake GPUs), sweeps of {n}, median of {repeat}")
        prof = broker_cpu(logs, hold, True)
        held = broker_cpu(logs, hold, False)
        t.add("broker CPU while a run profiles (10 ms samples)", f"{prof:.2f} % of a core", "<= 2 %")
        t.add("broker CPU while runs hold GPUs (0.25 s samples)", f"{held:.2f} % of a core", "<= 0.5 %")
        sweep_seconds(n, logs, "warm", True)  # profiles the type
        times = {"off": [], "on": []}
        for i in range(repeat):
            times["off"].append(sweep_seconds(n, logs, f"off{i}", False))
            times["on"].append(sweep_seconds(n, logs, f"on{i}", True))
        off, on = median(times["off"]), median(times["on"])
        t.add(
            "local_pool sweep without gpus=", f"{off:.3f} s", "", ", ".join(f"{x:.3f}" for x in times["off"])
        )
        t.add(
            "local_pool sweep with gpus='auto'", f"{on:.3f} s", "", ", ".join(f"{x:.3f}" for x in times["on"])
        )
        t.add("added per run", f"{(on - off) / n * 1000:.2f} ms", "", "", f"{on / off:.2f}x")
        t.add("Scheduler.admit() of 1000 waiting runs, 8 GPUs", f"{admit_seconds() * 1000:.1f} ms")
        t.print()
    print(machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
