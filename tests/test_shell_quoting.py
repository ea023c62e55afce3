"""Every value that reaches a shell is quoted: each template, rendered through the real modes with
hostile values in every user-controlled field, parses (``bash -n``) and, run with stand-ins for
sbatch, singularity, ht_helper.sh and the cluster's python, runs no injected command (no PWNED
file appears) and hands every value on intact.

No cluster needed (the stand-ins are in shellfakes.py); test_bundles.py and test_slurm.py
submit the same kind of values to the real Slurm.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import cloudpickle
import jinja2
import pytest
from jinja2 import nodes
from shellfakes import Fakes, sbatch_directive_args

from easylaunch import Job, State, records, run_sweep
from easylaunch.bundle import BundleError
from easylaunch.slurm_config import SlurmConfigError

cloudpickle.register_pickle_by_value(sys.modules[__name__])
pytestmark = [pytest.mark.timeout(120), pytest.mark.filterwarnings("ignore:not in a git repository")]

HERE = Path(__file__).resolve().parent
#: breaks out of any quoting done wrong; usable as a file name (no '/', no backslash, no ':' ',')
H = 'it\'s "q" $(touch PWNED) `touch PWNED2` ${HOME} ;|&<>*?~#% ü日本'
#: the same with a backslash, where no path is made of it
HB = H + " back\\slash"
EXP = "e_x.y+z=w@v-1"  # exp_name is restricted by the api: every character it allows
MARKERS = ("PWNED", "PWNED2")


def work(doodad_config, variant):
    return {"x": variant["x"], "dir": doodad_config.base_log_dir}


def template_names() -> set:
    return {p.name for p in resources.files("easylaunch.templates").iterdir() if p.name.endswith(".j2")}


# -- scenarios: one launch each, through the real modes ---------------------------------------------


def write_config(path: Path, **values) -> Path:
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in values.items()))
    return path


def launch(name: str, tmp: Path, fakes: Fakes) -> dict:
    """Launch scenario ``name`` with hostile values in every field it has; returns what it made."""
    tmp.mkdir(parents=True, exist_ok=True)
    code = tmp / f"code {H}"
    code.mkdir(exist_ok=True)
    (code / "helper.py").write_text("X = 1\n")
    cpu = {"partition": "debug", "time_in_mins": 5, "extra_flags": "--comment=" + shlex.quote(HB)}
    opts = dict(code_dirs_to_mount=[str(code)], config_file=None)
    out = {"name": name, "tmp": tmp}
    if name.startswith("slurm"):
        logs = tmp / f"logs {H}"
        settings = {"SLURM_CONFIGS": {"cpu": cpu}}
        if name == "slurm_image":
            image = tmp / f"img {H}.sif"
            image.write_text("")
            data = tmp / f"data {H}"
            data.mkdir()
            settings.update(
                NON_CODE_DIRS_TO_MOUNT=[{"local_dir": str(data), "mount_point": f"/mnt/{H}"}],
                BRC_EXTRA_SINGULARITY_ARGS="--env " + shlex.quote(f"X={HB}"),
                SINGULARITY_PRE_CMDS=["export EL_PRE=" + shlex.quote(HB)],
            )
            opts["singularity_image"] = str(image)
            out.update(image=str(image), data=str(data))
        opts["config_file"] = str(write_config(tmp / "config.py", **settings))
        sweep = run_sweep(
            work, [{"x": 1}, {"x": 2}], exp_name=EXP, mode="slurm", base_log_dir=str(logs), **opts
        )
        out.update(
            sweep=sweep, logs=logs, root=sweep[0].run_dir.parent / ".batches" / sweep[0].manifest["batch_id"]
        )
        return out
    # sss / htp: a bundle, with the cluster's python at a hostile path
    logs = tmp / "local-logs"
    python = str(tmp / f"py {HB}" / "python3")
    settings = {
        "SLURM_CONFIGS": {"cpu": dict(cpu, max_num_cores_per_node=2)},
        "SSS_PRE_CMDS": ["export EL_PRE=" + shlex.quote(HB)],
    }
    if name.endswith("_image"):
        image = f"/cluster/img {H}.sif"
        settings.update(
            SSS_NON_CODE_DIRS_TO_MOUNT=[{"local_dir": f"/cluster/data {H}", "mount_point": f"/mnt/{H}"}],
            BRC_EXTRA_SINGULARITY_ARGS="--env " + shlex.quote(f"X={HB}"),
            SSS_LOG_DIR=str(tmp / f"scratch {H}" / "logs"),
            SLURM_DIRECTORY_FOR_JOB_SCRIPT=str(tmp / f"launch {H}"),
        )
        if name.startswith("htp"):
            settings["TASKFILE_PATH_ON_BRC"] = str(tmp / f"brc {H}" / "taskfile.sh")
        opts["singularity_image"] = image
        out.update(image=image)
    opts["config_file"] = str(write_config(tmp / "config.py", **settings))
    mode = name.split("_")[0]
    if mode == "htp":
        opts["ht_helper_modules"] = f"python/3.11 {HB}"
    sweep = run_sweep(
        work, [{"x": 1}, {"x": 2}], exp_name=EXP, mode=mode, base_log_dir=str(logs), python=python, **opts
    )
    root = Path(sweep[0].manifest["backend"]["bundle"])
    out.update(sweep=sweep, root=root, python=python, settings=settings, logs=logs)
    fakes.install_at(Path(python), "python3")
    return out


SCENARIOS = ["slurm_plain", "slurm_image", "sss_plain", "sss_image", "htp_plain", "htp_image"]


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    f = Fakes(tmp_path / "fakes")
    f.install("sbatch", "scontrol", "scancel", "sinfo", "singularity", "apptainer", "ht_helper.sh")
    monkeypatch.setenv("PATH", f"{f.bin}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_RECORDS", str(f.records))
    return f


def assert_not_pwned(*roots: Path) -> None:
    found = [p for root in roots for p in Path(root).rglob("*") if p.name in MARKERS]
    assert not found, f"an injected command ran: {found}"


def generated_scripts(out: dict) -> list:
    root = out["root"]
    if out["name"].startswith("slurm"):
        return sorted(root.glob("submit_*.sbatch"))
    return [root / "submit.sh", *sorted((root / "jobs").glob("*.s*"))]


def bash_n(script: Path | str, is_text: bool = False) -> None:
    cmd = ["bash", "-n", "-c", script] if is_text else ["bash", "-n", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, (script, proc.stderr)


def render_direct(where: Path) -> dict:
    """Templates of modes whose real runs are in other files (ssh, local_singularity), rendered
    with hostile values in every field; run for real where they are harmless here."""
    from easylaunch.runtimes import RunnerCommand
    from easylaunch.templating import render

    where.mkdir(parents=True, exist_ok=True)
    cmd = RunnerCommand(
        [f"/opt/{H}/python3", "-m", "easylaunch.runner"], env={"K": H}, pythonpath=[f"/z/{H}.zip"]
    )
    texts = {
        "ssh_agent.sh.j2": render("ssh_agent.sh.j2", cmd=cmd, args=[H, "--x"]),
        "ssh_probe.sh.j2": render("ssh_probe.sh.j2", python=f"/opt/{H}/python3", source=H, request=H),
        "local_pre_cmds.sh.j2": render("local_pre_cmds.sh.j2", pre_cmds=["true"]),
    }
    # modes ec2/gcp: the boot script and its stub (test_cloud*.py run them on instances)
    cloud = dict(
        provider=H,
        index=3,
        exp=H,
        batch_id=H,
        metadata_url=f"http://127.0.0.1:9/{H}",
        region=H,
        store_url=f"s3://{H}",
        fetch_source=cloud_fetch_source(),
        compute_url=f"http://127.0.0.1:9/{H}",
        terminate="1",
    )
    texts["cloud_boot.sh.j2"] = render(
        "cloud_boot.sh.j2", zips=[f"p/{H}.zip", f"q/{H}2.zip"], spec_key=H, docker_image=H, **cloud
    )
    texts["cloud_stub.sh.j2"] = render("cloud_stub.sh.j2", script_key=H, **cloud)
    out = {}
    for name, text in texts.items():
        path = where / name.replace(".j2", "")
        path.write_text(text)
        out[name] = path
    # the probe and the pre-command wrapper run for real: nothing injected may run
    subprocess.run(["bash", str(out["ssh_probe.sh.j2"])], cwd=where, capture_output=True, timeout=30)
    subprocess.run(
        ["bash", "-c", texts["local_pre_cmds.sh.j2"], "x", "echo", H],
        cwd=where,
        capture_output=True,
        timeout=30,
    )
    # the cloud scripts run for real against a bucket that does not answer: they give up
    for name in ("cloud_boot.sh.j2", "cloud_stub.sh.j2"):
        root = where / f"instance {H}"
        root.mkdir(exist_ok=True)
        env = {
            "PATH": os.environ["PATH"],
            "EASYLAUNCH_INSTANCE_ROOT": str(root),
            "EASYLAUNCH_STORE_RETRY_SECONDS": "0",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
            "AWS_ACCESS_KEY_ID": "x",
            "AWS_SECRET_ACCESS_KEY": "y",
        }
        proc = subprocess.run(["bash", str(out[name])], cwd=where, env=env, capture_output=True, timeout=60)
        assert proc.returncode != 0
        log = (root / "boot.log").read_text() if (root / "boot.log").exists() else ""
        assert name == "cloud_stub.sh.j2" or "fetching the code failed" in log, log
    assert_not_pwned(where)
    return out


def cloud_fetch_source() -> str:
    from easylaunch.modes.cloud import fetch_source

    return fetch_source()


# -- the tests ---------------------------------------------------------------------------------------


def test_every_template_is_rendered_by_a_scenario(tmp_path, fakes, monkeypatch):
    """A new template is covered automatically: some scenario below must render it."""
    seen = set()
    original = jinja2.Environment.get_template

    def recording(self, name, *args, **kwargs):
        seen.add(name if isinstance(name, str) else name.name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(jinja2.Environment, "get_template", recording)
    for name in SCENARIOS:
        launch(name, tmp_path / name, fakes)
    for name, script in render_direct(tmp_path / "direct").items():  # modes of other test files
        seen.add(name)
        bash_n(script)
    missing = template_names() - seen
    assert not missing, f"templates no scenario renders (add one to SCENARIOS): {sorted(missing)}"
    assert_not_pwned(tmp_path)


ALLOWED_FILTERS = {
    "q",
    "qjoin",
    "sh",
    "shjoin",
    "shcat",
    "comment",
    "sbatch",
    "plain",
    "int",
    "shell",
    "length",
}


def test_every_value_in_a_shell_template_goes_through_a_quoting_filter():
    """Static audit: each ``{{ ... }}`` of a shell template is a macro call or ends in a filter
    that decides how the value is written (see easylaunch/templating.py)."""
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    folder = resources.files("easylaunch.templates")
    problems = []
    for name in sorted(template_names()):
        if name.endswith(".txt.j2") and not name.endswith("taskfile.txt.j2"):
            continue  # README text: its command lines are checked by rendering below
        tree = env.parse(folder.joinpath(name).read_text())
        for output in tree.find_all(nodes.Output):
            for node in output.nodes:
                if isinstance(node, nodes.TemplateData):
                    continue
                if isinstance(node, nodes.Filter) and node.name in ALLOWED_FILTERS:
                    continue
                if isinstance(node, nodes.Call) and isinstance(node.node, (nodes.Getattr, nodes.Name)):
                    continue  # a macro: its own outputs are audited where it is defined
                problems.append(f"{name}:{node.lineno}: {node}")
    assert not problems, "values written without a quoting filter:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", SCENARIOS)
def test_hostile_values_parse_run_and_arrive_intact(name, tmp_path, fakes):
    out = launch(name, tmp_path / "t", fakes)
    for script in generated_scripts(out):
        bash_n(script)
    if not name.startswith("slurm"):
        for line in (out["root"] / "jobs" / "taskfile.txt").read_text().splitlines() if "htp" in name else []:
            bash_n(line, is_text=True)
        readme = (out["root"] / "README.txt").read_text()
        commands = [line.strip() for line in readme.splitlines() if line.startswith("       ")]
        assert any(c.startswith("bash ") for c in commands), readme
        for command in commands:
            if not command.startswith(("from ", "sweep = ")):  # the Python lines
                bash_n(command, is_text=True)
    # the #SBATCH values as sbatch reads them
    for script in generated_scripts(out) if name.startswith("slurm") else out["root"].glob("jobs/*.sbatch"):
        args = sbatch_directive_args(script.read_text())
        assert f"--comment={HB}" in args, args
        assert f"--job-name={EXP}" in args
    {
        "slurm_plain": run_slurm,
        "slurm_image": run_slurm,
        "sss_plain": run_bundle,
        "sss_image": run_bundle,
        "htp_plain": run_bundle,
        "htp_image": run_bundle,
    }[name](out, fakes)
    assert_not_pwned(tmp_path)


def run_slurm(out: dict, fakes: Fakes) -> None:
    """sbatch got the script; run it as Slurm would (array task 1) and see what it started."""
    sweep = out["sweep"]
    (call,) = fakes.calls("sbatch")
    script = Path(call["argv"][-1])
    assert call["argv"] == ["--parsable", str(script)]
    args = sbatch_directive_args(call["script"])
    output = next(a for a in args if a.startswith("--output="))
    # the '%' of the hostile log dir doubled: sbatch's file name pattern keeps it
    assert output == "--output=" + str(out["root"] / "slurm").replace("%", "%%") + "/%A_%a.out"
    cwd = out["tmp"] / "cwd"
    cwd.mkdir()
    env = fakes.env(SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_JOB_ID="4242", SLURM_JOB_ID="4244")
    proc = subprocess.run(["bash", str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tasks = str(out["root"] / "tasks.json")
    if out["name"] == "slurm_image":
        (sing,) = fakes.calls("singularity")
        argv = sing["argv"]
        assert argv[:3] == ["exec", "--env", f"X={HB}"]
        assert argv[3:7] == ["-B", f"{out['logs']}:{out['logs']}", "-B", f"{out['data']}:/mnt/{H}:ro"]
        assert argv[7:] == [out["image"], "python3", "-m", "easylaunch.runner", "--tasks", tasks] + [
            "--index",
            "1",
            "--quiet",
        ]
        assert sing["env"]["EL_PRE"] == HB  # SINGULARITY_PRE_CMDS ran, once
        assert sing["env"]["APPTAINERENV_PYTHONPATH"].startswith(str(out["logs"] / ".snapshots"))
    else:  # the real runner ran array task 1 (the second variant) from the hostile log dir
        assert Job.load(sweep[1].run_dir).result(timeout=30) == {"x": 2, "dir": str(sweep[1].run_dir)}
        assert records.read_status(sweep[0].run_dir)["state"] == State.PENDING


def run_bundle(out: dict, fakes: Fakes) -> None:
    """Copy the bundle where the cluster has it, run submit.sh, then the job as Slurm would."""
    name, tmp = out["name"], out["tmp"]
    settings = out["settings"]
    image = out.get("image")
    mode = name.split("_")[0]
    if settings.get("SLURM_DIRECTORY_FOR_JOB_SCRIPT"):
        bundle_name = out["sweep"][0].manifest["backend"]["bundle_name"]
        cluster = Path(settings["SLURM_DIRECTORY_FOR_JOB_SCRIPT"]) / bundle_name
    else:
        cluster = tmp / f"cluster {H}" / "b"
    cluster.parent.mkdir(parents=True)
    shutil.copytree(out["root"], cluster, symlinks=True)
    logs = Path(settings["SSS_LOG_DIR"]) if settings.get("SSS_LOG_DIR") else cluster / "logs"
    cwd = tmp / "cwd"
    cwd.mkdir()
    env = fakes.env(FAKE_HT_HELPER=str(HERE / "bin" / "ht_helper.sh"))
    proc = subprocess.run(
        ["bash", str(cluster / "submit.sh")], cwd=cwd, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if not image:  # the python probe failed (the stand-in says so): the warning names it intact
        assert f"easylaunch: warning: {out['python']} here is not Python" in proc.stderr, proc.stderr
    assert f"runs: {logs}/{EXP}/<run>/" in proc.stdout, proc.stdout
    calls = fakes.calls("sbatch")
    assert len(calls) == 1
    argv = calls[0]["argv"]
    slurm_out = str(logs / EXP / ".batches" / out["sweep"][0].manifest["batch_id"] / "slurm").replace(
        "%", "%%"
    )
    job_script = cluster / "jobs" / ("htp.sbatch" if mode == "htp" else "sss_000000.sbatch")
    pattern = "%j.out" if mode == "htp" else "%A_%a.out"
    assert argv == ["--parsable", f"--chdir={cluster}", f"--output={slurm_out}/{pattern}", str(job_script)]
    assert calls[0]["env"]["EASYLAUNCH_BUNDLE"] == str(cluster)
    if settings.get("SSS_LOG_DIR"):  # the code is there; the tasks make the runs' directories
        assert list((logs / ".snapshots").glob("easylaunch-*.zip"))
        assert (logs / EXP / f".bundle-{out['sweep'][0].manifest['batch_id']}").is_file()
    if settings.get("TASKFILE_PATH_ON_BRC"):
        assert (
            Path(settings["TASKFILE_PATH_ON_BRC"]).read_text()
            == (cluster / "jobs" / "taskfile.txt").read_text()
        )
    # the job, as sbatch would start it: from --chdir, with submit.sh's environment
    job_env = fakes.env(
        EASYLAUNCH_BUNDLE=str(cluster),
        SLURM_ARRAY_TASK_ID="0",
        SLURM_NTASKS="2",
        FAKE_HT_HELPER=str(HERE / "bin" / "ht_helper.sh"),
        FAKE_SINGULARITY_EXEC="1",
        FAKE_IMAGE=image or "",
    )
    proc = subprocess.run(
        ["bash", str(job_script)], cwd=cluster, env=job_env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = out["sweep"]
    pythons = [c for c in fakes.calls("python3") if c["argv"][:1] != ["-c"]]
    if mode == "htp":
        (helper,) = fakes.calls("ht_helper.sh")
        taskfile = settings.get("TASKFILE_PATH_ON_BRC") or "jobs/taskfile.txt"
        if not settings.get("TASKFILE_PATH_ON_BRC"):
            taskfile = str(cluster / taskfile)
        assert helper["argv"] == ["-m", f"python/3.11 {HB}", "-t", taskfile]
        payloads = sorted(c["argv"][2] for c in pythons)
        assert payloads == sorted(str(logs / EXP / r.run_dir.name / "payload.pkl") for r in runs)
        packs = sorted({c["argv"][4] for c in pythons})
        assert all(Path(p).is_file() and Path(p).parent == cluster / "jobs" / "runs" for p in packs), packs
        tail = [
            ["-m", "easylaunch.runner", c["argv"][2], "--from-pack", c["argv"][4], "--quiet"] for c in pythons
        ]
        assert sorted(c["argv"] for c in pythons) == sorted(tail)
    else:
        (call,) = pythons
        assert call["argv"] == ["-m", "easylaunch.runner", "--tasks", f"{cluster}/jobs/tasks.json"] + [
            "--index",
            "0",
            "--quiet",
        ]
    for call in pythons:
        assert call["argv0"] == out["python"]
        assert call["env"]["EL_PRE"] == HB  # SSS_PRE_CMDS ran once, inside the container if any
        if not image:
            assert call["env"]["PYTHONPATH"].startswith(f"{logs}/.snapshots/easylaunch-")
    if image:
        sings = fakes.calls("singularity")
        assert len(sings) == len(pythons) >= 1
        for sing in sings:
            argv = sing["argv"]
            assert argv[:3] == ["exec", "--env", f"X={HB}"]
            binds = ["-B", str(cluster), "-B", str(logs), "-B", f"/cluster/data {H}:/mnt/{H}"]
            assert argv[3:9] == binds and argv[9] == image
            assert argv[10:12] == ["/bin/bash", "-c"]
            assert sing["env"]["APPTAINERENV_PYTHONPATH"].startswith(f"{logs}/.snapshots/easylaunch-")


# -- what cannot be rendered safely is refused up front ----------------------------------------------


def assert_refused(tmp_path, exc, match, **kwargs):
    kwargs.setdefault("base_log_dir", str(tmp_path / "refused-logs"))
    logs = Path(kwargs["base_log_dir"])
    with pytest.raises(exc, match=match):
        run_sweep(work, [{"x": 1}], exp_name="refused", code_dirs_to_mount=[str(tmp_path)], **kwargs)
    assert not (logs / "refused").exists()


@pytest.mark.parametrize("mode", ["slurm", "sss", "htp"])
def test_a_newline_where_a_line_must_stay_one_line_is_refused(mode, tmp_path, fakes):
    cfg = {"partition": "debug", "max_num_cores_per_node": 2}
    bad_flags = write_config(
        tmp_path / "bad.py", SLURM_CONFIGS={"cpu": dict(cfg, extra_flags="--comment='two\nlines'")}
    )
    assert_refused(
        tmp_path, SlurmConfigError, r"extra_flags=.*'\\n'.*#SBATCH", mode=mode, config_file=str(bad_flags)
    )
    good = write_config(tmp_path / "good.py", SLURM_CONFIGS={"cpu": cfg})
    if mode == "slurm":
        for bad in ("a\nb", "a\\b"):
            assert_refused(
                tmp_path,
                SlurmConfigError,
                "log dir .* --output",
                mode=mode,
                config_file=str(good),
                base_log_dir=str(tmp_path / bad),
            )
    else:
        assert_refused(
            tmp_path, ValueError, "option python=", mode=mode, config_file=str(good), python="py\nthon"
        )
    with pytest.raises(ValueError, match="exp_name"):
        run_sweep(work, [{"x": 1}], exp_name="a\nb", mode=mode, config_file=str(good))


@pytest.mark.parametrize("mode", ["slurm", "sss"])
def test_bind_paths_singularity_would_split_are_refused(mode, tmp_path, fakes):
    image = tmp_path / "img.sif"
    image.write_text("")
    key = "NON_CODE_DIRS_TO_MOUNT" if mode == "slurm" else "SSS_NON_CODE_DIRS_TO_MOUNT"
    config = write_config(
        tmp_path / "c.py",
        SLURM_CONFIGS={"cpu": {"partition": "debug"}},
        **{key: [{"local_dir": "/data/a,b", "mount_point": "/mnt"}]},
    )
    assert_refused(
        tmp_path,
        ValueError,
        rf"{key}\[0\]\['local_dir'\] = '/data/a,b' holds ':', ','.*-B",
        mode=mode,
        config_file=str(config),
        singularity_image=str(image),
    )
    if mode == "slurm":
        plain = write_config(tmp_path / "p.py", SLURM_CONFIGS={"cpu": {"partition": "debug"}})
        assert_refused(
            tmp_path,
            ValueError,
            "log dir .*':' or ','",
            mode=mode,
            config_file=str(plain),
            singularity_image=str(image),
            base_log_dir=str(tmp_path / "a:b"),
        )
    else:
        paths = write_config(
            tmp_path / "s.py",
            SLURM_CONFIGS={"cpu": {"partition": "debug"}},
            SSS_LOG_DIR="/scratch/a,b",
        )
        assert_refused(
            tmp_path,
            BundleError,
            "SSS_LOG_DIR.*':' or ','",
            mode=mode,
            config_file=str(paths),
            singularity_image=str(image),
        )


def test_submit_sh_refuses_a_bundle_path_sbatch_or_singularity_cannot_take(tmp_path, fakes):
    config = write_config(tmp_path / "c.py", SLURM_CONFIGS={"cpu": {"partition": "debug"}})
    sweep = run_sweep(
        work,
        [{"x": 1}],
        exp_name="paths",
        mode="sss",
        config_file=str(config),
        singularity_image="/img.sif",
        code_dirs_to_mount=[str(tmp_path)],
        base_log_dir=str(tmp_path / "logs"),
    )
    bundle = Path(sweep[0].manifest["backend"]["bundle"])
    for bad, why in (("back\\slash", "backslash"), ("co,mma", "':' or ','")):
        where = tmp_path / bad / "b"
        shutil.copytree(bundle, where)
        proc = subprocess.run(
            ["bash", str(where / "submit.sh")], env=fakes.env(), capture_output=True, text=True
        )
        assert proc.returncode == 2 and why in proc.stderr, proc.stderr
    assert fakes.calls("sbatch") == []


def test_comment_filter_keeps_a_comment_on_one_line():
    from easylaunch.templating import comment

    assert comment("a\nb\r\x1b\u2028") == "a\\nb\\r\\x1b\\u2028"
    assert "\n" not in comment(H + "\n" + HB)


@pytest.mark.parametrize("mode", ["sss", "htp"])
def test_python_option_is_a_word_not_code_on_the_login_node(mode, tmp_path, fakes):
    """Issue 7 item 14: python= was written unquoted into an echo of submit.sh's preflight."""
    config = write_config(
        tmp_path / "c.py", SLURM_CONFIGS={"cpu": {"partition": "debug", "max_num_cores_per_node": 2}}
    )
    for i, python in enumerate(["/opt/py/$(touch PWNED)/python3", '/opt/"py/`touch PWNED2`/python3']):
        sweep = run_sweep(
            work,
            [{"x": 1}],
            exp_name=f"py{i}",
            mode=mode,
            config_file=str(config),
            python=python,
            code_dirs_to_mount=[str(tmp_path)],
            base_log_dir=str(tmp_path / "logs"),
        )
        submit = Path(sweep[0].manifest["backend"]["bundle"]) / "submit.sh"
        bash_n(submit)
        proc = subprocess.run(
            ["bash", str(submit)], cwd=tmp_path, env=fakes.env(), capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr
        assert f"easylaunch: warning: {python} here is not Python" in proc.stderr, proc.stderr
        assert_not_pwned(tmp_path)
