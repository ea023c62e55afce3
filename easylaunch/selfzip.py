"""easylaunch's own code as one content-addressed zip, for targets without easylaunch installed.

Python imports packages straight from a zip on ``PYTHONPATH``, so a container or a cluster
only needs Python and cloudpickle::

    path = easylaunch_zip(Path("logs/.snapshots"))   # logs/.snapshots/easylaunch-<sha>.zip
    # PYTHONPATH=<path> python3 -m easylaunch.runner ...
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

from . import records

_EPOCH = (1980, 1, 1, 0, 0, 0)


def easylaunch_zip(store: Path) -> Path:
    """Write (once per content) a zip of the installed easylaunch package into ``store``."""
    package = Path(__file__).resolve().parent
    files = sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)
    digest = hashlib.sha256()
    contents = []
    for path in files:
        rel = "easylaunch/" + path.relative_to(package).as_posix()
        data = path.read_bytes()
        digest.update(rel.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
        contents.append((rel, data))
    target = Path(store) / f"easylaunch-{digest.hexdigest()[:20]}.zip"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for rel, data in contents:
            info = zipfile.ZipInfo(rel, date_time=_EPOCH)
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
    records.atomic_write_bytes(target, buf.getvalue())
    return target
