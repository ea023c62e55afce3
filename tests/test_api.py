"""Public names, DoodadConfig/GitInfo shape, keyword validation and refusal of bad input.

Every refusal must happen before anything runs and leave no run directory behind.
"""

from __future__ import annotations

import inspect
import json
import os
import threading
from pathlib import Path

import pytest

import easylaunch
from easylaunch import (
    DoodadConfig,
    GitInfo,
    Job,
    State,
    Sweep,
    grid,
    load_experiment,
    run_experiment,
    run_sweep,
)

DOODAD_FIELDS = (
    "exp_name",
    "base_log_dir",
    "use_gpu",
    "gpu_id",
    "git_infos",
    "script_name",
    "extra_launch_info",
)
GIT_FIELDS = ("directory", "code_diff", "code_diff_staged", "commit_hash", "branch_name")


def mark_and_return(doodad_config, variant):
    """Leaves a trace if it ever runs (tests of refused launches assert it never does)."""
    mark = os.environ.get("EL_TEST_MARK")
    if mark:
        Path(mark).touch()
    return "ran"


def report_config(doodad_config, variant):
    return {"config": tuple(doodad_config), "type": type(doodad_config).__name__, "pid": os.getpid()}


@pytest.fixture
def mark(tmp_path, monkeypatch):
    path = tmp_path / "function-ran"
    monkeypatch.setenv("EL_TEST_MARK", str(path))
    return path


# -- public API ------------------------------------------------------------------------------


def test_public_names_import():
    names = [
        "run_experiment",
        "run_sweep",
        "grid",
        "Job",
        "DoodadConfig",
        "GitInfo",
        "load_experiment",
        "Sweep",
        "State",
    ]
    for name in names:
        assert name in easylaunch.__all__
        assert getattr(easylaunch, name) is not None
    assert callable(run_experiment) and callable(run_sweep) and callable(grid)
    assert callable(load_experiment)
    assert issubclass(Sweep, list)
    assert isinstance(Job, type)
    assert State.COMPLETED == "COMPLETED"
    with pytest.raises(AttributeError):
        easylaunch.no_such_name  # noqa: B018


def test_doodad_config_and_git_info_are_namedtuples_with_doodad_fields():
    assert DoodadConfig._fields == DOODAD_FIELDS
    assert GitInfo._fields == GIT_FIELDS
    assert issubclass(DoodadConfig, tuple) and issubclass(GitInfo, tuple)
    g = GitInfo("/d", "diff", "staged", "abc", "main")
    assert g.branch_name == "main" and tuple(g) == ("/d", "diff", "staged", "abc", "main")


@pytest.mark.parametrize("mode", ["here_no_doodad", "local", "local_pool"])
def test_function_sees_doodad_config_with_its_own_run_dir(mode, log_dir):
    job = run_experiment(
        report_config,
        exp_name="cfg",
        mode=mode,
        variant={"a": 1},
        gpu_id=3,
        extra_launch_info={"note": "hello"},
    )
    assert job.state is State.COMPLETED
    out = job.result()
    assert out["type"] == "DoodadConfig"
    config = DoodadConfig(*out["config"])
    assert config.base_log_dir == str(job.run_dir)
    assert Path(config.base_log_dir).parent == log_dir / "cfg"
    assert config.exp_name == "cfg"
    assert config.use_gpu is False
    assert config.gpu_id == 3
    assert isinstance(config.git_infos, list)
    assert all(isinstance(g, GitInfo) for g in config.git_infos)
    assert isinstance(config.script_name, str) and config.script_name
    assert config.extra_launch_info["note"] == "hello"
    if mode == "here_no_doodad":
        assert out["pid"] == os.getpid()
    else:
        assert out["pid"] != os.getpid()


# -- keyword validation ----------------------------------------------------------------------


def test_misspelled_keyword_suggests_the_right_one(log_dir, run_dirs):
    with pytest.raises(TypeError, match=r"did you mean 'use_gpu'"):
        run_experiment(mark_and_return, exp_name="kw", use_gpue=False)
    with pytest.raises(TypeError, match=r"did you mean 'skip_wait'"):
        run_sweep(mark_and_return, [{}], exp_name="kw", mode="local", skip_wiat=True)
    assert run_dirs() == []


def test_easylaunch_option_of_another_mode_names_the_mode(log_dir, run_dirs):
    # easylaunch's own options stay strict: doodad never had them
    with pytest.raises(TypeError) as info:
        run_experiment(mark_and_return, exp_name="kw", mode="local", docker_options={"shm_size": "1g"})
    assert "'local'" in str(info.value) and "docker_options" in str(info.value)
    with pytest.raises(TypeError, match=r"'max_parallel' is not used by mode 'here_no_doodad'"):
        run_experiment(mark_and_return, exp_name="kw", mode="here_no_doodad", max_parallel=2)
    # run_sweep (easylaunch's own call) and the Executor keep refusing another mode's keyword
    with pytest.raises(TypeError, match=r"'ssh_host' is not used by mode 'local'"):
        run_sweep(mark_and_return, [{}], exp_name="kw", mode="local", ssh_host="blue")
    assert run_dirs() == []


# -- doodad's run_experiment, as doodad scripts call it ---------------------------------------

#: doodad easy_launch's signature as issue 7 item 21 lists it (written out here, not imported)
DOODAD_SIGNATURE = [
    ("method_call", inspect.Parameter.empty),
    ("mode", "local"),
    ("exp_name", "default"),
    ("variant", None),
    ("prepend_date_to_exp_name", False),  # doodad's True: a documented difference
    ("use_gpu", False),
    ("gpu_id", 0),
    ("base_log_dir", None),
    ("local_input_dir_to_mount_point_dict", None),
    ("skip_wait", False),
    ("sync_interval", 180),
    ("region", "us-east-1"),
    ("instance_type", None),
    ("spot_price", None),
    ("verbose", False),
    ("num_exps_per_instance", 1),
    ("time_in_mins", None),
    ("slurm_config_name", None),
    ("ssh_host", None),
    ("gcp_kwargs", None),
    ("s3_log_prefix", None),
    ("s3_log_name", ""),
]

#: every doodad keyword with a value a script would pass (the first four: doodad's defaults)
DOODAD_VALUES = {
    "prepend_date_to_exp_name": False,
    "use_gpu": False,
    "gpu_id": 0,
    "local_input_dir_to_mount_point_dict": {"/tmp/in": "/data"},
    "skip_wait": False,
    "sync_interval": 60,
    "region": "us-west-2",
    "instance_type": "c5.large",
    "spot_price": 0.5,
    "num_exps_per_instance": 2,
    "time_in_mins": 30,
    "slurm_config_name": "cpu",
    "ssh_host": "blue",
    "gcp_kwargs": {"zone": "us-west1-a", "api_token": "SEKRET-TOKEN"},
    "s3_log_prefix": "runs",
    "s3_log_name": "x",
    "docker_image": "python:3.11-slim",
}


def test_run_experiment_has_doodads_signature():
    params = list(inspect.signature(run_experiment).parameters.values())
    assert [(p.name, p.default) for p in params[: len(DOODAD_SIGNATURE)]] == DOODAD_SIGNATURE
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD for p in params[: len(DOODAD_SIGNATURE)])
    rest = params[len(DOODAD_SIGNATURE) :]
    assert [p.kind for p in rest] == [inspect.Parameter.VAR_KEYWORD]  # easylaunch's: keywords only


@pytest.mark.parametrize("mode", ["here_no_doodad", "local"])
def test_doodads_positional_order_runs(mode, log_dir):
    job = run_experiment(report_variant, mode, "my-exp", {"x": 3})
    assert job.result() == {"x": 3}
    assert job.run_dir.parent == log_dir / "my-exp" and job.manifest["mode"] == mode


def test_mode_and_exp_name_swapped_get_a_hint(log_dir, run_dirs):
    with pytest.raises(ValueError, match=r"unknown mode 'my-exp'.*doodad's \(method_call, mode, exp_name"):
        run_experiment(mark_and_return, "my-exp", "local")
    assert run_dirs() == []


def test_every_doodad_keyword_is_ignored_where_unused_with_one_line(log_dir, capfd):
    job = run_experiment(report_variant, "local", "doodad-kw", {"x": 1}, **DOODAD_VALUES)
    assert job.result() == {"x": 1}
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if "doodad keywords it does not use" in line]
    assert len(lines) == 1, err
    for name in ("ssh_host='blue'", "region='us-west-2'", "time_in_mins=30", "docker_image="):
        assert name in lines[0]
    assert "SEKRET" not in err and "gcp_kwargs={'zone': 'us-west1-a'}" in lines[0]
    manifest = json.loads((job.run_dir / "manifest.json").read_text())
    ignored = manifest["ignored_options"]
    assert ignored["ssh_host"] == "blue" and ignored["time_in_mins"] == 30
    assert ignored["gcp_kwargs"] == {"zone": "us-west1-a"}  # the secret-looking key is scrubbed
    assert "skip_wait" not in ignored and "use_gpu" not in ignored  # local uses them
    assert "ssh_host" not in manifest["options"]
    # a second launch prints its own line; defaults and None are not worth one
    run_experiment(report_variant, "local", "doodad-kw", {"x": 2}, ssh_host="red")
    run_experiment(report_variant, "here_no_doodad", "doodad-kw", {"x": 2}, region="us-east-1", ssh_host=None)
    err = capfd.readouterr().err
    assert err.count("doodad keywords it does not use") == 1 and "ssh_host='red'" in err


def test_every_mode_accepts_every_doodad_keyword():
    from easylaunch.modes import get_mode_class, mode_names
    from easylaunch.options import COMMON, resolve, split_ignored

    for mode in mode_names():
        cls = get_mode_class(mode)
        own = {o.name for o in (*COMMON, *cls.options)}
        kept, ignored = split_ignored(own, DOODAD_VALUES)
        resolved = resolve(mode, cls.options, {}, kept)  # no TypeError on any mode
        # skip_wait=False is doodad's default: not worth a warning where unused
        assert set(ignored) == {k for k in DOODAD_VALUES if k not in own and k != "skip_wait"}, mode
        for name in own & set(DOODAD_VALUES):
            assert resolved[name] == DOODAD_VALUES[name], (mode, name)
    assert "ssh_host" in split_ignored({"x"}, {"ssh_host": "blue"})[1]


def test_a_name_no_mode_knows_is_still_refused_with_a_suggestion(log_dir, run_dirs):
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'ssh_hots'; did you mean 'ssh_host'"):
        run_experiment(mark_and_return, "local", "kw", ssh_hots="blue")
    with pytest.raises(TypeError, match=r"did you mean 'time_in_mins'"):
        run_experiment(mark_and_return, "here_no_doodad", "kw", time_in_min=3)
    assert run_dirs() == []


@pytest.mark.parametrize(
    "variant, pattern",
    [
        ({"model.depth": 2}, r"key 'model.depth' contains '.'.*\{'model': \{'depth': \.\.\.\}\}.*grid"),
        ({"model": {"opt.lr": 0.1}}, r"key 'opt.lr' \(under 'model'\) contains '.'"),
        ({"a": {"b": {"c.d": 1}}}, r"key 'c.d' \(under 'a.b'\)"),
        ({"doodad_config": {}}, r"'doodad_config' is reserved"),
    ],
    ids=["dotted", "nested-dotted", "deep-dotted", "doodad_config"],
)
def test_doodads_variant_rules(variant, pattern, log_dir, run_dirs, mark):
    with pytest.raises(ValueError, match=pattern):
        run_experiment(mark_and_return, "local", "rules", variant)
    with pytest.raises(ValueError, match=pattern):
        run_sweep(mark_and_return, [{"ok": 1}, variant], exp_name="rules")
    assert run_dirs() == [] and not mark.exists()
    # grid() nests dotted keys, and the Executor's call arguments are not variants
    assert run_sweep(report_variant, grid({"model.depth": [1]}), exp_name="rules").results() == [
        {"model": {"depth": 1}}
    ]


def report_variant(doodad_config, variant):
    return variant


def test_keyword_of_another_mode_set_to_none_is_accepted(log_dir, run_dirs):
    job = run_experiment(
        mark_and_return, exp_name="kw", mode="here_no_doodad", ssh_host=None, docker_image=None
    )
    assert job.result() == "ran"
    assert len(run_dirs()) == 1


@pytest.mark.parametrize(
    "option, value",
    [
        ("use_gpu", "yes"),
        ("gpu_id", 1.5),
        ("max_parallel", "2"),
        ("skip_wait", 1),
        ("base_log_dir", 42),
        ("extra_launch_info", ["a"]),
        ("use_gpu", 1),
    ],
)
def test_option_of_wrong_type_is_refused_naming_it(option, value, log_dir, run_dirs, mark):
    with pytest.raises(TypeError, match=option):
        run_experiment(mark_and_return, exp_name="kw", mode="local", **{option: value})
    assert run_dirs() == []
    assert not mark.exists()


# -- bad input refused before anything runs ----------------------------------------------------


def _closure_over_lock():
    lock = threading.Lock()

    def uses_lock(doodad_config, variant):
        with lock:
            return 1

    return uses_lock


def _closure_over_file(path):
    handle = open(path, "w")  # noqa: SIM115 - the point is an open file in the closure

    def uses_file(doodad_config, variant):
        handle.write("x")

    return uses_file


def test_unknown_mode_lists_valid_modes(log_dir, run_dirs, mark):
    with pytest.raises(ValueError) as info:
        run_experiment(mark_and_return, exp_name="bad", mode="locl")
    message = str(info.value)
    for name in ("here_no_doodad", "local", "local_pool"):
        assert repr(name) in message or name in message
    assert "'locl'" in message
    assert run_dirs() == [] and not mark.exists()


@pytest.mark.parametrize(
    "kwargs, exc, pattern",
    [
        ({"method_call": 42}, TypeError, "method_call"),
        ({"method_call": "not a function"}, TypeError, "method_call"),
        ({"method_call": lambda doodad_config: None}, TypeError, "two positional arguments"),
        ({"variant": [1, 2]}, TypeError, "variant #0 must be a dict"),
        ({"variant": "lr=0.1"}, TypeError, "must be a dict"),
        ({"variant": {"doodad_config": 1}}, ValueError, "reserved"),
        ({"exp_name": ""}, ValueError, "exp_name"),
        ({"exp_name": "   "}, ValueError, "exp_name"),
        ({"exp_name": "../x"}, ValueError, "exp_name"),
        ({"exp_name": "a/b"}, ValueError, "exp_name"),
        ({"exp_name": ".."}, ValueError, "exp_name"),
        ({"exp_name": None}, ValueError, "exp_name"),
    ],
    ids=[
        "int",
        "str",
        "one-arg",
        "variant-list",
        "variant-str",
        "reserved-key",
        "empty-name",
        "blank-name",
        "dotdot-name",
        "slash-name",
        "parent-name",
        "none-name",
    ],
)
def test_bad_input_is_refused_before_anything_runs(kwargs, exc, pattern, log_dir, run_dirs, mark):
    call = {"method_call": mark_and_return, "exp_name": "bad", "mode": "local", **kwargs}
    with pytest.raises(exc, match=pattern):
        run_experiment(**call)
    assert run_dirs() == []
    assert not log_dir.exists() or list(log_dir.rglob("*")) == []
    assert not mark.exists()


def test_unpicklable_function_is_refused_naming_it(tmp_path, log_dir, run_dirs):
    with pytest.raises(TypeError) as info:
        run_experiment(_closure_over_lock(), exp_name="bad", mode="local")
    assert "uses_lock" in str(info.value) and "lock" in str(info.value)
    with pytest.raises(TypeError) as info:
        run_experiment(_closure_over_file(tmp_path / "f.txt"), exp_name="bad", mode="local_pool")
    assert "uses_file" in str(info.value) and "file" in str(info.value).split("uses_file", 1)[1]
    assert run_dirs() == []
    assert not log_dir.exists() or list(log_dir.rglob("*")) == []


def test_unpicklable_variant_is_refused_naming_it(log_dir, run_dirs, mark):
    with pytest.raises(TypeError) as info:
        run_experiment(mark_and_return, exp_name="bad", variant={"lock": threading.Lock()})
    assert "variant #0" in str(info.value) and "'lock'" in str(info.value)
    assert "_thread.lock" in str(info.value)
    with open(os.devnull) as devnull, pytest.raises(TypeError) as info:
        run_experiment(mark_and_return, exp_name="bad", variant={"fh": devnull})
    assert "variant #0" in str(info.value) and "'fh'" in str(info.value)
    with pytest.raises(TypeError) as info:
        run_sweep(
            mark_and_return, [{"i": 0}, {"i": 1, "lock": threading.Lock()}], exp_name="bad", mode="local_pool"
        )
    assert "variant #1" in str(info.value)
    assert run_dirs() == [] and not mark.exists()


def test_unwritable_log_dir_is_refused_without_running(tmp_path, log_dir, run_dirs, mark):
    # tests run as root, so permissions do not stop a write: put the log dir under a FILE
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="log dir"):
        run_experiment(mark_and_return, exp_name="bad", base_log_dir=str(blocker / "sub"))
    with pytest.raises(OSError):
        run_sweep(mark_and_return, [{}, {}], exp_name="bad", mode="local_pool", base_log_dir=blocker / "sub")
    assert blocker.read_text() == "not a directory"
    assert run_dirs() == [] and run_dirs(tmp_path) == []
    assert not mark.exists()


def test_run_sweep_refuses_a_dict_and_an_empty_list(log_dir, run_dirs, mark):
    with pytest.raises(TypeError, match="grid"):
        run_sweep(mark_and_return, {"lr": [1, 2]}, exp_name="bad")
    with pytest.raises(ValueError, match="no variants"):
        run_sweep(mark_and_return, [], exp_name="bad")
    with pytest.raises(ValueError, match="no variants"):
        run_sweep(mark_and_return, grid({"lr": [1]})[:0], exp_name="bad")
    assert run_dirs() == [] and not mark.exists()


def test_secret_looking_keyword_is_refused(log_dir, run_dirs):
    with pytest.raises(TypeError, match="aws_secret_access_key"):
        run_experiment(mark_and_return, exp_name="bad", aws_secret_access_key="SEKRET")
    assert run_dirs() == []


def test_none_variant_becomes_empty_dict(log_dir):
    job = run_experiment(lambda c, v: v, exp_name="nv", mode="here_no_doodad")
    assert job.result() == {}
    assert job.variant == {}


def test_prepend_date_to_exp_name(log_dir):
    import time

    before = time.strftime("%y-%m-%d")
    job = run_experiment(
        report_config, exp_name="dated", mode="here_no_doodad", prepend_date_to_exp_name=True
    )
    config = DoodadConfig(*job.result()["config"])
    expected = job.run_dir.parent.name
    assert expected in (before + "-dated", time.strftime("%y-%m-%d") + "-dated")  # midnight-proof
    assert job.run_dir.parent == log_dir / expected
    assert config.exp_name == expected
    assert config.extra_launch_info["base_exp_name"] == "dated"


def test_a_valid_launch_imports_no_other_mode(tmp_path):
    """Keyword validation asks the other modes only to explain a keyword (issue 7 item 19)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from easylaunch import run_experiment\n"
        "def fn(c, v):\n    return 1\n"
        f"job = run_experiment(fn, 'local', 'light', {{}}, base_log_dir={str(tmp_path)!r}, ssh_host='x')\n"
        "assert job.result() == 1\n"
        "print(sorted(m for m in sys.modules if m.startswith('easylaunch.modes.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = eval(out.stdout.strip().splitlines()[-1])
    assert set(loaded) <= {
        "easylaunch.modes.base",
        "easylaunch.modes.local",
        "easylaunch.modes.process",
        "easylaunch.modes.reaper",
        "easylaunch.modes.local_dispatch",
    }, loaded
