"""Render the Jinja2 templates in ``templates/`` (installed as ``easylaunch.templates``).

Every value a template writes into a script goes through one of these filters, chosen by
where it lands (tests/test_shell_quoting.py checks every template for it)::

    {{ path | q }}             a shell word (``shlex.quote``): '/logs/x y/tasks.json'
    {{ argv | qjoin }}         shell words joined by spaces
    {{ value | comment }}      text in a ``#`` comment, on one line (control characters escaped)
    {{ directive | sbatch }}   an ``#SBATCH`` line's flag and value(s), quoted the way sbatch
                               reads them (see :func:`easylaunch.slurm_config.sbatch_line`)
    {{ name | plain }}         a name easylaunch made itself (refused if it holds anything
                               but letters, digits and ``_ . , : = + @ % / -``)
    {{ number | int }}         a number
    {{ line | shell }}         user shell code by design (SSS_PRE_CMDS), written as is

Inside a double-quoted shell string a quoted word must close the string first:
``echo "runs of "{{ exp_name | q }}" done"``.

    render("slurm_array.sh.j2", tasks_file="/logs/x y/tasks.json", ...)
    # ... --tasks '/logs/x y/tasks.json' ...
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

_PLAIN = re.compile(r"^[A-Za-z0-9_.,:=+@%/-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]")


def quote(value: Any) -> str:
    """One shell word (``shlex.quote``)."""
    return shlex.quote(str(value))


def comment(value: Any) -> str:
    """``value`` as text that stays inside a ``#`` comment line: control characters
    (newlines first of all) are written as escapes (``\\n``, ``\\x1b``)."""

    def escape(match: "re.Match[str]") -> str:
        ch = match.group()
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(
            ch, f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}"
        )

    return _CONTROL.sub(escape, str(value))


def plain(value: Any) -> str:
    """A name that needs no quoting anywhere in a script; ValueError otherwise (a template bug)."""
    text = str(value)
    if not _PLAIN.match(text):
        raise ValueError(f"template value {text!r} is not a plain name; quote it with the q filter")
    return text


def _sbatch(value: Any) -> str:
    from .slurm_config import sbatch_line

    return sbatch_line(value)


def template_dir() -> Path:
    """The templates: ``easylaunch.templates`` where the package is installed, else the
    checkout's ``templates/`` beside ``easylaunch/`` (a launch script run from a source tree)."""
    from importlib import resources

    try:
        return Path(str(resources.files("easylaunch.templates")))
    except ModuleNotFoundError:
        checkout = Path(__file__).resolve().parent.parent / "templates"
        if (checkout / "__init__.py").is_file():
            return checkout
        raise ModuleNotFoundError(
            f"easylaunch's templates are missing: neither the package easylaunch.templates nor {checkout} "
            "exists; install easylaunch (pip install .) or run from a complete checkout"
        ) from None


def _env():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(template_dir())),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    from .runtimes import quote as word
    from .runtimes import shcat, shjoin

    env.filters["q"] = quote
    env.filters["qjoin"] = lambda values: " ".join(quote(v) for v in values)
    env.filters["comment"] = comment
    # runtime commands: literals quoted, runtimes.Shell expressions kept as they are
    env.filters["sh"] = word
    env.filters["shjoin"] = shjoin
    env.filters["shcat"] = shcat
    env.filters["sbatch"] = _sbatch
    env.filters["plain"] = plain
    env.filters["shell"] = str
    return env


def render(name: str, **context: Any) -> str:
    """Render template ``name`` with ``context``; a missing variable is an error."""
    return _env().get_template(name).render(**context)
