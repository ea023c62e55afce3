"""Pure-Python packages as content-addressed zips, for targets that lack them.

Python imports packages straight from a zip on ``PYTHONPATH``, so a container or a cluster
only needs Python itself::

    path = easylaunch_zip(Path("logs/.snapshots"))   # logs/.snapshots/easylaunch-<sha>.zip
    # PYTHONPATH=<path> python3 -m easylaunch.runner ...
"""

from __future__ import annotations

import hashlib
import importlib
import io
import sys
import zipfile
from pathlib import Path

from . import records

_EPOCH = (1980, 1, 1, 0, 0, 0)


def package_zip(name: str, store: Path, label: str = "") -> Path:
    """Write (once per content) a zip of the installed package ``name`` into ``store``.

    The file is ``<name>-[<label>-]<sha>.zip``; the hash covers every ``.py`` file's path and
    bytes, so an unchanged package is never written twice.
    """
    module = importlib.import_module(name)
    package = Path(module.__file__).resolve().parent
    files = sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)
    digest = hashlib.sha256(sys.implementation.cache_tag.encode())
    sources = []
    for path in files:
        rel = f"{name}/" + path.relative_to(package).as_posix()
        data = path.read_bytes()
        digest.update(rel.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
        sources.append((rel, data))
    target = Path(store) / f"{name}-{label + '-' if label else ''}{digest.hexdigest()[:20]}.zip"
    if target.exists():
        return target  # compiling is most of the cost: only for a zip not written yet
    contents = []
    for rel, data in sources:
        contents.append((rel, data))
        pyc = _compiled(rel, data)
        if pyc is not None:
            contents.append((rel[:-3] + ".pyc", pyc))
    target.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel, data in contents:
            info = zipfile.ZipInfo(rel, date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    records.atomic_write_bytes(target, buf.getvalue())
    return target


def _compiled(rel: str, source: bytes) -> "bytes | None":
    """Bytecode of ``source`` as an unchecked hash-based .pyc (PEP 552), which zipimport loads
    without comparing timestamps: a container then does not compile the package at every start
    (~70 ms). On another Python the magic number differs and zipimport uses the source."""
    from importlib.util import source_hash

    try:
        from importlib._bootstrap_external import _code_to_hash_pyc
    except ImportError:  # pragma: no cover - not CPython
        return None
    try:
        code = compile(source, rel, "exec", dont_inherit=True)
    except SyntaxError:
        return None
    return bytes(_code_to_hash_pyc(code, source_hash(source), checked=False))


def easylaunch_zip(store: Path) -> Path:
    """easylaunch's own code (runner included) as one zip in ``store``."""
    return package_zip("easylaunch", store)


def cloudpickle_zip(store: Path) -> Path:
    """The launcher's cloudpickle: payloads must be read by the version that wrote them."""
    import cloudpickle

    return package_zip("cloudpickle", store, cloudpickle.__version__)
