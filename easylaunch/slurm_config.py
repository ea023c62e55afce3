"""Slurm resource options, typed, validated and rendered once (as in simple_slurm).

doodad's SlurmConfig fields plus mem, qos, constraint and gres; named configs come from the
SLURM_CONFIGS setting, chosen by ``slurm_config_name``, else ``gpu``/``cpu`` by ``use_gpu``::

    cfg = SlurmConfig(partition="debug", time_in_mins=30, n_cpus_per_task=2, mem="4G")
    cfg.argv()         # ['--partition=debug', '--time=30', '--nodes=1', '--cpus-per-task=2', '--mem=4G']
    cfg.directives()   # the same grouped per flag, one #SBATCH line each (``sbatch_line``)
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, fields
from typing import Any, List, Mapping, Optional, Sequence, Union

from .options import Option

_SAFE = re.compile(r"^[A-Za-z0-9_.,:=+@%/\-\[\]]+$")
#: what sbatch's #SBATCH parser (src/sbatch/opt.c) reads specially: blanks, quotes, backslash, '#'
_SBATCH_SPECIAL = re.compile(r"[\s'\"\\#]")


class SlurmConfigError(ValueError):
    """A Slurm option is invalid; the message names the config, the field, the value and the fix."""


def parse_time(value: Any, where: str = "time_in_mins") -> int:
    """Minutes from an int, or a Slurm time string ``MM``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``."""
    if isinstance(value, bool):
        raise SlurmConfigError(f"{where}={value!r} is not a time limit; give minutes (e.g. 90) or 'HH:MM:SS'")
    if isinstance(value, (int, float)):
        if value <= 0:
            raise SlurmConfigError(f"{where}={value!r} must be a positive number of minutes")
        return max(1, int(round(value)))
    if isinstance(value, str):
        m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", value.strip())
        if m:
            days, a, b, c = m.groups()
            d = int(days or 0)
            if days is not None:  # D-HH[:MM[:SS]]
                h, mi, s = int(a), int(b or 0), int(c or 0)
            elif c is not None:  # HH:MM:SS
                h, mi, s = int(a), int(b), int(c)
            elif b is not None:  # MM:SS
                h, mi, s = 0, int(a), int(b)
            else:  # MM
                h, mi, s = 0, int(a), 0
            total = d * 1440 + h * 60 + mi + (1 if s else 0)
            if total > 0:
                return total
    raise SlurmConfigError(
        f"{where}={value!r} is not a time limit; give minutes (90) or a Slurm time ('1:30:00', '2-00:00:00')"
    )


@dataclass(frozen=True)
class SlurmConfig:
    """Resources of one Slurm job (one array task). Field names follow doodad's SlurmConfig."""

    account_name: Optional[str] = None
    partition: Optional[str] = None
    time_in_mins: Optional[int] = None
    max_num_cores_per_node: Optional[int] = None
    n_gpus: int = 0
    n_cpus_per_task: int = 1
    n_nodes: int = 1
    extra_flags: str = ""
    mem: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    gres: Optional[str] = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], name: str) -> "SlurmConfig":
        """Build from a SLURM_CONFIGS entry; unknown fields and bad values name ``name``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            import difflib

            hints = []
            for key in unknown:
                close = difflib.get_close_matches(key, known, n=1)
                hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            raise SlurmConfigError(
                f"SLURM_CONFIGS[{name!r}] has unknown field(s) {', '.join(hints)}; "
                f"valid fields: {', '.join(sorted(known))}"
            )
        cfg = cls(**dict(values))
        cfg.validate(name)
        return cfg

    def replace(self, **changes: Any) -> "SlurmConfig":
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data.update(changes)
        return SlurmConfig(**data)

    def validate(self, name: str = "slurm") -> None:
        """Raise SlurmConfigError for any value sbatch would choke on or a shell could misread."""
        where = f"slurm config {name!r}"
        for field in ("n_gpus", "n_cpus_per_task", "n_nodes", "max_num_cores_per_node"):
            value = getattr(self, field)
            if value is None and field == "max_num_cores_per_node":
                continue
            if (
                not isinstance(value, int)
                or isinstance(value, bool)
                or value < (0 if field == "n_gpus" else 1)
            ):
                raise SlurmConfigError(
                    f"{where}: {field}={value!r} must be a {'non-negative' if field == 'n_gpus' else 'positive'} integer"
                )
        if self.max_num_cores_per_node is not None and self.n_cpus_per_task > self.max_num_cores_per_node:
            raise SlurmConfigError(
                f"{where}: n_cpus_per_task={self.n_cpus_per_task} exceeds max_num_cores_per_node="
                f"{self.max_num_cores_per_node}; one task runs on one node"
            )
        if self.time_in_mins is not None:
            parse_time(self.time_in_mins, f"{where}: time_in_mins")
        for field in ("account_name", "partition", "mem", "qos", "constraint", "gres"):
            value = getattr(self, field)
            if value is None:
                continue
            if not isinstance(value, str) or not _SAFE.match(value):
                raise SlurmConfigError(
                    f"{where}: {field}={value!r} has characters Slurm does not take here "
                    "(allowed: letters, digits and _ . , : = + @ % / - [ ])"
                )
        if not isinstance(self.extra_flags, str):
            raise SlurmConfigError(
                f"{where}: extra_flags={self.extra_flags!r} must be a string of sbatch flags"
            )
        try:
            tokens = shlex.split(self.extra_flags)
        except ValueError as exc:
            raise SlurmConfigError(
                f"{where}: extra_flags={self.extra_flags!r} cannot be parsed: {exc}"
            ) from None
        for tok in tokens:
            bad = control_characters(tok)
            if bad:
                raise SlurmConfigError(
                    f"{where}: extra_flags={self.extra_flags!r} holds {', '.join(map(repr, bad))}: "
                    "an #SBATCH line cannot carry it (a newline would end the line); remove it"
                )
            if not tok.strip():
                raise SlurmConfigError(f"{where}: extra_flags token {tok!r} is empty")
        if tokens and not tokens[0].startswith("-"):
            raise SlurmConfigError(
                f"{where}: extra_flags={self.extra_flags!r} must start with an sbatch flag (e.g. '--qos normal')"
            )

    def argv(self, time_in_mins: Optional[int] = None, shape: bool = True) -> List[str]:
        """sbatch command-line tokens, in a stable order (to be shell-quoted by the caller).

        ``shape=False`` leaves out ``--nodes``/``--cpus-per-task`` for callers that size the
        job themselves (htp)::

            SlurmConfig(partition="debug", extra_flags="--comment 'two words'").argv()
            # ['--partition=debug', '--nodes=1', '--cpus-per-task=1', '--comment', 'two words']
        """
        out: List[str] = []
        if self.account_name:
            out.append(f"--account={self.account_name}")
        if self.partition:
            out.append(f"--partition={self.partition}")
        minutes = time_in_mins if time_in_mins is not None else self.time_in_mins
        if minutes is not None:
            out.append(f"--time={parse_time(minutes)}")
        if shape:
            out.append(f"--nodes={self.n_nodes}")
            out.append(f"--cpus-per-task={self.n_cpus_per_task}")
        if self.n_gpus:
            out.append(f"--gres={self.gres}" if self.gres else f"--gpus={self.n_gpus}")
        elif self.gres:
            out.append(f"--gres={self.gres}")
        if self.mem:
            out.append(f"--mem={self.mem}")
        if self.qos:
            out.append(f"--qos={self.qos}")
        if self.constraint:
            out.append(f"--constraint={self.constraint}")
        return out + shlex.split(self.extra_flags)

    def directives(self, time_in_mins: Optional[int] = None, shape: bool = True) -> List[List[str]]:
        """:meth:`argv` grouped per flag, one ``#SBATCH`` line each (rendered by
        :func:`sbatch_line`, the templates' ``sbatch`` filter): ``--qos normal`` stays one
        line, as a value on an ``#SBATCH`` line of its own is an invalid directive::

            [sbatch_line(d) for d in SlurmConfig(extra_flags="--comment='a b' --qos x").directives()]
            # ['--nodes=1', '--cpus-per-task=1', '--comment="a b"', '--qos x']
        """
        return group_flags(self.argv(time_in_mins, shape))


def group_flags(tokens: Sequence[str]) -> List[List[str]]:
    """``['--qos', 'normal', '--nice=-5', '--x', '-5']`` -> one list per flag with its values."""
    groups: List[List[str]] = []
    for tok in tokens:
        if tok.startswith("-") and not re.match(r"^-\d", tok) or not groups:
            groups.append([tok])
        else:
            groups[-1].append(tok)
    return groups


def control_characters(text: str) -> List[str]:
    """The control characters (newline, carriage return, NUL, ...) in ``text``."""
    return sorted({ch for ch in text if ord(ch) < 32 or ord(ch) == 127})


def sbatch_word(token: str) -> str:
    """One argument as sbatch's ``#SBATCH`` parser reads it back (src/sbatch/opt.c): as is when
    it has no blank, quote, backslash or ``#``; else double-quoted with ``\\`` and ``"``
    backslash-escaped (``--comment=two words`` -> ``--comment="two words"``). A control character
    (a newline ends the line) cannot be carried: SlurmConfigError."""
    token = str(token)
    bad = control_characters(token)
    if bad:
        raise SlurmConfigError(
            f"sbatch option {token!r} holds {', '.join(map(repr, bad))}: an #SBATCH line cannot carry it"
        )
    if token and not _SBATCH_SPECIAL.search(token):
        return token
    m = re.match(r"^(--?[A-Za-z][A-Za-z0-9-]*=)(.*)$", token, re.S)
    flag, value = (m.group(1), m.group(2)) if m else ("", token)
    return flag + '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def sbatch_line(directive: Union[str, Sequence[str]]) -> str:
    """The text after ``#SBATCH `` for one directive: a token (``--job-name=x y``) or a flag with
    its values (``['--qos', 'normal']``). The one renderer of ``#SBATCH`` lines (the templates'
    ``sbatch`` filter)."""
    tokens = [directive] if isinstance(directive, str) else list(directive)
    return " ".join(sbatch_word(t) for t in tokens)


def filename_pattern(directory: str, name: str) -> str:
    """``<directory>/<name>`` as an sbatch ``--output`` pattern: ``%`` in the directory doubled
    (``%%`` is a literal ``%``), ``name`` keeps its ``%A``/``%a``/``%j``."""
    return directory.replace("%", "%%").rstrip("/") + "/" + name


def check_output_dir(path: str, what: str) -> None:
    """Refuse a directory sbatch cannot write ``--output`` files into by name: a control
    character cannot be carried on an #SBATCH line, and a backslash turns off ``%A``/``%a``."""
    bad = control_characters(path)
    if bad or "\\" in path:
        found = ", ".join(map(repr, bad + (["\\"] if "\\" in path else [])))
        raise SlurmConfigError(
            f"{what} {path!r} holds {found}, which sbatch's --output cannot take (a newline ends "
            "an #SBATCH line, a backslash turns off %A/%a); choose another directory "
            "(e.g. base_log_dir=...)"
        )


def resolve_slurm_config(
    configs: Mapping[str, Mapping[str, Any]],
    name: Optional[str],
    use_gpu: bool,
    overrides: Optional[Mapping[str, Any]] = None,
) -> tuple[str, SlurmConfig]:
    """Pick the named config (else 'gpu'/'cpu' by use_gpu, as doodad does) and apply overrides."""
    chosen = name or ("gpu" if use_gpu else "cpu")
    if chosen in configs:
        base = dict(configs[chosen])
    elif name is None and not configs:
        base = {}  # no config file: cluster defaults
    else:
        known = ", ".join(sorted(configs)) or "(none: SLURM_CONFIGS is empty)"
        raise SlurmConfigError(
            f"unknown slurm_config_name {chosen!r}; SLURM_CONFIGS has: {known}. "
            "Add it to your config file (see config_example.py) or pass one of those"
        )
    base.update({k: v for k, v in (overrides or {}).items() if v is not None})
    cfg = SlurmConfig.from_mapping(base, chosen)
    if use_gpu and cfg.n_gpus == 0 and not cfg.gres:
        raise SlurmConfigError(
            f"use_gpu=True but slurm config {chosen!r} asks for no GPU (n_gpus=0); "
            "set n_gpus in SLURM_CONFIGS or choose a GPU config"
        )
    return chosen, cfg


def config_for(settings: Mapping[str, Any], options: Mapping[str, Any]) -> tuple[str, SlurmConfig]:
    """The SlurmConfig a launch asks for: SLURM_CONFIGS[slurm_config_name] (else 'gpu'/'cpu' by
    use_gpu) with the call's ``slurm_options`` and ``time_in_mins`` applied."""
    overrides = dict(options.get("slurm_options") or {})
    if options.get("time_in_mins") is not None:
        overrides["time_in_mins"] = parse_time(options["time_in_mins"])
    return resolve_slurm_config(
        settings.get("SLURM_CONFIGS") or {},
        options.get("slurm_config_name"),
        bool(options.get("use_gpu")),
        overrides,
    )


#: options of every Slurm-family mode (slurm, slurm_singularity, sss, htp)
SLURM_OPTIONS = (
    Option("slurm_config_name", (str,), None, "key of SLURM_CONFIGS (default: 'gpu'/'cpu' by use_gpu)"),
    Option(
        "time_in_mins", (int, float, str), None, "time limit: minutes or 'HH:MM:SS' (overrides the config)"
    ),
    Option("slurm_options", (dict,), None, "SlurmConfig fields overriding the named config"),
    Option(
        "signal_before_timeout", (int,), 90, "seconds before the time limit to signal the runner (USR2)", 1
    ),
    Option("skip_wait", (bool,), True, "accepted for doodad scripts; Slurm-family launches return at once"),
)
#: options of the modes that submit job arrays (slurm, slurm_singularity, sss)
ARRAY_OPTIONS = (
    Option("variants_per_task", (int,), None, "variants run one after another in one array task", 1),
    Option("max_parallel", (int,), None, "array concurrency limit (%k)", 1),
    Option("max_requeue", (int,), 3, "requeues allowed for checkpointable functions", 0),
)
