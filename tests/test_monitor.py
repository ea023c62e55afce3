"""Resource monitoring in the runner: resources.csv, the summary in status.json, the schedule."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest

from easylaunch import Command, State, grid, monitor, run_experiment, run_sweep
from easylaunch.monitor import Hub, Monitor, next_tick, read_samples

ALLOC_200MB = (
    "import time\nblock = bytearray(200 * 1024 * 1024)\n"
    "for i in range(0, len(block), 4096): block[i] = 1\ntime.sleep(1.2)\n"
)


def child_allocates(doodad_config, variant):
    subprocess.run([sys.executable, "-c", ALLOC_200MB], check=True)
    return "ok"


def busy(doodad_config, variant):
    """Spins for ``seconds`` of CPU time (not of wall time: the machine may be shared)."""
    end = time.process_time() + variant["seconds"]
    while time.process_time() < end:
        pass


def quick(doodad_config, variant):
    return variant["i"]


@pytest.mark.parametrize("mode", ["local", "local_pool"])
def test_peak_of_a_child_that_allocates_200mb(log_dir, mode):
    job = run_experiment(child_allocates, exp_name="mon", mode=mode, monitor=0.2)
    assert job.wait(timeout=60) is State.COMPLETED
    res = job.status["resources"]
    assert res["peak_rss_bytes"] >= 200 * 1024 * 1024
    assert res["samples"] >= 3
    if mode == "local":
        assert 0 < res["monitor_cpu_seconds"] < 1.0  # the sampling thread's own CPU time
    else:  # one sampler (the supervisor's Hub) serves every run of the pool: not per run
        assert "monitor_cpu_seconds" not in res
    samples = read_samples(job.run_dir)
    assert len(samples) == res["samples"]
    assert max(s["nprocs"] for s in samples) >= 2  # the child was sampled with the runner
    # the samples saw the child; the summary's peak may be higher still: it also takes the
    # kernel's high-water mark (getrusage), which catches a peak that fell between two samples
    assert 200 * 1024 * 1024 <= max(s["rss_bytes"] for s in samples) <= res["peak_rss_bytes"]


def test_command_run_is_monitored(log_dir):
    job = run_experiment(
        Command([sys.executable, "-c", ALLOC_200MB]), exp_name="mon", mode="local", monitor=0.25
    )
    assert job.wait(timeout=60) is State.COMPLETED
    assert job.status["resources"]["peak_rss_bytes"] >= 200 * 1024 * 1024


def test_cpu_seconds_and_mean_cpu_of_a_busy_run(log_dir):
    job = run_experiment(busy, exp_name="mon", mode="local", variant={"seconds": 1.5}, monitor=0.25)
    assert job.wait(timeout=60) is State.COMPLETED
    res = job.status["resources"]
    assert 1.5 <= res["cpu_seconds"] <= 2.5
    assert res["mean_cpu_percent"] > 20  # one busy core, even on a loaded machine


def test_ten_seconds_at_a_tenth_give_100_samples_on_schedule(tmp_path):
    mon = Monitor(tmp_path, period=0.1).start()
    time.sleep(10.02)
    summary = mon.stop()
    rows = list(csv.DictReader(open(tmp_path / "resources.csv")))
    assert 98 <= summary["samples"] == len(rows) <= 102
    errors = sorted(float(r["t"]) - float(r["due"]) for r in rows)
    # the error of a sample does not add up over the run (no drift): 95% of the samples are
    # within 10 ms of their due time, the last ones too; a lone late wake-up on a loaded
    # machine (the OS's doing) stays one late sample
    assert errors[int(len(errors) * 0.95)] < 0.010, errors[-10:]
    assert float(rows[-1]["t"]) - float(rows[-1]["due"]) < 0.010 or errors[-2] < 0.010
    assert errors[-1] < 0.1 and errors[0] >= 0
    # drift-free: sample k is due at k * period (ticks missed are skipped, so dues only grow)
    dues = [float(r["due"]) for r in rows]
    assert all(abs(d / 0.1 - round(d / 0.1)) < 1e-6 for d in dues)
    assert dues == sorted(set(dues))


def test_missed_ticks_are_skipped_not_bunched():
    assert next_tick(1, 0.0, 1.0, 0.5) == 1
    assert next_tick(2, 0.0, 1.0, 1.01) == 2
    assert next_tick(2, 0.0, 1.0, 4.2) == 5


def test_short_runs_take_no_sample_and_monitor_0_is_off(log_dir):
    sweep = run_sweep(quick, grid({"i": [0, 1, 2]}), exp_name="mon", mode="local_pool")
    assert sweep.results(timeout=30) == [0, 1, 2]
    for job in sweep:
        res = job.status["resources"]
        assert res["samples"] == 0 and res["peak_rss_bytes"] > 0 and "cpu_seconds" in res
        assert not (job.run_dir / "resources.csv").exists()
    job = run_experiment(busy, exp_name="mon", mode="local", variant={"seconds": 0.5}, monitor=0)
    assert job.wait(timeout=30) is State.COMPLETED
    assert "resources" not in job.status and not (job.run_dir / "resources.csv").exists()


def threads_here(doodad_config, variant):
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_a_pool_run_starts_no_monitor_thread(log_dir):
    # the pool's supervisor samples its runs (a Hub): a forked run creates no thread, so a run
    # shorter than one period pays nothing for monitoring
    sweep = run_sweep(threads_here, grid({"i": [0, 1]}), exp_name="mon", mode="local_pool", monitor=0.2)
    assert sweep.results(timeout=30) == [1, 1]
    job = run_experiment(threads_here, exp_name="mon", mode="local", monitor=0.2)
    assert job.result(timeout=30) == 2  # a runner of its own: the function's thread + the monitor


def _hub_child(hub: Hub, run_dir, seconds: float, period: float) -> int:
    """Fork a run that registers with ``hub``, lives ``seconds``, and writes its summary."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - forked
        code = 1
        try:
            hub.adopt()
            mon = monitor.start(run_dir, period)
            assert type(mon).__name__ == "_HubClient"
            block = bytearray(60 * 1024 * 1024)
            for i in range(0, len(block), 4096):
                block[i] = 1
            time.sleep(seconds)
            (run_dir / "summary.json").write_text(json.dumps(mon.stop()))
            code = 0
        finally:
            os._exit(code)
    return pid


def test_hub_samples_forked_runs_on_their_own_schedules(tmp_path):
    hub = Hub()
    runs = [tmp_path / "a", tmp_path / "b"]
    for d in runs:
        d.mkdir()
    pids = [_hub_child(hub, runs[0], 2.0, 0.1), _hub_child(hub, runs[1], 1.0, 0.25)]
    for pid in pids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        hub.forget(pid)
    for d, expect in ((runs[0], 20), (runs[1], 4)):
        summary = json.loads((d / "summary.json").read_text())
        rows = read_samples(d)
        # the summary counts exactly the samples in the file (none is taken after the stop)
        assert summary["samples"] == len(rows) and expect - 2 <= len(rows) <= expect
        assert summary["peak_rss_bytes"] >= 60 * 1024 * 1024
        assert max(r["rss_bytes"] for r in rows) >= 60 * 1024 * 1024
        period = summary["period"]
        assert all(abs(r["due"] / period - round(r["due"] / period)) < 1e-6 for r in rows)
        errors = sorted(r["t"] - r["due"] for r in rows)
        assert errors[0] >= 0 and errors[len(errors) // 2] < 0.010
    # a second attempt in the same run dir counts its own samples, not the first one's
    first = len(read_samples(runs[1]))
    pid = _hub_child(hub, runs[1], 0.6, 0.25)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    hub.forget(pid)
    again = json.loads((runs[1] / "summary.json").read_text())
    assert 1 <= again["samples"] == len(read_samples(runs[1])) - first <= 2
    hub.close()  # its last writer gone, the hub process ends
    assert os.waitstatus_to_exitcode(os.waitpid(hub.pid, 0)[1]) == 0


def test_hub_client_falls_back_to_a_thread_when_the_hub_cannot_take_it(tmp_path):
    read_fd, write_fd = os.pipe()
    os.close(read_fd)  # the hub is gone: writing fails
    saved = monitor._hub_fd
    monitor._hub_fd = write_fd
    try:
        mon = monitor.start(tmp_path, 0.1)
        assert isinstance(mon, Monitor)
        time.sleep(0.35)
        assert mon.stop()["samples"] >= 2
    finally:
        monitor._hub_fd = saved
        os.close(write_fd)


def test_samples_kept_when_the_run_is_killed(log_dir):
    job = run_experiment(
        busy, exp_name="mon", mode="local", variant={"seconds": 30}, monitor=0.1, skip_wait=True
    )
    deadline = time.time() + 20
    while len(read_samples(job.run_dir)) < 3:
        assert time.time() < deadline
        time.sleep(0.05)
    job.cancel()
    assert job.wait(timeout=30) is State.CANCELLED
    assert len(read_samples(job.run_dir)) >= 3
    assert job.status["resources"]["samples"] >= 3


def test_monitor_option_is_checked(log_dir):
    with pytest.raises(ValueError, match="monitor"):
        run_experiment(quick, exp_name="mon", mode="local", variant={"i": 0}, monitor=-1)
    with pytest.raises(TypeError, match="monitor"):
        run_experiment(quick, exp_name="mon", mode="local", variant={"i": 0}, monitor="fast")


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "easylaunch.cli", *args], capture_output=True, text=True, timeout=120
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"easylaunch {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def png_size(path) -> tuple:
    import struct

    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    assert data[-8:-4] == b"IEND", "PNG cut short"
    return struct.unpack(">II", data[16:24])


def test_plot_ls_and_term(log_dir):
    sweep = run_sweep(child_allocates, [{"i": 0}, {"i": 1}], exp_name="plotme", mode="local", monitor=0.2)
    assert set(sweep.wait(timeout=60).states()) == {State.COMPLETED}
    one = sweep[0].run_dir
    out = cli("plot", str(one)).stdout.strip()
    assert out == str(one / "resources.png")
    width, height = png_size(out)
    assert width >= 400 and height >= 300
    import matplotlib.image

    pixels = matplotlib.image.imread(out)  # decodes: a valid image, not only a header
    assert pixels.shape[0] == height and pixels.std() > 0.01
    target = log_dir / "both.png"
    assert cli("plot", "plotme", "-o", str(target)).stdout.strip() == str(target)
    png_size(target)
    term = cli("plot", "--term", sweep[1].run_dir.name).stdout
    assert "memory (MiB)" in term and "CPU" in term and len(term.splitlines()) >= 20
    runs = cli("ls", "plotme").stdout
    assert "peak mem" in runs and "cpu time" in runs
    import re

    peaks = [float(m) for m in re.findall(r"(\d+\.\d)M", runs)]
    assert len(peaks) == 2 and min(peaks) >= 200, runs  # each run's peak: its 200 MB child
    assert len(re.findall(r"\d+\.\ds", runs)) >= 2, runs  # and its CPU time


def test_plot_without_samples_is_a_clear_error(log_dir):
    job = run_experiment(quick, exp_name="plotnone", mode="local", variant={"i": 1})
    proc = cli("plot", str(job.run_dir), check=False)
    assert proc.returncode == 1 and "no resource samples" in proc.stderr and "monitor" in proc.stderr
