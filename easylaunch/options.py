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
from typing import Any, Iterable, Mapping, Optional, Tuple


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
    Option("config_file", _PATH, None, "config file to use instead of the one found"),
)

# doodad easy_launch keywords whose modes are not part of this build yet, and who uses them;
# they are accepted by name (so a typo still gets a suggestion) and refused for other modes
PLANNED = {
    "local_input_dir_to_mount_point_dict": "local_docker, ssh, ec2, gcp",
    "docker_image": "local_docker, ssh, ec2, gcp",
    "ssh_host": "ssh",
    "region": "ec2",
    "instance_type": "ec2",
    "spot_price": "ec2",
    "num_exps_per_instance": "ec2, gcp",
    "sync_interval": "ec2",
    "gcp_kwargs": "gcp",
    "s3_log_prefix": "ec2",
    "s3_log_name": "ec2",
}


def resolve(
    mode_name: str,
    mode_options: Iterable[Option],
    other_modes: Mapping[str, Iterable[Option]],
    kwargs: Mapping[str, Any],
    func: str = "run_experiment",
) -> dict:
    """Validate ``kwargs`` for ``mode_name`` and return every option with defaults filled in.

    An option another mode uses is an error unless its value is None (scripts often pass
    ``ssh_host=None`` whatever the mode).
    """
    own = {o.name: o for o in (*COMMON, *mode_options)}
    users: dict[str, list[str]] = {}
    for other, opts in other_modes.items():
        for o in opts:
            users.setdefault(o.name, []).append(other)
    for name, who in PLANNED.items():
        users.setdefault(name, []).extend(w.strip() for w in who.split(","))
    out = {name: opt.default for name, opt in own.items()}
    for name, value in kwargs.items():
        if name in own:
            out[name] = own[name].check(value, mode_name)
        elif name in users:
            if value is None:
                continue
            modes = ", ".join(sorted(set(users[name]) - {mode_name}))
            raise TypeError(
                f"{func}(): option {name!r} is not used by mode {mode_name!r} "
                f"(it is used by: {modes}); remove it or pick one of those modes"
            )
        else:
            known = sorted(set(own) | set(users))
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = (
                f"; did you mean {close[0]!r}?"
                if close
                else f"; valid options for mode {mode_name!r}: {', '.join(sorted(own))}"
            )
            raise TypeError(f"{func}() got an unexpected keyword argument {name!r}{hint}")
    return out
