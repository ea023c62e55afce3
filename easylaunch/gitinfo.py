"""Capture each code directory's git state with the ``git`` command: commit, branch, diffs.

    infos = capture_git_infos(["/home/me/project"])   # -> [GitInfo(...)]

Directories that are not in a git repository are skipped with one warning in total; without
the ``git`` command on PATH the result is an empty list and one warning. Each directory costs
four ``git`` processes, run at the same time (no library import: a launch stays fast).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Iterable, List, Optional

from .spec import GitInfo


def launch_script_dir() -> Optional[str]:
    """Directory of the launch script (``sys.argv[0]``), or None in an interactive session.
    Launched by easylaunch's own command line (``easylaunch run -- python train.py``), the
    current directory: the user's project, not where the ``easylaunch`` script is installed."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv and sys.argv[0] else None)
    if not path or path in ("-c", "-m"):
        return None
    if _is_easylaunch_cli(main, path):
        return os.getcwd()
    return str(Path(path).resolve().parent)


def _is_easylaunch_cli(main: object, path: str) -> bool:
    """``python -m easylaunch.cli``, or the installed ``easylaunch`` console script (the small
    file pip writes: ``from easylaunch.cli import main``)."""
    spec_name = getattr(getattr(main, "__spec__", None), "name", "") or ""
    if spec_name.split(".")[0] == "easylaunch":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return len(head) < 4096 and b"\nfrom easylaunch.cli import main\n" in head


def repo_root(directory: str) -> Optional[str]:
    """The top of the git work tree holding ``directory``, or None."""
    d = Path(directory).resolve()
    for p in (d, *d.parents):
        if (p / ".git").exists():
            return str(p)
    return None


class _GitError(RuntimeError):
    pass


def _decode(data: bytes) -> str:
    # diffs of files in other encodings survive the round trip to the run's git/ files
    return data.decode("utf-8", "surrogateescape")


#: patches the runner can apply whatever the user's git config says (paths from the top, a/ b/)
_CONFIG = [
    "-c", "core.quotepath=off", "-c", "diff.relative=false", "-c", "diff.noprefix=false",
    "-c", "diff.mnemonicprefix=false",
]  # fmt: skip


def _one(directory: str, git: str) -> Optional[GitInfo]:
    """The GitInfo of the repository holding ``directory``, or None outside any."""
    if not os.path.isdir(directory):
        return None
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}  # no index refresh writes
    env.pop("GIT_DIR", None)
    env.pop("GIT_WORK_TREE", None)

    def start(*args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [git, *_CONFIG, *args],
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )

    procs = {
        "top": start("rev-parse", "--show-toplevel"),
        "commit": start("rev-parse", "-q", "--verify", "HEAD^{commit}"),
        "branch": start("symbolic-ref", "-q", "--short", "HEAD"),
        "diff": start("diff", "--no-color", "--no-ext-diff", "--binary"),
        "staged": start("diff", "--no-color", "--no-ext-diff", "--binary", "--staged"),
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate()
        out[name] = (proc.returncode, stdout, stderr)
    rc, top, err = out["top"]
    if rc != 0:
        text = _decode(err).strip()
        if "not a git repository" in text:
            return None
        raise _GitError(text or f"git rev-parse exited with {rc}")
    for name in ("diff", "staged"):
        if out[name][0] != 0:
            raise _GitError(_decode(out[name][2]).strip() or f"git diff exited with {out[name][0]}")
    commit = _decode(out["commit"][1]).strip() if out["commit"][0] == 0 else ""  # no commits yet
    branch = _decode(out["branch"][1]).strip() if out["branch"][0] == 0 else "[DETACHED]"
    return GitInfo(
        directory=_decode(top).rstrip("\n"),
        code_diff=_decode(out["diff"][1]),
        code_diff_staged=_decode(out["staged"][1]),
        commit_hash=commit,
        branch_name=branch,
    )


def capture_git_infos(directories: Iterable[str]) -> List[GitInfo]:
    """One GitInfo per distinct repository among ``directories`` (order kept)."""
    directories = [os.path.abspath(os.path.expanduser(str(d))) for d in directories]
    if not directories:
        return []
    git = shutil.which("git")
    if git is None:
        warnings.warn("git is not on PATH: git_infos will be empty (install git)", stacklevel=3)
        return []
    infos: List[GitInfo] = []
    missing = []
    seen = set()
    for d in directories:
        try:
            info = _one(d, git)
        except Exception as exc:  # git binary missing, corrupt repository...
            warnings.warn(f"could not read git state of {d}: {exc}", stacklevel=3)
            continue
        if info is None:
            missing.append(d)
        elif info.directory not in seen:
            seen.add(info.directory)
            infos.append(info)
    if missing:
        warnings.warn(
            "not in a git repository, no git info recorded for: " + ", ".join(missing),
            stacklevel=3,
        )
    return infos


def patch_files(infos: Iterable[GitInfo]) -> dict[str, str]:
    """File name -> patch text for the run directory's ``git/`` folder."""
    files = {}
    for i, info in enumerate(infos):
        stem = f"{i}-{Path(info.directory).name or 'root'}"
        files[f"{stem}.diff"] = info.code_diff
        files[f"{stem}.staged.diff"] = info.code_diff_staged
    return files
