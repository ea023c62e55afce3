"""Which waiting run gets which GPU: the GPU broker's admission rules, without any I/O.

    sched = Scheduler({0: 16 * GIB, 1: 8 * GIB}, profiles={"train.py::fit": 3 * GIB})
    sched.request("a", "train.py::fit", policy="pack")
    sched.request("b", "eval.py::run")                 # no profile yet: it will profile
    for grant in sched.admit():                        # [Grant("a", gpu=1, ...), Grant("b", gpu=0, ...)]
        ...                                            # start the run with CUDA_VISIBLE_DEVICES=grant.gpu
    sched.release("b", peak=2 * GIB)                   # the run ended: its peak is the type's profile

The rules (GRN's, with its known gaps closed):

- A run of a type with a profile reserves the profile's bytes on a GPU where at least that
  much is free: ``pack`` takes the tightest such GPU, ``spread`` the one with most free memory.
  Free memory is the GPU's total minus every reservation on it minus what processes outside
  any reservation use (``foreign``); nothing is admitted beyond it.
- A run of a type without a profile profiles it: it gets a GPU that no one holds and holds it
  whole until it ends; the other runs of its type wait for the profile, runs of other types go
  on. Its peak becomes the profile (a failed run's too, when it used GPU memory; a run that
  failed before using any leaves the type unprofiled and the next run of it profiles).
- A profile only grows: every run's peak is folded in, and a reservation grows with its run's
  measured usage (:meth:`Scheduler.grow`).
- Reservations last until :meth:`Scheduler.release` (the broker calls it when the run's process
  ends, however it ends).
- No starvation: runs are considered oldest first; a run that waits for memory while later
  runs are admitted is "bypassed"; once it has been bypassed ``max_bypass`` times, nothing
  after it is admitted until it fits. A run that can never fit (profile larger than every GPU
  it may use) is refused at once (:class:`Unfit`), never left waiting.

Target-side code (the broker runs it): Python 3.8+, standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Hashable, Iterable, List, Mapping, Optional, Set

POLICIES = ("pack", "spread")
#: how many later runs may be admitted past a run that waits for memory
DEFAULT_MAX_BYPASS = 8


class Unfit(ValueError):
    """A request that no GPU it may use can ever hold (or that names no usable GPU)."""


@dataclass
class Request:
    """A run waiting for a GPU."""

    key: Hashable
    job_type: str
    allowed: Optional[frozenset]  # GPU ids it may use; None: every GPU
    policy: str = "pack"
    seq: int = 0
    bypassed: int = 0


@dataclass
class Reservation:
    """A GPU held by a run: ``nbytes`` reserved, or the whole GPU while it profiles."""

    key: Hashable
    job_type: str
    gpu: int
    nbytes: int
    profiling: bool = False
    peak: int = 0


@dataclass(frozen=True)
class Grant:
    """What :meth:`Scheduler.admit` decided for one request."""

    key: Hashable
    gpu: int
    nbytes: int
    profiling: bool


@dataclass
class Scheduler:
    """The broker's state: GPU sizes, profiles, reservations and the waiting requests."""

    totals: Dict[int, int]
    profiles: Dict[str, int] = field(default_factory=dict)
    max_bypass: int = DEFAULT_MAX_BYPASS
    reservations: Dict[Hashable, Reservation] = field(default_factory=dict)
    waiting: List[Request] = field(default_factory=list)
    foreign: Dict[int, int] = field(default_factory=dict)
    #: ``(key, message)`` of requests :meth:`admit` dropped because their type's profile grew
    #: beyond every GPU they may use (the broker answers them with the message)
    refused: List[tuple] = field(default_factory=list)
    _seq: int = 0

    # -- inputs -------------------------------------------------------------------------------
    def request(
        self, key: Hashable, job_type: str, allowed: Optional[Iterable[int]] = None, policy: str = "pack"
    ) -> Request:
        """Queue a run; :class:`Unfit` when no GPU it may use could ever hold it."""
        if policy not in POLICIES:
            raise Unfit(f"gpu_policy={policy!r} is not one of {', '.join(POLICIES)}")
        ids = frozenset(int(i) for i in allowed) if allowed is not None else None
        usable = [g for g in self.totals if ids is None or g in ids]
        if not usable:
            known = ", ".join(str(g) for g in sorted(self.totals)) or "none"
            raise Unfit(f"gpus={sorted(ids or [])} names no GPU of this machine (GPUs here: {known})")
        self._seq += 1
        req = Request(key, job_type, ids, policy, self._seq)
        problem = self._never_fits(req)
        if problem:
            raise Unfit(problem)
        self.waiting.append(req)
        return req

    def withdraw(self, key: Hashable) -> None:
        """A waiting request went away (its client died before its turn)."""
        self.waiting = [r for r in self.waiting if r.key != key]

    def grow(self, key: Hashable, used: int) -> None:
        """The run ``key`` was measured using ``used`` bytes: its reservation covers at least that."""
        res = self.reservations.get(key)
        if res is None:
            return
        res.peak = max(res.peak, int(used))
        if not res.profiling:
            res.nbytes = max(res.nbytes, res.peak)

    def release(self, key: Hashable, peak: Optional[int] = None, failed: bool = False) -> Optional[int]:
        """The run ``key`` ended; its peak is folded into its type's profile. Returns the
        type's profile after it (None while the type stays unprofiled)."""
        self.withdraw(key)
        res = self.reservations.pop(key, None)
        if res is None:
            return None
        if peak is not None:
            res.peak = max(res.peak, int(peak))
        old = self.profiles.get(res.job_type)
        if old is None and failed and res.peak == 0:
            return None  # failed before it used the GPU: it tells nothing; the next one profiles
        if old is None or res.peak > old:
            self.profiles[res.job_type] = res.peak
        return self.profiles[res.job_type]

    # -- decisions ----------------------------------------------------------------------------
    def free(self, gpu: int) -> int:
        """Bytes of ``gpu`` that no reservation and no foreign process holds (0 while a run
        profiles on it)."""
        held = [r for r in self.reservations.values() if r.gpu == gpu]
        if any(r.profiling for r in held):
            return 0
        return self.totals[gpu] - sum(r.nbytes for r in held) - self.foreign.get(gpu, 0)

    def _never_fits(self, req: Request) -> Optional[str]:
        need = self.profiles.get(req.job_type)
        if need is None:
            return None
        biggest = max(t for g, t in self.totals.items() if req.allowed is None or g in req.allowed)
        if need <= biggest:
            return None
        return (
            f"job type {req.job_type!r} needs {need} bytes of GPU memory (its profile) but the largest "
            f"GPU it may use has {biggest}; delete its entry in .gpu_profiles.json if that was wrong"
        )

    def _idle(self, gpu: int) -> bool:
        return not any(r.gpu == gpu for r in self.reservations.values())

    def is_profiling(self, job_type: str) -> bool:
        """Whether a run of ``job_type`` is measuring its profile now."""
        return any(r.profiling and r.job_type == job_type for r in self.reservations.values())

    def _place(self, req: Request, free: Dict[int, int], idle: Set[int], held: Set[int]) -> Optional[Grant]:
        """Where ``req`` goes given each GPU's ``free`` bytes, the ``idle`` GPUs (no
        reservation) and those ``held`` whole by a profiling run; None: nowhere now."""
        ids = [g for g in self.order if req.allowed is None or g in req.allowed]
        need = self.profiles.get(req.job_type)
        if need is None:
            spare = [g for g in ids if g in idle]
            if not spare:
                return None
            # the profiling run takes a whole GPU: the smallest for pack (big ones stay free),
            # the largest for spread
            if req.policy == "pack":
                gpu = min(spare, key=lambda g: (self.totals[g], g))
            else:
                gpu = max(spare, key=lambda g: (self.totals[g], -g))
            return Grant(req.key, gpu, self.totals[gpu], True)
        fits = [g for g in ids if g not in held and free[g] >= need]
        if not fits:
            return None
        if req.policy == "pack":
            gpu = min(fits, key=lambda g: (free[g], g))
        else:
            gpu = max(fits, key=lambda g: (free[g], -g))
        return Grant(req.key, gpu, need, False)

    @property
    def order(self) -> List[int]:
        return sorted(self.totals)

    def admit(self) -> List[Grant]:
        """Admit what fits now (oldest first); the grants become reservations.

        One pass, O(waiting x GPUs): each GPU's free bytes and the types being profiled are
        computed once and updated as grants are made."""
        free = {g: self.free(g) for g in self.totals}
        idle = {g for g in self.totals if self._idle(g)}
        held = {r.gpu for r in self.reservations.values() if r.profiling}
        profiling = {r.job_type for r in self.reservations.values() if r.profiling}
        grants: List[Grant] = []
        starved: List[tuple] = []  # (request, grants made before it was passed over)
        worst = None  # max over starved of (bypassed - grants before): overtaking stops at max_bypass
        for req in sorted(self.waiting, key=lambda r: r.seq):
            problem = self._never_fits(req)
            if problem:
                self.refused.append((req.key, problem))
                self.waiting.remove(req)
                continue
            if req.job_type not in self.profiles and req.job_type in profiling:
                continue  # waits for its type's profile, not for memory
            if worst is not None and worst + len(grants) >= self.max_bypass:
                break  # an old run has waited long enough: nothing overtakes it any more
            grant = self._place(req, free, idle, held)
            if grant is None:
                starved.append((req, len(grants)))
                mark = req.bypassed - len(grants)
                worst = mark if worst is None else max(worst, mark)
                continue
            grants.append(grant)
            idle.discard(grant.gpu)
            if grant.profiling:
                held.add(grant.gpu)
                profiling.add(req.job_type)
                free[grant.gpu] = 0
            else:
                free[grant.gpu] -= grant.nbytes
            self.reservations[req.key] = Reservation(
                req.key, req.job_type, grant.gpu, grant.nbytes, grant.profiling
            )
        for req, before in starved:
            req.bypassed += len(grants) - before
        done = {g.key for g in grants}
        self.waiting = [r for r in self.waiting if r.key not in done]
        return grants

    def snapshot(self) -> Mapping[str, object]:
        """A JSON-able picture of the state (the broker's ``status`` answer)."""
        return {
            "gpus": {str(g): {"total": t, "free": self.free(g)} for g, t in sorted(self.totals.items())},
            "profiles": dict(self.profiles),
            "reservations": [
                {
                    "type": r.job_type,
                    "gpu": r.gpu,
                    "bytes": r.nbytes,
                    "profiling": r.profiling,
                    "peak": r.peak,
                }
                for r in self.reservations.values()
            ],
            "waiting": [{"type": r.job_type, "bypassed": r.bypassed} for r in self.waiting],
        }
