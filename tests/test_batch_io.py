"""Large-batch writing: forked writers, one shared status record per batch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from easylaunch import records
from easylaunch.batch import RunSpec, _forked


def _runs(tmp_path: Path, n: int) -> list:
    runs = []
    for i in range(n):
        d = tmp_path / f"r{i}"
        d.mkdir()
        runs.append(RunSpec(i, d, {"i": i}, b""))
    return runs


def test_forked_writers_write_every_run(tmp_path):
    runs = _runs(tmp_path, 50)
    _forked(runs, lambda run: (run.run_dir / "x.json").write_text(json.dumps(run.variant)))
    assert [json.loads((r.run_dir / "x.json").read_text())["i"] for r in runs] == list(range(50))


def test_forked_writer_failure_is_raised_with_its_message(tmp_path):
    runs = _runs(tmp_path, 20)

    def work(run):
        if run.index == 7:  # lands in a child when there are several cores
            raise ValueError("disk said no")
        (run.run_dir / "ok").touch()

    with pytest.raises((ValueError, OSError), match="disk said no"):
        _forked(runs, work)


def test_same_status_is_linked_and_later_writes_separate_runs(tmp_path):
    runs = _runs(tmp_path, 3)
    records.write_same_status([r.run_dir for r in runs], {"state": "PENDING"}, tmp_path)
    assert not list(tmp_path.glob(".status-*"))  # the template is gone
    assert all(records.read_status(r.run_dir)["state"] == "PENDING" for r in runs)
    records.write_status(runs[0].run_dir, "RUNNING", pid=os.getpid())
    assert records.read_status(runs[0].run_dir)["state"] == "RUNNING"
    assert [records.read_status(r.run_dir)["state"] for r in runs[1:]] == ["PENDING", "PENDING"]
    # a second shared record replaces the first everywhere, atomically
    records.write_same_status([r.run_dir for r in runs], {"state": "GENERATED"}, tmp_path)
    assert [records.read_status(r.run_dir)["state"] for r in runs] == ["GENERATED"] * 3
