"""The mode registry: mode name -> class. The only place that knows which modes exist.

from easylaunch.modes import get_mode_class, mode_names
get_mode_class("local")   # -> LocalMode
"""

from __future__ import annotations

import difflib
import importlib
from typing import Dict, List, Type

from .base import Mode

# name -> "module:Class"; modules are imported on first use so that heavy backends
# (boto3, google-cloud) cost nothing until chosen
_REGISTRY: Dict[str, str] = {
    "here_no_doodad": "easylaunch.modes.here:HereMode",
    "local": "easylaunch.modes.local:LocalMode",
    "local_pool": "easylaunch.modes.local_pool:LocalPoolMode",
    "local_singularity": "easylaunch.modes.singularity:LocalSingularityMode",
    "singularity": "easylaunch.modes.singularity:LocalSingularityMode",  # doodad's alias
    "slurm": "easylaunch.modes.slurm:SlurmMode",
    "slurm_singularity": "easylaunch.modes.slurm:SlurmSingularityMode",
    "sss": "easylaunch.modes.sss:SssMode",
    "htp": "easylaunch.modes.htp:HtpMode",
    "local_docker": "easylaunch.modes.docker:DockerMode",
    "docker": "easylaunch.modes.docker:DockerAliasMode",
    "ssh": "easylaunch.modes.ssh:SshMode",
    "ec2": "easylaunch.modes.ec2:Ec2Mode",
    "gcp": "easylaunch.modes.gcp:GcpMode",
}


def mode_names() -> List[str]:
    """Names of every available mode."""
    return sorted(_REGISTRY)


def get_mode_class(name: str) -> Type[Mode]:
    """The class for ``name``; ValueError listing the valid names (and a suggestion) otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown mode {name!r}.{hint} Valid modes: {', '.join(mode_names())}")
    module_name, cls_name = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), cls_name)


def all_mode_options() -> Dict[str, tuple]:
    """mode name -> its options, for validating keywords across modes."""
    return {name: get_mode_class(name).options for name in _REGISTRY}
