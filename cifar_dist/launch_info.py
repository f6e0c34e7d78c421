"""Small queries the shell launchers make about a command line's config."""
from __future__ import annotations

import argparse

from cifar_dist.config import load_config


def loader_of(argv: list[str]) -> str:
    """data.loader of `[--config FILE] [key=value ...]`."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--config")
    args, overrides = parser.parse_known_args(argv)
    return load_config(args.config, overrides).data.loader
