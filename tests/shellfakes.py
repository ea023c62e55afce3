"""Stand-ins for the commands generated scripts call (sbatch, singularity, ht_helper.sh, the
cluster's python), and a port of sbatch's ``#SBATCH`` parser, for tests that run the scripts
easylaunch writes without a cluster.

Each stand-in is a small Python script that records one JSON file per call (argv, cwd, a few
environment variables and, for sbatch, the script it was given) in a record directory::

    fakes = Fakes(tmp_path / "fakes")          # bin dir + records dir
    fakes.install("sbatch", "singularity")     # on fakes.bin (prepend it to PATH)
    fakes.install_at(some_path, "python3")     # a fake python at any path, hostile ones too
    ...run a script with PATH=f"{fakes.bin}:..." and FAKE_RECORDS=fakes.records...
    fakes.calls("sbatch")                      # [{"argv": [...], "cwd": ..., "env": {...}, ...}]
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path
from typing import Dict, List

RECORDED_ENV = (
    "EL_PRE",
    "PYTHONPATH",
    "APPTAINERENV_PYTHONPATH",
    "SINGULARITYENV_PYTHONPATH",
    "EASYLAUNCH_BUNDLE",
    "EASYLAUNCH_PAYLOAD_WAIT",
    "SLURM_ARRAY_TASK_ID",
)

FAKE = r'''#!{python}
"""easylaunch test stand-in ({kind}): records this call, then acts like the real command."""
import json, os, sys, tempfile
kind = {kind!r}
records = os.environ["FAKE_RECORDS"]
entry = {{
    "kind": kind,
    "argv0": sys.argv[0],
    "argv": sys.argv[1:],
    "cwd": os.getcwd(),
    "env": {{k: os.environ.get(k) for k in {env!r}}},
}}
if kind == "sbatch" and sys.argv[1:]:
    with open(sys.argv[-1], encoding="utf-8", errors="surrogateescape") as f:
        entry["script"] = f.read()
fd, path = tempfile.mkstemp(prefix=kind + ".", suffix=".json", dir=records)
with os.fdopen(fd, "w") as f:
    json.dump(entry, f)
if kind == "sbatch":
    n = len([p for p in os.listdir(records) if p.startswith("sbatch.")])
    print(4241 + n)
elif kind in ("scontrol", "sinfo"):
    sys.exit(1)
elif kind == "python3":
    # the cluster's python: a version probe (-c) says "not the launcher's minor version"
    sys.exit(1 if sys.argv[1:2] == ["-c"] else 0)
elif kind == "singularity":
    image = os.environ.get("FAKE_IMAGE")
    if os.environ.get("FAKE_SINGULARITY_EXEC") and image in sys.argv:
        rest = sys.argv[sys.argv.index(image) + 1 :]  # what runs "inside the container"
        os.execvp(rest[0], rest)
elif kind == "ht_helper.sh":
    os.execv("/bin/bash", ["bash", os.environ["FAKE_HT_HELPER"], *sys.argv[1:]])
'''


class Fakes:
    """A bin dir of stand-ins and the directory their calls are recorded in."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.bin = self.root / "bin"
        self.records = self.root / "records"
        self.bin.mkdir(parents=True, exist_ok=True)
        self.records.mkdir(parents=True, exist_ok=True)

    def install_at(self, path: Path, kind: str) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(FAKE.format(python=sys.executable, kind=kind, env=RECORDED_ENV))
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return path

    def install(self, *names: str) -> None:
        for name in names:
            kind = "singularity" if name == "apptainer" else name
            self.install_at(self.bin / name, kind)

    def env(self, **extra: str) -> Dict[str, str]:
        """os.environ with the stand-ins first on PATH and their record dir set."""
        env = {k: v for k, v in os.environ.items() if k not in RECORDED_ENV}
        env["PATH"] = f"{self.bin}:{env.get('PATH', '/usr/bin:/bin')}"
        env["FAKE_RECORDS"] = str(self.records)
        env.update(extra)
        return env

    def calls(self, kind: str) -> List[dict]:
        found = sorted(self.records.glob(f"{kind}.*.json"), key=lambda p: p.stat().st_mtime_ns)
        return [json.loads(p.read_text()) for p in found]

    def clear(self) -> None:
        for p in self.records.iterdir():
            p.unlink()


def sbatch_directive_args(script: str) -> List[str]:
    """The arguments sbatch reads from a script's ``#SBATCH`` lines.

    A port of Slurm 22.05's src/sbatch/opt.c (``_opt_batch_script``/``_get_argument``): lines
    up to the first command, several arguments a line split at blanks, ``'`` and ``"`` quote
    (also mid-word), a backslash escapes the next character, an unquoted ``#`` ends the line.
    test_bundles.py checks the real sbatch reads the same values.
    """
    args: List[str] = []
    for line in script.splitlines():
        if not line.startswith("#SBATCH"):
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                break  # sbatch stops at the first command
            continue
        rest = line[len("#SBATCH") :]
        i = 0
        while i < len(rest):
            while i < len(rest) and rest[i].isspace():
                i += 1
            if i >= len(rest):
                break
            arg: List[str] = []
            quote = ""
            escape = False
            comment = False
            while i < len(rest) and (quote or not rest[i].isspace()):
                ch = rest[i]
                i += 1
                if escape:
                    arg.append(ch)
                    escape = False
                elif ch == "\\":
                    escape = True
                elif quote:
                    if ch == quote:
                        quote = ""
                    else:
                        arg.append(ch)
                elif ch in "'\"":
                    quote = ch
                elif ch == "#":
                    comment = True
                    break
                else:
                    arg.append(ch)
            if quote:
                raise ValueError(f"unterminated quote in #SBATCH line {line!r}")
            if arg or not comment:
                args.append("".join(arg))
            if comment:
                break
    return args
