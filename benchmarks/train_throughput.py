"""`python benchmarks/train_throughput.py ...` runs `cifar-dist bench train_throughput ...` from a checkout; the code is in
cifar_dist/bench/train_throughput.py (`--help` describes it)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cifar_dist.bench.train_throughput import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
