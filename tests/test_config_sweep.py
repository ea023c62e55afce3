"""grid(), the layered config file, and git state capture (GitInfo) from real repositories."""

from __future__ import annotations

import json
import subprocess
import warnings
from pathlib import Path

import pytest

from easylaunch import GitInfo, State, grid, load_experiment, run_experiment

# -- grid ------------------------------------------------------------------------------------


def test_grid_expands_lists_ranges_and_dotted_keys():
    variants = grid({"lr": [1e-3, 1e-4], "seed": range(3), "model.depth": [2]})
    assert len(variants) == 6
    assert variants[0] == {"lr": 1e-3, "seed": 0, "model": {"depth": 2}}
    assert {(v["lr"], v["seed"]) for v in variants} == {(lr, s) for lr in (1e-3, 1e-4) for s in range(3)}
    assert all(v["model"] == {"depth": 2} for v in variants)
    assert [v["seed"] for v in variants] == [0, 1, 2, 0, 1, 2]  # last key fastest


def test_grid_fixed_values_and_independent_copies():
    variants = grid(
        {"opt": {"name": "adam"}, "lr": (1, 2), "tag": "x", "model.width": 8, "model.depth": [1, 2]}
    )
    assert variants == [
        {"opt": {"name": "adam"}, "lr": 1, "tag": "x", "model": {"width": 8, "depth": 1}},
        {"opt": {"name": "adam"}, "lr": 1, "tag": "x", "model": {"width": 8, "depth": 2}},
        {"opt": {"name": "adam"}, "lr": 2, "tag": "x", "model": {"width": 8, "depth": 1}},
        {"opt": {"name": "adam"}, "lr": 2, "tag": "x", "model": {"width": 8, "depth": 2}},
    ]
    variants[0]["opt"]["name"] = "sgd"
    variants[0]["model"]["width"] = 0
    assert variants[1]["opt"]["name"] == "adam" and variants[1]["model"]["width"] == 8


@pytest.mark.parametrize(
    "space",
    [
        {"model": [1], "model.depth": [2]},
        {"model.depth": [2], "model": [3]},
        {"a.b": [1], "a.b.c": [2]},
        {"model..depth": [1]},
    ],
)
def test_grid_dotted_key_conflicts_raise(space):
    with pytest.raises(ValueError):
        grid(space)


@pytest.mark.parametrize("space", [{"lr": []}, {"seed": range(0)}, {"lr": [1], "x": ()}])
def test_grid_empty_axis_raises(space):
    with pytest.raises(ValueError, match="empty"):
        grid(space)


def test_grid_refuses_a_non_dict():
    with pytest.raises(TypeError):
        grid([("lr", [1, 2])])


def test_grid_variants_run_with_nested_values(log_dir):
    from easylaunch import run_sweep

    sweep = run_sweep(
        lambda c, v: v["model"]["depth"] * v["lr"],
        grid({"lr": [1, 2], "model.depth": [10]}),
        exp_name="g",
        mode="here_no_doodad",
    )
    assert sweep.results() == [10, 20]
    assert json.loads((sweep[1].run_dir / "variant.json").read_text()) == {"lr": 2, "model": {"depth": 10}}


# -- config ----------------------------------------------------------------------------------


def where(doodad_config, variant):
    return doodad_config.base_log_dir


def launch_here(**options):
    return run_experiment(where, exp_name="conf", mode="here_no_doodad", **options)


def test_local_modes_need_no_config(log_dir, tmp_path):
    assert not Path("easylaunch_config.py").exists()
    assert not (tmp_path / "home" / ".config").exists()
    for mode in ("here_no_doodad", "local", "local_pool"):
        job = run_experiment(where, exp_name="noconf", mode=mode)
        assert job.state is State.COMPLETED
        assert Path(job.result()).parent == log_dir / "noconf"
        assert job.manifest["config_file"] is None


def test_log_dir_layers_default_file_option(tmp_path, monkeypatch):
    # no file, no $EASYLAUNCH_LOG_DIR: ./easylaunch-logs
    monkeypatch.delenv("EASYLAUNCH_LOG_DIR")
    job = launch_here()
    assert job.run_dir.parent.parent == Path("easylaunch-logs").resolve()
    # $EASYLAUNCH_LOG_DIR
    env_dir = tmp_path / "env-logs"
    monkeypatch.setenv("EASYLAUNCH_LOG_DIR", str(env_dir))
    assert launch_here().run_dir.parent.parent == env_dir
    # the config file's LOCAL_LOG_DIR beats the environment
    file_dir = tmp_path / "file-logs"
    Path("easylaunch_config.py").write_text(f"LOCAL_LOG_DIR = {str(file_dir)!r}\nMAX_PARALLEL = 2\n")
    job = launch_here()
    assert job.run_dir.parent.parent == file_dir
    assert job.result() == str(job.run_dir)
    assert job.manifest["config_file"].endswith("easylaunch_config.py")
    # the call option beats the file
    option_dir = tmp_path / "option-logs"
    assert launch_here(base_log_dir=str(option_dir)).run_dir.parent.parent == option_dir
    assert launch_here(base_log_dir=option_dir).run_dir.parent.parent == option_dir
    # load_experiment looks where launches go
    assert len(load_experiment("conf")) == 1
    assert len(load_experiment("conf", base_log_dir=str(option_dir))) == 2


def test_config_file_discovery_order(tmp_path, monkeypatch):
    home_cfg = tmp_path / "home" / ".config" / "easylaunch" / "config.py"
    home_cfg.parent.mkdir(parents=True)
    home_cfg.write_text(f"LOCAL_LOG_DIR = {str(tmp_path / 'home-logs')!r}\n")
    assert launch_here().run_dir.parent.parent == tmp_path / "home-logs"

    Path("easylaunch_config.py").write_text(f"LOCAL_LOG_DIR = {str(tmp_path / 'cwd-logs')!r}\n")
    assert launch_here().run_dir.parent.parent == tmp_path / "cwd-logs"

    env_cfg = tmp_path / "elsewhere.py"
    env_cfg.write_text(f"import os\nLOCAL_LOG_DIR = os.path.join({str(tmp_path)!r}, 'env-cfg-logs')\n")
    monkeypatch.setenv("EASYLAUNCH_CONFIG", str(env_cfg))
    job = launch_here()
    assert job.run_dir.parent.parent == tmp_path / "env-cfg-logs"
    assert job.manifest["config_file"] == str(env_cfg)

    explicit = tmp_path / "explicit.py"
    explicit.write_text(f"LOCAL_LOG_DIR = {str(tmp_path / 'explicit-logs')!r}\n")
    assert launch_here(config_file=str(explicit)).run_dir.parent.parent == tmp_path / "explicit-logs"


def assert_no_runs(tmp_path):
    assert sorted(p.parent for p in tmp_path.rglob("status.json")) == []


def test_unknown_key_in_config_file_is_an_error_with_suggestion(tmp_path):
    Path("easylaunch_config.py").write_text("LOCAL_LOG_DIRR = '/tmp/x'\n")
    with pytest.raises(ValueError) as info:
        launch_here()
    message = str(info.value)
    assert "LOCAL_LOG_DIRR" in message and "did you mean LOCAL_LOG_DIR" in message
    assert "easylaunch_config.py" in message
    with pytest.raises(ValueError, match="LOCAL_LOG_DIRR"):
        run_experiment(where, exp_name="conf", mode="local")
    assert_no_runs(tmp_path)


@pytest.mark.parametrize(
    "line, key, value, expected",
    [
        ("MAX_PARALLEL = '4'", "MAX_PARALLEL", "'4'", "int"),
        ("LOCAL_LOG_DIR = 5", "LOCAL_LOG_DIR", "5", "str"),
        ("SSH_HOSTS = ['a']", "SSH_HOSTS", "['a']", "dict"),
        ("MAX_PARALLEL = True", "MAX_PARALLEL", "True", "int"),
    ],
)
def test_config_value_of_wrong_type_names_key_value_and_type(line, key, value, expected, tmp_path):
    Path("easylaunch_config.py").write_text(line + "\n")
    with pytest.raises(ValueError) as info:
        launch_here()
    message = str(info.value)
    assert key in message and value in message and expected in message
    assert_no_runs(tmp_path)


def test_config_env_pointing_nowhere_is_a_clear_error(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-config.py"
    monkeypatch.setenv("EASYLAUNCH_CONFIG", str(missing))
    with pytest.raises(ValueError) as info:
        launch_here()
    assert str(missing) in str(info.value) and "EASYLAUNCH_CONFIG" in str(info.value)
    assert_no_runs(tmp_path)


def test_config_file_that_fails_to_load_is_a_clear_error(tmp_path):
    Path("easylaunch_config.py").write_text("LOCAL_LOG_DIR = (\n")
    with pytest.raises(ValueError, match="failed to load"):
        launch_here()
    assert_no_runs(tmp_path)


def test_config_lowercase_names_and_imports_are_ignored(tmp_path):
    Path("easylaunch_config.py").write_text(
        f"import os\nhelper = 1\n_PRIVATE = 2\nLOCAL_LOG_DIR = os.path.join({str(tmp_path)!r}, 'ok')\n"
    )
    assert launch_here().run_dir.parent.parent == tmp_path / "ok"


# -- git state -------------------------------------------------------------------------------

GIT_ENV = {
    "GIT_AUTHOR_NAME": "Test",
    "GIT_AUTHOR_EMAIL": "t@example.com",
    "GIT_COMMITTER_NAME": "Test",
    "GIT_COMMITTER_EMAIL": "t@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(repo: Path, *args: str) -> str:
    import os

    return subprocess.run(
        ["git", *args], cwd=repo, check=True, capture_output=True, text=True, env={**os.environ, **GIT_ENV}
    ).stdout.strip()


@pytest.fixture
def repo(tmp_path) -> Path:
    """A real repository: one commit on branch 'main', an unstaged and a staged change."""
    repo = tmp_path / "project"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "model.py").write_text("depth = 1\n")
    (repo / "data.py").write_text("size = 10\n")
    git(repo, "add", "model.py", "data.py")
    git(repo, "commit", "-q", "-m", "first")
    (repo / "model.py").write_text("depth = 2  # UNSTAGED-CHANGE\n")
    (repo / "data.py").write_text("size = 20  # STAGED-CHANGE\n")
    git(repo, "add", "data.py")
    return repo


GIT_SCRIPT = """
    import json
    from easylaunch import run_experiment

    def show_git(doodad_config, variant):
        return [list(g) for g in doodad_config.git_infos]

    job = run_experiment(show_git, exp_name="gitexp", mode={mode!r})
    print(json.dumps({{"run_dir": str(job.run_dir), "git": job.result()}}))
"""


@pytest.mark.parametrize("mode", ["local", "here_no_doodad"])
def test_git_infos_from_a_launch_script_in_a_repository(mode, repo, log_dir, run_script):
    head = git(repo, "rev-parse", "HEAD")
    proc = run_script(GIT_SCRIPT.format(mode=mode), cwd=repo)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(data["git"]) == 1
    info = GitInfo(*data["git"][0])
    assert Path(info.directory).resolve() == repo.resolve()
    assert info.commit_hash == head
    assert info.branch_name == "main"
    assert "UNSTAGED-CHANGE" in info.code_diff and "STAGED-CHANGE" not in info.code_diff.replace(
        "UNSTAGED-CHANGE", ""
    )
    assert "STAGED-CHANGE" in info.code_diff_staged and "UNSTAGED-CHANGE" not in info.code_diff_staged
    run_dir = Path(data["run_dir"])
    patches = sorted(p.name for p in (run_dir / "git").iterdir())
    assert patches == ["0-project.diff", "0-project.staged.diff"]
    assert (run_dir / "git" / "0-project.diff").read_text() == info.code_diff
    assert (run_dir / "git" / "0-project.staged.diff").read_text() == info.code_diff_staged
    # the diffs travel once, as these files, not inside every payload of a sweep
    assert b"UNSTAGED-CHANGE" not in (run_dir / "payload.pkl").read_bytes()
    # the diff applies to the recorded commit: the run can be reproduced from it
    subprocess.run(
        ["git", "apply", "--check", "-R", str(run_dir / "git" / "0-project.diff")], cwd=repo, check=True
    )
    subprocess.run(
        ["git", "apply", "--check", "-R", "--cached", str(run_dir / "git" / "0-project.staged.diff")],
        cwd=repo,
        check=True,
    )
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["git"] == [
        {"directory": info.directory, "commit_hash": head, "branch_name": "main", "dirty": True}
    ]


def test_git_patches_are_shared_by_every_run_of_a_sweep(repo, log_dir, run_script):
    proc = run_script(
        """
        import json
        from easylaunch import run_sweep
        sweep = run_sweep(lambda c, v: c.git_infos[0].commit_hash, [{"i": i} for i in range(3)],
                          exp_name="gitsweep", mode="local_pool")
        print(json.dumps({"dirs": [str(j.run_dir) for j in sweep], "hashes": sweep.results()}))
        """,
        cwd=repo,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(data["hashes"]) == {git(repo, "rev-parse", "HEAD")}
    texts = {(Path(d) / "git" / "0-project.staged.diff").read_text() for d in data["dirs"]}
    assert len(texts) == 1 and "STAGED-CHANGE" in texts.pop()


def test_git_capture_from_a_subdirectory_ignores_diff_settings_that_break_patches(repo, tmp_path):
    """Patches are taken from the top of the work tree with a/ b/ prefixes whatever the user's
    git config says, so `git apply` on a clean checkout of the commit reproduces the work tree."""
    from easylaunch.gitinfo import capture_git_infos

    (repo / "pkg").mkdir()
    for key, value in (
        ("diff.relative", "true"),
        ("diff.noprefix", "true"),
        ("color.ui", "always"),
        ("diff.mnemonicprefix", "true"),
    ):
        git(repo, "config", key, value)
    (info,) = capture_git_infos([str(repo / "pkg")])
    assert Path(info.directory).resolve() == repo.resolve()
    assert info.branch_name == "main" and info.commit_hash == git(repo, "rev-parse", "HEAD")
    assert "\x1b[" not in info.code_diff and "a/model.py" in info.code_diff
    assert "a/data.py" in info.code_diff_staged and "data.py" not in info.code_diff
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    for patch in (info.code_diff_staged, info.code_diff):
        subprocess.run(["git", "apply"], cwd=clone, input=patch.encode(), check=True)
    assert (clone / "model.py").read_text() == (repo / "model.py").read_text()
    assert (clone / "data.py").read_text() == (repo / "data.py").read_text()


def test_git_capture_of_a_detached_head_and_of_a_repository_without_commits(repo, tmp_path):
    from easylaunch.gitinfo import capture_git_infos

    git(repo, "checkout", "-q", "--detach")
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q", "-b", "trunk")
    (empty / "new.py").write_text("x = 1\n")
    git(empty, "add", "new.py")
    detached, fresh = capture_git_infos([str(repo), str(empty)])
    assert detached.branch_name == "[DETACHED]" and len(detached.commit_hash) == 40
    assert fresh.commit_hash == "" and fresh.branch_name == "trunk"
    assert "+x = 1" in fresh.code_diff_staged


def test_outside_a_repository_git_infos_is_empty_with_one_warning(tmp_path, log_dir, run_script):
    proc = run_script(
        """
        import json, warnings
        from easylaunch import run_experiment
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            job = run_experiment(lambda c, v: list(c.git_infos), exp_name="nogit", mode="local")
        messages = [str(w.message) for w in caught]
        print(json.dumps({"git": job.result(), "warnings": messages, "manifest_git": job.manifest["git"]}))
        """
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert data["git"] == [] and data["manifest_git"] == []
    git_warnings = [m for m in data["warnings"] if "git" in m]
    assert len(git_warnings) == 1, data["warnings"]
    assert str(tmp_path) in git_warnings[0]


def test_several_non_repository_code_dirs_give_one_warning(tmp_path, log_dir, repo):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        job = run_experiment(
            lambda c, v: [tuple(g) for g in c.git_infos],
            exp_name="dirs",
            mode="here_no_doodad",
            code_dirs_to_mount=[str(a), str(b), str(repo), str(repo / ".")],
        )
    git_warnings = [w for w in caught if "git" in str(w.message)]
    assert len(git_warnings) == 1
    assert str(a) in str(git_warnings[0].message) and str(b) in str(git_warnings[0].message)
    infos = [GitInfo(*g) for g in job.result()]
    assert [Path(i.directory).resolve() for i in infos] == [repo.resolve()]  # one per repository
    assert not (job.run_dir / "git" / "1-project.diff").exists()
