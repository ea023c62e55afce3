"""Targets whose Python minor differs from the launcher's (an image with its own Python).

- a function defined in a module of a code dir travels BY REFERENCE (module + name) and its
  variant as JSON; the runner and the packed task runner run it on every other Python 3.8+
  found here, with only the easylaunch and cloudpickle zips on the path (no site-packages);
- a ``__main__`` function, a lambda, a closure or a non-JSON variant bound for another minor is
  refused before anything is written, naming both versions and the fixes;
- the same minor stays by value, and a by-value payload that reaches another minor is refused
  by the runner naming both versions;
- a static check that the target-side modules compile, import and use only what Python 3.8 has.

No Docker here: the other minors are pyenv's interpreters (``require_python``).
"""

from __future__ import annotations

import ast
import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import LAUNCHER_MINOR, TARGET_MINORS, require_python

import easylaunch
from easylaunch import Job, State, run_experiment, selfzip, snapshot
from easylaunch.batch import Batch
from easylaunch.config import load_settings
from easylaunch.modes.local import LocalMode
from easylaunch.payload import (
    REFERENCE,
    VALUE,
    PayloadVersionError,
    TransportError,
    dumps_checked,
    load_callable,
    read_header,
    replace_function,
    transport_for,
)

OTHER_MINORS = [m for m in TARGET_MINORS if m != LAUNCHER_MINOR]
#: the other minor the single-minor tests use: the oldest the target side supports
OLDEST = TARGET_MINORS[0] if TARGET_MINORS[0] != LAUNCHER_MINOR else TARGET_MINORS[1]
#: modules a target does not have (only Python, the easylaunch zip and the cloudpickle zip)
LAUNCHER_ONLY = ("git", "jinja2", "rich", "psutil", "pandas")

EXPERIMENTS = '''
import functools
import os
import sys
import time


class Boom(Exception):
    """A user-defined exception class."""


def work(doodad_config, variant):
    print("hello from", "%d.%d" % sys.version_info[:2], "lr", variant["lr"])
    if variant.get("fail") == "value":
        raise ValueError("bad lr %r" % (variant["lr"],))
    if variant.get("fail") == "custom":
        raise Boom("custom failure")
    return {
        "python": "%d.%d" % sys.version_info[:2],
        "lr": variant["lr"],
        "nested": variant.get("nested"),
        "base_log_dir": doodad_config.base_log_dir,
        "site": "site" in sys.modules,
        "foreign": sorted(m for m in sys.modules if m.split(".")[0] in LAUNCHER_ONLY),
        "module_file": __file__,
        "cloudpickle": "cloudpickle" in sys.modules,
        "git": [(g.commit_hash, "uncommitted edit" in g.code_diff) for g in doodad_config.git_infos],
    }


def make_thing(doodad_config, variant):
    import only_there  # a module of the target's, unknown to the launcher

    return only_there.Thing()


def scaled(factor, doodad_config, variant):
    print("scaled", factor, "on", "%d.%d" % sys.version_info[:2])
    return factor * variant["lr"]


def resumable(doodad_config, variant):
    open(os.path.join(doodad_config.base_log_dir, "started"), "w").close()
    time.sleep(60)


def resume(step, doodad_config, variant):
    return {"resumed_at": step, "python": "%d.%d" % sys.version_info[:2]}


# what Slurm's packed tasks call at the time limit (USR2): the callable to resume with
resumable.checkpoint = lambda doodad_config, variant: functools.partial(resume, 5)


class Trainer:
    @staticmethod
    def static(doodad_config, variant):
        return "static"

    @classmethod
    def klass(cls, doodad_config, variant):
        return cls.__name__

    def bound(self, doodad_config, variant):
        return "bound"

    def __call__(self, doodad_config, variant):
        return "called"
'''.replace("LAUNCHER_ONLY", repr(LAUNCHER_ONLY))


@pytest.fixture
def code_dir(tmp_path, monkeypatch):
    """A code dir with a module ``experiments`` (imported here as the launch script would)."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "experiments.py").write_text(EXPERIMENTS)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", "-C", str(code)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "code"], check=True)
    (code / "experiments.py").write_text(EXPERIMENTS + "\n# an uncommitted edit\n")  # a dirty tree
    monkeypatch.syspath_prepend(str(code))
    sys.modules.pop("experiments", None)
    yield code
    sys.modules.pop("experiments", None)


def make_batch(fn, variants, log_dir: Path, code: Path, target_python) -> Batch:
    """What the api builds before a mode's check(); the mode then sets ``target_python``."""
    batch = Batch(
        fn=fn,
        fn_blob=dumps_checked(fn, "fn"),
        exp_name="pyver",
        base_exp_name="pyver",
        mode_name="local",
        options={"code_dirs_to_mount": [str(code)]},
        settings=load_settings(),
        log_root=log_dir,
        variants=variants,
        variant_blobs=[dumps_checked(v, "variant") for v in variants],
    )
    batch.target_python = target_python
    return batch


def write_batch(batch: Batch, code: Path, store: Path) -> None:
    """As a container mode does: transport, run dirs, the snapshot, payloads."""
    batch.choose_transport()
    batch.create_dirs()
    batch.payload_snapshot = snapshot.create([str(code)], store, include_easylaunch=False)
    batch.materialize()


def target_env(store: Path, tmp_path: Path) -> dict:
    """A target's environment: its Python, the two zips on PYTHONPATH and nothing else."""
    zips = [selfzip.easylaunch_zip(store), selfzip.cloudpickle_zip(store)]
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path / "target-home"),
        "PYTHONPATH": os.pathsep.join(str(z) for z in zips),
        "EASYLAUNCH_SNAPSHOT_CACHE": str(tmp_path / "target-cache"),
        "LC_ALL": "C.UTF-8",
    }


def run_target(python: str, args: list, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    # -S: no site module, so no site-packages of that interpreter; -s: no user site
    return subprocess.run(
        [python, "-S", "-s", "-m", "easylaunch.runner", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd="/",
    )


# -- by reference on every other minor -----------------------------------------------------


@pytest.mark.parametrize("minor", OTHER_MINORS)
def test_module_function_runs_by_reference_on_another_python(minor, code_dir, log_dir, tmp_path):
    python = require_python(minor)
    import experiments

    store = log_dir / ".snapshots"
    variants = [
        {"lr": 0.5, "nested": {"layers": [1, 2], "name": "x", "ok": True, "none": None}},
        {"lr": 1, "fail": "value"},
        {"lr": 2, "fail": "custom"},
    ]
    batch = make_batch(experiments.work, variants, log_dir, code_dir, minor)
    write_batch(batch, code_dir, store)
    assert batch.transport == REFERENCE
    header = read_header(batch.runs[0].payload_path)
    assert header["transport"] == REFERENCE and header["python"] == LAUNCHER_MINOR
    assert json.loads(header["fn"]) == {"module": "experiments", "qualname": "work"}
    assert json.loads(header["variant"]) == variants[0]
    assert Job.load(batch.runs[0].run_dir).manifest["transport"] == REFERENCE
    env = target_env(store, tmp_path)

    ok, value_error, custom_error = (run.run_dir for run in batch.runs)
    proc = run_target(python, [ok / "payload.pkl"], env)
    assert proc.returncode == 0, proc.stderr
    job = Job.load(ok)
    assert job.state is State.COMPLETED
    result = job.result()
    assert result["python"] == minor  # it really ran on the other interpreter
    assert result["lr"] == 0.5 and result["nested"] == variants[0]["nested"]
    assert result["base_log_dir"] == str(ok)
    assert result["site"] is False and result["foreign"] == []  # nothing but the zips
    assert result["module_file"].startswith(env["EASYLAUNCH_SNAPSHOT_CACHE"])  # from the snapshot
    assert len(result["git"]) == 1 and result["git"][0][1] is True  # GitInfo + diff made it there
    assert f"hello from {minor} lr 0.5" in job.stdout()
    assert f"hello from {minor} lr 0.5" in proc.stdout  # echoed too
    assert job.status["python"] == minor

    proc = run_target(python, [value_error / "payload.pkl", "--quiet"], env)
    assert proc.returncode == 1
    job = Job.load(value_error)
    assert job.state is State.FAILED
    error = json.loads((value_error / "error.json").read_text())
    assert error["type"] == "ValueError" and "bad lr 1" in error["message"]
    assert "experiments.py" in error["traceback"] and "raise ValueError" in error["traceback"]
    exc = job.exception()
    assert type(exc) is ValueError and "bad lr 1" in str(exc)
    assert "raise ValueError" in str(exc.__cause__)  # the remote traceback rides along
    with pytest.raises(ValueError, match="bad lr 1"):
        job.result()
    assert "bad lr 1" in job.stderr()

    proc = run_target(python, [custom_error / "payload.pkl", "--quiet"], env)
    assert proc.returncode == 1
    exc = Job.load(custom_error).exception()
    # experiments is importable here too: the class comes back as itself
    assert type(exc).__name__ == "Boom" and "custom failure" in str(exc)

    # the warm task runner (packed runs, one forked child each) on the other minor, with a
    # functools.partial of a module function
    packed = make_batch(
        functools.partial(experiments.scaled, 10), [{"lr": 1}, {"lr": 3}], log_dir, code_dir, minor
    )
    write_batch(packed, code_dir, store)
    assert packed.transport == REFERENCE
    tasks = log_dir / "tasks.json"
    tasks.write_text(json.dumps({"groups": [[str(r.payload_path) for r in packed.runs]]}))
    proc = run_target(python, ["--tasks", tasks, "--index", "0", "--quiet"], env)
    assert proc.returncode == 0, proc.stderr
    jobs = [Job.load(r.run_dir) for r in packed.runs]
    assert [j.state for j in jobs] == [State.COMPLETED, State.COMPLETED]
    assert [j.result() for j in jobs] == [10, 30]
    assert f"scaled 10 on {minor}" in jobs[1].stdout()
    assert jobs[0].status["pid"] != jobs[1].status["pid"]  # each run in its own process


@pytest.mark.parametrize("minor", [OLDEST])
def test_result_the_launcher_cannot_rebuild_is_a_clear_error(minor, code_dir, log_dir, tmp_path):
    """A by-reference run returns an object of a class only the target has."""
    python = require_python(minor)
    import experiments

    store = log_dir / ".snapshots"
    batch = make_batch(experiments.make_thing, [{}], log_dir, code_dir, minor)
    write_batch(batch, code_dir, store)
    only_target = tmp_path / "only-target"
    only_target.mkdir()
    (only_target / "only_there.py").write_text("class Thing:\n    pass\n")
    env = target_env(store, tmp_path)
    env["PYTHONPATH"] += os.pathsep + str(only_target)
    proc = run_target(python, [batch.runs[0].payload_path, "--quiet"], env)
    assert proc.returncode == 0, proc.stderr
    job = Job.load(batch.runs[0].run_dir)
    assert job.state is State.COMPLETED
    with pytest.raises(
        easylaunch.JobError, match=rf"written by Python {minor}, read by Python {LAUNCHER_MINOR}.*only_there"
    ):
        job.result()


@pytest.mark.parametrize("minor", [OLDEST])
def test_checkpoint_on_another_python_is_saved_by_reference(minor, code_dir, log_dir, tmp_path, wait_until):
    """USR2 to a packed task on the other minor: checkpoint() returns a partial of a module
    function, which the target writes back by reference; the run resumes from it. (No scheduler
    here can requeue the task: the checkpoint is saved as the payload and the run ends TIMEOUT.)"""
    python = require_python(minor)
    import experiments

    store = log_dir / ".snapshots"
    batch = make_batch(experiments.resumable, [{"lr": 1}], log_dir, code_dir, minor)
    write_batch(batch, code_dir, store)
    run_dir = batch.runs[0].run_dir
    tasks = log_dir / "tasks.json"
    tasks.write_text(json.dumps({"groups": [[str(batch.runs[0].payload_path)]], "max_requeue": 1}))
    env = target_env(store, tmp_path)
    proc = subprocess.Popen(
        [python, "-S", "-s", "-m", "easylaunch.runner", "--tasks", str(tasks), "--index", "0", "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: (run_dir / "started").exists(), timeout=60, what="the run to start")
        proc.send_signal(signal.SIGUSR2)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGUSR2, err
    status = Job.load(run_dir).status
    assert status["state"] == "TIMEOUT" and status["checkpoint_saved"], status
    assert (run_dir / "payload.attempt1.pkl").exists()
    header = read_header(run_dir / "payload.pkl")
    assert header["transport"] == REFERENCE
    assert json.loads(header["fn"]) == {
        "module": "experiments",
        "qualname": "resume",
        "args": [5],
        "kwargs": {},
    }
    proc = run_target(python, [run_dir / "payload.pkl", "--quiet"], env)
    assert proc.returncode == 0, proc.stderr
    assert Job.load(run_dir).result() == {"resumed_at": 5, "python": minor}


def test_a_checkpoint_that_cannot_travel_by_reference_is_saved_by_value(code_dir, log_dir):
    """... stamped with the versions of the Python that wrote it (the target's)."""
    import experiments

    batch = make_batch(experiments.work, [{"lr": 1}], log_dir, code_dir, OLDEST)
    write_batch(batch, code_dir, log_dir / ".snapshots")
    header = read_header(batch.runs[0].payload_path)
    new = replace_function(header, lambda doodad_config, variant: variant["lr"] * 7)
    assert new["transport"] == VALUE and new["python"] == LAUNCHER_MINOR
    assert header["transport"] == REFERENCE  # a copy
    fn, config, variant = load_callable(new)
    assert variant == {"lr": 1} and fn(config, variant) == 7


@pytest.mark.parametrize("minor", [OLDEST])
def test_module_that_does_not_import_on_the_target_fails_the_run_clearly(minor, code_dir, log_dir, tmp_path):
    """The user's module uses syntax the target's Python lacks (``match``, Python 3.10)."""
    python = require_python(minor)
    if minor_tuple(minor) >= (3, 10):
        pytest.skip(f"Python {minor} has the match statement")
    (code_dir / "modern.py").write_text(
        "def run(doodad_config, variant):\n    match variant:\n        case _:\n            return 1\n"
    )
    import modern

    store = log_dir / ".snapshots"
    batch = make_batch(modern.run, [{}], log_dir, code_dir, minor)
    write_batch(batch, code_dir, store)
    proc = run_target(python, [batch.runs[0].payload_path, "--quiet"], target_env(store, tmp_path))
    assert proc.returncode == 1
    job = Job.load(batch.runs[0].run_dir)
    assert job.state is State.FAILED
    with pytest.raises(ImportError, match=rf"cannot import the run's function modern.run on Python {minor}"):
        job.result()
    sys.modules.pop("modern", None)


def minor_tuple(minor: str) -> tuple:
    return tuple(int(x) for x in minor.split("."))


# -- refused before anything is written ----------------------------------------------------


def test_main_function_for_another_python_is_refused_before_anything_is_written(run_script, tmp_path):
    logs = tmp_path / "script-logs"
    other = OLDEST
    proc = run_script(f"""
        import os
        from easylaunch import run_experiment
        from easylaunch.modes.local import LocalMode
        from easylaunch.payload import TransportError

        from easylaunch.plan import LaunchPlan

        def check(self, batch):           # a container mode learns the image's Python here
            return LaunchPlan(target_python="{other}.18")

        LocalMode.check = check

        def train(doodad_config, variant):
            return 1

        try:
            run_experiment(train, exp_name="main", mode="local", variant={{"lr": 1}},
                           base_log_dir={str(logs)!r})
        except TransportError as exc:
            print("REFUSED", exc)
        else:
            print("LAUNCHED")
    """)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("REFUSED"), out
    assert f"Python {other}" in out and f"Python {LAUNCHER_MINOR}" in out  # both versions
    assert "__main__" in out and "train" in out
    assert "module in your code dir" in out  # fix 1
    assert f"use an image with Python {LAUNCHER_MINOR}" in out  # fix 2
    assert not logs.exists() or not any(logs.rglob("*")), list(logs.rglob("*"))


def _local_sees(monkeypatch, target: str) -> None:
    from easylaunch.plan import LaunchPlan

    # a container mode learns the image's Python in its check() and says so in its plan
    monkeypatch.setattr(LocalMode, "check", lambda self, batch: LaunchPlan(target_python=target))


def test_variant_that_is_not_json_is_refused_before_anything_is_written(code_dir, log_dir, monkeypatch):
    import experiments

    _local_sees(monkeypatch, OLDEST)
    with pytest.raises(TransportError) as info:
        run_experiment(
            experiments.work,
            exp_name="tup",
            mode="local",
            variant={"lr": 1, "opt": {"betas": (0.9, 0.99)}},
            code_dirs_to_mount=[str(code_dir)],
        )
    message = str(info.value)
    assert "variant #0['opt']['betas'] is a tuple" in message
    assert f"Python {OLDEST}" in message and f"Python {LAUNCHER_MINOR}" in message
    assert f"use an image with Python {LAUNCHER_MINOR}" in message
    assert not log_dir.exists() or not any(log_dir.rglob("*"))


def test_module_outside_the_code_dirs_is_refused(code_dir, log_dir, monkeypatch, tmp_path):
    import experiments

    _local_sees(monkeypatch, OLDEST)
    elsewhere = tmp_path / "other-code"
    elsewhere.mkdir()
    with pytest.raises(TransportError, match="not in the code dirs that travel as the snapshot"):
        run_experiment(
            experiments.work,
            exp_name="out",
            mode="local",
            variant={"lr": 1},
            code_dirs_to_mount=[str(elsewhere)],
        )
    assert not log_dir.exists() or not any(log_dir.rglob("*"))


def _closure():
    k = 2

    def inner(doodad_config, variant):
        return k

    return inner


@pytest.mark.parametrize(
    "what, make, needle",
    [
        ("lambda", lambda experiments: lambda c, v: 1, "lambda"),
        ("closure", lambda experiments: _closure(), "defined inside another function"),
        ("bound method", lambda experiments: experiments.Trainer().bound, "bound to an instance of Trainer"),
        ("callable object", lambda experiments: experiments.Trainer(), "is a Trainer object"),
        (
            "partial with a set",
            lambda experiments: functools.partial(experiments.scaled, {1, 2}),
            "not plain JSON data (args[0] is a set",
        ),
    ],
)
def test_callables_without_an_importable_name_are_refused(what, make, needle, code_dir):
    import experiments

    with pytest.raises(TransportError) as info:
        transport_for(make(experiments), [{}], OLDEST, [str(code_dir)])
    message = str(info.value)
    assert needle in message, message
    assert f"Python {OLDEST}" in message and f"Python {LAUNCHER_MINOR}" in message
    assert isinstance(info.value, PayloadVersionError)


def test_static_and_class_methods_travel_by_reference(code_dir):
    import experiments

    for fn in (experiments.Trainer.static, experiments.Trainer.klass, experiments.Trainer, experiments.work):
        assert transport_for(fn, [{"a": [1.5, None]}], OLDEST, [str(code_dir)]) == REFERENCE


def test_target_python_forms():
    fn = test_target_python_forms
    assert transport_for(fn, [{}], None) == VALUE
    assert transport_for(fn, [{}], LAUNCHER_MINOR) == VALUE
    assert transport_for(fn, [{}], f"Python {LAUNCHER_MINOR}.3") == VALUE  # same minor: by value
    with pytest.raises(ValueError, match="needs Python 3.8 or later"):
        transport_for(fn, [{}], "3.6.15")
    with pytest.raises(ValueError, match="such as '3.8'"):
        transport_for(fn, [{}], "three")


# -- same minor stays by value; a by-value payload on another minor is refused ---------------


def count(doodad_config, variant):
    return variant["x"] + 1


def kinds(doodad_config, variant):
    return {k: type(v).__name__ for k, v in variant.items()}


def test_same_minor_stays_by_value(log_dir, monkeypatch):
    _local_sees(monkeypatch, LAUNCHER_MINOR + ".99")
    job = run_experiment(kinds, exp_name="same", mode="local", variant={"t": (1, 2), "s": {3}})
    assert job.result() == {"t": "tuple", "s": "set"}  # pickled, not JSON
    header = read_header(job.run_dir / "payload.pkl")
    assert header["transport"] == VALUE
    assert job.manifest["transport"] == VALUE


@pytest.mark.parametrize("minor", [OLDEST])
def test_by_value_payload_on_another_python_is_refused_naming_both(minor, log_dir, tmp_path):
    python = require_python(minor)
    job = run_experiment(count, exp_name="mismatch", mode="local", variant={"x": 1})
    assert job.result() == 2
    proc = run_target(python, [job.run_dir / "payload.pkl"], target_env(log_dir / ".snapshots", tmp_path))
    assert proc.returncode == 2
    assert f"Python {LAUNCHER_MINOR} (launcher) vs {minor} (runner)" in proc.stderr
    status = Job.load(job.run_dir).status
    assert status["state"] == "FAILED" and status["exit_code"] == 2
    assert LAUNCHER_MINOR in status["message"] and minor in status["message"]


@pytest.mark.parametrize("minor", [OLDEST])
def test_by_reference_runs_on_a_target_without_cloudpickle(minor, code_dir, log_dir, tmp_path):
    """The header is plain pickle (protocol <= 5); with only the easylaunch zip on the path the
    run still completes, and its result (plain pickle then) reads back here."""
    python = require_python(minor)
    import experiments

    store = log_dir / ".snapshots"
    batch = make_batch(experiments.work, [{"lr": 4}], log_dir, code_dir, minor)
    write_batch(batch, code_dir, store)
    payload = batch.runs[0].payload_path
    assert payload.read_bytes()[:2] in (b"\x80\x04", b"\x80\x05")
    assert oct(payload.stat().st_mode & 0o777) == "0o600"
    env = target_env(store, tmp_path)
    env["PYTHONPATH"] = str(selfzip.easylaunch_zip(store))  # no cloudpickle zip
    proc = run_target(python, [payload, "--quiet"], env)
    assert proc.returncode == 0, proc.stderr
    result = Job.load(batch.runs[0].run_dir).result()
    assert result["python"] == minor and result["lr"] == 4 and result["cloudpickle"] is False


# -- static: the target side compiles, imports and uses only what Python 3.8 has -------------

#: target-side entry modules; the check follows their relative imports (lazy ones included)
TARGET_ENTRIES = ("__init__", "runner", "taskrunner", "ssh_agent", "ssh_remote")
#: methods that Python 3.8 lacks (the receiver's type is unknown statically)
NEWER_METHODS = {"removeprefix", "removesuffix", "is_relative_to", "with_stem", "hardlink_to", "bit_count"}
GENERIC_BUILTINS = {"list", "dict", "tuple", "set", "frozenset", "type"}
GUARDS = {"AttributeError", "ImportError", "ModuleNotFoundError", "Exception", "BaseException"}


def target_modules() -> dict:
    """``{module name: source path}`` of easylaunch's target side: the entries and every module
    they import relatively, anywhere in the file (``if TYPE_CHECKING:`` blocks excepted)."""
    pkg = Path(easylaunch.__file__).parent
    found: dict = {}
    todo = list(TARGET_ENTRIES)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        path = pkg / f"{name}.py"
        found[name] = path
        for node in _walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    todo.append(node.module.split(".")[0])
                else:
                    todo.extend(a.name for a in node.names if (pkg / f"{a.name}.py").exists())
    return found


def _walk(tree):
    """ast.walk, skipping ``if TYPE_CHECKING:`` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def scan_source(where: str, source: str) -> tuple:
    """Static facts of one module for the check under the old Python: ``(problems, uses)``.

    ``uses`` are ``(where:line, dotted name)`` of stdlib names used outside a try that catches
    AttributeError/ImportError, to resolve on that Python; ``problems`` are constructs that
    fail there at run time whatever the modules have (``list[int]`` or ``int | None``
    evaluated outside annotations, methods Python 3.8 lacks, ``zip(strict=)``...).
    """
    tree = ast.parse(source)
    future_annotations = any(
        isinstance(n, ast.ImportFrom)
        and n.module == "__future__"
        and any(a.name == "annotations" for a in n.names)
        for n in tree.body
    )
    problems, uses = [], []
    modules: dict = {}  # local name -> dotted module or module attribute

    def visit(node, guarded: bool, annotation: bool) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        at = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Try):
            catches = set()
            for h in node.handlers:
                types = h.type.elts if isinstance(h.type, ast.Tuple) else [h.type]
                catches |= {"BaseException" if t is None else getattr(t, "id", "") for t in types}
            for child in node.body:
                visit(child, guarded or bool(catches & GUARDS), annotation)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, guarded, annotation)
            return
        if isinstance(node, ast.Import):
            for a in node.names:
                modules[(a.asname or a.name).split(".")[0]] = a.asname and a.name or a.name.split(".")[0]
                if not guarded:
                    uses.append((at, a.name))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
            for a in node.names:
                modules[a.asname or a.name] = f"{node.module}.{a.name}"
                if not guarded:
                    uses.append((at, f"{node.module}.{a.name}"))
        elif isinstance(node, ast.Attribute) and not annotation:
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.insert(0, base.attr)
                base = base.value
            if isinstance(base, ast.Name) and base.id in modules and not guarded:
                uses.append((at, ".".join([modules[base.id], *chain])))
            elif node.attr in NEWER_METHODS:
                problems.append(f"{at}: .{node.attr}() needs Python 3.9+")
        elif isinstance(node, ast.Subscript) and not annotation:
            if isinstance(node.value, ast.Name) and node.value.id in GENERIC_BUILTINS:
                problems.append(f"{at}: {node.value.id}[...] evaluated at run time needs Python 3.9+")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and not annotation:
            for side in (node.left, node.right):
                if (
                    isinstance(side, ast.Name)
                    and side.id in GENERIC_BUILTINS | {"int", "str", "float", "bytes", "bool"}
                ) or (isinstance(side, ast.Constant) and side.value is None):
                    problems.append(f"{at}: a `X | Y` type evaluated at run time needs Python 3.10+")
                    break
        elif isinstance(node, ast.Call):
            name = getattr(node.func, "id", getattr(node.func, "attr", ""))
            keywords = {k.arg for k in node.keywords}
            if name == "zip" and "strict" in keywords:
                problems.append(f"{at}: zip(strict=) needs Python 3.10+")
            if name == "dataclass" and keywords & {"slots", "kw_only", "match_args"}:
                problems.append(f"{at}: dataclass({', '.join(sorted(keywords))}) needs Python 3.10+")
        for field, value in ast.iter_fields(node):
            is_annotation = future_annotations and (
                field in ("annotation", "returns")
                or (isinstance(node, ast.AnnAssign) and field == "annotation")
            )
            for child in value if isinstance(value, list) else [value]:
                if isinstance(child, ast.AST):
                    visit(child, guarded, annotation or is_annotation)

    visit(tree, False, False)
    return problems, uses


#: runs under the old Python: compiles the sources, imports the modules, resolves the names
OLD_PYTHON_CHECK = r"""
import importlib, json, sys
job = json.load(sys.stdin)
problems = []
for where, source in job["compile"].items():
    try:
        compile(source, where, "exec", dont_inherit=True)
    except SyntaxError as exc:
        problems.append("%s:%s: does not compile: %s" % (where, exc.lineno, exc.msg))
for name in job["import"]:
    try:
        importlib.import_module(name)
    except Exception as exc:
        problems.append("%s: import fails: %s: %s" % (name, type(exc).__name__, exc))
for where, dotted in job["uses"]:
    parts = dotted.split(".")
    obj, i = None, len(parts)
    while i and obj is None:  # the longest importable prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            i -= 1
    if obj is None:
        problems.append("%s: no module %s" % (where, parts[0]))
        continue
    for part in parts[i:]:
        if not hasattr(obj, part):
            problems.append("%s: %s is missing (no %s)" % (where, dotted, part))
            break
        obj = getattr(obj, part)
foreign = sorted(m for m in sys.modules if m.split(".")[0] in job["foreign"])
if foreign:
    problems.append("importing the target side imported launcher-only modules: %s" % foreign)
print(json.dumps(problems))
"""


def check_on_old_python(python: str, sources: dict, imports: list, store: Path, tmp_path: Path) -> list:
    problems, uses = [], []
    for where, source in sources.items():
        found, used = scan_source(where, source)
        problems += found
        uses += [u for u in used if not u[1].startswith(("easylaunch", "cloudpickle"))]
    job = {"compile": sources, "import": imports, "uses": uses, "foreign": list(LAUNCHER_ONLY)}
    proc = subprocess.run(
        [python, "-S", "-s", "-c", OLD_PYTHON_CHECK],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        timeout=120,
        env=target_env(store, tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    return problems + json.loads(proc.stdout)


def test_target_side_modules_use_only_what_python_3_8_has(tmp_path):
    python = require_python(TARGET_MINORS[0])
    modules = target_modules()
    # the runner's lazy imports are followed: payload and snapshot are target side too
    assert {"runner", "taskrunner", "records", "payload", "spec", "procs", "snapshot"} <= set(modules)
    # and nothing of the launcher's (git capture, templates, config, the api) is
    assert not {"api", "batch", "gitinfo", "templating", "config", "job", "cli"} & set(modules)
    sources = {str(path): path.read_text() for path in modules.values()}
    names = ["easylaunch" if n == "__init__" else f"easylaunch.{n}" for n in sorted(modules)]
    problems = check_on_old_python(python, sources, names, tmp_path / "store", tmp_path)
    assert problems == [], "\n".join(problems)


def test_the_static_check_catches_newer_constructs(tmp_path):
    """The check above can fail: each of these lines is reported on Python 3.8."""
    python = require_python(TARGET_MINORS[0])
    bad = textwrap.dedent("""
        from __future__ import annotations
        import os
        import functools
        from typing import Optional

        def f(x: list[int] | None) -> dict[str, int]:  # annotations: fine
            y: Optional[list[str]] = None
            code = os.waitstatus_to_exitcode(0)         # 3.9
            name = "abc".removeprefix("a")              # 3.9
            kinds = list[int]                           # 3.9 at run time
            either = int | None                         # 3.10 at run time
            pairs = zip([1], [2], strict=True)          # 3.10
            return functools.cache                      # 3.9

        def g(x):
            match x:
                case 1:
                    return 1

        def h():
            try:
                return os.pidfd_open(1)                 # guarded: fine
            except AttributeError:
                return None
    """)
    problems = check_on_old_python(python, {"bad.py": bad}, [], tmp_path / "store", tmp_path)
    text = "\n".join(problems)
    for line, what in [
        (9, "os.waitstatus_to_exitcode"),
        (10, "removeprefix"),
        (11, "list[...]"),
        (12, "X | Y"),
        (13, "zip(strict=)"),
        (14, "functools.cache"),
        (17, "does not compile"),
    ]:
        assert any(p.startswith(f"bad.py:{line}:") and what in p for p in problems), (line, what, text)
    assert not any(p.startswith(("bad.py:7:", "bad.py:8:", "bad.py:23:")) for p in problems), text
