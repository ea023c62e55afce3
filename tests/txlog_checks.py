"""Checks shared by the transaction-log tests: a batch's log is complete and agrees with its
run directories, and what ``easylaunch timeline`` writes agrees with both."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path
from typing import List

from easylaunch import records, txlog


def check_complete(exp_dir: Path, run_dirs: List[Path]) -> List[dict]:
    """Every run: one SUBMITTED; for each attempt one STARTED and one DONE, in that order; the
    last DONE says the state, exit code and times of status.json. Returns the attempt rows."""
    events = txlog.read_experiment(exp_dir)
    by_run: dict = {}
    for e in events:
        by_run.setdefault(e["run"], []).append(e)
    rows = txlog.attempts(events)
    for run_dir in map(Path, run_dirs):
        status = records.read_status(run_dir)
        mine = by_run.get(run_dir.name, [])
        kinds = Counter(e["event"] for e in mine)
        assert kinds["SUBMITTED"] == 1, (run_dir.name, mine)
        n = int(status["attempt"])
        assert n >= 1, status
        for attempt in range(1, n + 1):
            started = [e for e in mine if e["event"] == "STARTED" and e["attempt"] == attempt]
            done = [e for e in mine if e["event"] == "DONE" and e["attempt"] == attempt]
            assert len(started) == 1 and len(done) == 1, (run_dir.name, attempt, mine)
            assert started[0]["t"] <= done[0]["t"]
            assert started[0]["worker"] and started[0]["host"]
        last = [e for e in mine if e["event"] == "DONE"][-1]
        assert last["attempt"] == n and last["state"] == status["state"], (last, status)
        assert last["exit_code"] == status.get("exit_code")
        # the monitor's peaks, as status.json has them
        assert last.get("peaks", {}) == txlog.peaks_of(status), (last, status.get("resources"))
        submitted = next(e for e in mine if e["event"] == "SUBMITTED")
        assert submitted["t"] / 1e6 <= status["started"] + 1e-3
        row = next(r for r in rows if r["run"] == run_dir.name and r["attempt"] == n)
        assert abs(row["started"] - status["started"]) < 2e-3, (row, status)
        assert abs(row["ended"] - status["ended"]) < 2e-3, (row, status)
        assert row["state"] == status["state"] and row["slot"] is not None
        assert row["peak_memory"] == (status.get("resources") or {}).get("peak_rss_bytes"), (row, status)
    return rows


def check_csv(path: Path, rows: List[dict], run_dirs: List[Path]) -> List[dict]:
    """The CSV has one row per attempt, and its last attempt of each run says the run's state."""
    with open(path, newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert list(table[0]) == ["run", "attempt", "worker", "host", "slot", "submitted", "started", "ended",
                              "state", "exit_code", "peak_memory"]  # fmt: skip
    for run_dir in map(Path, run_dirs):
        status = records.read_status(run_dir)
        mine = [r for r in table if r["run"] == run_dir.name]
        assert sorted(int(r["attempt"]) for r in mine) == list(range(1, int(status["attempt"]) + 1))
        last = max(mine, key=lambda r: int(r["attempt"]))
        assert last["state"] == status["state"] and float(last["ended"]) == float(
            next(r for r in rows if r["run"] == run_dir.name and r["attempt"] == int(last["attempt"]))[
                "ended"
            ]
        )
    return table


def check_png(path: Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, len(data)
