"""A launch batch: the runs of one run_experiment/run_sweep call, their directories and payloads.

The api validates everything, then :meth:`Batch.create_dirs` makes one directory per run
(exclusively: two launches never share one) and a mode calls :meth:`Batch.materialize` to
write payloads, manifests and git patches. Local modes start their processes first and
materialize while the interpreters boot.
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from . import __version__, failpoints, records
from .config import Settings, has_secrets, redact_argv, redact_secrets, scrub_secrets
from .gitinfo import capture_git_infos, launch_script_dir, patch_files, repo_root
from .payload import (
    VALUE,
    build_payload,
    code_files,
    encode_function,
    encode_variant,
    python_version,
    transport_for,
)
from .spec import DoodadConfig, GitInfo, State


@dataclass
class RunSpec:
    """One run: its directory, position in the batch and variant."""

    index: int
    run_dir: Path
    variant: dict
    variant_blob: bytes
    #: what variant.json and the manifest show, when not ``variant`` itself (Executor calls)
    recorded_variant: Optional[dict] = None

    @property
    def shown_variant(self) -> dict:
        return self.variant if self.recorded_variant is None else self.recorded_variant

    @property
    def payload_path(self) -> Path:
        return self.run_dir / records.PAYLOAD

    @property
    def name(self) -> str:
        return self.run_dir.name


@dataclass
class Batch:
    """Everything one launch call writes, shared by the api and the chosen mode."""

    fn: Callable
    fn_blob: bytes
    exp_name: str
    base_exp_name: str
    mode_name: str
    options: Dict[str, Any]
    settings: Settings
    log_root: Path
    variants: List[dict]
    variant_blobs: List[bytes]
    #: what each run's variant.json and manifest show, when not the variant itself
    recorded_variants: Optional[List[dict]] = None
    runs: List[RunSpec] = field(default_factory=list)
    batch_id: str = ""
    created: float = field(default_factory=time.time)
    #: per-run backend facts (pid, job id, ...) the mode wants in each manifest
    backend: Dict[int, dict] = field(default_factory=dict)
    #: facts shared by every run of the batch (sweep file, array job id, ...)
    backend_common: dict = field(default_factory=dict)
    #: extra payload header entries (sys_path, snapshot) set by the mode before materialize
    payload_sys_path: List[str] = field(default_factory=list)
    payload_snapshot: Optional[dict] = None
    #: a snapshot recorded in the payloads but not activated by the runner (local modes)
    kept_snapshot: Optional[dict] = None
    #: the code snapshot of the run being relaunched (its payload's ``snapshot``, archive
    #: located): shipped instead of a new snapshot of the code dirs
    reuse_snapshot: Optional[dict] = None
    #: the run a relaunch repeats (its directory), recorded in the manifest
    relaunch_of: Optional[str] = None
    git_infos: Optional[List[GitInfo]] = None
    #: the mode's runs may start before materialize() ends (Mode.starts_before_payloads):
    #: payloads are then written atomically
    early_start: bool = False
    #: set by the mode once anything may have run: a failure after that keeps the directories
    started: bool = False
    #: the target's Python ("3.8", "3.10.12") where the mode knows it may differ from the
    #: launcher's (an image's own Python); None: the runner runs this interpreter's minor
    target_python: Optional[str] = None
    #: how fn and variants travel, set by choose_transport(): "value" or "reference"
    transport: str = VALUE
    #: doodad keywords the mode does not use and ignores (manifest ``ignored_options``)
    ignored_options: Dict[str, Any] = field(default_factory=dict)
    #: with option gpus=: what each runner asks the GPU broker (set by the mode's check())
    gpu_request: Optional[dict] = None
    _materialized: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def exp_dir(self) -> Path:
        return self.log_root / self.exp_name

    @property
    def sweep_dir(self) -> Path:
        """Batch-level files (dispatch lists, scripts) live in ``<exp>/.batches/<batch_id>/``."""
        return self.exp_dir / ".batches" / self.batch_id

    @property
    def materialized(self) -> bool:
        """True once payloads and manifests are written."""
        return self._materialized

    # -- transport -----------------------------------------------------------------------
    def choose_transport(self) -> str:
        """Decide how the function and variants travel to ``target_python``, before anything
        is written (the api calls it after the mode's check()).

        Same minor (or unknown): by value, the blobs stay. Another minor: by reference (module
        + name from the code snapshot, variants as JSON), or :class:`~easylaunch.payload.TransportError`
        naming both versions and the fixes.
        """
        code_dirs = self.code_dirs() if self.target_python is not None else None
        transport = transport_for(self.fn, self.variants, self.target_python, code_dirs)
        if transport != self.transport:
            self.fn_blob = encode_function(self.fn, transport)
            self.variant_blobs = [
                encode_variant(v, transport, f"variant #{i}") for i, v in enumerate(self.variants)
            ]
            self.transport = transport
        return transport

    # -- directories ---------------------------------------------------------------------
    def create_dirs(self) -> None:
        """Create one fresh directory per run, with variant.json and a PENDING status."""
        try:
            self.exp_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PermissionError(
                f"cannot create the log dir {self.exp_dir}: {exc.strerror}; pass base_log_dir=... "
                "or set LOCAL_LOG_DIR / $EASYLAUNCH_LOG_DIR to a writable directory"
            ) from exc
        if not os.access(self.exp_dir, os.W_OK | os.X_OK):
            raise PermissionError(
                f"the log dir {self.exp_dir} is not writable; pass base_log_dir=... or set "
                "LOCAL_LOG_DIR / $EASYLAUNCH_LOG_DIR to a writable directory"
            )
        n = len(self.variants)
        width = max(3, len(str(n - 1)))
        # milliseconds keep names in launch order (find_runs sorts by name)
        millis = int((self.created % 1) * 1000)
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.created)) + f".{millis:03d}"
        for _attempt in range(20):
            self.batch_id = secrets.token_hex(3)
            made: List[Path] = []
            try:
                for i in range(n):
                    run_dir = self.exp_dir / f"{stamp}_{self.batch_id}_{i:0{width}d}"
                    run_dir.mkdir()  # exclusive: fails if another launch took the name
                    made.append(run_dir)
            except BaseException as exc:  # a name taken by another launch, or Ctrl-C meanwhile
                for d in made:
                    shutil.rmtree(d, ignore_errors=True)
                if isinstance(exc, FileExistsError):
                    continue
                raise
            break
        else:  # pragma: no cover - 20 collisions of 24 random bits
            raise RuntimeError(f"could not create unique run directories in {self.exp_dir}")

        status = {
            "state": State.PENDING.value,
            "attempt": 0,
            "created": self.created,
            "host": records.hostname(),
            "history": [[State.PENDING.value, self.created]],
        }

        def write_run(run: RunSpec) -> None:
            # readers find a run through its manifest (find_runs), written last and atomically,
            # so variant.json needs no temporary-file dance
            # the function may need a secret-looking key: kept, but then readable by the owner only
            data = json.dumps(run.shown_variant, indent=1, default=repr).encode() + b"\n"
            if has_secrets(run.shown_variant):
                records.atomic_write_bytes(run.run_dir / records.VARIANT, data, records.PRIVATE_MODE)
            else:
                with open(run.run_dir / records.VARIANT, "wb") as f:
                    f.write(data)

        shown = self.recorded_variants or [None] * n
        runs = [
            RunSpec(i, d, v, self.variant_blobs[i], shown[i])
            for i, (d, v) in enumerate(zip(made, self.variants))
        ]
        try:
            _for_each(runs, write_run)
            failpoints.point("batch.create_dirs")
            records.write_same_status([r.run_dir for r in runs], status, self.exp_dir)
        except BaseException:  # Ctrl-C, a full disk: no half-made directory stays behind
            for d in made:
                shutil.rmtree(d, ignore_errors=True)
            try:
                self.exp_dir.rmdir()  # when this launch made it
            except OSError:
                pass
            raise
        self.runs.extend(runs)

    def remove_dirs(self) -> None:
        """Undo :meth:`create_dirs` after a failed submission: no half-made state is left."""
        for run in self.runs:
            shutil.rmtree(run.run_dir, ignore_errors=True)
        shutil.rmtree(self.sweep_dir, ignore_errors=True)
        self.runs = []
        for empty in (self.sweep_dir.parent, self.exp_dir):  # made by this launch, now empty
            try:
                empty.rmdir()
            except OSError:
                pass

    # -- payloads and manifests ----------------------------------------------------------
    def code_dirs(self) -> List[str]:
        """Code dirs: option, else CODE_DIRS_TO_MOUNT, else the launch script's repository."""
        dirs = self.options.get("code_dirs_to_mount") or self.settings.get("CODE_DIRS_TO_MOUNT")
        if dirs:
            return [str(d) for d in dirs]
        script_dir = launch_script_dir()
        if script_dir is None:
            return []
        return [repo_root(script_dir) or script_dir]

    def doodad_config(self) -> DoodadConfig:
        """The DoodadConfig template; the runner fills in base_log_dir where it runs."""
        extra = {"base_exp_name": self.base_exp_name, "mode": self.mode_name, "batch_id": self.batch_id}
        extra.update(self.options.get("extra_launch_info") or {})
        return DoodadConfig(
            exp_name=self.exp_name,
            base_log_dir=str(self.exp_dir),
            use_gpu=bool(self.options.get("use_gpu")),
            gpu_id=self.options.get("gpu_id", 0),
            git_infos=list(self.git_infos or []),
            script_name=" ".join(sys.argv),
            extra_launch_info=extra,
        )

    def materialize(self) -> None:
        """Capture git state, then write every run's payload (0600), patches and manifest."""
        with self._lock:
            if self._materialized:
                return
            if self.git_infos is None:
                self.git_infos = capture_git_infos(self.code_dirs())
            config = self.doodad_config()
            # the entries shared by every manifest are JSON-encoded once, not once per run
            common_entries = _json_entries(self._manifest_common())
            patches = patch_files(self.git_infos)
            names = list(patches)
            git_patches = list(zip(names[0::2], names[1::2]))  # (diff, staged diff) per GitInfo
            # the diffs travel as the run's git/ files, not inside each payload
            config = config._replace(
                git_infos=[g._replace(code_diff="", code_diff_staged="") for g in config.git_infos]
            )
            first_git_dir: Optional[Path] = None
            # tracebacks of by-value code name the launch script (cloudpickle 3 blanks it)
            files = code_files(self.fn, self.code_dirs()) if self.transport == VALUE else None

            def write_run(run: RunSpec) -> None:
                data = build_payload(
                    self.fn_blob,
                    run.variant_blob,
                    config._replace(base_log_dir=str(run.run_dir)),
                    sys_path=self.payload_sys_path,
                    snapshot=self.payload_snapshot,
                    git_patches=git_patches,
                    extra=self.payload_extra(),
                    transport=self.transport,
                    code_files=files,
                    kept_snapshot=self.kept_snapshot,
                )
                if self.early_start:
                    records.atomic_write_bytes(run.payload_path, data, records.PRIVATE_MODE)
                else:  # nobody reads it before launch() returns: one plain, private write
                    fd = os.open(run.payload_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, records.PRIVATE_MODE)
                    with os.fdopen(fd, "wb") as f:
                        f.write(data)
                if patches:
                    git_dir = run.run_dir / records.GIT_DIR
                    git_dir.mkdir(exist_ok=True)
                    for name, text in patches.items():
                        target = git_dir / name
                        if first_git_dir is None:
                            target.write_text(text)
                        else:
                            try:
                                os.link(first_git_dir / name, target)
                            except OSError:
                                shutil.copyfile(first_git_dir / name, target)
                entries = dict(common_entries)
                entries.update(
                    _json_entries(
                        dict(
                            index=run.index,
                            run_name=run.name,
                            run_dir=str(run.run_dir),
                            variant=redact_secrets(run.shown_variant),
                            backend={**self.backend_common, **self.backend.get(run.index, {})},
                        ),
                        compact=True,
                    )
                )
                records.atomic_write_bytes(run.run_dir / records.MANIFEST, _json_join(entries))

            if self.runs:
                # the first run writes the patch files, the others hard-link them
                write_run(self.runs[0])
                first_git_dir = self.runs[0].run_dir / records.GIT_DIR
                _for_each(self.runs[1:], write_run)
            self._materialized = True

    def record_launch(self, per_run: bool = True) -> None:
        """Write the batch's launch record (``.batches/<id>/launch.json``): what every run's
        manifest will say about the launch and its backend ids, before the manifests exist.

        A mode calls it once its runs may start (or were submitted) and before
        :meth:`materialize`: should the launcher die in between, the runs it leaves without a
        manifest are still listed, polled and cancellable (:func:`records.read_manifest` builds
        their manifest from this record) instead of running unseen. ``per_run``: the per-run
        backend facts are needed to poll or cancel a run (Slurm task ids, pids), not only the
        shared ones (a dispatcher's supervisor file).
        """
        from .liveness import identity

        record = {
            "manifest": {
                "easylaunch_version": __version__,
                "exp_name": self.exp_name,
                "base_exp_name": self.base_exp_name,
                "mode": self.mode_name,
                "options": _scrub_secrets(
                    {
                        k: (v if not isinstance(v, os.PathLike) else os.fspath(v))
                        for k, v in self.options.items()
                    }
                ),
                "ignored_options": _jsonable_options(self.ignored_options),
                "batch_id": self.batch_id,
                "batch_size": len(self.runs),
                "function": f"{getattr(self.fn, '__module__', '?')}.{getattr(self.fn, '__qualname__', repr(self.fn))}",
                "host": records.hostname(),
                "command": redact_argv(sys.argv),
                "launched": self.created,
            },
            "backend_common": self.backend_common,
            "backend": {str(i): facts for i, facts in self.backend.items()} if per_run else {},
            "launcher": identity(),
        }
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        data = json.dumps(record, sort_keys=True, default=repr).encode()  # one line: large sweeps
        records.atomic_write_bytes(self.sweep_dir / records.LAUNCH_RECORD, data + b"\n")

    def payload_extra(self) -> dict:
        """Per-run settings the runner reads from the payload header (``timeout``,
        ``cancel_grace``: the option, else config CANCEL_GRACE when it is not the default;
        ``monitor``: the sampling period when it is not the default)."""
        extra = {}
        timeout = self.options.get("timeout")
        if timeout:
            extra["timeout"] = float(timeout)
        grace = self.cancel_grace()
        if grace != DEFAULT_CANCEL_GRACE:
            extra["cancel_grace"] = grace
        monitor = self.options.get("monitor")
        if monitor is not None and float(monitor) != DEFAULT_MONITOR_PERIOD:
            extra["monitor"] = float(monitor)
        if self.gpu_request is not None:
            extra["gpu"] = self.gpu_request
        return extra

    def cancel_grace(self) -> float:
        """Seconds between a cancel (or the timeout's interrupt) and the kill."""
        return cancel_grace(self.options, self.settings)

    def _manifest_common(self) -> dict:
        options = _scrub_secrets(
            {k: (v if not isinstance(v, os.PathLike) else os.fspath(v)) for k, v in self.options.items()}
        )
        return {
            "easylaunch_version": __version__,
            "exp_name": self.exp_name,
            "base_exp_name": self.base_exp_name,
            "mode": self.mode_name,
            "options": options,
            "ignored_options": _jsonable_options(self.ignored_options),
            "config_file": str(self.settings.source) if self.settings.source else None,
            "batch_id": self.batch_id,
            "batch_size": len(self.runs),
            "function": f"{getattr(self.fn, '__module__', '?')}.{getattr(self.fn, '__qualname__', repr(self.fn))}",
            "git": [
                {
                    "directory": g.directory,
                    "commit_hash": g.commit_hash,
                    "branch_name": g.branch_name,
                    "dirty": bool(g.code_diff or g.code_diff_staged),
                }
                for g in (self.git_infos or [])
            ],
            "code_snapshot": _snapshot_entry(self.payload_snapshot or self.kept_snapshot),
            "relaunch_of": self.relaunch_of,
            "python": sys.version.split()[0],
            "python_minor": python_version(),
            "target_python": self.target_python,
            "transport": self.transport,
            "executable": sys.executable,
            "packages": package_versions(),
            "host": records.hostname(),
            "user": _user(),
            "cwd": os.getcwd(),
            "command": redact_argv(sys.argv),
            "launched": self.created,
            "launched_iso": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.created)),
        }


def _snapshot_entry(info: Optional[dict]) -> Optional[dict]:
    """What a manifest says of the code snapshot: its id, archive, roots, size (or None)."""
    if not info:
        return None
    return {
        "id": info.get("id"),
        "archive": info.get("archive"),
        "roots": [r.get("source") or r.get("name") for r in info.get("roots") or []],
        "files": info.get("files"),
        "bytes": info.get("bytes"),
    }


#: what CANCEL_GRACE defaults to (easylaunch.runner.DEFAULT_CANCEL_GRACE on the target side)
DEFAULT_CANCEL_GRACE = 10.0
#: the runner's resource sampling period when the payload names none (runner.DEFAULT_MONITOR_PERIOD)
DEFAULT_MONITOR_PERIOD = 1.0


def cancel_grace(options: Dict[str, Any], settings: Any) -> float:
    """``cancel_grace`` of a launch: the option, else config CANCEL_GRACE, else 10 s."""
    value = options.get("cancel_grace")
    if value is None:
        value = settings.get("CANCEL_GRACE") if settings is not None else None
    return float(DEFAULT_CANCEL_GRACE if value is None else value)


_scrub_secrets = scrub_secrets


def _jsonable_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """Options as the manifest shows them: paths as str, secret-looking keys left out."""
    return _scrub_secrets(
        {k: (os.fspath(v) if isinstance(v, os.PathLike) else v) for k, v in options.items()}
    )


#: large batches write their run directories from several threads when the filesystem is slow:
#: the first _PARALLEL_PROBE runs are written in order and timed, the rest go to
#: _PARALLEL_THREADS threads if a run took more than _PARALLEL_SLOW seconds
_PARALLEL_MIN = 64
_PARALLEL_PROBE = 32
_PARALLEL_SLOW = 0.0004
_PARALLEL_THREADS = 4
#: on a fast filesystem the work is CPU-bound: batches this large are split over forked processes
_FORK_MIN = 2000


def _forked(runs: List[RunSpec], work: Callable[[RunSpec], None]) -> None:
    """``work(run)`` for every run, split over one process per core (at most 4); the parent
    takes the first slice. A child's failure is re-raised here with its message. ``work`` must
    only write files (a child's changes to Python objects are not seen by the parent)."""
    n = min(os.cpu_count() or 1, 4)
    slices = [runs[i::n] for i in range(n)]
    children = []
    for part in slices[1:]:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            code = 0
            try:
                os.close(read_fd)
                for run in part:
                    work(run)
            except BaseException as exc:
                os.write(write_fd, f"{type(exc).__name__}: {exc}".encode(errors="replace")[:4000])
                code = 1
            finally:
                os._exit(code)
        os.close(write_fd)
        children.append((pid, read_fd))
    error: Optional[BaseException] = None
    try:
        for run in slices[0]:
            work(run)
    except BaseException as exc:
        error = exc
    for pid, read_fd in children:
        with os.fdopen(read_fd, "rb") as f:
            message = f.read().decode(errors="replace")
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0 and error is None:
            error = OSError(f"writing run directories failed: {message or f'exit status {status}'}")
    if error is not None:
        raise error


def _for_each(runs: List[RunSpec], work: Callable[[RunSpec], None]) -> None:
    """``work(run)`` for every run; for large batches on a slow filesystem, on a few threads.

    Creating a file is kernel time outside the GIL, and on some filesystems (ext4 without a
    journal, after many deletions) each new inode costs up to a millisecond; when files are
    cheap, threads only add GIL hand-offs, so they are used only once the first runs show that
    the filesystem is slow.
    """
    if len(runs) < _PARALLEL_MIN:
        for run in runs:
            work(run)
        return
    began = time.perf_counter()
    for run in runs[:_PARALLEL_PROBE]:
        work(run)
    rest = runs[_PARALLEL_PROBE:]
    if (time.perf_counter() - began) / _PARALLEL_PROBE < _PARALLEL_SLOW:
        if len(rest) >= _FORK_MIN and hasattr(os, "fork") and (os.cpu_count() or 1) > 1:
            _forked(rest, work)  # CPU-bound (encoding, pickling): one process per core
            return
        for run in rest:
            work(run)
        return
    from concurrent.futures import ThreadPoolExecutor

    stop = threading.Event()  # a failure or a Ctrl-C: the other threads stop at their next run

    def chunk(part: List[RunSpec]) -> None:
        for run in part:
            if stop.is_set():
                return
            work(run)

    pool = ThreadPoolExecutor(_PARALLEL_THREADS, thread_name_prefix="easylaunch-write")
    try:
        futures = [pool.submit(chunk, rest[i::_PARALLEL_THREADS]) for i in range(_PARALLEL_THREADS)]
        for future in futures:
            future.result()
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True)  # no thread writes once the caller cleans up


_JSON_SCALARS = (str, int, float, bool, type(None))


def _json_entries(obj: Dict[str, Any], compact: bool = False) -> Dict[str, str]:
    """Each top-level entry of ``obj`` as :func:`records.atomic_write_json` would write it;
    ``compact`` puts each value on one line (the C encoder: per-run entries of large batches)."""
    out = {}
    for key, value in obj.items():
        if compact or type(value) in _JSON_SCALARS:  # the C encoder only runs without indent
            out[key] = f" {json.dumps(key)}: {json.dumps(value, sort_keys=True, default=repr)}"
            continue
        text = json.dumps({key: value}, indent=1, sort_keys=True, default=repr)
        out[key] = text[2:-2]  # '{\n "key": value\n}' -> ' "key": value'
    return out


def _json_join(entries: Dict[str, str]) -> bytes:
    """The bytes :func:`records.atomic_write_json` writes for the dict of these entries."""
    return ("{\n" + ",\n".join(entries[k] for k in sorted(entries)) + "\n}\n").encode()


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())


def package_versions() -> Dict[str, str]:
    """Versions of the distributions behind the top-level modules imported right now."""
    from importlib import metadata

    versions: Dict[str, str] = {}
    wanted = {name.partition(".")[0] for name in list(sys.modules)}
    wanted |= {"cloudpickle", "easylaunch"}
    for top in sorted(wanted):
        if top.startswith("_") or top in sys.stdlib_module_names:
            continue
        try:
            versions[top] = metadata.version(top)
        except Exception:
            mod = sys.modules.get(top)
            version = getattr(mod, "__version__", None)
            if isinstance(version, str):
                versions[top] = version
    return versions
