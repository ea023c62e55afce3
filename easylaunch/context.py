"""``easylaunch.current()``: the DoodadConfig of the run this code executes in (None outside).

    import easylaunch

    def train(lr):                      # a plain function, submitted with easylaunch.Executor
        config = easylaunch.current()   # DoodadConfig: base_log_dir is the run's directory
        out_dir = config.base_log_dir if config else "."

The runner enters the run's config around the function call (and its checkpoint hook). It is a
context variable: threads the function starts see None unless they copy the context
(``contextvars.copy_context().run(...)``). Runs on Python 3.8+ (target side).
"""

from __future__ import annotations

import contextvars
from typing import Optional

from .spec import DoodadConfig

_CURRENT: contextvars.ContextVar[Optional[DoodadConfig]] = contextvars.ContextVar(
    "easylaunch_current_run", default=None
)


def current() -> Optional[DoodadConfig]:
    """The DoodadConfig of the run being executed, or None outside a run."""
    return _CURRENT.get()


def enter(config: DoodadConfig) -> contextvars.Token:
    """Make ``config`` what :func:`current` returns; pass the token to :func:`leave`."""
    return _CURRENT.set(config)


def leave(token: Optional[contextvars.Token]) -> None:
    """Undo :func:`enter` (a None token, from a run that never started its function, is ignored)."""
    if token is not None:
        _CURRENT.reset(token)
