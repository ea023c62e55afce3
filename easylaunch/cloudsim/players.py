"""What cloudsim does for every emulated instance, whatever the cloud: run its boot script for
real, serve its metadata, and the loop and endpoints around them.

An :class:`InstancePlayer` runs one instance's user data / startup script as a local process
(``runner="process"``: bash on this machine, in the instance's own root directory) or in a
local Docker container (``runner="docker"``, ``--network host``), with the SDK endpoint
variables pointing at the emulators and ``$EASYLAUNCH_METADATA_URL`` at a metadata server of
its own on 127.0.0.1 (:class:`MetadataServer`, given the provider's answers). Nothing else of
this machine's environment reaches it (no credentials: the metadata server hands out the
instance's own, as a cloud does).

:class:`Sim` is the part of ``cloudsim aws`` and ``cloudsim gcp`` that is the same for both:
the players and their metadata servers, the control endpoint, the loop that looks at the
emulator every ``interval`` seconds, and the shutdown. A cloud's subclass says what differs
(:meth:`Sim.step`, :meth:`Sim.control`, the endpoints of its own in :meth:`Sim.serve`).
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Tuple

#: handler(method, path, headers) -> (status, body bytes, content type)
Answer = Tuple[int, bytes, str]
#: the image of ``--runner docker`` when none is named
DEFAULT_IMAGE = "local/debian-python:bookworm"


class HttpServer:
    """An HTTP/1.1 server on 127.0.0.1 (``port`` 0: a free one), in a daemon thread, answering
    every request through ``handler(method, path, headers, body)`` (header names lowercased);
    an exception in the handler is a 500 (the client sees it, cloudsim goes on)."""

    def __init__(
        self,
        handler: Callable[[str, str, Dict[str, str], bytes], Answer],
        port: int = 0,
        name: str = "cloudsim-http",
    ):
        #: the last requests: (method, path, time)
        self.requests: collections.deque = collections.deque(maxlen=1000)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                outer.requests.append((self.command, self.path, time.time()))
                try:
                    status, data, ctype = handler(self.command, self.path, headers, body)
                except Exception as exc:
                    status, data, ctype = 500, str(exc).encode(), "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True, name=name).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class MetadataServer(HttpServer):
    """An instance's metadata server (or the control endpoint): ``handler(method, path, headers)``."""

    def __init__(self, handler: Callable[[str, str, Dict[str, str]], Answer], port: int = 0):
        super().__init__(
            lambda method, path, headers, _body: handler(method, path, headers), port, "cloudsim-metadata"
        )


def clean_env(extra: Dict[str, str]) -> Dict[str, str]:
    """A fresh VM's environment: PATH, HOME, LANG, and what the emulation needs."""
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
    }
    env.update(extra)
    return env


class InstancePlayer:
    """One instance's boot script, running for real."""

    def __init__(
        self,
        ident: str,
        script: str,
        work_dir: str,
        env: Dict[str, str],
        runner: str = "process",
        image: str = DEFAULT_IMAGE,
    ):
        self.ident = ident
        self.dir = os.path.join(work_dir, ident)
        self.root = os.path.join(self.dir, "root")
        os.makedirs(self.root, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.script_path = os.path.join(self.dir, "boot.sh")
        fd = os.open(self.script_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(script)
        self.runner = runner
        self.container: Optional[str] = None
        self.started = time.time()
        self.ended: Optional[float] = None
        self.exit_code: Optional[int] = None
        console = open(os.path.join(self.dir, "console.log"), "ab")
        if runner == "docker":
            self.container = f"cloudsim-{ident}"
            args = [
                "docker",
                "run",
                "--rm",
                "--name",
                self.container,
                "--network",
                "host",
                "-v",
                f"{self.dir}:{self.dir}",
                "-v",
                "/var/run/docker.sock:/var/run/docker.sock",
                "-e",
                f"EASYLAUNCH_INSTANCE_ROOT={self.root}",
            ]
            for k, v in env.items():
                args += ["-e", f"{k}={v}"]
            args += [image, self.script_path]
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=console, stderr=console, start_new_session=True
            )
        else:
            self.proc = self._exec(self.script_path, console, env)
        console.close()

    def _exec(self, path: str, log: Any, env: Dict[str, str]) -> subprocess.Popen:
        """The script itself on this machine (its shebang chooses the shell, as cloud-init and
        GCE's script runner execute it), in the instance's root, with a fresh VM's environment."""
        return subprocess.Popen(
            [path],
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=clean_env({**env, "EASYLAUNCH_INSTANCE_ROOT": self.root}),
            start_new_session=True,
        )

    def run_script(self, name: str, script: str, env: Dict[str, str]) -> subprocess.Popen:
        """Run another script of the instance (GCE's shutdown-script) beside its boot script:
        ``NAME.sh``, its output in ``NAME.log`` of the instance's directory."""
        path = os.path.join(self.dir, f"{name}.sh")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
        with os.fdopen(fd, "w") as f:
            f.write(script)
        with open(os.path.join(self.dir, f"{name}.log"), "ab") as log:
            return self._exec(path, log, env)

    def alive(self) -> bool:
        if self.exit_code is None and self.proc.poll() is not None:
            self.exit_code = self.proc.returncode
            self.ended = time.time()
        return self.exit_code is None

    def kill(self) -> None:
        """The VM is gone: every process of it ends at once (no shutdown, no final word)."""
        if self.container:
            subprocess.run(["docker", "kill", self.container], capture_output=True, timeout=60)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        # the runs' processes lead groups of their own (task runners, runners)
        for pid in _descendants_in_dir(self.root):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self.alive()

    def describe(self) -> Dict[str, Any]:
        return {
            "id": self.ident,
            "pid": self.proc.pid,
            "root": self.root,
            "dir": self.dir,
            "runner": self.runner,
            "alive": self.alive(),
            "exit_code": self.exit_code,
        }


def _descendants_in_dir(root: str) -> list:
    """Processes whose working directory or command line is inside ``root`` (the instance's)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{name}/cwd")
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().decode(errors="replace")
        except OSError:
            continue
        if cwd.startswith(root) or root in cmd:
            out.append(int(name))
    return [p for p in out if p != os.getpid()]


def json_answer(obj: Any, status: int = 200) -> Answer:
    return status, json.dumps(obj).encode(), "application/json"


def text_answer(text: str, status: int = 200) -> Answer:
    return status, text.encode(), "text/plain"


class Sim:
    """What the players of every cloud share (see the module docstring). Subclasses set
    ``cloud`` and implement :meth:`step` (look at the emulator once: start new instances, end
    gone ones), :meth:`describe`, :meth:`planted` and :meth:`command` (the control endpoint's
    answers) and :meth:`banner`."""

    cloud = ""
    #: what a failed step is said to be, before "(error); retrying"
    step_error = "step failed"

    def __init__(self, work_dir: str, runner: str = "process", image: str = "", interval: float = 0.5):
        self.work_dir = os.path.abspath(work_dir)
        os.makedirs(self.work_dir, exist_ok=True)
        self.runner, self.image = runner, image or DEFAULT_IMAGE
        self.interval = interval
        self.stopping = False
        self.players: Dict[str, InstancePlayer] = {}
        self.meta: Dict[str, MetadataServer] = {}

    def play(
        self,
        ident: str,
        script: str,
        env: Dict[str, str],
        metadata: Callable[[str, str, Dict[str, str]], Answer],
    ) -> MetadataServer:
        """Start playing one instance: its metadata server (answering through ``metadata``), then
        its boot script with ``env`` and ``$EASYLAUNCH_METADATA_URL`` pointing at that server."""
        meta = MetadataServer(metadata)
        self.meta[ident] = meta
        env = {**env, "EASYLAUNCH_METADATA_URL": meta.url}
        self.players[ident] = InstancePlayer(ident, script, self.work_dir, env, self.runner, self.image)
        return meta

    def step(self) -> None:
        raise NotImplementedError

    def describe(self) -> Dict[str, Any]:
        """``GET /instances`` of the control endpoint: what is being played."""
        raise NotImplementedError

    def planted(self) -> Dict[str, str]:
        """``GET /planted``: the credentials the metadata servers hand out (for leak scans)."""
        raise NotImplementedError

    def command(self, method: str, path: str, query: Dict[str, str]) -> Optional[Answer]:
        """The cloud's own control requests (faults); None for an unknown one."""
        return None

    def control(self, method: str, path: str, headers: Dict[str, str]) -> Answer:
        parts = urllib.parse.urlsplit(path)
        if parts.path == "/instances":
            return json_answer(self.describe())
        if parts.path == "/planted":
            return json_answer(self.planted())
        answer = self.command(method, parts.path, dict(urllib.parse.parse_qsl(parts.query)))
        return answer if answer is not None else text_answer("unknown control request", 404)

    def banner(self) -> str:
        """The line printed at start after the control address."""
        return f"runner {self.runner}"

    def serve(self) -> List[HttpServer]:
        """Endpoints of the cloud's own, started before the control endpoint (closed at the end)."""
        return []

    def run(self, control_port: int = 0) -> int:
        """Serve, then step every ``interval`` seconds until ``stopping``; end every instance."""
        servers = self.serve()
        control = MetadataServer(self.control, control_port)
        print(f"cloudsim {self.cloud}: control {control.url}", flush=True)
        print(f"cloudsim {self.cloud}: {self.banner()}", flush=True)
        try:
            while not self.stopping:
                try:
                    self.step()
                except Exception as exc:
                    print(
                        f"cloudsim {self.cloud}: {self.step_error} ({exc}); retrying",
                        file=sys.stderr,
                        flush=True,
                    )
                time.sleep(self.interval)
        finally:
            for server in servers:
                server.close()
            self.shutdown()
        return 0

    def shutdown(self) -> None:
        for player in self.players.values():
            if player.alive():
                player.kill()
        for meta in self.meta.values():
            meta.close()


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now (for an emulator to start on)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0) -> None:
    """Wait until ``url`` answers HTTP (any status); OSError after ``timeout`` seconds."""
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.1)
