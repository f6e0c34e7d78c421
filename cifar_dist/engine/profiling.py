"""train.profile=START:STOP: torch.profiler over the optimizer steps after step START up to step STOP.

Writes to run.dir/profile/, on rank 0 (on every rank with train.profile_all_ranks=true), each file named
with its rank and steps: `<steps>_rank<r>.trace.json`, a Chrome/Perfetto trace (chrome://tracing or
ui.perfetto.dev; each step a ProfilerStep span), and `<steps>_rank<r>.top_ops.txt`, the operators that
took the most time (`key_averages().table`). A launch that starts past START profiles nothing; one that
stops inside the window writes what it recorded.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch.profiler import ProfilerAction, ProfilerActivity, profile

from cifar_dist.atomic import atomic_write
from cifar_dist.config import parse_step_window
from cifar_dist.engine.distributed import DistEnv

FOLDER = "profile"
TOP_OPERATORS = 30


class StepProfiler:
    def __init__(self, window: str, run_dir: Path, env: DistEnv, all_ranks: bool):
        self.window = parse_step_window(window) if window and (env.is_main or all_ranks) else None
        self.folder, self.rank, self.cuda = Path(run_dir) / FOLDER, env.rank, env.device.type == "cuda"
        self.profile: profile | None = None

    def before_step(self, global_step: int) -> None:
        """Call before each optimizer step's first micro-batch: starts recording at step START."""
        if self.window and self.profile is None and global_step == self.window[0]:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            if not self.cuda:  # a CUDA build of torch on a machine without a GPU: kineto's error line is noise
                os.environ.setdefault("KINETO_LOG_LEVEL", "5")
            # A schedule that always records, so that each step() closes a ProfilerStep span in the trace.
            self.profile = profile(activities=activities, schedule=lambda _step: ProfilerAction.RECORD)
            self.profile.start()

    def after_step(self, global_step: int) -> list[Path]:
        """Call after each optimizer step: ends the step's span; at step STOP, writes the files and returns them."""
        if self.profile is None:
            return []
        if global_step >= self.window[1]:
            return self._write()
        self.profile.step()
        return []

    def close(self) -> list[Path]:
        """The files of a window the run stopped inside, if any."""
        return self._write() if self.profile is not None else []

    def _write(self) -> list[Path]:
        recorded, self.profile = self.profile, None
        recorded.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        start, stop = self.window
        stem = f"steps_{start}-{stop}_rank{self.rank}"
        trace, table = self.folder / f"{stem}.trace.json", self.folder / f"{stem}.top_ops.txt"
        sort_by = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        text = recorded.key_averages().table(sort_by=sort_by, row_limit=TOP_OPERATORS)
        atomic_write(trace, lambda tmp: recorded.export_chrome_trace(str(tmp)), fsync=False)
        atomic_write(table, lambda tmp: tmp.write_text(text + "\n"), fsync=False)
        return [trace, table]
