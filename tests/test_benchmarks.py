"""The loader throughput benchmark runs end to end on real data and reports what it measured.

Speeds are only checked to be positive: the goals are for the benchmark's output, not for tests.
"""
import csv
import os
import re
import subprocess
import sys

from conftest import REPO

SCRIPT = REPO / "benchmarks" / "loader_throughput.py"
LOADERS = ["torchvision", "ffcv", "gpu"]


def run_benchmark(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env if env is not None else dict(os.environ))


def test_quick_benchmark_writes_three_rows_and_prints_the_table(real_data_root, tmp_path):
    csv_path = tmp_path / "results" / "loader_throughput.csv"
    result = run_benchmark("--data-root", real_data_root, "--beton-dir", tmp_path / "beton",
                           "--csv", csv_path, "--quick", "--device", "cpu")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert {"timestamp", "cpu_model", "cpu_cores", "torch_threads", "gpu"} <= set(reader.fieldnames)
    assert [row["loader"] for row in rows] == LOADERS
    for row in rows:
        assert float(row["images_per_s"]) > 0 and int(row["images"]) >= 2048, row
        assert float(row["seconds"]) > 0 and int(row["cpu_cores"]) >= 1 and row["timestamp"], row
    assert float(rows[0]["ratio_vs_torchvision"]) == 1.0
    assert [p.name for p in csv_path.parent.iterdir()] == [csv_path.name]  # no temporary left behind

    table_rows = re.findall(r"^(\w+)\s+(\d+)\s+[\d.]+\s+(\d+)\s+[\d.]+x$", result.stdout, flags=re.MULTILINE)
    assert [name for name, _, _ in table_rows] == LOADERS, result.stdout
    assert all(int(rate) > 0 for _, _, rate in table_rows)
    assert "hardware:" in result.stdout and "untimed" in result.stdout


def test_benchmark_without_data_root_says_how_to_give_one():
    env = {key: value for key, value in os.environ.items() if key != "CIFAR_DIST_DATA"}
    result = run_benchmark("--quick", env=env, timeout=120)
    assert result.returncode == 2
    assert "--data-root" in result.stderr and "CIFAR_DIST_DATA" in result.stderr
