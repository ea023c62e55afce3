"""Run duets: two long-lived containers per duet, A and B started at once, results copied out.

Containers carry the label ``io.easylaunch.duet=<session id>`` (and ``io.easylaunch.managed``) and are
ALWAYS stopped and removed in a ``finally`` (failure, Ctrl-C)."""

from __future__ import annotations

import io
import logging
import os
import random
import subprocess
import tarfile
import threading
import uuid
from pathlib import Path
from typing import Optional, Sequence

from .config import DuetConfig, result_name

log = logging.getLogger("easylaunch.duet")
LABEL = "io.easylaunch.duet"
KEEPALIVE = ["sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 1; done"]
ENGINE_SOCKETS = {"docker": "unix:///var/run/docker.sock", "podman": "unix:///run/podman/podman.sock"}


class DuetRunError(RuntimeError):
    """A benchmark command failed or a result path was missing."""


def _client(docker: str):
    import docker as sdk

    url = os.environ.get("DOCKER_HOST") or ENGINE_SOCKETS.get(docker)
    return sdk.DockerClient(base_url=url, timeout=600)


def _artifacts(config: DuetConfig, outdir: Path) -> None:
    art = outdir / "artifacts"
    art.mkdir(parents=True, exist_ok=True)
    for name, cmd in config.artifacts.items():
        proc = subprocess.run(["sh", "-c", cmd], capture_output=True, text=True)
        (art / name).write_text(proc.stdout + (proc.stderr if proc.returncode else ""))


def _copy_out(container, path: str, dest_prefix: Path) -> list[Path]:
    try:
        stream, _ = container.get_archive(path)
    except Exception as exc:
        raise DuetRunError(f"result path {path} is missing in {container.name}: {exc}") from None
    buf = io.BytesIO(b"".join(stream))
    written = []
    with tarfile.open(fileobj=buf) as tar:
        for member in tar.getmembers():
            if not member.isfile():
                continue
            rel = member.name.split("/", 1)
            base = Path(path).name
            target = (
                Path(f"{dest_prefix}.{base}") if len(rel) == 1 else Path(f"{dest_prefix}.{base}") / rel[1]
            )
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
            written.append(target)
    return written


def _exec(container, cmd: str, out: dict, key: str) -> None:
    try:
        res = container.exec_run(["sh", "-c", cmd], demux=False)
        out[key] = (res.exit_code, (res.output or b"").decode(errors="replace"))
    except BaseException as exc:  # reported by the caller
        out[key] = (-1, repr(exc))


def run_duets(
    configs: Sequence[DuetConfig],
    outdir: str | os.PathLike,
    docker: Optional[str] = None,
    session: Optional[str] = None,
) -> Path:
    """Run every duet of ``configs`` into ``outdir`` (which must not exist); returns it::

    run_duets(load_configs(["a.duet.yml"]), "results", docker="podman")
    """
    out = Path(outdir)
    if out.exists():
        raise FileExistsError(f"{out} exists; give a new --outdir (duetbench never overwrites results)")
    out.mkdir(parents=True)
    session = session or uuid.uuid4().hex[:12]
    client = _client(docker or configs[0].docker_command)
    created = []
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
                ca = client.containers.run(duet.a.image, KEEPALIVE, detach=True, labels={**labels, "side": "A"},
                                           name=f"duet-{session}-{duet.name}-A")  # fmt: skip
                created.append(ca)
                cb = client.containers.run(duet.b.image, KEEPALIVE, detach=True, labels={**labels, "side": "B"},
                                           name=f"duet-{session}-{duet.name}-B")  # fmt: skip
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
            _remove(client.containers.list(all=True, filters={"label": f"{LABEL}={session}"}))
        finally:
            client.close()
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
            c.remove(force=True)
        except Exception as exc:  # already gone
            if "No such" not in str(exc) and "404" not in str(exc):
                log.warning("could not remove container %s: %s", getattr(c, "name", c), exc)
