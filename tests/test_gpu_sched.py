"""The GPU scheduler's admission rules (pure, no I/O): packing, spreading, profile-first,
no overcommit and no starvation over random job streams (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from easylaunch.gpu_sched import Scheduler, Unfit

GIB = 1024**3


def test_pack_takes_the_tightest_gpu_and_spread_the_emptiest():
    s = Scheduler({0: 16 * GIB, 1: 8 * GIB}, profiles={"t": 3 * GIB})
    s.request("a", "t", policy="pack")
    assert [(g.key, g.gpu) for g in s.admit()] == [("a", 1)]
    s.request("b", "t", policy="spread")
    assert [(g.key, g.gpu) for g in s.admit()] == [("b", 0)]
    assert s.free(0) == 13 * GIB and s.free(1) == 5 * GIB


def test_an_unprofiled_type_profiles_alone_then_its_runs_pack():
    s = Scheduler({0: 10 * GIB})
    for k in "abc":
        s.request(k, "new")
    grants = s.admit()
    assert [(g.key, g.profiling) for g in grants] == [("a", True)]
    assert s.free(0) == 0  # the profiling run holds the whole GPU
    assert s.admit() == []
    assert s.release("a", peak=4 * GIB) == 4 * GIB
    assert [(g.key, g.nbytes) for g in s.admit()] == [("b", 4 * GIB), ("c", 4 * GIB)]
    assert s.free(0) == 2 * GIB


def test_other_types_go_on_while_one_profiles():
    s = Scheduler({0: 10 * GIB, 1: 10 * GIB}, profiles={"known": GIB})
    s.request("p1", "new")
    s.request("p2", "new")
    s.request("k1", "known")
    got = {g.key: g.gpu for g in s.admit()}
    assert set(got) == {"p1", "k1"} and got["p1"] != got["k1"]


def test_a_failed_run_that_used_memory_still_profiles_one_that_used_none_does_not():
    s = Scheduler({0: 10 * GIB})
    s.request("a", "t")
    s.admit()
    assert s.release("a", peak=0, failed=True) is None and "t" not in s.profiles
    s.request("b", "t")
    assert s.admit()[0].profiling
    assert s.release("b", peak=2 * GIB, failed=True) == 2 * GIB


def test_profiles_only_grow_and_reservations_follow_the_measured_usage():
    s = Scheduler({0: 10 * GIB}, profiles={"t": 2 * GIB})
    s.request("a", "t")
    s.admit()
    s.grow("a", 3 * GIB)
    assert s.free(0) == 7 * GIB
    assert s.release("a", peak=GIB) == 3 * GIB
    s.request("b", "t")
    s.admit()
    assert s.release("b", peak=GIB) == 3 * GIB


def test_foreign_usage_counts_and_unfit_requests_are_refused_at_once():
    s = Scheduler({0: 8 * GIB}, profiles={"big": 9 * GIB, "t": 3 * GIB})
    with pytest.raises(Unfit, match="needs .* largest GPU it may use has"):
        s.request("x", "big")
    with pytest.raises(Unfit, match="names no GPU of this machine"):
        s.request("y", "t", allowed=[3])
    with pytest.raises(Unfit, match="gpu_policy"):
        s.request("z", "t", policy="tight")
    s.foreign[0] = 6 * GIB
    s.request("a", "t")
    assert s.admit() == []
    s.foreign[0] = 0
    assert [g.key for g in s.admit()] == ["a"]


def test_a_waiting_run_whose_profile_grew_past_every_gpu_is_refused_not_kept():
    s = Scheduler({0: 8 * GIB})
    s.request("a", "t")
    s.request("b", "t")
    s.admit()
    s.release("a", peak=9 * GIB)
    assert s.admit() == []
    assert [k for k, _ in s.refused] == ["b"] and not s.waiting


def test_a_bypassed_run_stops_later_admissions_once_bypassed_enough():
    s = Scheduler({0: 10 * GIB}, profiles={"big": 9 * GIB, "small": 2 * GIB}, max_bypass=2)
    s.request("s0", "small")
    s.admit()
    s.request("B", "big")  # 8 GiB free: does not fit
    s.request("s1", "small")
    s.request("s2", "small")
    s.request("s3", "small")
    assert [g.key for g in s.admit()] == ["s1", "s2"]  # then B has been passed over twice
    for k in ("s0", "s1", "s2"):
        s.release(k)
        s.admit()
    assert "B" in s.reservations and "s3" not in s.reservations


# -- random job streams ------------------------------------------------------------------------

jobs = st.lists(
    st.tuples(
        st.integers(0, 3),  # job type
        st.integers(0, 20),  # arrival step
        st.integers(1, 6),  # duration in steps
        st.sampled_from(["pack", "spread"]),
        st.sets(st.integers(0, 2), max_size=3),  # allowed GPUs (empty: all)
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(
    jobs=jobs,
    peaks=st.lists(st.integers(0, 12), min_size=4, max_size=4),
    sizes=st.lists(st.integers(4, 12), min_size=1, max_size=3),
    max_bypass=st.integers(0, 5),
)
def test_random_streams_never_overcommit_and_every_run_ends(jobs, peaks, sizes, max_bypass):
    """Each type has a true peak (GiB); a run uses it from its start. At every step a GPU holds
    either one profiling run alone or profiled runs whose true usage stays within its size;
    every run is admitted or refused (profile larger than any GPU it may use)
    within a bounded time, and no run is passed over more than max_bypass times."""
    totals = {i: s * GIB for i, s in enumerate(sizes)}
    sched = Scheduler(totals, max_bypass=max_bypass)
    running = {}  # key -> (gpu, end step, type)
    profiling = {}  # key -> whether it was admitted to profile its type
    pending = sorted(range(len(jobs)), key=lambda i: jobs[i][1])
    done, refused = set(), set()
    horizon = 20 + sum(d for _, _, d, _, _ in jobs) + 5
    for step in range(horizon):
        for key in [k for k, (_, end, _) in running.items() if end <= step]:
            gpu, _, t = running.pop(key)
            sched.release(key, peak=peaks[t] * GIB)
            done.add(key)
        while pending and jobs[pending[0]][1] <= step:
            key = pending.pop(0)
            t, _, _, policy, allowed = jobs[key]
            allowed = {g for g in allowed if g in totals} or None
            try:
                sched.request(key, f"type{t}", allowed, policy)
            except Unfit:
                refused.add(key)
        for grant in sched.admit():
            t = jobs[grant.key][0]
            assert allowed_ok(jobs[grant.key][4], totals, grant.gpu)
            running[grant.key] = (grant.gpu, step + jobs[grant.key][2], t)
            profiling[grant.key] = grant.profiling
        refused.update(k for k, _ in sched.refused)
        sched.refused.clear()
        for gpu, total in totals.items():
            here = [(k, t) for k, (g, _, t) in running.items() if g == gpu]
            if any(profiling[k] for k, _ in here):
                assert len(here) == 1, f"a profiling run shares GPU {gpu} at step {step}"
                continue
            used = sum(peaks[t] * GIB for _, t in here)
            assert used <= total, f"GPU {gpu} overcommitted at step {step}"
            assert sched.free(gpu) >= 0
        for req in sched.waiting:
            assert req.bypassed <= max_bypass
        if not pending and not running and not sched.waiting:
            break
    assert not running and not sched.waiting, "some run never got a GPU"
    assert done | refused == set(range(len(jobs)))
    for key in refused:  # only runs that can never fit are refused
        t, allowed = jobs[key][0], {g for g in jobs[key][4] if g in totals} or set(totals)
        assert peaks[t] * GIB > max(totals[g] for g in allowed)


def allowed_ok(allowed, totals, gpu):
    allowed = {g for g in allowed if g in totals}
    return not allowed or gpu in allowed
