"""Benchmarks of the input path, the training step, the framework overhead, scaling and time to accuracy.

Each module has `cli(argv)`; `cifar-dist bench <name> ...` runs it (`python -m cifar_dist bench <name>` from a checkout).
Results, the GPU check script and the data packer live in the top-level `benchmarks/` folder.
"""
BENCHMARKS = ("loader_throughput", "train_throughput", "overhead", "scaling", "time_to_accuracy")
