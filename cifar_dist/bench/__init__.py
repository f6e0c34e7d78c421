"""Benchmarks of the input path, the training step, the framework overhead, scaling and time to accuracy.

Each module has `cli(argv)`; `cifar-dist bench <name> ...` and `python benchmarks/<name>.py ...` run it.
"""
BENCHMARKS = ("loader_throughput", "train_throughput", "overhead", "scaling", "time_to_accuracy")
