"""CloudMode.poll (modes ec2 / gcp) against a cloud held in memory: the order of its calls, how
many it makes, and what it concludes when an instance is gone. No services needed."""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

from easylaunch import records, transitions
from easylaunch.modes import cloud
from easylaunch.spec import State

EXP_KEY = "el/exp"
BATCH_KEY = EXP_KEY + "/.batches/B1"


class FakeCloud:
    """Objects and instances; ``on_describe`` runs when a describe arrives (the cloud moves on)."""

    def __init__(self) -> None:
        self.objects: Dict[str, bytes] = {}
        #: instance id -> (zone, state)
        self.instances: Dict[str, tuple] = {}
        self.calls: Counter = Counter()
        self.gets: List[str] = []
        self.on_describe: Optional[Callable[[], None]] = None

    def status(self, run: str, state: State) -> None:
        self.objects[f"{EXP_KEY}/{run}/status.json"] = json.dumps({"state": str(state)}).encode()


class FakeProvider(cloud.Provider):
    name = "fake"
    scheme = "fake"
    sky: FakeCloud

    def bucket(self):
        return "bucket", "el"

    def get(self, key: str) -> bytes:
        self.sky.calls["get"] += 1
        self.sky.gets.append(key)
        return self.sky.objects[key]

    def list(self, prefix: str):
        self.sky.calls["list"] += 1
        return {
            k: (len(v), hashlib.md5(v).hexdigest())
            for k, v in self.sky.objects.items()
            if k.startswith(prefix)
        }

    def console_hint(self, ident, resolved):
        return f"`fake console {ident} {resolved['zone']}`"

    def describe(self, ids, resolved):
        """As GCE's instances.list: what is in the zone asked about (the rest looks missing)."""
        self.sky.calls["describe"] += 1
        if self.sky.on_describe:
            self.sky.on_describe()
        out = {i: "missing" for i in ids}
        for ident in ids:
            zone, state = self.sky.instances.get(ident, (None, "missing"))
            if zone == resolved.get("zone"):
                out[ident] = state
        return out


class FakeMode(cloud.CloudMode):
    name = "fakecloud"
    provider_class = FakeProvider


def make_mode(sky: FakeCloud) -> FakeMode:
    FakeProvider.sky = sky
    return FakeMode({})


def run(tmp_path: Path, name: str, instance: str, index: int = 0, zone: str = "z1") -> SimpleNamespace:
    """A launched run as the poll sees it: a RUNNING run directory and its manifest."""
    run_dir = tmp_path / "exp" / name
    run_dir.mkdir(parents=True)
    records.write_status(run_dir, State.RUNNING)
    manifest = {
        "options": {"gcp_kwargs": {"zone": zone}},
        "backend": {
            "instance_id": instance,
            "instance": index,
            "cloud": {
                "store": "fake://bucket/el",
                "exp_key": EXP_KEY,
                "batch_key": BATCH_KEY,
                "resolved": {"zone": zone},
            },
        },
    }
    return SimpleNamespace(run_dir=run_dir, manifest=manifest)


def test_a_run_that_ends_during_the_poll_is_completed_not_failed(tmp_path):
    """The instance makes its final sync and ends itself while the poll is under way: the poll
    describes first and lists after, so the listing holds the run's last record (listing
    first, it saw the run RUNNING, then its instance gone, and called the run FAILED)."""
    sky = FakeCloud()
    sky.instances["i-1"] = ("z1", "running")
    sky.status("run-0", State.RUNNING)
    job = run(tmp_path, "run-0", "i-1")

    def the_instance_ends():
        sky.objects[f"{EXP_KEY}/run-0/result.pkl"] = b"result"
        sky.objects[f"{EXP_KEY}/run-0/stderr.log"] = b""
        sky.status("run-0", State.COMPLETED)
        sky.instances["i-1"] = ("z1", "terminated")

    sky.on_describe = the_instance_ends
    answers = make_mode(sky).poll([job])
    assert transitions.current(job.run_dir) == State.COMPLETED, records.read_status(job.run_dir)
    assert answers[job.run_dir] == State.COMPLETED
    assert (job.run_dir / "result.pkl").read_bytes() == b"result"
    assert sky.calls["describe"] == 1 and sky.calls["list"] == 1
    # an empty object (the logs of a quiet run) is known from the listing: no GET for it
    assert (job.run_dir / "stderr.log").read_bytes() == b""
    assert not [k for k in sky.gets if k.endswith("stderr.log")], sky.gets


def test_one_describe_and_one_listing_per_poll_of_a_sweep(tmp_path):
    sky = FakeCloud()
    sky.instances.update({"i-1": ("z1", "running"), "i-2": ("z1", "running")})
    jobs = [run(tmp_path, f"run-{k}", f"i-{1 + k // 2}", k // 2) for k in range(4)]
    make_mode(sky).poll(jobs)
    assert dict(sky.calls) == {"describe": 1, "list": 1}
    assert [transitions.current(j.run_dir) for j in jobs] == [State.RUNNING] * 4


def test_runs_of_one_experiment_in_two_zones_are_described_in_both(tmp_path):
    """Two launches of one experiment in two zones, polled together (as Job.load and
    ``easylaunch ls`` poll an experiment): each instance is looked for in its own zone."""
    sky = FakeCloud()
    sky.instances.update({"i-a": ("z1", "RUNNING"), "i-b": ("z2", "RUNNING")})
    jobs = [run(tmp_path, "run-a", "i-a", zone="z1"), run(tmp_path, "run-b", "i-b", zone="z2")]
    make_mode(sky).poll(jobs)
    assert [transitions.current(j.run_dir) for j in jobs] == [State.RUNNING, State.RUNNING], [
        records.read_status(j.run_dir).get("message") for j in jobs
    ]
    assert sky.calls["describe"] == 2 and sky.calls["list"] == 1


def test_a_killed_instance_is_read_once_for_all_its_runs(tmp_path):
    sky = FakeCloud()
    sky.instances["i-1"] = ("z1", "terminated")
    sky.objects[f"{BATCH_KEY}/instance-0.state.json"] = json.dumps({"last_sync": 1.0e9}).encode()
    jobs = [run(tmp_path, f"run-{k}", "i-1") for k in range(3)]
    make_mode(sky).poll(jobs)
    assert [transitions.current(j.run_dir) for j in jobs] == [State.FAILED] * 3
    assert "last sync" in records.read_status(jobs[0].run_dir)["message"]
    assert sky.gets == [f"{BATCH_KEY}/instance-0.state.json"]  # one GET, not one per run
    assert "never started its agent" not in records.read_status(jobs[0].run_dir)["message"]
    # an instance that never wrote its state object: nothing to GET, and the message says its
    # boot failed before the agent started, and where its boot output is
    sky2 = FakeCloud()
    sky2.instances["i-9"] = ("z1", "terminated")
    lone = run(tmp_path / "two", "run-9", "i-9")
    make_mode(sky2).poll([lone])
    assert transitions.current(lone.run_dir) == State.FAILED and sky2.gets == []
    message = records.read_status(lone.run_dir)["message"]
    assert message.startswith("instance i-9 (outputs as of its last sync at never) ended as terminated"), (
        message
    )
    assert "never started its agent" in message, message
    assert message.endswith("`fake console i-9 z1`"), message


def test_a_poll_that_fetched_outputs_does_not_hold_the_next_one_back(tmp_path, monkeypatch):
    """wait() spaces backend polls by the mode's poll_spacing times their CPU time. A cloud
    poll's CPU time is mostly the outputs it brought back (the runs use the instances' CPUs), so
    a run that ends meanwhile is seen a poll_interval later, not 20 times that CPU time later."""
    from easylaunch.job import Job, wait_all

    sky = FakeCloud()
    sky.instances["i-1"] = ("z1", "running")
    sky.status("run-0", State.RUNNING)
    sky.objects[f"{EXP_KEY}/run-0/out.bin"] = b"x" * 1000
    stub = run(tmp_path, "run-0", "i-1")
    records.atomic_write_json(stub.run_dir / "manifest.json", {"mode": "fakecloud", **stub.manifest})

    class QuickMode(FakeMode):
        poll_interval = 0.1

    original = FakeProvider.get

    def get(self, key):  # downloading costs CPU; the run ends meanwhile
        data = original(self, key)
        if key.endswith("out.bin"):
            end = time.thread_time() + 0.2
            while time.thread_time() < end:
                pass
            sky.status("run-0", State.COMPLETED)
        return data

    monkeypatch.setattr(FakeProvider, "get", get)
    FakeProvider.sky = sky
    job = Job(stub.run_dir, mode=QuickMode({}))
    t0 = time.monotonic()
    wait_all([job], timeout=30, progress=False)
    elapsed = time.monotonic() - t0
    assert transitions.current(job.run_dir) == State.COMPLETED
    assert (job.run_dir / "out.bin").read_bytes() == b"x" * 1000
    assert elapsed < 2.5, f"{elapsed:.1f} s (20x the poll's CPU time would be >= 4 s)"


def test_a_going_instance_without_a_notice_is_judged_once_it_has_ended(tmp_path):
    """GCE says STOPPING from a preemption on, before the agent (polling its metadata every
    second) has recorded the notice: the run is not FAILED meanwhile, and becomes PREEMPTED by
    the record that follows; an instance that ends without one fails then."""
    sky = FakeCloud()
    sky.instances.update({"i-1": ("z1", "STOPPING"), "i-2": ("z1", "STOPPING")})
    sky.objects[f"{BATCH_KEY}/instance-0.state.json"] = json.dumps({"last_sync": 1.0e9}).encode()
    sky.objects[f"{BATCH_KEY}/instance-1.state.json"] = json.dumps({"last_sync": 1.0e9}).encode()
    preempted, killed = run(tmp_path, "run-0", "i-1", 0), run(tmp_path, "run-1", "i-2", 1)
    for stub in (preempted, killed):  # a PREEMPTED run is looked at for recovery (none asked)
        records.atomic_write_json(stub.run_dir / "manifest.json", {"mode": "fakecloud", **stub.manifest})
    mode = make_mode(sky)
    mode.poll([preempted, killed])
    assert [transitions.current(j.run_dir) for j in (preempted, killed)] == [State.RUNNING] * 2
    # the agent's record of the notice, then the run's PREEMPTED after its final sync
    sky.objects[f"{BATCH_KEY}/instance-0.state.json"] = json.dumps(
        {"last_sync": 1.0e9, "notice": 2.0e9}
    ).encode()
    sky.status("run-0", State.PREEMPTED)
    sky.instances["i-2"] = ("z1", "TERMINATED")
    mode.poll([preempted, killed])
    assert transitions.current(preempted.run_dir) == State.PREEMPTED
    assert transitions.current(killed.run_dir) == State.FAILED
    assert "ended as TERMINATED" in records.read_status(killed.run_dir)["message"]
