"""MFU: the peak table's use (device names as torch reports them, dense figures per dtype), MFU = achieved / peak
over all devices, the FLOPs of a training step, and what a run records; wrong peaks are how MFUs pass 100%."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from cifar_dist.engine.build import resolve_peak
from cifar_dist.models.summary import training_flops_per_image
from cifar_dist.peak_flops import PEAKS, mfu, peak_tflops


@pytest.mark.parametrize("name, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989.5),  # the SXM board
    ("NVIDIA H100 80GB HBM3", "tf32", 494.5),
    ("NVIDIA H100 PCIe", "bf16", 756.5),
    ("NVIDIA H200", "bf16", 989.5),
    ("NVIDIA A100-SXM4-80GB", "tf32", 156.0),
    ("NVIDIA A100 80GB PCIe", "fp16", 312.0),
    ("NVIDIA A100-SXM4-40GB", "fp32", 19.5),
    ("NVIDIA L40S", "bf16", 362.05),
    ("NVIDIA L4", "bf16", 121.0),
    ("NVIDIA A10", "bf16", 125.0),
    ("NVIDIA GeForce RTX 4090", "bf16", 165.2),
    ("Tesla V100-SXM2-16GB", "fp16", 125.0),
    ("Tesla V100-PCIE-32GB", "fp16", 112.0),
    ("Tesla V100S-PCIE-32GB", "fp16", 130.0),
    ("Tesla T4", "fp16", 65.0),
])
def test_a_known_device_and_dtype_give_the_datasheets_dense_peak(name, dtype, expected):
    assert peak_tflops(name, dtype) == expected


@pytest.mark.parametrize("name, dtype", [
    ("AMD EPYC (2 cores)", "bf16"), ("NVIDIA H100 NVL", "bf16"), ("NVIDIA A10G", "bf16"), ("NVIDIA GH200 480GB", "bf16"),
    ("NVIDIA L40", "bf16"), ("Tesla V100-SXM2-16GB", "bf16"), ("Tesla T4", "tf32"),
])
def test_an_unknown_device_or_dtype_has_no_peak(name, dtype):
    assert peak_tflops(name, dtype) is None


def test_the_table_holds_dense_figures_that_fit_together():
    for peak in PEAKS:
        figures = peak.tflops
        assert figures["fp32"] > 0 and all(value >= figures["fp32"] for value in figures.values()), peak.label
        if "bf16" in figures:  # dense bf16 and fp16 tensor rates are equal on every board listed, and twice TF32
            assert figures["bf16"] == figures["fp16"] and figures["bf16"] == pytest.approx(2 * figures["tf32"], rel=0.02)


def test_mfu_is_achieved_over_the_peak_of_all_devices():
    assert mfu(494.75, 989.5) == 0.5
    assert mfu(494.75, 2 * 989.5) == 0.25
    assert mfu(1.0, None) is None and mfu(1.0, 0.0) is None


def test_the_plan_names_the_peak_or_says_there_is_none():
    assert resolve_peak("NVIDIA A100-SXM4-80GB", "tf32", 8) == (
        156.0, "against 156 TFLOPS per device (A100, tf32 dense, vendor datasheet) x 8")
    assert resolve_peak("Tesla T4", "tf32", 1)[0] == 8.1  # no TF32 on Turing: float32 runs as float32
    peak, words = resolve_peak("AMD EPYC (2 cores)", "fp32", 1)
    assert peak == 0.0 and words.startswith("unknown peak for AMD EPYC (2 cores)")


def test_the_peak_table_imports_without_torch():
    code = "import sys, cifar_dist.peak_flops; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_a_training_step_counts_three_forward_passes_and_the_model_keeps_its_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 30 * 30, 10)).train()
    forward = 2 * (4 * 3 * 3 * 3 * 30 * 30) + 2 * (4 * 30 * 30 * 10)  # 2 FLOPs per multiply-accumulate
    assert training_flops_per_image(model, torch.device("cpu")) == 3 * forward
    assert model.training


def test_an_epoch_record_has_its_tflops_and_mfu_against_every_device():
    from cifar_dist.engine.trainer import Trainer

    plan = SimpleNamespace(train_flops_per_image=3 * 10**9, peak_tflops=100.0, world_size=2)
    trainer = SimpleNamespace(run=SimpleNamespace(plan=plan, scheduler=SimpleNamespace(get_last_lr=lambda: [0.1])),
                              progress=SimpleNamespace(global_step=10, nonfinite_total=0),
                              env=SimpleNamespace(device=torch.device("cpu")))
    sums = {"loss": 5.0, "correct": 5, "count": 10_000, "seconds": 2.0}
    result = {"loss": 1.0, "acc": 0.5, "count": 100}
    record = Trainer._epoch_record(trainer, 1, sums, {"model": result})
    assert record["images_per_s"] == 5000 and record["tflops"] == pytest.approx(15.0)  # 3 GFLOPs × 5,000 / s
    assert record["mfu"] == pytest.approx(15.0 / 200.0)
    plan.peak_tflops = 0.0  # unknown device: no MFU at all
    assert "mfu" not in Trainer._epoch_record(trainer, 1, sums, {"model": result})
