"""Variant expansion: grids over lists, ranges and seeds, with dotted keys made nested.

    >>> grid({"lr": [1e-3, 1e-4], "seed": range(3), "model.depth": [2]})[0]
    {'lr': 0.001, 'seed': 0, 'model': {'depth': 2}}

A value that is not a list, tuple or range is held fixed (a dict is treated as one value).
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Dict, Iterable, List, Mapping

SWEEPABLE = (list, tuple, range)


def nest(flat: Mapping[str, Any]) -> Dict[str, Any]:
    """Turn ``{"model.depth": 2}`` into ``{"model": {"depth": 2}}``; conflicting keys are errors."""
    out: Dict[str, Any] = {}
    for key, value in flat.items():
        if not isinstance(key, str):
            raise TypeError(f"variant keys must be strings, got {key!r}")
        parts = key.split(".")
        if any(not p for p in parts):
            raise ValueError(f"variant key {key!r} has an empty part; use names like 'model.depth'")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ValueError(f"variant key {key!r} conflicts with the value set for {part!r}")
            node = child
        if parts[-1] in node and isinstance(node[parts[-1]], dict) and isinstance(value, Mapping):
            node[parts[-1]].update(copy.deepcopy(dict(value)))
        elif parts[-1] in node:
            raise ValueError(f"variant key {key!r} is given twice")
        else:
            node[parts[-1]] = copy.deepcopy(value)
    return out


def grid(space: Mapping[str, Any]) -> List[Dict[str, Any]]:
    """Cartesian product of every list/tuple/range value in ``space``; other values stay fixed.

    Returns a list of nested variant dicts, in the order the keys are given (last key fastest).
    """
    if not isinstance(space, Mapping):
        raise TypeError(f"grid() takes a dict of key -> list of values, got {type(space).__name__}")
    keys = list(space)
    axes = []
    for key in keys:
        value = space[key]
        if isinstance(value, SWEEPABLE):
            values = list(value)
            if not values:
                raise ValueError(f"grid() axis {key!r} is empty: give at least one value")
            axes.append(values)
        else:
            axes.append([value])
    return [nest(dict(zip(keys, combo))) for combo in itertools.product(*axes)]


def summarize(variant: Mapping[str, Any], width: int = 40) -> str:
    """Short ``k=v`` text of a variant for tables (secret-looking values shown as ``<redacted>``)."""
    from .config import REDACTED, is_secret

    items = []

    def walk(prefix: str, node: Mapping[str, Any]) -> None:
        for k, v in node.items():
            if isinstance(k, str) and is_secret(k):
                items.append(f"{prefix}{k}={REDACTED}")
            elif isinstance(v, Mapping):
                walk(f"{prefix}{k}.", v)
            else:
                items.append(f"{prefix}{k}={v}")

    walk("", variant)
    text = " ".join(items)
    return text if len(text) <= width else text[: width - 1] + "…"


def check_variants(variants: Iterable[Any], doodad_rules: bool = True) -> List[Dict[str, Any]]:
    """Validate that each variant is a dict (None becomes {}); return deep copies.

    With ``doodad_rules`` (a user's variants, not the Executor's call arguments), doodad's
    rules hold too: no ``doodad_config`` key, and no key with a '.' at any depth.
    """
    out = []
    for i, v in enumerate(variants):
        if v is None:
            v = {}
        if not isinstance(v, Mapping):
            raise TypeError(
                f"variant #{i} must be a dict, got {type(v).__name__} ({v!r:.60}); "
                "pass variant={'lr': 0.1} or use grid({...}) for sweeps"
            )
        if "doodad_config" in v:
            raise ValueError(
                f"variant #{i}: the key 'doodad_config' is reserved (the function receives its "
                "DoodadConfig under that name); rename the key"
            )
        if doodad_rules:
            _check_no_dotted_keys(v, i)
        try:
            out.append(copy.deepcopy(dict(v)))
        except Exception as exc:  # locks, open files...: name the variant and its key
            from .payload import UnpicklableError

            bad = [k for k, x in v.items() if not _copyable(x)]
            where = f" (key {bad[0]!r}: {type(v[bad[0]]).__name__} object)" if bad else ""
            raise UnpicklableError(
                f"cannot copy/pickle variant #{i}{where}: {type(exc).__name__}: {exc}. A variant "
                "must be picklable (open files, locks, sockets and generators are not)"
            ) from exc
    return out


def _copyable(value: Any) -> bool:
    try:
        copy.deepcopy(value)
        return True
    except Exception:
        return False


def _check_no_dotted_keys(variant: Mapping[str, Any], index: int, path: str = "") -> None:
    """doodad's rule: a key holding '.' is a flat name that was meant to be nested."""
    for key, value in variant.items():
        if isinstance(key, str) and "." in key:
            where = f" (under {path!r})" if path else ""
            head, _, rest = key.partition(".")
            raise ValueError(
                f"variant #{index} key {key!r}{where} contains '.': as in doodad, dotted keys are "
                f"not allowed in a variant because they are meant to be nested; write "
                f"{{{head!r}: {{{rest!r}: ...}}}} or build the variants with grid({{...}}), which "
                "nests dotted keys"
            )
        if isinstance(value, Mapping):
            _check_no_dotted_keys(value, index, f"{path}.{key}" if path else str(key))
