"""The run folder: where it is, and the description of the run written into it at start-up."""
from __future__ import annotations

import dataclasses
import json
import os
from datetime import datetime
from pathlib import Path

from cifar_dist.atomic import atomic_write
from cifar_dist.config import Config, config_to_yaml
from cifar_dist.engine.distributed import DistEnv, broadcast_object
from cifar_dist.run_files import CONFIG, JOB_ID, PLAN



def resolve_run_dir(cfg: Config, env: DistEnv) -> Path:
    """run.dir, or runs/<name>-<timestamp>; a torchrun restart or Slurm requeue finds its own dir again."""
    if cfg.run.dir:
        if env.is_main:
            Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
        return Path(cfg.run.dir)
    job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "")
    run_dir = None
    if env.is_main:
        runs = Path("runs")
        for marker in sorted(runs.glob(f"{cfg.run.name}-*/{JOB_ID}")) if job_id else []:
            if marker.read_text().strip() == job_id:
                run_dir = marker.parent
        if run_dir is None:
            run_dir = runs / f"{cfg.run.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
            run_dir.mkdir(parents=True, exist_ok=True)
            if job_id:
                (run_dir / JOB_ID).write_text(job_id + "\n")
    return Path(broadcast_object(str(run_dir)))


def write_run_description(run_dir: Path, cfg: Config, plan) -> None:
    """plan.json (what this launch resolved to) and config.yaml (the whole config: `--config` it to rerun)."""
    atomic_write(run_dir / PLAN, lambda tmp: tmp.write_text(json.dumps(dataclasses.asdict(plan), indent=2)))
    header = (f"The resolved config of the run in {run_dir}.\n"
              f"`cifar-dist train --config {run_dir / CONFIG}` trains the same recipe in a new folder;\n"
              f"add run.dir={run_dir} to continue this run instead.")
    rerun = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=""))
    atomic_write(run_dir / CONFIG, lambda tmp: tmp.write_text(config_to_yaml(rerun, header)))
