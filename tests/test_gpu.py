"""GPU packing of local sweeps by measured memory, against the injected inventory
(EASYLAUNCH_FAKE_GPUS + per-process usage files, :mod:`easylaunch.gpu_fake`): the broker, its
profiles, the runner's reservation, ``easylaunch gpu-run``."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
from conftest import wait_for

from easylaunch import State, gpu_broker, gpu_fake, run_experiment, run_sweep
from easylaunch.gpu_options import job_type

MIB = 1024 * 1024


@pytest.fixture
def fake_gpus(monkeypatch, tmp_path):
    """Two fake 1000 MiB GPUs; brokers end 1 s after their last client."""
    usage = tmp_path / "gpu-usage"
    monkeypatch.setenv("EASYLAUNCH_FAKE_GPUS", "1000,1000")
    monkeypatch.setenv("EASYLAUNCH_FAKE_GPU_USAGE", str(usage))
    monkeypatch.setenv("EASYLAUNCH_GPU_BROKER_IDLE", "1")
    return usage


def _use_gpu(doodad_config, variant):
    gpu_fake.use(variant["mib"] * MIB)
    start = time.time()
    time.sleep(variant.get("secs", 0.5))
    return {
        "start": start,
        "end": time.time(),
        "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpu_id": doodad_config.gpu_id,
        "use_gpu": doodad_config.use_gpu,
    }


def job_a(doodad_config, variant):
    return _use_gpu(doodad_config, variant)


def job_b(doodad_config, variant):
    return _use_gpu(doodad_config, variant)


def job_c(doodad_config, variant):
    return _use_gpu(doodad_config, variant)


def fails_after_using(doodad_config, variant):
    gpu_fake.use(variant["mib"] * MIB)
    time.sleep(0.3)
    raise RuntimeError("out of patience")


class Sweeps:
    """Launch one sweep mixing job types (each a function); runs in variant order."""

    def __init__(self, mode):
        self.mode = mode

    def run(self, specs, **options):
        jobs = []
        # one sweep per type: run_sweep takes one function; all launched before any waits
        for fn, variants in specs:
            sweep = run_sweep(fn, variants, exp_name="gpu", mode=self.mode, skip_wait=True, **options)
            jobs.extend(sweep)
        for job in jobs:
            assert job.wait(timeout=120) is State.COMPLETED, (job.run_dir, job.status.get("message"))
        return [(job, job.result(), job.status["gpu"]) for job in jobs]


def _overlap(x, y):
    return x["start"] < y["end"] and y["start"] < x["end"]


def test_three_job_types_profile_first_then_pack(log_dir, fake_gpus):
    mib = {job_a: 300, job_b: 400, job_c: 200}
    specs = [(fn, [{"mib": m, "secs": 0.6, "i": i} for i in range(4)]) for fn, m in mib.items()]
    got = Sweeps("local_pool").run(specs, gpus="auto", max_parallel=12)
    by_type = {}
    for _job, result, gpu in got:
        assert result["visible"] == str(gpu["id"]) == str(result["gpu_id"]) and result["use_gpu"]
        by_type.setdefault(gpu["type"], []).append((result, gpu))
    assert sorted(by_type) == sorted(job_type(fn) for fn in mib)
    for fn, m in mib.items():
        runs = by_type[job_type(fn)]
        profilers = [(r, g) for r, g in runs if g["profiling"]]
        assert len(profilers) == 1, runs  # the first run of each type profiles it, alone
        first, first_gpu = profilers[0]
        for r, g in runs:
            if g is not first_gpu:
                assert r["start"] >= first["end"], "a run of the type started before its profile"
                assert g["reserved_bytes"] == m * MIB  # then packed by the measured profile
        for other, og in ((r, g) for rs in by_type.values() for r, g in rs):
            if og is not first_gpu and og["id"] == first_gpu["id"]:
                assert not _overlap(first, other), "a run shared the GPU of a profiling run"
    # after profiling, runs share GPUs, and never beyond 1000 MiB
    every = [(r, g) for rs in by_type.values() for r, g in rs]
    shared = [
        (x, y)
        for i, (x, gx) in enumerate(every)
        for y, gy in every[i + 1 :]
        if gx["id"] == gy["id"] and _overlap(x, y)
    ]
    assert shared, "no two runs ever packed on one GPU"
    for r, g in every:
        t = r["start"] + 0.01
        used = sum(
            g2["reserved_bytes"] for r2, g2 in every if g2["id"] == g["id"] and r2["start"] <= t < r2["end"]
        )
        assert used <= 1000 * MIB
    profiles = json.loads((log_dir / ".gpu_profiles.json").read_text())["profiles"]
    assert {k: v["peak_bytes"] for k, v in profiles.items()} == {
        job_type(fn): m * MIB for fn, m in mib.items()
    }

    # the next sweep of these types packs at once: no run profiles again
    again = Sweeps("local_pool").run([(job_a, [{"mib": 300, "secs": 0.3}] * 3)], gpus="auto", max_parallel=3)
    assert [g["profiling"] for _, _, g in again] == [False] * 3


def test_local_mode_and_a_failed_first_run_still_profiles(log_dir, fake_gpus):
    job = run_experiment(fails_after_using, exp_name="gpu", mode="local", variant={"mib": 250}, gpus=[1])
    assert job.wait(timeout=60) is State.FAILED
    assert job.status["gpu"]["id"] == 1 and job.status["gpu"]["profiling"]
    profiles = gpu_broker.read_profiles(log_dir)
    assert profiles[job_type(fails_after_using)] == 250 * MIB
    # a profile only grows: a smaller later run leaves it as it is
    job = run_experiment(job_a, exp_name="gpu", mode="local", variant={"mib": 100, "secs": 0.2}, gpus=1)
    assert job.wait(timeout=60) is State.COMPLETED
    job = run_experiment(job_a, exp_name="gpu", mode="local", variant={"mib": 50, "secs": 0.2}, gpus=1)
    assert job.wait(timeout=60) is State.COMPLETED
    assert not job.status["gpu"]["profiling"] and job.status["gpu"]["reserved_bytes"] == 100 * MIB
    assert gpu_broker.read_profiles(log_dir)[job_type(job_a)] == 100 * MIB


def test_bad_gpu_options_are_refused_before_anything_is_made(log_dir, fake_gpus, monkeypatch):
    with pytest.raises(ValueError, match="no GPU 5 here"):
        run_experiment(job_a, exp_name="gpu", mode="local", variant={"mib": 1}, gpus=[5])
    with pytest.raises(ValueError, match="asks for 3 GPUs but this machine has 2"):
        run_experiment(job_a, exp_name="gpu", mode="local_pool", variant={"mib": 1}, gpus=3)
    with pytest.raises(ValueError, match="gpu_policy='tight' must be one of"):
        run_experiment(
            job_a, exp_name="gpu", mode="local", variant={"mib": 1}, gpus="auto", gpu_policy="tight"
        )
    monkeypatch.delenv("EASYLAUNCH_FAKE_GPUS")
    if not gpu_broker.inventory():
        with pytest.raises(ValueError, match="gpus='auto' found no GPU"):
            run_experiment(job_a, exp_name="gpu", mode="local", variant={"mib": 1}, gpus="auto")
    with pytest.raises((TypeError, ValueError), match="gpus"):
        run_experiment(job_a, exp_name="gpu", mode="here_no_doodad", variant={"mib": 1}, gpus="auto")
    assert not (log_dir / "gpu").exists()


HOLDER = """
import sys, time
from easylaunch import gpu_broker, gpu_fake
lease = gpu_broker.acquire(sys.argv[1], "holder", None, "pack")
gpu_fake.use(600 * 1024 * 1024, lease.gpu)
print(lease.gpu, lease.profiling, flush=True)
time.sleep(120)
"""


def test_a_killed_clients_reservation_is_released_and_still_profiles(log_dir, fake_gpus):
    log_dir.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(log_dir)], stdout=subprocess.PIPE, text=True)
    try:
        gpu, profiling = holder.stdout.readline().split()
        assert profiling == "True"
        state = gpu_broker.status(log_dir)
        assert [r["gpu"] for r in state["reservations"]] == [int(gpu)]
        # sampled every 10 ms while it profiles
        wait_for(lambda: gpu_broker.status(log_dir)["reservations"][0]["peak"] == 600 * MIB, timeout=10)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    wait_for(lambda: not gpu_broker.status(log_dir)["reservations"], timeout=10, what="the release")
    assert gpu_broker.read_profiles(log_dir)["holder"] == 600 * MIB
    # both GPUs are free again: two holders of 600 MiB go to different GPUs at once
    leases = [gpu_broker.acquire(log_dir, "holder") for _ in range(2)]
    assert sorted(lease.gpu for lease in leases) == [0, 1]
    for lease in leases:
        lease.release()


def test_two_launch_scripts_share_one_broker(log_dir, fake_gpus, run_script):
    script = """
    import sys, time
    from easylaunch import run_sweep, gpu_fake
    def hog(doodad_config, variant):
        gpu_fake.use(700 * 1024 * 1024)
        t = time.time(); time.sleep(0.8)
        return (t, time.time())
    if __name__ == "__main__":
        s = run_sweep(hog, [{"i": i} for i in range(2)], exp_name=sys.argv[1] if len(sys.argv) > 1 else "x",
                      mode="local_pool", gpus="auto")
        import json
        print(json.dumps([[j.status["gpu"]["id"], *j.result()] for j in s]))
    """
    (log_dir.parent / "s.py").write_text(__import__("textwrap").dedent(script))
    procs = [
        subprocess.Popen(
            [sys.executable, str(log_dir.parent / "s.py"), f"e{i}"], stdout=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    log = (log_dir / ".gpu_broker" / "log").read_text().splitlines()
    brokers = {line.split()[2] for line in log if "serving" in line}
    assert len(brokers) == 1, "each launch script started its own broker"
    spans = [tuple(span) for out in outs for span in json.loads(out.strip().splitlines()[-1])]
    assert len(spans) == 4
    for i, (g, s, e) in enumerate(spans):  # 700 MiB each on 1000 MiB GPUs: never two at once
        for g2, s2, e2 in spans[i + 1 :]:
            if g == g2:
                assert e <= s2 or e2 <= s


GRANDCHILD = (
    "import sys, time\nfrom easylaunch import gpu_fake\ngpu_fake.use(int(sys.argv[1]))\ntime.sleep(0.6)\n"
)


def uses_gpu_in_a_grandchild(doodad_config, variant):
    """The GPU memory is a grandchild's (a shell starting a python), as with a trainer's workers."""
    cmd = f"{sys.executable} -c {shlex.quote(GRANDCHILD)} {variant['mib'] * MIB}"
    subprocess.run(["sh", "-c", cmd + "; true"], check=True)


def test_a_grandchilds_gpu_memory_is_the_runs_and_a_strangers_is_foreign(log_dir, fake_gpus):
    stranger = subprocess.Popen([sys.executable, "-c", GRANDCHILD.replace("0.6", "30"), str(500 * MIB)])
    try:
        job = run_experiment(
            uses_gpu_in_a_grandchild, exp_name="gpu", mode="local", variant={"mib": 250}, gpus="auto"
        )
        assert job.wait(timeout=60) is State.COMPLETED, job.status.get("message")
        profiles = json.loads((log_dir / ".gpu_profiles.json").read_text())["profiles"]
        # the run's profile is its grandchild's 250 MiB, not the stranger's 500 on the same GPUs
        assert profiles[job_type(uses_gpu_in_a_grandchild)]["peak_bytes"] == 250 * MIB
    finally:
        stranger.kill()
        stranger.wait()


def test_gpu_run_runs_a_command_on_a_gpu(log_dir, fake_gpus):
    log_dir.mkdir(parents=True)
    code = "import os, sys; print(os.environ['CUDA_VISIBLE_DEVICES']); sys.exit(3)"
    out = subprocess.run(
        [sys.executable, "-m", "easylaunch.cli", "gpu-run", "--gpus", "1", "--", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 3, out.stderr
    assert out.stdout.strip() == "0"  # the count 1 means the first GPU
    out = subprocess.run(
        [sys.executable, "-m", "easylaunch.cli", "gpu-run", "--gpus", "7", "--", "true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "7" in out.stderr


def test_cancelling_a_run_that_waits_for_a_gpu_withdraws_its_request(log_dir, fake_gpus, monkeypatch):
    monkeypatch.setenv("EASYLAUNCH_FAKE_GPUS", "1000")
    holder = run_experiment(
        job_a, exp_name="gpu", mode="local", variant={"mib": 100, "secs": 30}, gpus="auto", skip_wait=True
    )
    wait_for(lambda: holder.status.get("gpu"), timeout=30, what="the first run's GPU")
    waiter = run_experiment(
        job_b, exp_name="gpu", mode="local", variant={"mib": 100, "secs": 1}, gpus="auto", skip_wait=True
    )
    wait_for(
        lambda: len(gpu_broker.status(log_dir)["waiting"]) == 1, timeout=30, what="the second run waiting"
    )
    assert "waiting for a GPU" in wait_for(lambda: (waiter.run_dir / "stderr.log").read_text(), timeout=10)
    waiter.cancel()
    assert waiter.wait(timeout=30) is State.CANCELLED
    assert "gpu" not in waiter.status
    wait_for(lambda: not gpu_broker.status(log_dir)["waiting"], timeout=10, what="the request withdrawn")
    holder.cancel()
    assert holder.wait(timeout=30) is State.CANCELLED
    wait_for(lambda: not gpu_broker.status(log_dir)["reservations"], timeout=10, what="the GPU released")


def torch_job(doodad_config, variant):
    import torch

    block = torch.empty(variant["mib"] * MIB, dtype=torch.uint8, device="cuda")
    block.fill_(1)
    start = time.time()
    time.sleep(variant["secs"])
    torch.cuda.synchronize()
    return {"start": start, "end": time.time(), "gpu": doodad_config.gpu_id}


def test_two_small_torch_jobs_share_one_real_gpu(log_dir):
    """Against NVML where a GPU exists (skipped elsewhere): the first job profiles, the next two
    are packed on the same GPU at once."""
    pytest.importorskip("torch")
    pytest.importorskip("pynvml")
    if os.environ.get("EASYLAUNCH_FAKE_GPUS") or not gpu_broker.inventory():
        pytest.skip("no NVIDIA GPU here")
    sweep = run_sweep(
        torch_job,
        [{"mib": 64, "secs": 2.0, "i": i} for i in range(3)],
        exp_name="torch",
        mode="local_pool",
        gpus=1,
        max_parallel=3,
    )
    assert [j.state for j in sweep] == [State.COMPLETED] * 3
    runs = sorted(((j.result(), j.status["gpu"]) for j in sweep), key=lambda rg: rg[0]["start"])
    assert runs[0][1]["profiling"] and not runs[1][1]["profiling"] and not runs[2][1]["profiling"]
    assert runs[1][0]["start"] < runs[2][0]["end"] and runs[2][0]["start"] < runs[1][0]["end"]
    assert gpu_broker.read_profiles(log_dir)[job_type(torch_job)] >= 64 * MIB
