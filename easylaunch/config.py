"""Layered settings: built-in defaults < the user's config file < call options.

The config file is a Python file of UPPERCASE assignments in the shape of
``config_example.py`` (doodad's keys). It is found, first match wins, at:

1. ``$EASYLAUNCH_CONFIG``
2. ``./easylaunch_config.py``
3. ``~/.config/easylaunch/config.py``

Local modes need no file at all::

    settings = load_settings()          # defaults when no file exists
    settings["LOCAL_LOG_DIR"]           # None unless the file sets it
"""

from __future__ import annotations

import difflib
import functools
import os
import runpy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Tuple

ENV_CONFIG = "EASYLAUNCH_CONFIG"
ENV_LOG_DIR = "EASYLAUNCH_LOG_DIR"
DEFAULT_LOG_DIR = "./easylaunch-logs"


@dataclass(frozen=True)
class Key:
    """One documented config key: accepted types, default, and what it means."""

    types: Tuple[type, ...]
    default: Any
    doc: str


_S, _L, _D, _N = (str,), (list, tuple), (dict,), (int, float)
_SYNC_PATTERNS = (
    "*.txt",
    "*.csv",
    "*.json",
    "*.gz",
    "*.tar",
    "*.log",
    "*.pkl",
    "*.mp4",
    "*.png",
    "*.jpg",
    "*.jpeg",
    "*.patch",
    "*.html",
)

KEYS: dict[str, Key] = {
    # code and data
    "CODE_DIRS_TO_MOUNT": Key(
        _L, None, "code directories recorded (git) and shipped; default: the launch script's repository"
    ),
    "SNAPSHOT_EXCLUDE": Key(
        _L, [], "code snapshot: more untracked files to leave out (globs; 'data/*' or a name like '*.bin')"
    ),
    "SNAPSHOT_INCLUDE": Key(
        _L, [], "code snapshot: files to ship although a default rule leaves them out (globs)"
    ),
    "NON_CODE_DIRS_TO_MOUNT": Key(
        _L, [], "data dirs for containers: dicts of local_dir, mount_point and read_only (default True)"
    ),
    "LOCAL_LOG_DIR": Key(
        _S, None, "where run directories go (else $EASYLAUNCH_LOG_DIR, else ./easylaunch-logs)"
    ),
    "OUTPUT_DIR_FOR_DOODAD_TARGET": Key(_S, "/tmp/doodad-output/", "output dir inside containers/VMs"),
    "MAX_PARALLEL": Key((int,), None, "local modes and local_docker: runs at once (default: CPU count)"),
    "CANCEL_GRACE": Key(
        _N, 10, "seconds a run gets to stop after a cancel or its timeout before it is killed (SIGKILL)"
    ),
    # containers
    "DOCKER_HOST": Key(_S, None, "local_docker: daemon URL (default: $DOCKER_HOST, else the local socket)"),
    # AWS
    "AWS_S3_PATH": Key(_S, None, "ec2: s3://BUCKET/PREFIX where code, payloads and every run's outputs go"),
    "DOODAD_DOCKER_IMAGE": Key(
        _S,
        None,
        "Docker image for CPU runs (ec2/gcp: runs in it on the instance; '' or None: the VM's python3)",
    ),
    "GPU_DOODAD_DOCKER_IMAGE": Key(_S, None, "Docker image for GPU runs"),
    "INSTANCE_TYPE": Key(_S, "c4.2xlarge", "EC2 instance type for CPU runs"),
    "GPU_INSTANCE_TYPE": Key(_S, "g3.4xlarge", "EC2 instance type for GPU runs"),
    "SPOT_PRICE": Key(_N, 0.3, "EC2 spot bid for CPU runs (USD/hour)"),
    "GPU_SPOT_PRICE": Key(_N, 0.5, "EC2 spot bid for GPU runs (USD/hour)"),
    "REGION_TO_GPU_AWS_IMAGE_ID": Key(
        _D, {}, "ec2: region -> AMI id (an image with python3, and Docker when a docker_image is used)"
    ),
    "AWS_FILE_TYPES_TO_SAVE": Key(
        _L,
        _SYNC_PATTERNS,
        "doodad only; ignored: ec2/gcp sync everything a run writes (doodad's list lost files)",
    ),
    "AWS_IMAGE_ID": Key(_S, None, "ec2: AMI for CPU runs (default: REGION_TO_GPU_AWS_IMAGE_ID[region])"),
    "AWS_IAM_INSTANCE_PROFILE_NAME": Key(
        _S, None, "ec2: IAM instance profile the instances get (their only credentials: S3 access)"
    ),
    "AWS_SECURITY_GROUPS": Key(_L, [], "ec2: security group names"),
    "AWS_SECURITY_GROUP_IDS": Key(_L, [], "ec2: security group ids"),
    "AWS_KEY_NAME": Key(_S, None, "ec2: key pair name for SSH into the instances (optional)"),
    "AWS_REGION": Key(_S, "us-east-1", "ec2: default region"),
    "MAX_INSTANCES": Key(
        (int,), 10, "ec2/gcp: a launch that would start more instances than this is refused (money guard)"
    ),
    # SSH
    "SSH_HOSTS": Key(
        _D,
        {},
        "mode ssh: name -> dict(hostname, username, port=22, key_file, known_hosts='~/.ssh/known_hosts', "
        "python='python3', log_dir, trust_on_first_use=False, proxy_jump, max_parallel, docker_host, "
        "docker_root); a Host of ~/.ssh/config works as a name too",
    ),
    "SSH_DEFAULT_HOST": Key(_S, None, "mode ssh: the host used when ssh_host is not given"),
    "SSH_PRIVATE_KEY": Key(
        _S, "~/.ssh/id_rsa", "mode ssh: key file of SSH_HOSTS entries without key_file (when it exists)"
    ),
    "SSH_LOG_DIR": Key(_S, "~/easylaunch-logs", "mode ssh: log dir on the hosts (an entry's log_dir wins)"),
    "SSH_TMP_DIR": Key(_S, "~/.cache/easylaunch", "doodad only; ignored (runs live in the remote log dir)"),
    # Singularity / Slurm
    "SINGULARITY_IMAGE": Key(_S, None, "image for local_singularity / slurm_singularity"),
    "SINGULARITY_PRE_CMDS": Key(_L, [], "shell lines run before the runner in singularity modes"),
    "SLURM_CONFIGS": Key(_D, {}, "name -> SlurmConfig fields (account_name, partition, time_in_mins, ...)"),
    "BRC_EXTRA_SINGULARITY_ARGS": Key(_S, "", "extra `singularity exec` arguments"),
    "TASKFILE_PATH_ON_BRC": Key(_S, None, "htp: where the taskfile is copied to on the cluster"),
    "SLURM_DIRECTORY_FOR_JOB_SCRIPT": Key(_S, None, "sss/htp: where scripts are copied to on the cluster"),
    "SSS_CODE_DIRS_TO_MOUNT": Key(_L, [], "sss/htp: code dirs as seen on the cluster"),
    "SSS_NON_CODE_DIRS_TO_MOUNT": Key(_L, [], "sss/htp: data dirs as seen on the cluster"),
    "SSS_LOG_DIR": Key(_S, None, "sss/htp: log dir on the cluster"),
    "SSS_GPU_IMAGE": Key(_S, None, "sss/htp: singularity image for GPU runs"),
    "SSS_CPU_IMAGE": Key(_S, None, "sss/htp: singularity image for CPU runs"),
    "SSS_RUN_DOODAD_EXPERIMENT_SCRIPT_PATH": Key(
        _S, None, "doodad only; ignored (easylaunch ships its runner)"
    ),
    "SSS_PRE_CMDS": Key(_L, [], "sss/htp: shell lines run before the runner"),
    # GCP
    "GCP_IMAGE_NAME": Key(_S, None, "GCE image for CPU runs ('family/NAME' for an image family)"),
    "GCP_GPU_IMAGE_NAME": Key(_S, None, "GCE image for GPU runs"),
    "GCP_IMAGE_PROJECT": Key(
        _S,
        None,
        "gcp: project of GCP_IMAGE_NAME (e.g. 'debian-cloud'; GCP_DEFAULT_KWARGS image_project wins)",
    ),
    "GCP_BUCKET_NAME": Key(
        _S, None, "GCS bucket for code, payloads and outputs ('BUCKET' or 'gs://BUCKET/PREFIX')"
    ),
    "GCP_DEFAULT_KWARGS": Key(
        _D,
        {},
        "project, zone, instance_type, image_name, image_project, terminate, preemptible, "
        "provisioning_model, gpu_kwargs (gpu_model, num_gpu), disk_size_gb, service_account, network",
    ),
    "GCP_SERVICE_ACCOUNT": Key(
        _S,
        "default",
        "gcp: the instances' service account (their only credentials: bucket + self-delete scopes)",
    ),
    "GCP_FILE_TYPES_TO_SAVE": Key(
        _L,
        _SYNC_PATTERNS,
        "doodad only; ignored: ec2/gcp sync everything a run writes (doodad's list lost files)",
    ),
    "GCP_COMPUTE_ENDPOINT": Key(
        _S, None, "gcp: Compute API root (default: $EASYLAUNCH_GCP_COMPUTE_ENDPOINT, else Google's)"
    ),
}

#: words that make a name secret-looking (``aws_secret_access_key``, ``apiToken``, ``DB_PASSWORD``)
SECRET_WORDS = frozenset(
    {
        "secret",
        "secrets",
        "password",
        "passwd",
        "passphrase",
        "token",
        "credential",
        "credentials",
        "apikey",
        "privatekey",
        "accesskey",
        "sessionkey",
        "signingkey",
    }
)
#: pairs of adjacent words that do too (``access_key``, ``private-key``, ``ApiKey``)
SECRET_PAIRS = frozenset(
    {
        ("access", "key"),
        ("private", "key"),
        ("api", "key"),
        ("session", "key"),
        ("signing", "key"),
        ("auth", "key"),
    }
)
#: what a secret-looking value is replaced by where a record keeps its key (variants, command lines)
REDACTED = "<redacted>"


class ConfigError(ValueError):
    """A config file or value is invalid; the message names the key, the value and the fix."""


def _words(name: str) -> list:
    import re

    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)  # camelCase -> camel Case
    return [w for w in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if w]


@functools.lru_cache(maxsize=4096)  # a sweep asks about the same few keys once per run
def is_secret(name: str) -> bool:
    """True for names that look like they hold credentials (never written to manifests).

    Matched by whole words, so ``max_tokens``, ``tokenizer`` or ``keyboard`` are not secrets::

        is_secret("aws_secret_access_key")  # True
        is_secret("apiToken")               # True
        is_secret("max_tokens")             # False
    """
    words = _words(name)
    return any(w in SECRET_WORDS for w in words) or any(p in SECRET_PAIRS for p in zip(words, words[1:]))


def scrub_secrets(value: Any) -> Any:
    """``value`` without secret-looking keys at any depth (dicts, lists and tuples walked)."""
    if isinstance(value, Mapping):
        return {k: scrub_secrets(v) for k, v in value.items() if not (isinstance(k, str) and is_secret(k))}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub_secrets(v) for v in value)
    return value


def redact_secrets(value: Any) -> Any:
    """``value`` with the values of secret-looking keys replaced by ``<redacted>``, at any depth.

    For records that should still show which keys there were (a manifest's variant)::

        redact_secrets({"lr": 0.1, "db": {"password": "x"}})  # {'lr': 0.1, 'db': {'password': '<redacted>'}}
    """
    return _redact(value) if has_secrets(value) else value  # most variants: no copy


def _redact(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if isinstance(k, str) and is_secret(k) else _redact(v)) for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return type(value)(_redact(v) for v in value)
    return value


def has_secrets(value: Any) -> bool:
    """True when ``value`` holds a secret-looking key at any depth."""
    if type(value) in _SCALARS:  # most of a variant: no walk, no ABC check
        return False
    if isinstance(value, Mapping):
        for k, v in value.items():
            if (isinstance(k, str) and is_secret(k)) or (type(v) not in _SCALARS and has_secrets(v)):
                return True
        return False
    if isinstance(value, (list, tuple)):
        return any(has_secrets(v) for v in value)
    return False


_SCALARS = frozenset({int, float, str, bool, type(None), bytes})


def redact_argv(argv: list) -> list:
    """A command line with the values of secret-looking options replaced by ``<redacted>``.

    ``--password=x``, ``--api-token x``, ``PASSWORD=x`` and ``-O aws_secret_access_key=x`` alike::

        redact_argv(["train.py", "--password", "hunter2", "--lr=0.1"])
        # ['train.py', '--password', '<redacted>', '--lr=0.1']
    """
    out = []
    hide_next = False
    for arg in map(str, argv):
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        name, eq, _value = arg.partition("=")
        if eq and is_secret(name.lstrip("-")):
            out.append(f"{name}={REDACTED}")
        elif arg.startswith("-") and not eq and is_secret(arg.lstrip("-")):
            out.append(arg)
            hide_next = True
        else:
            out.append(arg)
    return out


def find_config_file() -> Optional[Path]:
    """The config file in effect, or None. ``$EASYLAUNCH_CONFIG`` must exist if set."""
    env = os.environ.get(ENV_CONFIG)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"${ENV_CONFIG} points to {path}, which does not exist; "
                "unset it or run `easylaunch init` to write one"
            )
        return path
    for candidate in (Path("easylaunch_config.py"), Path.home() / ".config/easylaunch/config.py"):
        if candidate.is_file():
            return candidate
    return None


def _check(name: str, value: Any, where: str) -> None:
    key = KEYS[name]
    if value is None:
        return
    if isinstance(value, bool) and bool not in key.types:
        ok = False
    else:
        ok = isinstance(value, key.types)
    if not ok:
        accepted = " or ".join(t.__name__ for t in key.types)
        raise ConfigError(
            f"{where}: {name} = {value!r} has type {type(value).__name__}; expected {accepted} ({key.doc})"
        )


class Settings(Mapping[str, Any]):
    """Read-only view of the merged settings; ``source`` is the config file used, if any."""

    def __init__(self, values: Mapping[str, Any], source: Optional[Path] = None):
        self._values = dict(values)
        self.source = source

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def load_settings(
    path: Optional[Path | str] = None, overrides: Optional[Mapping[str, Any]] = None
) -> Settings:
    """Merge defaults, the config file (``path`` or the one found) and ``overrides``."""
    values = {name: key.default for name, key in KEYS.items()}
    source = Path(path) if path else find_config_file()
    if source is not None:
        try:
            namespace = runpy.run_path(str(source))
        except Exception as exc:
            raise ConfigError(f"config file {source} failed to load: {type(exc).__name__}: {exc}") from exc
        for name, value in namespace.items():
            if not name.isupper() or name.startswith("_"):
                continue
            if name not in KEYS:
                close = difflib.get_close_matches(name, KEYS, n=1)
                hint = f"did you mean {close[0]}?" if close else "see config_example.py for the keys"
                raise ConfigError(f"config file {source}: unknown key {name}; {hint}")
            _check(name, value, f"config file {source}")
            values[name] = value
    for name, value in (overrides or {}).items():
        if name not in KEYS:
            raise ConfigError(f"unknown config key {name}")
        _check(name, value, "override")
        values[name] = value
    return Settings(values, source)


def log_root(base_log_dir: Optional[str], settings: Settings) -> Path:
    """The log dir: call option, else LOCAL_LOG_DIR, else $EASYLAUNCH_LOG_DIR, else ./easylaunch-logs."""
    chosen = base_log_dir or settings.get("LOCAL_LOG_DIR") or os.environ.get(ENV_LOG_DIR) or DEFAULT_LOG_DIR
    return Path(os.path.expanduser(str(chosen))).resolve()
