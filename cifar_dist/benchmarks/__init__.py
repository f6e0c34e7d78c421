"""Benchmarks of the input path, the training step, the framework overhead, scaling and time to accuracy.

Each module has `main(argv)`; `cifar-dist bench <name> ...` runs it (`python -m cifar_dist bench <name>` from a checkout).
Results, the GPU check script and the data packer live in the top-level `benchmarks/` folder.
"""
import importlib

from cifar_dist.errors import ConfigError

BENCHMARKS = ("loader_throughput", "train_throughput", "overhead", "scaling", "time_to_accuracy")


def run_benchmark(name: str, argv: list[str]) -> int:
    """`cifar-dist bench NAME ...`: the benchmark module's `main(argv)`, user errors as one line and exit 2."""
    from cifar_dist.benchmarks.common import run_main

    if name not in BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; benchmarks: {', '.join(BENCHMARKS)}")
    return run_main(importlib.import_module(f"cifar_dist.benchmarks.{name}").main, argv)
