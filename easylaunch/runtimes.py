"""How the runner starts in an environment: the plain interpreter, Apptainer/Singularity, Docker/Podman.

A mode answers two questions (Parsl's two axes): *where and when* runs start (a scheduler:
this machine, Slurm, a bundle, ...) and *in what environment* the runner starts (a runtime,
this module). A runtime turns "run ``python -m easylaunch.runner ARGS``" into the command a
scheduler executes, with its mounts or binds, its environment, its GPU request, and the way
easylaunch and cloudpickle reach the runner (the zips of :mod:`easylaunch.selfzip` on
PYTHONPATH; the user's code comes from the snapshot the payload names)::

    rt = ApptainerRuntime(image="/images/py.sif", binds=[Mount("/data", "/data")], gpu=True)
    cmd = rt.command(code=[zip1, zip2])
    cmd.argv(["--tasks", tasks_file, "--index", Shell('"$SLURM_ARRAY_TASK_ID"')])
    # -> ['apptainer', 'exec', '--nv', '--cleanenv', '-B', '/data:/data', '/images/py.sif',
    #     'python3', '-m', 'easylaunch.runner', '--tasks', ...]

Templates render a command with the ``shjoin`` filter: every word is quoted for the shell,
except :class:`Shell` words, which are shell expressions the script must expand (``"$BUNDLE"``).
A new environment (an SSH host's Docker, a cloud VM's) is one more :class:`Runtime` subclass;
schedulers do not change.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Union


@dataclass(frozen=True)
class Shell:
    """A word a shell script expands where it runs (``"$BUNDLE"/logs``): rendered as is, never quoted."""

    text: str


Word = Union[str, Shell]


def sh(*parts: Word) -> Shell:
    """One shell word made of expressions and literals: ``sh(Shell('"$LOGS"'), "/x y")`` -> ``"$LOGS"'/x y'``."""
    return Shell("".join(p.text if isinstance(p, Shell) else shlex.quote(str(p)) for p in parts))


def quote(word: Word) -> str:
    """A word for a shell script: literals quoted, :class:`Shell` expressions as they are."""
    return word.text if isinstance(word, Shell) else shlex.quote(str(word))


def shjoin(words: Sequence[Word]) -> str:
    """A command line for a shell script (the ``shjoin`` template filter)."""
    return " ".join(quote(w) for w in words)


def shcat(words: Sequence[Word], sep: str = ":") -> str:
    """Words joined into ONE shell word with ``sep`` (a PATH-like list)."""
    if sep not in ":,":
        raise ValueError(f"separator {sep!r} would need quoting")
    return sep.join(quote(w) for w in words)


def literal(words: Sequence[Word], what: str) -> List[str]:
    """``words`` as plain strings, for an exec without a shell; ValueError if one is a shell expression."""
    out = []
    for w in words:
        if isinstance(w, Shell):
            raise ValueError(
                f"{what}: {w.text!r} is a shell expression, and this command runs without a shell"
            )
        out.append(str(w))
    return out


@dataclass(frozen=True)
class Mount:
    """A directory of the host seen at ``target`` inside a container (None: at the same path)."""

    source: Word
    target: Optional[str] = None
    read_only: bool = True

    def bind_spec(self) -> Word:
        """``src[:dst][:ro]`` as Apptainer's ``-B`` and Docker's ``-v`` take it."""
        rest = (f":{self.target}" if self.target is not None else "") + (":ro" if self.read_only else "")
        if isinstance(self.source, Shell):
            return sh(self.source, rest) if rest else self.source
        if self.read_only and self.target is None:
            rest = f":{self.source}:ro"
        return f"{self.source}{rest}"

    @property
    def target_path(self) -> str:
        """Where the container sees it."""
        return str(self.source) if self.target is None else self.target


@dataclass
class RunnerCommand:
    """The command that starts the runner, before its own arguments (payload or ``--tasks``)."""

    #: up to and including ``-m easylaunch.runner``
    prefix: List[Word]
    #: variables to export before it (already in the form the runtime needs)
    env: Dict[str, Word] = field(default_factory=dict)
    #: where easylaunch and cloudpickle are, for PYTHONPATH (prepended to the caller's)
    pythonpath: List[Word] = field(default_factory=list)
    #: user shell lines to run first, on the host (``module load singularity``)
    host_pre_cmds: List[str] = field(default_factory=list)
    #: the container binary is looked up where the script runs (``$SING``)
    find_apptainer: bool = False

    def argv(self, args: Sequence[Word] = ()) -> List[Word]:
        """The whole command with the runner's ``args``."""
        return [*self.prefix, *args]

    def exec_env(self, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        """The environment for running it without a shell (``subprocess``)."""
        env = dict(os.environ if base is None else base)
        env.update({k: str(v) for k, v in self.env.items()})
        if self.pythonpath:
            parts = literal(self.pythonpath, "PYTHONPATH")
            old = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
            env["PYTHONPATH"] = os.pathsep.join(parts + [p for p in old if p not in parts])
        return env


RUNNER = ("-m", "easylaunch.runner")


class Runtime:
    """An environment the runner can start in. Subclasses set ``kind`` and build the command."""

    kind: ClassVar[str] = ""
    #: runs in a container that sees only what is mounted into it
    isolated: ClassVar[bool] = False
    #: the container image, for runtimes that have one
    image: Any = None
    python: Word = "python3"

    def command(self, code: Sequence[Word] = ()) -> RunnerCommand:
        """The runner's command, with ``code`` (the easylaunch and cloudpickle zips) importable."""
        raise NotImplementedError

    def describe(self) -> str:
        """One line for manifests and messages."""
        return self.kind


@dataclass
class PlainRuntime(Runtime):
    """The interpreter itself: this machine's (``sys.executable``) or a cluster's ``python3``."""

    kind: ClassVar[str] = "plain"
    python: Word = field(default_factory=lambda: sys.executable)
    #: user shell lines run before the runner (SSS_PRE_CMDS without an image)
    pre_cmds: List[str] = field(default_factory=list)

    def command(self, code: Sequence[Word] = ()) -> RunnerCommand:
        return RunnerCommand(
            prefix=[self.python, *RUNNER], pythonpath=list(code), host_pre_cmds=list(self.pre_cmds)
        )

    def describe(self) -> str:
        return f"{quote(self.python)} -m easylaunch.runner"


def _inner_script(pre_cmds: Sequence[str], python: Word) -> str:
    """``bash -c`` text: user lines inside the container, then the runner with the script's arguments."""
    return "\n".join([*pre_cmds, f'exec {quote(python)} -m easylaunch.runner "$@"'])


@dataclass
class ApptainerRuntime(Runtime):
    """``apptainer exec`` / ``singularity exec`` of a SIF file or a sandbox directory.

    ``--cleanenv`` gives the runner only the environment set here (PYTHONPATH for easylaunch and
    cloudpickle, ``env``); ``contain`` (``--contain``) shares none of the host's directories
    ($HOME, /tmp, the working directory) unless bound, as a Docker container sees only its
    mounts; ``gpu`` adds ``--nv``; ``binds`` are ``-B src:dst[:ro]``.
    """

    kind: ClassVar[str] = "apptainer"
    isolated: ClassVar[bool] = True
    image: Word = ""
    binds: List[Mount] = field(default_factory=list)
    gpu: bool = False
    cleanenv: bool = True
    contain: bool = False
    #: extra arguments of ``exec`` (BRC_EXTRA_SINGULARITY_ARGS)
    extra_args: List[str] = field(default_factory=list)
    python: Word = "python3"
    #: the binary; None: looked up where the script runs (``singularity``, else ``apptainer``)
    binary: Optional[str] = None
    env: Dict[str, str] = field(default_factory=dict)
    #: shell lines run on the host first (SINGULARITY_PRE_CMDS)
    host_pre_cmds: List[str] = field(default_factory=list)
    #: shell lines run inside the container before the runner (SSS_PRE_CMDS)
    inner_pre_cmds: List[str] = field(default_factory=list)

    def command(self, code: Sequence[Word] = ()) -> RunnerCommand:
        binary: Word = self.binary if self.binary else Shell('"$SING"')
        prefix: List[Word] = [binary, "exec"]
        if self.gpu:
            prefix.append("--nv")
        if self.cleanenv:
            prefix.append("--cleanenv")
        if self.contain:
            prefix.append("--contain")
        prefix.extend(self.extra_args)
        for mount in self.binds:
            prefix.extend(["-B", mount.bind_spec()])
        prefix.append(self.image)
        if self.inner_pre_cmds:
            prefix.extend(
                ["/bin/bash", "-c", _inner_script(self.inner_pre_cmds, self.python), "easylaunch-runner"]
            )
        else:
            prefix.extend([self.python, *RUNNER])
        env: Dict[str, Word] = {}
        if code:
            # what the container's runner gets: --cleanenv passes only APPTAINERENV_/SINGULARITYENV_
            path = Shell(shcat(code)) if any(isinstance(w, Shell) for w in code) else ":".join(map(str, code))
            env = {"APPTAINERENV_PYTHONPATH": path, "SINGULARITYENV_PYTHONPATH": path}
        for key, value in self.env.items():
            env[f"APPTAINERENV_{key}"] = value
            env[f"SINGULARITYENV_{key}"] = value
        return RunnerCommand(
            prefix=prefix, env=env, host_pre_cmds=list(self.host_pre_cmds), find_apptainer=self.binary is None
        )

    def describe(self) -> str:
        return f"apptainer exec ... {quote(self.image)} {quote(self.python)} -m easylaunch.runner"


@dataclass
class DockerRuntime(Runtime):
    """A Docker or Podman container (through the Docker API): image, mounts, user, GPUs, env.

    :meth:`container_config` is the Engine API's container-create body; code paths and mounts
    are host paths (the daemon's), seen at the same path inside unless a target is given.
    """

    kind: ClassVar[str] = "docker"
    isolated: ClassVar[bool] = True
    image: str = ""
    mounts: List[Mount] = field(default_factory=list)
    #: ``uid:gid`` the runner runs as (the caller's, so outputs are the caller's files)
    user: Optional[str] = None
    gpu: bool = False
    #: a GPU index or id; None = all GPUs
    gpu_id: Optional[Union[int, str]] = None
    env: Dict[str, str] = field(default_factory=dict)
    python: str = "python3"
    labels: Dict[str, str] = field(default_factory=dict)
    #: more HostConfig entries of the Engine API (modes/docker.py turns docker_options into them)
    options: Dict[str, Any] = field(default_factory=dict)

    def command(self, code: Sequence[Word] = ()) -> RunnerCommand:
        return RunnerCommand(prefix=[self.python, *RUNNER], pythonpath=list(code))

    def device_requests(self) -> List[Dict[str, Any]]:
        """The GPU request, in the Docker API's DeviceRequests form."""
        if not self.gpu:
            return []
        request: Dict[str, Any] = {"Driver": "nvidia", "Capabilities": [["gpu"]]}
        if self.gpu_id is None:
            request["Count"] = -1
        else:
            request["DeviceIDs"] = [str(self.gpu_id)]
        return [request]

    def container_config(self, args: Sequence[Word], code: Sequence[Word] = ()) -> Dict[str, Any]:
        """The Docker Engine API body of ``POST /containers/create`` for one runner command
        (what the SDK's ``APIClient.create_container_from_config`` takes, on dockerd and Podman)."""
        cmd = self.command(code)
        env = dict(self.env)
        if cmd.pythonpath:
            env["PYTHONPATH"] = ":".join(literal(cmd.pythonpath, "PYTHONPATH"))
        env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
        env.setdefault("PYTHONUNBUFFERED", "1")
        host: Dict[str, Any] = {
            "Mounts": [
                {"Type": "bind", "Source": str(m.source), "Target": m.target_path, "ReadOnly": m.read_only}
                for m in self.mounts
            ],
        }
        requests = self.device_requests()
        if requests:
            host["DeviceRequests"] = requests
        host.update(self.options)
        config: Dict[str, Any] = {
            "Image": self.image,
            "Cmd": literal(cmd.argv(args), "docker command"),
            "Env": [f"{k}={v}" for k, v in env.items()],
            "Labels": dict(self.labels),
            "HostConfig": host,
        }
        if self.user:
            config["User"] = self.user
        return config

    def describe(self) -> str:
        return f"docker run ... {self.image} {self.python} -m easylaunch.runner"


def mounts_from_config(entries: Any, key: str, read_only: bool = True) -> List[Mount]:
    """``NON_CODE_DIRS_TO_MOUNT``-style entries (``local_dir``, ``mount_point``, optional
    ``read_only``, default ``read_only``) as mounts; ValueError naming ``key`` for a malformed one."""
    default = read_only
    mounts = []
    for i, entry in enumerate(entries or []):
        if not (isinstance(entry, dict) and entry.get("local_dir") and entry.get("mount_point")):
            raise ValueError(
                f"config {key}[{i}] = {entry!r} must be a dict with local_dir (a host path) and "
                f"mount_point (where the container sees it), and optionally read_only (default {default})"
            )
        for name in ("local_dir", "mount_point"):
            value = str(entry[name])
            if any(ch in value for ch in ":,\n\0"):
                raise ValueError(
                    f"config {key}[{i}]['{name}'] = {value!r} holds ':', ',' or a newline, which "
                    "a bind (-B SRC:DST, -v SRC:DST) cannot carry: it splits there; use a path without them"
                )
        read_only = entry.get("read_only", default)
        if not isinstance(read_only, bool):
            raise ValueError(f"config {key}[{i}]['read_only'] = {read_only!r} must be True or False")
        mounts.append(Mount(str(entry["local_dir"]), str(entry["mount_point"]), read_only))
    return mounts


def check_mount_sources(mounts: Sequence[Mount], key: Optional[str]) -> None:
    """FileNotFoundError naming the first mount whose host directory does not exist."""
    for mount in mounts:
        if not os.path.exists(str(mount.source)):
            where = f" (config {key})" if key else ""
            raise FileNotFoundError(
                f"mount source {mount.source}{where} does not exist; it would be seen at "
                f"{mount.target_path} inside the container. Create it or fix the path"
            )


def apptainer_runtime(
    settings: Any,
    image: str,
    gpu: bool = False,
    binds: Sequence[Mount] = (),
    mounts_key: Optional[str] = "NON_CODE_DIRS_TO_MOUNT",
    host_pre_cmds: Sequence[str] = (),
    inner_pre_cmds: Sequence[str] = (),
    cleanenv: bool = False,
    here: bool = True,
    python: str = "python3",
    mounts_read_only: bool = True,
    contain: bool = False,
) -> ApptainerRuntime:
    """The Apptainer runtime the config describes (BRC_EXTRA_SINGULARITY_ARGS, ``mounts_key``).

    ``here``: the image and the binary are on this machine, so both are checked now (an image
    path that does not exist, no ``apptainer``/``singularity`` on PATH: clear errors); otherwise
    they are the cluster's, found where the script runs.
    """
    import shutil

    extra = settings.get("BRC_EXTRA_SINGULARITY_ARGS") or ""
    try:
        extra_args = shlex.split(extra)
    except ValueError as exc:
        raise ValueError(f"config BRC_EXTRA_SINGULARITY_ARGS = {extra!r} cannot be parsed: {exc}") from None
    for i, line in enumerate([*host_pre_cmds, *inner_pre_cmds]):
        if not isinstance(line, str):
            raise ValueError(f"pre-command #{i} {line!r} must be a string (one shell line)")
    configured = (
        mounts_from_config(settings.get(mounts_key), mounts_key, mounts_read_only) if mounts_key else []
    )
    binary = None
    if here:
        binary = shutil.which("singularity") or shutil.which("apptainer")
        if binary is None:
            raise RuntimeError(
                "a Singularity/Apptainer image was given but neither `singularity` nor `apptainer` "
                "is on PATH; install Apptainer (or `module load singularity`) first"
            )
        binary = os.path.basename(binary)
        if "://" not in image and not os.path.exists(image):
            raise FileNotFoundError(
                f"Singularity/Apptainer image {image!r} does not exist (a .sif file or a sandbox "
                "directory is needed; build one with `apptainer build IMAGE.sif docker-daemon://NAME`)"
            )
        check_mount_sources(configured, mounts_key)
    return ApptainerRuntime(
        image=image,
        binds=[*binds, *configured],
        gpu=gpu,
        cleanenv=cleanenv,
        contain=contain,
        extra_args=extra_args,
        python=python,
        binary=binary,
        host_pre_cmds=list(host_pre_cmds),
        inner_pre_cmds=list(inner_pre_cmds),
    )
