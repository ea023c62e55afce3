"""The transaction log: one JSON line per event of every run (TaskVine's ``transactions``).

Where the lines are written::

    <exp>/.batches/<batch>/transactions.jsonl   the launcher's lines: SUBMITTED, PENDING, GENERATED
    <exp>/<run>/events.jsonl                    the run's own lines, written where its status is
                                                written (the runner on the target, or whoever
                                                records for it): STARTED, REQUEUED, DONE, ...

The run's lines travel back with its directory (fetch, bundle collect); :func:`read_batch`
merges both by time. Every line is one ``O_APPEND`` write shorter than ``PIPE_BUF``, so lines
of concurrent writers never interleave or tear; on a file system without atomic appends across
machines (NFS) each side still writes its own files. Events (``t`` = epoch microseconds of the
clock where it happened)::

    {"t": 1764661234000000, "event": "SUBMITTED", "run": "20261202-073000.123_ab12cd_000", "batch": "ab12cd", "mode": "slurm"}
    {"t": ..., "event": "PENDING",  "run": ..., "job_id": "4242_0"}        # queued by the backend
    {"t": ..., "event": "STARTED",  "run": ..., "attempt": 1, "host": "n1", "worker": "slurm 4242_0", "slot": null, "pid": 77}
    {"t": ..., "event": "DONE",     "run": ..., "attempt": 1, "state": "REQUEUED", "exit_code": 76}
    {"t": ..., "event": "REQUEUED", "run": ..., "attempt": 2, "message": "requeued by Slurm ..."}
    {"t": ..., "event": "RECOVERED","run": ..., "attempt": 2}              # a later attempt starts
    {"t": ..., "event": "DONE",     "run": ..., "attempt": 2, "state": "COMPLETED", "exit_code": 0, "peaks": {...}}

Every attempt has one STARTED and one DONE (``state`` REQUEUED when the run went back to the
queue); a state change none of these names is a ``STATE`` line. Writing is standard library
only (the runner uses it on the target, Python 3.8+); :func:`attempts` and :func:`stats` read.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Union

PathLike = Union[str, Path]

BATCH_LOG = "transactions.jsonl"
RUN_LOG = "events.jsonl"
#: a line is at most this long (POSIX PIPE_BUF is 4096: one write of it is atomic)
MAX_LINE = 4000
#: set by a backend for the runner it starts: the worker's name and the run's slot in it
ENV_WORKER = "EASYLAUNCH_WORKER"
ENV_SLOT = "EASYLAUNCH_SLOT"
#: $EASYLAUNCH_TXLOG=0 turns the log off (benchmarks compare with and without)
ENV_OFF = "EASYLAUNCH_TXLOG"

_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
_TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED"}


def enabled() -> bool:
    """False when ``$EASYLAUNCH_TXLOG`` is ``0`` (read on each call: tests and benchmarks flip it)."""
    return os.environ.get(ENV_OFF, "1") != "0"


def now_us() -> int:
    """This clock's time in epoch microseconds."""
    return time.time_ns() // 1000


def encode(event: Dict[str, Any]) -> bytes:
    """One event as one line of at most :data:`MAX_LINE` bytes (long messages are cut)."""
    data = json.dumps(event, separators=(",", ":"), default=repr).encode() + b"\n"
    if len(data) <= MAX_LINE:
        return data
    event = dict(event)
    for key in ("message", "peaks", "job_id"):
        if key in event:
            event[key] = str(event[key])[:200] + "..."
    data = json.dumps(event, separators=(",", ":"), default=repr).encode() + b"\n"
    if len(data) > MAX_LINE:  # pathological: keep the identity of the event only
        keep = {k: event[k] for k in ("t", "event", "run", "attempt", "state") if k in event}
        data = json.dumps(keep, separators=(",", ":"), default=repr).encode() + b"\n"
    return data


def append(path: PathLike, events: Iterable[Dict[str, Any]]) -> None:
    """Append ``events`` to ``path``, one ``O_APPEND`` write per line. Never raises: the log
    is an observer, a full disk must not change how a run ends."""
    try:
        fd = os.open(path, _FLAGS, 0o644)
    except OSError:
        return
    try:
        for event in events:
            os.write(fd, encode(event))
    except OSError:
        pass
    finally:
        os.close(fd)


def worker_identity(host: str) -> Dict[str, Any]:
    """Where a runner starting now runs: ``worker`` (``$EASYLAUNCH_WORKER``; else the Slurm
    array task; else the process that started the runner, on this host: in a container, the
    host is the container) and ``slot`` (``$EASYLAUNCH_SLOT``, else None: assigned when read)."""
    environ = os.environ
    worker = environ.get(ENV_WORKER)
    if not worker:
        task, array = environ.get("SLURM_ARRAY_TASK_ID"), environ.get("SLURM_ARRAY_JOB_ID")
        if array and task and environ.get("EASYLAUNCH_ENVIRONMENT") != "local":
            worker = f"slurm {array}_{task}"
        elif environ.get("SLURM_JOB_ID") and environ.get("EASYLAUNCH_ENVIRONMENT") != "local":
            worker = f"slurm {environ['SLURM_JOB_ID']}"
        else:  # in a container, host is the container's name
            worker = f"{host} pid {os.getppid()}"
    slot: Optional[int]
    try:
        slot = int(environ[ENV_SLOT])
    except (KeyError, ValueError):
        slot = None
    return {"worker": worker, "slot": slot}


def _us(seconds: Any) -> Optional[int]:
    """Epoch seconds of a status field -> microseconds (None when it is not a time)."""
    if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds > 0:
        return int(seconds * 1e6)
    return None


def status_events(run: str, before: Dict[str, Any], after: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The events a status record ``before`` -> ``after`` of run ``run`` stands for."""
    old, new = str(before.get("state", "PENDING")), str(after["state"])
    attempt = int(after.get("attempt") or 0)
    restarted = new == "RUNNING" and attempt != int(before.get("attempt") or 0)
    t = _us(after.get("updated")) or now_us()
    if new == "RUNNING":  # the times the status itself gives, when it gives them
        t = _us(after.get("started")) or t
    elif new in _TERMINAL:
        t = _us(after.get("ended")) or t
    if old == new and not restarted:
        # the monitor's summary added to an outcome recorded earlier (a timeout's watchdog)
        if new in _TERMINAL and after.get("resources") and not before.get("resources"):
            return [{"t": t, "event": "PEAKS", "run": run, "attempt": attempt, "peaks": peaks_of(after)}]
        return []
    out: List[Dict[str, Any]] = []
    if new == "RUNNING":
        if old == "RUNNING":  # the previous attempt vanished without a record (killed, node lost)
            out.append({"t": t, "event": "DONE", "run": run, "attempt": attempt - 1, "state": "LOST"})
        if attempt > 1:
            out.append({"t": t, "event": "RECOVERED", "run": run, "attempt": attempt})
        out.append(
            {
                "t": t,
                "event": "STARTED",
                "run": run,
                "attempt": attempt,
                "host": after.get("host"),
                "worker": after.get("worker"),
                "slot": after.get("slot"),
                "pid": after.get("pid"),
            }
        )
    elif new == "PENDING" and old == "RUNNING":
        out.append(
            {
                "t": t,
                "event": "DONE",
                "run": run,
                "attempt": attempt,
                "state": "REQUEUED",
                "exit_code": after.get("exit_code"),
                "final": False,
            }
        )
        out.append(
            {"t": t, "event": "REQUEUED", "run": run, "attempt": attempt + 1, "message": after.get("message")}
        )
    elif new in _TERMINAL:
        if new == "PREEMPTED":
            out.append({"t": t, "event": "PREEMPTED", "run": run, "attempt": attempt})
        done: Dict[str, Any] = {
            "t": t,
            "event": "DONE",
            "run": run,
            "attempt": attempt,
            "state": new,
            "exit_code": after.get("exit_code"),
        }
        if new != "COMPLETED" and after.get("message"):
            done["message"] = str(after["message"])[:300]
        peaks = peaks_of(after)
        if peaks:
            done["peaks"] = peaks
        out.append(done)
    else:
        out.append({"t": t, "event": "STATE", "run": run, "attempt": attempt, "state": new, "from": old})
    return out


#: the monitor's summary (status.json ``resources``) that a DONE line carries
PEAK_KEYS = ("peak_rss_bytes", "peak_gpu_bytes", "cpu_seconds", "mean_cpu_percent")


def peaks_of(status: Dict[str, Any]) -> Dict[str, Any]:
    """The monitor's peaks in a status record (empty when it had no monitor)."""
    resources = status.get("resources")
    if not isinstance(resources, dict):
        return {}
    return {k: resources[k] for k in PEAK_KEYS if resources.get(k) is not None}


def record_status(run_dir: PathLike, before: Dict[str, Any], after: Dict[str, Any]) -> None:
    """Append the events of a status change to the run's ``events.jsonl`` (records.write_status
    calls it for every record, on whichever side writes it)."""
    if not enabled():
        return
    events = status_events(os.path.basename(os.fspath(run_dir).rstrip("/")), before, after)
    if events:
        append(os.path.join(run_dir, RUN_LOG), events)


def record_batch(batch_dir: PathLike, events: Iterable[Dict[str, Any]]) -> None:
    """Append launcher-side events to ``<batch_dir>/transactions.jsonl`` (made if missing)."""
    if not enabled():
        return
    try:
        os.makedirs(batch_dir, exist_ok=True)
    except OSError:
        return
    append(os.path.join(batch_dir, BATCH_LOG), events)


def restore_launch_lines(run_dir: PathLike, manifest: Dict[str, Any], status: Dict[str, Any]) -> bool:
    """A run collected from a bundle whose batch log is gone (the bundle was copied to the
    cluster and removed here): its SUBMITTED and GENERATED lines again, from the times of its
    status history, marked ``restored``. Nothing when the batch log has them. Returns whether
    it wrote."""
    if not enabled() or not manifest.get("batch_id"):
        return False
    run_dir = Path(run_dir)
    batch_dir = run_dir.parent / ".batches" / str(manifest["batch_id"])
    run = run_dir.name
    if any(e.get("run") == run and e["event"] == "SUBMITTED" for e in read_lines(batch_dir / BATCH_LOG)):
        return False
    history = status.get("history") or []
    times = {str(state): float(t) for state, t in reversed(history)}  # the first time of each
    first = times.get("PENDING") or times.get("GENERATED") or float(manifest.get("created") or 0)
    if not first:
        return False
    submitted = {"t": int(first * 1e6), "event": "SUBMITTED", "run": run, "batch": manifest["batch_id"],
                 "mode": manifest.get("mode"), "restored": True}  # fmt: skip
    events = [submitted]
    if "GENERATED" in times:
        events.append(
            {"t": int(times["GENERATED"] * 1e6), "event": "GENERATED", "run": run, "restored": True}
        )
    record_batch(batch_dir, events)
    return True


# -- reading ------------------------------------------------------------------------------
def read_lines(path: PathLike) -> List[Dict[str, Any]]:
    """The events of one file; a line that is not JSON (a copy cut short) is skipped."""
    out = []
    try:
        with open(path, "rb") as f:
            for raw in f:
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(event, dict) and "t" in event and "event" in event:
                    out.append(event)
    except FileNotFoundError:
        pass
    return out


def batch_dirs(exp_dir: PathLike) -> List[Path]:
    """The batch directories of an experiment that have a transaction log, oldest first."""
    root = Path(exp_dir) / ".batches"
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if (d / BATCH_LOG).is_file()]
    return sorted(found, key=lambda d: min((e["t"] for e in read_lines(d / BATCH_LOG)[:1]), default=0))


def read_batch(batch_dir: PathLike) -> List[Dict[str, Any]]:
    """The merged log of one batch: the launcher's lines and every run's own, sorted by time
    (ties keep the order in which each side wrote them)."""
    batch_dir = Path(batch_dir)
    exp_dir = batch_dir.parent.parent
    events = read_lines(batch_dir / BATCH_LOG)
    runs = list(dict.fromkeys(e["run"] for e in events if e.get("run")))
    for run in runs:
        events.extend(read_lines(exp_dir / run / RUN_LOG))
    order = {"SUBMITTED": 0, "PENDING": 1, "GENERATED": 1, "REQUEUED": 2, "RECOVERED": 3, "STARTED": 4}
    events.sort(key=lambda e: (e["t"], order.get(e["event"], 5)))
    return events


def read_experiment(exp_dir: PathLike, batch: Optional[str] = None) -> List[Dict[str, Any]]:
    """Every batch's merged log of an experiment (or only ``batch``), sorted by time."""
    dirs = batch_dirs(exp_dir)
    if batch is not None:
        dirs = [d for d in dirs if d.name == batch]
        if not dirs:
            raise FileNotFoundError(
                f"no batch {batch!r} with a transaction log in {exp_dir}/.batches; "
                f"batches: {', '.join(d.name for d in batch_dirs(exp_dir)) or 'none'}"
            )
    events: List[Dict[str, Any]] = []
    for d in dirs:
        events.extend(read_batch(d))
    events.sort(key=lambda e: e["t"])
    return events


def attempts(events: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per attempt of every run: run, attempt, worker, host, slot, submitted, started,
    ended (epoch seconds, None when unknown), state, exit_code, peak_memory (bytes, None when
    the monitor reported none). Rows of runs that have not started have attempt 1 and no start.
    Slots a backend did not name are assigned per worker as vine_plot_txn_log does (a min-heap:
    the lowest slot free when the attempt starts)."""
    rows: Dict[tuple, Dict[str, Any]] = {}
    queued: Dict[str, float] = {}
    first: Dict[str, int] = {}

    def row(run: str, attempt: int) -> Dict[str, Any]:
        key = (run, attempt)
        if key not in rows:
            rows[key] = {
                "run": run, "attempt": attempt, "worker": None, "host": None, "slot": None,
                "submitted": queued.get(run), "started": None, "ended": None, "state": "PENDING",
                "exit_code": None, "peak_memory": None,
            }  # fmt: skip
        return rows[key]

    for e in events:
        run, kind, t = e.get("run"), e["event"], e["t"] / 1e6
        if not run:
            continue
        if kind in ("SUBMITTED", "GENERATED"):
            queued.setdefault(run, t)
            first.setdefault(run, 1)
            row(run, 1)["state"] = "GENERATED" if kind == "GENERATED" else "PENDING"
        elif kind == "REQUEUED":
            queued[run] = t
            row(run, int(e.get("attempt") or 1))
        elif kind == "STARTED":
            r = row(run, int(e.get("attempt") or 1))
            r.update(
                started=t, worker=e.get("worker"), host=e.get("host"), slot=e.get("slot"), state="RUNNING"
            )
            if r["submitted"] is None:
                r["submitted"] = queued.get(run)
        elif kind == "DONE":
            r = row(run, int(e.get("attempt") or 1) or 1)
            r.update(ended=t, state=e.get("state"), exit_code=e.get("exit_code"))
            peak = _peak_memory(e.get("peaks"))
            if peak is not None:
                r["peak_memory"] = peak
        elif kind == "PEAKS":
            peak = _peak_memory(e.get("peaks"))
            if peak is not None:
                row(run, int(e.get("attempt") or 1) or 1)["peak_memory"] = peak
        elif kind == "STATE":
            r = row(run, int(e.get("attempt") or 1) or 1)
            r["state"] = e.get("state")
    out = sorted(rows.values(), key=lambda r: (r["submitted"] or r["started"] or 0, r["run"], r["attempt"]))
    _assign_slots(out)
    return out


def _peak_memory(peaks: Any) -> Optional[int]:
    if not isinstance(peaks, dict):
        return None
    for key in ("peak_rss_bytes", "rss"):
        value = peaks.get(key)
        if isinstance(value, (int, float)):
            return int(value)
    return None


def _assign_slots(rows: List[Dict[str, Any]]) -> None:
    import heapq

    by_worker: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        if r["started"] is not None and r["worker"] is not None:
            by_worker.setdefault(r["worker"], []).append(r)
    for worker_rows in by_worker.values():
        worker_rows.sort(key=lambda r: r["started"])
        busy: List[tuple] = []  # (end, slot)
        free: List[int] = []
        named = {r["slot"] for r in worker_rows if r["slot"] is not None}
        next_slot = 0
        for r in worker_rows:
            while busy and busy[0][0] <= r["started"]:
                heapq.heappush(free, heapq.heappop(busy)[1])
            if r["slot"] is None:
                if free:
                    r["slot"] = heapq.heappop(free)
                else:
                    while next_slot in named:
                        next_slot += 1
                    r["slot"] = next_slot
                    next_slot += 1
                end = r["ended"] if r["ended"] is not None else float("inf")
                heapq.heappush(busy, (end, r["slot"]))


def stats(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Totals of :func:`attempts` rows: runs by final state, attempts, wall time (first
    submission to last end), busy fraction of the slots (run time / (slots x the span from the
    first start to the last end)), queue wait (submitted -> started) median and p90, seconds."""
    final: Dict[str, Dict[str, Any]] = {}
    for r in rows:
        if r["run"] not in final or r["attempt"] >= final[r["run"]]["attempt"]:
            final[r["run"]] = r
    by_state: Dict[str, int] = {}
    for r in final.values():
        by_state[str(r["state"])] = by_state.get(str(r["state"]), 0) + 1
    starts = [r["started"] for r in rows if r["started"] is not None]
    ends = [r["ended"] for r in rows if r["ended"] is not None]
    submits = [r["submitted"] for r in rows if r["submitted"] is not None]
    waits = sorted(
        r["started"] - r["submitted"] for r in rows if r["started"] is not None and r["submitted"] is not None
    )
    busy = sum(r["ended"] - r["started"] for r in rows if r["started"] is not None and r["ended"] is not None)
    slots = len({(r["worker"], r["slot"]) for r in rows if r["started"] is not None})
    span = (max(ends) - min(starts)) if starts and ends else 0.0
    return {
        "runs": len(final),
        "attempts": len(rows),
        "by_state": dict(sorted(by_state.items())),
        "wall_time": (max(ends) - min(submits or starts)) if ends and (submits or starts) else None,
        "workers": len({r["worker"] for r in rows if r["worker"] is not None}),
        "slots": slots,
        "busy_fraction": (busy / (slots * span)) if slots and span > 0 else None,
        "queue_wait_median": _quantile(waits, 0.5),
        "queue_wait_p90": _quantile(waits, 0.9),
    }


def _quantile(values: List[float], q: float) -> Optional[float]:
    """Linear-interpolated quantile of sorted ``values`` (None when empty)."""
    if not values:
        return None
    pos = (len(values) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)
