"""Model zoo: the registry, parameter counts, memory formats, compile, whitening init, summary."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from cifar_dist.config import ModelConfig
from cifar_dist.config import ConfigError
from cifar_dist.models import MODELS, build_model, model_options
from cifar_dist.models.summary import format_summary, summarize

MODEL_NAMES = ("attention_resnet", "fast", "resnet18")
# Small variants keep torch.compile affordable on a 2-core CI machine.
SMALL_CONFIGS = {
    "attention_resnet": ModelConfig(name="attention_resnet", width=8),
    "fast": ModelConfig(name="fast", widths=[16, 32, 32]),
    "resnet18": ModelConfig(name="resnet18"),
}
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def fast_expected_parameters(widths, num_classes=10) -> int:
    """Hand count: 24 whitening biases; per group two bias-free 3x3 convs and two BN biases; a bias-free fc."""
    total, in_channels = 2 * 3 * 2 * 2, 2 * 3 * 2 * 2
    for width in widths:
        total += 9 * in_channels * width + 9 * width * width + 2 * width
        in_channels = width
    return total + in_channels * num_classes


def small_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(SMALL_CONFIGS[name]).eval()


def images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# --- parameter counts -------------------------------------------------------------------------

def test_attention_resnet_has_reference_parameter_count():
    assert trainable_parameters(build_model(ModelConfig(name="attention_resnet"))) == 4_913_705


def test_attention_resnet_width_changes_the_count():
    assert trainable_parameters(build_model(ModelConfig(name="attention_resnet", width=16))) != 4_913_705


def test_resnet18_has_standard_parameter_count():
    assert trainable_parameters(build_model(ModelConfig(name="resnet18"))) == 11_173_962


@pytest.mark.parametrize("widths", [[64, 256, 256], [16, 32, 32]])
def test_fast_parameter_count_matches_hand_count(widths):
    model = build_model(ModelConfig(name="fast", widths=widths))
    assert trainable_parameters(model) == fast_expected_parameters(widths)


def test_fast_default_count_and_frozen_weights():
    model = build_model(ModelConfig(name="fast"))
    assert trainable_parameters(model) == 1_971_352
    assert not model.whiten.weight.requires_grad
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(not m.weight.requires_grad and m.bias.requires_grad for m in norms)
    assert all(m.momentum == pytest.approx(0.4) for m in norms)  # airbench's 0.6 is the old statistics' weight


def test_unknown_model_name_raises_naming_known_models():
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(name="vgg16"))
    assert "'model.name'" in str(err.value) and "vgg16" in str(err.value)
    assert all(name in str(err.value) for name in MODEL_NAMES)


def test_fast_rejects_wrong_number_of_widths():
    with pytest.raises(ConfigError, match="model.widths must be three"):
        build_model(ModelConfig(name="fast", widths=[64, 256]))


def test_registry_declares_each_models_options():
    assert set(MODELS) >= set(MODEL_NAMES)
    assert MODELS["fast"].options == ("widths", "bn_momentum", "scale")
    assert MODELS["attention_resnet"].options == ("width", "dropout")
    assert MODELS["resnet18"].options == ()
    # what identifies a model: only its own options, so resnet18 ignores model.width
    assert model_options(ModelConfig(name="resnet18", width=7)) == {"name": "resnet18", "num_classes": 10}
    assert model_options(ModelConfig(name="fast", width=7)) == model_options(ModelConfig(name="fast"))
    assert model_options(ModelConfig(name="fast", widths=[8, 8, 8])) != model_options(ModelConfig(name="fast"))


# --- forward: memory formats, autocast, SyncBN ------------------------------------------------

@pytest.mark.parametrize("name", MODEL_NAMES)
def test_channels_last_and_contiguous_give_the_same_logits(name):
    model = small_model(name)
    x = images()
    with torch.no_grad():
        contiguous = model(x)
        channels_last = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert contiguous.shape == channels_last.shape == (2, 10)
    assert torch.isfinite(contiguous).all() and torch.isfinite(channels_last).all()
    torch.testing.assert_close(channels_last, contiguous, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_default_models_train_step_gives_finite_logits_and_gradients(name):
    model = build_model(ModelConfig(name=name)).train().to(memory_format=torch.channels_last)
    logits = model(images(4).contiguous(memory_format=torch.channels_last))
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_autocast_forward_is_finite_and_close(name, dtype):
    model = small_model(name).to(memory_format=torch.channels_last).eval()
    inputs = images().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = model(inputs)
        with torch.autocast("cpu", dtype=dtype):
            logits = model(inputs)
    assert logits.shape == (2, 10) and logits.dtype == dtype and torch.isfinite(logits.float()).all()
    scale = reference.abs().max()
    assert (logits.float() - reference).abs().max() < 0.1 * scale  # reduced precision, same function


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_sync_batchnorm_conversion_applies(name):
    # SyncBN only runs on CUDA; here we check the conversion itself and that frozen BN scales stay frozen.
    model = build_model(SMALL_CONFIGS[name])
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert not any(type(m) is nn.BatchNorm2d for m in converted.modules())
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    assert trainable_parameters(converted) == trainable_parameters(build_model(SMALL_CONFIGS[name]))


# --- torch.compile ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODEL_NAMES)
def test_compile_has_no_graph_breaks_and_matches_eager(name):
    torch._dynamo.reset()
    model = small_model(name)
    x = images()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        torch._dynamo.reset()
        eager = model(x)
        compiled = torch.compile(model)(x)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)


# --- whitening init from real CIFAR-10 images ------------------------------------------------

def load_normalized_batch(batch_name: str, count: int) -> torch.Tensor:
    root = os.environ.get("CIFAR_DIST_DATA")
    if not root:
        pytest.fail(
            "CIFAR_DIST_DATA is not set: point it at a folder holding cifar-10-batches-py/ "
            "(e.g. CIFAR_DIST_DATA=/work/shared/data)"
        )
    path = Path(root) / "cifar-10-batches-py" / batch_name
    if not path.is_file():
        pytest.fail(f"CIFAR_DIST_DATA={root} has no {path}; expected the python-version CIFAR-10 batches there")
    with open(path, "rb") as f:
        pixels = torch.from_numpy(pickle.load(f, encoding="latin1")["data"][:count])
    x = pixels.reshape(-1, 3, 32, 32).float() / 255
    return (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)


def whitened_statistics(model: nn.Module, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Max |correlation - I| and the variances of the first 12 whitening channels over all 2x2 patches."""
    with torch.no_grad():
        outputs = model.whiten(x)[:, :12]  # the first half; the second half is its negative
    outputs = outputs.permute(0, 2, 3, 1).reshape(-1, 12).double().T
    correlation = torch.corrcoef(outputs)
    return (correlation - torch.eye(12, dtype=torch.float64)).abs().max().item(), torch.cov(outputs).diagonal()


def test_whitening_init_decorrelates_held_out_patches():
    train, held_out = load_normalized_batch("data_batch_1", 5000), load_normalized_batch("data_batch_2", 2000)
    model = build_model(ModelConfig(name="fast"))
    before, _ = whitened_statistics(model, held_out)
    model.init_from_data(train)
    after, variances = whitened_statistics(model, held_out)
    # Measured: ~0.01 after init and ~0.97 for random filters on correlated pixels.
    assert after < 0.05
    assert before > 0.5
    # Unit variance, except that the eps added to the eigenvalues shrinks the two weakest
    # directions (eigenvalues ~1e-3) by design: measured 0.80 and 0.55.
    assert ((variances[:10] - 1).abs() < 0.15).all(), variances
    assert ((variances > 0.3) & (variances < 1.15)).all(), variances
    weight = model.whiten.weight
    torch.testing.assert_close(weight[12:], -weight[:12])


# --- summary ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODEL_NAMES)
def test_summary_counts(name):
    cfg = ModelConfig(name=name)
    info = summarize(cfg, batch_size=4)
    assert info["parameters"] == trainable_parameters(build_model(cfg))
    assert info["flops_per_image"] > 0
    # At least weights and their gradients are held at the peak of a training step.
    assert info["peak_memory_bytes"] > 2 * 4 * info["parameters"]
    text = format_summary(cfg, info)
    assert name in text and f"{info['parameters']:,}" in text


def test_resnet18_flops_match_published_figure():
    # ~0.56 GMACs per 32x32 image; FlopCounterMode counts 2 FLOPs per multiply-accumulate.
    flops = summarize(ModelConfig(name="resnet18"), batch_size=2)["flops_per_image"]
    assert abs(flops - 1.11e9) / 1.11e9 < 0.10


def test_peak_memory_grows_with_batch_size():
    cfg = ModelConfig(name="fast", widths=[16, 32, 32])
    assert summarize(cfg, batch_size=16)["peak_memory_bytes"] > summarize(cfg, batch_size=4)["peak_memory_bytes"]
