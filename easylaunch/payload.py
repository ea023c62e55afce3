"""Payload files: what the runner needs to call the function, stamped with versions.

A payload is a plain ``pickle`` of a small header dict (protocol 5 at most: any Python 3.8+
reads it without cloudpickle). How the function and variant travel is the header's
``transport``:

- ``"value"`` (default): ``fn``/``variant`` are cloudpickle blobs. Pickled code only loads on the
  Python minor and cloudpickle version that wrote it, so the runner refuses a mismatch *before*
  unpickling any user object, naming both versions.
- ``"reference"``: for a target whose Python minor differs (an image with its own Python), the
  function travels as module + qualified name (importable from the code snapshot) and the
  variant as JSON; the runner imports the function there and needs no cloudpickle to load it.

The launcher picks the transport once per batch, before anything is written::

    transport = transport_for(fn, variants, target_python="3.8", code_dirs=["/code"])
    fn_blob = encode_function(fn, transport)          # TransportError/UnpicklableError if not
    data = build_payload(fn_blob, encode_variant(variant, transport), config,
                         sys_path=["/code"], transport=transport)
    header = read_header(path)   # -> {"python": "3.11", "cloudpickle": "3.1.2", "transport": ...}
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import pickle
import re
import sys
import types
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple

try:  # a by-reference payload loads without cloudpickle (an image that lacks it)
    import cloudpickle
except ImportError:  # pragma: no cover - the launcher and shipped runners have it
    cloudpickle = None  # type: ignore[assignment]

from .spec import DoodadConfig

FORMAT = 1
#: pickle protocol of headers (and of the runner's result.pkl): readable by every Python 3.8+
PROTOCOL = min(pickle.HIGHEST_PROTOCOL, 5)
VALUE = "value"
REFERENCE = "reference"
TRANSPORTS = (VALUE, REFERENCE)
#: the oldest Python the runner (and so a by-reference target) supports
MIN_TARGET_PYTHON = (3, 8)


def python_version() -> str:
    """``major.minor``: pickled code objects are only portable within one minor version."""
    return "%d.%d" % sys.version_info[:2]


class PayloadVersionError(RuntimeError):
    """The payload was written by another Python or cloudpickle version than the runner's."""


class UnpicklableError(TypeError):
    """The function or variant cannot be pickled; the message names the object."""


class TransportError(PayloadVersionError):
    """The function or a variant cannot travel to a target with another Python minor.

    Raised by :func:`transport_for` before anything is written; the message names both
    versions, the offending object and the fixes (move the function into a module of a code
    dir, plain JSON data in the variant, or an image with the launcher's Python).
    """


def dumps_checked(obj: Any, what: str) -> bytes:
    """cloudpickle ``obj`` or raise UnpicklableError naming ``what`` and the cause."""
    if cloudpickle is None:  # pragma: no cover
        raise UnpicklableError(
            f"cannot pickle {what}: cloudpickle is not installed (pip install cloudpickle)"
        )
    try:
        return cloudpickle.dumps(obj)
    except Exception as exc:  # pickling errors come in many types
        raise UnpicklableError(
            f"cannot pickle {what}: {type(exc).__name__}: {exc}. Everything the function "
            "refers to must be picklable (open files, locks, sockets and generators are not); "
            "create such objects inside the function instead"
        ) from exc


def minor_of(version: str) -> Tuple[int, int]:
    """``(major, minor)`` of ``"3.8"``, ``"3.8.18"`` or ``"Python 3.8.18"``; ValueError otherwise."""
    found = re.match(r"^(?:python\s*)?(\d+)\.(\d+)(?:\D|$)", str(version).strip(), re.IGNORECASE)
    if found is None:
        raise ValueError(
            f"target_python must be a Python version such as '3.8' or '3.10.12', got {version!r}"
        )
    return int(found.group(1)), int(found.group(2))


def transport_for(
    fn: Callable,
    variants: Iterable[Any],
    target_python: Optional[str],
    code_dirs: Optional[Sequence[str]] = None,
) -> str:
    """How ``fn`` and ``variants`` travel to a target running Python ``target_python``.

    ``"value"`` (cloudpickle) when ``target_python`` is None (the target runs the launcher's
    interpreter) or has the launcher's minor; else ``"reference"``, after checking that ``fn``
    can be imported there by name and every variant is plain JSON data::

        transport_for(train, [{"lr": 0.1}], None)             # -> "value"
        transport_for(mymod.train, [{"lr": 0.1}], "3.8")      # -> "reference"
        transport_for(main_fn, [{}], "3.8")                   # TransportError: move it into a module...

    ``code_dirs`` (the directories that travel as the code snapshot): when given, ``fn``'s
    module must be importable from one of them. Raises :class:`TransportError` naming both
    versions and the fixes; ValueError for a ``target_python`` that is not a version or is
    older than 3.8. Call it before anything is written.
    """
    if target_python is None:
        return VALUE
    target = minor_of(target_python)
    ours = sys.version_info[:2]
    if target == ours:
        return VALUE
    target_text = "%d.%d" % target
    if target < MIN_TARGET_PYTHON:
        raise ValueError(
            f"the target's Python is {target_text}, but easylaunch's runner needs Python "
            f"{'%d.%d' % MIN_TARGET_PYTHON} or later; use an image with Python "
            f"{'%d.%d' % MIN_TARGET_PYTHON}+ (the launcher's is {python_version()})"
        )
    launcher = python_version()
    reference_of(fn, code_dirs, (launcher, target_text))
    for i, variant in enumerate(variants):
        problem = _json_problem(variant, "")
        if problem is not None:
            raise TransportError(
                f"variant #{i}{problem} cannot travel to the target's Python {target_text} from "
                f"the launcher's Python {launcher}: across Python versions a variant "
                "travels as JSON, which holds only dicts with str keys, lists, str, int, float, "
                "bool and None. Fix: use those types in the variant (a list for a tuple, a str "
                "for a path), or use an image with Python "
                f"{launcher} so that the variant travels pickled"
            )
    return REFERENCE


def _json_problem(value: Any, where: str) -> Optional[str]:
    """None when ``value`` round-trips through JSON unchanged; else where and what the first
    offending value is (e.g. ``"['opt']['betas'] is a tuple: (0.9, 0.99)"``)."""
    kind = type(value)
    if value is None or kind in (str, int, float, bool):
        return None
    if kind is list:
        for i, item in enumerate(value):
            problem = _json_problem(item, f"{where}[{i}]")
            if problem is not None:
                return problem
        return None
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                return f"{where} has the key {key!r} of type {type(key).__name__} (JSON keys are str)"
            problem = _json_problem(item, f"{where}[{key!r}]")
            if problem is not None:
                return problem
        return None
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    module = "" if kind.__module__ == "builtins" else kind.__module__ + "."
    return f"{where} is a {module}{kind.__qualname__}: {shown}"


def _callable_name(fn: Any) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn))


def reference_of(
    fn: Callable,
    code_dirs: Optional[Sequence[str]] = None,
    versions: Optional[Tuple[str, str]] = None,
) -> dict:
    """The by-reference form of ``fn``: ``{"module", "qualname"}`` (plus ``"args"``/``"kwargs"``
    for a ``functools.partial``), JSON-able; :func:`resolve_reference` turns it back.

    Accepts functions and classes defined at the top level of an importable module (not
    ``__main__``), their static and class methods, and partials of those with JSON-able
    arguments. Raises :class:`TransportError` for anything else (``__main__`` functions,
    lambdas, closures, bound methods of instances, callable objects), naming ``versions``
    (launcher, target) and the fixes.
    """
    launcher, target = versions or (python_version(), "another minor")
    name = _callable_name(fn)
    fixes = (
        f"Fix: define it at the top level of a module in your code dir (e.g. experiments.py next "
        f"to the launch script) and import it from there, or use an image with Python {launcher}."
    )

    def refuse(why: str) -> TransportError:
        return TransportError(
            f"method_call {name} cannot travel to the target's Python {target} from the "
            f"launcher's Python {launcher}: {why}. Across Python versions a function travels by "
            f"reference (its module and name, imported from the code snapshot). {fixes}"
        )

    if type(fn).__module__ == "easylaunch.command" and type(fn).__name__ == "Command":
        # easylaunch travels with every run: a Command is rebuilt there from its arguments
        problem = _json_problem(fn.reference(), "")
        if problem is not None:
            raise refuse(f"its arguments are not plain JSON data ({problem.strip()})")
        return {
            "module": "easylaunch.command",
            "qualname": "from_reference",
            "construct": True,
            "kwargs": fn.reference(),
        }
    if isinstance(fn, functools.partial):
        inner = reference_of(fn.func, code_dirs, (launcher, target))
        args, keywords = list(fn.args), dict(fn.keywords or {})
        problem = _json_problem(args, "args") or _json_problem(keywords, "keywords")
        if problem is not None:
            raise refuse(
                f"it is a functools.partial with arguments that are not plain JSON data ({problem.strip()})"
            )
        return dict(inner, args=args, kwargs=keywords)
    owner = getattr(fn, "__self__", None)
    if owner is not None and not isinstance(owner, type) and not isinstance(owner, type(sys)):
        raise refuse(
            f"it is a method bound to an instance of {type(owner).__qualname__} (the instance "
            "would have to travel pickled)"
        )
    module_name = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not isinstance(qualname, str) or not isinstance(module_name, str):
        raise refuse(f"it is a {type(fn).__qualname__} object, not a function or class importable by name")
    if module_name == "__main__":
        raise refuse("it is defined in __main__ (the launch script), which the target cannot import")
    if "<lambda>" in qualname:
        raise refuse("it is a lambda, which has no importable name")
    if "<locals>" in qualname:
        raise refuse("it is defined inside another function (a closure), which has no importable name")
    try:
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
        found: Any = module
        for part in qualname.split("."):
            found = getattr(found, part)
    except Exception:
        raise refuse(f"{module_name}.{qualname} cannot be imported by that name") from None
    if found is not fn and found != fn:
        raise refuse(f"{module_name}.{qualname} names another object (was it redefined or decorated?)")
    if code_dirs is not None:
        _check_in_code_dirs(module, module_name, code_dirs, refuse)
    return {"module": module_name, "qualname": qualname}


def _check_in_code_dirs(module: Any, module_name: str, code_dirs: Sequence[str], refuse: Callable) -> None:
    """The module's import root must lie inside a code dir (the snapshot puts it on sys.path)."""
    file = getattr(module, "__file__", None)
    dirs = [os.path.realpath(os.path.expanduser(str(d))) for d in code_dirs]
    listed = ", ".join(str(d) for d in code_dirs) or "none"
    if not isinstance(file, str):
        raise refuse(f"its module {module_name} has no source file in the code dirs ({listed})")
    root = os.path.dirname(os.path.realpath(file))
    depth = module_name.count(".") + (1 if os.path.basename(file).startswith("__init__.") else 0)
    for _ in range(depth):
        root = os.path.dirname(root)
    if not any(root == d or root.startswith(d.rstrip(os.sep) + os.sep) for d in dirs):
        raise refuse(
            f"its module {module_name} ({file}) is not in the code dirs that travel as the snapshot "
            f"({listed}); add its directory to code_dirs_to_mount / CODE_DIRS_TO_MOUNT"
        )


def resolve_reference(ref: dict) -> Callable:
    """Import the callable a :func:`reference_of` dict names (on the target, after the code
    snapshot is active); ImportError naming the module and this Python when it is not there."""
    module_name, qualname = ref["module"], ref["qualname"]
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, SyntaxError) as exc:
        raise ImportError(
            f"cannot import the run's function {module_name}.{qualname} on Python "
            f"{python_version()} ({sys.executable}): {type(exc).__name__}: {exc}. The function "
            "travels by reference: its module must be in the code snapshot (a code dir) and "
            f"import on this Python (syntax and modules of Python {python_version()})"
        ) from exc
    if ref.get("construct"):  # a callable object rebuilt from its arguments (a Command)
        return obj(*ref.get("args") or [], **ref.get("kwargs") or {})
    if "args" in ref or "kwargs" in ref:
        obj = functools.partial(obj, *ref.get("args") or [], **ref.get("kwargs") or {})
    return obj


def encode_function(fn: Callable, transport: str) -> bytes:
    """``fn`` as a payload's ``fn`` blob: cloudpickle for "value", JSON of its reference for
    "reference" (after :func:`transport_for` chose that)."""
    name = _callable_name(fn)
    if transport == REFERENCE:
        return json.dumps(reference_of(fn), sort_keys=True).encode()
    return dumps_checked(fn, f"method_call {name!r}")


def encode_variant(variant: Any, transport: str, what: str = "variant") -> bytes:
    """``variant`` as a payload's ``variant`` blob: cloudpickle for "value", JSON for "reference"."""
    if transport == REFERENCE:
        problem = _json_problem(variant, "")
        if problem is not None:
            raise TransportError(f"{what}{problem} is not plain JSON data (needed across Python versions)")
        return json.dumps(variant, sort_keys=True).encode()
    return dumps_checked(variant, f"{what} {variant!r:.80}")


def replace_function(header: dict, fn: Callable) -> dict:
    """A copy of ``header`` whose function is ``fn`` (a checkpoint's resume callable), as written
    by THIS interpreter: by reference when the header travels by reference and ``fn`` can, else
    by value stamped with this interpreter's Python and cloudpickle versions."""
    new = dict(header)
    if header.get("transport", VALUE) == REFERENCE:
        try:
            new["fn"] = json.dumps(reference_of(fn), sort_keys=True).encode()
            return new
        except TransportError:
            new["variant"] = dumps_checked(json.loads(header["variant"]), "variant")
    new["fn"] = dumps_checked(fn, f"checkpoint callable {_callable_name(fn)!r}")
    new["transport"] = VALUE
    new["python"] = python_version()
    new["cloudpickle"] = cloudpickle.__version__ if cloudpickle is not None else None
    return new


#: the file name cloudpickle 3 gives the code objects it pickles by value
DYNAMIC_FILENAME = "<dynamic-code>"
#: a launch script outside the code dirs travels in the payload up to this size (traceback lines)
MAX_EMBEDDED_SOURCE = 256 << 10


def code_files(fn: Callable, code_dirs: Sequence[str] = ()) -> dict:
    """Where the function's code comes from, for tracebacks of by-value runs (the launcher side).

    cloudpickle 3 names every code object it pickles by value ``<dynamic-code>``, so a traceback
    on the target would show neither the launch script nor its lines. The payload header keeps
    ``{module: {"file": path}}`` for the function's module; the runner gives the code its file
    name back (:func:`restore_code_files`) and finds the lines in the code snapshot, the file
    itself, or ``"source"`` (embedded only for a file outside ``code_dirs``, up to 256 kB)::

        code_files(main_fn, ["/home/me/proj"])   # {"__main__": {"file": "/home/me/proj/launch.py"}}
    """
    target = fn.func if isinstance(fn, functools.partial) else fn
    target = getattr(target, "__func__", target)
    module_name = getattr(target, "__module__", None)
    module = sys.modules.get(module_name) if isinstance(module_name, str) else None
    file = getattr(module, "__file__", None)
    if not isinstance(file, str) or not file.endswith(".py"):
        return {}
    file = os.path.abspath(file)
    entry: dict = {"file": file}
    real = os.path.realpath(file)
    dirs = [os.path.realpath(os.path.expanduser(str(d))).rstrip(os.sep) + os.sep for d in code_dirs]
    if not any(real.startswith(d) for d in dirs):
        try:
            if os.path.getsize(file) <= MAX_EMBEDDED_SOURCE:
                with open(file, encoding="utf-8", errors="replace") as f:
                    entry["source"] = f.read()
        except OSError:
            pass
    return {module_name: entry}


def _with_filename(code: types.CodeType, file: str) -> types.CodeType:
    consts = tuple(_with_filename(c, file) if isinstance(c, types.CodeType) else c for c in code.co_consts)
    if code.co_filename == DYNAMIC_FILENAME:
        return code.replace(co_filename=file, co_consts=consts)
    return code.replace(co_consts=consts) if consts != code.co_consts else code


def restore_code_files(fn: Any, files: Optional[dict]) -> int:
    """Give by-value code of ``fn`` (and of the functions, classes and closures it refers to)
    its file name back (see :func:`code_files`); returns how many functions were changed."""
    if not files:
        return 0
    seen: set = set()
    changed = 0

    def visit(obj: Any, depth: int) -> None:
        nonlocal changed
        if depth > 6 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, functools.partial):
            visit(obj.func, depth + 1)
            return
        if isinstance(obj, (types.MethodType, staticmethod, classmethod)):
            visit(obj.__func__, depth + 1)
            return
        if isinstance(obj, property):
            for f in (obj.fget, obj.fset, obj.fdel):
                if f is not None:
                    visit(f, depth + 1)
            return
        if isinstance(obj, type):
            if obj.__module__ in files:
                for value in list(vars(obj).values()):
                    visit(value, depth + 1)
            return
        if not isinstance(obj, types.FunctionType):
            return
        entry = files.get(obj.__module__)
        if not entry or obj.__code__.co_filename != DYNAMIC_FILENAME:
            return  # pickled by reference: its module's own file is right
        try:
            obj.__code__ = _with_filename(obj.__code__, str(entry["file"]))
            changed += 1
        except (TypeError, ValueError):
            return
        for cell in obj.__closure__ or ():
            try:
                visit(cell.cell_contents, depth + 1)
            except ValueError:  # an empty cell
                pass
        # by-value code: its globals are cloudpickle's copy, holding only what the code uses
        for value in list(obj.__globals__.values()):
            visit(value, depth + 1)

    visit(fn, 0)
    return changed


def prime_source_lines(
    files: Optional[dict], copy_of: Optional[Callable[[str], Optional[str]]] = None
) -> None:
    """Make tracebacks show the lines of the files :func:`code_files` recorded: from the code
    snapshot's copy (``copy_of(file)``, what ran), else the embedded source when the file is not
    here; a file that is here and not in the snapshot is read by ``linecache`` as usual."""
    import linecache

    for entry in (files or {}).values():
        file = str(entry.get("file") or "")
        if not file:
            continue
        text = None
        copy = copy_of(file) if copy_of is not None else None
        if copy:
            try:
                with open(copy, encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError:
                text = None
        if text is None and entry.get("source") is not None and not os.path.exists(file):
            text = str(entry["source"])
        if text is not None:
            # mtime None: linecache.checkcache keeps the entry (the file may not exist here)
            linecache.cache[file] = (len(text), None, text.splitlines(True), file)


def build_payload(
    fn_blob: bytes,
    variant_blob: bytes,
    config: DoodadConfig,
    sys_path: Sequence[str] = (),
    snapshot: Optional[dict] = None,
    extra: Optional[dict] = None,
    git_patches: Sequence[Tuple[str, str]] = (),
    transport: str = VALUE,
    code_files: Optional[dict] = None,
    kept_snapshot: Optional[dict] = None,
) -> bytes:
    """Serialize one run's payload; ``fn_blob``/``variant_blob`` come from :func:`encode_function`
    and :func:`encode_variant` with the same ``transport`` (:func:`dumps_checked` for "value").

    ``git_patches`` names, per GitInfo of ``config``, the (diff, staged diff) files in the run's
    ``git/`` folder: the diffs then travel as those files, not once more inside every payload
    of a sweep, and the runner reads them back into the DoodadConfig. ``code_files`` (see
    :func:`code_files`) lets tracebacks of by-value code name the launch script.
    ``kept_snapshot``: a snapshot of the code as launched that the runner does not activate
    (local modes run the live code); a relaunch and a result read elsewhere use it.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    header = {
        "format": FORMAT,
        "transport": transport,
        "python": python_version(),
        "cloudpickle": cloudpickle.__version__ if cloudpickle is not None else None,
        "sys_path": list(sys_path),
        "snapshot": snapshot,
        "config": tuple(config),
        "config_fields": list(config._fields),
        "extra": extra or {},
        "fn": fn_blob,
        "variant": variant_blob,
        "git_patches": [list(pair) for pair in git_patches],
    }
    if code_files:
        header["code_files"] = code_files
    if kept_snapshot:
        header["kept_snapshot"] = kept_snapshot
    return pickle.dumps(header, protocol=PROTOCOL)


def read_header(path: Path | str) -> dict:
    """Load a payload's header without touching user objects."""
    with open(path, "rb") as f:
        header = pickle.load(f)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise PayloadVersionError(f"{path} is not an easylaunch payload of format {FORMAT}")
    return header


def check_versions(header: dict) -> None:
    """Raise PayloadVersionError naming both versions when they differ from this interpreter's.

    A by-reference payload carries no pickled code: any Python 3.8+ may run it.
    """
    if header.get("transport", VALUE) == REFERENCE:
        return
    ours = cloudpickle.__version__ if cloudpickle is not None else "not installed"
    problems = []
    if header["python"] != python_version():
        problems.append(f"Python {header['python']} (launcher) vs {python_version()} (runner)")
    if header["cloudpickle"] != ours:
        problems.append(f"cloudpickle {header['cloudpickle']} (launcher) vs {ours} (runner)")
    if problems:
        raise PayloadVersionError(
            "payload version mismatch: "
            + "; ".join(problems)
            + ". Install the launcher's versions where the run executes "
            f"(python {header['python']}, pip install cloudpickle=={header['cloudpickle']}); "
            "or launch with the target's Python known, so that a function defined in a module "
            "of a code dir travels by reference (see README, 'Python versions')"
        )


def load_callable(header: dict, run_dir: Optional[Path] = None) -> tuple[Callable, DoodadConfig, Any]:
    """Unpickle ``(function, DoodadConfig, variant)``; call after :func:`check_versions`.

    ``run_dir`` (the payload's directory) is where git patches named by the header are read.
    """
    if header.get("transport", VALUE) == REFERENCE:
        fn = resolve_reference(json.loads(header["fn"]))
        variant = json.loads(header["variant"])
    else:
        fn = cloudpickle.loads(header["fn"])
        variant = cloudpickle.loads(header["variant"])
        restore_code_files(fn, header.get("code_files"))
    config = DoodadConfig(*header["config"])
    patches = header.get("git_patches") or []
    if patches and run_dir is not None:
        infos = list(config.git_infos)
        for i, (diff_name, staged_name) in enumerate(patches[: len(infos)]):
            infos[i] = infos[i]._replace(
                code_diff=_read_patch(Path(run_dir), diff_name),
                code_diff_staged=_read_patch(Path(run_dir), staged_name),
            )
        config = config._replace(git_infos=infos)
    return fn, config, variant


def _read_patch(run_dir: Path, name: str) -> str:
    try:
        return (run_dir / "git" / name).read_text()
    except FileNotFoundError:
        return ""
