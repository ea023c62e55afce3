"""Capture each code directory's git state with GitPython: commit, branch, diffs.

    infos = capture_git_infos(["/home/me/project"])   # -> [GitInfo(...)]

Directories that are not in a git repository are skipped with one warning in total; without
GitPython installed the result is an empty list and one warning.
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, List, Optional

from .spec import GitInfo


def prewarm() -> None:
    """Import GitPython in a background thread so the first capture does not pay for it.

    The same thread warms importlib.metadata (the manifest's package versions), which costs
    the first launch of a process ~12 ms otherwise.
    """

    def _import() -> None:
        try:
            import git  # noqa: F401
        except Exception:
            pass
        try:
            from importlib import metadata

            metadata.version("cloudpickle")
        except Exception:
            pass

    threading.Thread(target=_import, name="easylaunch-git-import", daemon=True).start()


def launch_script_dir() -> Optional[str]:
    """Directory of the launch script (``sys.argv[0]``), or None in an interactive session."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None) or (sys.argv[0] if sys.argv and sys.argv[0] else None)
    if not path or path in ("-c", "-m"):
        return None
    return str(Path(path).resolve().parent)


def repo_root(directory: str) -> Optional[str]:
    """The top of the git work tree holding ``directory``, or None."""
    d = Path(directory).resolve()
    for p in (d, *d.parents):
        if (p / ".git").exists():
            return str(p)
    return None


def _one(directory: str) -> Optional[GitInfo]:
    import git

    try:
        repo = git.Repo(directory, search_parent_directories=True, expand_vars=False)  # a path is a path
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        return None
    try:
        branch = repo.active_branch.name
    except TypeError:
        branch = "[DETACHED]"
    try:
        commit = repo.head.commit.hexsha
    except ValueError:
        commit = ""  # a repository without commits
    with ThreadPoolExecutor(2) as pool:
        diff = pool.submit(repo.git.diff, "--no-color", "--binary")
        staged = pool.submit(repo.git.diff, "--no-color", "--binary", "--staged")
        # GitPython strips the output's final newline, which leaves a corrupt (unappliable) patch
        code_diff, code_diff_staged = (
            d + "\n" if d and not d.endswith("\n") else d for d in (diff.result(), staged.result())
        )
    return GitInfo(
        directory=str(repo.working_tree_dir),
        code_diff=code_diff,
        code_diff_staged=code_diff_staged,
        commit_hash=commit,
        branch_name=branch,
    )


def capture_git_infos(directories: Iterable[str]) -> List[GitInfo]:
    """One GitInfo per distinct repository among ``directories`` (order kept)."""
    directories = [os.path.abspath(os.path.expanduser(str(d))) for d in directories]
    if not directories:
        return []
    try:
        import git  # noqa: F401
    except ImportError:
        warnings.warn(
            "GitPython is not installed: git_infos will be empty (pip install gitpython)", stacklevel=3
        )
        return []
    infos: List[GitInfo] = []
    missing = []
    seen = set()
    for d in directories:
        try:
            info = _one(d)
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
