"""``ssh``: runs on a machine reached over SSH that shares nothing with the launcher.

::

    # config file
    SSH_HOSTS = {"lab": dict(hostname="lab.example.org", username="me", key_file="~/.ssh/id_ed25519")}

    sweep = run_sweep(train, variants, exp_name="demo", mode="ssh", ssh_host="lab",
                      max_parallel=4, expected_duration=5, skip_wait=True)
    sweep.wait(); sweep.results()        # outputs come back into the local run directories

``ssh_host`` is a key of config ``SSH_HOSTS`` or a ``Host`` of ``~/.ssh/config`` (HostName, User,
Port, IdentityFile, UserKnownHostsFile, ProxyJump), else config ``SSH_DEFAULT_HOST``. paramiko
is the only SSH client (imported when this mode is used); host keys are verified against
``known_hosts`` (RejectPolicy: an unknown or changed key is refused with its fingerprint and
what to do; ``trust_on_first_use`` may record a new key, never accept a changed one).

One connection per launch: ``check()`` connects and probes the host (its Python, the remote
log dir, free space, Docker when ``docker_image`` is given) before anything is written; then
``launch()`` uploads the code snapshot and the easylaunch/cloudpickle zips to a
content-addressed store in the remote log dir (``<log dir>/.snapshots/``, skipped when already
there), the sweep's payloads as ONE archive, and starts a detached agent on the host
(:mod:`easylaunch.ssh_agent`) that runs at most ``max_parallel`` packed tasks at once (or
Docker containers, through the host's daemon), so the runs survive a dropped connection and the
launch script. Polls, fetches and cancels of all runs of a host are ONE remote command each;
outputs come back incrementally (new or changed files only, logs by their new bytes).
"""

from __future__ import annotations

import base64
import difflib
import getpass
import json
import os
import posixpath
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .. import records, transitions
from ..batch import Batch
from ..job import Job
from ..options import Option
from ..plan import LaunchPlan, groups, variants_per_task
from ..runtimes import DockerRuntime, Mount, PlainRuntime, RunnerCommand
from ..shipping import ship
from ..spec import TERMINAL_STATES, State
from .base import Mode

#: the keys of an SSH_HOSTS entry and what they mean
HOST_KEYS = {
    "hostname": "host name or address (default: the entry's name)",
    "username": "login name (default: the local user's)",
    "port": "SSH port (default 22)",
    "key_file": "private key file (default: config SSH_PRIVATE_KEY, else ~/.ssh/id_ed25519, id_ecdsa, id_rsa; an agent at $SSH_AUTH_SOCK is used too)",
    "known_hosts": "known_hosts file checked for the host key (default ~/.ssh/known_hosts)",
    "python": "the host's Python 3.8+ (default python3)",
    "log_dir": "log dir on the host (default: config SSH_LOG_DIR, ~/easylaunch-logs)",
    "trust_on_first_use": "record an unknown host key in known_hosts (never accepts a changed one; default False)",
    "proxy_jump": "reach the host through this one (an ssh_host name or [user@]host[:port])",
    "max_parallel": "runs at once on the host (default: its CPU count)",
    "docker_host": "the host's Docker daemon socket for docker_image runs (default unix:///var/run/docker.sock)",
    "docker_root": "where that daemon sees the host's / (set when sshd runs chrooted or in a container sharing the daemon's socket; default '')",
}
_TYPES = {
    "port": (int,),
    "trust_on_first_use": (bool,),
    "max_parallel": (int,),
}
DEFAULT_KEYS = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
#: room a launch needs on the host beyond its payloads (code, zips, the first outputs)
SPACE_MARGIN = 8 * 1024 * 1024
#: a run whose remote directory is still missing this long after its launch never got there
MISSING_GRACE = 120.0
UNPACK_DIR = ".snapshots-unpacked"
MANAGED = "io.easylaunch.managed"


class SshError(RuntimeError):
    """Something about the SSH host is wrong; the message names it and the fix."""


def _paramiko():
    try:
        import paramiko
    except ImportError:
        raise ImportError("mode 'ssh' needs paramiko: pip install 'easylaunch[ssh]'") from None
    return paramiko


# -- hosts --------------------------------------------------------------------------------


@dataclass
class SshHost:
    """Where and how to log in, resolved from SSH_HOSTS or ~/.ssh/config."""

    name: str
    hostname: str
    username: str
    port: int = 22
    key_files: List[str] = field(default_factory=list)
    #: key_files came from the config (a missing one is an error) rather than the defaults
    key_explicit: bool = False
    known_hosts: str = "~/.ssh/known_hosts"
    python: str = "python3"
    log_dir: str = "~/easylaunch-logs"
    trust_on_first_use: bool = False
    proxy_jump: Optional[str] = None
    max_parallel: Optional[int] = None
    docker_host: str = "unix:///var/run/docker.sock"
    docker_root: str = ""
    #: "SSH_HOSTS['lab']" or "~/.ssh/config Host lab", for messages
    source: str = ""

    @property
    def address(self) -> str:
        return f"{self.username}@{self.hostname}:{self.port}"

    @property
    def key(self) -> Tuple[str, int, str]:
        return (self.hostname, self.port, self.username)

    @property
    def known_hosts_name(self) -> str:
        """How known_hosts names the host (``[host]:port`` off port 22)."""
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    def setting(self, key: str) -> str:
        """How the user changes ``key`` of this host (for messages)."""
        if self.source.startswith("SSH_HOSTS"):
            return f"{self.source}[{key!r}]"
        return f"SSH_HOSTS[{self.name!r}][{key!r}] (or {self.source})"


def _ssh_config(path: str = "~/.ssh/config") -> Any:
    full = os.path.expanduser(path)
    if not os.path.isfile(full):
        return None
    paramiko = _paramiko()
    try:
        return paramiko.SSHConfig.from_path(full)
    except Exception as exc:
        raise SshError(f"{path} cannot be read: {type(exc).__name__}: {exc}") from None


def _config_aliases(config: Any) -> List[str]:
    if config is None:
        return []
    return sorted(h for h in config.get_hostnames() if not any(c in h for c in "*?!"))


def known_host_names(settings: Any) -> List[str]:
    """Every ssh_host name: SSH_HOSTS keys and the literal Host names of ~/.ssh/config."""
    names = list((settings.get("SSH_HOSTS") or {}).keys())
    try:
        names += [n for n in _config_aliases(_ssh_config()) if n not in names]
    except SshError:
        pass
    return names


def resolve_host(name: str, settings: Any) -> SshHost:
    """The host ``name`` names; ValueError listing the known names (and a close one) otherwise."""
    hosts = settings.get("SSH_HOSTS") or {}
    log_default = settings.get("SSH_LOG_DIR") or "~/easylaunch-logs"
    private_key = settings.get("SSH_PRIVATE_KEY")
    if name in hosts:
        entry = hosts[name]
        where = f"SSH_HOSTS[{name!r}]"
        if not isinstance(entry, dict):
            raise ValueError(f"config {where} = {entry!r} must be a dict of: " + ", ".join(HOST_KEYS))
        for key, value in entry.items():
            if key not in HOST_KEYS:
                close = difflib.get_close_matches(str(key), HOST_KEYS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"config {where}: unknown key {key!r}{hint}; accepted: "
                    + "; ".join(f"{k}: {v}" for k, v in HOST_KEYS.items())
                )
            types = _TYPES.get(key, (str,))
            if value is not None and (
                not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
            ):
                raise ValueError(
                    f"config {where}[{key!r}] = {value!r} must be {' or '.join(t.__name__ for t in types)} "
                    f"({HOST_KEYS[key]})"
                )
        key_file = entry.get("key_file")
        default_key = private_key if private_key and os.path.exists(os.path.expanduser(private_key)) else None
        return SshHost(
            name=name,
            hostname=entry.get("hostname") or name,
            username=entry.get("username") or _local_user(),
            port=int(entry.get("port") or 22),
            key_files=[key_file] if key_file else ([default_key] if default_key else []),
            key_explicit=bool(key_file),
            known_hosts=entry.get("known_hosts") or "~/.ssh/known_hosts",
            python=entry.get("python") or "python3",
            log_dir=entry.get("log_dir") or log_default,
            trust_on_first_use=bool(entry.get("trust_on_first_use")),
            proxy_jump=entry.get("proxy_jump"),
            max_parallel=entry.get("max_parallel"),
            docker_host=entry.get("docker_host") or "unix:///var/run/docker.sock",
            docker_root=(entry.get("docker_root") or "").rstrip("/"),
            source=where,
        )
    config = _ssh_config()
    if name in _config_aliases(config):
        found = config.lookup(name)
        try:
            port = int(found.get("port", 22))
        except ValueError:
            raise ValueError(
                f"~/.ssh/config Host {name}: Port {found.get('port')!r} is not a number"
            ) from None
        files = list(found.get("identityfile") or [])
        known = (found.get("userknownhostsfile") or "~/.ssh/known_hosts").split()[0]
        return SshHost(
            name=name,
            hostname=found.get("hostname") or name,
            username=found.get("user") or _local_user(),
            port=port,
            key_files=files,
            key_explicit=bool(files),
            known_hosts=known,
            log_dir=log_default,
            proxy_jump=found.get("proxyjump"),
            source=f"~/.ssh/config Host {name}",
        )
    names = known_host_names(settings)
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    shown = ", ".join(map(repr, names)) if names else "none"
    raise ValueError(
        f"unknown ssh_host {name!r}.{hint} Known hosts (config SSH_HOSTS and ~/.ssh/config): {shown}. "
        "Add it to SSH_HOSTS in the config file (hostname, username, key_file, ...) or as a Host "
        "in ~/.ssh/config"
    )


def _jump_host(spec: str, settings: Any) -> SshHost:
    """A ProxyJump hop: an ssh_host name, else ``[user@]host[:port]``."""
    try:
        return resolve_host(spec, settings)
    except ValueError:
        pass
    user, _, rest = spec.rpartition("@")
    hostname, _, port = rest.partition(":")
    try:
        port_number = int(port) if port else 22
    except ValueError:
        raise SshError(f"ProxyJump {spec!r}: {port!r} is not a port number") from None
    return SshHost(
        name=spec,
        hostname=hostname,
        username=user or _local_user(),
        port=port_number,
        source=f"ProxyJump {spec}",
    )


def _local_user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return str(os.getuid())


def fingerprint(key: Any) -> str:
    """OpenSSH's ``SHA256:...`` fingerprint of a host key."""
    import hashlib

    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


_KEYSCAN_TYPES = {"ssh-ed25519": "ed25519", "ssh-rsa": "rsa", "ssh-dss": "dsa"}


def _keyscan_type(name: str) -> str:
    return _KEYSCAN_TYPES.get(name, "ecdsa" if name.startswith("ecdsa") else name)


# -- connections --------------------------------------------------------------------------


class _UnknownHost(Exception):
    def __init__(self, key: Any):
        super().__init__("unknown host key")
        self.key = key


class Connection:
    """One authenticated SSH connection (paramiko), with its SFTP session opened on demand."""

    def __init__(self, host: SshHost, client: Any, stats: Counter, jump: Optional[Connection] = None):
        self.host = host
        self.client = client
        self.stats = stats
        self.jump = jump
        self._sftp = None
        self._server: Any = None
        self._server_out = b""
        self._server_err = b""
        key = client.get_transport().get_remote_server_key()
        self.host_key = f"{key.get_name()} {fingerprint(key)}"

    def active(self) -> bool:
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()

    def sftp(self) -> Any:
        if self._sftp is None:
            self._sftp = self.client.open_sftp()
        return self._sftp

    def run(
        self, command: str, stdin: Optional[bytes] = None, timeout: float = 300
    ) -> Tuple[int, bytes, bytes]:
        """Run ``command`` in the user's shell on the host; ``(exit code, stdout, stderr)``."""
        import select

        self.stats["commands"] += 1
        channel = self.client.get_transport().open_session(timeout=30)
        try:
            channel.exec_command(command)
            if stdin:
                channel.sendall(stdin)
            channel.shutdown_write()
            out, err = [], []
            deadline = time.monotonic() + timeout
            while True:
                if channel.recv_ready():
                    out.append(channel.recv(1 << 20))
                    continue
                if channel.recv_stderr_ready():
                    err.append(channel.recv_stderr(1 << 20))
                    continue
                if (
                    channel.exit_status_ready()
                    and not channel.recv_ready()
                    and not channel.recv_stderr_ready()
                ):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the command on {self.host.address} did not end within {timeout} s")
                if channel.closed and not channel.recv_ready():
                    break
                select.select([channel], [], [], 0.5)
            code = channel.recv_exit_status()
            return code, b"".join(out), b"".join(err)
        finally:
            channel.close()

    def request(self, serve_command: str, payload: Dict[str, Any], timeout: float = 300) -> Dict[str, Any]:
        """One request to the host's ``ssh_agent serve`` (started on first use and kept open, so
        a poll is one round trip and no process start on the host); its JSON answer."""
        import select

        chan = self._server
        if chan is None or chan.closed or chan.exit_status_ready():
            self.stats["commands"] += 1
            chan = self._server = self.client.get_transport().open_session(timeout=30)
            self._server_out, self._server_err = b"", b""
            chan.exec_command(serve_command)
        self.stats["requests"] += 1
        chan.sendall(json.dumps(payload).encode() + b"\n")
        deadline = time.monotonic() + timeout
        while b"\n" not in self._server_out:
            if chan.recv_ready():
                self._server_out += chan.recv(1 << 20)
                continue
            if chan.recv_stderr_ready():
                self._server_err = (self._server_err + chan.recv_stderr(1 << 16))[-4000:]
                continue
            if chan.exit_status_ready() or chan.closed:
                self._server = None
                raise EOFError(
                    f"the easylaunch server on {self.host.address} ended (exit {chan.recv_exit_status()}): "
                    f"{self._server_err.decode(errors='replace').strip()[-500:]}"
                )
            if time.monotonic() > deadline:
                self._server = None
                chan.close()
                raise TimeoutError(
                    f"the easylaunch server on {self.host.address} did not answer in {timeout} s"
                )
            select.select([chan], [], [], 0.2)
        line, _, self._server_out = self._server_out.partition(b"\n")
        return json.loads(line)

    def close(self) -> None:
        if self._server is not None:
            try:
                self._server.close()
            except Exception:
                pass
        for closer in (self._sftp, self.client, self.jump):
            try:
                if closer is not None:
                    closer.close()
            except Exception:
                pass


def _load_key(host: SshHost) -> Tuple[Any, bool, List[str]]:
    """``(key or None, use the agent, key files tried)``; SshError for a missing or locked key."""
    paramiko = _paramiko()
    agent_keys: Sequence[Any] = ()
    if os.environ.get("SSH_AUTH_SOCK"):
        try:
            agent_keys = paramiko.Agent().get_keys()
        except Exception:
            agent_keys = ()
    files = [os.path.expanduser(f) for f in host.key_files]
    if not host.key_explicit:
        files = [f for f in files if os.path.exists(f)] or [
            os.path.expanduser(f) for f in DEFAULT_KEYS if os.path.exists(os.path.expanduser(f))
        ]
    encrypted = []
    for path in files:
        if not os.path.exists(path):
            raise SshError(
                f"ssh_host {host.name!r}: the key file {path} ({host.setting('key_file')}) does not exist; "
                "fix the path, or create a key with `ssh-keygen -t ed25519` and authorize it on the host"
            )
        try:
            return paramiko.PKey.from_path(path), bool(agent_keys), files
        except paramiko.PasswordRequiredException:
            encrypted.append(path)
        except TypeError as exc:  # cryptography's word for an OpenSSH-format key with a passphrase
            if "password" not in str(exc).lower():
                raise SshError(f"ssh_host {host.name!r}: cannot read the key file {path}: {exc}") from None
            encrypted.append(path)
        except (paramiko.SSHException, OSError, ValueError) as exc:
            raise SshError(f"ssh_host {host.name!r}: cannot read the key file {path}: {exc}") from None
    if encrypted and not agent_keys:
        why = (
            "no SSH agent runs ($SSH_AUTH_SOCK is not set)"
            if not os.environ.get("SSH_AUTH_SOCK")
            else ("the SSH agent at $SSH_AUTH_SOCK holds no key")
        )
        raise SshError(
            f"ssh_host {host.name!r}: the key file {encrypted[0]} has a passphrase and {why}; easylaunch "
            f"never asks for a passphrase. Load the key into an agent (`eval $(ssh-agent)` then "
            f"`ssh-add {encrypted[0]}`) before launching, or use a key without a passphrase"
        )
    if not files and not agent_keys:
        raise SshError(
            f"ssh_host {host.name!r}: no key to log in with (no {host.setting('key_file')}, none of "
            f"{', '.join(DEFAULT_KEYS)} exists, and no SSH agent holds one); set key_file"
        )
    return None, True, files


def connect(host: SshHost, settings: Any, stats: Counter) -> Connection:
    """An authenticated connection to ``host`` with its host key verified; SshError otherwise."""
    import socket

    paramiko = _paramiko()
    jump = None
    sock = None
    if host.proxy_jump:
        hop = _jump_host(host.proxy_jump.split(",")[0].strip(), settings)
        jump = connect(hop, settings, stats)
        try:
            sock = jump.client.get_transport().open_channel(
                "direct-tcpip", (host.hostname, host.port), ("127.0.0.1", 0), timeout=20
            )
        except Exception as exc:
            jump.close()
            raise SshError(
                f"ssh_host {host.name!r}: the jump host {hop.address} could not reach {host.hostname}:"
                f"{host.port} ({type(exc).__name__}: {exc})"
            ) from None
    key, use_agent, tried = _load_key(host)
    known = os.path.expanduser(host.known_hosts)
    client = paramiko.SSHClient()
    if os.path.exists(known):
        try:
            client.load_host_keys(known)
        except Exception as exc:
            raise SshError(f"known_hosts file {known} cannot be read: {exc}") from None

    class Policy(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client_: Any, hostname: str, offered: Any) -> None:
            if not host.trust_on_first_use:
                raise _UnknownHost(offered)
            _record_host_key(known, host.known_hosts_name, offered)
            print(
                f"easylaunch: trusted the new host key of {host.known_hosts_name} ({offered.get_name()} "
                f"{fingerprint(offered)}) and recorded it in {known} (trust_on_first_use)",
                file=sys.stderr,
            )

    client.set_missing_host_key_policy(Policy())
    stats["connections"] += 1
    try:
        client.connect(
            host.hostname,
            port=host.port,
            username=host.username,
            pkey=key,
            allow_agent=use_agent,
            look_for_keys=False,
            timeout=15,
            banner_timeout=15,
            auth_timeout=15,
            sock=sock,
        )
    except _UnknownHost as exc:
        client.close()
        _close(jump)
        kind = _keyscan_type(exc.key.get_name())
        port = f" -p {host.port}" if host.port != 22 else ""
        raise SshError(
            f"ssh_host {host.name!r}: the host key of {host.known_hosts_name} is unknown (not in {known}); "
            f"it offers {exc.key.get_name()} {fingerprint(exc.key)}. Check that fingerprint on the host "
            f"(`ssh-keygen -lf /etc/ssh/ssh_host_{kind}_key.pub`), then trust it with: "
            f"ssh-keyscan{port} -t {kind} {host.hostname} >> {known}  "
            f"(or set {host.setting('trust_on_first_use')}=True to record a new host's key once)"
        ) from None
    except paramiko.BadHostKeyException as exc:
        client.close()
        _close(jump)
        port = f":{host.port}" if host.port != 22 else ""
        raise SshError(
            f"ssh_host {host.name!r}: the host key of {host.known_hosts_name} CHANGED: {known} has "
            f"{exc.expected_key.get_name()} {fingerprint(exc.expected_key)}, the host now offers "
            f"{exc.key.get_name()} {fingerprint(exc.key)}. This may be an attack; nothing was sent. "
            f"If the host was reinstalled, check the new fingerprint there, remove the old entry with "
            f"`ssh-keygen -R '{host.known_hosts_name}' -f {known}` and trust the new one "
            f"(`ssh-keyscan -p {host.port} -t {_keyscan_type(exc.key.get_name())} {host.hostname} >> {known}`)"
            if port
            else f"ssh_host {host.name!r}: the host key of {host.hostname} CHANGED: {known} has "
            f"{fingerprint(exc.expected_key)}, the host now offers {fingerprint(exc.key)}. This may be "
            f"an attack; nothing was sent. If the host was reinstalled, remove the old entry with "
            f"`ssh-keygen -R {host.hostname} -f {known}` and trust the new one"
        ) from None
    except paramiko.AuthenticationException as exc:
        client.close()
        _close(jump)
        what = (
            f"the key file {tried[0]}"
            if key is not None
            else "the SSH agent's keys" + (f" (the key files {', '.join(tried)} need it)" if tried else "")
        )
        raise SshError(
            f"ssh_host {host.name!r}: authentication as {host.username}@{host.hostname}:{host.port} "
            f"failed with {what} ({exc}). Authorize its public key on the host (`ssh-copy-id -i "
            f"{tried[0] if tried else 'KEY'}.pub -p {host.port} {host.username}@{host.hostname}`), or set "
            f"{host.setting('key_file')} / {host.setting('username')}"
        ) from None
    except socket.gaierror as exc:
        client.close()
        _close(jump)
        raise SshError(
            f"ssh_host {host.name!r}: cannot resolve the host name {host.hostname!r} ({exc.strerror}); "
            f"fix {host.setting('hostname')}"
        ) from None
    except (OSError, EOFError, paramiko.SSHException) as exc:
        client.close()
        _close(jump)
        text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):
            text = "connection refused"
        raise SshError(
            f"ssh_host {host.name!r}: cannot connect to {host.hostname}:{host.port} ({text}); is sshd "
            f"running there and the port right ({host.setting('port')})?"
        ) from None
    return Connection(host, client, stats, jump)


def _close(conn: Optional[Connection]) -> None:
    if conn is not None:
        conn.close()


def _record_host_key(path: str, name: str, key: Any) -> None:
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    line = f"{name} {key.get_name()} {key.get_base64()}\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line)


# -- the plan -------------------------------------------------------------------------------


@dataclass
class SshPlan(LaunchPlan):
    """What ``check()`` found out about the host."""

    host: Optional[SshHost] = None
    probe: Dict[str, Any] = field(default_factory=dict)
    max_parallel: int = 1
    docker_image: Optional[str] = None
    image_id: Optional[str] = None
    docker_options: Dict[str, Any] = field(default_factory=dict)


def _human(n: Optional[float]) -> str:
    if n is None:
        return "unknown"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class SshMode(Mode):
    """Runs on an SSH host (see the module docstring)."""

    name = "ssh"
    waits_by_default = True
    poll_interval = 0.25
    fetches_outputs = True
    options = (
        Option(
            "ssh_host",
            (str,),
            None,
            "a key of SSH_HOSTS or a Host of ~/.ssh/config (default: SSH_DEFAULT_HOST)",
        ),
        Option(
            "docker_image",
            (str,),
            None,
            "run inside this Docker image on the host (default: config DOODAD_DOCKER_IMAGE; '' for none)",
        ),
        Option("docker_options", (dict,), None, "Docker extras on the host, as for local_docker"),
        Option("skip_wait", (bool,), False, "return at once; the runs go on on the host"),
        Option("max_parallel", (int,), None, "runs at once on the host (default: its CPU count)", 1),
        Option("variants_per_task", (int,), None, "variants run one after another by one warm task", 1),
        Option(
            "expected_duration",
            (int, float),
            None,
            "expected seconds per variant: picks variants_per_task",
            0.001,
        ),
    )

    def __init__(self, settings: Any):
        super().__init__(settings)
        #: what this mode object did: connections opened, remote commands, uploads, polls
        self.stats: Counter = Counter()
        self._connections: Dict[Tuple[str, int, str], Connection] = {}
        self._rendered: Dict[Tuple[Any, ...], str] = {}
        self._warned: set = set()
        # a Job's watcher thread polls while the caller may fetch: one conversation at a time
        self._lock = threading.RLock()

    # -- connections -----------------------------------------------------------------
    def connection(self, host: SshHost) -> Connection:
        """The open connection to ``host``, reconnecting when it dropped."""
        conn = self._connections.get(host.key)
        if conn is not None and conn.active():
            return conn
        if conn is not None:
            conn.close()
        conn = connect(host, self.settings, self.stats)
        self._connections[host.key] = conn
        return conn

    def _drop(self, host: SshHost) -> None:
        conn = self._connections.pop(host.key, None)
        if conn is not None:
            conn.close()

    def _agent_command(self, python: str, zips: Sequence[str], args: Sequence[str]) -> str:
        cache_key = (python, tuple(zips), tuple(args))
        if cache_key not in self._rendered:
            from ..templating import render

            cmd = RunnerCommand(prefix=[python, "-m", "easylaunch.ssh_agent"], pythonpath=list(zips))
            self._rendered[cache_key] = render("ssh_agent.sh.j2", cmd=cmd, args=list(args))
        return self._rendered[cache_key]

    # -- check -----------------------------------------------------------------------
    def check(self, batch: Batch) -> SshPlan:
        opts = batch.options
        name = opts.get("ssh_host") or self.settings.get("SSH_DEFAULT_HOST")
        if not name:
            names = known_host_names(self.settings)
            raise ValueError(
                "mode 'ssh' needs a host: pass ssh_host=NAME or set SSH_DEFAULT_HOST in the config file; "
                f"known hosts (SSH_HOSTS and ~/.ssh/config): {', '.join(map(repr, names)) or 'none'}"
            )
        host = resolve_host(str(name), self.settings)
        from .docker import image_and_options

        image, docker_opts = image_and_options(opts, self.settings, "on the host's Docker")
        conn = self.connection(host)
        probe = self._probe(conn, host, image or None)
        needed = sum(len(b) for b in batch.variant_blobs) + len(batch.fn_blob) * len(batch.variants)
        needed += 4096 * len(batch.variants) + SPACE_MARGIN
        where = f"ssh_host {host.name!r} ({host.address})"
        if not probe.get("writable"):
            existing = probe.get("existing")
            why = (
                f"{existing} is not a directory"
                if not probe.get("is_dir")
                else f"{existing} is not writable by {probe.get('user')}"
            )
            raise PermissionError(
                f"{where}: the remote log dir {probe['log_dir']} cannot be written ({why}). Set "
                f"{host.setting('log_dir')} (or SSH_LOG_DIR) to a directory {probe.get('user')} can write"
            )
        free = probe.get("free")
        if free is not None and free < needed:
            raise OSError(
                28,
                f"{where}: the remote disk is full: {probe['log_dir']} has {_human(free)} free and this "
                f"launch needs about {_human(needed)} (its payloads and {_human(SPACE_MARGIN)} for code and "
                f"first outputs). Free space there, or set {host.setting('log_dir')} to a larger disk",
            )
        limit = (
            opts.get("max_parallel")
            or host.max_parallel
            or self.settings.get("MAX_PARALLEL")
            or probe.get("cpus")
            or 1
        )
        from ..payload import python_version

        runtime: Any = PlainRuntime(python=host.python)
        target = probe["python"]
        image_id = None
        if image:
            docker = probe.get("docker") or {}
            if docker.get("error"):
                raise SshError(
                    f"{where}: Docker on the host: {docker['error']}. Start the daemon there, or set "
                    f"{host.setting('docker_host')}"
                )
            if docker.get("missing"):
                close = docker.get("close") or []
                hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
                raise SshError(
                    f"{where}: image {image!r} is not on the host's Docker daemon.{hint} Its images: "
                    f"{', '.join(docker.get('tags') or []) or 'none'}. Pull or build it there first"
                )
            if opts.get("use_gpu") and "nvidia" not in (docker.get("runtimes") or []):
                raise SshError(f"{where}: use_gpu=True but the host's Docker daemon has no 'nvidia' runtime")
            image_id = docker["image_id"]
            target = docker["python"]
            _remember_image(host, image_id, target)
            runtime = DockerRuntime(image=image_id, user=f"{probe['uid']}:{probe['gid']}")
        return SshPlan(
            runtime=runtime,
            variants_per_task=variants_per_task(opts, len(batch.variants), int(limit)),
            target_python=None if target == python_version() else target,
            host=host,
            probe=probe,
            max_parallel=int(limit),
            docker_image=image or None,
            image_id=image_id,
            docker_options=docker_opts,
        )

    def _probe(self, conn: Connection, host: SshHost, image: Optional[str]) -> Dict[str, Any]:
        from ..templating import render

        request: Dict[str, Any] = {"log_dir": host.log_dir}
        if image:
            request["docker"] = {"host": host.docker_host, "image": image, "known": _known_images(host)}
        source = (Path(__file__).resolve().parent.parent / "ssh_remote.py").read_text()
        command = render("ssh_probe.sh.j2", python=host.python, source=source, request=json.dumps(request))
        code, out, err = conn.run(command, timeout=120)
        where = f"ssh_host {host.name!r} ({host.address})"
        if code == 127:
            raise SshError(
                f"{where}: no Python at {host.python!r} on the host. Install Python 3.8+ there, or set "
                f"{host.setting('python')} to its path"
            )
        try:
            answer = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise SshError(
                f"{where}: probing the host with {host.python!r} failed (exit {code}): "
                f"{(err or out).decode(errors='replace').strip()[-500:]}. easylaunch needs Python 3.8+ there"
            ) from None
        return answer

    # -- launch ----------------------------------------------------------------------
    def launch(self, batch: Batch, plan: SshPlan) -> None:
        with self._lock:
            self._launch(batch, plan)

    def _launch(self, batch: Batch, plan: SshPlan) -> None:
        host = plan.host
        assert host is not None
        conn = self.connection(host)
        root = plan.probe["log_dir"]
        store = posixpath.join(root, ".snapshots")
        unpacked = posixpath.join(root, UNPACK_DIR)
        exp_remote = posixpath.join(root, batch.exp_name)
        batch_remote = posixpath.join(exp_remote, ".batches", batch.batch_id)
        shipment = ship(batch, batch.log_root / ".snapshots", zips=True, same_machine=False)
        local_files = list(shipment.zips)
        if shipment.snapshot:
            local_files.append(Path(shipment.snapshot["archive"]))
        zips = [posixpath.join(store, z.name) for z in shipment.zips]
        remote_dir = {run.index: posixpath.join(exp_remote, run.name) for run in batch.runs}
        task_groups = groups(batch.runs, plan.variants_per_task)
        tasks_file = posixpath.join(batch_remote, "tasks.json")
        agent: Dict[str, Any] = {
            "batch_id": batch.batch_id,
            "exp": batch.exp_name,
            "python": host.python,
            "max_parallel": plan.max_parallel,
            "groups": [[remote_dir[r.index] for r in g] for g in task_groups],
            "tasks_file": tasks_file,
        }
        env = {"EASYLAUNCH_SNAPSHOT_CACHE": unpacked}
        if isinstance(plan.runtime, DockerRuntime):
            agent.update(runtime="docker", docker_host=host.docker_host, containers=[])
            from .docker import host_config

            on = host.docker_root

            def mount(path: str, read_only: bool) -> Mount:
                """A host path, where the daemon sees it (under docker_root) -> the same path inside."""
                return Mount(on + path, path, read_only) if on else Mount(path, None, read_only)

            for i, group in enumerate(task_groups):
                rt = DockerRuntime(
                    image=str(plan.image_id),
                    mounts=[
                        mount(store, True),
                        mount(unpacked, False),
                        mount(batch_remote, True),
                        *[mount(remote_dir[r.index], False) for r in group],
                    ],
                    user=plan.runtime.user,
                    gpu=bool(batch.options.get("use_gpu")),
                    gpu_id=batch.options.get("gpu_id") if batch.options.get("use_gpu") else None,
                    env={
                        "HOME": "/tmp",
                        **env,
                        **{str(k): str(v) for k, v in (plan.docker_options.get("env") or {}).items()},
                    },
                    labels={
                        MANAGED: "1",
                        "io.easylaunch.exp": batch.exp_name,
                        "io.easylaunch.batch": batch.batch_id,
                        "io.easylaunch.task": str(i),
                    },
                    options=host_config(plan.docker_options),
                )
                body = rt.container_config(["--tasks", tasks_file, "--index", str(i), "--quiet"], zips)
                agent["containers"].append(
                    {"name": f"easylaunch-{batch.exp_name[:40]}-{batch.batch_id}-{i}", "body": body}
                )
        else:
            cmd = PlainRuntime(python=host.python).command(zips)
            agent.update(
                runtime="plain",
                command=[str(w) for w in cmd.prefix],
                env={**env, "PYTHONPATH": ":".join(zips)},
            )
        for i, group in enumerate(task_groups):
            for run in group:
                batch.backend[run.index] = {
                    "remote_run_dir": remote_dir[run.index],
                    "task": i,
                    "task_runs": len(group),
                }
        batch.backend_common = {
            "ssh_host": host.name,
            "hostname": host.hostname,
            "port": host.port,
            "username": host.username,
            "host_key": conn.host_key,
            "known_hosts": host.known_hosts,
            "key_files": list(host.key_files),
            "proxy_jump": host.proxy_jump,
            "remote_log_dir": root,
            "remote_batch_dir": batch_remote,
            "remote_python": plan.probe.get("python_full"),
            "python": host.python,
            "zips": zips,
            "runtime": agent["runtime"],
            "docker_image": plan.docker_image,
            "image_id": plan.image_id,
            "variants_per_task": plan.variants_per_task,
        }
        sftp = conn.sftp()
        made: List[str] = []
        upload = posixpath.join(root, f".upload-{batch.batch_id}.tar.gz")
        try:
            for d in (root, store, unpacked):
                _sftp_makedirs(sftp, d, made)
            for path in local_files:
                self._put_once(sftp, path, posixpath.join(store, path.name), host)
            batch.materialize()
            archive = _sweep_archive(batch, task_groups, remote_dir, agent, tasks_file)
            self._put(sftp, archive, upload, host)
            batch.started = True  # from here on the host may run them: keep the local record
            answer = conn.request(
                self._agent_command(host.python, zips, ["serve"]),
                {"cmd": "start", "root": root, "upload": upload, "batch_dir": batch_remote},
                timeout=120,
            )
            if "error" in answer:
                batch.started = False  # the host undid its part
                raise SshError(
                    f"ssh_host {host.name!r}: starting the sweep on the host failed: {answer['error']}"
                )
        except BaseException:
            if not batch.started:
                try:
                    _sftp_remove(sftp, upload)
                    for d in reversed(made):
                        sftp.rmdir(d)
                except Exception:
                    pass
            raise

    def _put_once(self, sftp: Any, local: Path, remote: str, host: SshHost) -> None:
        """Upload ``local`` unless the content-addressed store already has it."""
        size = local.stat().st_size
        try:
            if sftp.stat(remote).st_size == size:
                return
        except OSError:
            pass
        self._put(sftp, local.read_bytes(), remote, host)
        self.stats["snapshot_uploads" if local.name.endswith(".tar.gz") else "zip_uploads"] += 1

    def _put(self, sftp: Any, data: bytes, remote: str, host: SshHost) -> None:
        """Write ``data`` to ``remote`` atomically (a temporary name, then a rename)."""
        tmp = posixpath.join(
            posixpath.dirname(remote), f".{posixpath.basename(remote)}.{os.urandom(4).hex()}.part"
        )
        self.stats["uploads"] += 1
        self.stats["upload_bytes"] += len(data)
        try:
            with sftp.open(tmp, "wb") as f:
                f.set_pipelined(True)
                f.write(data)
            sftp.chmod(tmp, 0o600 if remote.endswith(".tar.gz") and "/.upload-" in remote else 0o644)
            sftp.posix_rename(tmp, remote)
        except OSError as exc:
            _sftp_remove(sftp, tmp)
            raise SshError(
                f"ssh_host {host.name!r}: writing {remote} on the host failed ({exc}); is its disk full?"
            ) from None

    # -- state and outputs -----------------------------------------------------------------
    @staticmethod
    def _ours(jobs: Sequence[Job]) -> List[Job]:
        return [j for j in jobs if "remote_run_dir" in (j.manifest.get("backend") or {})]

    def _host_of(self, job: Job) -> SshHost:
        backend = job.manifest["backend"]
        try:
            host = resolve_host(backend["ssh_host"], self.settings)
            if host.key == (backend["hostname"], backend["port"], backend["username"]):
                return host
        except (ValueError, SshError):
            pass
        return SshHost(  # the config changed since the launch: what the manifest recorded
            name=backend["ssh_host"],
            hostname=backend["hostname"],
            port=int(backend["port"]),
            username=backend["username"],
            key_files=list(backend.get("key_files") or []),
            known_hosts=backend.get("known_hosts") or "~/.ssh/known_hosts",
            python=backend.get("python") or "python3",
            proxy_jump=backend.get("proxy_jump"),
            source=f"the manifest of {job.run_dir.name}",
        )

    def _by_host(self, jobs: Sequence[Job]) -> Dict[Tuple[str, int, str], Tuple[SshHost, List[Job]]]:
        out: Dict[Tuple[str, int, str], Tuple[SshHost, List[Job]]] = {}
        for job in self._ours(jobs):
            b = job.manifest["backend"]
            key = (b["hostname"], int(b["port"]), b["username"])
            if key not in out:
                out[key] = (self._host_of(job), [])
            out[key][1].append(job)
        return out

    def _remote(self, host: SshHost, jobs: List[Job], command: str, request: dict) -> Optional[dict]:
        """One agent command for ``jobs`` of ``host`` (reconnecting once); None when unreachable."""
        backend = jobs[0].manifest["backend"]
        text = self._agent_command(backend.get("python") or host.python, backend["zips"], ["serve"])
        for attempt in range(2):
            try:
                conn = self.connection(host)
                answer = conn.request(text, {"cmd": command, **request}, timeout=120)
                if "error" in answer:
                    raise SshError(f"`{command}` on {host.address} failed: {answer['error']}")
                self._warned.discard(host.key)
                return answer
            except (SshError, OSError, EOFError, Exception) as exc:  # paramiko's SSHException too
                self._drop(host)
                if attempt == 0 and not isinstance(exc, SshError):
                    continue
                if host.key not in self._warned:
                    self._warned.add(host.key)
                    print(
                        f"easylaunch: ssh host {host.name} unreachable ({exc}); will retry", file=sys.stderr
                    )
                return None
        return None

    def _sync(self, jobs: Sequence[Job], live: bool) -> Dict[Path, Optional[State]]:
        out: Dict[Path, Optional[State]] = {}
        for host, members in self._by_host(jobs).values():
            request = {
                "runs": [
                    {
                        "dir": j.manifest["backend"]["remote_run_dir"],
                        "batch": j.manifest["backend"].get("remote_batch_dir"),
                        "files": _local_signatures(j.run_dir),
                        "live": live,
                    }
                    for j in members
                ]
            }
            self.stats["polls"] += 1
            answer = self._remote(host, members, "poll", request)
            if answer is None:
                continue
            by_dir = {r["dir"]: r for r in answer.get("runs") or []}
            work: List[Tuple[Job, List[dict]]] = []
            for job in members:
                entry = by_dir.get(job.manifest["backend"]["remote_run_dir"])
                if entry is None:
                    continue
                if entry.get("missing"):
                    launched = float(job.manifest.get("launched") or 0)
                    if live and time.time() - launched > MISSING_GRACE:
                        out[job.run_dir] = transitions.not_started(
                            job.run_dir,
                            State.FAILED,
                            f"its run directory {host.hostname}:{entry['dir']} is not on the host (the "
                            "launch stopped before it got there, or it was removed there)",
                        )
                    continue
                if entry.get("files"):
                    # status.json last: a reader that sees the outcome finds everything before it
                    work.append((job, sorted(entry["files"], key=lambda f: f["name"] == records.STATUS)))
            if len(work) > 8:  # creating files is what this waits for (slow file systems): threads
                from concurrent.futures import ThreadPoolExecutor

                with ThreadPoolExecutor(4, thread_name_prefix="easylaunch-fetch") as pool:
                    missed = list(pool.map(_apply_run, work))
            else:
                missed = [_apply_run(w) for w in work]
            later = [m for ms in missed for m in ms]
            if later:
                self._fetch_files(host, later)
            changed = {job.run_dir for job, files in work if any(f["name"] == records.STATUS for f in files)}
            for job in members:
                if job.run_dir not in out and job.run_dir in changed:
                    out[job.run_dir] = transitions.current(job.run_dir)  # the others: their file says
        return out

    def _fetch_files(self, host: SshHost, todo: List[Tuple[Job, dict]]) -> None:
        """The files too large for a poll's answer, by SFTP (then the status records held back)."""
        try:
            sftp = self.connection(host).sftp()
            for job, f in todo:
                if "data" in f and "offset" not in f:
                    _apply(job.run_dir, f)  # a status record, after the files it describes
                    continue
                remote = posixpath.join(job.manifest["backend"]["remote_run_dir"], f["name"])
                local = _local_path(job.run_dir, f["name"])
                if local is None:
                    continue
                local.parent.mkdir(parents=True, exist_ok=True)
                tmp = local.with_name(f".{local.name}.{os.urandom(4).hex()}.part")
                self.stats["sftp_gets"] += 1
                sftp.get(remote, str(tmp))
                os.utime(tmp, ns=(f["mtime_ns"], f["mtime_ns"]))
                os.replace(tmp, local)
        except Exception as exc:
            self._drop(host)
            print(
                f"easylaunch: fetching outputs from {host.name} failed ({exc}); will retry", file=sys.stderr
            )

    def poll(self, jobs: Sequence[Job]) -> Dict[Path, Optional[State]]:
        """ONE remote command per host for all these runs: their states and new outputs."""
        with self._lock:
            return self._sync(jobs, live=True)

    def fetch(self, jobs: Sequence[Job]) -> None:
        """Bring what the runs wrote on the host (new or changed files) into their local dirs."""
        with self._lock:
            self._sync(jobs, live=False)

    def cancel(self, jobs: Sequence[Job]) -> None:
        """Cancel marks on the host; a task whose runs are all cancelled is stopped (its process
        group, or its container, gets SIGTERM: the runners record CANCELLED)."""
        with self._lock:
            for host, members in self._by_host(jobs).values():
                request = {
                    "runs": [
                        {
                            "dir": j.manifest["backend"]["remote_run_dir"],
                            "batch": j.manifest["backend"].get("remote_batch_dir"),
                        }
                        for j in members
                    ]
                }
                self._remote(host, members, "cancel", request)

    def cleanup(self, jobs: Sequence[Job]) -> None:
        """Nothing is held for finished runs (the agent removes its containers itself)."""


# -- helpers --------------------------------------------------------------------------------


def _sftp_makedirs(sftp: Any, path: str, made: List[str]) -> None:
    parts = path.strip("/").split("/")
    current = ""
    for part in parts:
        current += "/" + part
        try:
            sftp.stat(current)
        except OSError:
            sftp.mkdir(current, 0o755)
            made.append(current)


def _sftp_remove(sftp: Any, path: str) -> None:
    try:
        sftp.remove(path)
    except OSError:
        pass


def _sweep_archive(
    batch: Batch, task_groups: List[list], remote_dir: Dict[int, str], agent: dict, tasks_file: str
) -> bytes:
    """The sweep's run directories (payloads, manifests, status, git patches), its task list and
    the agent's file: ONE gzip tar, paths relative to the remote log dir."""
    import io
    import tarfile  # not at the top: every launch imports every mode module

    buf = io.BytesIO()
    now = int(time.time())
    exp = batch.exp_name

    def add_bytes(tar: Any, name: str, data: bytes, mode: int = 0o644) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = now
        info.mode = mode
        tar.addfile(info, io.BytesIO(data))

    def add_dir(tar: Any, name: str) -> None:
        info = tarfile.TarInfo(name)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        info.mtime = now
        tar.addfile(info)

    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for run in batch.runs:
            base = f"{exp}/{run.name}"
            add_dir(tar, base)
            for top, dirs, files in os.walk(run.run_dir):
                dirs.sort()
                rel_top = os.path.relpath(top, run.run_dir)
                if rel_top != ".":
                    add_dir(tar, f"{base}/{rel_top}")
                for name in sorted(files):
                    path = os.path.join(top, name)
                    rel = name if rel_top == "." else f"{rel_top}/{name}"
                    st = os.stat(path)
                    mtime = int(st.st_mtime)
                    # both sides then hold the same (size, mtime): the first poll fetches nothing back
                    os.utime(path, ns=(mtime * 10**9, mtime * 10**9))
                    with open(path, "rb") as f:
                        info = tarfile.TarInfo(f"{base}/{rel}")
                        info.size = st.st_size
                        info.mtime = mtime
                        info.mode = st.st_mode & 0o777
                        tar.addfile(info, f)
        batch_rel = f"{exp}/.batches/{batch.batch_id}"
        add_dir(tar, f"{exp}/.batches")
        add_dir(tar, batch_rel)
        tasks = {
            "groups": [[posixpath.join(remote_dir[r.index], records.PAYLOAD) for r in g] for g in task_groups]
        }
        add_bytes(tar, f"{batch_rel}/tasks.json", json.dumps(tasks).encode())
        add_bytes(tar, f"{batch_rel}/agent.json", json.dumps(agent, indent=1).encode(), 0o600)
    return buf.getvalue()


_SKIP_LOCAL = {records.PAYLOAD, records.MANIFEST, records.CANCEL_MARK}


def _local_signatures(run_dir: Path) -> Dict[str, List[int]]:
    """``name -> [size, mtime_ns]`` of the files a poll compares (what the host may change)."""
    out: Dict[str, List[int]] = {}
    todo = [(str(run_dir), "")]
    while todo:  # scandir: the stat results come with the listing (polled for every unfinished run)
        top, prefix = todo.pop()
        try:
            entries = list(os.scandir(top))
        except OSError:
            continue
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            rel = prefix + name
            try:
                if entry.is_dir(follow_symlinks=False):
                    todo.append((entry.path, rel + "/"))
                    continue
                if rel in _SKIP_LOCAL or rel.startswith("payload.attempt"):
                    continue
                st = entry.stat()
            except OSError:
                continue
            out[rel] = [st.st_size, st.st_mtime_ns]
    return out


def _local_path(run_dir: Path, name: str) -> Optional[Path]:
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in name:
        return None
    return run_dir.joinpath(*parts)


def _apply_run(item: Tuple[Job, List[dict]]) -> List[Tuple[Job, dict]]:
    """Write a run's files of a poll's answer; returns what must come by SFTP (and then the
    held-back status record)."""
    job, entries = item
    missed: List[Tuple[Job, dict]] = []
    for f in entries:
        if f["name"] == records.STATUS and missed:
            missed.append((job, f))
        elif not _apply(job.run_dir, f):
            missed.append((job, f if f.get("fetch") else {**f, "fetch": True}))
    return missed


def _apply(run_dir: Path, entry: dict) -> bool:
    """Write one file of a poll's answer into the run dir; False when it must come by SFTP."""
    name = entry["name"]
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in name:
        return True
    local = os.path.join(run_dir, *parts)
    if entry.get("fetch"):
        return False
    data = base64.b64decode(entry["data"])
    mtime = int(entry["mtime_ns"])
    if "offset" in entry:
        try:
            have = os.stat(local).st_size
        except FileNotFoundError:
            have = -1
        if have != entry["offset"]:
            return False  # not the bytes the host thinks we have: fetch it whole
        with open(local, "ab") as f:
            f.write(data)
        os.utime(local, ns=(mtime, mtime))
        return True
    if entry["name"] == records.STATUS:
        try:
            new_state = State(json.loads(data).get("state", State.PENDING))
        except ValueError:
            return True
        if transitions.current(run_dir) in TERMINAL_STATES and new_state not in TERMINAL_STATES:
            return True  # an outcome recorded here is never replaced by an older record
    if len(parts) > 1:
        os.makedirs(os.path.dirname(local), exist_ok=True)
    # status.json may be hard-linked to its batch-mates' (records.write_same_status): replace it
    records.atomic_write_bytes(local, data)
    os.utime(local, ns=(mtime, mtime))
    return True


def _image_cache() -> Path:
    from ..snapshot import cache_dir

    return cache_dir().parent / "ssh-docker-images.json"


def _known_images(host: SshHost) -> Dict[str, str]:
    known = records.read_json(_image_cache(), {}) or {}
    return dict(known.get(f"{host.username}@{host.hostname}:{host.port}") or {})


def _remember_image(host: SshHost, image_id: str, python: str) -> None:
    path = _image_cache()
    try:
        known = records.read_json(path, {}) or {}
        known.setdefault(f"{host.username}@{host.hostname}:{host.port}", {})[image_id] = python
        path.parent.mkdir(parents=True, exist_ok=True)
        records.atomic_write_json(path, known)
    except (OSError, ValueError):
        pass  # only a cache
