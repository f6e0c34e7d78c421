"""Model zoo: the registry, parameter counts, memory formats, compile, whitening init, summary."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from cifar_dist.config import ModelConfig
from cifar_dist.errors import ConfigError
from cifar_dist.models import MODELS, build_model, model_identity
from cifar_dist.models.summary import format_summary, summarize

MODEL_NAMES = ("attention_resnet", "fast", "resnet18")
# Small variants keep torch.compile affordable on a 2-core CI machine.
SMALL_CONFIGS = {
    "attention_resnet": ModelConfig(name="attention_resnet", options={"width": 8}),
    "fast": ModelConfig(name="fast", options={"widths": [16, 32, 32]}),
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


def test_resnet18_has_standard_parameter_count():
    assert trainable_parameters(build_model(ModelConfig(name="resnet18"))) == 11_173_962


@pytest.mark.parametrize("widths", [[64, 256, 256], [16, 32, 32]])
def test_fast_parameter_count_matches_hand_count(widths):
    model = build_model(ModelConfig(name="fast", options={"widths": widths}))
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


def test_fast_activation_and_head_init_keys():
    silu = build_model(ModelConfig(name="fast", options={"activation": "silu", "head_init_std": 1.0}))
    groups = [m for m in silu.modules() if type(m).__name__ == "ConvGroup"]
    assert len(groups) == 3 and all(isinstance(g.activation, nn.SiLU) for g in groups)
    assert isinstance(silu.activation, nn.GELU)  # after the whitening conv, as both records
    assert silu.fc.weight.std().item() == pytest.approx(1.0, rel=1e-5)  # airbench94_muon's head
    default = build_model(ModelConfig(name="fast"))
    assert all(isinstance(g.activation, nn.GELU) for g in default.modules() if type(g).__name__ == "ConvGroup")
    assert default.fc.weight.std().item() < 0.1  # torch's init: about 1 / sqrt(3 · 256)


def test_fast_rejects_wrong_number_of_widths():
    with pytest.raises(ConfigError, match="config key 'model.widths' must be three positive integers"):
        build_model(ModelConfig(name="fast", options={"widths": [64, 256]}))


def test_registry_declares_each_models_options():
    assert set(MODELS) >= set(MODEL_NAMES)
    assert MODELS["fast"].option_names == ("widths", "bn_momentum", "scale", "activation", "head_init_std")
    assert MODELS["attention_resnet"].option_names == ("width", "dropout")
    assert MODELS["resnet18"].option_names == ()
    # what identifies a model: only its own options, so resnet18 ignores model.width
    assert model_identity(ModelConfig(name="resnet18", options={"width": 7})) == {"name": "resnet18", "num_classes": 10}
    assert model_identity(ModelConfig(name="fast", options={"width": 7})) == model_identity(ModelConfig(name="fast"))
    assert model_identity(ModelConfig(name="fast", options={"widths": [8, 8, 8]})) != model_identity(ModelConfig(name="fast"))


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

def load_normalized_batch(root: Path, batch_name: str, count: int) -> torch.Tensor:
    from cifar_dist.data.cifar import load_pickle_bytes

    path = root / "cifar-10-batches-py" / batch_name
    pixels = torch.from_numpy(load_pickle_bytes(path.read_bytes(), str(path))["data"][:count])
    x = pixels.reshape(-1, 3, 32, 32).float() / 255
    return (x - torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR_STD).view(1, 3, 1, 1)


def whitened_statistics(model: nn.Module, x: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Max |correlation - I| and the variances of the first 12 whitening channels over all 2x2 patches."""
    with torch.no_grad():
        outputs = model.whiten(x)[:, :12]  # the first half; the second half is its negative
    outputs = outputs.permute(0, 2, 3, 1).reshape(-1, 12).double().T
    correlation = torch.corrcoef(outputs)
    return (correlation - torch.eye(12, dtype=torch.float64)).abs().max().item(), torch.cov(outputs).diagonal()


def test_whitening_init_decorrelates_held_out_patches(real_data_root):
    train, held_out = load_normalized_batch(real_data_root, "data_batch_1", 5000), load_normalized_batch(real_data_root, "data_batch_2", 2000)
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


def test_whitening_keeps_its_weakest_directions_under_bf16_autocast(real_data_root):
    train, held_out = load_normalized_batch(real_data_root, "data_batch_1", 5000), load_normalized_batch(real_data_root, "data_batch_2", 500)
    model = build_model(ModelConfig(name="fast"))
    model.init_from_data(train)
    with torch.no_grad():
        exact = torch.nn.functional.conv2d(held_out.double(), model.whiten.weight.double(),
                                           model.whiten.bias.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs = model.whiten(held_out)
    assert outputs.dtype == torch.float32
    # Relative rms error of the weakest direction (channel 11): measured 0.058 with the conv in bf16.
    error = (outputs.double() - exact)[:, 11].pow(2).mean().sqrt() / exact[:, 11].pow(2).mean().sqrt()
    assert error < 1e-5, error


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
    cfg = ModelConfig(name="fast", options={"widths": [16, 32, 32]})
    assert summarize(cfg, batch_size=16)["peak_memory_bytes"] > summarize(cfg, batch_size=4)["peak_memory_bytes"]


# --- the attention block, pinned against an independent reference ------------------------------

class RefChannelAttention(nn.Module):
    """x · (σ(MLP(avg-pool x)) + σ(MLP(max-pool x))), MLP = 1x1 conv C→C/r, ReLU, 1x1 conv C/r→C, no bias,
    r = max(C // 16, 4); or, as wrong variants: σ(MLP(avg) + MLP(max))."""

    def __init__(self, channels: int, sigmoid_of_sum: bool = False):
        super().__init__()
        hidden = channels // max(channels // 16, 4)
        self.fc1 = nn.Conv2d(channels, hidden, 1, bias=False)
        self.fc2 = nn.Conv2d(hidden, channels, 1, bias=False)
        self.sigmoid_of_sum = sigmoid_of_sum

    def forward(self, x):
        def mlp(v):
            return self.fc2(torch.relu(self.fc1(v)))

        avg, peak = mlp(x.mean(dim=(2, 3), keepdim=True)), mlp(x.amax(dim=(2, 3), keepdim=True))
        return x * (torch.sigmoid(avg + peak) if self.sigmoid_of_sum else torch.sigmoid(avg) + torch.sigmoid(peak))


class RefSpatialAttention(nn.Module):
    """x · σ(7x7 conv of [channel-mean, channel-max]), no bias."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3, bias=False)

    def forward(self, x):
        return x * torch.sigmoid(self.conv(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)))


class RefBlock(nn.Module):
    """relu(attention(bn(conv(relu(bn(conv x))))) + shortcut x), attention = spatial ∘ channel."""

    def __init__(self, cin: int, cout: int, stride: int, swap: bool = False, sigmoid_of_sum: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.ca = RefChannelAttention(cout, sigmoid_of_sum)
        self.sa = RefSpatialAttention()
        self.swap = swap
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) \
            if stride != 1 or cin != cout else None

    def forward(self, x):
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        out = self.ca(self.sa(out)) if self.swap else self.sa(self.ca(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class RefAttentionResNet(nn.Module):
    """Stem 3x3 conv; stages 2/4/8/8 × width with strides 1/2/2/1, two blocks each; 1x1 conv head;
    average pool; dropout; linear."""

    def __init__(self, width: int = 31, **variant):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        blocks, cin = [], width
        for multiplier, stride in zip((2, 4, 8, 8), (1, 2, 2, 1)):
            blocks += [RefBlock(cin, width * multiplier, stride, **variant),
                       RefBlock(width * multiplier, width * multiplier, 1, **variant)]
            cin = width * multiplier
        self.blocks = nn.Sequential(*blocks)
        self.extra_conv, self.extra_bn = nn.Conv2d(cin, cin, 1, bias=False), nn.BatchNorm2d(cin)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        x = self.blocks(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.relu(self.extra_bn(self.extra_conv(x))).mean(dim=(2, 3)))


def copy_by_order(source: nn.Module, target: nn.Module) -> None:
    """Copy every tensor of source's state dict into target's, in registration order, shapes checked."""
    pairs = list(zip(source.state_dict().values(), target.state_dict().values(), strict=True))
    with torch.no_grad():
        for src, dst in pairs:
            assert src.shape == dst.shape
            dst.copy_(src)


def test_attention_resnet_matches_the_reference_formula():
    torch.manual_seed(0)
    ours = build_model(ModelConfig(name="attention_resnet")).eval()
    with torch.no_grad():  # BN statistics away from their defaults, so that they matter
        for module in ours.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    reference = RefAttentionResNet().eval()
    assert trainable_parameters(reference) == 4_913_705  # the reference project's count, from the formula
    assert trainable_parameters(RefAttentionResNet(16)) == trainable_parameters(
        build_model(ModelConfig(name="attention_resnet", options={"width": 16})))
    copy_by_order(ours, reference)
    x = images(4)
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-5)
        for wrong in (RefAttentionResNet(swap=True), RefAttentionResNet(sigmoid_of_sum=True)):
            copy_by_order(ours, wrong.eval())
            assert (wrong(x) - expected).abs().max() > 1e-3  # the test tells these variants apart
