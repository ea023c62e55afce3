"""Content-addressed code snapshots: runs execute the code as it was at launch.

At launch, :func:`create` packs the code dirs (git-tracked files as they are in the working
tree, plus untracked files git does not ignore) into a deterministic ``<sha>.tar.gz`` in a
store directory. The sha256 of the *content* (member names, modes and bytes) is the id, so
the same code is stored and uploaded once. On the target, the runner calls :func:`activate`
before unpickling the function: it finds the archive, unpacks it once per id into a cache
and puts the snapshot's roots at the front of ``sys.path``::

    info = snapshot.create(["/home/me/project"], Path("/logs/.snapshots"))
    # -> {"id": "3f2a...", "archive": "/logs/.snapshots/3f2a....tar.gz", "roots": [...], ...}
    header["snapshot"] = info                        # travels in the payload header
    ...
    snapshot.activate(info, Path("/logs/exp/run_000/payload.pkl"))   # on the target
    # -> ["~/.cache/easylaunch/snapshots/3f2a.../code/project", ".../lib"]

Layout of an archive (and of its unpacked directory)::

    code/<name>/...        one root per code dir (name = the dir's basename, made unique)
    lib/easylaunch/...     the easylaunch package itself, when include_easylaunch=True

A store is a plain directory of self-contained files (``<sha>.tar.gz``, ``.index.json``,
``unpack.py``) that can be rsync'ed anywhere. The runner looks for the archive at its
recorded absolute path, then in ``.snapshots/`` one and two levels above the payload's
directory, then in ``$EASYLAUNCH_SNAPSHOT_DIR``. A target without easylaunch installed can
start the runner from the snapshot itself::

    LIB=$(python .snapshots/unpack.py .snapshots/<sha>.tar.gz)   # prints the lib root
    PYTHONPATH="$LIB" python -m easylaunch.runner RUN_DIR/payload.pkl

This module uses the standard library only, so that it also works as that stand-alone script.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import json
import os
import posixpath
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

FORMAT = 1
#: prefix of the content hash; change it when the hashed representation changes
_HASH_PREFIX = b"easylaunch-snapshot-1\n"
CODE_DIR = "code"
LIB_DIR = "lib"
INDEX_NAME = ".index.json"
BOOTSTRAP_NAME = "unpack.py"
MARKER_NAME = ".easylaunch-snapshot.json"
#: a non-git code dir (or the untracked, non-ignored part of a git one) larger than this is refused
DEFAULT_MAX_MB = 200
#: directories never taken from a non-git dir, nor as untracked files of a git repository
SKIP_DIRS = frozenset({"__pycache__", ".git", ".venv", "venv", "node_modules", ".snapshots"})
SKIP_SUFFIXES = (".pyc", ".pyo")
#: files whose mtime/ctime are this recent are hashed but not cached (same-tick edits)
_RACY_NS = 2_000_000_000
#: file contents kept in memory between hashing and archiving (beyond it: re-read and verified)
_MEMORY_BUDGET = 256 << 20
_ID_RE = re.compile(r"^[0-9a-f]{64}$")
#: a snapshot larger than this (MB, ``$EASYLAUNCH_SNAPSHOT_WARN_MB``) is shipped with a warning
DEFAULT_WARN_MB = 50

#: file names that look like secrets: never snapshotted, even when git tracks them (a warning
#: names them); Python modules (``credentials.py``) are code, never secrets by name
SECRET_PATTERNS = tuple(
    """
    .env .env.* .envrc .netrc _netrc .pgpass .pypirc .npmrc .git-credentials .htpasswd
    credentials credentials.* *credentials*.json client_secret*.json service-account*.json
    secrets.* *.pem *.key *.p12 *.pfx *.jks *.keystore *.kdbx *.ppk id_rsa id_rsa.* id_dsa
    id_dsa.* id_ecdsa id_ecdsa.* id_ed25519 id_ed25519.*
    """.split()
)
#: directories that hold credentials: nothing under them is snapshotted
SECRET_DIRS = (".ssh", ".aws", ".gnupg", ".docker", ".kube", ".azure")
#: look like secrets by name but are templates meant to be shared
SECRET_TEMPLATES = (".env.example", ".env.sample", ".env.template", ".env.dist", "*.example", "*.sample")
#: caches and experiment outputs: left out silently when git does not track them (the whole
#: of a non-git dir is untracked)
CACHE_PATTERNS = tuple(
    """
    .mypy_cache .pytest_cache .ruff_cache .ipynb_checkpoints .tox .nox .hypothesis .eggs
    *.egg-info .cache .DS_Store .coverage .coverage.* wandb mlruns lightning_logs outputs
    multirun easylaunch-logs .env
    """.split()
)
#: large data: left out when git does not track it, with a warning naming the files;
#: ``SNAPSHOT_INCLUDE`` takes one back
DATA_PATTERNS = tuple(
    """
    *.pt *.pth *.ckpt *.safetensors *.onnx *.h5 *.hdf5 *.npy *.npz *.parquet *.feather
    *.tfrecord *.tfrecords *.mdb *.zip *.tar *.tar.gz *.tgz *.7z *.mp4 *.avi *.mkv
    """.split()
)
#: the start of a PEM or OpenSSH private key: such a file is left out whatever its name
_PRIVATE_KEY_RE = re.compile(rb"\A\s*-----BEGIN ([A-Z0-9 ]+ )?PRIVATE KEY-----")


class SnapshotError(RuntimeError):
    """A snapshot cannot be created or an archive is damaged, tampered with or unsafe."""


@dataclass
class _Entry:
    name: str  # member name in the archive, "/"-separated
    path: str  # absolute source path
    kind: str  # "f" regular file, "l" symbolic link
    mode: int  # 0o644 / 0o755 for files, 0o777 for links
    size: int
    key: Tuple[int, int, int, int]  # (size, mtime_ns, ino, ctime_ns) for the hash cache
    recent: bool  # modified within _RACY_NS of the scan: do not cache its hash
    digest: Optional[bytes] = None
    data: Optional[bytes] = None
    link: Optional[str] = None


# -- content id ---------------------------------------------------------------------------


def _content_id(entries: Sequence[Tuple[str, str, int, bytes]]) -> str:
    """sha256 over sorted ``(name, kind, mode, sha256(bytes or link target))``."""
    h = hashlib.sha256(_HASH_PREFIX)
    for name, kind, mode, digest in sorted(entries):
        h.update(os.fsencode(name) + b"\0" + f"{kind}{mode:o}".encode() + b"\0" + digest)
    return h.hexdigest()


def _norm_mode(st_mode: int) -> int:
    return 0o755 if st_mode & 0o111 else 0o644


def _mb_env(name: str, default: int) -> int:
    try:
        return int(float(os.environ.get(name, default)) * (1 << 20))
    except ValueError:
        return default << 20


def _max_bytes() -> int:
    return _mb_env("EASYLAUNCH_SNAPSHOT_MAX_MB", DEFAULT_MAX_MB)


def _glob_re(patterns: Iterable[str]) -> Optional["re.Pattern[str]"]:
    """One compiled regex for fnmatch-style ``patterns`` (None when there are none)."""
    import fnmatch

    patterns = [str(p).strip("/") for p in patterns if str(p).strip("/")]
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns)) if patterns else None


class Rules:
    """What a snapshot leaves out (see :data:`SECRET_PATTERNS`, :data:`CACHE_PATTERNS`, :data:`DATA_PATTERNS`)::

        rules = Rules(exclude=["scratch/*"], include=["assets/*.npy"])
        rules.verdict("config/.env", tracked=True)       # -> "secret"
        rules.verdict("assets/emb.npy", tracked=False)   # -> None (included back)
        rules.verdict("data/big.npy", tracked=False)     # -> "data"
        rules.verdict("wandb/run-1/log.txt", tracked=False)   # -> "excluded"

    Untracked caches and ``exclude`` matches are ``"excluded"`` (silently), untracked data
    files ``"data"`` (warned), secrets ``"secret"`` whether tracked or not. ``include`` takes a
    file back from any name rule, secrets included (an explicit choice). A pattern with ``/``
    matches the whole relative path (``*`` crosses ``/``); without, one name in the path.
    """

    def __init__(self, exclude: Iterable[str] = (), include: Iterable[str] = ()):
        exclude, include = list(exclude), list(include)
        self._secret = _glob_re(SECRET_PATTERNS)
        self._secret_dirs = frozenset(SECRET_DIRS)
        self._template = _glob_re(SECRET_TEMPLATES)
        self._data = _glob_re(DATA_PATTERNS)
        self._names = _glob_re([*CACHE_PATTERNS, *(p for p in exclude if "/" not in p.strip("/"))])
        self._paths = _glob_re([p for p in exclude if "/" in p.strip("/")])
        self._include = _glob_re(include)
        self._include_names = _glob_re([p for p in include if "/" not in p.strip("/")])
        self._cache: Dict[Tuple[str, bool], bool] = {}

    def _name(self, kind: str, name: str, last: bool) -> bool:
        key = (f"{kind}:{name}", last)
        hit = self._cache.get(key)
        if hit is None:
            if kind == "secret" and not last:
                hit = name in self._secret_dirs
            elif kind == "secret":
                hit = (
                    not name.endswith(".py")
                    and bool(self._secret.match(name))
                    and not self._template.match(name)
                )
            elif kind == "data":
                hit = last and bool(self._data.match(name))
            else:
                hit = bool(self._names and self._names.match(name))
            self._cache[key] = hit
        return hit

    def verdict(self, rel: str, tracked: bool) -> Optional[str]:
        """``"secret"``, ``"data"``, ``"excluded"`` or None (kept) for the file ``rel`` of a code dir."""
        parts = rel.split("/")
        last = len(parts) - 1
        if self._include and (
            self._include.match(rel)
            or (self._include_names and any(self._include_names.match(p) for p in parts))
        ):
            return None
        if any(self._name("secret", p, i == last) for i, p in enumerate(parts)):
            return "secret"
        if tracked:
            return None
        if any(self._name("cache", p, i == last) for i, p in enumerate(parts)):
            return "excluded"
        if self._paths and self._paths.match(rel):
            return "excluded"
        if self._name("data", parts[last], True):
            return "data"
        return None


def _left_out_warning(source: str, kind: str, names: List[str]) -> None:
    names = sorted(names)
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    count = f"{len(names)} file" + ("s" if len(names) != 1 else "")
    if kind == "secret":
        what = "that look like secrets or keys (never shipped)"
        fix = "keep secrets out of code dirs (environment variables, a secrets manager)"
    else:
        what = "untracked data or cache files"
        fix = "commit them to git or list them in SNAPSHOT_INCLUDE to ship them"
    warnings.warn(f"snapshot: left out {count} {what} of {source}: {shown}; {fix}", stacklevel=3)


def _skipped(rel: str) -> bool:
    """True for caches and environments that are never code (``__pycache__``, ``.venv``, ...)."""
    parts = rel.split("/")
    return rel.endswith(SKIP_SUFFIXES) or any(p in SKIP_DIRS for p in parts[:-1])


# -- listing the files of a code dir ------------------------------------------------------


def _git(directory: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", *args],
        cwd=directory,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "LC_ALL": "C"},
    )


def _git_list(directory: str) -> Optional[Tuple[str, List[Tuple[str, bool]]]]:
    """``(repo top, [(path relative to directory, tracked)])`` or None outside a git work tree."""
    try:
        top = _git(directory, "rev-parse", "--show-toplevel")
    except FileNotFoundError:
        if any((Path(p) / ".git").exists() for p in (Path(directory), *Path(directory).parents)):
            warnings.warn(
                f"git is not installed: snapshotting {directory} as a plain directory "
                "(.gitignore is not applied)",
                stacklevel=4,
            )
        return None
    if top.returncode != 0:
        if b"dubious ownership" in top.stderr:
            raise SnapshotError(
                f"git refuses to read {directory}: {top.stderr.decode(errors='replace').strip()}"
            )
        return None
    proc = _git(directory, "ls-files", "-z", "-t", "-c", "-o", "--exclude-standard")
    if proc.returncode != 0:
        raise SnapshotError(
            f"git ls-files failed in {directory}: {proc.stderr.decode(errors='replace').strip()}"
        )
    files: List[Tuple[str, bool]] = []
    seen = set()
    for item in proc.stdout.split(b"\0"):
        if len(item) < 3:
            continue
        tag, rel = item[:1], os.fsdecode(item[2:])
        if rel in seen or rel in ("./", "."):  # unmerged paths come once per stage
            continue
        seen.add(rel)
        files.append((rel, tag != b"?"))
    return os.fsdecode(top.stdout.rstrip(b"\n")), files


def _walk(directory: str, rel_prefix: str = "") -> Iterator[str]:
    """Every file and symlink under ``directory`` (relative names), minus caches and envs."""
    for dirpath, dirnames, filenames in os.walk(directory):
        rel_dir = os.path.relpath(dirpath, directory)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        keep = []
        for d in dirnames:
            if d in SKIP_DIRS:
                continue
            if os.path.islink(os.path.join(dirpath, d)):
                yield rel_prefix + rel_dir + d  # a link to a directory is stored as a link
            else:
                keep.append(d)
        dirnames[:] = sorted(keep)
        for f in filenames:
            if not f.endswith(SKIP_SUFFIXES):
                yield rel_prefix + rel_dir + f


def _list_code_dir(directory: str) -> Tuple[Optional[str], Iterable[Tuple[str, bool]]]:
    """``(repo top or None, (relative name, tracked)...)`` for one code dir, nested repos included.

    Outside git the listing is lazy, so that the caller's size limit stops a huge walk early.
    """
    listed = _git_list(directory)
    if listed is None:
        return None, ((rel, False) for rel in _walk(directory))
    top, raw = listed
    files: List[Tuple[str, bool]] = []
    for rel, tracked in raw:
        full = os.path.join(directory, rel)
        if rel.endswith("/") or os.path.isdir(full) and not os.path.islink(full):
            # a submodule (tracked gitlink) or an untracked nested repository: list it with its
            # own git; an uninitialized submodule (no .git of its own) is empty
            rel = rel.rstrip("/")
            if _skipped(rel + "/x") or not os.path.exists(os.path.join(full, ".git")):
                continue
            _top, sub = _list_code_dir(full)
            files.extend((f"{rel}/{r}", t) for r, t in sub)
        elif tracked or not _skipped(rel):
            files.append((rel, tracked))
    return top, files


def _easylaunch_files() -> Tuple[str, List[str]]:
    """The installed easylaunch package directory and its files (modules, templates, data)."""
    pkg = os.path.dirname(os.path.abspath(__file__))
    return pkg, [rel for rel in _walk(pkg) if not rel.split("/")[-1].startswith(".")]


def _import_subdirs(source: str, names: set) -> List[str]:
    """Subdirs of ``source`` the launcher imports from (``src/`` layouts, extra sys.path entries).

    Taken from ``sys.path`` entries and from the import roots of already-imported modules that
    lie inside ``source`` and hold at least one snapshot file.
    """
    src = os.path.realpath(source)
    prefix = src + os.sep
    found: List[str] = []

    def add(path: str) -> None:
        real = os.path.realpath(path)
        if real.startswith(prefix):
            rel = os.path.relpath(real, src).replace(os.sep, "/")
            if rel not in found and any(n.startswith(rel + "/") for n in names):
                found.append(rel)

    for p in sys.path:
        add(p or os.getcwd())
    for modname, mod in list(sys.modules.items()):
        file = getattr(mod, "__file__", None)
        if not isinstance(file, str) or modname == "__main__" or not os.path.isabs(file):
            continue
        if not (file.startswith(prefix) or os.path.realpath(file).startswith(prefix)):
            continue
        parts = modname.split(".")
        is_pkg = os.path.basename(file).startswith("__init__.")
        root = os.path.dirname(os.path.realpath(file))
        for _ in range(len(parts) - (0 if is_pkg else 1)):
            root = os.path.dirname(root)
        first = os.path.relpath(os.path.realpath(file), root).split(os.sep)[0]
        if first == parts[0] or first.startswith(parts[0] + "."):
            add(root)
    return found


# -- hash cache ---------------------------------------------------------------------------


def _load_index(store: Path) -> Dict[str, list]:
    try:
        with open(store / INDEX_NAME, "rb") as f:
            data = json.loads(f.read())
        if data.get("format") == FORMAT and isinstance(data.get("files"), dict):
            return data["files"]
    except (OSError, ValueError, AttributeError):
        pass
    return {}


# -- create -------------------------------------------------------------------------------


def _stat_entries(items: List[Tuple[str, str, bool]], now_ns: int) -> List[_Entry]:
    """Stat ``(member name, absolute path, tracked)``; vanished (deleted tracked) files are skipped."""
    entries: List[_Entry] = []
    for name, path, _tracked in items:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue  # tracked but deleted in the working tree
        except OSError as exc:
            raise SnapshotError(f"cannot read {path}: {exc}") from exc
        recent = max(st.st_mtime_ns, st.st_ctime_ns) > now_ns - _RACY_NS
        key = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
        if stat.S_ISREG(st.st_mode):
            entries.append(_Entry(name, path, "f", _norm_mode(st.st_mode), st.st_size, key, recent))
        elif stat.S_ISLNK(st.st_mode):
            target = os.readlink(path)
            root_name = "/".join(name.split("/")[:2])  # code/<name> or lib/easylaunch
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
            inside = not target.startswith("/") and resolved.startswith(root_name + "/")
            if inside:
                entries.append(_Entry(name, path, "l", 0o777, 0, key, recent, link=target))
                continue
            # a link leaving its code dir: ship a copy of the file it points to
            try:
                tst = os.stat(path)
            except OSError:
                warnings.warn(f"snapshot: skipping dangling symlink {path}", stacklevel=4)
                continue
            if stat.S_ISREG(tst.st_mode):
                tkey = (tst.st_size, tst.st_mtime_ns, tst.st_ino, tst.st_ctime_ns)
                trecent = max(tst.st_mtime_ns, tst.st_ctime_ns) > now_ns - _RACY_NS
                entries.append(
                    _Entry(
                        name, os.path.realpath(path), "f", _norm_mode(tst.st_mode), tst.st_size, tkey, trecent
                    )
                )
            else:
                warnings.warn(
                    f"snapshot: skipping {path}: a symlink to a directory outside its code dir",
                    stacklevel=4,
                )
    return entries


def _hash_entries(entries: List[_Entry], index: Dict[str, list]) -> Tuple[int, bool]:
    """Fill each entry's digest from the index or by reading it; returns (bytes read, index changed)."""
    kept = 0
    read = 0
    changed = False
    for e in entries:
        if e.kind == "l":
            e.digest = hashlib.sha256(os.fsencode(e.link or "")).digest()
            continue
        cached = index.get(e.path)
        if cached is not None and tuple(cached[:4]) == e.key:
            e.digest = bytes.fromhex(cached[4])
            continue
        try:
            with open(e.path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise SnapshotError(f"cannot read {e.path}: {exc}") from exc
        read += len(data)
        if _PRIVATE_KEY_RE.match(data[:256]):
            e.kind = "x"  # a private key under an innocent name: left out, never indexed
            continue
        e.size = len(data)
        e.digest = hashlib.sha256(data).digest()
        if kept + len(data) <= _MEMORY_BUDGET:
            e.data = data
            kept += len(data)
        if not e.recent:
            index[e.path] = [*e.key, e.digest.hex()]
            changed = True
        elif e.path in index:
            del index[e.path]
            changed = True
    return read, changed


class _Changed(Exception):
    """A file changed between hashing and archiving."""

    def __init__(self, path: str):
        super().__init__(path)
        self.path = path


def _write_archive(entries: List[_Entry], final: Path) -> None:
    """Write a deterministic tar.gz of ``entries`` to ``final`` atomically, never overwriting it."""
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".tmp-{final.name[:12]}-", suffix=".tar.gz")
    try:
        with os.fdopen(fd, "wb") as raw:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=6, mtime=0) as gz:
                with tarfile.TarFile(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                    for e in sorted(entries, key=lambda e: e.name):
                        info = tarfile.TarInfo(e.name)
                        info.mtime = 0
                        info.uid = info.gid = 0
                        info.uname = info.gname = ""
                        info.mode = e.mode
                        if e.kind == "l":
                            info.type = tarfile.SYMTYPE
                            info.linkname = e.link or ""
                            tar.addfile(info)
                        elif e.data is not None:
                            info.size = len(e.data)
                            tar.addfile(info, io.BytesIO(e.data))
                        else:  # hashed from the cache or beyond the memory budget: re-read, check
                            try:
                                with open(e.path, "rb") as f:
                                    data = f.read()
                            except OSError:
                                raise _Changed(e.path) from None
                            if hashlib.sha256(data).digest() != e.digest:
                                raise _Changed(e.path)
                            info.size = len(data)
                            tar.addfile(info, io.BytesIO(data))
                            del data
            raw.flush()
            os.fsync(raw.fileno())
        try:
            os.link(tmp, final)  # fails if another launcher stored the same content meanwhile
        except FileExistsError:
            pass
        except OSError:  # file systems without hard links
            if not final.exists():
                os.replace(tmp, final)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _excluded_prefixes(real_source: str, store_real: str) -> Tuple[str, ...]:
    """Relative prefixes never snapshotted: the store, and the log dir a ``.snapshots`` store is in."""
    out = []
    candidates = [store_real]
    if os.path.basename(store_real) == ".snapshots":
        candidates.append(os.path.dirname(store_real))
    for c in candidates:
        if c.startswith(real_source + os.sep):
            out.append(os.path.relpath(c, real_source).replace(os.sep, "/") + "/")
    return tuple(out)


def create(
    code_dirs: Sequence[str],
    store: Path,
    include_easylaunch: bool = True,
    exclude: Sequence[str] = (),
    include: Sequence[str] = (),
) -> dict:
    """Snapshot ``code_dirs`` into ``store/<sha>.tar.gz`` and describe it (JSON-able dict).

    Each code dir contributes its git-tracked files as they are in the working tree
    (uncommitted edits included, deleted files left out) plus the untracked files git does not
    ignore; a code dir outside git contributes all its files. ``__pycache__``, ``*.pyc`` and
    ``.venv``/``venv``/``node_modules``/``.snapshots`` are skipped unless git tracks them, and
    so are caches, experiment outputs and data files (:data:`CACHE_PATTERNS`,
    :data:`DATA_PATTERNS`, ``exclude``); files that look like secrets or private keys are never shipped, tracked or
    not (:data:`SECRET_PATTERNS`, PEM/OpenSSH key contents); ``include`` patterns take files
    back from the name rules (see :class:`Rules`). Each left-out group is one warning. With
    ``include_easylaunch`` the easylaunch package is added under ``lib/`` so the target needs
    no installed easylaunch. The store is never snapshotted, nor the log dir holding a store
    named ``.snapshots`` (``<log dir>/.snapshots``) when it lies inside a code dir. The archive is written only if no archive of that content exists::

        info = create(["/home/me/project"], Path("/logs/.snapshots"))
        info["id"], info["archive"], info["files"]

    Returns ``{"format", "id", "archive", "archive_name", "roots": [{"name", "source", "repo",
    "path", "pythonpath", "subdirs"}], "easylaunch_root", "files", "bytes", "written"}``.
    Raises ValueError for a missing code dir or one too large (``$EASYLAUNCH_SNAPSHOT_MAX_MB``,
    default 200), SnapshotError when files keep changing while they are archived.
    """
    store = Path(os.path.abspath(os.path.expanduser(str(store))))
    now_ns = time.time_ns()
    items: List[Tuple[str, str, bool]] = []
    roots: List[dict] = []
    used_names: set = set()
    store_real = os.path.realpath(store)
    max_bytes = _max_bytes()
    rules = Rules(exclude, include)
    for d in code_dirs:
        source = os.path.abspath(os.path.expanduser(str(d)))
        if not os.path.isdir(source):
            raise ValueError(f"code dir {source} does not exist or is not a directory")
        if any(r["source"] == source for r in roots):
            continue
        base = os.path.basename(source.rstrip(os.sep)) or "root"
        name, n = base, 1
        while name in used_names:
            n += 1
            name = f"{base}-{n}"
        used_names.add(name)
        repo, files = _list_code_dir(source)
        skip = _excluded_prefixes(os.path.realpath(source), store_real)
        untracked_bytes = 0
        root_items = []
        left_out: Dict[str, List[str]] = {"secret": [], "data": [], "excluded": []}
        for rel, tracked in files:
            if skip and (rel + "/").startswith(skip):
                continue
            verdict = rules.verdict(rel, tracked)
            if verdict is not None:
                left_out[verdict].append(rel)
                continue
            path = os.path.join(source, rel)
            if not tracked:
                try:
                    untracked_bytes += os.lstat(path).st_size
                except OSError:
                    pass
                if untracked_bytes > max_bytes:
                    what = "untracked, non-ignored files of" if repo else "non-git code dir"
                    fix = (
                        "add the large files to .gitignore"
                        if repo
                        else "make it a git repository (git init) with a .gitignore for data and outputs"
                    )
                    raise ValueError(
                        f"snapshot: the {what} {source} exceed {max_bytes >> 20} MB; {fix}, pass "
                        "smaller code dirs (code_dirs_to_mount=...), or raise the limit with "
                        "$EASYLAUNCH_SNAPSHOT_MAX_MB"
                    )
            root_items.append((f"{CODE_DIR}/{name}/{rel}", path, tracked))
        for kind in ("secret", "data"):
            if left_out[kind]:
                _left_out_warning(source, kind, left_out[kind])
        if not root_items:
            warnings.warn(f"snapshot: code dir {source} has no files to ship", stacklevel=2)
        items.extend(root_items)
        roots.append(
            {
                "name": name,
                "source": source,
                "repo": repo,
                "path": f"{CODE_DIR}/{name}",
                "pythonpath": True,
                "subdirs": [],
            }
        )
    easylaunch_root = None
    if include_easylaunch:
        pkg, rels = _easylaunch_files()
        items.extend((f"{LIB_DIR}/easylaunch/{rel}", os.path.join(pkg, rel), True) for rel in rels)
        easylaunch_root = LIB_DIR

    store.mkdir(parents=True, exist_ok=True)
    index = _load_index(store)
    for attempt in range(3):
        entries = _stat_entries(items, now_ns)
        _read, changed = _hash_entries(entries, index)
        keys = [e for e in entries if e.kind == "x"]
        if keys and attempt == 0:
            _left_out_warning(
                ", ".join(r["source"] for r in roots), "secret", [os.path.basename(e.path) for e in keys]
            )
        entries = [e for e in entries if e.kind != "x"]
        sha = _content_id([(e.name, e.kind, e.mode, e.digest or b"") for e in entries])
        archive = store / f"{sha}.tar.gz"
        written = False
        if not archive.exists():
            try:
                _write_archive(entries, archive)
                written = True
            except _Changed as exc:
                index.pop(exc.path, None)
                for e in entries:  # do not trust the cache for a second attempt
                    index.pop(e.path, None)
                if attempt == 2:
                    raise SnapshotError(
                        f"snapshot: {exc.path} kept changing while it was archived; retry the launch"
                    ) from None
                now_ns = time.time_ns()
                continue
        break
    live = {e.path for e in entries}
    prefixes = tuple(r["source"].rstrip(os.sep) + os.sep for r in roots)
    stale = [p for p in index if p.startswith(prefixes) and p not in live] if prefixes else []
    for p in stale:
        del index[p]
    if changed or written or stale:
        from .records import atomic_write_bytes  # not at top: this file also runs stand-alone

        try:
            atomic_write_bytes(store / INDEX_NAME, json.dumps({"format": FORMAT, "files": index}).encode())
        except OSError:
            pass  # only a cache
    if include_easylaunch:
        _install_bootstrap(store)
    total = sum(e.size for e in entries)
    warn_bytes = _mb_env("EASYLAUNCH_SNAPSHOT_WARN_MB", DEFAULT_WARN_MB)
    if total > warn_bytes and written:
        biggest = sorted(entries, key=lambda e: -e.size)[:3]
        warnings.warn(
            f"snapshot: {total / (1 << 20):.0f} MB of code is shipped with every launch (largest: "
            + ", ".join(f"{e.name.split('/', 2)[-1]} {e.size / (1 << 20):.1f} MB" for e in biggest)
            + "); list data in SNAPSHOT_EXCLUDE or .gitignore and pass it as a mount instead "
            "($EASYLAUNCH_SNAPSHOT_WARN_MB sets this threshold)",
            stacklevel=2,
        )
    names = {e.name for e in entries}
    for r in roots:
        prefix = r["path"] + "/"
        r["subdirs"] = _import_subdirs(r["source"], {n[len(prefix) :] for n in names if n.startswith(prefix)})
    return {
        "format": FORMAT,
        "id": sha,
        "archive": str(archive),
        "archive_name": archive.name,
        "roots": roots,
        "easylaunch_root": easylaunch_root,
        "files": len(entries),
        "bytes": total,
        "written": written,
    }


def _install_bootstrap(store: Path) -> None:
    """Copy this file into the store as ``unpack.py`` (stand-alone unpacker for bundles)."""
    from .records import atomic_write_bytes

    try:
        data = Path(__file__).read_bytes()
        target = store / BOOTSTRAP_NAME
        try:
            if target.read_bytes() == data:
                return
        except OSError:
            pass
        atomic_write_bytes(target, data)
    except OSError:
        pass


# -- activate -----------------------------------------------------------------------------


def _check_info(info: dict) -> Tuple[str, str]:
    sha = str(info.get("id", ""))
    if not _ID_RE.match(sha):
        raise SnapshotError(f"invalid snapshot id {sha!r} in the payload")
    name = str(info.get("archive_name") or f"{sha}.tar.gz")
    if name != f"{sha}.tar.gz":
        raise SnapshotError(f"snapshot archive name {name!r} does not match its id {sha}")
    return sha, name


def locate(info: dict, payload_path: Path) -> Path:
    """The archive of ``info``: its recorded path, else a bundle's ``.snapshots``, else the env dir.

    Raises FileNotFoundError listing every place tried.
    """
    _sha, name = _check_info(info)
    payload_dir = Path(os.path.abspath(payload_path)).parent
    tried: List[Path] = []
    if info.get("archive"):
        tried.append(Path(info["archive"]))
    tried += [payload_dir.parent / ".snapshots" / name, payload_dir.parent.parent / ".snapshots" / name]
    env = os.environ.get("EASYLAUNCH_SNAPSHOT_DIR")
    if env:
        tried.append(Path(env).expanduser() / name)
    for p in tried:
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"code snapshot {name} not found; tried: "
        + ", ".join(str(p) for p in tried)
        + ". Copy the launch's .snapshots directory next to the experiment directory, or set "
        "$EASYLAUNCH_SNAPSHOT_DIR to a directory holding the archive"
    )


def cache_dir() -> Path:
    """Where archives are unpacked: ``$EASYLAUNCH_SNAPSHOT_CACHE``, else
    ``$XDG_CACHE_HOME/easylaunch/snapshots`` (default ``~/.cache/...``); :func:`unpack` falls
    back to ``$TMPDIR/easylaunch-<uid>/snapshots`` when that is not writable."""
    env = os.environ.get("EASYLAUNCH_SNAPSHOT_CACHE")
    if env:
        return Path(os.path.abspath(os.path.expanduser(env)))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.path.abspath(base)) / "easylaunch" / "snapshots"


def _safe_name(name: str, archive: Path) -> None:
    parts = name.split("/")
    if (
        not name
        or name.startswith("/")
        or "\0" in name
        or "\\" in name
        or any(p in ("", ".", "..") for p in parts)
        or re.match(r"^[A-Za-z]:", name)
    ):
        raise SnapshotError(f"refusing unsafe member {name!r} in snapshot archive {archive}")


class _Writer:
    """Write extracted files from a few threads: creating files is what unpacking waits for
    (about 0.5 ms each on a local disk, more on NFS home directories)."""

    IN_FLIGHT = 64 << 20

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(8, thread_name_prefix="easylaunch-unpack")
        self.pending: List[Tuple[Future, int]] = []
        self.in_flight = 0
        self.dirs: set = set()

    def _mkparent(self, target: str) -> None:
        parent = os.path.dirname(target)
        if parent not in self.dirs:
            os.makedirs(parent, exist_ok=True)
            self.dirs.add(parent)

    def _write(self, target: str, data: bytes, mode: int) -> None:
        self._mkparent(target)
        # read-only files: a run must not edit code shared with the other runs of its snapshot
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode & 0o555)
        with os.fdopen(fd, "wb") as out:
            out.write(data)

    def submit(self, target: str, data: bytes, mode: int) -> None:
        self.pending.append((self.pool.submit(self._write, target, data, mode), len(data)))
        self.in_flight += len(data)
        while self.in_flight > self.IN_FLIGHT or len(self.pending) > 4096:
            future, size = self.pending.pop(0)
            future.result()
            self.in_flight -= size

    def symlink(self, link: str, target: str) -> None:
        self._mkparent(target)
        os.symlink(link, target)

    def close(self) -> None:
        """Wait for every write; re-raise the first failure."""
        try:
            for future, _size in self.pending:
                future.result()
        finally:
            self.pool.shutdown(wait=True)
            self.pending = []


def _extract_verified(archive: Path, dest: Path, sha: str) -> int:
    """Extract ``archive`` into the empty dir ``dest``, refusing unsafe members; check the content id."""
    entries: List[Tuple[str, str, int, bytes]] = []
    links: set = set()
    seen: set = set()
    writer = _Writer()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for m in tar:
                name = m.name
                _safe_name(name, archive)
                if m.isdir():
                    continue
                parents = name.split("/")[:-1]
                for i in range(1, len(parents) + 1):
                    if "/".join(parents[:i]) in links:
                        raise SnapshotError(
                            f"refusing member {name!r} below a symlink in snapshot archive {archive}"
                        )
                if name in seen:
                    raise SnapshotError(f"refusing duplicate member {name!r} in snapshot archive {archive}")
                seen.add(name)
                target = os.path.join(dest, *name.split("/"))
                if m.isreg():
                    data = tar.extractfile(m).read()  # type: ignore[union-attr]
                    mode = _norm_mode(m.mode)
                    entries.append((name, "f", mode, hashlib.sha256(data).digest()))
                    writer.submit(target, data, mode)
                elif m.issym():
                    link = m.linkname
                    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), link))
                    if link.startswith("/") or resolved == ".." or resolved.startswith("../"):
                        raise SnapshotError(
                            f"refusing symlink {name!r} -> {link!r} leaving snapshot archive {archive}"
                        )
                    writer.symlink(link, target)
                    links.add(name)
                    entries.append((name, "l", 0o777, hashlib.sha256(os.fsencode(link)).digest()))
                else:
                    raise SnapshotError(
                        f"refusing member {name!r} of unsupported type in snapshot archive {archive}"
                    )
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise SnapshotError(
            f"snapshot archive {archive} is damaged ({type(exc).__name__}: {exc}); "
            "copy it again from the launching machine or re-launch"
        ) from exc
    finally:
        writer.close()
    got = _content_id(entries)
    if got != sha:
        raise SnapshotError(
            f"snapshot archive {archive} does not hold the content it is named after "
            f"(content sha256 {got}, expected {sha}): it was modified or corrupted; "
            "copy it again from the launching machine or re-launch"
        )
    return len(entries)


def _clean_stale_tmp(parent: Path, max_age: float = 86400.0) -> None:
    now = time.time()
    try:
        for p in parent.glob(".tmp-*"):
            try:
                if now - p.stat().st_mtime > max_age:
                    shutil.rmtree(p, ignore_errors=True)
            except OSError:
                pass
    except OSError:
        pass


def unpack(archive: Path, sha: Optional[str] = None, cache: Optional[Path] = None) -> Path:
    """Unpack ``archive`` once into ``<cache>/<sha>/`` and return that directory.

    Safe when many processes unpack the same id at once: each extracts into its own temporary
    dir and renames it into place; the losers of the race use the winner's directory. The
    content is checked against ``sha`` (default: the archive's name) while extracting.
    """
    archive = Path(archive)
    sha = sha or archive.name[: -len(".tar.gz")]
    if not _ID_RE.match(sha):
        raise SnapshotError(f"invalid snapshot id {sha!r}")
    parent = Path(os.path.abspath(cache)) if cache is not None else cache_dir()
    final = parent / sha
    if (final / MARKER_NAME).is_file():
        return final
    try:
        parent.mkdir(parents=True, exist_ok=True)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(f"cannot write to the snapshot cache {parent}")
    except OSError:
        if cache is not None or os.environ.get("EASYLAUNCH_SNAPSHOT_CACHE"):
            raise
        # e.g. a read-only home directory on compute nodes
        parent = Path(tempfile.gettempdir()) / f"easylaunch-{os.getuid()}" / "snapshots"
        final = parent / sha
        if (final / MARKER_NAME).is_file():
            return final
        parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{sha[:12]}-", dir=parent))
    try:
        n = _extract_verified(archive, tmp, sha)
        marker = {"id": sha, "files": n, "archive": str(archive), "unpacked": time.time()}
        (tmp / MARKER_NAME).write_text(json.dumps(marker) + "\n")
        os.chmod(tmp, 0o755)
        for _attempt in range(3):
            try:
                os.rename(tmp, final)
                return final
            except OSError:
                if (final / MARKER_NAME).is_file():
                    return final  # another process won the race; its content is identical
                if not final.exists():
                    continue
                # a leftover without marker (interrupted manual copy...): move it aside
                aside = parent / f".tmp-broken-{sha[:12]}-{os.getpid()}-{time.monotonic_ns()}"
                try:
                    os.rename(final, aside)
                    shutil.rmtree(aside, ignore_errors=True)
                except OSError:
                    pass
        raise SnapshotError(f"could not move the unpacked snapshot into {final}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _purge_modules(sources: Sequence[str]) -> None:
    """Forget modules imported from the live code dirs, so that imports find the snapshot's copies."""
    prefixes = tuple({p for s in sources for p in (s + os.sep, os.path.realpath(s) + os.sep)})
    if not prefixes:
        return
    for modname, mod in list(sys.modules.items()):
        top = modname.partition(".")[0]
        if top in ("easylaunch", "cloudpickle", "__main__"):
            continue
        file = getattr(mod, "__file__", None)
        if isinstance(file, str) and file.startswith(prefixes):
            del sys.modules[modname]


def activate(info: dict, payload_path: Path) -> List[str]:
    """Make the snapshot ``info`` importable in this process; returns the sys.path entries added.

    Called by the runner on the target before it unpickles the function::

        paths = activate(header["snapshot"], Path("RUN_DIR/payload.pkl"))

    Finds the archive (see :func:`locate`), unpacks it once per id into :func:`cache_dir`
    (verifying its content), and puts each root with ``pythonpath`` (then its ``subdirs``), then
    the easylaunch root, at the front of ``sys.path``. Modules already imported from the live
    code dirs are forgotten (easylaunch and cloudpickle excepted). The working directory is not
    changed.
    """
    paths = import_paths(info, payload_path)
    _purge_modules([str(r["source"]) for r in info.get("roots") or [] if r.get("source")])
    for p in reversed(paths):
        while p in sys.path:
            sys.path.remove(p)
        sys.path.insert(0, p)
    importlib.invalidate_caches()
    return paths


def import_paths(info: dict, payload_path: Path) -> List[str]:
    """The directories :func:`activate` puts on ``sys.path`` (the archive unpacked first), in
    order; nothing else changes::

        import_paths(header["snapshot"], Path("RUN_DIR/payload.pkl"))
        # -> ["~/.cache/easylaunch/snapshots/3f2a.../code/proj", ...]
    """
    sha, _name = _check_info(info)
    archive = locate(info, payload_path)
    top = unpack(archive, sha)
    paths: List[str] = []
    for r in info.get("roots") or []:
        if not r.get("pythonpath", True):
            continue
        base = top.joinpath(*str(r.get("path") or f"{CODE_DIR}/{r['name']}").split("/"))
        _inside(base, top)
        paths.append(str(base))
        for sub in r.get("subdirs") or []:
            p = base.joinpath(*str(sub).split("/"))
            _inside(p, top)
            paths.append(str(p))
    if info.get("easylaunch_root"):
        p = top.joinpath(*str(info["easylaunch_root"]).split("/"))
        _inside(p, top)
        paths.append(str(p))
    return paths


def copy_of(info: dict, payload_path: Path, file: str, directory: bool = False) -> Optional[str]:
    """The snapshot's copy of ``file`` (a path on the launching machine inside one of its code
    dirs; with ``directory``, a directory, the code dir itself included), unpacked if need be;
    None when it is not in the snapshot or it is not here::

        copy_of(header["snapshot"], payload, "/home/me/proj/launch.py")
        # -> "~/.cache/easylaunch/snapshots/3f2a.../code/proj/launch.py"
    """
    for r in info.get("roots") or []:
        source = str(r.get("source") or "").rstrip(os.sep)
        if directory and source and file.rstrip(os.sep) == source:
            file = source + os.sep + "."
        if not source or not file.startswith(source + os.sep):
            continue
        try:
            sha, _name = _check_info(info)
            top = unpack(locate(info, payload_path), sha)
        except (OSError, SnapshotError):
            return None
        rel = file[len(source) + 1 :]
        path = top.joinpath(*str(r.get("path") or f"{CODE_DIR}/{r['name']}").split("/"), *rel.split(os.sep))
        inside = os.path.normpath(path).startswith(os.path.normpath(top) + os.sep)
        if inside and (path.is_dir() if directory else path.is_file()):
            return os.path.normpath(path)
        return None
    return None


def _inside(path: Path, top: Path) -> None:
    if os.path.normpath(path) != os.path.normpath(top) and not os.path.normpath(path).startswith(
        os.path.normpath(top) + os.sep
    ):
        raise SnapshotError(f"snapshot path {path} leaves the snapshot directory {top}")


def describe(info: Optional[dict]) -> str:
    """One line for logs, e.g. ``snapshot 3f2a9c01be77 (project; 2031 files, 4.2 MB) /logs/.snapshots/...``."""
    if not info:
        return "no code snapshot"
    roots = ", ".join(r.get("name", "?") for r in info.get("roots") or []) or "no code dirs"
    if info.get("easylaunch_root"):
        roots += " + easylaunch"
    size = info.get("bytes") or 0
    return (
        f"snapshot {str(info.get('id', '?'))[:12]} ({roots}; {info.get('files', '?')} files, "
        f"{size / 1e6:.1f} MB) {info.get('archive', info.get('archive_name', ''))}"
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python unpack.py ARCHIVE``: unpack (once) and print the directory to put on PYTHONPATH."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python unpack.py STORE/<sha>.tar.gz   (prints the easylaunch lib dir)", file=sys.stderr)
        return 2
    try:
        top = unpack(Path(args[0]))
    except (OSError, SnapshotError) as exc:
        print(f"easylaunch snapshot: {exc}", file=sys.stderr)
        return 1
    print(top / LIB_DIR if (top / LIB_DIR).is_dir() else top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
