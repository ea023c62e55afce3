"""The transaction log (easylaunch.txlog) and `easylaunch timeline`, on local_pool and offline.

The packed Slurm sweep and the requeued Slurm run are checked in test_slurm.py (its cluster
fixtures); both use the checks of txlog_checks.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from txlog_checks import check_complete, check_csv, check_png

from easylaunch import State, cli, run_sweep, txlog
from easylaunch.timeline import format_stats

pytestmark = pytest.mark.filterwarnings("ignore:not in a git repository")


def sometimes_fails(doodad_config, variant):
    time.sleep(variant.get("sleep", 0.02))
    if variant["x"] == 3:
        raise ValueError("three")
    return variant["x"]


def test_local_pool_sweep_log_is_complete_and_timeline_agrees(log_dir, tmp_path, capsys):
    sweep = run_sweep(
        sometimes_fails, [{"x": i} for i in range(8)], exp_name="tl", mode="local_pool", max_parallel=2
    )
    assert sweep.states() == [State.COMPLETED] * 3 + [State.FAILED] + [State.COMPLETED] * 4
    exp_dir = sweep[0].run_dir.parent
    batch_log = exp_dir / ".batches" / sweep[0].manifest["batch_id"] / txlog.BATCH_LOG
    launcher = txlog.read_lines(batch_log)
    assert [e["event"] for e in launcher] == ["SUBMITTED"] * 8 + ["PENDING"] * 8
    # the run's own lines are in its directory, written where it ran
    own = txlog.read_lines(sweep[3].run_dir / txlog.RUN_LOG)
    assert [e["event"] for e in own] == ["STARTED", "DONE"]
    assert own[1]["state"] == "FAILED" and own[1]["exit_code"] == 1 and "three" in own[1]["message"]
    rows = check_complete(exp_dir, [j.run_dir for j in sweep])
    # the monitor's peak memory reached the DONE lines (check_complete compares it with status.json)
    assert all(r["peak_memory"] and r["peak_memory"] > 1e6 for r in rows), rows
    # max_parallel=2: one worker (the pool's supervisor) with two slots
    assert len({r["worker"] for r in rows}) == 1 and {r["slot"] for r in rows} == {0, 1}
    for a in rows:  # no two attempts hold one slot at once
        for b in rows:
            if a is not b and a["slot"] == b["slot"]:
                assert a["ended"] <= b["started"] or b["ended"] <= a["started"]

    png, wpng, table = tmp_path / "tasks.png", tmp_path / "workers.png", tmp_path / "a.csv"
    assert cli.main(["timeline", str(exp_dir), "-o", str(png), "--csv", str(table)]) == 0
    assert (
        cli.main(["--log-dir", str(exp_dir.parent), "timeline", "tl", "--mode", "workers", "-o", str(wpng)])
        == 0
    )
    check_png(png)
    check_png(wpng)
    check_csv(table, rows, [j.run_dir for j in sweep])
    capsys.readouterr()
    assert cli.main(["timeline", str(exp_dir), "--stats"]) == 0
    out = capsys.readouterr().out
    assert "runs: 8 (8 attempts)" in out and "COMPLETED=7, FAILED=1" in out and "slots: 2" in out
    assert "queue wait: median" in out and "busy fraction of the slots" in out


def test_timeline_errors_name_the_problem(log_dir, tmp_path, capsys):
    with pytest.raises(SystemExit, match="no experiment 'nope'"):
        cli.main(["--log-dir", str(tmp_path), "timeline", "nope"])
    (tmp_path / "empty" / ".batches").mkdir(parents=True)
    with pytest.raises(SystemExit, match="has no transaction log"):
        cli.main(["timeline", str(tmp_path / "empty")])


def test_log_off_writes_nothing(log_dir, monkeypatch):
    monkeypatch.setenv(txlog.ENV_OFF, "0")
    sweep = run_sweep(sometimes_fails, [{"x": 0}], exp_name="off", mode="local_pool")
    assert sweep.states() == [State.COMPLETED]
    assert not list(sweep[0].run_dir.parent.rglob("*.jsonl"))


def _writer(path: str, tag: int, n: int) -> None:  # pragma: no cover - forked
    for i in range(n):
        txlog.append(path, [{"t": i, "event": "X", "run": f"w{tag}", "pad": "x" * (900 + (i * 37) % 2500)}])


def test_concurrent_appends_never_tear_or_interleave(tmp_path):
    path = str(tmp_path / "log.jsonl")
    pids = []
    for tag in range(4):
        pid = os.fork()
        if pid == 0:  # pragma: no cover
            try:
                _writer(path, tag, 500)
            finally:
                os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    lines = Path(path).read_bytes().split(b"\n")
    assert lines[-1] == b""
    parsed = [json.loads(line) for line in lines[:-1]]  # each line whole: a torn one would not parse
    assert len(parsed) == 2000
    for tag in range(4):
        assert [e["t"] for e in parsed if e["run"] == f"w{tag}"] == list(range(500))


def test_lines_stay_below_pipe_buf():
    line = txlog.encode({"t": 1, "event": "DONE", "run": "r", "message": "m" * 100_000})
    assert len(line) <= txlog.MAX_LINE < 4096 and json.loads(line)["message"].endswith("...")


def test_requeued_attempts_and_stats_from_events():
    us = 1_000_000
    events = []
    for run in ("a", "b", "c"):
        events += [{"t": 0, "event": "SUBMITTED", "run": run}, {"t": 1, "event": "PENDING", "run": run}]
    events += [
        {"t": 2 * us, "event": "STARTED", "run": "a", "attempt": 1, "worker": "w1", "host": "h"},
        {"t": 2 * us, "event": "STARTED", "run": "b", "attempt": 1, "worker": "w1", "host": "h"},
        {"t": 5 * us, "event": "DONE", "run": "a", "attempt": 1, "state": "REQUEUED", "exit_code": 76},
        {"t": 5 * us, "event": "REQUEUED", "run": "a", "attempt": 2},
        {"t": 6 * us, "event": "DONE", "run": "b", "attempt": 1, "state": "COMPLETED", "exit_code": 0},
        {"t": 6 * us, "event": "STARTED", "run": "c", "attempt": 1, "worker": "w1", "host": "h"},
        {"t": 9 * us, "event": "RECOVERED", "run": "a", "attempt": 2},
        {"t": 9 * us, "event": "STARTED", "run": "a", "attempt": 2, "worker": "w2", "host": "h"},
        {"t": 10 * us, "event": "DONE", "run": "c", "attempt": 1, "state": "FAILED", "exit_code": 1,
         "peaks": {"peak_rss_bytes": 123}},
        {"t": 12 * us, "event": "DONE", "run": "a", "attempt": 2, "state": "COMPLETED", "exit_code": 0},
    ]  # fmt: skip
    rows = txlog.attempts(events)
    got = {(r["run"], r["attempt"]): r for r in rows}
    assert set(got) == {("a", 1), ("a", 2), ("b", 1), ("c", 1)}
    assert got["a", 1]["state"] == "REQUEUED" and got["a", 2]["submitted"] == 5.0
    assert got["a", 2]["started"] == 9.0 and got["a", 2]["worker"] == "w2"
    assert got["c", 1]["peak_memory"] == 123
    # min-heap slots on w1: a and b take 0 and 1; c starts when b ended and a ended: slot 0
    assert (got["a", 1]["slot"], got["b", 1]["slot"], got["c", 1]["slot"]) == (0, 1, 0)
    s = txlog.stats(rows)
    assert s["runs"] == 3 and s["attempts"] == 4 and s["by_state"] == {"COMPLETED": 2, "FAILED": 1}
    assert s["wall_time"] == 12.0 and s["workers"] == 2 and s["slots"] == 3
    # busy 3+4+4+3 = 14 s of 3 slots x 10 s
    assert s["busy_fraction"] == pytest.approx(14 / 30)
    assert s["queue_wait_median"] == pytest.approx(3.0) and s["queue_wait_p90"] == pytest.approx(5.4)
    assert "runs: 3 (4 attempts)" in format_stats(rows)


def test_status_events_cover_every_change():
    ev = txlog.status_events
    started = ev("r", {"state": "PENDING", "attempt": 0}, {"state": "RUNNING", "attempt": 1, "updated": 1.0,
                                                          "host": "h", "worker": "w", "pid": 5})  # fmt: skip
    assert [e["event"] for e in started] == ["STARTED"] and started[0]["t"] == 1_000_000
    lost = ev("r", {"state": "RUNNING", "attempt": 1}, {"state": "RUNNING", "attempt": 2, "updated": 2.0})
    assert [(e["event"], e["attempt"]) for e in lost] == [("DONE", 1), ("RECOVERED", 2), ("STARTED", 2)]
    assert lost[0]["state"] == "LOST"
    assert ev("r", {"state": "TIMEOUT", "attempt": 1}, {"state": "TIMEOUT", "attempt": 1, "updated": 3}) == []
    pre = ev("r", {"state": "RUNNING", "attempt": 1}, {"state": "PREEMPTED", "attempt": 1, "updated": 3})
    assert [e["event"] for e in pre] == ["PREEMPTED", "DONE"]
    res = {"peak_rss_bytes": 5, "cpu_seconds": 0.5, "samples": 3}
    done = ev("r", {"state": "RUNNING", "attempt": 1}, {"state": "COMPLETED", "attempt": 1, "resources": res})
    assert done[0]["peaks"] == {"peak_rss_bytes": 5, "cpu_seconds": 0.5}
    # a timeout recorded by the watchdog, the monitor's summary added after: a PEAKS line
    late = ev("r", {"state": "TIMEOUT", "attempt": 1}, {"state": "TIMEOUT", "attempt": 1, "resources": res})
    assert [e["event"] for e in late] == ["PEAKS"] and txlog.attempts(late)[0]["peak_memory"] == 5
    gen = ev("r", {"state": "PENDING"}, {"state": "GENERATED", "updated": 3})
    assert gen[0]["event"] == "STATE" and gen[0]["state"] == "GENERATED"


def test_timeline_import_does_not_load_matplotlib_until_drawing():
    code = "import easylaunch.txlog, easylaunch.timeline, easylaunch.cli, sys; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False"], out.stderr
