"""An injected GPU inventory and per-process GPU memory, for machines without GPUs (tests).

    EASYLAUNCH_FAKE_GPUS="16000,8000"         # two fake GPUs: 16000 MiB and 8000 MiB
    EASYLAUNCH_FAKE_GPU_USAGE=/tmp/gpu-usage  # where fake jobs write what they use

A fake job calls ``easylaunch.gpu_fake.use(nbytes)`` (or writes the file itself): the file
``$EASYLAUNCH_FAKE_GPU_USAGE/<pid>`` then holds ``<bytes> <gpu id>``, the GPU being the first
of ``CUDA_VISIBLE_DEVICES``. Monitoring and the GPU scheduler read it as NVML's per-process
``usedGpuMemory``; the file of a process that is gone counts for nothing.

Target-side code: Python 3.8+, standard library only.
"""

from __future__ import annotations

import os
from typing import Iterable, List, Optional

MIB = 1024 * 1024


def inventory() -> Optional[List[int]]:
    """Total bytes per fake GPU (index = id), or None when ``EASYLAUNCH_FAKE_GPUS`` is unset."""
    text = os.environ.get("EASYLAUNCH_FAKE_GPUS")
    if not text:
        return None
    try:
        sizes = [int(float(x) * MIB) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(
            f"EASYLAUNCH_FAKE_GPUS={text!r} must be GPU sizes in MiB separated by commas, e.g. '16000,8000'"
        ) from None
    return sizes


def usage_dir() -> Optional[str]:
    return os.environ.get("EASYLAUNCH_FAKE_GPU_USAGE") or None


def use(nbytes: int, gpu: Optional[int] = None) -> None:
    """Declare that this process now uses ``nbytes`` of GPU memory (on ``gpu``, default: the
    first of CUDA_VISIBLE_DEVICES)."""
    folder = usage_dir()
    if folder is None:
        raise RuntimeError("EASYLAUNCH_FAKE_GPU_USAGE is not set: no fake GPU usage can be recorded")
    if gpu is None:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip() or "0"
        gpu = int(visible)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(f"{int(nbytes)} {int(gpu)}\n")
    os.replace(tmp, os.path.join(folder, str(os.getpid())))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def per_process() -> List[tuple]:
    """``(pid, bytes, gpu)`` of every live process with a usage file."""
    folder = usage_dir()
    out: List[tuple] = []
    if folder is None or not os.path.isdir(folder):
        return out
    for name in os.listdir(folder):
        if not name.isdigit():
            continue
        try:
            with open(os.path.join(folder, name)) as f:
                used, gpu = f.read().split()[:2]
        except (OSError, ValueError):
            continue
        pid = int(name)
        if _alive(pid):
            out.append((pid, int(used), int(gpu)))
    return out


def usage_of(pids: Iterable[int]) -> int:
    """Bytes of GPU memory the processes ``pids`` use (summed over every fake GPU)."""
    wanted = set(pids)
    return sum(used for pid, used, _gpu in per_process() if pid in wanted)


def used_per_gpu() -> List[int]:
    """Bytes in use on each fake GPU (by every live process with a usage file)."""
    sizes = inventory() or []
    used = [0] * len(sizes)
    for _pid, nbytes, gpu in per_process():
        if 0 <= gpu < len(used):
            used[gpu] += nbytes
    return used
