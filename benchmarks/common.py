"""Helpers shared by the benchmark scripts: temp dirs, a git repo with a diff, stats, tables.

Not part of the package; the scripts put the checkout first on sys.path so they measure the
easylaunch of this checkout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_args(description: str, extra=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (its path is printed)")
    parser.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="leave PYTHONDONTWRITEBYTECODE as it is (fresh interpreters then compile easylaunch "
        "from source at every start)",
    )
    if extra:
        extra(parser)
    return parser.parse_args()


@contextlib.contextmanager
def temp_root(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A temp dir removed at the end (also on errors and Ctrl-C)."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield root
    finally:
        if keep:
            print(f"(kept {root})")
        else:
            shutil.rmtree(root, ignore_errors=True)


def bytecode_cache(root: Path, enabled: bool) -> str:
    """Let the fresh interpreters this benchmark starts (runners, floor) cache bytecode.

    An installed easylaunch has .pyc files; a source checkout run with
    PYTHONDONTWRITEBYTECODE=1 (as in this project's environment) compiles every easylaunch
    module at every runner start, ~4 ms that no user pays. The cache goes to a temp dir
    (PYTHONPYCACHEPREFIX), never into the checkout. Returns a line for the report.
    """
    if not enabled:
        return f"bytecode: PYTHONDONTWRITEBYTECODE={os.environ.get('PYTHONDONTWRITEBYTECODE', '')!r} as found"
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(root / "pycache")
    subprocess.run(
        [sys.executable, "-c", "import cloudpickle, easylaunch.runner, easylaunch.payload"], check=True
    )
    return "bytecode: cached for fresh interpreters (PYTHONPYCACHEPREFIX in the temp dir), as for an installed package"


def make_git_repo(path: Path, files: int = 40) -> Path:
    """A small git repository with one commit, an unstaged change and a staged new file."""
    path.mkdir(parents=True, exist_ok=True)
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="bench",
        GIT_AUTHOR_EMAIL="bench@example.com",
        GIT_COMMITTER_NAME="bench",
        GIT_COMMITTER_EMAIL="bench@example.com",
    )

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=path, env=env, check=True, stdout=subprocess.DEVNULL)

    git("init", "-q", "-b", "main")
    for i in range(files):
        (path / f"mod{i}.py").write_text("".join(f"x{j} = {j}\n" for j in range(50)))
    git("add", ".")
    git("commit", "-q", "-m", "initial")
    (path / "mod0.py").write_text("changed = True\n" * 20)  # unstaged diff
    (path / "new.py").write_text("print('new')\n")
    git("add", "new.py")  # staged diff
    return path


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def p90(xs: Sequence[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]


def fmt_ms(x: float) -> str:
    return f"{x * 1000:.1f} ms"


def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{platform.node()} | {os.cpu_count()} cpu | load {load} | Python {platform.python_version()} "
        f"({sys.executable}) | {time.strftime('%Y-%m-%d %H:%M')}"
    )


class Table:
    """A small text table: what, figure, goal, peer figure, ratio."""

    def __init__(self, title: str):
        self.title = title
        self.rows: List[List[str]] = []

    def add(self, what: str, figure: str, goal: str = "", peer: str = "", ratio: str = "") -> None:
        self.rows.append([what, figure, goal, peer, ratio])

    def print(self) -> None:
        head = ["what", "figure", "goal", "peer figure", "ratio"]
        widths = [max(len(r[i]) for r in [head, *self.rows]) for i in range(5)]
        line = "  ".join("-" * w for w in widths)
        print(f"\n{self.title}\n{line}")
        print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        print(line)
        for r in self.rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        print(line)


def check_run_dir(run_dir: Path, result_expected: Optional[bool] = True) -> None:
    """Assert that a finished run kept its full run directory."""
    import json
    import stat

    names = {p.name for p in run_dir.iterdir()}
    need = {"manifest.json", "variant.json", "payload.pkl", "status.json", "stdout.log", "stderr.log"}
    if result_expected:
        need.add("result.pkl")
    missing = need - names
    assert not missing, f"{run_dir} lacks {sorted(missing)}"
    mode = stat.S_IMODE(os.stat(run_dir / "payload.pkl").st_mode)
    assert mode == 0o600, f"{run_dir}/payload.pkl has mode {oct(mode)}"
    status = json.loads((run_dir / "status.json").read_text())
    states = [h[0] for h in status["history"]]
    assert states == ["PENDING", "RUNNING", "COMPLETED"], f"{run_dir}: history {states}"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["git"] and manifest["git"][0]["dirty"], f"{run_dir}: no git capture in the manifest"
    assert (run_dir / "git").is_dir(), f"{run_dir}: no git/ patches"
