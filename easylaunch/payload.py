"""Payload files: what the runner needs to call the function, stamped with versions.

A payload is a plain ``pickle`` of a small header dict whose ``blob`` holds the cloudpickled
``(function, variant)``. The header is readable without cloudpickle, so the runner can
refuse a Python or cloudpickle mismatch *before* unpickling any user object::

    data = build_payload(fn_bytes, variant_bytes, config, sys_path=["/code"])
    header = read_header(path)   # -> {"python": "3.11", "cloudpickle": "3.1.2", ...}
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Tuple

import cloudpickle

from .spec import DoodadConfig

FORMAT = 1


def python_version() -> str:
    """``major.minor``: pickled code objects are only portable within one minor version."""
    return "%d.%d" % sys.version_info[:2]


class PayloadVersionError(RuntimeError):
    """The payload was written by another Python or cloudpickle version than the runner's."""


class UnpicklableError(TypeError):
    """The function or variant cannot be pickled; the message names the object."""


def dumps_checked(obj: Any, what: str) -> bytes:
    """cloudpickle ``obj`` or raise UnpicklableError naming ``what`` and the cause."""
    try:
        return cloudpickle.dumps(obj)
    except Exception as exc:  # pickling errors come in many types
        raise UnpicklableError(
            f"cannot pickle {what}: {type(exc).__name__}: {exc}. Everything the function "
            "refers to must be picklable (open files, locks, sockets and generators are not); "
            "create such objects inside the function instead"
        ) from exc


def build_payload(
    fn_blob: bytes,
    variant_blob: bytes,
    config: DoodadConfig,
    sys_path: Sequence[str] = (),
    snapshot: Optional[dict] = None,
    extra: Optional[dict] = None,
    git_patches: Sequence[Tuple[str, str]] = (),
) -> bytes:
    """Serialize one run's payload; ``fn_blob``/``variant_blob`` come from :func:`dumps_checked`.

    ``git_patches`` names, per GitInfo of ``config``, the (diff, staged diff) files in the run's
    ``git/`` folder: the diffs then travel as those files, not once more inside every payload
    of a sweep, and the runner reads them back into the DoodadConfig.
    """
    header = {
        "format": FORMAT,
        "python": python_version(),
        "cloudpickle": cloudpickle.__version__,
        "sys_path": list(sys_path),
        "snapshot": snapshot,
        "config": tuple(config),
        "config_fields": list(config._fields),
        "extra": extra or {},
        "fn": fn_blob,
        "variant": variant_blob,
        "git_patches": [list(pair) for pair in git_patches],
    }
    return pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)


def read_header(path: Path | str) -> dict:
    """Load a payload's header without touching user objects."""
    with open(path, "rb") as f:
        header = pickle.load(f)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise PayloadVersionError(f"{path} is not an easylaunch payload of format {FORMAT}")
    return header


def check_versions(header: dict) -> None:
    """Raise PayloadVersionError naming both versions when they differ from this interpreter's."""
    problems = []
    if header["python"] != python_version():
        problems.append(f"Python {header['python']} (launcher) vs {python_version()} (runner)")
    if header["cloudpickle"] != cloudpickle.__version__:
        problems.append(
            f"cloudpickle {header['cloudpickle']} (launcher) vs {cloudpickle.__version__} (runner)"
        )
    if problems:
        raise PayloadVersionError(
            "payload version mismatch: "
            + "; ".join(problems)
            + ". Install the launcher's versions where the run executes "
            f"(python {header['python']}, pip install cloudpickle=={header['cloudpickle']})"
        )


def load_callable(header: dict, run_dir: Optional[Path] = None) -> tuple[Callable, DoodadConfig, Any]:
    """Unpickle ``(function, DoodadConfig, variant)``; call after :func:`check_versions`.

    ``run_dir`` (the payload's directory) is where git patches named by the header are read.
    """
    fn = cloudpickle.loads(header["fn"])
    variant = cloudpickle.loads(header["variant"])
    config = DoodadConfig(*header["config"])
    patches = header.get("git_patches") or []
    if patches and run_dir is not None:
        infos = list(config.git_infos)
        for i, (diff_name, staged_name) in enumerate(patches[: len(infos)]):
            infos[i] = infos[i]._replace(
                code_diff=_read_patch(Path(run_dir), diff_name),
                code_diff_staged=_read_patch(Path(run_dir), staged_name),
            )
        config = config._replace(git_infos=infos)
    return fn, config, variant


def _read_patch(run_dir: Path, name: str) -> str:
    try:
        return (run_dir / "git" / name).read_text()
    except FileNotFoundError:
        return ""
