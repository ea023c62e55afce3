"""SlurmConfig, time limits and named-config resolution (pure; the cluster tests are in test_slurm.py)."""

from __future__ import annotations

import pytest

from easylaunch.runtimes import RunnerCommand, Shell
from easylaunch.slurm_config import (
    SlurmConfig,
    SlurmConfigError,
    parse_time,
    resolve_slurm_config,
    sbatch_line,
)
from easylaunch.templating import render


@pytest.mark.parametrize(
    "value, minutes",
    [
        (90, 90),
        (1.4, 1),
        (0.2, 1),
        ("90", 90),
        ("1:30:00", 90),
        ("0:02:30", 3),
        ("1:30", 2),
        ("2-00:00:00", 2880),
        ("1-2", 1560),
        ("1-2:30", 1590),
    ],
)
def test_parse_time(value, minutes):
    assert parse_time(value) == minutes


@pytest.mark.parametrize("value", ["abc", "", "1:2:3:4", "90min", "0", "0:00:00", 0, -1, True, None, [5]])
def test_parse_time_refuses(value):
    with pytest.raises(SlurmConfigError, match="time_in_mins=.*(time limit|positive)"):
        parse_time(value)


def test_every_doodad_field_and_the_extras_render():
    cfg = SlurmConfig(
        account_name="acct",
        partition="gpu_part",
        time_in_mins=90,
        max_num_cores_per_node=8,
        n_gpus=2,
        n_cpus_per_task=4,
        n_nodes=1,
        extra_flags="--qos rail_normal --mail-user=me@x.edu --mail-type=FAIL --comment 'two words'",
        mem="8G",
        qos="high",
        constraint="a100|v100",
        gres=None,
    )
    assert [sbatch_line(d) for d in cfg.directives()] == [
        "--account=acct",
        "--partition=gpu_part",
        "--time=90",
        "--nodes=1",
        "--cpus-per-task=4",
        "--gpus=2",
        "--mem=8G",
        "--qos=high",
        "--constraint=a100|v100",
        "--qos rail_normal",  # doodad's style: one #SBATCH line per flag with its value
        "--mail-user=me@x.edu",
        "--mail-type=FAIL",
        '--comment "two words"',
    ]
    assert "--gres=gpu:a100:2" in cfg.replace(gres="gpu:a100:2").argv()
    assert "--gpus=2" not in cfg.replace(gres="gpu:a100:2").argv()
    assert "--gres=shard:1" in cfg.replace(n_gpus=0, gres="shard:1").argv()
    assert cfg.directives(time_in_mins=5)[2] == ["--time=5"]
    assert cfg.argv()[-6:] == [
        "--qos",
        "rail_normal",
        "--mail-user=me@x.edu",
        "--mail-type=FAIL",
        "--comment",
        "two words",
    ]
    assert [
        sbatch_line(d) for d in SlurmConfig(extra_flags="--comment='a b' --nice=-5").directives()[-2:]
    ] == [
        '--comment="a b"',
        "--nice=-5",
    ]
    assert SlurmConfig().argv(shape=False) == []


@pytest.mark.parametrize(
    "token, line",
    [
        ("--qos=normal", "--qos=normal"),
        ("--comment=two words", '--comment="two words"'),
        ("two words", '"two words"'),
        ("--comment=it's", '--comment="it\'s"'),
        ('--comment=say "hi" \\ #1', '--comment="say \\"hi\\" \\\\ #1"'),
        ("--comment=$(x) `y` ü", '--comment="$(x) `y` ü"'),
        ("--comment=", "--comment="),
        ("", '""'),
    ],
)
def test_sbatch_line_quotes_for_sbatchs_own_parser(token, line):
    from shellfakes import sbatch_directive_args

    assert sbatch_line(token) == line
    assert sbatch_directive_args(f"#SBATCH {line}\n") == [token]


def test_sbatch_line_refuses_what_one_line_cannot_carry():
    for bad in ("--comment=a\nb", "--comment=a\rb", "x\0"):
        with pytest.raises(SlurmConfigError, match="#SBATCH line cannot carry"):
            sbatch_line(bad)


def test_rendered_script_has_one_directive_per_line():
    cfg = SlurmConfig(partition="short", extra_flags="--qos normal --comment 'two words'")
    script = render(
        "slurm_array.sh.j2",
        version="x",
        exp_name="e",
        batch_id="b",
        first_group=0,
        last_group=3,
        tasks_file="/logs/e/.batches/b/tasks.json",
        job_name="e",
        array_spec="0-3%2",
        output_pattern="/logs/e/.batches/b/slurm/%A_%a.out",
        signal_seconds=60,
        requeue=True,
        directives=cfg.directives(),
        runner=RunnerCommand(["/venv/bin/python", "-m", "easylaunch.runner"], env={"K": "v w"}),
        args=[
            "--tasks",
            "/logs/e/.batches/b/tasks.json",
            "--index",
            Shell('"$((SLURM_ARRAY_TASK_ID + 0))"'),
            "--quiet",
        ],
    )
    lines = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert lines == [
        "#SBATCH --job-name=e",
        "#SBATCH --array=0-3%2",
        "#SBATCH --output=/logs/e/.batches/b/slurm/%A_%a.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=B:USR2@60",
        "#SBATCH --requeue",
        "#SBATCH --partition=short",
        "#SBATCH --nodes=1",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --qos normal",
        '#SBATCH --comment "two words"',
    ]
    assert "export K='v w'" in script
    assert script.rstrip().endswith('--index "$((SLURM_ARRAY_TASK_ID + 0))" --quiet')


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"partiton": "x"}, "unknown field.*'partiton' \\(did you mean 'partition'\\?\\)"),
        ({"partition": "a b"}, "partition='a b' has characters"),
        ({"account_name": "x;rm"}, "account_name='x;rm'"),
        ({"n_cpus_per_task": 0}, "n_cpus_per_task=0 must be a positive integer"),
        ({"n_gpus": -1}, "n_gpus=-1 must be a non-negative integer"),
        ({"n_nodes": True}, "n_nodes=True"),
        ({"time_in_mins": "soon"}, "time_in_mins='soon'"),
        ({"extra_flags": "--comment='x"}, "cannot be parsed"),
        ({"extra_flags": "normal --qos"}, "must start with an sbatch flag"),
        ({"extra_flags": ["--qos"]}, "must be a string"),
        ({"extra_flags": "--comment='a\nb'"}, "holds '\\\\n': an #SBATCH line cannot carry it"),
        ({"n_cpus_per_task": 16, "max_num_cores_per_node": 8}, "exceeds max_num_cores_per_node=8"),
    ],
)
def test_bad_fields_name_the_config(fields, message):
    with pytest.raises(SlurmConfigError, match=message) as info:
        SlurmConfig.from_mapping(fields, "mycfg")
    assert "mycfg" in str(info.value)


CONFIGS = {
    "cpu": {"partition": "debug", "time_in_mins": 60},
    "gpu": {"partition": "gpu", "n_gpus": 1, "n_cpus_per_task": 2},
    "big": {"partition": "debug", "mem": "64G"},
}


def test_resolution_by_name_then_by_use_gpu():
    assert resolve_slurm_config(CONFIGS, None, False) == (
        "cpu",
        SlurmConfig(partition="debug", time_in_mins=60),
    )
    name, cfg = resolve_slurm_config(CONFIGS, None, True)
    assert name == "gpu" and cfg.n_gpus == 1 and cfg.n_cpus_per_task == 2
    name, cfg = resolve_slurm_config(CONFIGS, "big", False, {"time_in_mins": 5, "qos": None})
    assert name == "big" and cfg.mem == "64G" and cfg.time_in_mins == 5 and cfg.qos is None
    assert resolve_slurm_config({}, None, False) == ("cpu", SlurmConfig())  # no config file: cluster defaults


def test_resolution_errors():
    with pytest.raises(
        SlurmConfigError, match="unknown slurm_config_name 'gpus'; SLURM_CONFIGS has: big, cpu, gpu"
    ):
        resolve_slurm_config(CONFIGS, "gpus", False)
    with pytest.raises(SlurmConfigError, match="SLURM_CONFIGS is empty"):
        resolve_slurm_config({}, "cpu", False)
    with pytest.raises(SlurmConfigError, match="use_gpu=True but slurm config 'big' asks for no GPU"):
        resolve_slurm_config(CONFIGS, "big", True)
    with pytest.raises(SlurmConfigError, match="slurm config 'cpu': n_cpus_per_task=0"):
        resolve_slurm_config(CONFIGS, None, False, {"n_cpus_per_task": 0})
