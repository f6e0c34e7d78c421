"""The run folder: where it is, its one writer, its status and its copy of the console.

Nothing is created before the run is assembled (a run that fails its checks leaves no folder).
Then rank 0 claims the folder: it creates it and holds an advisory lock (`fcntl.flock` on
`run.lock`) for the life of the process, so a second training into the same `run.dir` stops
before it writes anything, naming the host and process that hold it. The kernel drops the lock
when the holder dies, SIGKILL included, so a launcher restart or a Slurm requeue gets it again.
`status.json` says what the run is doing (running, finished, stopped, failed, ...); while it says
"running", the lock tells whether a process still works on it (`is_locked`).
"""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import socket
import sys
from datetime import datetime
from pathlib import Path

from cifar_dist import run_files
from cifar_dist.run_files import is_locked
from cifar_dist.atomic import atomic_write
from cifar_dist.config import Config, config_to_yaml
from cifar_dist.engine.distributed import DistEnv, broadcast_object
from cifar_dist.errors import ConfigError


def resolve_run_dir(cfg: Config, env: DistEnv) -> Path:
    """run.dir, or runs/<name>-<timestamp>, as an absolute path; a torchrun restart or Slurm requeue finds its
    own dir again. Nothing is created here."""
    if cfg.run.dir:
        return Path(cfg.run.dir).resolve()
    job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "")
    run_dir = None
    if env.is_main:
        runs = Path("runs")
        for marker in sorted(runs.glob(f"{cfg.run.name}-*/{run_files.JOB_ID}")) if job_id else []:
            if marker.read_text().strip() == job_id:
                run_dir = marker.parent
        if run_dir is None:
            run_dir = runs / f"{cfg.run.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return Path(broadcast_object(str(run_dir))).resolve()


class RunFolder:
    """Rank 0's hold on the run folder: the lock, status.json, train.log."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock_file = None
        self.log_copy = None

    def busy(self) -> str | None:
        """Why this run cannot have the folder, naming the host and process that hold it; None when free."""
        if not is_locked(self.path):
            return None
        try:
            who = json.loads((self.path / run_files.LOCK).read_text())
            holder = f"host {who['host']}, process {who['pid']} (since {who['since']})"
        except (OSError, ValueError, KeyError):
            holder = "another process"
        return (f"run.dir {self.path} is being written by another training ({holder}); wait for it to end, "
                "stop it, or choose another run.dir")

    def claim(self) -> None:
        """Create the folder and take its lock; ConfigError naming the holder when another run has it."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            lock_file = open(self.path / run_files.LOCK, "a+")
        except OSError as err:
            raise ConfigError(f"run.dir {self.path} cannot be written ({err.strerror}); pick a folder you can "
                              "write to") from None
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock_file.close()
            raise ConfigError(self.busy() or f"run.dir {self.path} is being written by another training") from None
        lock_file.seek(0)
        lock_file.truncate()
        lock_file.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                    "since": datetime.now().isoformat(timespec="seconds")}))
        lock_file.flush()
        self.lock_file = lock_file

    def write_description(self, cfg: Config, plan) -> None:
        """plan.json (what this launch resolved to) and config.yaml (the whole config: `--config` it to rerun)."""
        run_files.write_json(self.path / run_files.PLAN, dataclasses.asdict(plan), fsync=True)
        header = (f"The resolved config of the run in {self.path}.\n"
                  f"`cifar-dist train --config {self.path / run_files.CONFIG}` trains the same recipe in a new "
                  f"folder;\nadd run.dir={self.path} to continue this run instead.")
        rerun = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, dir=""))
        atomic_write(self.path / run_files.CONFIG, lambda tmp: tmp.write_text(config_to_yaml(rerun, header)))
        job_id = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "")
        if job_id and not cfg.run.dir:
            (self.path / run_files.JOB_ID).write_text(job_id + "\n")

    def set_status(self, status: str, **details) -> None:
        """status.json: {"status": ..., "updated": ..., **details}."""
        record = {"status": status, "updated": datetime.now().isoformat(timespec="seconds"), **details}
        run_files.write_json(self.path / run_files.STATUS, record)

    def copy_console(self) -> None:
        """From now on, everything this process prints also goes to train.log (appended across resumes)."""
        self.log_copy = open(self.path / run_files.TRAIN_LOG, "a", buffering=1)
        self.log_copy.write(f"--- {datetime.now().isoformat(timespec='seconds')} {' '.join(sys.argv)}\n")
        sys.stdout, sys.stderr = Tee(sys.stdout, self.log_copy), Tee(sys.stderr, self.log_copy)

    def release(self) -> None:
        """Stop the console copy and drop the lock (also dropped by the kernel when the process dies)."""
        if self.log_copy is not None:
            sys.stdout, sys.stderr = sys.stdout.stream, sys.stderr.stream
            self.log_copy.close()
            self.log_copy = None
        if self.lock_file is not None:
            self.lock_file.close()
            self.lock_file = None


class Tee:
    """A text stream that writes to `stream` and to `copy` (the terminal and train.log)."""

    def __init__(self, stream, copy):
        self.stream, self.copy = stream, copy

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.copy.flush()
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()
