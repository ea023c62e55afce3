"""``local_singularity`` (alias ``singularity``): the ``local`` scheduler, runners inside Apptainer.

Everything ``local`` does (processes on this machine in their own session, ``max_parallel`` at
once, a detached dispatcher for the rest, liveness polling, cancel with escalation, packing by
``variants_per_task``/``expected_duration``), with each process started as::

    apptainer exec [--nv] --cleanenv --contain [BRC_EXTRA_SINGULARITY_ARGS]
        -B <log dir>/.snapshots:<same>:ro            # code snapshot, easylaunch + cloudpickle zips
        -B <log dir>/.snapshots-unpacked             # the snapshot unpacked once (as local_docker)
        -B <run dir> ...                             # the run directories of this process, rw
        -B <batch dir>:<same>:ro                     # packed: the tasks file
        -B <NON_CODE_DIRS_TO_MOUNT local_dir>:<mount_point>[:ro]   # read_only defaults to True
        IMAGE python3 -m easylaunch.runner ...

``IMAGE`` is ``singularity_image=`` (a SIF file or a sandbox directory), else config
SINGULARITY_IMAGE; a path that does not exist is refused before anything is written. Code travels
as the content-addressed snapshot plus the easylaunch and cloudpickle zips (on the container's
PYTHONPATH through APPTAINERENV_), so the image needs only Python 3 (the launcher's minor for
functions pickled by value; the image's Python minor is asked once per image and cached, and a
module function travels by reference to another 3.8+ minor). ``--cleanenv`` gives the runner only that environment and
``--contain`` shares none of the host's directories beyond the binds (no $HOME, /tmp or working
directory), as a Docker container sees only its mounts; every path is bound at the same path, so
``doodad_config.base_log_dir`` is the run directory on both sides and outputs land there, owned by
the caller (Apptainer runs as the caller). SINGULARITY_PRE_CMDS run first, on this machine, in
the shell that then executes ``apptainer exec``.

``use_gpu=True`` adds ``--nv``. Where this machine shows no NVIDIA driver (no /dev/nvidiactl, no
``nvidia-smi``) ``apptainer exec --nv`` would only warn and run on the CPU, so the launch is
refused instead, before anything is written.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import List, Optional, Sequence

from ..batch import Batch, RunSpec
from ..options import Option
from ..payload import python_version
from ..plan import LaunchPlan
from ..runtimes import ApptainerRuntime, Mount, Runtime, apptainer_runtime
from .local import LocalMode

#: where containers unpack the snapshot, shared by all of a log dir (as local_docker does)
UNPACK_DIR = ".snapshots-unpacked"
#: characters Apptainer's ``-B src:dst[:ro]`` lists cannot hold in a path
_BIND_UNSAFE = (":", ",")


class LocalSingularityMode(LocalMode):
    name = "local_singularity"
    options = (
        *(o for o in LocalMode.options if o.name not in ("gpus", "gpu_policy")),  # local modes only
        Option(
            "singularity_image",
            (str, os.PathLike),
            None,
            "SIF file or sandbox directory (default: config SINGULARITY_IMAGE)",
        ),
    )

    def check(self, batch: Batch) -> LaunchPlan:
        plan = super().check(batch)
        assert isinstance(plan.runtime, ApptainerRuntime)
        python = image_python(plan.runtime)
        # another minor than the launcher's: the function travels by reference (Python versions)
        plan.target_python = None if python == python_version() else python
        return plan

    def runtime(self, batch: Batch) -> ApptainerRuntime:
        image = batch.options.get("singularity_image") or self.settings.get("SINGULARITY_IMAGE")
        if not image:
            raise ValueError(
                "mode 'local_singularity' needs an image: pass singularity_image='/path/image.sif' "
                "(a SIF file or a sandbox directory) or set SINGULARITY_IMAGE in the config file"
            )
        image = os.path.abspath(os.path.expanduser(os.fspath(image)))
        gpu = bool(batch.options.get("use_gpu"))
        if gpu and not self.gpu_available():
            raise RuntimeError(
                "use_gpu=True, but this machine shows no NVIDIA GPU runtime (no /dev/nvidiactl, no "
                "nvidia-smi on PATH), so `apptainer exec --nv` would run the function on the CPU; "
                "drop use_gpu=True, or launch on a machine with an NVIDIA driver"
            )
        store = batch.log_root / ".snapshots"
        unpacked = batch.log_root / UNPACK_DIR
        for path in (str(batch.log_root), image):
            if any(c in path for c in _BIND_UNSAFE):
                raise ValueError(
                    f"path {path!r} holds ':' or ',', which Apptainer's bind lists (-B) cannot "
                    "carry; choose another base_log_dir / image path"
                )
        runtime = apptainer_runtime(
            self.settings,
            image,
            gpu=gpu,
            binds=[Mount(str(store), read_only=True), Mount(str(unpacked), read_only=False)],
            host_pre_cmds=self.settings.get("SINGULARITY_PRE_CMDS") or [],
            cleanenv=True,
            contain=True,
        )
        for mount in runtime.binds:
            if any(c in str(mount.source) + str(mount.target or "") for c in _BIND_UNSAFE):
                raise ValueError(
                    f"NON_CODE_DIRS_TO_MOUNT entry {mount.source} -> {mount.target_path} holds ':' or "
                    "',', which Apptainer's bind lists (-B) cannot carry"
                )
        # the runner under --cleanenv sees only APPTAINERENV_ variables: there is no scheduler,
        # and the snapshot is unpacked once for every container of the log dir
        runtime.env.update(EASYLAUNCH_ENVIRONMENT="local", EASYLAUNCH_SNAPSHOT_CACHE=str(unpacked))
        return runtime

    def code_paths(self, batch: Batch, runtime: Runtime) -> List[str]:
        (batch.log_root / UNPACK_DIR).mkdir(parents=True, exist_ok=True)  # bound: must exist
        return super().code_paths(batch, runtime)

    def ship(self, batch: Batch, runtime: Runtime) -> None:
        """The code snapshot into the log dir's store, which every container binds read-only
        (the launcher's import paths mean nothing inside)."""
        from ..shipping import ship

        ship(batch, batch.log_root / ".snapshots", zips=False, same_machine=False)

    def gpu_available(self) -> bool:
        """Is there an NVIDIA driver ``--nv`` can bring into the container?"""
        return os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi") is not None

    def group_runtime(
        self, runtime: Runtime, batch: Batch, group: Sequence[RunSpec], tasks_file: Optional[Path]
    ) -> Runtime:
        """Bind this process's run directories (read-write) and, packed, the tasks file's dir."""
        binds = [Mount(str(run.run_dir), read_only=False) for run in group]
        if tasks_file is not None:
            binds.append(Mount(str(tasks_file.parent), read_only=True))
        return dataclasses.replace(runtime, binds=[*runtime.binds, *binds])


_PROBE = "import sys; print('%d.%d' % sys.version_info[:2])"


def image_python(runtime: ApptainerRuntime) -> str:
    """The image's Python minor, found once per image (path, size and time of change) and cached
    in the user's cache dir; RuntimeError naming the image when it has no working python3."""
    import subprocess

    from .. import records
    from ..snapshot import cache_dir

    image = str(runtime.image)
    st = os.stat(image)
    key = f"{os.path.realpath(image)}|{st.st_size}|{st.st_mtime_ns}"
    cache = cache_dir().parent / "apptainer-images.json"
    known = records.read_json(cache, {}) or {}
    if key in known:
        return known[key]
    cmd = [
        str(runtime.binary or "apptainer"),
        "exec",
        "--cleanenv",
        "--contain",
        image,
        str(runtime.python),
        "-c",
        _PROBE,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"could not start image {image} to ask its Python version: {exc}") from None
    version = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    if proc.returncode != 0 or not version[:1].isdigit():
        raise RuntimeError(
            f"image {image}: `{runtime.python} -c ...` failed (exit {proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()[-300:]}; easylaunch runs `python3 -m easylaunch.runner` "
            "in the container: use an image with Python 3.8 or later"
        )
    known[key] = version
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        records.atomic_write_json(cache, known)
    except OSError:
        pass  # only a cache
    return version
