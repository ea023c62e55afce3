"""Run duets: two long-lived containers per duet, A and B started at once, results copied out.

The engine (dockerd or Podman) is reached through its API socket with easylaunch's own
standard-library client (:class:`easylaunch.ssh_remote.DockerSocket`), so a duet runs as a job
on any target with a Python and an engine (an SSH host, a cloud instance), no Docker SDK needed.
Containers carry the label ``io.easylaunch.duet=<session id>`` (and ``io.easylaunch.managed``)
and are ALWAYS stopped and removed in a ``finally`` (failure, Ctrl-C)."""

from __future__ import annotations

import io
import logging
import os
import random
import subprocess
import tarfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from ..ssh_remote import DockerSocket, EngineError
from .config import DuetConfig, result_name

log = logging.getLogger("easylaunch.duet")
LABEL = "io.easylaunch.duet"
KEEPALIVE = ["sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 1; done"]
ENGINE_SOCKETS = {"docker": "unix:///var/run/docker.sock", "podman": "unix:///run/podman/podman.sock"}


class DuetRunError(RuntimeError):
    """A benchmark command failed, a result path was missing, or the engine is unreachable."""


@dataclass
class Container:
    """One side's long-lived container."""

    engine: DockerSocket
    id: str
    name: str

    def exec_run(self, cmd: str) -> tuple:
        return self.engine.exec_run(self.id, ["sh", "-c", cmd])

    def remove(self) -> None:
        self.engine.remove(self.id)


def _client(docker: str, docker_host: Optional[str] = None) -> DockerSocket:
    """The engine at ``docker_host``, else ``$DOCKER_HOST``, else ``docker``'s usual socket."""
    url = docker_host or os.environ.get("DOCKER_HOST") or ENGINE_SOCKETS.get(docker, ENGINE_SOCKETS["docker"])
    if not url.startswith("unix://"):
        raise DuetRunError(
            f"engine socket {url!r}: easylaunch duet talks to {docker} through a unix socket; give "
            "--docker-host unix:///path (or DOCKER_HOST) on the machine that runs the duet"
        )
    engine = DockerSocket(url, timeout=600)
    try:
        engine.ping()
    except (OSError, EngineError) as exc:
        raise DuetRunError(
            f"no {docker} engine answers at {url} ({exc}); start it, or give --docker-host "
            "unix:///path of the one to use"
        ) from None
    return engine


def _start(engine: DockerSocket, image: str, name: str, labels: dict) -> Container:
    try:
        engine.pull(image)
    except EngineError as exc:
        raise DuetRunError(
            f"image {image!r} is not on the engine at {engine.url} and could not be pulled ({exc.message}); "
            "build or pull it there, or name another image in the config"
        ) from None
    body = {"Image": image, "Cmd": KEEPALIVE, "Entrypoint": [], "Labels": labels}
    container = Container(engine, engine.create(body, name), name)
    try:
        engine.start(container.id)
    except BaseException:
        container.remove()
        raise
    return container


def _artifacts(config: DuetConfig, outdir: Path) -> None:
    art = outdir / "artifacts"
    art.mkdir(parents=True, exist_ok=True)
    for name, cmd in config.artifacts.items():
        proc = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True)
        (art / name).write_text(proc.stdout + (proc.stderr if proc.returncode else ""))


def _copy_out(container: Container, path: str, dest_prefix: Path) -> list[Path]:
    try:
        buf = io.BytesIO(container.engine.archive(container.id, path))
    except EngineError as exc:
        raise DuetRunError(f"result path {path} is missing in {container.name}: {exc}") from None
    written = []
    with tarfile.open(fileobj=buf) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            rel = member.name.split("/", 1)
            if member.name.startswith("/") or ".." in member.name.split("/"):
                continue  # nothing is written outside the results directory
            base = Path(path).name
            target = (
                Path(f"{dest_prefix}.{base}") if len(rel) == 1 else Path(f"{dest_prefix}.{base}") / rel[1]
            )
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
            written.append(target)
    return written


def _exec(container: Container, cmd: str, out: dict, key: str) -> None:
    try:
        code, output = container.exec_run(cmd)
        out[key] = (code, output.decode(errors="replace"))
    except BaseException as exc:  # reported by the caller
        out[key] = (-1, repr(exc))


def run_duets(
    configs: Sequence[DuetConfig],
    outdir: str | os.PathLike,
    docker: Optional[str] = None,
    session: Optional[str] = None,
    docker_host: Optional[str] = None,
) -> Path:
    """Run every duet of ``configs`` into ``outdir`` (which must not exist); returns it.
    ``docker_host``: the engine's socket (default ``$DOCKER_HOST``, else the engine's usual one)::

    run_duets(load_configs(["a.duet.yml"]), "results", docker="podman")
    """
    out = Path(outdir)
    if out.exists():
        raise FileExistsError(f"{out} exists; give a new --outdir (duetbench never overwrites results)")
    session = session or uuid.uuid4().hex[:12]
    client = _client(docker or configs[0].docker_command, docker_host)
    out.mkdir(parents=True)
    created: list[Container] = []
    try:
        for cfg in configs:
            _artifacts(cfg, out)
            rng = random.Random(cfg.seed)
            for duet in cfg.duets:
                ca = cb = None
                labels = {
                    LABEL: session,
                    "io.easylaunch.managed": "true",
                    "io.easylaunch.duet.benchmark": duet.name,
                    "io.easylaunch.duet.suite": cfg.suite,
                }
                ca = _start(client, duet.a.image, f"duet-{session}-{duet.name}-A", {**labels, "side": "A"})
                created.append(ca)
                cb = _start(client, duet.b.image, f"duet-{session}-{duet.name}-B", {**labels, "side": "B"})
                created.append(cb)
                sides = {"A": (ca, duet.a), "B": (cb, duet.b)}
                for runid in range(duet.duet_repetitions):
                    order = rng.choice(["AB", "BA"])
                    results: dict = {}
                    threads = [
                        threading.Thread(
                            target=_exec, args=(sides[s][0], sides[s][1].run, results, s), daemon=True
                        )
                        for s in order
                    ]
                    for t in threads:
                        t.start()
                    for t in threads:
                        while t.is_alive():
                            t.join(0.2)
                    _collect(cfg, duet, sides, results, runid, "duet", order, out)
                for runid in range(duet.sequential_repetitions):
                    for s in "AB":  # A alone, then B alone
                        results = {}
                        _exec(sides[s][0], sides[s][1].run, results, s)
                        _collect(cfg, duet, sides, results, runid, "seq", "AB", out)
                if cfg.remove_containers:
                    _remove([ca, cb])
                    created = [c for c in created if c not in (ca, cb)]
    finally:
        _remove(created)
        try:  # anything labelled with this session (e.g. created just before a Ctrl-C)
            labelled = client.containers([f"{LABEL}={session}"])
        except (OSError, EngineError) as exc:
            labelled = []
            log.warning("could not list the containers of duet session %s: %s", session, exc)
        _remove(Container(client, c["Id"], (c.get("Names") or [c["Id"]])[0].lstrip("/")) for c in labelled)
    return out


def _collect(cfg, duet, sides: dict, results: dict, runid: int, kind: str, order: str, out: Path) -> None:
    """Check the sides that ran (``results``: side -> (exit code, output)) and copy their
    result paths out of their containers, named as duetbench names them."""
    for s in sorted(results):
        code, text = results[s]
        container, side = sides[s]
        if code != 0:
            raise DuetRunError(f"{cfg.suite}.{duet.name} {kind} run {runid} side {s} failed (exit {code}) "
                               f"running {side.run!r}: {text.strip()[-400:]}")  # fmt: skip
        for p in side.results:
            _copy_out(container, p, out / result_name(cfg.suite, duet.name, runid, kind, order, s, "")[:-1])


def _remove(containers) -> None:
    for c in containers:
        try:
            c.remove()  # forced; a container already gone is fine
        except Exception as exc:
            log.warning("could not remove container %s: %s", c.name, exc)
