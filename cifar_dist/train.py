"""Entry point of training: `cifar-dist train ...` and `torchrun --nproc-per-node N -m cifar_dist.train ...`."""
from __future__ import annotations

import argparse
import gc
import os
import shlex
import sys

from cifar_dist.config import load_config, with_absolute_paths
from cifar_dist.errors import ExitCode, UserError, one_line

RESUME_PREFIX_ENV = "CIFAR_DIST_COMMAND"  # how the user launched us, for the resume hint (set by launch/train)


def resume_command(config_path: str | None, overrides: list[str], run_dir) -> str:
    """One command to copy that continues the run: the same arguments with run.dir pinned."""
    prefix = shlex.split(os.environ.get(RESUME_PREFIX_ENV, "cifar-dist train"))
    kept = [o for o in overrides if not o.startswith(("run.dir=", "train.resume="))]  # resume: auto
    return shlex.join([*prefix, *(["--config", config_path] if config_path else []), *kept, f"run.dir={run_dir}"])


def _train(cfg, env, config_path: str | None, overrides: list[str]) -> int:
    """Build the trainer, run it and print its last line while train.log still copies the console; the exit
    code. The trainer is gone when this returns."""
    from cifar_dist.engine.distributed import barrier
    from cifar_dist.engine.stopping import ignore_late_stop_signals
    from cifar_dist.engine.trainer import Trainer

    trainer = Trainer(cfg, env)
    try:
        outcome = trainer.fit()
        ignore_late_stop_signals()
        barrier()  # no rank leaves while rank 0 still writes its last checkpoint
        if env.is_main:
            print(last_line(outcome, int(outcome.exit_code), trainer.run_dir, config_path, overrides), flush=True)
        return outcome.exit_code
    except UserError as err:
        print(f"cifar-dist train: error: {err} (the run's files are in {trainer.run_dir})", file=sys.stderr,
              flush=True)
        return ExitCode.USER_ERROR
    except Exception as err:
        print(f"cifar-dist train: crashed: {type(err).__name__}: {one_line(err)} (the run's files are in "
              f"{trainer.run_dir}; the traceback follows)", file=sys.stderr, flush=True)
        raise
    finally:
        trainer.close()


def last_line(outcome, code: int, run_dir, config_path: str | None, overrides: list[str]) -> str:
    """What a run's console ends with: how it ended, where its files are, how to go on."""
    from cifar_dist.engine.trainer import Outcome

    if outcome in (Outcome.PREEMPTED, Outcome.INTERRUPTED, Outcome.MAX_STEPS):
        again = [o for o in overrides if not o.startswith("train.max_steps=")] if outcome is Outcome.MAX_STEPS \
            else overrides
        return (f"{outcome.description}: state saved in {run_dir}/last.pt (exit code {code}).\n"
                f"To resume: {resume_command(config_path, again, run_dir)}")
    if outcome is Outcome.DIVERGED:
        return f"{outcome.description}: the run folder {run_dir} keeps its last good last.pt (exit code {code})"
    return f"{outcome.description}: the run's files are in {run_dir} (exit code {code})"


def train_main(config_path: str | None, overrides: list[str]) -> int:
    """Load the config, join the process group, train; returns the exit code (see README)."""
    # cuBLAS needs this before its first call to be deterministic; harmless otherwise.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    from cifar_dist.engine.distributed import init_distributed, shutdown

    code = ExitCode.USER_ERROR
    try:
        cfg = with_absolute_paths(load_config(config_path, overrides))
        env = init_distributed(cfg.train.device)
        code = _train(cfg, env, config_path, overrides)
    except KeyboardInterrupt:  # a second Ctrl-C: abort without waiting for the other ranks
        print("cifar-dist train: aborted by a second Ctrl-C; the run folder keeps its last complete checkpoint",
              file=sys.stderr, flush=True)
        os._exit(ExitCode.INTERRUPTED)
    except UserError as err:
        print(f"cifar-dist train: error: {err}", file=sys.stderr)
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
