"""``sss``: write a self-contained bundle of Slurm array job scripts for a cluster easylaunch cannot reach.

doodad's "script slurm singularity" workflow: the launch submits nothing. It writes the runs'
directories (state GENERATED) and a bundle (see :mod:`easylaunch.bundle`) to copy to the
cluster and submit there with ``bash submit.sh``. A sweep is one array job (split every
``max_array_size`` tasks); ``variants_per_task=k`` packs k variants into one array task run by
a warm runner, as in mode ``slurm``. The runner is the cluster's ``python3`` (option
``python``), or runs inside ``singularity exec IMAGE`` when SSS_CPU_IMAGE / SSS_GPU_IMAGE (by
``use_gpu``) or ``singularity_image=`` is set. Results come back with ``easylaunch collect``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .. import __version__, bundle, records, transitions
from ..batch import Batch
from ..job import Job
from ..options import Option
from ..plan import LaunchPlan
from ..runtimes import RunnerCommand, Runtime, Shell
from ..slurm_config import ARRAY_OPTIONS, SLURM_OPTIONS, SlurmConfig, config_for
from ..spec import State
from ..templating import render
from .base import Mode

BUNDLE_OPTIONS = (
    *SLURM_OPTIONS,
    Option(
        "singularity_image",
        (str,),
        None,
        "image path on the cluster (default: SSS_GPU_IMAGE/SSS_CPU_IMAGE by use_gpu; '' for none)",
    ),
    Option("python", (str,), "python3", "the cluster's Python (the launcher's minor version)"),
)


@dataclass
class BundlePlan(LaunchPlan):
    """What ``check()`` resolved for a bundle: the Slurm config (and the runtime, redone with
    the cluster paths once the batch id is known)."""

    config_name: str = ""
    config: Optional[SlurmConfig] = None


class BundleMode(Mode):
    """Shared by ``sss`` and ``htp``: validation, code shipping, GENERATED states, local cancel."""

    poll_interval = 5.0
    taskfile = False

    def check(self, batch: Batch) -> BundlePlan:
        name, cfg = config_for(self.settings, batch.options)
        bundle.check_common(self.settings, batch)
        cluster = bundle.cluster_paths(self.settings, batch, taskfile=self.taskfile)  # validates them
        if bundle.resolve_image(self.settings, batch.options):
            # the jobs bind the bundle and the log dir: singularity -B splits at ':' and ','
            for key, path in (
                ("SLURM_DIRECTORY_FOR_JOB_SCRIPT", cluster.bundle),
                ("SSS_LOG_DIR", cluster.logs),
            ):
                if path and any(ch in path for ch in ":,"):
                    raise bundle.BundleError(
                        f"config {key}: the cluster path {path!r} holds ':' or ',', which singularity -B "
                        "cannot bind (it splits there); choose a path without them"
                    )
        self.check_mode(batch, name, cfg)
        return BundlePlan(
            runtime=bundle.make_runtime(self.settings, batch.options, cluster),
            variants_per_task=int(batch.options.get("variants_per_task") or 1),
            config_name=name,
            config=cfg,
        )

    def check_mode(self, batch: Batch, name: str, cfg: SlurmConfig) -> None:
        """Mode-specific validation (before anything is written)."""

    def start(self, batch: Batch, plan: BundlePlan) -> Tuple[Path, bundle.ClusterPaths, RunnerCommand]:
        """Bundle dir, cluster paths (now that the batch id is known), and the runner's command
        with the code shipped into the bundle."""
        cluster = bundle.cluster_paths(self.settings, batch, taskfile=self.taskfile)
        root = batch.sweep_dir
        (root / bundle.JOBS).mkdir(parents=True, exist_ok=True)
        zips = bundle.prepare_code(batch, root)
        plan.runtime = bundle.make_runtime(self.settings, batch.options, cluster)
        return root, cluster, bundle.runner_command(plan.runtime, zips)

    def finish(self, batch: Batch, root: Path, groups: Sequence[Sequence]) -> List[str]:
        """GENERATED states here, the runs' packs in the bundle; each group's pack (see
        :func:`easylaunch.bundle.write_bundle_packs`)."""
        bundle.mark_generated(batch, root)
        return bundle.write_bundle_packs(batch, root, groups)

    def publish(
        self,
        batch: Batch,
        root: Path,
        cluster: bundle.ClusterPaths,
        runtime: Runtime,
        submit: str,
        readme: dict,
        extra: dict,
    ) -> None:
        """Write submit.sh, README.txt and bundle.json (``readme``/``extra``: the mode's own
        entries), then say where the bundle is."""
        text = self.readme_common(batch, runtime, cluster)
        text.update(readme)
        bundle.write_common(batch, root, self.name, cluster, text, submit, extra=extra)
        bundle.announce(root, len(batch.runs), self.name)

    def readme_common(self, batch: Batch, runtime: Runtime, cluster: bundle.ClusterPaths) -> dict:
        import cloudpickle

        shown = cluster.bundle or f"easylaunch-bundles/{bundle.bundle_name(batch)}"
        return {
            "image": runtime.image,
            "python_cmd": runtime.python,
            "pre_cmds": list(self.settings.get("SSS_PRE_CMDS") or []),
            "cloudpickle_version": cloudpickle.__version__,
            "cluster_bundle_shown": shown,
            "logs_shown": cluster.logs or f"{shown}/logs",
            "runner_argv": [runtime.python, "-m", "easylaunch.runner"],
        }

    # -- after launch ----------------------------------------------------------------
    def poll(self, jobs: Sequence[Job]) -> Dict[Path, Optional[State]]:
        return {}  # only `easylaunch collect` brings news from the cluster

    def cancel(self, jobs: Sequence[Job]) -> None:
        """Mark the local runs CANCELLED: easylaunch cannot reach the cluster to stop anything."""
        for job in jobs:
            where = (job.manifest.get("backend") or {}).get("bundle", "its bundle")
            transitions.cancelled_here_only(
                job.run_dir,
                "cancelled here only: easylaunch cannot reach the cluster; if the bundle "
                f"{where} was submitted, scancel its job there",
            )

    def fetch(self, jobs: Sequence[Job]) -> None:
        """Nothing to fetch: copy the results back and run ``easylaunch collect``."""


class SssMode(BundleMode):
    name = "sss"
    options = (
        *BUNDLE_OPTIONS,
        *ARRAY_OPTIONS,
        Option(
            "max_array_size",
            (int,),
            1000,
            "array tasks per sbatch script (the cluster's MaxArraySize - 1)",
            1,
        ),
    )

    def launch(self, batch: Batch, plan: BundlePlan) -> None:
        name, cfg = plan.config_name, plan.config
        opts = batch.options
        root, cluster, command = self.start(batch, plan)
        k = plan.variants_per_task
        chunk = int(opts.get("max_array_size") or 1000)
        n = len(batch.runs)
        groups = [batch.runs[i : i + k] for i in range(0, n, k)]
        scripts = [f"{bundle.JOBS}/sss_{first:06d}.sbatch" for first in range(0, len(groups), chunk)]
        batch.backend_common = {
            "bundle": str(root),
            "bundle_name": bundle.bundle_name(batch),
            "slurm_config": name,
            "variants_per_task": k,
        }
        for g, group in enumerate(groups):
            for run in group:
                batch.backend[run.index] = {
                    "array_script": scripts[g // chunk],
                    "array_task": g % chunk,
                    "task_runs": len(group),
                }
        batch.materialize()
        packs = self.finish(batch, root, groups)
        exp = batch.exp_name
        if cluster.logs:
            paths = [[f"{cluster.logs}/{exp}/{r.name}/{records.PAYLOAD}" for r in g] for g in groups]
        else:
            paths = [[f"../{bundle.LOGS}/{exp}/{r.name}/{records.PAYLOAD}" for r in g] for g in groups]
        # each task makes its runs' directories from its pack (relative to jobs/) before it runs
        records.atomic_write_json(
            root / bundle.JOBS / "tasks.json",
            {"groups": paths, "packs": packs, "max_requeue": int(opts.get("max_requeue") or 0)},
        )
        limit = opts.get("max_parallel")
        directives = cfg.directives()
        for i, first in enumerate(range(0, len(groups), chunk)):
            count = min(chunk, len(groups) - first)
            text = render(
                "sss_array.sh.j2",
                version=__version__,
                exp_name=exp,
                batch_id=batch.batch_id,
                first_group=first,
                last_group=first + count - 1,
                n_runs=n,
                job_name=exp[:100],
                array_spec=f"0-{count - 1}" + (f"%{limit}" if limit else ""),
                signal_seconds=int(opts.get("signal_before_timeout") or 90),
                requeue=bool(opts.get("max_requeue")),
                directives=directives,
                cluster=cluster,
                runner=command,
                args=[
                    "--tasks",
                    Shell('"$BUNDLE/jobs/tasks.json"'),
                    "--index",
                    Shell(f'"$((SLURM_ARRAY_TASK_ID + {first}))"'),
                    "--quiet",
                ],
            )
            bundle.write_file(root / scripts[i], text, 0o755)
        submit = render(
            "sss_submit.sh.j2",
            version=__version__,
            exp_name=exp,
            batch_id=batch.batch_id,
            n_runs=n,
            scripts=scripts,
            cluster=cluster,
            runtime=plan.runtime,
            python_minor=bundle.python_version(),
        )
        self.publish(
            batch,
            root,
            cluster,
            plan.runtime,
            submit,
            readme=dict(
                n_scripts=len(scripts),
                n_groups=len(groups),
                variants_per_task=k,
                max_parallel=limit,
                slurm_config_name=name,
                sbatch_argv=cfg.argv(),
            ),
            extra={"scripts": scripts, "slurm_config": name, "variants_per_task": k},
        )
