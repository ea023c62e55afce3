"""What cloudsim does for every emulated instance: run its boot script for real, serve its metadata.

An :class:`InstancePlayer` runs one instance's user data / startup script as a local process
(``runner="process"``: bash on this machine, in the instance's own root directory) or in a
local Docker container (``runner="docker"``, ``--network host``), with the SDK endpoint
variables pointing at the emulators and ``$EASYLAUNCH_METADATA_URL`` at a metadata server of
its own on 127.0.0.1 (:class:`MetadataServer`, given the provider's answers). Nothing else of
this machine's environment reaches it (no credentials: the metadata server hands out the
instance's own, as a cloud does).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Optional, Tuple

#: handler(method, path, headers) -> (status, body bytes, content type)
Answer = Tuple[int, bytes, str]


class MetadataServer:
    """An HTTP server on 127.0.0.1 answering through ``handler``; logs every request."""

    def __init__(self, handler: Callable[[str, str, Dict[str, str]], Answer]):
        self.requests: list = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                outer.requests.append((self.command, self.path, time.time()))
                try:
                    status, body, ctype = handler(self.command, self.path, headers)
                except Exception as exc:  # the instance sees a 500, cloudsim goes on
                    status, body, ctype = 500, str(exc).encode(), "text/plain"
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True, name="cloudsim-metadata").start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


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
        image: str = "local/debian-python:bookworm",
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
            args += [image, "bash", self.script_path]
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=console, stderr=console, start_new_session=True
            )
        else:
            self.proc = subprocess.Popen(
                ["bash", self.script_path],
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=console,
                env=clean_env({**env, "EASYLAUNCH_INSTANCE_ROOT": self.root}),
                start_new_session=True,
            )
        console.close()

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
