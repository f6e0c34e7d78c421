"""Entry point of training: `cifar-dist train ...` and `torchrun --nproc-per-node N -m cifar_dist.train ...`."""
from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys

from cifar_dist.config import load_config
from cifar_dist.errors import ExitCode, UserError

RESUME_PREFIX_ENV = "CIFAR_DIST_COMMAND"  # how the user launched us, for the resume hint (set by launch/train)


def resume_command(config_path: str | None, overrides: list[str], run_dir) -> str:
    """One command to copy that continues the run: the same arguments with run.dir pinned."""
    prefix = shlex.split(os.environ.get(RESUME_PREFIX_ENV, "cifar-dist train"))
    kept = [o for o in overrides if not o.startswith("run.dir=")]
    return shlex.join([*prefix, *(["--config", config_path] if config_path else []), *kept, f"run.dir={run_dir}"])


def _fit(cfg, env):
    """Build the trainer and run it; (outcome, run dir). The trainer is gone when this returns."""
    from cifar_dist.engine.trainer import Trainer

    trainer = Trainer(cfg, env)
    return trainer.fit(), trainer.run_dir


def train_main(config_path: str | None, overrides: list[str]) -> int:
    """Load the config, join the process group, train; returns the exit code (see README)."""
    # cuBLAS needs this before its first call to be deterministic; harmless otherwise.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    from cifar_dist.engine.distributed import barrier, init_distributed, shutdown
    from cifar_dist.engine.stopping import ignore_late_stop_signals
    from cifar_dist.engine.trainer import Outcome

    code = ExitCode.USER_ERROR
    try:
        cfg = load_config(config_path, overrides)
        env = init_distributed(cfg.train.device)
        outcome, run_dir = _fit(cfg, env)
        ignore_late_stop_signals()
        barrier()  # no rank leaves while rank 0 still writes its last checkpoint
    except KeyboardInterrupt:  # a second Ctrl-C: abort without waiting for the other ranks
        print("cifar-dist train: aborted by a second Ctrl-C; the run folder keeps its last complete checkpoint",
              file=sys.stderr, flush=True)
        os._exit(ExitCode.INTERRUPTED)
    except UserError as err:
        print(f"cifar-dist train: error: {err}", file=sys.stderr)
    else:
        code = outcome.exit_code
        if outcome in (Outcome.PREEMPTED, Outcome.INTERRUPTED) and env.is_main:
            print(f"{outcome.description}: state saved in {run_dir}/last.pt (exit code {int(code)}).\n"
                  f"To resume: {resume_command(config_path, overrides, run_dir)}", flush=True)
    finally:
        # The DDP module holds the process group. Collect it (and the reference cycles around the
        # trainer) first, so that shutdown() really destroys the group and joins gloo's worker
        # threads while the interpreter is alive. Left to interpreter exit, a worker thread can drop
        # the last reference to a finished work item holding Python tensors after finalisation
        # began, and the process aborts ("terminate called without an active exception").
        gc.collect()
        shutdown()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifar_dist.train", description=__doc__,
                                     epilog="`cifar-dist config` lists every key with its description and default.")
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    return train_main(args.config, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
