"""A job that is a command line: :class:`Command` is a picklable callable for any mode.

    from easylaunch import Command, run_sweep, grid

    cmd = Command(["python", "train.py"], args={"epochs": 3})
    sweep = run_sweep(cmd, grid({"model_name": ["resnet_v1_50"], "batch___size": [32, 64]}),
                      exp_name="cmds", mode="local_pool")
    # each run executes, in its run directory:
    #   python train.py --epochs=3 --model_name=resnet_v1_50 --batch-size=32

The runner calls it like a function: it starts the command as a child process in the run
directory (``cwd``, if given, instead), with the variant rendered as arguments the way
Launcher.jl renders them (:func:`render_args`). Exit code 0 is COMPLETED (the result is 0);
another code raises :class:`CommandFailed` (the run is FAILED with that exit code and the last
lines of the command's stderr in its message). A stop signal (cancel, the run's ``timeout``)
is passed on to the command, which is killed if it has not ended 5 s later.

``argv`` as a list runs without a shell (values pass as they are); as a string it runs through
``/bin/sh -c`` with every rendered value quoted for that shell.

Target-side code: Python 3.8+, standard library only.
"""

from __future__ import annotations

import collections
import os
import shlex
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

#: how many lines of the command's stderr a failure's message quotes
TAIL_LINES = 20
#: seconds the command gets after a passed-on stop signal before it is killed
STOP_GRACE = 5.0
ARGS_STYLES = ("equals", "space")


class CommandFailed(RuntimeError):
    """The command exited with a code other than 0 (``exit_code``; 128+N for signal N)."""

    def __init__(self, message: str, exit_code: int, stderr_tail: str = ""):
        super().__init__(message)
        self.exit_code = exit_code
        self.stderr_tail = stderr_tail

    def __reduce__(self) -> Any:
        return (type(self), (str(self), self.exit_code, self.stderr_tail))


def _option_name(key: str) -> str:
    # Launcher.jl: a triple underscore stands for a hyphen (Python names cannot hold one)
    return "--" + str(key).replace("___", "-")


def _flatten(values: Mapping[str, Any], prefix: str = "") -> List[tuple]:
    out: List[tuple] = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.extend(_flatten(value, name + "."))
        else:
            out.append((name, value))
    return out


def render_args(values: Optional[Mapping[str, Any]], style: str = "equals") -> List[str]:
    """A variant as command-line arguments, Launcher.jl's way::

        render_args({"model_name": "resnet_v1_50", "batch___size": 32})
        # ['--model_name=resnet_v1_50', '--batch-size=32']
        render_args({"batch___size": 32, "fast": True, "debug": False}, style="space")
        # ['--batch-size', '32', '--fast']

    A triple underscore becomes a hyphen; True is a bare flag, False and None are left out; a
    list or tuple repeats the option once per item; a nested dict gives dotted names
    (``{"opt": {"lr": 0.1}}`` -> ``--opt.lr=0.1``). The items are argv entries, unquoted.
    """
    if style not in ARGS_STYLES:
        raise ValueError(f"args_style must be one of {ARGS_STYLES}, got {style!r}")
    if values is None:
        return []
    if not isinstance(values, Mapping):
        raise TypeError(
            f"a Command's variant must be a dict of option names to values, got "
            f"{type(values).__name__} {values!r:.60}"
        )
    out: List[str] = []
    for key, value in _flatten(values):
        name = _option_name(key)
        items = value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if item is None or item is False:
                continue
            if item is True:
                out.append(name)
            elif style == "space":
                out.extend([name, str(item)])
            else:
                out.append(f"{name}={item}")
    return out


class Command:
    """A command line run as a job; picklable, so it travels to every mode.

    ``argv``: a list (executed directly) or a string (run by ``/bin/sh -c``, rendered values
    quoted for it). ``args``: fixed options rendered like the variant (a dict, the variant's
    keys win) or extra arguments as a list, placed before the variant's. ``cwd``: the working
    directory (default: the run directory); a directory of the launching machine inside a code
    dir maps to the shipped code's copy on a target where it does not exist (see
    :meth:`workdir`). ``env``: variables added to the runner's environment (plus
    ``EASYLAUNCH_RUN_DIR``, the run directory: outputs written there come back). ``args_style``: ``"equals"`` (``--k=v``) or ``"space"`` (``--k v``).
    """

    def __init__(
        self,
        argv: Union[str, Sequence[str]],
        args: Union[Mapping[str, Any], Sequence[str], None] = None,
        cwd: Optional[str] = None,
        env: Optional[Mapping[str, str]] = None,
        args_style: str = "equals",
    ):
        if isinstance(argv, str):
            if not argv.strip():
                raise ValueError("Command(argv): the command string is empty")
            self.argv: Union[str, List[str]] = argv
        else:
            argv = list(argv)
            if not argv:
                raise ValueError("Command(argv): the argument list is empty; give at least the program")
            bad = [a for a in argv if not isinstance(a, (str, os.PathLike))]
            if bad:
                raise TypeError(f"Command(argv): every item must be a str, got {bad[0]!r}")
            self.argv = [os.fspath(a) for a in argv]
        if args is not None and not isinstance(args, Mapping):
            if isinstance(args, str) or not all(isinstance(a, str) for a in args):
                raise TypeError(
                    f"Command(args=...) takes a dict of options or a list of str, got {args!r:.60}"
                )
            args = list(args)
        self.args = dict(args) if isinstance(args, Mapping) else args
        if args_style not in ARGS_STYLES:
            raise ValueError(f"Command(args_style=...) must be one of {ARGS_STYLES}, got {args_style!r}")
        self.args_style = args_style
        self.cwd = os.fspath(cwd) if cwd is not None else None
        if env is not None:
            bad_env = [k for k, v in env.items() if not isinstance(k, str) or not isinstance(v, str)]
            if bad_env:
                raise TypeError(f"Command(env=...) takes str names and values; {bad_env[0]!r} is not")
        self.env = dict(env) if env is not None else None
        # a name for records and for the GPU scheduler's job type
        self.__qualname__ = self.__name__ = "Command(%s)" % " ".join(self.job_type())

    def __repr__(self) -> str:
        return f"Command({self.argv!r}, args={self.args!r})"

    def job_type(self) -> List[str]:
        """What makes two runs the same kind of job (for GPU profiles): ``argv[:2]``."""
        words = shlex.split(self.argv) if isinstance(self.argv, str) else self.argv
        return list(words[:2])

    def reference(self) -> Dict[str, Any]:
        """JSON-able constructor arguments (how a Command travels across Python versions)."""
        return {
            "argv": self.argv,
            "args": self.args,
            "cwd": self.cwd,
            "env": self.env,
            "args_style": self.args_style,
        }

    def command_line(self, variant: Optional[Mapping[str, Any]] = None) -> Union[str, List[str]]:
        """The argv list (or the shell string) that runs for ``variant``."""
        extra: List[str] = []
        options: Dict[str, Any] = {}
        if isinstance(self.args, Mapping):
            options.update(self.args)
        elif self.args:
            extra = list(self.args)
        if variant:
            if not isinstance(variant, Mapping):
                render_args(variant)  # raises the TypeError naming it
            options.update(variant)
        rendered = extra + render_args(options, self.args_style)
        if isinstance(self.argv, str):
            return " ".join([self.argv] + [shlex.quote(a) for a in rendered])
        return list(self.argv) + rendered

    def workdir(self, run_dir: Optional[str]) -> Optional[str]:
        """Where the command runs on this machine: ``cwd`` when it is here, else the shipped
        code's copy of it (``cwd`` on the launching machine, inside a code dir), else the run
        directory when no ``cwd`` was given. FileNotFoundError naming the fix otherwise."""
        if self.cwd is None:
            return run_dir
        if os.path.isdir(self.cwd):
            return self.cwd
        from .runner import PAYLOAD_ENV

        payload_path = os.environ.get(PAYLOAD_ENV)
        if payload_path:
            from . import payload, snapshot

            info = payload.read_header(payload_path).get("snapshot")
            copy = snapshot.copy_of(info, Path(payload_path), self.cwd, directory=True) if info else None
            if copy:
                return copy
        raise FileNotFoundError(
            f"Command(cwd={self.cwd!r}): no such directory on this machine, and it is not inside "
            "the code shipped here; give a directory of the target, or launch from inside a "
            "code dir (code_dirs_to_mount)"
        )

    def __call__(self, doodad_config: Any, variant: Optional[Mapping[str, Any]]) -> int:
        line = self.command_line(variant)
        run_dir = getattr(doodad_config, "base_log_dir", None) or None
        cwd = self.workdir(run_dir)
        env = dict(os.environ)
        if run_dir:
            env["EASYLAUNCH_RUN_DIR"] = str(run_dir)  # outputs written there come back
        env.update(self.env or {})
        gpu = getattr(doodad_config, "gpu_id", None)
        if (
            getattr(doodad_config, "use_gpu", False)
            and gpu is not None
            and "CUDA_VISIBLE_DEVICES" not in (self.env or {})
        ):
            env.setdefault("CUDA_VISIBLE_DEVICES", str(gpu))
        return run_command(line, cwd=cwd, env=env)


def _pump(src: Any, dst_fd: Optional[int], dst_text: Any, tail: Optional[collections.deque]) -> None:
    partial = b""
    for chunk in iter(lambda: os.read(src.fileno(), 65536), b""):
        if dst_fd is not None:
            try:
                os.write(dst_fd, chunk)
            except OSError:
                dst_fd = None
        elif dst_text is not None:
            try:
                dst_text.write(chunk.decode("utf-8", "replace"))
                dst_text.flush()
            except (OSError, ValueError):
                dst_text = None
        if tail is not None:
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()[-4096:]
            tail.extend(lines)
    if tail is not None and partial:
        tail.append(partial)
    src.close()


def _target(stream: Any, fd: int) -> tuple:
    """Where a child's output goes: the descriptor when the stream writes to it (runner
    processes), else the Python stream (in-process runs tee sys.stdout/sys.stderr)."""
    try:
        if stream.fileno() == fd and not hasattr(stream, "log"):
            return fd, None
    except (AttributeError, OSError, ValueError):
        pass
    return None, stream


def run_command(
    line: Union[str, Sequence[str]], cwd: Optional[str] = None, env: Optional[dict] = None
) -> int:
    """Run ``line`` (argv list, or a string for ``/bin/sh -c``) as a child; 0 or CommandFailed."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    out_fd, out_text = _target(sys.stdout, 1)
    err_fd, err_text = _target(sys.stderr, 2)
    tail: collections.deque = collections.deque(maxlen=TAIL_LINES)
    try:
        proc = subprocess.Popen(
            line,
            shell=isinstance(line, str),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=None if out_fd is not None else subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except OSError as exc:
        shown = line if isinstance(line, str) else " ".join(shlex.quote(a) for a in line)
        raise CommandFailed(f"command {shown!r} could not start: {exc}", 127) from None
    pumps = [threading.Thread(target=_pump, args=(proc.stderr, err_fd, err_text, tail), daemon=True)]
    if proc.stdout is not None:
        pumps.append(threading.Thread(target=_pump, args=(proc.stdout, None, out_text, None), daemon=True))
    for t in pumps:
        t.start()
    try:
        code = proc.wait()
    except BaseException as exc:
        # a stop signal (RunInterrupted) or KeyboardInterrupt: pass it on, then make sure
        signum = getattr(
            exc, "signum", signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
        )
        _stop(proc, signum)
        for t in pumps:
            t.join(timeout=1.0)
        raise
    for t in pumps:
        t.join()
    if code == 0:
        return 0
    exit_code = 128 - code if code < 0 else code
    shown = line if isinstance(line, str) else " ".join(shlex.quote(a) for a in line)
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    text = "\n".join(b.decode("utf-8", "replace") for b in tail).rstrip()
    message = f"command {shown} {how}"
    if text:
        message += "; last lines of its stderr:\n" + text
    raise CommandFailed(message, exit_code, text)


def _stop(proc: subprocess.Popen, signum: int) -> None:
    try:
        proc.send_signal(signum)
        proc.wait(timeout=STOP_GRACE)
    except BaseException:  # still running after the grace (or a second interrupt): kill it
        try:
            proc.kill()
            proc.wait(timeout=STOP_GRACE)
        except (OSError, subprocess.TimeoutExpired):
            pass


def from_reference(**kwargs: Any) -> Command:
    """Rebuild a Command from :meth:`Command.reference` (by-reference payloads)."""
    return Command(**kwargs)
