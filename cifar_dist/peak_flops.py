"""Peak dense throughput per device and dtype, for MFU (model FLOPs utilisation = achieved / peak).

Figures are the vendors' datasheet numbers in TFLOPS *without* structured sparsity: NVIDIA's tables
mark the sparse figures with an asterisk and they are twice the dense ones; using them (or a
different board's) is the usual cause of an MFU that looks too low, and a peak that is too low the
cause of one over 100%. "tf32" is the tensor-core TF32 rate (what cuDNN uses for float32
convolutions on Ampere and later by default); "fp32" the CUDA-core rate. A device or dtype missing
here has no MFU: `peak_tflops` returns None and the run plan says so.
"""
from __future__ import annotations

import re
from typing import NamedTuple


class Peak(NamedTuple):
    pattern: str  # regular expression searched in the device name (torch.cuda.get_device_name)
    label: str
    tflops: dict  # dtype name ("bf16", "fp16", "tf32", "fp32") -> dense TFLOPS


# Ordered: the first pattern that matches a name wins, so the more specific boards come first.
PEAKS = (
    # NVIDIA H100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h100/), SXM column: FP32 67,
    # TF32 989, BF16 1,979, FP16 1,979 TFLOPS, the tensor figures "with sparsity": dense is half.
    Peak(r"H100(?!.*(PCIe|NVL))", "H100 SXM", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}),
    # Same datasheet, H100 PCIe column: FP32 51, TF32 756, BF16 1,513, FP16 1,513 (sparse).
    Peak(r"H100 PCIe", "H100 PCIe", {"bf16": 756.5, "fp16": 756.5, "tf32": 378.0, "fp32": 51.0}),
    # NVIDIA H200 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/h200/), H200 SXM column: FP32 67,
    # TF32 989, BF16 1,979, FP16 1,979 TFLOPS (sparse): the H100 SXM's compute with more memory.
    # (The NVL boards and the GH200 run other clocks and are left out: unknown rather than wrong.)
    Peak(r"(?<!G)H200(?!.*NVL)", "H200 SXM", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}),
    # NVIDIA A100 Tensor Core GPU datasheet (nvidia.com/en-us/data-center/a100/), 40 GB and 80 GB, PCIe
    # and SXM alike: FP32 19.5, TF32 156, BF16 312, FP16 312 TFLOPS dense (624 with sparsity).
    Peak(r"A100", "A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    # NVIDIA L40S datasheet: FP32 91.6, TF32 183 (366 sparse), BF16 and FP16 with FP32 accumulate
    # 362.05 (733 sparse) TFLOPS.
    Peak(r"L40S", "L40S", {"bf16": 362.05, "fp16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    # NVIDIA L4 Tensor Core GPU datasheet: FP32 30.3, TF32 120, BF16 242, FP16 242 TFLOPS (sparse).
    Peak(r"\bL4\b", "L4", {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3}),
    # NVIDIA A10 Tensor Core GPU datasheet: FP32 31.2, TF32 62.5 (125 sparse), BF16 125 (250 sparse),
    # FP16 125 (250 sparse) TFLOPS. (Not the A10G, AWS's variant, whose figures NVIDIA does not publish.)
    Peak(r"\bA10\b(?!G)", "A10", {"bf16": 125.0, "fp16": 125.0, "tf32": 62.5, "fp32": 31.2}),
    # NVIDIA Ada Lovelace architecture whitepaper, GeForce RTX 4090: FP32 82.6, TF32 82.6 (165.2 sparse),
    # BF16 and FP16 with FP32 accumulate 165.2 (330.4 sparse) TFLOPS; AMP accumulates in FP32.
    Peak(r"RTX 4090", "RTX 4090", {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6}),
    # NVIDIA V100 Tensor Core GPU datasheet: SXM2 FP32 15.7, tensor (FP16) 125; PCIe FP32 14, tensor 112;
    # V100S PCIe FP32 16.4, tensor 130 TFLOPS. No bf16 or tf32 (Volta has neither).
    Peak(r"V100S", "V100S PCIe", {"fp16": 130.0, "fp32": 16.4}),
    Peak(r"V100.*PCIE", "V100 PCIe", {"fp16": 112.0, "fp32": 14.0}),
    Peak(r"V100", "V100 SXM2", {"fp16": 125.0, "fp32": 15.7}),
    # NVIDIA T4 Tensor Core GPU datasheet: FP32 8.1, mixed precision (FP16/FP32) 65 TFLOPS; no bf16 or tf32.
    Peak(r"\bT4\b", "T4", {"fp16": 65.0, "fp32": 8.1}),
)


def find_peak(device_name: str) -> Peak | None:
    """The table's entry for a device name, or None."""
    return next((peak for peak in PEAKS if re.search(peak.pattern, device_name, re.IGNORECASE)), None)


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """Dense peak TFLOPS of one device for a dtype ("bf16", "fp16", "tf32", "fp32"); None when unknown."""
    peak = find_peak(device_name)
    return peak.tflops.get(dtype) if peak else None


def mfu(achieved_tflops: float, peak_tflops_total: float | None) -> float | None:
    """Achieved / peak (a fraction), or None without a peak; the peak is that of all devices together."""
    return achieved_tflops / peak_tflops_total if peak_tflops_total else None
