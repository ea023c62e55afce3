"""Target side of mode ``ssh``, self-contained: the host probe and a Docker Engine client.

This file is sent as it is to a host easylaunch has not set up yet (``python3 -c SOURCE probe
REQUEST``: standard library only, Python 3.8+, no easylaunch import at module level), and it
is imported from the shipped easylaunch zip by :mod:`easylaunch.ssh_agent` once it has::

    python3 -c "$(cat ssh_remote.py)" probe '{"log_dir": "~/easylaunch-logs"}'
    # -> {"python": "3.11", "log_dir": "/home/me/easylaunch-logs", "writable": true, "free": ...}

The probe writes nothing: it reports where the log dir would be, whether it could be created
and written, the free space there, the user's ids, the CPU count and, when asked, what the
host's Docker daemon says about an image (its Python minor comes from one short container).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence


class EngineError(RuntimeError):
    """The Docker daemon answered with an error status."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{message} (HTTP {status})")
        self.status = status
        self.message = message


class DockerSocket:
    """The few Docker Engine API calls the remote side makes, over a unix socket (stdlib HTTP).

    The same request bodies as :class:`easylaunch.modes.docker.Engine` (dockerd and Podman)::

        engine = DockerSocket("unix:///var/run/docker.sock")
        engine.ping()
        cid = engine.create(body, "easylaunch-demo-0")
        engine.start(cid)
    """

    def __init__(self, url: str, timeout: float = 60):
        if not url.startswith("unix://"):
            raise ValueError(
                f"docker_host {url!r}: on an SSH host only a unix socket (unix:///path) is supported"
            )
        self.url = url
        self.path = url[len("unix://") :]
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None, raw: bool = False) -> Any:
        import http.client
        import socket

        sock_path, timeout = self.path, self.timeout

        class _Unix(http.client.HTTPConnection):
            def connect(conn) -> None:  # noqa: N805 - nested subclass
                conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.sock.settimeout(timeout)
                conn.sock.connect(sock_path)

        conn = _Unix("localhost", timeout=timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            content = response.read()
        finally:
            conn.close()
        if response.status >= 400:
            try:
                message = json.loads(content).get("message") or content.decode(errors="replace")
            except ValueError:
                message = content.decode(errors="replace")
            raise EngineError(response.status, message.strip())
        if raw:
            return content
        if "json" not in (response.getheader("Content-Type") or ""):
            return content.decode("latin-1")
        return json.loads(content) if content.strip() else None

    def ping(self) -> None:
        self.call("GET", "/_ping")

    def image(self, name: str) -> Optional[dict]:
        from urllib.parse import quote

        try:
            return self.call("GET", "/images/%s/json" % quote(name, safe=""))
        except EngineError as exc:
            if exc.status == 404:
                return None
            raise

    def tags(self) -> List[str]:
        images = self.call("GET", "/images/json") or []
        return sorted({t for i in images for t in (i.get("RepoTags") or []) if t != "<none>:<none>"})

    def create(self, body: Dict[str, Any], name: str) -> str:
        from urllib.parse import quote

        return self.call("POST", "/containers/create?name=%s" % quote(name, safe=""), body)["Id"]

    def start(self, container: str) -> None:
        self.call("POST", "/containers/%s/start" % container)

    def inspect(self, container: str) -> Optional[dict]:
        try:
            return self.call("GET", "/containers/%s/json" % container)
        except EngineError as exc:
            if exc.status == 404:
                return None
            raise

    def containers(self, labels: Sequence[str]) -> List[dict]:
        from urllib.parse import quote

        filters = quote(json.dumps({"label": list(labels)}), safe="")
        return self.call("GET", "/containers/json?all=1&filters=%s" % filters) or []

    def kill(self, container: str, sig: str = "SIGKILL") -> None:
        try:
            self.call("POST", "/containers/%s/kill?signal=%s" % (container, sig))
        except EngineError as exc:
            if exc.status not in (404, 409):
                raise

    def remove(self, container: str) -> None:
        try:
            self.call("DELETE", "/containers/%s?force=1" % container)
        except EngineError as exc:
            if exc.status not in (404, 409):
                raise

    def wait(self, container: str, timeout: float) -> Optional[int]:
        old, self.timeout = self.timeout, timeout
        try:
            return (self.call("POST", "/containers/%s/wait" % container) or {}).get("StatusCode")
        except (OSError, EngineError):
            return None
        finally:
            self.timeout = old

    def logs(self, container: str) -> bytes:
        return _demux(self.call("GET", "/containers/%s/logs?stdout=1&stderr=1" % container, raw=True))

    def pull(self, image: str) -> None:
        """Pull ``image`` (``name[:tag]``) when the daemon lacks it; EngineError when it cannot
        (the daemon answers 200 and reports the failure inside its progress stream)."""
        from urllib.parse import quote

        if self.image(image) is not None:
            return
        old, self.timeout = self.timeout, max(self.timeout, 1800)
        try:
            raw = self.call("POST", "/images/create?fromImage=%s" % quote(image, safe=""), raw=True)
        except EngineError as exc:
            raise EngineError(exc.status, "pulling %s: %s" % (image, exc.message)) from None
        finally:
            self.timeout = old
        for line in raw.decode(errors="replace").splitlines():
            try:
                error = json.loads(line).get("error")
            except (ValueError, AttributeError):
                continue
            if error:
                raise EngineError(500, "pulling %s: %s" % (image, error))
        if self.image(image) is None:
            raise EngineError(404, "image %s is not on the daemon after its pull" % image)

    def exec_run(self, container: str, argv: Sequence[str], timeout: Optional[float] = None) -> tuple:
        """Run ``argv`` in a running container until it ends: ``(exit code, stdout + stderr)``.
        ``timeout``: seconds the command may take (default: no limit)."""
        ident = self.call(
            "POST",
            "/containers/%s/exec" % container,
            {"Cmd": list(argv), "AttachStdout": True, "AttachStderr": True},
        )["Id"]
        old, self.timeout = self.timeout, timeout
        try:
            raw = self.call("POST", "/exec/%s/start" % ident, {"Detach": False, "Tty": False}, raw=True)
        finally:
            self.timeout = old
        return (self.call("GET", "/exec/%s/json" % ident) or {}).get("ExitCode"), _demux(raw)

    def archive(self, container: str, path: str) -> bytes:
        """``path`` of the container as a tar archive (EngineError 404 when it is missing)."""
        from urllib.parse import quote

        return self.call(
            "GET", "/containers/%s/archive?path=%s" % (container, quote(path, safe="")), raw=True
        )


def _demux(raw: bytes) -> bytes:
    """The payloads of a multiplexed Docker stream: frames of [stream, 0, 0, 0, size (4 bytes,
    big endian)] + payload, stdout and stderr in the order they were written."""
    out, i = [], 0
    while i + 8 <= len(raw):
        size = int.from_bytes(raw[i + 4 : i + 8], "big")
        out.append(raw[i + 8 : i + 8 + size])
        i += 8 + size
    return b"".join(out)


_IMAGE_PROBE = (
    "command -v python3 >/dev/null 2>&1 || exit 127; "
    "exec python3 -c 'import sys; print(\"%d.%d\" % sys.version_info[:2])'"
)


def image_python(engine: DockerSocket, image_id: str) -> Dict[str, Any]:
    """Run ``python3 --version`` in a short container of the image: ``{"python": "3.11"}`` or
    ``{"error": ...}`` (no /bin/sh, no python3)."""
    body = {
        "Image": image_id,
        "Cmd": ["/bin/sh", "-c", _IMAGE_PROBE],
        "Entrypoint": [],
        "Labels": {"io.easylaunch.managed": "probe"},
        "HostConfig": {"NetworkMode": "none"},
    }
    name = "easylaunch-probe-%d-%s" % (os.getpid(), os.urandom(4).hex())
    container = engine.create(body, name)
    try:
        try:
            engine.start(container)
        except EngineError as exc:
            return {"error": "cannot start a container of the image (no /bin/sh?): %s" % exc.message[:200]}
        code = engine.wait(container, 60)
        out = engine.logs(container).decode(errors="replace").strip()
    finally:
        engine.remove(container)
    if code == 127:
        return {"error": "the image has no python3 on its PATH"}
    version = out.splitlines()[-1] if out else ""
    if code != 0 or not version[:1].isdigit():
        return {"error": "python3 did not say its version (exit %s, output %r)" % (code, out[:200])}
    return {"python": version}


def _nearest_existing(path: str) -> str:
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def probe(request: Dict[str, Any]) -> Dict[str, Any]:
    """What the launcher must know before it writes anything (see the module docstring)."""
    import pwd

    out: Dict[str, Any] = {
        "python": "%d.%d" % sys.version_info[:2],
        "python_full": sys.version.split()[0],
        "executable": sys.executable,
        "uid": os.getuid(),
        "gid": os.getgid(),
        "cpus": os.cpu_count() or 1,
        "hostname": os.uname().nodename,
        "proc": os.path.isdir("/proc/self"),
    }
    try:
        out["user"] = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        out["user"] = str(os.getuid())
    out["home"] = os.path.expanduser("~")
    log_dir = os.path.abspath(os.path.expanduser(str(request.get("log_dir") or "~/easylaunch-logs")))
    out["log_dir"] = log_dir
    existing = _nearest_existing(log_dir)
    out["existing"] = existing
    out["exists"] = existing == log_dir
    out["is_dir"] = os.path.isdir(existing)
    out["writable"] = out["is_dir"] and os.access(existing, os.W_OK | os.X_OK)
    try:
        st = os.statvfs(existing)
        out["free"] = st.f_bavail * st.f_frsize
    except OSError:
        out["free"] = None
    docker = request.get("docker")
    if docker:
        out["docker"] = _probe_docker(docker)
    return out


def _probe_docker(request: Dict[str, Any]) -> Dict[str, Any]:
    import difflib

    url = str(request.get("host") or "unix:///var/run/docker.sock")
    try:
        engine = DockerSocket(url, timeout=30)
        engine.ping()
    except Exception as exc:
        return {
            "error": "no Docker daemon answers at %s (%s: %s)" % (url, type(exc).__name__, str(exc)[:200])
        }
    name = str(request["image"])
    try:
        image = engine.image(name)
        if image is None:
            tags = engine.tags()
            return {
                "missing": True,
                "close": difflib.get_close_matches(name, tags, n=3, cutoff=0.4),
                "tags": tags[:10],
            }
        try:
            runtimes = sorted(((engine.call("GET", "/info") or {}).get("Runtimes") or {}).keys())
        except Exception:
            runtimes = []
        known = request.get("known") or {}  # image id -> Python minor, the launcher's cache
        if image["Id"] in known:
            return {"image_id": image["Id"], "python": known[image["Id"]], "runtimes": runtimes}
        found = image_python(engine, image["Id"])
        found["image_id"] = image["Id"]
        found["runtimes"] = runtimes
        return found
    except Exception as exc:
        return {"error": "the Docker daemon at %s failed: %s: %s" % (url, type(exc).__name__, str(exc)[:300])}


def main(argv: Sequence[str]) -> int:
    """``probe REQUEST_JSON``: print the probe's answer as one JSON line."""
    if len(argv) != 2 or argv[0] != "probe":
        print("usage: python3 ssh_remote.py probe REQUEST_JSON", file=sys.stderr)
        return 2
    began = time.time()
    answer = probe(json.loads(argv[1]))
    answer["probe_seconds"] = round(time.time() - began, 3)
    print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
