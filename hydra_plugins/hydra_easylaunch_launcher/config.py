"""The ``hydra/launcher=easylaunch`` config: ``mode``, ``exp_name`` and every easylaunch option.

The option fields are made from easylaunch's option tables (common options and every mode's),
so a new mode's options are settable as ``hydra.launcher.<name>=...`` without touching this
file. Unset fields (None) leave easylaunch's defaults; ``skip_wait`` is not offered (Hydra
needs the jobs' returns, so the launcher always waits).
"""

from __future__ import annotations

from dataclasses import field, make_dataclass
from typing import Any, List, Optional, Tuple

from hydra.core.config_store import ConfigStore

#: options a Hydra launch cannot honour
EXCLUDED = ("skip_wait",)


def option_names() -> List[str]:
    """Every easylaunch launch option (common ones and every mode's), sorted."""
    from easylaunch.modes import all_mode_options
    from easylaunch.options import COMMON

    names = {o.name for o in COMMON}
    for options in all_mode_options().values():
        names.update(o.name for o in options)
    return sorted(n for n in names if n not in EXCLUDED)


def _fields() -> List[Tuple[str, Any, Any]]:
    return [
        (
            "_target_",
            str,
            field(default="hydra_plugins.hydra_easylaunch_launcher.launcher.EasylaunchLauncher"),
        ),
        # easylaunch mode: local, local_pool, slurm, slurm_singularity, sss, htp, here_no_doodad
        ("mode", str, field(default="local")),
        # experiment name: the run directories are <log dir>/<exp_name>/<run>/
        ("exp_name", str, field(default="${hydra.job.name}")),
        *((name, Optional[Any], field(default=None)) for name in option_names()),
    ]


EasylaunchLauncherConf = make_dataclass("EasylaunchLauncherConf", _fields())
EasylaunchLauncherConf.__module__ = __name__
EasylaunchLauncherConf.__doc__ = "hydra.launcher for easylaunch: mode, exp_name and every easylaunch option."

ConfigStore.instance().store(
    group="hydra/launcher", name="easylaunch", node=EasylaunchLauncherConf, provider="easylaunch"
)
