"""Public names, DoodadConfig/GitInfo shape, keyword validation and refusal of bad input.

Every refusal must happen before anything runs and leave no run directory behind.
"""

from __future__ import annotations

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

DOODAD_FIELDS = ("exp_name", "base_log_dir", "use_gpu", "gpu_id", "git_infos", "script_name", "extra_launch_info")
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
    names = ["run_experiment", "run_sweep", "grid", "Job", "DoodadConfig", "GitInfo",
             "load_experiment", "Sweep", "State"]
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


def test_keyword_of_another_mode_names_the_mode(log_dir, run_dirs):
    with pytest.raises(TypeError) as info:
        run_experiment(mark_and_return, exp_name="kw", mode="local", ssh_host="x")
    assert "'local'" in str(info.value) and "ssh_host" in str(info.value)
    # skip_wait belongs to the process modes, not to here_no_doodad
    with pytest.raises(TypeError, match=r"'here_no_doodad'"):
        run_experiment(mark_and_return, exp_name="kw", mode="here_no_doodad", skip_wait=True)
    assert run_dirs() == []


def test_keyword_of_another_mode_set_to_none_is_accepted(log_dir, run_dirs):
    job = run_experiment(mark_and_return, exp_name="kw", mode="here_no_doodad", ssh_host=None,
                         docker_image=None)
    assert job.result() == "ran"
    assert len(run_dirs()) == 1


@pytest.mark.parametrize(
    "option, value",
    [("use_gpu", "yes"), ("gpu_id", 1.5), ("max_parallel", "2"), ("skip_wait", 1),
     ("base_log_dir", 42), ("extra_launch_info", ["a"]), ("use_gpu", 1)],
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
    ids=["int", "str", "one-arg", "variant-list", "variant-str", "reserved-key", "empty-name",
         "blank-name", "dotdot-name", "slash-name", "parent-name", "none-name"],
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
        run_sweep(mark_and_return, [{"i": 0}, {"i": 1, "lock": threading.Lock()}], exp_name="bad",
                  mode="local_pool")
    assert "variant #1" in str(info.value)
    assert run_dirs() == [] and not mark.exists()


def test_unwritable_log_dir_is_refused_without_running(tmp_path, log_dir, run_dirs, mark):
    # tests run as root, so permissions do not stop a write: put the log dir under a FILE
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="log dir"):
        run_experiment(mark_and_return, exp_name="bad", base_log_dir=str(blocker / "sub"))
    with pytest.raises(OSError):
        run_sweep(mark_and_return, [{}, {}], exp_name="bad", mode="local_pool",
                  base_log_dir=blocker / "sub")
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
    job = run_experiment(report_config, exp_name="dated", mode="here_no_doodad", prepend_date_to_exp_name=True)
    config = DoodadConfig(*job.result()["config"])
    expected = job.run_dir.parent.name
    assert expected in (before + "-dated", time.strftime("%y-%m-%d") + "-dated")  # midnight-proof
    assert job.run_dir.parent == log_dir / expected
    assert config.exp_name == expected
    assert config.extra_launch_info["base_exp_name"] == "dated"
