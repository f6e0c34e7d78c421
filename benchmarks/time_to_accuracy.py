"""`python benchmarks/time_to_accuracy.py ...` runs `cifar-dist bench time_to_accuracy ...` from a checkout; the code is in
cifar_dist/bench/time_to_accuracy.py (`--help` describes it)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cifar_dist.bench.time_to_accuracy import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
