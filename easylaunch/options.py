"""Typed call options and their validation (unknown names get a suggestion).

Each mode declares the options it uses; :func:`resolve` checks a call's keyword arguments
against the common options, the chosen mode's, and every other mode's, so that::

    run_experiment(fn, exp_name="x", use_gpue=False)
    # TypeError: run_experiment() got an unexpected keyword argument 'use_gpue'; did you mean 'use_gpu'?
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union


@dataclass(frozen=True)
class Option:
    """One keyword option: name, accepted types, default, a one-line doc and, for numbers, the
    smallest value accepted."""

    name: str
    types: Tuple[type, ...]
    default: Any
    doc: str
    minimum: Optional[float] = None

    def check(self, value: Any, mode: str) -> Any:
        """Return ``value`` if its type (and range) is accepted; TypeError/ValueError naming it."""
        if value is None:
            return value
        ok = isinstance(value, self.types) and not (
            isinstance(value, bool) and bool not in self.types and int in self.types
        )
        if not ok:
            accepted = " or ".join(t.__name__ for t in self.types)
            raise TypeError(
                f"option {self.name}={value!r} has type {type(value).__name__}; "
                f"mode {mode!r} expects {accepted} ({self.doc})"
            )
        if self.minimum is not None and isinstance(value, (int, float)) and value < self.minimum:
            if self.minimum == 1 and int in self.types:
                wanted = "a positive integer"
            elif self.minimum == 0 and int in self.types:
                wanted = "0 or more"
            else:
                wanted = f"at least {self.minimum}"
            raise ValueError(f"option {self.name}={value!r} must be {wanted} ({self.doc})")
        return value


_PATH = (str, os.PathLike)

COMMON = (
    Option("use_gpu", (bool,), False, "run with a GPU"),
    Option("gpu_id", (int, str), 0, "GPU index or id handed to the function"),
    Option("base_log_dir", _PATH, None, "log dir that holds <exp_name>/<run>/"),
    Option("prepend_date_to_exp_name", (bool,), False, "prefix exp_name with the date (yy-mm-dd-)"),
    Option(
        "code_dirs_to_mount", (list, tuple), None, "code dirs to record/ship (overrides CODE_DIRS_TO_MOUNT)"
    ),
    Option("extra_launch_info", (dict,), None, "extra entries for DoodadConfig.extra_launch_info"),
    Option("verbose", (bool,), False, "print what is being launched"),
    Option(
        "timeout",
        (int, float),
        None,
        "seconds a run may take; then it ends as TIMEOUT (its checkpoint() hook runs first)",
        0.001,
    ),
    Option(
        "cancel_grace",
        (int, float),
        None,
        "seconds a run gets to stop after a cancel or its timeout before it is killed "
        "(default: CANCEL_GRACE, else 10)",
        0,
    ),
    Option(
        "monitor",
        (int, float),
        1.0,
        "seconds between resource samples of the run's process tree (resources.csv); 0 turns it off",
        0,
    ),
    Option("config_file", _PATH, None, "config file to use instead of the one found"),
)

# doodad easy_launch keywords whose modes are not part of this build yet, and who uses them;
# they are accepted by name (so a typo still gets a suggestion) and refused for other modes
PLANNED = {
    "local_input_dir_to_mount_point_dict": "local_docker, ec2, gcp",
    "docker_image": "local_docker, ssh, ec2, gcp",
    "region": "ec2",
    "instance_type": "ec2",
    "spot_price": "ec2",
    "num_exps_per_instance": "ec2, gcp",
    "sync_interval": "ec2",
    "gcp_kwargs": "gcp",
    "s3_log_prefix": "ec2",
    "s3_log_name": "ec2",
}


#: doodad easy_launch's ``run_experiment`` parameters after ``method_call``, in its order and with
#: its defaults (but ``prepend_date_to_exp_name``: easylaunch's False, see "Differences from doodad")
DOODAD_PARAMETERS: Tuple[Tuple[str, Any], ...] = (
    ("mode", "local"),
    ("exp_name", "default"),
    ("variant", None),
    ("prepend_date_to_exp_name", False),
    ("use_gpu", False),
    ("gpu_id", 0),
    ("base_log_dir", None),
    ("local_input_dir_to_mount_point_dict", None),
    ("skip_wait", False),
    ("sync_interval", 180),
    ("region", "us-east-1"),
    ("instance_type", None),
    ("spot_price", None),
    ("verbose", False),
    ("num_exps_per_instance", 1),
    ("time_in_mins", None),
    ("slurm_config_name", None),
    ("ssh_host", None),
    ("gcp_kwargs", None),
    ("s3_log_prefix", None),
    ("s3_log_name", ""),
)

#: the keywords a doodad script passes whatever its mode (doodad's parameters, and the
#: ``docker_image`` of its later versions): a mode that does not use one ignores it
DOODAD_KEYWORDS: Dict[str, Any] = {
    **{name: default for name, default in DOODAD_PARAMETERS[3:]},
    "docker_image": None,
}


def split_ignored(mode_option_names: Iterable[str], kwargs: Mapping[str, Any]) -> Tuple[dict, dict]:
    """``(kwargs the mode may use, doodad keywords it ignores)``, as doodad does.

    A doodad keyword the mode does not use is left out of the first dict; it is in the second
    (to be warned about and recorded) unless its value is None or doodad's default::

        split_ignored({"skip_wait"}, {"ssh_host": "blue", "region": "us-east-1", "skip_wait": True})
        # -> ({'skip_wait': True}, {'ssh_host': 'blue'})
    """
    own = set(mode_option_names)
    kept: dict = {}
    ignored: dict = {}
    for name, value in kwargs.items():
        if name in own or name not in DOODAD_KEYWORDS:
            kept[name] = value
        elif value is not None and not _same(value, DOODAD_KEYWORDS[name]):
            ignored[name] = value
    return kept, ignored


def _same(value: Any, default: Any) -> bool:
    return type(value) is type(default) and value == default


def ignored_line(mode_name: str, ignored: Mapping[str, Any]) -> str:
    """The one warning line of a launch that ignores doodad keywords (values shortened)."""
    from .config import is_secret, scrub_secrets

    shown = ", ".join(
        f"{k}={'<redacted>' if is_secret(k) else _short(scrub_secrets(v))}"
        for k, v in sorted(ignored.items())
    )
    return f"easylaunch: mode {mode_name!r} ignores {shown} (doodad keywords it does not use)"


def _short(value: Any, width: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def resolve(
    mode_name: str,
    mode_options: Iterable[Option],
    other_modes: Union[Mapping[str, Iterable[Option]], Callable[[], Mapping[str, Iterable[Option]]]],
    kwargs: Mapping[str, Any],
    func: str = "run_experiment",
) -> dict:
    """Validate ``kwargs`` for ``mode_name`` and return every option with defaults filled in.

    An option another mode uses is an error unless its value is None (scripts often pass
    ``ssh_host=None`` whatever the mode). ``other_modes`` may be a function returning the
    mapping: it is called only when a keyword is not the chosen mode's (so a valid launch
    imports no other mode's module).
    """
    own = {o.name: o for o in (*COMMON, *mode_options)}
    out = {name: opt.default for name, opt in own.items()}
    users: Optional[dict] = None
    for name, value in kwargs.items():
        if name in own:
            out[name] = own[name].check(value, mode_name)
            continue
        if value is None and (name in DOODAD_KEYWORDS or name in PLANNED):
            continue  # known without asking the other modes
        if users is None:
            users = _users(other_modes() if callable(other_modes) else other_modes)
        if name in users:
            if value is None:
                continue
            modes = ", ".join(sorted(set(users[name]) - {mode_name}))
            raise TypeError(
                f"{func}(): option {name!r} is not used by mode {mode_name!r} "
                f"(it is used by: {modes}); remove it or pick one of those modes"
            )
        known = sorted(set(own) | set(users))
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = (
            f"; did you mean {close[0]!r}?"
            if close
            else f"; valid options for mode {mode_name!r}: {', '.join(sorted(own))}"
        )
        raise TypeError(f"{func}() got an unexpected keyword argument {name!r}{hint}")
    return out


def _users(other_modes: Mapping[str, Iterable[Option]]) -> Dict[str, List[str]]:
    """option name -> the modes (and planned modes) that use it."""
    users: Dict[str, List[str]] = {}
    for other, opts in other_modes.items():
        for o in opts:
            users.setdefault(o.name, []).append(other)
    for name, who in PLANNED.items():
        users.setdefault(name, []).extend(w.strip() for w in who.split(","))
    return users
