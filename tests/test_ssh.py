"""Mode ``ssh`` against the REAL sshd of scripts/services/sshd.sh: a host that shares no
filesystem with the launcher (its sessions are chrooted into their own Debian root, with
bullseye's python3.9 as a Python of another minor, a 4 MiB tmpfs at /srv/full, a directory the
user cannot write at /srv/readonly, and dockerd's socket relayed in).

Every test uses its own remote log dir under the remote user's home and removes it afterwards
(through SSH: the tests do not read the remote's files from this side either, except where a
test says so). Job functions are pickled by value (the remote has neither pytest nor this file).
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import cloudpickle
import pytest
from conftest import require_service, wait_for
from txlog_checks import check_complete

from easylaunch import State, run_experiment, run_sweep
from easylaunch.cloudsim.players import free_port

cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = [pytest.mark.timeout(240), pytest.mark.filterwarnings("ignore:not in a git repository")]

E = os.environ.get


# -- fixtures -------------------------------------------------------------------------------------


def remote_client(key: str | None = None):
    """A paramiko client of the test user (the tests' own look at the host)."""
    import paramiko

    client = paramiko.SSHClient()
    client.load_host_keys(E("EASYLAUNCH_TEST_SSH_KNOWN_HOSTS"))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(
        E("EASYLAUNCH_TEST_SSH_HOST"),
        port=int(E("EASYLAUNCH_TEST_SSH_PORT")),
        username=E("EASYLAUNCH_TEST_SSH_USER"),
        key_filename=key or E("EASYLAUNCH_TEST_SSH_KEY"),
        look_for_keys=False,
        allow_agent=False,
    )
    return client


class Remote:
    """The test's view of the SSH host: its own log dir there, shell commands, a config file."""

    def __init__(self, tmp_path: Path):
        self.client = remote_client()
        self.log_dir = f"{E('EASYLAUNCH_TEST_SSH_HOME')}/t-{uuid.uuid4().hex[:10]}"
        self.tmp_path = tmp_path

    def sh(self, command: str, check: bool = True) -> str:
        _, out, err = self.client.exec_command(command)
        text = out.read().decode()
        code = out.channel.recv_exit_status()
        if check and code != 0:
            raise AssertionError(f"remote `{command}` exited {code}: {err.read().decode()}")
        return text

    def exists(self, path: str) -> bool:
        return self.sh(f"test -e '{path}' && echo yes || true").strip() == "yes"

    def entry(self, **more) -> dict:
        return {
            "hostname": E("EASYLAUNCH_TEST_SSH_HOST"),
            "port": int(E("EASYLAUNCH_TEST_SSH_PORT")),
            "username": E("EASYLAUNCH_TEST_SSH_USER"),
            "key_file": E("EASYLAUNCH_TEST_SSH_KEY"),
            "known_hosts": E("EASYLAUNCH_TEST_SSH_KNOWN_HOSTS"),
            "log_dir": self.log_dir,
            **more,
        }

    def config(self, hosts: dict, **keys) -> Path:
        """Write a config file with SSH_HOSTS = hosts (and more keys); returns its path."""
        path = self.tmp_path / f"config-{uuid.uuid4().hex[:6]}.py"
        lines = [f"SSH_HOSTS = {hosts!r}"] + [f"{k} = {v!r}" for k, v in keys.items()]
        path.write_text("\n".join(lines) + "\n")
        return path

    def close(self) -> None:
        self.client.close()
        self.client = remote_client()  # a test may have dropped every connection
        self.sh(f"rm -rf '{self.log_dir}' /srv/full/t-* 2>/dev/null || true", check=False)
        self.client.close()


@pytest.fixture
def remote(tmp_path, monkeypatch):
    require_service("ssh")
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    r = Remote(tmp_path)
    monkeypatch.setenv("EASYLAUNCH_CONFIG", str(r.config({"test": r.entry()})))
    yield r
    r.close()


@pytest.fixture
def code(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    (code / "helper.py").write_text("VALUE = 1\n")
    return code


def opts(code: Path, **more) -> dict:
    return {"ssh_host": "test", "code_dirs_to_mount": [str(code)], **more}


def host_fingerprint() -> str:
    """The sshd's host key fingerprint, as ssh-keygen prints it (test-side check only)."""
    pub = Path(E("EASYLAUNCH_TEST_SSH_KNOWN_HOSTS")).read_text().split()
    blob = base64.b64decode(pub[2])
    import hashlib

    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def nothing_written(log_dir: Path, remote: Remote) -> None:
    assert not any(log_dir.rglob("manifest.json")), list(log_dir.rglob("*"))
    assert not remote.exists(remote.log_dir), remote.sh(f"find '{remote.log_dir}' | head")


# -- job functions (run on the host) ----------------------------------------------------------


def where_am_i(doodad_config, variant):
    import os
    import sys

    print("remote says", variant, flush=True)
    with open(os.path.join(doodad_config.base_log_dir, "out.txt"), "w") as f:
        f.write("written remotely\n")
    os.makedirs(os.path.join(doodad_config.base_log_dir, "sub"), exist_ok=True)
    with open(os.path.join(doodad_config.base_log_dir, "sub", "deep.csv"), "w") as f:
        f.write("a,b\n1,2\n")
    marker = "/etc/easylaunch-remote-root"
    return {
        "x": variant.get("x"),
        "run_dir": doodad_config.base_log_dir,
        "python": "%d.%d" % sys.version_info[:2],
        "marker": open(marker).read().strip() if os.path.exists(marker) else None,
        "seen": {p: os.path.exists(p) for p in variant.get("probe", [])},
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "docker": os.path.exists("/.dockerenv"),
        "uid": os.getuid(),
        "t": time.time(),
    }


def behave(doodad_config, variant):
    import os
    import subprocess

    kind = variant["kind"]
    if kind == "ok":
        return "ok"
    if kind == "raise":
        raise ValueError("boom on the host")
    if kind == "sleep":
        print("sleeping", os.getpid(), flush=True)
        time.sleep(variant.get("sleep", 60))
        return "slept"
    if kind == "child":  # a process of its own in the run's process group
        child = subprocess.Popen(["sleep", "300"])
        with open(os.path.join(doodad_config.base_log_dir, "child.pid"), "w") as f:
            f.write(str(child.pid))
        print("child", child.pid, flush=True)
        time.sleep(300)
    if kind == "ticks":
        for i in range(variant["n"]):
            print("tick", i, flush=True)
            time.sleep(variant.get("every", 0.3))
        return variant["n"]
    raise AssertionError(kind)


# -- a sweep, end to end ---------------------------------------------------------------------------


def test_sweep_runs_on_the_host_and_everything_comes_back(remote, code, log_dir, tmp_path):
    launcher_only = str(tmp_path)
    sweep = run_sweep(
        where_am_i,
        [{"x": i, "probe": [launcher_only, "/etc/easylaunch-remote-root"]} for i in range(4)],
        exp_name="e2e",
        mode="ssh",
        **opts(code),
    )  # waits by default
    results = sweep.results()
    assert [r["x"] for r in results] == [0, 1, 2, 3]
    for job, r in zip(sweep, results):
        backend = job.manifest["backend"]
        # it ran on the host, in the remote run dir, which is not the local one
        assert r["run_dir"] == backend["remote_run_dir"] != str(job.run_dir)
        assert r["run_dir"].startswith(remote.log_dir + "/e2e/")
        assert r["marker"] == "easylaunch sshd test root"
        # no shared filesystem: the launcher's directory is absent there, the remote's here
        assert r["seen"] == {launcher_only: False, "/etc/easylaunch-remote-root": True}
        assert not os.path.exists(backend["remote_run_dir"])
        assert r["uid"] != os.getuid()
        # everything the function wrote came back into the local run directory
        assert (job.run_dir / "out.txt").read_text() == "written remotely\n"
        assert (job.run_dir / "sub" / "deep.csv").read_text() == "a,b\n1,2\n"
        assert f"remote says {{'x': {r['x']}" in job.stdout()
        assert job.status["state"] == "COMPLETED" and job.status["python"] == E(
            "EASYLAUNCH_TEST_SSH_PYTHON_VERSION"
        )
        # the manifest says where and through which host key
        assert backend["ssh_host"] == "test" and backend["hostname"] == "127.0.0.1"
        assert backend["port"] == int(E("EASYLAUNCH_TEST_SSH_PORT")) and backend["username"] == "elssh"
        assert backend["host_key"] == f"ssh-ed25519 {host_fingerprint()}"
    # no key material anywhere the launch wrote
    secret = "".join(Path(E("EASYLAUNCH_TEST_SSH_KEY")).read_text().splitlines()[1:-1])[:40]
    for path in log_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret.encode() not in data, path
            assert E("EASYLAUNCH_TEST_SSH_KEY_PASSPHRASE").encode() not in data, path
    # the payloads are private on the host too
    mode = remote.sh(f"stat -c %a '{sweep[0].manifest['backend']['remote_run_dir']}/payload.pkl'").strip()
    assert mode == "600"
    stats = sweep[0].mode.stats
    assert stats["connections"] == 1, stats
    # the transaction log: the runs' lines came back with their directories, written there
    rows = check_complete(sweep[0].run_dir.parent, [j.run_dir for j in sweep])
    assert {r["host"] for r in rows} == {job.status["host"] for job in sweep}


def test_one_connection_code_once_and_one_command_per_poll(remote, code, log_dir):
    first = run_sweep(where_am_i, [{"x": i} for i in range(3)], exp_name="once", mode="ssh", **opts(code))
    first.results()
    s1 = first[0].mode.stats
    assert s1["connections"] == 1 and s1["snapshot_uploads"] == 1, s1
    # two remote commands: the probe and the easylaunch server; then one request to that server
    # per poll (and the start): no process starts on the host per poll, no SFTP fetch needed
    assert s1["commands"] == 2 and s1["requests"] == 1 + s1["polls"] and s1["polls"] >= 1, s1
    second = run_sweep(
        where_am_i, [{"x": i} for i in range(5)], exp_name="once", mode="ssh", skip_wait=True, **opts(code)
    )
    second.wait(60)
    s2 = second[0].mode.stats
    # the same code: nothing of it travels again; the payloads are one archive
    assert s2["snapshot_uploads"] == 0 and s2["zip_uploads"] == 0 and s2["uploads"] == 1, s2
    assert s2["connections"] == 1, s2
    assert s2["commands"] == 2 and s2["requests"] == 1 + s2["polls"], s2
    listing = remote.sh(f"ls -a '{remote.log_dir}/.snapshots'").split()
    assert len([n for n in listing if n.endswith(".tar.gz")]) == 1, listing
    assert len([n for n in listing if n.endswith(".zip")]) == 2, listing
    assert not [n for n in listing if n.endswith(".part")], listing


def test_packing_and_max_parallel_on_the_host(remote, code):
    sweep = run_sweep(
        behave,
        [{"kind": "sleep", "sleep": 1.0} for _ in range(6)],
        exp_name="pack",
        mode="ssh",
        variants_per_task=2,
        max_parallel=2,
        **opts(code),
    )
    assert sweep.results() == ["slept"] * 6
    tasks = [j.manifest["backend"]["task"] for j in sweep]
    assert tasks == [0, 0, 1, 1, 2, 2]
    spans = [(j.status["started"], j.status["ended"]) for j in sweep]
    # at most two at once: no instant is inside three spans
    for start, _ in spans:
        assert sum(1 for s, e in spans if s <= start < e) <= 2, spans
    # task mates come from one warm task runner (their runner processes have one parent)
    parents = remote.sh(
        "cat " + " ".join(f"'{j.manifest['backend']['remote_run_dir']}/status.json'" for j in sweep)
    )
    assert parents.count('"state": "COMPLETED"') == 6


def test_incremental_outputs_logs_follow_and_stdout_of_a_running_run(remote, code, log_dir):
    job = run_experiment(
        behave,
        exp_name="follow",
        mode="ssh",
        variant={"kind": "ticks", "n": 12, "every": 0.4},
        skip_wait=True,
        **opts(code),
    )
    wait_for(lambda: "tick 2" in job.stdout(), 60, "the first ticks to come back")
    assert job.state is State.RUNNING
    local = job.run_dir / "stdout.log"
    inode = local.stat().st_ino
    wait_for(lambda: "tick 5" in job.stdout(), 60, "more ticks")
    # the log grew in place: only the new bytes travelled
    assert local.stat().st_ino == inode
    out = subprocess.run(
        [sys.executable, "-m", "easylaunch.cli", "logs", "-f", job.run_dir.name],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert [line for line in out.stdout.splitlines() if line.startswith("tick")] == [
        f"tick {i}" for i in range(12)
    ]
    assert job.result() == 12


def test_failure_is_recorded_with_the_remote_traceback(remote, code):
    job = run_experiment(behave, exp_name="fail", mode="ssh", variant={"kind": "raise"}, **opts(code))
    assert job.state is State.FAILED
    with pytest.raises(ValueError, match="boom on the host") as info:
        job.result()
    assert "behave" in str(info.value.__cause__)


def test_cancel_kills_the_remote_process_group(remote, code):
    sweep = run_sweep(
        behave,
        [{"kind": "child"}, {"kind": "sleep"}, {"kind": "sleep"}],
        exp_name="cancel",
        mode="ssh",
        max_parallel=1,
        skip_wait=True,
        **opts(code),
    )
    wait_for(lambda: "child" in sweep[0].stdout(), 60, "the first run to start its child")
    child = (
        int((sweep[0].run_dir / "child.pid").read_text())
        if (sweep[0].run_dir / "child.pid").exists()
        else None
    )
    if child is None:
        sweep[0].fetch()
        child = int((sweep[0].run_dir / "child.pid").read_text())
    sweep.cancel()
    sweep.wait(60)
    assert sweep.states() == [State.CANCELLED] * 3, [j.status for j in sweep]
    assert "before it started" in sweep[2].status["message"]
    # the run's own child process went with its process group
    wait_for(
        lambda: remote.sh(f"test -d /proc/{child} && echo alive || echo gone").strip() == "gone",
        20,
        "child gone",
    )


# -- faults ----------------------------------------------------------------------------------------


def test_remote_runner_sigkilled_is_failed_and_the_others_go_on(remote, code):
    sweep = run_sweep(
        behave,
        [{"kind": "sleep", "sleep": 3}, {"kind": "sleep", "sleep": 30}, {"kind": "ok"}],
        exp_name="killed",
        mode="ssh",
        max_parallel=3,
        skip_wait=True,
        **opts(code),
    )
    wait_for(lambda: sweep[1].state is State.RUNNING and "sleeping" in sweep[1].stdout(), 60, "run 1 running")
    pid = sweep[1].status["pid"]
    remote.sh(f"kill -KILL {pid}")
    sweep.wait(90)
    assert sweep.states() == [State.COMPLETED, State.FAILED, State.COMPLETED]
    assert "exited without recording an outcome" in sweep[1].status["message"]
    assert "SIGKILL" in sweep[1].status["message"]
    assert sweep[0].result() == "slept" and sweep[2].result() == "ok"


def _sshd_sessions() -> list[int]:
    """The per-connection processes of the test sshd: its descendants that are sshd (the
    privileged monitor and the user's session process, which holds the TCP connection); the
    user's own processes are left alone."""
    state = Path(os.environ.get("EASYLAUNCH_SERVICES_DIR", "/tmp/easylaunch-services"))
    sshd = int((state / "pids" / "sshd.pid").read_text().split()[0])
    parent, name = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        pid = int(stat.parent.name)
        name[pid] = text[text.index("(") + 1 : text.rindex(")")]
        parent[pid] = int(text.rsplit(")", 1)[1].split()[1])

    def under(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == sshd:
                return True
        return False

    return [p for p in parent if p != sshd and name[p] == "sshd" and under(p)]


def test_connection_dropped_mid_sweep_then_wait_reconnects(remote, code):
    sweep = run_sweep(
        behave,
        [{"kind": "sleep", "sleep": 2} for _ in range(4)],
        exp_name="drop",
        mode="ssh",
        max_parallel=2,
        skip_wait=True,
        **opts(code),
    )
    mode = sweep[0].mode
    assert mode.stats["connections"] == 1
    remote.client.close()  # ours too: every session of the sshd goes
    killed = _sshd_sessions()
    assert killed
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    sweep.wait(120)
    assert sweep.results() == ["slept"] * 4
    assert mode.stats["connections"] == 2, mode.stats
    remote.client = remote_client()


def test_sshd_restarted_mid_sweep(remote, code):
    sweep = run_sweep(
        behave,
        [{"kind": "sleep", "sleep": 3} for _ in range(3)],
        exp_name="restart",
        mode="ssh",
        max_parallel=2,
        skip_wait=True,
        **opts(code),
    )
    wait_for(lambda: "sleeping" in sweep[0].stdout(), 60, "a run to start")
    remote.client.close()
    import threading

    # a restart keeps established sessions (as on a real host): drop them too, and poll while
    # the daemon is down
    for pid in _sshd_sessions():
        os.kill(pid, signal.SIGKILL)
    restart = threading.Thread(
        target=subprocess.run,
        args=(["bash", E("EASYLAUNCH_TEST_SSH_SERVICE"), "restart"],),
        kwargs={"check": True, "capture_output": True, "timeout": 120},
    )
    restart.start()
    sweep.wait(120)
    restart.join()
    assert sweep.results() == ["slept"] * 3
    assert sweep[0].mode.stats["connections"] >= 2, sweep[0].mode.stats
    remote.client = remote_client()


def test_launcher_sigkilled_after_submit_loses_nothing(remote, code, log_dir, tmp_path):
    script = tmp_path / "launch.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, signal, sys, time
            sys.path.insert(0, {str(Path(__file__).parent)!r})
            import cloudpickle
            import test_ssh
            cloudpickle.register_pickle_by_value(test_ssh)
            from easylaunch import run_sweep
            sweep = run_sweep(test_ssh.behave, [{{"kind": "sleep", "sleep": 1}} for _ in range(5)],
                              exp_name="orphan", mode="ssh", ssh_host="test", max_parallel=2,
                              code_dirs_to_mount=[{str(code)!r}], skip_wait=True)
            print("LAUNCHED", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
            """
        )
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL and "LAUNCHED" in proc.stdout, proc.stderr
    out = subprocess.run(
        [sys.executable, "-m", "easylaunch.cli", "ls", "orphan"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and out.stdout.count("ssh") >= 5, out.stdout + out.stderr
    from easylaunch import load_experiment

    sweep = load_experiment("orphan")
    assert len(sweep) == 5
    sweep.wait(120)
    assert sweep.results() == ["slept"] * 5
    assert all("sleeping" in j.stdout() for j in sweep)
    out = subprocess.run(
        [sys.executable, "-m", "easylaunch.cli", "ls", "orphan"], capture_output=True, text=True, timeout=60
    )
    assert out.stdout.count("COMPLETED") == 5, out.stdout


def test_a_run_that_died_without_an_agent_is_failed_with_what_is_known(remote, code):
    """The host "rebooted": the agent and the runner are gone, the status still says RUNNING."""
    job = run_experiment(
        behave,
        exp_name="reboot",
        mode="ssh",
        variant={"kind": "sleep", "sleep": 60},
        skip_wait=True,
        **opts(code),
    )
    wait_for(lambda: "sleeping" in job.stdout(), 60, "the run to start")
    batch = job.manifest["backend"]["remote_batch_dir"]
    agent = remote.sh(
        f"python3 -c \"import json; print(json.load(open('{batch}/state.json'))['agent']['pid'])\""
    )
    remote.sh(
        f"kill -KILL {agent.strip()} {job.status['pid']}; pkill -KILL -f 'ssh_agent run {batch}' || true",
        check=False,
    )
    job.wait(60)
    assert job.state is State.FAILED
    assert "exited without recording an outcome" in job.status["message"]


# -- bad input: refused before anything is written, on either side --------------------------------


def test_unknown_ssh_host_lists_the_known_ones_and_suggests(remote, code, log_dir):
    with pytest.raises(ValueError, match=r"unknown ssh_host 'tset'.*Did you mean 'test'\?"):
        run_experiment(
            where_am_i, exp_name="bad", mode="ssh", variant={}, **{**opts(code), "ssh_host": "tset"}
        )
    with pytest.raises(ValueError, match="needs a host"):
        run_experiment(where_am_i, exp_name="bad", mode="ssh", variant={}, **{**opts(code), "ssh_host": None})
    nothing_written(log_dir, remote)


def _launch_with(remote, code, monkeypatch, **entry):
    monkeypatch.setenv("EASYLAUNCH_CONFIG", str(remote.config({"test": remote.entry(**entry)})))
    return run_experiment(where_am_i, exp_name="bad", mode="ssh", variant={"x": 1}, **opts(code))


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"port": "FREE"}, r"cannot connect to 127\.0\.0\.1:\d+ \(connection refused\)"),
        ({"hostname": "no-such-host.invalid"}, r"cannot resolve the host name 'no-such-host\.invalid'"),
        (
            {"key_file": "UNAUTHORIZED"},
            r"authentication as elssh@127\.0\.0\.1:\d+ failed with the key file .*client_unauthorized",
        ),
        ({"key_file": "/nonexistent/key"}, r"the key file /nonexistent/key .* does not exist"),
        ({"key_file": "ENCRYPTED"}, r"has a passphrase and no SSH agent runs .*ssh-add .*client_encrypted"),
        ({"python": "python3.missing"}, r"no Python at 'python3\.missing' on the host"),
        (
            {"log_dir": "/srv/readonly/logs"},
            r"remote log dir /srv/readonly/logs cannot be written \(/srv/readonly is not writable by elssh\)",
        ),
        (
            {"log_dir": "/srv/full/t-x"},
            r"remote disk is full: /srv/full/t-x has .* free and this launch needs about",
        ),
        ({"colour": "blue"}, r"unknown key 'colour'"),
    ],
    ids=[
        "refused",
        "dns",
        "auth",
        "key-missing",
        "passphrase",
        "no-python",
        "not-writable",
        "disk-full",
        "bad-key",
    ],
)
def test_bad_host_or_host_faults_are_refused_first(remote, code, log_dir, monkeypatch, entry, message):
    values = {
        "FREE": free_port(),
        "UNAUTHORIZED": E("EASYLAUNCH_TEST_SSH_KEY_UNAUTHORIZED"),
        "ENCRYPTED": E("EASYLAUNCH_TEST_SSH_KEY_ENCRYPTED"),
    }
    entry = {k: values.get(v, v) if isinstance(v, str) else v for k, v in entry.items()}
    if entry.get("port") == "FREE":
        entry["port"] = values["FREE"]
    if "log_dir" in entry:
        remote.log_dir = entry["log_dir"]
    with pytest.raises(Exception, match=message):
        _launch_with(remote, code, monkeypatch, **entry)
    assert not any(log_dir.rglob("manifest.json"))
    if entry.get("log_dir", "").startswith("/srv/"):
        assert not remote.exists(entry["log_dir"])
        assert remote.sh("ls -A /srv/full").strip() == ""
    else:
        assert not remote.exists(remote.log_dir)


def test_encrypted_key_works_through_an_agent(remote, code, tmp_path, monkeypatch):
    sock = str(tmp_path / "agent.sock")
    agent = subprocess.run(["ssh-agent", "-a", sock], capture_output=True, text=True, check=True)
    pid = int(agent.stdout.split("SSH_AGENT_PID=")[1].split(";")[0])
    try:
        askpass = tmp_path / "askpass.sh"
        askpass.write_text(f"#!/bin/sh\necho {E('EASYLAUNCH_TEST_SSH_KEY_PASSPHRASE')}\n")
        askpass.chmod(0o700)
        env = {
            **os.environ,
            "SSH_AUTH_SOCK": sock,
            "SSH_ASKPASS": str(askpass),
            "SSH_ASKPASS_REQUIRE": "force",
            "DISPLAY": "none",
        }
        subprocess.run(
            ["ssh-add", E("EASYLAUNCH_TEST_SSH_KEY_ENCRYPTED")],
            env=env,
            check=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
        )
        monkeypatch.setenv("SSH_AUTH_SOCK", sock)
        job = _launch_with(remote, code, monkeypatch, key_file=E("EASYLAUNCH_TEST_SSH_KEY_ENCRYPTED"))
        assert job.result()["x"] == 1
    finally:
        os.kill(pid, signal.SIGTERM)


# -- host keys ---------------------------------------------------------------------------------------


def test_unknown_host_key_is_refused_with_its_fingerprint_and_the_command_to_trust_it(
    remote, code, log_dir, tmp_path, monkeypatch
):
    known = tmp_path / "known_hosts"
    known.write_text("")
    with pytest.raises(Exception) as info:
        _launch_with(remote, code, monkeypatch, known_hosts=str(known))
    text = str(info.value)
    assert "is unknown" in text and host_fingerprint() in text, text
    nothing_written(log_dir, remote)
    command = text.split("trust it with: ")[1].split("  (or")[0]
    assert command.startswith("ssh-keyscan -p ") and command.endswith(f">> {known}")
    subprocess.run(command, shell=True, check=True, capture_output=True)  # the exact command works
    assert _launch_with(remote, code, monkeypatch, known_hosts=str(known)).result()["x"] == 1


def test_changed_host_key_is_refused_even_with_trust_on_first_use(
    remote, code, log_dir, tmp_path, monkeypatch
):
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    name = f"[127.0.0.1]:{E('EASYLAUNCH_TEST_SSH_PORT')}"
    known = tmp_path / "known_hosts"
    known.write_text(f"{name} " + " ".join((tmp_path / "other.pub").read_text().split()[:2]) + "\n")
    for tofu in (False, True):
        with pytest.raises(Exception) as info:
            _launch_with(remote, code, monkeypatch, known_hosts=str(known), trust_on_first_use=tofu)
        text = str(info.value)
        assert "CHANGED" in text and host_fingerprint() in text, text
        assert f"ssh-keygen -R '{name}' -f {known}" in text, text
    nothing_written(log_dir, remote)
    assert known.read_text().count("ssh-ed25519") == 1  # nothing was added


def test_trust_on_first_use_records_a_new_host_key(remote, code, tmp_path, monkeypatch, capfd):
    known = tmp_path / "fresh" / "known_hosts"
    job = _launch_with(remote, code, monkeypatch, known_hosts=str(known), trust_on_first_use=True)
    assert job.result()["x"] == 1
    line = known.read_text().split()
    assert line[0] == f"[127.0.0.1]:{E('EASYLAUNCH_TEST_SSH_PORT')}" and line[1] == "ssh-ed25519"
    assert host_fingerprint() in capfd.readouterr().err


# -- ~/.ssh/config -------------------------------------------------------------------------------------


def test_ssh_config_alias_and_proxy_jump(remote, code, tmp_path, monkeypatch):
    ssh_dir = Path(os.environ["HOME"]) / ".ssh"
    ssh_dir.mkdir(parents=True, exist_ok=True)
    port = E("EASYLAUNCH_TEST_SSH_PORT")
    (ssh_dir / "config").write_text(
        textwrap.dedent(
            f"""
            Host labbox
                HostName 127.0.0.1
                User elssh
                Port {port}
                IdentityFile {E("EASYLAUNCH_TEST_SSH_KEY")}
                UserKnownHostsFile {E("EASYLAUNCH_TEST_SSH_KNOWN_HOSTS")}

            Host behind
                HostName 127.0.0.1
                User elssh
                Port {port}
                IdentityFile {E("EASYLAUNCH_TEST_SSH_KEY")}
                UserKnownHostsFile {E("EASYLAUNCH_TEST_SSH_KNOWN_HOSTS")}
                ProxyJump labbox
            """
        )
    )
    # the log dir comes from SSH_LOG_DIR for ~/.ssh/config hosts
    monkeypatch.setenv("EASYLAUNCH_CONFIG", str(remote.config({}, SSH_LOG_DIR=remote.log_dir)))
    job = run_experiment(
        where_am_i,
        exp_name="alias",
        mode="ssh",
        ssh_host="labbox",
        variant={"x": 7},
        code_dirs_to_mount=[str(code)],
    )
    assert job.result()["x"] == 7 and job.manifest["backend"]["ssh_host"] == "labbox"
    job = run_experiment(
        where_am_i,
        exp_name="alias",
        mode="ssh",
        ssh_host="behind",
        variant={"x": 8},
        code_dirs_to_mount=[str(code)],
    )
    assert job.result()["x"] == 8
    assert job.mode.stats["connections"] == 2  # the jump host, then the host through it
    with pytest.raises(ValueError, match=r"Did you mean 'labbox'"):
        run_experiment(where_am_i, exp_name="alias", mode="ssh", ssh_host="labbx", variant={})
    # SSH_DEFAULT_HOST when ssh_host is not given
    monkeypatch.setenv(
        "EASYLAUNCH_CONFIG", str(remote.config({}, SSH_LOG_DIR=remote.log_dir, SSH_DEFAULT_HOST="labbox"))
    )
    job = run_experiment(
        where_am_i, exp_name="alias", mode="ssh", variant={"x": 9}, code_dirs_to_mount=[str(code)]
    )
    assert job.result()["x"] == 9


# -- Python versions on the host -------------------------------------------------------------------


def test_remote_python_of_another_minor(remote, code, log_dir, tmp_path, monkeypatch):
    other = E("EASYLAUNCH_TEST_SSH_OTHER_PYTHON_VERSION")
    monkeypatch.setenv(
        "EASYLAUNCH_CONFIG",
        str(remote.config({"test": remote.entry(python=E("EASYLAUNCH_TEST_SSH_OTHER_PYTHON"))})),
    )
    # a function of the launch script cannot cross minors: refused before anything is written
    with pytest.raises(Exception, match=f"Python {other}"):
        run_experiment(where_am_i, exp_name="minor", mode="ssh", variant={"x": 1}, **opts(code))
    nothing_written(log_dir, remote)
    # a module function travels by reference and runs on the host's 3.9
    (code / "trainer.py").write_text(
        "import sys\n\n\ndef train(doodad_config, variant):\n"
        "    print('training on', sys.version_info[:2], flush=True)\n"
        "    return {'python': '%d.%d' % sys.version_info[:2], 'lr': variant['lr']}\n"
    )
    sys.path.insert(0, str(code))
    try:
        import trainer

        sweep = run_sweep(
            trainer.train, [{"lr": 0.1}, {"lr": 0.2}], exp_name="minor", mode="ssh", **opts(code)
        )
    finally:
        sys.path.remove(str(code))
        sys.modules.pop("trainer", None)
    assert sweep.results() == [{"python": other, "lr": 0.1}, {"python": other, "lr": 0.2}]
    assert sweep[0].manifest["transport"] == "reference" and "training on" in sweep[0].stdout()


# -- Docker on the host -----------------------------------------------------------------------------


def test_a_command_typed_in_a_project_runs_in_its_shipped_copy_on_the_host(remote, code, log_dir):
    # `easylaunch run --mode ssh -- python3 train.py` from the project directory: the project is
    # the code dir (not where the easylaunch script lives), and on the host the command runs in
    # the shipped copy of it; what it writes to $EASYLAUNCH_RUN_DIR comes back
    from test_command import TRAIN_PY

    (code / "train.py").write_text(TRAIN_PY)
    proc = subprocess.run(
        [sys.executable, "-m", "easylaunch.cli", "run", "--mode", "ssh", "-O", "ssh_host=test", "--name", "typed",
         "--", "python3", "train.py", "--epochs=3"],
        cwd=code, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = Path(proc.stdout.strip().splitlines()[0])
    ran_in = (run_dir / "stdout.log").read_text().strip()
    assert ran_in != str(code) and ran_in.endswith("/code") and remote.exists(f"{ran_in}/train.py"), ran_in
    assert (run_dir / "out.txt").read_text() == "--epochs=3"


def test_a_duet_runs_as_a_job_on_the_host_that_has_no_docker_sdk_nor_yaml(remote, code, log_dir, tmp_path):
    # the duet is a job on any mode that can run Docker: on this host it talks to the daemon's
    # socket with easylaunch's own client and gets its configs parsed (the host has neither the
    # Docker SDK nor a YAML library); results and artifacts come back and land in --outdir
    import uuid

    from test_duet import README_CONFIG, cli, write

    from easylaunch.job import Job

    require_service("docker")
    if not E("EASYLAUNCH_TEST_SSH_DOCKER"):
        pytest.fail("sshd.sh relays dockerd's socket into the host when docker.sh runs: it did not")
    missing = remote.sh('for m in docker yaml; do python3 -c "import $m" 2>/dev/null || echo $m; done')
    assert missing.split() == ["docker", "yaml"], missing
    suite = f"ssh{uuid.uuid4().hex[:6]}"
    images = {
        "busybox": E("EASYLAUNCH_TEST_DOCKER_IMAGE_NOPYTHON"),
        "python": E("EASYLAUNCH_TEST_DOCKER_IMAGE"),
    }
    path = write(tmp_path, README_CONFIG.format(suite=suite, engine="docker", **images))
    out = tmp_path / "out"
    proc = cli(
        str(path),
        "--outdir",
        str(out),
        "--mode",
        "ssh",
        "--docker-host",
        E("EASYLAUNCH_TEST_SSH_DOCKER_HOST"),
        "-O",
        "ssh_host=test",
        "-O",
        f"code_dirs_to_mount={[str(code)]!r}",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = Path(proc.stdout.rsplit("run directory ", 1)[1].strip())
    assert run_dir.is_relative_to(log_dir)
    job = Job.load(run_dir)
    assert job.manifest["mode"] == "ssh" and job.state == State.COMPLETED
    names = sorted(p.name for p in out.iterdir() if p.is_file())
    assert len(names) == 3 * 2 + 2, names
    assert all(n.startswith(f"{suite}.a-benchmark.") for n in names), names
    assert "Linux" in (out / "artifacts" / "uname").read_text()  # the host's artifacts
    assert "MemTotal" in (out / "artifacts" / "meminfo").read_text()


def test_docker_image_runs_inside_docker_on_the_host(remote, code, log_dir, monkeypatch):
    require_service("docker")
    if not E("EASYLAUNCH_TEST_SSH_DOCKER"):
        pytest.fail("sshd.sh relays dockerd's socket into the host when docker.sh runs: it did not")
    monkeypatch.setenv(
        "EASYLAUNCH_CONFIG",
        str(
            remote.config(
                {
                    "test": remote.entry(
                        docker_host=E("EASYLAUNCH_TEST_SSH_DOCKER_HOST"),
                        docker_root=E("EASYLAUNCH_TEST_SSH_DOCKER_ROOT"),
                    )
                }
            )
        ),
    )
    sweep = run_sweep(
        where_am_i,
        [{"x": i, "probe": ["/etc/easylaunch-remote-root"]} for i in range(3)],
        exp_name="dock",
        mode="ssh",
        docker_image=E("EASYLAUNCH_TEST_SSH_DOCKER_IMAGE"),
        variants_per_task=2,
        **opts(code),
    )
    results = sweep.results()
    assert [r["x"] for r in results] == [0, 1, 2]
    for job, r in zip(sweep, results):
        assert r["docker"] is True and r["marker"] is None  # inside the image, not the host's root
        assert r["run_dir"] == job.manifest["backend"]["remote_run_dir"]
        assert r["uid"] == int(remote.sh("id -u"))  # the host user's files
        assert (job.run_dir / "out.txt").read_text() == "written remotely\n"
    assert sweep[0].manifest["backend"]["runtime"] == "docker"
    # the agent removes its containers
    from conftest import engine_client

    client = engine_client("docker")
    batch = sweep[0].manifest["batch_id"]
    wait_for(
        lambda: not client.containers.list(all=True, filters={"label": f"io.easylaunch.batch={batch}"}),
        30,
        "containers removed",
    )
    # a missing image is refused with the host's images
    with pytest.raises(Exception, match="is not on the host's Docker daemon"):
        run_experiment(
            where_am_i, exp_name="dock2", mode="ssh", variant={}, docker_image="local/nope", **opts(code)
        )
    assert not (log_dir / "dock2").exists()
