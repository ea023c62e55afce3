"""Content-addressed code snapshots (easylaunch.snapshot) against real git repositories."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from easylaunch import snapshot
from easylaunch.snapshot import SnapshotError


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def make_repo(path: Path, files: dict) -> Path:
    """A git repository at ``path`` with ``files`` (relative name -> text) committed."""
    path.mkdir(parents=True)
    git(path, "init", "-q")
    write(path, files)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "init")
    return path


def write(root: Path, files: dict) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


def members(archive: str) -> dict:
    """Archive member name -> bytes (or ``-> target`` for links)."""
    out = {}
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar:
            if m.issym():
                out[m.name] = "-> " + m.linkname
            else:
                out[m.name] = tar.extractfile(m).read()  # type: ignore[union-attr]
    return out


@pytest.fixture(autouse=True)
def snap_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "snapcache"
    monkeypatch.setenv("EASYLAUNCH_SNAPSHOT_CACHE", str(cache))
    monkeypatch.delenv("EASYLAUNCH_SNAPSHOT_DIR", raising=False)
    return cache


def run_py(code: str, cwd: Path, env: dict | None = None, args: tuple = ()) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=str(cwd),
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- what goes in -------------------------------------------------------------------------


def test_git_selection_tracked_modified_untracked_not_ignored(tmp_path):
    repo = make_repo(
        tmp_path / "proj",
        {
            "mod.py": "X = 1\n",
            "keep.py": "K = 1\n",
            "gone.py": "G = 1\n",
            ".gitignore": "*.log\ndata/\n",
            "run.sh": "#!/bin/sh\necho hi\n",
        },
    )
    os.chmod(repo / "run.sh", 0o755)
    git(repo, "add", "run.sh")
    git(repo, "commit", "-q", "-m", "exec")
    (repo / "mod.py").write_text("X = 2  # uncommitted\n")
    (repo / "gone.py").unlink()
    write(
        repo,
        {
            "new.py": "N = 1\n",
            "out.log": "ignored\n",
            "data/big.bin": "ignored\n",
            "pkg/__pycache__/x.cpython-311.pyc": "cache\n",
            ".venv/lib/site.py": "env\n",
        },
    )
    info = snapshot.create([str(repo)], tmp_path / "store", include_easylaunch=False)
    got = members(info["archive"])
    assert set(got) == {f"code/proj/{n}" for n in ("mod.py", "keep.py", ".gitignore", "run.sh", "new.py")}
    assert got["code/proj/mod.py"] == b"X = 2  # uncommitted\n"
    with tarfile.open(info["archive"], "r:gz") as tar:
        modes = {m.name: m.mode for m in tar}
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in tar.getmembers())
    assert modes["code/proj/run.sh"] == 0o755 and modes["code/proj/mod.py"] == 0o644
    assert info["files"] == 5 and info["bytes"] == sum(len(v) for v in got.values())
    assert info["roots"] == [
        {
            "name": "proj",
            "source": str(repo),
            "repo": str(repo),
            "path": "code/proj",
            "pythonpath": True,
            "subdirs": [],
        }
    ]
    assert info["archive"] == str(tmp_path / "store" / f"{info['id']}.tar.gz")
    assert info["archive_name"] == f"{info['id']}.tar.gz" and info["easylaunch_root"] is None
    json.dumps(info)  # JSON-able


def test_untracked_nested_repo_and_symlinks(tmp_path):
    repo = make_repo(tmp_path / "proj", {"a.py": "A = 1\n", "data/f.txt": "f\n"})
    nested = make_repo(repo / "vendor" / "lib", {"v.py": "V = 1\n", ".gitignore": "*.tmp\n"})
    (nested / "junk.tmp").write_text("x")
    outside = tmp_path / "outside.txt"
    outside.write_text("outside\n")
    os.symlink("data", repo / "data_link")
    os.symlink(str(outside), repo / "ext.txt")
    info = snapshot.create([str(repo)], tmp_path / "store", include_easylaunch=False)
    got = members(info["archive"])
    assert got["code/proj/vendor/lib/v.py"] == b"V = 1\n"
    assert "code/proj/vendor/lib/junk.tmp" not in got
    assert got["code/proj/data_link"] == "-> data"  # internal link kept as a link
    assert got["code/proj/ext.txt"] == b"outside\n"  # a link leaving the code dir is copied
    top = Path(snapshot.unpack(Path(info["archive"])))
    assert (top / "code/proj/data_link/f.txt").read_text() == "f\n"


def test_non_git_dir_and_size_limit(tmp_path, monkeypatch):
    plain = tmp_path / "plain"
    write(
        plain,
        {
            "m.py": "M = 1\n",
            "sub/n.py": "N = 1\n",
            "sub/__pycache__/n.cpython-311.pyc": "x",
            "o.pyc": "x",
            ".git/HEAD": "x",
            "venv/x.py": "x",
            "node_modules/y.js": "x",
        },
    )
    info = snapshot.create([str(plain)], tmp_path / "store", include_easylaunch=False)
    assert set(members(info["archive"])) == {"code/plain/m.py", "code/plain/sub/n.py"}
    assert info["roots"][0]["repo"] is None
    (plain / "big.dat").write_bytes(b"\0" * 3000)
    monkeypatch.setenv("EASYLAUNCH_SNAPSHOT_MAX_MB", "0.002")
    with pytest.raises(ValueError, match=r"non-git code dir .*plain.* exceed.*git init"):
        snapshot.create([str(plain)], tmp_path / "store", include_easylaunch=False)


PRIVATE_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
)


def test_secrets_caches_and_data_are_left_out_of_a_non_git_dir(tmp_path):
    plain = tmp_path / "plain"
    write(
        plain,
        {
            "m.py": "M = 1\n",
            "notes.txt": "n\n",
            "auth/credentials.py": "def load(): ...\n",  # code, not a secret
            ".env.example": "TOKEN=\n",  # a template meant to be shared
            ".env": "TOKEN=s3cr3t\n",
            "conf/credentials.json": "{}",
            "client_secret_123.json": "{}",
            "id_ed25519": PRIVATE_KEY,
            "tls/server.pem": "x",
            ".ssh/config": "Host x\n",
            ".aws/config": "[default]\n",
            "keys/deploy": PRIVATE_KEY,  # an innocent name, a private key inside
            "tools/.env/bin/python": "x",  # a virtualenv called .env
            "wandb/run-1/log.txt": "x",
            ".pytest_cache/v/x": "x",
            "pkg.egg-info/PKG-INFO": "x",
            "model.pt": "x",
            "data/emb.npy": "x",
        },
    )
    with pytest.warns(UserWarning) as caught:
        info = snapshot.create([str(plain)], tmp_path / "store", include_easylaunch=False)
    assert set(members(info["archive"])) == {
        "code/plain/m.py",
        "code/plain/notes.txt",
        "code/plain/auth/credentials.py",
        "code/plain/.env.example",
    }
    messages = [str(w.message) for w in caught]
    secret = next(m for m in messages if "look like secrets" in m and ".env" in m)
    assert "left out 7 files" in secret, secret  # .env, credentials, client secret, keys, .ssh, .aws
    assert "conf/credentials.json" in secret and "s3cr3t" not in secret
    assert any("look like secrets" in m and "deploy" in m for m in messages), messages
    data = next(m for m in messages if "untracked data" in m)
    assert "model.pt" in data and "data/emb.npy" in data and "SNAPSHOT_INCLUDE" in data
    assert not any("wandb" in m or "pytest_cache" in m for m in messages)  # caches: silent

    # SNAPSHOT_INCLUDE takes files back; SNAPSHOT_EXCLUDE adds patterns (names or paths)
    info = snapshot.create(
        [str(plain)],
        tmp_path / "store",
        include_easylaunch=False,
        include=["data/*.npy", ".env"],
        exclude=["notes.txt", "auth/*"],
    )
    got = set(members(info["archive"]))
    assert {"code/plain/data/emb.npy", "code/plain/.env"} <= got
    assert "code/plain/notes.txt" not in got and "code/plain/auth/credentials.py" not in got
    assert "code/plain/keys/deploy" not in got  # a private key's contents are never shipped


def test_tracked_secrets_are_left_out_tracked_data_is_kept(tmp_path):
    repo = make_repo(tmp_path / "proj", {"a.py": "A = 1\n", ".env": "K=v\n", "w.npy": "x"})
    write(repo, {"untracked.npy": "x", "b.py": "B = 1\n"})
    with pytest.warns(UserWarning, match=r"left out 1 file that look like secrets.*\.env"):
        info = snapshot.create([str(repo)], tmp_path / "store", include_easylaunch=False)
    assert set(members(info["archive"])) == {"code/proj/a.py", "code/proj/w.npy", "code/proj/b.py"}


def test_a_large_snapshot_is_shipped_with_a_warning_naming_its_largest_files(tmp_path, monkeypatch):
    plain = tmp_path / "plain"
    write(plain, {"m.py": "M = 1\n", "table.csv": "1," * 2000})
    monkeypatch.setenv("EASYLAUNCH_SNAPSHOT_WARN_MB", "0.001")
    with pytest.warns(UserWarning, match=r"MB of code is shipped with every launch \(largest: table.csv"):
        info = snapshot.create([str(plain)], tmp_path / "store", include_easylaunch=False)
    assert "code/plain/table.csv" in members(info["archive"])


def test_rules_match_names_anywhere_and_paths_whole():
    rules = snapshot.Rules(exclude=["scratch/*", "*.bin"], include=["assets/*.npy"])
    assert rules.verdict("config/.env", tracked=True) == "secret"
    assert rules.verdict("deep/.aws/credentials", tracked=False) == "secret"
    assert rules.verdict("aws/x.py", tracked=False) is None
    assert rules.verdict("src/credentials.py", tracked=True) is None
    assert rules.verdict("assets/emb.npy", tracked=False) is None
    assert rules.verdict("data/big.npy", tracked=False) == "data"
    assert rules.verdict("data/big.npy", tracked=True) is None
    assert rules.verdict("wandb/run-1/log.txt", tracked=False) == "excluded"
    assert rules.verdict("scratch/a/b.py", tracked=False) == "excluded"
    assert rules.verdict("src/scratch/b.py", tracked=False) is None  # a path pattern is anchored
    assert rules.verdict("w/model.bin", tracked=False) == "excluded"
    assert rules.verdict("w/model.bin", tracked=True) is None


def test_missing_code_dir_and_duplicate_names(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        snapshot.create([str(tmp_path / "nope")], tmp_path / "store")
    a = make_repo(tmp_path / "a" / "lib", {"x.py": "x = 1\n"})
    b = make_repo(tmp_path / "b" / "lib", {"y.py": "y = 1\n"})
    info = snapshot.create([str(a), str(b), str(a)], tmp_path / "store", include_easylaunch=False)
    assert [r["name"] for r in info["roots"]] == ["lib", "lib-2"]
    assert set(members(info["archive"])) == {"code/lib/x.py", "code/lib-2/y.py"}


@pytest.mark.parametrize("use_git", [True, False])
def test_store_and_its_log_dir_inside_code_dir_are_not_snapshotted(tmp_path, use_git):
    files = {"a.py": "A = 1\n"}
    if use_git:
        repo = make_repo(tmp_path / "proj", files)
    else:
        repo = tmp_path / "proj"
        write(repo, files)
    store = repo / "logs" / ".snapshots"
    first = snapshot.create([str(repo)], store, include_easylaunch=False)
    write(repo, {"logs/exp/run_000/stdout.log": "output\n"})
    second = snapshot.create([str(repo)], store, include_easylaunch=False)
    assert first["id"] == second["id"]
    assert set(members(second["archive"])) == {"code/proj/a.py"}
    # a store that is not named .snapshots only excludes itself
    third = snapshot.create([str(repo)], repo / "logs" / "mystore", include_easylaunch=False)
    assert set(members(third["archive"])) == {"code/proj/a.py", "code/proj/logs/exp/run_000/stdout.log"}


def test_uninitialized_submodule_is_empty(tmp_path):
    sub = make_repo(tmp_path / "sub", {"s.py": "S = 1\n"})
    main = make_repo(tmp_path / "main", {"m.py": "M = 1\n"})
    git(main, "-c", "protocol.file.allow=always", "submodule", "add", "-q", str(sub), "sub")
    git(main, "commit", "-q", "-m", "sub")
    info = snapshot.create([str(main)], tmp_path / "store", include_easylaunch=False)
    assert set(members(info["archive"])) == {"code/main/m.py", "code/main/.gitmodules", "code/main/sub/s.py"}
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(main), str(clone))
    info = snapshot.create([str(clone)], tmp_path / "store", include_easylaunch=False)
    assert set(members(info["archive"])) == {"code/clone/m.py", "code/clone/.gitmodules"}


# -- identity -----------------------------------------------------------------------------


def test_same_content_same_id_archive_not_rewritten(tmp_path):
    repo = make_repo(tmp_path / "proj", {"a.py": "A = 1\n", "b/c.py": "C = 1\n"})
    store = tmp_path / "store"
    first = snapshot.create([str(repo)], store)
    archive = Path(first["archive"])
    before = archive.stat().st_mtime_ns
    time.sleep(0.05)
    second = snapshot.create([str(repo)], store)
    assert second["id"] == first["id"] and first["written"] and not second["written"]
    assert archive.stat().st_mtime_ns == before
    assert sorted(p.name for p in store.glob("*.tar.gz")) == [archive.name]
    assert first["easylaunch_root"] == "lib"
    assert "lib/easylaunch/runner.py" in members(first["archive"])
    assert (store / "unpack.py").read_bytes() == Path(snapshot.__file__).read_bytes()


def test_one_byte_change_gives_new_id_even_with_same_size_and_mtime(tmp_path):
    repo = make_repo(tmp_path / "proj", {"a.py": "A = 1\n"})
    old = time.time() - 3600
    os.utime(repo / "a.py", (old, old))
    time.sleep(2.1)  # hashes of files changed (mtime or ctime) in the last 2 s are not cached
    store = tmp_path / "store"
    first = snapshot.create([str(repo)], store, include_easylaunch=False)
    assert str(repo / "a.py") in json.loads((store / ".index.json").read_text())["files"]
    (repo / "a.py").write_text("A = 2\n")  # same size
    os.utime(repo / "a.py", (old, old))  # same mtime: only ctime/content differ
    second = snapshot.create([str(repo)], store, include_easylaunch=False)
    assert second["id"] != first["id"] and second["written"]
    assert members(second["archive"])["code/proj/a.py"] == b"A = 2\n"
    (repo / "a.py").write_text("A = 1\n")
    third = snapshot.create([str(repo)], store, include_easylaunch=False)
    assert third["id"] == first["id"] and not third["written"]


def test_deterministic_across_creates_with_touched_mtimes(tmp_path):
    repo = make_repo(tmp_path / "proj", {f"p/m{i}.py": f"v = {i}\n" for i in range(30)})
    first = snapshot.create([str(repo)], tmp_path / "s1")
    for i, p in enumerate(sorted(repo.rglob("*.py"))):
        os.utime(p, (1e9 + i, 1e9 + i))
    second = snapshot.create([str(repo)], tmp_path / "s2")
    assert first["id"] == second["id"]
    assert Path(first["archive"]).read_bytes() == Path(second["archive"]).read_bytes()
    # the id is the content's, not the archive's: gzip metadata does not enter it
    raw = gzip.decompress(Path(first["archive"]).read_bytes())
    with gzip.GzipFile(tmp_path / "other.tar.gz", "wb", compresslevel=1, mtime=12345) as gz:
        gz.write(raw)
    (tmp_path / "elsewhere").mkdir()
    target = tmp_path / "elsewhere" / first["archive_name"]
    os.replace(tmp_path / "other.tar.gz", target)
    assert snapshot.unpack(target).name == first["id"]


# -- activation ---------------------------------------------------------------------------

ACTIVATE = """
    import json, sys
    from pathlib import Path
    from easylaunch import snapshot
    info = json.loads(sys.argv[1])
    paths = snapshot.activate(info, Path(sys.argv[2]))
    import {module} as m
    print(json.dumps({{"value": m.VALUE, "file": m.__file__, "paths": paths, "path0": sys.path[0]}}))
"""


def test_activate_in_fresh_process_runs_the_snapshot_not_the_edited_source(tmp_path, snap_cache):
    repo = make_repo(tmp_path / "proj", {"mymod.py": "VALUE = 'at launch'\n"})
    info = snapshot.create([str(repo)], tmp_path / "store")
    (repo / "mymod.py").write_text("VALUE = 'edited after launch'\n")
    # the live repo is the cwd and on PYTHONPATH: the snapshot must still win
    proc = run_py(
        ACTIVATE.format(module="mymod"),
        cwd=repo,
        env={"PYTHONPATH": str(repo)},
        args=(json.dumps(info), str(tmp_path / "run" / "payload.pkl")),
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["value"] == "at launch"
    top = snap_cache / info["id"]
    assert out["file"] == str(top / "code" / "proj" / "mymod.py")
    assert out["paths"] == [str(top / "code" / "proj"), str(top / "lib")]
    assert out["path0"] == str(top / "code" / "proj")
    assert not os.access(top / "code" / "proj" / "mymod.py", os.W_OK) or os.geteuid() == 0


def test_src_layout_is_mapped_from_the_launcher_imports(tmp_path):
    repo = make_repo(tmp_path / "proj", {"src/srcpkg/__init__.py": "VALUE = 'src at launch'\n"})
    launcher = f"""
        import json, sys
        from pathlib import Path
        sys.path.insert(0, {str(repo / "src")!r})
        import srcpkg
        from easylaunch import snapshot
        print(json.dumps(snapshot.create([{str(repo)!r}], Path({str(tmp_path / "store")!r}))))
    """
    proc = run_py(launcher, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["roots"][0]["subdirs"] == ["src"]
    (repo / "src" / "srcpkg" / "__init__.py").write_text("VALUE = 'edited'\n")
    proc = run_py(
        ACTIVATE.format(module="srcpkg"),
        cwd=tmp_path,
        env={"PYTHONPATH": str(repo / "src")},
        args=(json.dumps(info), str(tmp_path / "run" / "payload.pkl")),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["value"] == "src at launch"


def test_runner_executes_the_snapshot(tmp_path):
    """End to end through ``python -m easylaunch.runner`` and its ``snapshot.activate`` hook."""
    repo = make_repo(
        tmp_path / "proj",
        {"trainer.py": "def train(config, variant):\n    return ('at launch', variant['x'])\n"},
    )
    run_dir = tmp_path / "logs" / "exp" / "run_000"
    launcher = f"""
        import sys
        from pathlib import Path
        sys.path.insert(0, {str(repo)!r})
        from trainer import train
        from easylaunch import payload, snapshot
        from easylaunch.spec import DoodadConfig
        info = snapshot.create([{str(repo)!r}], Path({str(tmp_path / "logs" / ".snapshots")!r}))
        config = DoodadConfig("exp", {str(run_dir)!r}, False, 0, [], "t", {{}})
        data = payload.build_payload(
            payload.dumps_checked(train, "fn"), payload.dumps_checked({{"x": 3}}, "variant"),
            config, sys_path=[{str(repo)!r}], snapshot=info,
        )
        Path({str(run_dir)!r}).mkdir(parents=True)
        Path({str(run_dir / "payload.pkl")!r}).write_bytes(data)
    """
    proc = run_py(launcher, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (repo / "trainer.py").write_text("def train(config, variant):\n    return ('edited', 0)\n")
    proc = subprocess.run(
        [sys.executable, "-m", "easylaunch.runner", str(run_dir / "payload.pkl"), "--quiet"],
        cwd=str(repo),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr + (run_dir / "stderr.log").read_text()
    assert pickle.loads((run_dir / "result.pkl").read_bytes()) == ("at launch", 3)


def test_concurrent_activation_of_one_id(tmp_path, snap_cache):
    repo = make_repo(tmp_path / "proj", {f"m{i}.py": f"VALUE = {i}\n" for i in range(200)})
    info = snapshot.create([str(repo)], tmp_path / "store")
    go = tmp_path / "go"
    code = """
        import json, os, sys, time
        from pathlib import Path
        from easylaunch import snapshot
        while not os.path.exists(sys.argv[3]):
            time.sleep(0.001)
        snapshot.activate(json.loads(sys.argv[1]), Path(sys.argv[2]))
        import m7
        print(m7.__file__)
    """
    args = [json.dumps(info), str(tmp_path / "run" / "payload.pkl"), str(go)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    time.sleep(1.0)  # let the interpreters start and wait on the go file
    go.write_text("")
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [err for _out, err in outs]
    expected = str(snap_cache / info["id"] / "code" / "proj" / "m7.py")
    assert [out.strip() for out, _err in outs] == [expected] * 8
    assert [p.name for p in snap_cache.iterdir()] == [info["id"]]  # no temporary dirs left
    marker = json.loads((snap_cache / info["id"] / ".easylaunch-snapshot.json").read_text())
    assert marker["id"] == info["id"] and marker["files"] == info["files"]


def test_tampered_archive_is_refused(tmp_path, snap_cache):
    repo = make_repo(tmp_path / "proj", {"a.py": "A = 1\n" * 200})
    info = snapshot.create([str(repo)], tmp_path / "store", include_easylaunch=False)
    archive = Path(info["archive"])
    good = archive.read_bytes()
    payload = tmp_path / "run" / "payload.pkl"
    # damaged bytes
    archive.write_bytes(good[:40] + bytes([good[40] ^ 0xFF]) + good[41:])
    with pytest.raises(SnapshotError, match="damaged|does not hold"):
        snapshot.activate(info, payload)
    # a well-formed archive whose content differs from its name
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = b"A = 666\n"
        ti = tarfile.TarInfo("code/proj/a.py")
        ti.size = len(data)
        tar.addfile(ti, io.BytesIO(data))
    archive.write_bytes(buf.getvalue())
    with pytest.raises(SnapshotError, match=r"does not hold the content.*expected " + info["id"]):
        snapshot.activate(info, payload)
    assert not (snap_cache / info["id"]).exists()
    assert [p for p in snap_cache.iterdir()] == []
    archive.write_bytes(good)
    assert snapshot.activate(info, payload)[0] == str(snap_cache / info["id"] / "code" / "proj")


@pytest.mark.parametrize(
    "member, link",
    [
        ("../evil.py", None),
        ("/tmp/evil.py", None),
        ("code/p/../../../evil.py", None),
        ("code/p/l", "../../.."),
    ],
)
def test_path_traversal_member_is_refused(tmp_path, snap_cache, member, link):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        ti = tarfile.TarInfo(member)
        if link:
            ti.type, ti.linkname = tarfile.SYMTYPE, link
            tar.addfile(ti)
        else:
            ti.size = 4
            tar.addfile(ti, io.BytesIO(b"evil"))
    sha = "ab" * 32
    archive = tmp_path / "store" / f"{sha}.tar.gz"
    archive.parent.mkdir()
    archive.write_bytes(buf.getvalue())
    info = {"id": sha, "archive": str(archive), "archive_name": archive.name, "roots": []}
    with pytest.raises(SnapshotError, match="refusing"):
        snapshot.activate(info, tmp_path / "run" / "payload.pkl")
    assert not list(tmp_path.rglob("evil.py")) and not (snap_cache / sha).exists()


def test_invalid_id_is_refused(tmp_path):
    with pytest.raises(SnapshotError, match="invalid snapshot id"):
        snapshot.activate({"id": "../../etc", "archive_name": "x"}, tmp_path / "payload.pkl")


# -- finding the archive ------------------------------------------------------------------


def test_missing_archive_error_lists_places_tried(tmp_path, monkeypatch):
    repo = make_repo(tmp_path / "proj", {"a.py": "A = 1\n"})
    info = snapshot.create([str(repo)], tmp_path / "store", include_easylaunch=False)
    os.unlink(info["archive"])
    monkeypatch.setenv("EASYLAUNCH_SNAPSHOT_DIR", str(tmp_path / "envdir"))
    payload = tmp_path / "logs" / "exp" / "run_000" / "payload.pkl"
    with pytest.raises(FileNotFoundError) as err:
        snapshot.activate(info, payload)
    message = str(err.value)
    for place in (
        Path(info["archive"]),
        tmp_path / "logs" / "exp" / ".snapshots" / info["archive_name"],
        tmp_path / "logs" / ".snapshots" / info["archive_name"],
        tmp_path / "envdir" / info["archive_name"],
    ):
        assert str(place) in message
    assert "EASYLAUNCH_SNAPSHOT_DIR" in message


@pytest.mark.parametrize("where", ["exp", "log_root", "env"])
def test_archive_found_in_a_copied_bundle(tmp_path, monkeypatch, snap_cache, where):
    repo = make_repo(tmp_path / "proj", {"bundled.py": "VALUE = 'bundled'\n"})
    info = snapshot.create([str(repo)], tmp_path / "store")
    bundle = tmp_path / "cluster" / "logs"
    dest = {
        "exp": bundle / "exp" / ".snapshots",
        "log_root": bundle / ".snapshots",
        "env": tmp_path / "elsewhere",
    }[where]
    dest.mkdir(parents=True)
    os.replace(info["archive"], dest / info["archive_name"])  # the recorded path is now stale
    if where == "env":
        monkeypatch.setenv("EASYLAUNCH_SNAPSHOT_DIR", str(dest))
    paths = snapshot.activate(info, bundle / "exp" / "run_000" / "payload.pkl")
    try:
        assert paths[0] == str(snap_cache / info["id"] / "code" / "proj")
        assert (Path(paths[0]) / "bundled.py").read_text() == "VALUE = 'bundled'\n"
    finally:
        for p in paths:
            sys.path.remove(p)


def test_bootstrap_without_installed_easylaunch(tmp_path, snap_cache):
    repo = make_repo(tmp_path / "proj", {"a.py": "A = 1\n"})
    store = tmp_path / "store"
    info = snapshot.create([str(repo)], store)
    # -I -S: no site-packages (so no installed easylaunch) and no PYTHONPATH
    proc = subprocess.run(
        [sys.executable, "-I", "-S", str(store / "unpack.py"), info["archive"]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lib = proc.stdout.strip()
    assert lib == str(snap_cache / info["id"] / "lib")
    # a job script puts LIB on PYTHONPATH; -S keeps the installed easylaunch out of reach
    proc = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            f"import sys; sys.path.insert(0, {lib!r}); import easylaunch.snapshot as s; print(s.__file__)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(Path(lib) / "easylaunch" / "snapshot.py")


def test_describe(tmp_path):
    repo = make_repo(tmp_path / "proj", {"a.py": "A = 1\n"})
    info = snapshot.create([str(repo)], tmp_path / "store")
    line = snapshot.describe(info)
    assert line.startswith(f"snapshot {info['id'][:12]} (proj + easylaunch; {info['files']} files")
    assert info["archive"] in line and "\n" not in line
    assert snapshot.describe(None) == "no code snapshot"
