"""``htp``: a bundle for BRC's high-throughput ``ht_helper.sh`` (many small runs on one node).

doodad's BrcHighThroughputMode: the launch submits nothing. It writes the runs' directories
(state GENERATED) and a bundle (see :mod:`easylaunch.bundle`) whose ``jobs/taskfile.txt`` has
one line per variant (``bash jobs/run_task.sh PAYLOAD``, which starts the runner on that one
payload) and whose ``submit.sh`` submits ONE job sized for the tasks::

    sbatch -N 1 -n min(runs, max_num_cores_per_node) --cpus-per-task=1 [account, partition,
           time, qos ... of the Slurm config] jobs/htp.sbatch
    # jobs/htp.sbatch: module load gcc openmpi; ht_helper.sh -m "MODULES" -t TASKFILE

``module load`` is skipped where there is no ``module`` command. TASKFILE is the bundle's
taskfile, or TASKFILE_PATH_ON_BRC when configured (submit.sh copies it there).
"""

from __future__ import annotations

from .. import __version__, bundle, records
from ..batch import Batch
from ..options import Option
from ..runtimes import Shell
from ..slurm_config import SlurmConfig, SlurmConfigError
from ..templating import render
from .sss import BUNDLE_OPTIONS, BundleMode, BundlePlan


class HtpMode(BundleMode):
    name = "htp"
    taskfile = True
    options = (
        *BUNDLE_OPTIONS,
        Option("ht_helper_modules", (str,), "python/3.5", "modules ht_helper.sh loads for the tasks (-m)"),
    )

    def check_mode(self, batch: Batch, name: str, cfg: SlurmConfig) -> None:
        if not cfg.max_num_cores_per_node:
            raise SlurmConfigError(
                f"mode 'htp' sizes its one job by the node: slurm config {name!r} needs "
                "max_num_cores_per_node (cores of one node); set it in SLURM_CONFIGS or pass "
                "slurm_options={'max_num_cores_per_node': 20}"
            )
        modules = batch.options.get("ht_helper_modules")
        if modules is None or "\n" in modules:
            raise ValueError(f"option ht_helper_modules={modules!r} must be one line, e.g. 'python/3.5'")

    def launch(self, batch: Batch, plan: BundlePlan) -> None:
        name, cfg = plan.config_name, plan.config
        opts = batch.options
        root, cluster, command = self.start(batch, plan)
        n = len(batch.runs)
        ntasks = max(1, min(n, int(cfg.max_num_cores_per_node or n)))
        batch.backend_common = {
            "bundle": str(root),
            "bundle_name": bundle.bundle_name(batch),
            "slurm_config": name,
            "ht_helper_ntasks": ntasks,
        }
        for run in batch.runs:
            batch.backend[run.index] = {"taskfile_line": run.index + 1}
        batch.materialize()
        packs = self.finish(batch, root, [[run] for run in batch.runs])
        exp = batch.exp_name
        # one runner command per line, paths relative to the bundle (the job runs ht_helper.sh
        # from there) unless the cluster paths are configured
        if cluster.bundle:
            task = f"{cluster.bundle}/{bundle.JOBS}/run_task.sh"
        else:
            task = f"{bundle.JOBS}/run_task.sh"
        if cluster.logs:
            base = f"{cluster.logs}/{exp}"
        elif cluster.bundle:
            base = f"{cluster.bundle}/{bundle.LOGS}/{exp}"
        else:
            base = f"{bundle.LOGS}/{exp}"
        payloads = [f"{base}/{r.name}/{records.PAYLOAD}" for r in batch.runs]
        jobs = f"{cluster.bundle}/{bundle.JOBS}" if cluster.bundle else bundle.JOBS
        bundle.write_file(
            root / bundle.JOBS / "taskfile.txt",
            render(
                "htp_taskfile.txt.j2",
                task=task,
                lines=[(payload, f"{jobs}/{pack}") for payload, pack in zip(payloads, packs)],
            ),
        )
        modules = str(opts.get("ht_helper_modules"))
        common = dict(
            version=__version__,
            exp_name=exp,
            batch_id=batch.batch_id,
            n_runs=n,
            cluster=cluster,
            runtime=plan.runtime,
        )
        bundle.write_file(
            root / bundle.JOBS / "htp.sbatch",
            render(
                "htp_job.sh.j2",
                job_name=exp[:100],
                ntasks=ntasks,
                signal_seconds=int(opts.get("signal_before_timeout") or 90),
                # the config's account, partition, time, ...; not its node/cpu shape: the one
                # htp job is sized for its tasks
                directives=cfg.directives(shape=False),
                modules=modules,
                **common,
            ),
            0o755,
        )
        bundle.write_file(
            root / bundle.JOBS / "run_task.sh",
            render(
                "htp_task.sh.j2",
                runner=command,
                args=[Shell('"$PAYLOAD"'), "--from-pack", Shell('"$PACK"'), "--quiet"],
                **common,
            ),
            0o755,
        )
        taskfile = cluster.taskfile or f"{bundle.JOBS}/taskfile.txt"
        wrap = render("htp_wrap.sh.j2", modules=modules, taskfile=taskfile).strip()
        job_argv = ["--nodes=1", f"--ntasks={ntasks}", "--cpus-per-task=1", *cfg.argv(shape=False)]
        # doodad's one sbatch line for the same job (shown in submit.sh and README.txt)
        sbatch_argv = [
            "-N",
            "1",
            "-n",
            str(ntasks),
            "--cpus-per-task=1",
            *cfg.argv(shape=False),
            "--wrap=" + wrap,
        ]
        submit = render(
            "htp_submit.sh.j2",
            ntasks=ntasks,
            sbatch_argv=sbatch_argv,
            python_minor=bundle.python_version(),
            **common,
        )
        self.publish(
            batch,
            root,
            cluster,
            plan.runtime,
            submit,
            readme=dict(
                ntasks=ntasks,
                modules=modules,
                slurm_config_name=name,
                job_argv=job_argv,
                sbatch_argv=sbatch_argv,
            ),
            extra={"slurm_config": name, "ht_helper_ntasks": ntasks, "ht_helper_modules": modules},
        )
