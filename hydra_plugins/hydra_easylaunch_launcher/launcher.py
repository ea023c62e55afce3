"""The easylaunch Hydra launcher: a multirun batch is ONE easylaunch sweep.

    python my_app.py -m hydra/launcher=easylaunch hydra.launcher.mode=slurm \
        hydra.launcher.slurm_config_name=gpu lr=1e-3,1e-4 seed=0,1

Each job runs Hydra's own ``run_job`` where easylaunch runs it (its output dir
``${hydra.sweep.dir}/${hydra.sweep.subdir}`` with ``.hydra/`` config files, logging, callbacks),
and its ``JobReturn`` comes back as the run's result. A task function that raises makes the
run FAILED (its exception and traceback in the run directory, as for any easylaunch run) and
its JobReturn FAILED, so Hydra reports "Error executing job with overrides" and exits 1. A run
that ends without a result (cancelled, time limit, killed) gives a FAILED JobReturn whose
``return_value`` raises easylaunch's JobError. The variant of each run is
``{"overrides": [...], "job_num": N}``; the log dir is easylaunch's (``base_log_dir``, else
config, ``$EASYLAUNCH_LOG_DIR`` or ``./easylaunch-logs``). Relative Hydra output dirs are
resolved in the run's working directory, which is the launch directory on this machine's
modes (local, local_pool, slurm).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)

#: attribute of a task's exception carrying its JobReturn back to the launcher
_RETURN_ATTR = "_easylaunch_hydra_job_return"


class HydraTask:
    """``(doodad_config, variant) -> JobReturn``: one Hydra job, run where easylaunch runs it."""

    def __init__(
        self,
        hydra_context: HydraContext,
        task_function: TaskFunction,
        config: DictConfig,
        singleton_state: Dict[Any, Any],
    ) -> None:
        self.hydra_context = hydra_context
        self.task_function = task_function
        self.config = config
        self.singleton_state = singleton_state

    def __call__(self, doodad_config: Any, variant: Dict[str, Any]) -> JobReturn:
        Singleton.set_state(self.singleton_state)
        setup_globals()
        sweep_config = self.hydra_context.config_loader.load_sweep_config(
            self.config, list(variant["overrides"])
        )
        from easylaunch.environments import detect

        with open_dict(sweep_config.hydra.job) as job:
            # the scheduler's id (1234_5 on Slurm), else the easylaunch run's name
            job.id = detect().job_ref() or Path(doodad_config.base_log_dir).name
            job.num = variant["job_num"]
        ret = run_job(
            hydra_context=self.hydra_context,
            task_function=self.task_function,
            config=sweep_config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        if ret.status == JobStatus.FAILED:
            # the run is FAILED for easylaunch too (error.json, traceback); the JobReturn rides
            # along on the exception so the launcher hands Hydra the real one
            exc = ret._return_value
            ret._return_value = None
            try:
                setattr(exc, _RETURN_ATTR, ret)
            except AttributeError:
                pass
            raise exc
        return ret


class EasylaunchLauncher(Launcher):
    """``hydra/launcher=easylaunch``: see :mod:`hydra_plugins.hydra_easylaunch_launcher.launcher`."""

    def __init__(self, **params: Any) -> None:
        self.params: Dict[str, Any] = {
            k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
            for k, v in params.items()
        }
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from easylaunch import JobError, State, run_sweep
        from easylaunch.modes import get_mode_class

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        params = dict(self.params)
        mode = params.pop("mode")
        exp_name = params.pop("exp_name")
        options = {k: v for k, v in params.items() if v is not None}
        if any(o.name == "skip_wait" for o in get_mode_class(mode).options):
            options["skip_wait"] = True  # waited for below, with easylaunch's progress display

        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, int(str(self.config.hydra.sweep.mode), 8))
        log.info(f"easylaunch '{mode}' sweep of {len(job_overrides)} job(s); Hydra output dir: {sweep_dir}")
        variants: List[Dict[str, Any]] = []
        for offset, overrides in enumerate(job_overrides):
            idx = initial_job_idx + offset
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            variants.append({"overrides": list(overrides), "job_num": idx})
        task = HydraTask(self.hydra_context, self.task_function, self.config, Singleton.get_state())
        sweep = run_sweep(task, variants, exp_name=exp_name, mode=mode, **options)
        try:
            sweep.wait()
        except JobError as exc:
            if exc.state is not State.GENERATED:
                raise
            raise RuntimeError(
                f"mode {mode!r} only wrote a bundle to submit elsewhere ({exc.run_dir.parent}/.batches/); "
                "Hydra needs the jobs' returns, so use a mode that runs them (local, local_pool, slurm, ...)"
            ) from exc
        returns = [_job_return(job, variant["overrides"]) for job, variant in zip(sweep, variants)]
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return returns


def _job_return(job: Any, overrides: List[str]) -> JobReturn:
    """The run's JobReturn; a FAILED one (raising on ``return_value``) when it has none."""
    try:
        ret = job.result()
        if isinstance(ret, JobReturn):
            return ret
        exc: BaseException = TypeError(f"run {job.run_dir} returned {type(ret).__name__}, not a JobReturn")
    except Exception as err:
        exc = err
    ret = getattr(exc, _RETURN_ATTR, None)
    if not isinstance(ret, JobReturn):
        ret = JobReturn(overrides=overrides)
    ret.status = JobStatus.FAILED
    ret.return_value = exc
    return ret
