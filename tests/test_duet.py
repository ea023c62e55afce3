"""easylaunch duet: config parsing, naming, pairing and statistics (no service), and real duets on
Docker and Podman (the README example, a 30% CPU A/B, failure and Ctrl-C cleanup)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ENGINE_HOSTS, engine_client, require_service

from easylaunch.duet.analyze import analyze, pair_iterations
from easylaunch.duet.config import DuetConfigError, load_configs, parse_result_name, result_name
from easylaunch.duet.process import COLUMNS, parse_plain, parse_renaissance, process

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore:not in a git repository")]

IMAGE_VARS = {"docker": "EASYLAUNCH_TEST_DOCKER_IMAGE", "podman": "EASYLAUNCH_TEST_PODMAN_IMAGE"}

README_CONFIG = """\
duetbench:
  suite: {suite}
  verbose: true
  seed: 42
  docker_command: {engine}
  remove_containers: true
  duet_repetitions: 2
  sequential_repetitions: 1
  schedule: randomized_interleaving_trials
  artifacts:
    osrelease: cat /etc/os-release
  image: {busybox}
  results:
    - /duet/results
  duets:
    - a-benchmark

a-benchmark:
  duet_repetitions: 3
  A:
    run: mkdir -p /duet && echo RunningA > /duet/results
  B:
    image: {python}
    run: mkdir -p /res && echo RunningB > /res/results
    results:
      - /res/results
"""


def write(tmp_path: Path, text: str, name: str = "c.duet.yml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def cli(*args: str, env: dict | None = None, timeout: float = 280) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "easylaunch.cli", "duet", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)  # fmt: skip


# ---------------------------------------------------------------- no service


def test_readme_config_parses(tmp_path):
    cfg = load_configs(
        [write(tmp_path, README_CONFIG.format(suite="s", engine="docker", busybox="bb", python="py"))]
    )[0]
    assert cfg.suite == "s" and cfg.seed == 42 and cfg.docker_command == "docker"
    (d,) = cfg.duets
    assert d.name == "a-benchmark" and d.duet_repetitions == 3 and d.sequential_repetitions == 1
    assert (d.a.image, d.a.results) == ("bb", ["/duet/results"])
    assert (d.b.image, d.b.results) == ("py", ["/res/results"])
    assert {"uname", "lscpu", "meminfo", "hostname", "date", "osrelease"} <= set(cfg.artifacts)


def test_no_b_is_an_aa_run(tmp_path):
    text = "duetbench:\n  suite: s\n  image: i\n  results: [/r]\n  duets: [x]\nx:\n  A:\n    run: echo\n"
    (d,) = load_configs([write(tmp_path, text)])[0].duets
    assert d.aa and d.b == d.a


@pytest.mark.parametrize(
    "text, key",
    [
        ("x: 1\n", "`duetbench`"),
        ("duetbench:\n  suite: s\n  image: i\n  results: [/r]\n  duets: [x]\n", "`x`"),
        ("duetbench:\n  suite: s\n  image: i\n  results: [/r]\n  duets: [x]\nx:\n  B:\n    run: a\n", "`x.A`"),
        ("duetbench:\n  suite: s\n  results: [/r]\n  duets: [x]\nx:\n  A:\n    run: a\n", "`x.A.image`"),
        ("duetbench:\n  suite: s\n  image: i\n  results: [r]\n  duets: [x]\nx:\n  A:\n    run: a\n", "`x.A.results`"),
        ("duetbench:\n  suite: s\n  image: i\n  results: [/r]\n  duets: [x]\n  duet_repetitions: -1\nx:\n  A:\n    run: a\n",
         "`x.duet_repetitions`"),
        ("duetbench:\n  suite: s\n  schedule: random\n  image: i\n  results: [/r]\n  duets: [x]\nx:\n  A:\n    run: a\n",
         "`duetbench.schedule`"),
        ("duetbench: [\n", "not valid YAML"),
    ],
)  # fmt: skip
def test_bad_configs_name_the_key_and_create_nothing(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(DuetConfigError, match=key.replace(".", r"\.").replace("`", "`")):
        load_configs([path])
    out = tmp_path / "out"
    proc = cli(str(path), "--outdir", str(out), timeout=60)
    assert proc.returncode == 2 and key in proc.stderr, proc.stderr
    assert not out.exists()


def test_unknown_key_warns_with_the_closest_name(tmp_path):
    text = "duetbench:\n  suite: s\n  sedd: 1\n  name: t\n  image: i\n  results: [/r]\n  duets: [x]\nx:\n  A:\n    run: a\n"
    with pytest.warns(UserWarning, match="`duetbench.sedd`.*did you mean `seed`"):
        load_configs([write(tmp_path, text)])


def test_renaissance_parser(tmp_path):
    # the shape Renaissance's harness writes (ResultWriter.scala, format_version 5): the JVM's
    # start in environment.vm.start_unix_ms, per iteration uptime_ns (since that start) and
    # duration_ns, among other metrics
    doc = {
        "format_version": 5,
        "benchmarks": ["chi-square"],
        "environment": {
            "os": {"name": "Linux", "arch": "amd64", "available_processors": 2},
            "vm": {
                "name": "OpenJDK 64-Bit Server VM",
                "start_unix_ms": 1000,
                "start_iso": "x",
                "uptime_ms": 9,
            },
            "jre": {"name": "OpenJDK Runtime Environment"},
        },
        "suite": {"name": "Renaissance Benchmark Suite", "version": "0.15.0"},
        "data": {
            "chi-square": {
                "results": [
                    {"duration_ns": 10, "uptime_ns": 5, "cpu_time_ns": 3},
                    {"duration_ns": 7, "uptime_ns": 20},
                ],
                "termination": "normal",
            }
        },
    }
    (tmp_path / "r.json").write_text(json.dumps(doc))
    expected = [(1000 * 10**6 + 5, 1000 * 10**6 + 15), (1000 * 10**6 + 20, 1000 * 10**6 + 27)]
    assert list(parse_renaissance(tmp_path / "r.json")) == expected
    # its --csv output: metric columns in name order, then vm_start_unix_ms
    (tmp_path / "r.csv").write_text(
        "benchmark,duration_ns,uptime_ns,vm_start_unix_ms\nchi-square,10,5,1000\nchi-square,7,20,1000\n"
    )
    assert list(parse_renaissance(tmp_path / "r.csv")) == expected
    # without the JVM's start the iterations cannot be placed in time: a clear error, not 0
    del doc["environment"]["vm"]["start_unix_ms"]
    (tmp_path / "r.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="start_unix_ms"):
        list(parse_renaissance(tmp_path / "r.json"))


def test_existing_outdir_refused(tmp_path):
    path = write(tmp_path, README_CONFIG.format(suite="s", engine="docker", busybox="bb", python="py"))
    (tmp_path / "out").mkdir()
    proc = cli(str(path), "--outdir", str(tmp_path / "out"), timeout=60)
    assert proc.returncode == 2 and "exists" in proc.stderr


def test_no_engine_at_the_socket_is_named_before_anything_is_made(tmp_path):
    path = write(tmp_path, README_CONFIG.format(suite="s", engine="docker", busybox="b", python="p"))
    for host, says in (
        (f"unix://{tmp_path}/no.sock", f"no docker engine answers at unix://{tmp_path}/no.sock"),
        ("tcp://127.0.0.1:2375", "talks to docker through a unix socket; give --docker-host"),
    ):
        proc = cli(str(path), "--outdir", str(tmp_path / "out"), "--docker-host", host, timeout=60)
        assert proc.returncode == 1 and says in proc.stderr.strip().splitlines()[-1], proc.stderr
        assert not (tmp_path / "out").exists()


def test_help_shows_all_three_forms():
    proc = cli("--help", timeout=60)
    assert proc.returncode == 0
    assert "--outdir" in proc.stdout and "duet process" in proc.stdout and "duet analyze" in proc.stdout
    assert "95% BCa" in proc.stdout and "%%" not in proc.stdout  # a description is not %-formatted
    assert "--min-overlap" in cli("analyze", "--help", timeout=60).stdout


def test_result_names_round_trip():
    name = result_name("renaissance", "chi-square", 1, "duet", "BA", "A", "results.json")
    assert name == "renaissance.chi-square.1.duet.BA.A.results.json"
    assert parse_result_name(name) == dict(suite="renaissance", benchmark="chi-square", runid=1, kind="duet",
                                           order="BA", pair="A", file="results.json")  # fmt: skip
    assert parse_result_name("artifacts") is None and parse_result_name("a.b.x.duet.AB.A.f") is None


def test_import_easylaunch_stays_light():
    code = "import sys, easylaunch, easylaunch.duet, easylaunch.cli; print(sorted({'scipy','yaml','docker'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"


def test_plain_parser_and_schema(tmp_path):
    out = tmp_path / "res"
    (out / "artifacts").mkdir(parents=True)
    (out / "artifacts" / "hostname").write_text("box\n")
    (out / "s.b.0.duet.AB.A.t.timings").write_text("# start end\n100 200\n200 350\n")
    (out / "s.b.0.duet.AB.B.t.timings").write_text("110 190\n")
    cfg = write(
        tmp_path, "duetbench:\n  suite: s\n  image: i\n  results: [/t]\n  duets: [b]\nb:\n  A:\n    run: a\n"
    )
    frame = process(load_configs([cfg]), out)
    assert list(frame.columns[: len(COLUMNS)]) == COLUMNS and "artifact_hostname" in frame
    assert frame.iteration_time_ns.tolist() == [100, 150, 80]
    assert (frame.artifact_hostname == "box").all()
    (tmp_path / "bad").write_text("1 2 3\n")
    with pytest.raises(ValueError, match="start_ns end_ns"):
        list(parse_plain(tmp_path / "bad"))


def test_pairing_by_overlap_and_index():
    rows = []

    def add(kind, pair, it, s, e):  # noqa: E306
        rows.append(dict(suite="s", benchmark="b", runid=0, kind=kind, iteration=it, pair=pair, order="AB",
                         epoch_start_ms=0, iteration_time_ns=e - s, iteration_start_ns=s, iteration_end_ns=e))  # fmt: skip

    add("duet", "A", 0, 0, 100)
    add("duet", "A", 1, 100, 200)
    add("duet", "B", 0, 30, 130)  # overlaps A0 by 70 (>= 40 of both): paired; A1 by 30: not
    add("duet", "B", 1, 180, 400)  # overlaps A1 by 20: below 0.4 of both
    add("seq", "A", 0, 0, 10)
    add("seq", "B", 0, 500, 512)
    pairs = pair_iterations(pd.DataFrame(rows))
    assert pairs[["kind", "a_ns", "b_ns"]].values.tolist() == [["duet", 100, 100], ["seq", 10, 12]]
    assert pair_iterations(pd.DataFrame(rows), min_overlap=0.05).query("kind == 'duet'").shape[0] == 2


def synthetic(slowdown: float, n: int = 60, seed: int = 1) -> pd.DataFrame:
    """Duet iterations of A and B started together; shared noise hits both, B is ``slowdown`` slower."""
    rng = np.random.default_rng(seed)
    rows, t = [], 1_700_000_000 * 10**9
    for i in range(n):
        shared = rng.normal(1.0, 0.1)
        for pair, f in (("A", 1.0), ("B", 1.0 + slowdown)):
            d = int(1e8 * shared * f * rng.normal(1.0, 0.02))
            rows.append(dict(suite="s", benchmark="b", runid=0, kind="duet", iteration=i, pair=pair, order="AB",
                             epoch_start_ms=t // 10**6, iteration_time_ns=d, iteration_start_ns=t,
                             iteration_end_ns=t + d))  # fmt: skip
        t += int(1.3e8)
    return pd.DataFrame(rows)


def test_aa_says_no_change_and_10pct_slowdown_is_detected(tmp_path):
    aa = analyze(synthetic(0.0)).iloc[0]
    assert aa.verdict == "no change" and aa.ci_low_ns <= 0 <= aa.ci_high_ns, aa
    ab = analyze(synthetic(0.10)).iloc[0]
    assert ab.ci_low_ns > 0 and ab.verdict.startswith("B slower by"), ab
    assert 8 < float(ab.verdict.split()[-1].rstrip("%")) < 12 and ab.mannwhitney_p < 0.05 or ab.ci_low_ns > 0
    fast = analyze(synthetic(-0.10)).iloc[0]
    assert fast.ci_high_ns < 0 and fast.verdict.startswith("B faster")
    print(f"A/A CI [{aa.ci_low_ns / 1e6:.3f}, {aa.ci_high_ns / 1e6:.3f}] ms; 10% CI "
          f"[{ab.ci_low_ns / 1e6:.3f}, {ab.ci_high_ns / 1e6:.3f}] ms, {ab.verdict}")  # fmt: skip
    # the CLI: CSV in, report and plot out
    csv = tmp_path / "o.csv"
    synthetic(0.10).to_csv(csv, index=False)
    proc = cli("analyze", str(csv), "-o", str(tmp_path / "r.png"), timeout=120)
    assert proc.returncode == 0 and "B slower by" in proc.stdout, proc.stderr
    assert (tmp_path / "r.png").stat().st_size > 1000


# ---------------------------------------------------------------- real engines


@pytest.fixture(params=["docker", "podman"])
def engine(request):
    require_service(request.param)
    return request.param


def images(engine: str) -> dict:
    return dict(busybox=os.environ[IMAGE_VARS[engine] + "_NOPYTHON"], python=os.environ[IMAGE_VARS[engine]])


def left(engine: str, suite: str) -> list:
    client = engine_client(engine)
    try:
        return [
            c.name
            for c in client.containers.list(all=True, filters={"label": f"io.easylaunch.duet.suite={suite}"})
        ]
    finally:
        client.close()


def test_readme_example_end_to_end(tmp_path, engine):
    suite = f"readme{uuid.uuid4().hex[:6]}"
    path = write(tmp_path, README_CONFIG.format(suite=suite, engine=engine, **images(engine)))
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = cli(
        str(path),
        "--outdir",
        str(out),
        "--docker",
        engine,
        env={"DOCKER_HOST": os.environ[ENGINE_HOSTS[engine]]},
    )
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    assert len(names) == 3 * 2 + 2, names
    for n in names:
        meta = parse_result_name(n)
        assert (
            meta
            and meta["suite"] == suite
            and meta["benchmark"] == "a-benchmark"
            and meta["file"] == "results"
        )
        assert (out / n).read_text().strip() == f"Running{meta['pair']}"
    assert {parse_result_name(n)["kind"] for n in names} == {"duet", "seq"}
    assert {f"{suite}.a-benchmark.{i}.duet" for i in range(3)} == {
        n.rsplit(".", 3)[0] for n in names if ".duet." in n
    }
    arts = {p.name for p in (out / "artifacts").iterdir()}
    assert {"uname", "lscpu", "meminfo", "hostname", "date", "osrelease"} <= arts
    assert "Linux" in (out / "artifacts" / "uname").read_text()
    assert "MemTotal" in (out / "artifacts" / "meminfo").read_text()
    assert left(engine, suite) == []
    print(f"{engine}: README example end to end in {took:.1f}s")


def test_the_duet_job_carries_its_configs_and_brings_its_results_back(tmp_path, engine, log_dir):
    # the duet as a job on another mode (local_pool here): the configs travel by value (the
    # launching machine's paths mean nothing on a remote target), the results are written in the
    # run directory (which every mode brings back) and then moved to --outdir
    suite = f"job{uuid.uuid4().hex[:6]}"
    text = README_CONFIG.format(suite=suite, engine=engine, **images(engine))
    path = write(tmp_path, text)
    out = tmp_path / "out"
    proc = cli(str(path), "--outdir", str(out), "--docker", engine, "--mode", "local_pool",
               env={"DOCKER_HOST": os.environ[ENGINE_HOSTS[engine]]})  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = Path(proc.stdout.rsplit("run directory ", 1)[1].strip())
    assert run_dir.is_relative_to(log_dir)
    assert (run_dir / "duet-configs" / path.name).read_text() == text  # reproducible from the run dir
    variant = json.loads((run_dir / "variant.json").read_text())
    assert str(tmp_path) not in json.dumps(variant)
    assert not (run_dir / "duet-results").exists()
    assert len([p for p in out.iterdir() if p.is_file()]) == 3 * 2 + 2
    assert (out / "artifacts" / "uname").is_file()
    assert left(engine, suite) == []


CPU_RUN = """python3 -c '
import time
with open("/tmp/cpu.timings", "w") as f:
    for _ in range(ITERS):
        s = time.time_ns()
        x = 0
        for i in range(WORK):
            x += i * i
        f.write("%d %d\\n" % (s, time.time_ns()))
'"""


def cpu_config(
    suite: str,
    python: str,
    engine: str,
    work_b: int,
    run_a: str | None = None,
    reps: int = 2,
    iters: int = 15,
) -> str:
    block = lambda w: textwrap.indent(CPU_RUN.replace("ITERS", str(iters)).replace("WORK", str(w)), "      ")  # noqa: E731
    return (f"duetbench:\n  suite: {suite}\n  seed: 7\n  docker_command: {engine}\n  duet_repetitions: {reps}\n"
            f"  image: {python}\n  results: [/tmp/cpu.timings]\n  duets: [loop]\n"
            f"loop:\n  A:\n    run: |\n{run_a or block(200000)}\n  B:\n    run: |\n{block(work_b)}\n")  # fmt: skip


def test_real_ab_30pct_more_work_is_detected(tmp_path, engine):
    suite = f"cpu{uuid.uuid4().hex[:6]}"
    # 5 repetitions of 40 iterations: the noise of a shared 2-core machine (a whole test suite
    # beside it) must not hide a 30% difference (15 iterations once gave 60 pairs, ratio 1.15
    # and a CI that touched 0)
    path = write(tmp_path, cpu_config(suite, images(engine)["python"], engine, 260000, reps=5, iters=40))
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = cli(str(path), "--outdir", str(out), env={"DOCKER_HOST": os.environ[ENGINE_HOSTS[engine]]})
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    csv = tmp_path / "o.csv"
    proc = cli("process", "-c", str(path), str(out), "-o", str(csv), timeout=120)
    assert proc.returncode == 0, proc.stderr
    frame = pd.read_csv(csv)
    assert len(frame) == 2 * 5 * 40
    report = analyze(frame)
    row = report.iloc[0]
    print(f"{engine}: 30% A/B in {took:.1f}s: {row.pairs} pairs, CI [{row.ci_low_ns / 1e6:.2f}, "
          f"{row.ci_high_ns / 1e6:.2f}] ms, ratio {row.mean_ratio:.3f}, {row.verdict}")  # fmt: skip
    assert row.ci_low_ns > 0 and row.verdict.startswith("B slower"), report.to_string()
    assert left(engine, suite) == []


def test_failing_benchmark_removes_containers(tmp_path, engine):
    suite = f"fail{uuid.uuid4().hex[:6]}"
    path = write(tmp_path, cpu_config(suite, images(engine)["python"], engine, 1000, run_a="      exit 3"))
    proc = cli(
        str(path), "--outdir", str(tmp_path / "out"), env={"DOCKER_HOST": os.environ[ENGINE_HOSTS[engine]]}
    )
    assert proc.returncode == 1 and "exit 3" in proc.stderr, proc.stderr
    assert left(engine, suite) == []


def test_a_missing_image_is_named_and_nothing_is_left(tmp_path, engine):
    suite = f"noimg{uuid.uuid4().hex[:6]}"
    text = README_CONFIG.format(suite=suite, engine=engine, **images(engine))
    path = write(tmp_path, text.replace("image: " + images(engine)["python"], "image: local/no-such-image:1"))
    out = tmp_path / "out"
    proc = cli(str(path), "--outdir", str(out), env={"DOCKER_HOST": os.environ[ENGINE_HOSTS[engine]]})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # after the run's own traceback (its stderr)
    assert last.startswith("easylaunch duet: the duet failed: ") and "could not be pulled" in last, last
    assert "image 'local/no-such-image:1' is not on the engine at unix://" in last, last
    assert left(engine, suite) == []  # A's container, started first, is removed too


def test_ctrl_c_removes_containers(tmp_path, engine):
    suite = f"intr{uuid.uuid4().hex[:6]}"
    text = README_CONFIG.format(suite=suite, engine=engine, **images(engine)).replace(
        "echo RunningA", "sleep 60; echo"
    )
    path = write(tmp_path, text)
    code = ("import sys; from easylaunch.duet import load_configs, run_duets; "
            "run_duets(load_configs([sys.argv[1]]), sys.argv[2])")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code, str(path), str(tmp_path / "out")],
                            env={**os.environ, "DOCKER_HOST": os.environ[ENGINE_HOSTS[engine]]},
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 120
    while len(left(engine, suite)) < 2:
        assert time.monotonic() < deadline and proc.poll() is None, "the containers never started"
        time.sleep(0.3)
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    assert left(engine, suite) == []


def test_without_the_duet_extra_the_cli_says_what_to_install(monkeypatch, tmp_path, capsys):
    from easylaunch import cli

    monkeypatch.setitem(sys.modules, "yaml", None)  # as if pyyaml were not installed
    config = tmp_path / "c.yml"
    config.write_text("duetbench: {}\n")
    assert cli.main(["duet", str(config), "--outdir", str(tmp_path / "out")]) == 2
    assert "pip install 'easylaunch[duet]'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
