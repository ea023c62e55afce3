"""B3 + B4: a 1000-variant sweep on the real single-node Slurm (scripts/services/slurm.sh).

    source /tmp/easylaunch-services/slurm.env
    .venv/bin/python benchmarks/b3_b4_slurm.py [--quick] [-n 1000] [--only b3,floor,submitit,unpacked,packed]

B3: ``run_sweep(fn, 1000 variants, mode='slurm')`` -> submitted, with ONE sbatch call; goal
<= 2 s. Timed until sbatch returned (the array is queued) and until run_sweep returned
(payloads and manifests written: easylaunch submits first, then writes them). The jobs are
submitted held and cancelled at once. Also printed: what one file creation costs in the log
dir right now (the run directories are most of the work, and this disk's latency varies
with the load of other engineers' test runs).

B4: from the submit call until all N trivial results are seen (one run each, same cluster,
same run, one configuration after the other):
  floor     ``sbatch --array=0-N-1 --wrap true``, until squeue no longer lists it
  submitit  ``SlurmExecutor.map_array`` + ``[j.result() for j in jobs]``
  unpacked  ``run_sweep(mode='slurm')`` + ``sweep.results()``         goal <= 1.1x floor
  packed    the same with ``expected_duration=0.01`` (k variants per array task, picked
            automatically)                                              goal >= 20x faster than submitit
sacct calls while waiting are counted by a shim first on PATH that runs the real sacct.
A full run takes ~15 min (the engine starts ~3.5 tasks/s here); --quick uses 100 variants.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Table, machine, make_git_repo, median, parse_args, temp_root  # noqa: E402

CONFIGS = ("b3", "floor", "submitit", "unpacked", "packed")


def trivial(doodad_config, variant):
    return variant["i"]


def trivial_plain(i):
    return i


def install_shims(root: Path) -> dict:
    """sbatch/sacct/squeue wrappers first on PATH, logging ``<time> <args>`` per call."""
    shim_dir = root / "shims"
    shim_dir.mkdir()
    logs = {}
    for name in ("sbatch", "sacct", "squeue"):
        real = shutil.which(name)
        if real is None:
            raise SystemExit(f"{name} not on PATH: source /tmp/easylaunch-services/slurm.env first")
        log = root / f"{name}.calls"
        log.touch()
        (shim_dir / name).write_text(f'#!/bin/sh\necho "$(date +%s.%N) $*" >> {log}\nexec {real} "$@"\n')
        (shim_dir / name).chmod(0o755)
        logs[name] = log
    os.environ["PATH"] = f"{shim_dir}:{os.environ['PATH']}"
    return logs


def calls(log: Path, since: float = 0.0, until: float = float("inf")) -> list:
    out = []
    for line in log.read_text().splitlines():
        t = float(line.split(" ", 1)[0])
        if since <= t <= until:
            out.append(t)
    return out


def create_latency(directory: Path, n: int = 300) -> float:
    """Seconds per small-file creation (O_EXCL + write + rename, as atomic_write) in ``directory``."""
    d = directory / "_latency"
    d.mkdir(parents=True)
    t0 = time.perf_counter()
    for i in range(n):
        tmp = d / f".t{i}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"x" * 300)
        os.close(fd)
        os.replace(tmp, d / f"f{i}")
    per = (time.perf_counter() - t0) / n
    shutil.rmtree(d)
    return per


def b3(n: int, root: Path, repo: Path, logs: dict, repeat: int) -> dict:
    from easylaunch import run_sweep

    variants = [{"i": i} for i in range(n)]
    to_sbatch, to_return, sbatch_calls = [], [], []
    for r in range(repeat):
        t0 = time.time()
        sweep = run_sweep(
            trivial,
            variants,
            exp_name=f"b3-{r}",
            mode="slurm",
            hold=True,
            base_log_dir=str(root / "logs"),
            code_dirs_to_mount=[str(repo)],
        )
        t1 = time.time()
        subprocess.run(["scancel", sweep[0].manifest["backend"]["array_job_id"]], check=True)
        sb = calls(logs["sbatch"], t0, t1)
        # the shim logs when sbatch starts; its return is bounded by run_sweep's return, and
        # measured separately below as the cost of one `sbatch --hold --wrap` call
        to_sbatch.append(sb[-1] - t0 if sb else float("nan"))
        to_return.append(t1 - t0)
        sbatch_calls.append(len(sb))
    t = time.time()
    proc = subprocess.run(
        ["sbatch", "--parsable", "--hold", "--wrap", "true"], capture_output=True, text=True
    )
    one_sbatch = time.time() - t
    subprocess.run(["scancel", proc.stdout.strip().split(";")[0]])
    return {
        "to_sbatch": median(to_sbatch),
        "to_return": median(to_return),
        "all_return": to_return,
        "sbatch_calls": max(sbatch_calls),
        "one_sbatch": one_sbatch,
        "create": create_latency(root / "logs"),
    }


def b4_floor(n: int, root: Path, logs: dict) -> dict:
    t0 = time.time()
    proc = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--array=0-{n - 1}",
            "--output=/dev/null",
            "--job-name=b4-floor",
            "--wrap",
            "true",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    job = proc.stdout.strip().split(";")[0]
    while subprocess.run(
        ["squeue", "-h", "-j", job, "-o", "%i"], capture_output=True, text=True
    ).stdout.strip():
        time.sleep(0.25)
    t1 = time.time()
    return {"total": t1 - t0, "job": job, "squeue_calls": len(calls(logs["squeue"], t0, t1))}


def b4_submitit(n: int, root: Path, logs: dict) -> dict:
    import submitit

    executor = submitit.SlurmExecutor(folder=str(root / "submitit" / "%j"))
    executor.update_parameters(time=30, cpus_per_task=1, array_parallelism=n, job_name="b4-submitit")
    t0 = time.time()
    jobs = executor.map_array(trivial_plain, range(n))
    t_sub = time.time()
    results = [j.result() for j in jobs]
    t1 = time.time()
    assert results == list(range(n)), "submitit: wrong results"
    return {
        "total": t1 - t0,
        "submit": t_sub - t0,
        "sacct": len(calls(logs["sacct"], t_sub, t1)),
        "sbatch": len(calls(logs["sbatch"], t0, t_sub)),
    }


def b4_easylaunch(n: int, root: Path, repo: Path, logs: dict, packed: bool) -> dict:
    from easylaunch import run_sweep

    extra = {"expected_duration": 0.01} if packed else {}
    t0 = time.time()
    sweep = run_sweep(
        trivial,
        [{"i": i} for i in range(n)],
        exp_name="b4-packed" if packed else "b4-unpacked",
        mode="slurm",
        base_log_dir=str(root / "logs"),
        code_dirs_to_mount=[str(repo)],
        **extra,
    )
    t_sub = time.time()
    results = sweep.results()
    t1 = time.time()
    assert results == list(range(n)), "easylaunch: wrong results"
    backend = sweep[0].manifest["backend"]
    return {
        "total": t1 - t0,
        "submit": t_sub - t0,
        "sacct": len(calls(logs["sacct"], t_sub, t1)),
        "sbatch": len(calls(logs["sbatch"], t0, t_sub)),
        "k": backend["variants_per_task"],
        "tasks": len({j.job_id for j in sweep}),
    }


def main() -> int:
    def extra(p):
        p.add_argument("-n", type=int, default=None, help="variants (1000; --quick 100)")
        p.add_argument(
            "--only", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}"
        )
        p.add_argument("--b3-repeat", type=int, default=3, help="B3 submissions (3)")

    args = parse_args(__doc__.splitlines()[0], extra)
    n = args.n or (100 if args.quick else 1000)
    only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = set(only) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown --only entries {sorted(unknown)}; choose from {CONFIGS}")
    print(machine())
    others = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    print(f"Slurm: {len(others)} job(s) of others in the queue at the start; n = {n}")
    out: dict = {}
    with temp_root("b3b4-", keep=args.keep) as root:
        repo = make_git_repo(root / "repo")
        logs = install_shims(root)
        if "b3" in only:
            out["b3"] = b3(n, root, repo, logs, args.b3_repeat)
            print("B3 done", {k: v for k, v in out["b3"].items()}, flush=True)
        for name in ("floor", "submitit", "unpacked", "packed"):
            if name not in only:
                continue
            if name == "floor":
                out[name] = b4_floor(n, root, logs)
            elif name == "submitit":
                out[name] = b4_submitit(n, root, logs)
            else:
                out[name] = b4_easylaunch(n, root, repo, logs, packed=name == "packed")
            print(f"B4 {name} done", out[name], f"load {os.getloadavg()[0]:.2f}", flush=True)

    if "b3" in out:
        r = out["b3"]
        t = Table(f"B3: run_sweep of {n} variants, mode='slurm' (median of {len(r['all_return'])})")
        t.add("sbatch calls per sweep", str(r["sbatch_calls"]), "1")
        t.add("call -> sbatch started (array queued ~1 sbatch later)", f"{r['to_sbatch']:.2f} s", "<= 2 s")
        t.add(
            "call -> run_sweep returned (payloads + manifests written)",
            f"{r['to_return']:.2f} s",
            "<= 2 s",
            "all: " + ", ".join(f"{x:.2f}" for x in r["all_return"]),
        )
        t.add("one `sbatch --hold --wrap true`", f"{r['one_sbatch'] * 1000:.0f} ms")
        t.add("one small-file creation in the log dir now", f"{r['create'] * 1000:.2f} ms")
        t.print()
    if any(k in out for k in ("floor", "submitit", "unpacked", "packed")):
        t = Table(f"B4: {n} trivial variants, submit -> all results seen")
        floor = out.get("floor", {}).get("total")
        sub = out.get("submitit", {}).get("total")
        if floor:
            t.add("floor: sbatch --array --wrap true", f"{floor:.1f} s", "", f"{n / floor:.2f} tasks/s")
        if sub:
            s = out["submitit"]
            t.add(
                "submitit map_array + results()",
                f"{sub:.1f} s",
                "",
                f"sacct calls {s['sacct']}",
                f"{sub / floor:.2f}x floor" if floor else "",
            )
        for name in ("unpacked", "packed"):
            if name not in out:
                continue
            e = out[name]
            label = f"easylaunch {name}" + (f" (k={e['k']}, {e['tasks']} tasks)" if name == "packed" else "")
            goal = "<= 1.1x floor" if name == "unpacked" else ">= 20x faster than submitit"
            ratio = []
            if floor:
                ratio.append(f"{e['total'] / floor:.2f}x floor")
            if sub:
                ratio.append(f"{sub / e['total']:.1f}x faster than submitit")
            t.add(
                label,
                f"{e['total']:.1f} s",
                goal,
                f"sacct calls {e['sacct']}, sbatch {e['sbatch']}",
                "; ".join(ratio),
            )
        t.print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
