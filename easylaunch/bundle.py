"""Bundles: self-contained directories for clusters easylaunch cannot drive (modes ``sss``, ``htp``).

A launch in mode ``sss`` or ``htp`` submits nothing. It writes the runs' directories as usual
(state GENERATED) and one **bundle** directory, ``<log dir>/<exp>/.batches/<batch id>/``,
that holds everything the cluster needs and nothing that lives elsewhere::

    README.txt        what to copy where, what to run, how to bring results back
    submit.sh         `bash submit.sh [sbatch options]` on the login node submits the job(s)
    bundle.json       what the bundle is (mode, experiment, batch, runs, cluster paths)
    jobs/             sbatch script(s), tasks.json (sss) or taskfile.txt + run_task.sh (htp)
    logs/             a log dir, copied into SSS_LOG_DIR when that is configured:
      .snapshots/     code snapshot (<sha>.tar.gz), easylaunch and cloudpickle as zips
      <exp>/<run>/    payload.pkl (0600), manifest.json, variant.json (no status: PENDING)

Paths inside the bundle are relative and resolved by the scripts where they run, so the
bundle works wherever it is copied; SSS_LOG_DIR, SLURM_DIRECTORY_FOR_JOB_SCRIPT and
TASKFILE_PATH_ON_BRC make them absolute cluster paths instead. The cluster needs Python of the
launcher's minor version (or a Singularity/Apptainer image with it) and Slurm; easylaunch and
cloudpickle come from the bundle, the code from its snapshot.

Results come back with :func:`collect` (``easylaunch collect DIR``)::

    sweep = collect("results/")      # run dirs found under results/ merged into the log dir
    sweep.states(); sweep.results()
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from . import __version__, records, txlog
from .payload import python_version
from .runtimes import Mount, PlainRuntime, RunnerCommand, Runtime, Shell, apptainer_runtime, sh
from .spec import TERMINAL_STATES, State

if TYPE_CHECKING:
    from .batch import Batch, RunSpec
    from .job import Sweep

FORMAT = 1
BUNDLE_FILE = "bundle.json"
README = "README.txt"
SUBMIT = "submit.sh"
SUBMITTED = "submitted.txt"
JOBS = "jobs"
LOGS = "logs"
STORE = ".snapshots"
#: the runs' packs, under jobs/; at most MAX_PACKS of them whatever the number of runs
PACKS_DIR = "runs"
MAX_PACKS = 32


class BundleError(ValueError):
    """A bundle cannot be written as configured; the message names the setting and the fix."""


# -- cluster paths -------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterPaths:
    """Where things are on the cluster: absolute configured paths, or None (found at run time)."""

    #: the bundle directory itself: SLURM_DIRECTORY_FOR_JOB_SCRIPT/<exp>_<batch id>
    bundle: Optional[str] = None
    #: the log dir holding <exp>/<run>/ and .snapshots/: SSS_LOG_DIR, else <bundle>/logs
    logs: Optional[str] = None
    #: htp only: TASKFILE_PATH_ON_BRC, else <bundle>/jobs/taskfile.txt
    taskfile: Optional[str] = None


def _cluster_path(settings, key: str) -> Optional[str]:
    value = settings.get(key)
    if value is None or value == "":
        return None
    text = str(value)
    if not text.startswith("/") or "\n" in text or "\0" in text:
        raise BundleError(
            f"config {key} = {value!r} must be an absolute path on the cluster (starting with '/'; "
            "'~' and $VARIABLES are not expanded), or None to let the bundle find its files itself"
        )
    return text.rstrip("/") or "/"


def cluster_paths(settings, batch: Batch, taskfile: bool) -> ClusterPaths:
    """The configured cluster paths (validated), for ``batch``'s bundle."""
    script_dir = _cluster_path(settings, "SLURM_DIRECTORY_FOR_JOB_SCRIPT")
    return ClusterPaths(
        bundle=f"{script_dir.rstrip('/')}/{bundle_name(batch)}" if script_dir else None,
        logs=_cluster_path(settings, "SSS_LOG_DIR"),
        taskfile=_cluster_path(settings, "TASKFILE_PATH_ON_BRC") if taskfile else None,
    )


def bundle_name(batch: Batch) -> str:
    """Suggested directory name of the bundle on the cluster: ``<exp>_<batch id>``."""
    return f"{batch.exp_name}_{batch.batch_id}"


# -- how the runner starts on the cluster --------------------------------------------------


def resolve_image(settings, options: dict) -> Optional[str]:
    """The image: option singularity_image ('' = none), else SSS_GPU_IMAGE/SSS_CPU_IMAGE by use_gpu."""
    image = options.get("singularity_image")
    if image is None:
        image = settings.get("SSS_GPU_IMAGE" if options.get("use_gpu") else "SSS_CPU_IMAGE")
    return image or None


def check_common(settings, batch: Batch) -> None:
    """Validation shared by sss and htp (before anything is written)."""
    python = batch.options.get("python")
    if not python or not str(python).strip() or "\n" in str(python):
        raise ValueError(f"option python={python!r} must name the cluster's Python, e.g. 'python3'")
    try:
        make_runtime(settings, batch.options, ClusterPaths())
    except ValueError as exc:
        raise BundleError(str(exc)) from None


def make_runtime(settings, options: dict, cluster: ClusterPaths) -> Runtime:
    """How the bundle's jobs start the runner on the cluster: its ``python``, or inside the image
    (binding the bundle, the configured log dir and SSS_NON_CODE_DIRS_TO_MOUNT). SSS_PRE_CMDS run
    first; inside the container when there is one, as in doodad."""
    image = resolve_image(settings, options)
    python = str(options.get("python") or "python3")
    pre_cmds = [line for line in settings.get("SSS_PRE_CMDS") or []]
    for i, line in enumerate(pre_cmds):
        if not isinstance(line, str):
            raise ValueError(f"config SSS_PRE_CMDS[{i}] = {line!r} must be a string (one shell line)")
    if not image:
        return PlainRuntime(python=python, pre_cmds=pre_cmds)
    binds = [Mount(Shell('"$BUNDLE"'), read_only=False)]
    if cluster.logs:
        binds.append(Mount(Shell('"$LOGS"'), read_only=False))
    return apptainer_runtime(
        settings,
        image,
        gpu=bool(options.get("use_gpu")),
        binds=binds,
        mounts_key="SSS_NON_CODE_DIRS_TO_MOUNT",
        mounts_read_only=False,
        inner_pre_cmds=pre_cmds,
        here=False,
        python=python,
    )


def runner_command(runtime: Runtime, zips: Sequence[str]) -> RunnerCommand:
    """The runtime's command with the bundle's easylaunch and cloudpickle zips (in the log dir's
    ``.snapshots``, found where the job runs) on its PYTHONPATH."""
    return runtime.command([sh(Shell('"$LOGS"'), f"/{STORE}/{name}") for name in zips])


# -- writing -------------------------------------------------------------------------------


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except FileExistsError:
        pass
    except OSError:  # another file system, or no hard links
        shutil.copy2(src, dst)


def prepare_code(batch: Batch, bundle: Path) -> List[str]:
    """Ship the code (snapshot, easylaunch and cloudpickle zips) into ``<bundle>/logs/.snapshots``.

    Archives are made in the log dir's shared store (hash cache, one copy per content) and
    hard-linked into the bundle. The payloads name the snapshot by id only, so the runner finds
    it in ``.snapshots/`` two levels above its run directory, wherever the bundle is. Returns the
    file names to put on the runner's PYTHONPATH.
    """
    from .shipping import ship

    shipment = ship(batch, batch.log_root / STORE, zips=True, include_easylaunch=True, same_machine=False)
    store = bundle / LOGS / STORE
    store.mkdir(parents=True, exist_ok=True)
    if shipment.snapshot:
        _link_or_copy(Path(shipment.snapshot["archive"]), store / shipment.snapshot["archive_name"])
    for z in shipment.zips:
        _link_or_copy(z, store / z.name)
    return [z.name for z in shipment.zips]


def mark_generated(batch: Batch, bundle: Path) -> None:
    """Local run directories: state GENERATED (nothing was submitted)."""
    from . import transitions

    message = f"bundle written to {bundle}; nothing submitted: copy it to the cluster and run submit.sh"
    transitions.generated([run.run_dir for run in batch.runs], message, batch.exp_dir)


def write_bundle_packs(batch: Batch, bundle: Path, groups: Sequence[Sequence["RunSpec"]]) -> List[str]:
    """The runs' launch files (payload.pkl, manifest.json, variant.json, git/) in a few packs
    (``jobs/runs/pack_NNN.tar``, at most :data:`MAX_PACKS`, mode 0600; see
    :mod:`easylaunch.packs`): a bundle is a handful of files whatever the number of runs. Each
    task group's runs are in one pack; on the cluster the task makes their directories from it.
    Returns each group's pack, relative to ``jobs/``."""
    from . import packs

    plan = packs.plan_packs(len(groups), MAX_PACKS)
    members: Dict[int, list] = {}
    for group, pack in zip(groups, plan):
        members.setdefault(pack, []).extend((run.name, run.run_dir) for run in group)
    names = {pack: f"{PACKS_DIR}/pack_{pack:03d}.tar" for pack in members}
    (bundle / JOBS / PACKS_DIR).mkdir(parents=True, exist_ok=True)
    for pack, runs in members.items():  # serial: threads only add GIL hand-offs here (B5)
        packs.write_pack(bundle / JOBS / names[pack], runs)
    return [names[pack] for pack in plan]


def write_file(path: Path, text: str, mode: int = 0o644) -> None:
    records.atomic_write_bytes(path, text.encode(), mode)


def write_common(
    batch: Batch,
    bundle: Path,
    mode_name: str,
    cluster: ClusterPaths,
    readme: dict,
    submit_text: str,
    extra: Optional[dict] = None,
) -> None:
    """README.txt, submit.sh and bundle.json."""
    from .templating import render

    info = {
        "format": FORMAT,
        "mode": mode_name,
        "exp_name": batch.exp_name,
        "batch_id": batch.batch_id,
        "runs": len(batch.runs),
        "first_run": batch.runs[0].name if batch.runs else None,
        "last_run": batch.runs[-1].name if batch.runs else None,
        "written": time.time(),
        "written_on": records.hostname(),
        "local_bundle": str(bundle),
        "local_log_dir": str(batch.log_root),
        "name": bundle_name(batch),
        "cluster": {"bundle": cluster.bundle, "logs": cluster.logs, "taskfile": cluster.taskfile},
        "python": python_version(),
        "easylaunch_version": __version__,
        **(extra or {}),
    }
    records.atomic_write_json(bundle / BUNDLE_FILE, info)
    write_file(bundle / SUBMIT, submit_text, 0o755)
    text = render(
        "bundle_README.txt.j2",
        version=__version__,
        mode=mode_name,
        exp_name=batch.exp_name,
        batch_id=batch.batch_id,
        n_runs=len(batch.runs),
        first_run=batch.runs[0].name,
        last_run=batch.runs[-1].name,
        written=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["written"])),
        host=info["written_on"],
        bundle=str(bundle),
        bundle_name=bundle_name(batch),
        cluster=cluster,
        python=python_version(),
        log_root=str(batch.log_root),
        q=shlex.quote,
        **readme,
    )
    write_file(bundle / README, text)


def announce(bundle: Path, n: int, mode_name: str) -> None:
    print(
        f"easylaunch: mode {mode_name!r} submitted nothing: wrote bundle {bundle} ({n} run(s), state "
        f"GENERATED).\n  Copy it to the cluster and run submit.sh there; see {bundle / README}",
        file=sys.stderr,
    )


# -- collect -------------------------------------------------------------------------------


@dataclass
class Collected:
    """One run directory found by :func:`collect_runs` and what was done with it."""

    source: Path
    target: Path
    action: str  # new | updated | unchanged | kept local | not started | in place


def find_run_dirs(path: Path) -> List[Path]:
    """Run directories (holding manifest.json) at or below ``path``; snapshots are skipped."""
    path = Path(path)
    if records.is_run_dir(path):
        return [path]
    found: List[Path] = []
    for dirpath, dirnames, filenames in os.walk(path):
        if records.MANIFEST in filenames and dirpath != str(path):
            found.append(Path(dirpath))
            dirnames[:] = []  # a run's own outputs are not runs
            continue
        dirnames[:] = sorted(d for d in dirnames if d != STORE)
    return sorted(found)


def _target_for(source: Path, manifest: dict, base_log_dir: Optional[str]) -> Path:
    from .config import load_settings, log_root

    exp = manifest.get("exp_name") or source.parent.name
    name = manifest.get("run_name") or source.name
    if "/" in exp or "/" in name or exp in (".", "..") or name in (".", ".."):
        raise ValueError(f"{source}: manifest names an invalid run {exp!r}/{name!r}")
    if base_log_dir is None:
        # the run's own directory where it was launched, when this is that machine
        original = manifest.get("run_dir")
        if original and Path(original).name == name and records.is_run_dir(original):
            mine = records.read_json(Path(original) / records.MANIFEST, {}) or {}
            if mine.get("batch_id") == manifest.get("batch_id"):
                return Path(original)
    return log_root(base_log_dir, load_settings()) / exp / name


def _started(status: dict) -> bool:
    state = status.get("state")
    return bool(status.get("started") or int(status.get("attempt") or 0) > 0) or (
        state is not None and state not in (State.PENDING, State.GENERATED)
    )


def _copy_tree(src: Path, dst: Path, skip: Tuple[str, ...]) -> None:
    """Copy files of ``src`` over ``dst`` (atomically per file), never deleting anything."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in os.scandir(src):
        if entry.name in skip:
            continue
        target = dst / entry.name
        if entry.is_dir(follow_symlinks=False):
            _copy_tree(Path(entry.path), target, ())
            continue
        try:
            if target.exists() and os.path.samefile(entry.path, target):
                continue
        except OSError:
            pass
        st = entry.stat(follow_symlinks=False)
        try:
            tst = target.stat(follow_symlinks=False)
            if tst.st_size == st.st_size and int(tst.st_mtime) == int(st.st_mtime) and not entry.is_symlink():
                continue
        except FileNotFoundError:
            pass
        tmp = dst / f".{entry.name}.{os.urandom(4).hex()}.collect"
        try:
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), tmp)
            else:
                shutil.copy2(entry.path, tmp)
            os.replace(tmp, target)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)


def _merge_status(local: dict, incoming: dict) -> dict:
    merged = dict(incoming)
    history = list(local.get("history") or [])
    last = history[-1][1] if history else 0
    for entry in incoming.get("history") or []:
        if entry[1] > last and (not history or history[-1] != entry):
            history.append(entry)
    merged["history"] = history
    return merged


def collect_run(source: Path, base_log_dir: Optional[str] = None) -> Collected:
    """Merge one run directory copied back from a cluster into its place in the log dir."""
    source = Path(source).resolve()
    manifest = records.read_manifest(source)
    target = _target_for(source, manifest, base_log_dir)
    if target.exists() and target.resolve() == source:
        return Collected(source, target, "in place")
    incoming = records.read_status(source)
    if not _started(incoming):
        return Collected(source, target, "not started")
    if not records.is_run_dir(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy_tree(source, target, (records.STATUS, records.MANIFEST))
        manifest["run_dir"] = str(target)
        manifest.setdefault("backend", {})["collected"] = {"from": str(source), "at": time.time()}
        records.atomic_write_json(target / records.MANIFEST, manifest)
        records.atomic_write_json(target / records.STATUS, incoming)
        txlog.restore_launch_lines(target, manifest, incoming)
        return Collected(source, target, "new")
    local = records.read_status(target)
    local_terminal = local.get("state") in TERMINAL_STATES
    incoming_terminal = incoming.get("state") in TERMINAL_STATES
    newer = float(incoming.get("updated") or 0) > float(local.get("updated") or 0)
    if not newer or (local_terminal and not incoming_terminal):
        same = float(incoming.get("updated") or 0) == float(local.get("updated") or 0)
        return Collected(source, target, "unchanged" if same else "kept local")
    _copy_tree(source, target, (records.STATUS, records.MANIFEST, records.VARIANT))
    records.update_manifest(target, {"backend": {"collected": {"from": str(source), "at": time.time()}}})
    # last: once the state says COMPLETED, result.pkl is already in place
    merged = _merge_status(local, incoming)
    records.atomic_write_json(target / records.STATUS, merged)
    txlog.restore_launch_lines(target, manifest, merged)
    return Collected(source, target, "updated")


def collect_runs(path: Path | str, base_log_dir: Optional[str] = None) -> List[Collected]:
    """Every run directory under ``path``, merged into the log dir (see :func:`collect`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"nothing to collect: {path} does not exist")
    sources = find_run_dirs(path)
    if not sources and (path / BUNDLE_FILE).is_file():
        # a bundle none of whose tasks ran: its runs' directories are made on the cluster
        from .job import find_runs

        info = records.read_json(path / BUNDLE_FILE, {}) or {}
        exp_dir = Path(str(info.get("local_log_dir") or "")) / str(info.get("exp_name") or "")
        mine = [d for d in find_runs(exp_dir) if d.name.rsplit("_", 2)[1:2] == [info.get("batch_id")]]
        if mine:
            return [Collected(d, d, "not started") for d in mine]
    if not sources:
        raise FileNotFoundError(
            f"no run directories (holding {records.MANIFEST}) under {path}; pass the directory "
            "you copied back from the cluster (a bundle, its logs/ dir, an experiment dir or run dirs)"
        )
    return [collect_run(s, base_log_dir) for s in sources]


_ACTION_RANK = {"new": 0, "updated": 1, "kept local": 2, "in place": 3, "unchanged": 4, "not started": 5}


def by_target(done: Sequence[Collected]) -> Dict[Path, Collected]:
    """One entry per run directory of the log dir, the most telling action first (several copies
    of a run may be found, e.g. a bundle's inside an experiment dir)."""
    out: Dict[Path, Collected] = {}
    for c in done:
        old = out.get(c.target)
        if old is None or _ACTION_RANK[c.action] < _ACTION_RANK[old.action]:
            out[c.target] = c
    return dict(sorted(out.items()))


def collect(path: Path | str, base_log_dir: Optional[str] = None) -> Sweep:
    """Turn run directories copied back from a cluster into Job handles.

    ``path`` is whatever came back: a whole bundle, its ``logs/`` dir, an experiment dir or a
    directory of run dirs. Each run directory found (one holding ``manifest.json``) is merged
    into its place in the log dir: the directory it was launched from when it is still there,
    else ``<log dir>/<exp_name>/<run>/`` (``base_log_dir`` chooses the log dir explicitly).
    A run that is already there counts as in place; a local status newer than the incoming one
    is kept (a finished run is never turned back into a running one); runs that never started
    are left alone. Returns a :class:`~easylaunch.job.Sweep` of the collected runs, with
    ``sweep.collected`` listing what was done with each::

        sweep = collect("~/from-cluster/logs")
        sweep.counts()        # Counter({'COMPLETED': 10})
        sweep.results()
    """
    from .job import Job, Sweep

    seen = by_target(collect_runs(path, base_log_dir))
    sweep = Sweep(Job(t) for t in seen)
    sweep.collected = list(seen.values())  # type: ignore[attr-defined]
    return sweep
