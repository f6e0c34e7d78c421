"""Small queries the shell launchers make about a command line's config.

`python -m cifar_dist.launch.preflight loader [--config FILE] [key=value ...]` checks the config as the
trainer will (keys, model name and options, what the loader supports, wandb credentials) and prints
data.loader, or the error and exit code 2, so a launcher stops before starting any worker.
"""
from __future__ import annotations

import argparse
import sys

from cifar_dist.config import load_config
from cifar_dist.errors import ExitCode, UserError
from cifar_dist.outputs import check_writable


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("query", choices=["loader"])
    parser.add_argument("--config")
    args, overrides = parser.parse_known_args(argv)
    try:
        from cifar_dist.engine.build import preflight
        from cifar_dist.engine.run_log.wandb_sink import check_wandb

        cfg = load_config(args.config, overrides)
        if cfg.run.dir:
            check_writable(cfg.run.dir, "run.dir", folder=True)
        preflight(cfg)
        check_wandb(cfg.logging.wandb)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return ExitCode.USER_ERROR
    print(cfg.data.loader)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
