"""Render the Jinja2 templates in ``templates/`` (installed as ``easylaunch.templates``).

Every value that reaches a shell goes through the ``q`` filter (``shlex.quote``)::

    render("slurm_array.sh.j2", tasks_file="/logs/x y/tasks.json", ...)
    # ... --tasks '/logs/x y/tasks.json' ...
"""

from __future__ import annotations

import shlex
from typing import Any


def _env():
    from importlib import resources

    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resources.files("easylaunch.templates"))),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["q"] = lambda value: shlex.quote(str(value))
    env.filters["qjoin"] = lambda values: " ".join(shlex.quote(str(v)) for v in values)
    return env


def render(name: str, **context: Any) -> str:
    """Render template ``name`` with ``context``; a missing variable is an error."""
    return _env().get_template(name).render(**context)
