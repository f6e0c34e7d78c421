"""Every benchmark runs end to end with --quick and writes the outputs it promises; the data packer is
lossless and keeps to its budget; gpu_check.sh refuses to start without what it needs.

Speeds are only checked to be positive: the goals are for the benchmarks' output, not for tests.
Each script runs on a 1,000/200-image synthetic copy, so the tests exercise the scripts, not the machine.
"""
import os
import re
import subprocess
import sys
import zipfile

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, balanced_labels, id_images, run_cli, write_batches_folder

SMALL = "data.require_full_size=false"


def run_script(name: str, *args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """`python -m cifar_dist bench NAME ...` from the checkout."""
    return subprocess.run([sys.executable, "-m", "cifar_dist", "bench", name, *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def run_pack_data(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "pack_data.py"), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def bench_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench") / "data"
    write_batches_folder(root, id_images(1000), balanced_labels(1000), id_images(200, seed=1), balanced_labels(200))
    return root


def results_of(results, name: str) -> tuple[pd.DataFrame, str, set]:
    """(CSV, markdown, file names) of one benchmark in the single <hardware>-<date> folder under results."""
    folders = list(results.iterdir())
    assert len(folders) == 1 and re.fullmatch(r"[a-z0-9-]+-\d+c-\d{4}-\d\d-\d\d", folders[0].name), folders
    files = {p.name for p in folders[0].iterdir()}
    return pd.read_csv(folders[0] / f"{name}.csv"), (folders[0] / f"{name}.md").read_text(), files


def assert_ran(result: subprocess.CompletedProcess, name: str, extra_files=()) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.search(rf"^wrote .*/{name}\.csv, .*{name}\.md, .*{name}\.png$", result.stdout, re.MULTILINE), result.stdout


def check_markdown(markdown: str, name: str, columns: list[str]) -> None:
    assert "- hardware: " in markdown and "GPU: none" in markdown and "- date: " in markdown
    assert f"- command: `cifar-dist bench {name} " in markdown and f"![{name}]({name}.png)" in markdown
    assert "| " + " | ".join(columns) + " |" in markdown


def test_loader_throughput_covers_loaders_augmentations_and_workers(bench_data, tmp_path):
    result = run_script("loader_throughput", "--quick", "--device", "cpu", "--data-root", bench_data,
                        "--beton-dir", tmp_path / "beton", "--results", tmp_path / "results",
                        "--augment", "none,reference+mix", SMALL)  # two of the four sets keep the test short
    assert_ran(result, "loader_throughput")
    frame, markdown, files = results_of(tmp_path / "results", "loader_throughput")
    assert files == {"loader_throughput.csv", "loader_throughput.md", "loader_throughput.png"}  # no temporaries
    sets = ["none", "reference+mix"]
    expected = [(loader, workers, s) for loader, counts in (("torchvision", [1, 2]), ("ffcv", [1, 2]), ("gpu", [0]))
                for workers in counts for s in sets]
    assert list(zip(frame.loader, frame.workers, frame.augment)) == expected
    assert (frame.images >= 256).all() and (frame.images_per_s > 0).all() and (frame.seconds > 0).all()
    assert {"cpu_model", "cpu_cores", "torch_threads", "gpu", "torch", "batch_size"} <= set(frame.columns)
    baseline = frame[(frame.loader == "torchvision") & (frame.workers == 2)]
    assert (baseline.vs_torchvision == 1.0).all()
    check_markdown(markdown, "loader_throughput", ["loader", "augment", "workers", "images", "seconds",
                                                   "images_per_s", "vs_torchvision"])


def test_train_throughput_runs_every_toggle_through_the_cli(bench_data, tmp_path):
    result = run_cli("bench", "train_throughput", "--quick", "--models", "fast", "--device", "cpu",
                     "--data-root", bench_data, "--results", tmp_path, SMALL)
    assert_ran(result, "train_throughput")
    frame, markdown, _ = results_of(tmp_path, "train_throughput")
    toggles = ["baseline", "channels_last=off", "amp=bf16", "amp=fp16", "ema=on", "mixup_cutmix=on", "sync_bn=on",
               "recipe"]  # compile=on is left out of --quick on the CPU (a cold compile takes a minute)
    assert list(frame.toggle) == toggles and set(frame.model) == {"fast"}
    measured = frame[frame.toggle != "sync_bn=on"]
    assert (measured.images_per_s > 0).all() and (measured.step_ms > 0).all() and measured.peak_memory_mb.isna().all()
    assert (measured.batch == 32).all() and (measured.steps == 2).all()
    flops_per_image = measured.tflops * 1e12 / measured.images_per_s  # the same model in every row
    assert flops_per_image.min() > 0 and flops_per_image.max() == pytest.approx(flops_per_image.min(), rel=1e-9)
    assert measured.mfu.isna().all()  # no known peak for a CPU
    assert list(measured.amp) == ["off", "off", "bfloat16", "float16", "off", "off", "bfloat16"]
    assert list(measured.grad_scaler) == [False, False, False, True, False, False, False]
    assert list(measured.channels_last) == [True, False, True, True, True, True, True]
    assert measured.ema.iloc[0] == "off" and measured.ema.iloc[4].startswith("decay 0.95 every 5")
    assert list(measured.mixup_cutmix) == ["0.0/0.0"] * 5 + ["0.3/0.3", "0.0/0.0"]
    sync = frame[frame.toggle == "sync_bn=on"].iloc[0]
    assert np.isnan(sync.images_per_s) and "CUDA only" in sync.note
    assert frame.vs_baseline.iloc[0] == 1.0
    check_markdown(markdown, "train_throughput", ["model", "toggle", "images_per_s", "vs_baseline", "step_ms",
                                                  "tflops", "mfu", "peak_memory_mb", "note"])
    assert "warm-up epoch" in markdown


def test_overhead_reports_the_ratio_and_its_spread_per_model(bench_data, tmp_path):
    result = run_script("overhead", "--quick", "--device", "cpu", "--data-root", bench_data,
                        "--results", tmp_path, SMALL)
    assert_ran(result, "overhead")
    frame, markdown, _ = results_of(tmp_path, "overhead")
    assert list(frame.model) == ["fast", "attention_resnet"]
    for row in frame.itertuples():
        for ratios, low, middle, high in ((row.ratios, row.ratio_min, row.ratio_median, row.ratio_max),
                                          (row.epoch_ratios, row.epoch_ratio_min, row.epoch_ratio_median,
                                           row.epoch_ratio_max)):  # the steps, the whole epoch
            ratios = [float(r) for r in ratios.split()]
            assert len(ratios) == 3 and min(ratios) == pytest.approx(low, abs=1e-3)
            assert low <= middle <= high and low > 0
        assert row.trainer_images_per_s > 0 and row.bare_images_per_s > 0 and (row.batch, row.steps) == (32, 3)
    assert list(frame.widths) == ["widths [8, 16, 16]", "width 4"]
    assert frame.ema.iloc[0].startswith("decay 0.95 every 5")  # fast.yaml's EMA, on both sides
    check_markdown(markdown, "overhead", ["model", "widths", "batch", "amp", "compile", "ema", "ratio_median",
                                          "ratio_min", "ratio_max", "epoch_ratio_median", "trainer_images_per_s",
                                          "bare_images_per_s"])
    assert "torch.save of the same state" in markdown


def test_timed_epochs_write_no_checkpoint_and_the_bare_loop_does_the_recipes_work(bench_data, tmp_path):
    import torch

    from cifar_dist.benchmarks.common import QUIET_RUN, bench_config, quiet_trainer, time_epoch
    from cifar_dist.benchmarks.overhead import BareLoop
    from cifar_dist.engine.build import build_run
    from cifar_dist.engine.distributed import DistEnv

    assert "train.checkpoint_interval_min=0" in QUIET_RUN
    overrides = [SMALL, "model.widths=[8,16,16]", "train.global_batch_size=64", "data.train_subset=256",
                 "train.checkpoint_interval_min=1e-6"]  # the timer due at every step: still nothing written
    cfg = bench_config(REPO / "configs" / "smoke.yaml", str(bench_data), overrides, [f"run.dir={tmp_path / 'run'}"])
    with quiet_trainer(cfg, DistEnv()) as trainer:
        assert time_epoch(trainer) > 0 and trainer.progress.global_step == 4
    assert not list((tmp_path / "run").glob("*.pt"))

    bare = BareLoop(build_run(cfg, DistEnv()), cfg, tmp_path / "bare.pt")
    ema_before = {key: value.clone() for key, value in bare.run.ema.module.state_dict().items()}
    assert bare.epoch(whole=True) > 0 and bare.global_step == 4
    assert any(not torch.equal(value, ema_before[key]) for key, value in bare.run.ema.module.state_dict().items())
    assert {"model", "ema", "optimizer", "scheduler", "scaler"} <= torch.load(tmp_path / "bare.pt").keys()


def test_loader_windows_leave_out_what_the_workers_prefetched(bench_data):
    from cifar_dist.benchmarks.loader_throughput import prefetch_depth
    from cifar_dist.config import load_config
    from cifar_dist.engine.build import build_train_input
    from cifar_dist.engine.distributed import DistEnv

    def depth(*overrides) -> int:
        cfg = load_config(None, [f"data.root={bench_data}", SMALL, "data.download=false", *overrides])
        return prefetch_depth(build_train_input(cfg, DistEnv(), 32)[0])

    assert depth("data.loader=torchvision", "data.num_workers=2") == 4  # DataLoader: workers × prefetch_factor 2
    assert depth("data.loader=gpu") == 0


def test_scaling_runs_one_and_two_ranks_weak_and_strong(bench_data, tmp_path):
    result = run_script("scaling", "--quick", "--device", "cpu", "--data-root", bench_data,
                        "--results", tmp_path, SMALL)
    assert_ran(result, "scaling")
    frame, markdown, _ = results_of(tmp_path, "scaling")
    assert list(zip(frame["mode"], frame.ranks, frame.per_rank_batch, frame.global_batch)) == [
        ("weak", 1, 32, 32), ("strong", 1, 32, 32), ("weak", 2, 32, 64), ("strong", 2, 16, 32)]
    assert (frame.total_images_per_s > 0).all()
    assert np.allclose(frame.per_rank_images_per_s, frame.total_images_per_s / frame.ranks)
    assert list(frame.efficiency[frame.ranks == 1]) == [1.0, 1.0]
    assert not frame.sync_bn.any()  # SyncBN needs CUDA
    assert "not a speed-up" in result.stdout and "not a speed-up" in markdown


def test_time_to_accuracy_reports_runs_and_the_timed_region(bench_data, tmp_path):
    result = run_script("time_to_accuracy", "--quick", "--device", "cpu", "--data-root", bench_data,
                        "--results", tmp_path, SMALL)
    assert_ran(result, "time_to_accuracy")
    frame, markdown, files = results_of(tmp_path, "time_to_accuracy")
    assert "time_to_accuracy_runs.csv" in files
    row = frame.iloc[0]
    assert (row.runs, row.train_images, row.eval_split, row.target) == (2, 256, "val", 0.1)
    assert 0 <= row.reached_fraction <= 1 and row.read_s > 0
    runs = pd.read_csv(tmp_path / next(iter(os.listdir(tmp_path))) / "time_to_accuracy_runs.csv")
    assert list(runs.seed) == [0, 1] and (runs.epochs == 2).all() and (runs.time_s > 0).all()  # the whole run
    assert (runs.reached == (runs.acc >= 0.1)).all() and row.acc_mean == pytest.approx(runs.acc.mean())
    assert "untimed warm-up run" in result.stdout
    assert "minus reading the data from disk" in markdown and "TTA" in markdown


def test_bench_errors_are_one_line_with_exit_code_2(bench_data, tmp_path, capsys, monkeypatch):
    from cifar_dist.cli import main

    monkeypatch.delenv("CIFAR_DIST_DATA", raising=False)
    assert main(["bench", "overhead", "--quick"]) == 2
    err = capsys.readouterr().err
    assert "--data-root DIR or set CIFAR_DIST_DATA" in err and len(err.strip().splitlines()) == 1
    common = ["bench", "train_throughput", "--quick", "--data-root", str(bench_data), "--results", str(tmp_path)]
    assert main([*common, "--models", "fast,nope"]) == 2
    assert "--models takes a comma-separated subset of attention_resnet, fast, resnet18; got nope" in capsys.readouterr().err
    assert main([*common, "train.epochz=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.epochz'" in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing written


def test_pack_data_is_lossless_balanced_and_within_budget(tmp_path):
    from cifar_dist.data.cifar import load_cifar10

    def read_back(root):
        return load_cifar10(root, download=False, require_full_size=False)

    images, labels = id_images(1000), np.repeat(np.arange(10), 100)  # sorted by class: 100 of class 0 first
    write_batches_folder(tmp_path / "data", images, labels, id_images(200, seed=1), balanced_labels(200))
    out = tmp_path / "packed" / "cifar10.npz"
    result = run_pack_data("pack", "--data-root", tmp_path / "data", "--out", out, "--max-mib", "1.5")
    assert result.returncode == 0, result.stderr
    assert 0 < out.stat().st_size <= 1.5 * 2**20 and sorted(os.listdir(out.parent)) == ["cifar10.npz"]
    assert {info.compress_type for info in zipfile.ZipFile(out).infolist()} == {zipfile.ZIP_LZMA}
    packed = read_back(out.parent)
    count = len(packed.y_train)
    # Random bytes do not compress: about (1.5 MiB - 200 test images) / 3,072 bytes fit, a multiple of 10.
    assert count % 10 == 0 and 300 <= count <= 310 and f"{count:,} training images" in result.stdout
    chosen = [100 * cls + k for k in range(count // 10) for cls in range(10)]  # each class in turn
    assert np.array_equal(packed.x_train, images[chosen]) and np.array_equal(packed.y_train, labels[chosen])
    assert np.array_equal(packed.x_test, id_images(200, seed=1)) and np.array_equal(packed.y_test, balanced_labels(200))

    plain = tmp_path / "plain" / "cifar10.npz"
    assert run_pack_data("unpack", out, plain).returncode == 0
    unpacked = read_back(plain.parent)
    assert {info.compress_type for info in zipfile.ZipFile(plain).infolist()} == {zipfile.ZIP_STORED}
    assert all(np.array_equal(getattr(unpacked, k), getattr(packed, k)) for k in ("x_train", "y_train", "x_test", "y_test"))

    tight = run_pack_data("pack", "--data-root", tmp_path / "data", "--out", tmp_path / "tight" / "c.npz",
                       "--max-mib", "0.5")
    assert tight.returncode == 2 and "the test set alone packs to 0.6 MiB" in tight.stderr
    assert not any((tmp_path / "tight").iterdir())


def test_gpu_check_says_what_is_missing_before_it_starts(tmp_path):
    script = ["bash", str(REPO / "benchmarks" / "gpu_check.sh")]
    env = {**os.environ, "PYTHON": sys.executable}
    missing = subprocess.run(script, capture_output=True, text=True, timeout=120,
                             env={**env, "GPU_CHECK_DATA": str(tmp_path / "none.npz")})
    assert missing.returncode == 2 and "no packed data at" in missing.stderr and "pack_data.py pack" in missing.stderr
    (tmp_path / "c.npz").write_bytes(b"")
    no_gpu = subprocess.run(script, capture_output=True, text=True, timeout=120,
                            env={**env, "GPU_CHECK_DATA": str(tmp_path / "c.npz")})
    assert no_gpu.returncode == 2 and "torch sees no CUDA device" in no_gpu.stderr
    assert "GPU_CHECK_ALLOW_CPU=1" in no_gpu.stderr
