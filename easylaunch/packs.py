"""Run directories packed into a few tar files: how bundles carry thousands of runs.

A cluster file system meters inodes and punishes small files, and a bundle is copied file by
file. So a bundle (modes ``sss`` and ``htp``) does not hold one directory per run: it holds a
handful of *packs*, uncompressed tar files of the runs' launch files (``payload.pkl``,
``manifest.json``, ``variant.json``, ``git/``), members named ``<run name>/<file>``. On the
cluster each task makes its own runs' directories from its pack just before it runs them::

    write_pack(bundle / "jobs/runs/pack_000.tar", [(run_dir.name, run_dir), ...])   # launcher
    unpack_runs(pack, [logs / "exp" / name for name in my_runs])                     # the task

A run directory that already has its payload is left alone (a requeued task, a second
attempt), so outputs are never overwritten; the payload is written last and atomically, so a
run directory with a payload is complete. Standard library only, Python 3.8+ (it runs on the
cluster from the bundle's easylaunch zip).
"""

from __future__ import annotations

import os
import tarfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

#: the launch files of a run that travel in a pack (plus the files of its ``git/`` dir)
PACKED_FILES = ("manifest.json", "variant.json", "payload.pkl")
PAYLOAD = "payload.pkl"
GIT_DIR = "git"
#: every member is readable by the owner only: payloads hold the variant (maybe a secret)
MODE = 0o600


class PackError(RuntimeError):
    """A pack is missing, damaged, or lacks a run it should hold."""


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


def _base_header() -> bytes:
    h = bytearray(512)
    h[100:108] = b"0000600\0"  # mode
    h[108:116] = h[116:124] = b"0000000\0"  # uid, gid
    h[148:156] = b"        "  # the checksum is computed with spaces in its place
    h[257:265] = b"ustar\x0000"
    return bytes(h)


_BASE = _base_header()
_BASE_SUM = sum(_BASE)


def _header(name: str, size: int, mtime: int, link: str = "") -> bytes:
    """The 512-byte ustar header of a regular file (or, with ``link``, a hard link to an earlier
    member), mode 0600: tarfile's own costs ~40 us a member and a bundle has tens of thousands.
    Names over 100 bytes, or not ASCII, get tarfile's PAX header instead."""
    raw = name.encode("utf-8", "surrogateescape")
    lraw = link.encode("utf-8", "surrogateescape")
    if len(raw) > 100 or len(lraw) > 100 or not (raw + lraw).isascii():
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, MODE, mtime
        if link:
            info.type, info.linkname = tarfile.LNKTYPE, link
        return info.tobuf(tarfile.PAX_FORMAT)
    h = bytearray(_BASE)
    h[0 : len(raw)] = raw
    size_field, mtime_field = b"%011o\0" % size, b"%011o\0" % mtime
    h[124:136] = size_field
    h[136:148] = mtime_field
    kind = 0x31 if link else 0x30  # a hard link, a regular file
    h[156] = kind
    h[157 : 157 + len(lraw)] = lraw
    total = _BASE_SUM + sum(raw) + sum(lraw) + sum(size_field) + sum(mtime_field) + kind
    h[148:156] = b"%06o\0 " % total
    return bytes(h)


def write_pack(path: Path, runs: Iterable[Tuple[str, Path]]) -> int:
    """Write the launch files of ``runs`` (``(run name, local run dir)``) into the tar ``path``
    (mode 0600, atomically); returns the number of members. A file shared by several runs (the
    git diffs of a batch, hard-linked into each run) is stored once, then as tar hard links."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    now = int(time.time())
    members = 0
    seen: Dict[Tuple[int, int], str] = {}  # (st_dev, st_ino) of a git file -> its first member
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, MODE)
    try:
        chunks: List[bytes] = []
        pending = 0
        for name, src in runs:
            prefix = f"{src}/"
            try:
                git = [f"{GIT_DIR}/{g}" for g in sorted(os.listdir(prefix + GIT_DIR))]
            except FileNotFoundError:
                git = []
            # the payload last, as it is unpacked
            for rel in (*PACKED_FILES[:-1], *git, PAYLOAD):
                full = prefix + rel
                member = f"{name}/{rel}"
                members += 1
                if rel.startswith(GIT_DIR):  # the payload reads its diffs from these
                    st = os.stat(full)
                    first = seen.get((st.st_dev, st.st_ino))
                    if first is not None:
                        chunks.append(_header(member, 0, now, link=first))
                        pending += 512
                        continue
                    seen[(st.st_dev, st.st_ino)] = member
                data = _read(full)
                chunks.append(_header(member, len(data), now))
                chunks.append(data)
                if len(data) % 512:
                    chunks.append(bytes(512 - len(data) % 512))
                pending += len(data) + 1024
            if pending > 1 << 22:
                _write_all(fd, b"".join(chunks))
                chunks, pending = [], 0
        chunks.append(bytes(1024))  # the end of the archive
        _write_all(fd, b"".join(chunks))
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return members


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def plan_packs(n_groups: int, max_packs: int = 32) -> List[int]:
    """Which pack each of ``n_groups`` consecutive task groups goes to: at most ``max_packs``
    packs of contiguous groups, as even as possible (``[0, 0, 1, 1, 2]`` for 5 groups, 3 packs)."""
    if n_groups <= 0:
        return []
    packs = min(n_groups, max(1, max_packs))
    return [g * packs // n_groups for g in range(n_groups)]


def _safe(rel: str) -> bool:
    parts = rel.split("/")
    return bool(rel) and not rel.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.unpack")
    fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, MODE)
    try:
        _write_all(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def unpack_runs(pack: Path, run_dirs: Sequence[Path]) -> List[Path]:
    """Make each of ``run_dirs`` from ``pack`` unless it already has its payload; returns the
    directories made. Raises PackError when the pack is missing or does not hold one of them."""
    wanted = {Path(d).name: Path(d) for d in run_dirs if not (Path(d) / PAYLOAD).exists()}
    if not wanted:
        return []
    pack = Path(pack)
    found: dict = {}
    shared: Dict[str, bytes] = {}  # git files: the target of later hard-link members
    try:
        with tarfile.open(str(pack), mode="r:") as tar:
            for member in tar:
                top, _, rel = member.name.partition("/")
                target = wanted.get(top)
                if member.islnk():
                    if target is not None and _safe(rel) and member.linkname in shared:
                        found.setdefault(top, []).append((rel, shared[member.linkname]))
                    continue
                if not member.isfile() or not _safe(rel):
                    continue
                is_git = rel.startswith(GIT_DIR + "/")
                if target is None and not is_git:
                    continue
                stream = tar.extractfile(member)
                data = stream.read() if stream else b""
                if is_git:
                    shared[member.name] = data
                if target is not None:
                    found.setdefault(top, []).append((rel, data))
    except (OSError, tarfile.TarError) as exc:
        raise PackError(f"cannot read the bundle's pack {pack}: {exc}") from exc
    missing = sorted(
        set(wanted) - {name for name, files in found.items() if any(r == PAYLOAD for r, _ in files)}
    )
    if missing:
        raise PackError(f"the bundle's pack {pack} holds no payload for {', '.join(missing[:5])}")
    made = []
    for name, files in found.items():
        run_dir = wanted[name]
        run_dir.mkdir(parents=True, exist_ok=True)
        # the payload last: a run directory that has one is complete
        for rel, data in sorted(files, key=lambda f: f[0] == PAYLOAD):
            target = run_dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(target, data)
        made.append(run_dir)
    return made
