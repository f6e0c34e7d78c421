"""Entry point of training: `cifar-dist train ...` and `torchrun --nproc-per-node N -m cifar_dist.train ...`."""
from __future__ import annotations

import argparse
import os
import sys

from cifar_dist.config import ConfigError, load_config
from cifar_dist.data.cifar import DataError


def train_main(config_path: str | None, overrides: list[str]) -> int:
    """Load the config, join the process group, train; returns the exit code (see README)."""
    # cuBLAS needs this before its first call to be deterministic; harmless otherwise.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    from cifar_dist.engine.checkpoint import CheckpointError
    from cifar_dist.engine.distributed import barrier, init_distributed, shutdown
    from cifar_dist.engine.trainer import Trainer

    try:
        cfg = load_config(config_path, overrides)
        env = init_distributed(cfg.train.device)
        try:
            code = Trainer(cfg, env).fit()
            barrier()  # no rank leaves while rank 0 still writes its last checkpoint
            return code
        finally:
            shutdown()
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"cifar-dist train: error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cifar_dist.train", description=__doc__)
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    return train_main(args.config, args.overrides)


if __name__ == "__main__":
    sys.exit(main())
