"""Engine pieces on their own: EMA, LR schedule, weight-decay groups, TTA, checkpoint keys."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cifar_dist.engine.ema import EMA
from cifar_dist.engine.evaluation import evaluate, tta_logits
from cifar_dist.engine.trainer import lr_factor, parameter_groups, per_rank_batch_size, resolve_sync_bn
from cifar_dist.config import ConfigError


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))


def test_ema_warmup_every_and_lookahead():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema = EMA(model, decay=0.9, every=2, warmup_steps=4)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model, step=1)  # not a multiple of every: no update
    assert ema.module.weight.item() == 1.0 and ema.num_updates == 0
    ema.update(model, step=2)  # warm-up: decay 0 at the first update, so the EMA copies the model
    assert ema.module.weight.item() == 3.0
    with torch.no_grad():
        model.weight.fill_(7.0)
    ema.update(model, step=4)  # decay min(0.9, 1/4)=0.25, applied as 0.25**2 over the two steps
    assert ema.module.weight.item() == pytest.approx(0.25**2 * 3 + (1 - 0.25**2) * 7)
    lookahead = EMA(model, decay=0.5, lookahead=True)
    with torch.no_grad():
        model.weight.fill_(9.0)
    lookahead.update(model, step=1)
    assert model.weight.item() == lookahead.module.weight.item() == pytest.approx(8.0)


def test_lr_schedules():
    cosine = [lr_factor(s, 100, 10, "cosine", 0.2, 0.0) for s in range(100)]
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == pytest.approx(1.0)
    assert cosine[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(cosine[9:], cosine[10:]))
    triangular = [lr_factor(s, 100, 0, "triangular", 0.2, 0.0) for s in range(100)]
    assert max(triangular) == triangular[19] == 1.0 and triangular[99] == pytest.approx(1 / 80)


def test_no_weight_decay_on_bn_and_biases():
    net = small_net()
    net(torch.zeros(1, 3, 5, 5))
    decay, no_decay = parameter_groups(net, 5e-4)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3, 3, 3]), torch.Size([2, 36])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0


def test_batch_division_and_sync_bn_rules():
    assert per_rank_batch_size(128, 4, 2) == 16
    with pytest.raises(ConfigError, match="not divisible by world size 3"):
        per_rank_batch_size(128, 3, 1)
    cpu = torch.device("cpu")
    assert resolve_sync_bn("auto", cpu, 8) is False and resolve_sync_bn("off", cpu, 8) is False
    with pytest.raises(ConfigError, match="needs CUDA"):
        resolve_sync_bn("on", cpu, 2)


def test_tta_weights_sum_to_one_and_use_flips():
    constant = nn.Conv2d(3, 10, 1)
    with torch.no_grad():
        constant.weight.zero_()
    net = nn.Sequential(constant, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    images = torch.rand(4, 3, 32, 32)
    torch.testing.assert_close(tta_logits(net, images), net(images))
    column = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 1))
    assert not torch.allclose(tta_logits(column, images), column(images))  # views really differ


def test_evaluate_counts_and_confusion():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float() * 10

    images = torch.zeros(6, 3, 2, 2)
    images[:, 0, 0, 0] = torch.tensor([0, 1, 2, 2, 1, 0])
    labels = torch.tensor([0, 1, 2, 0, 0, 0])
    result = evaluate(Fixed(), [(images[:4], labels[:4]), (images[4:], labels[4:])], lambda x: x, 3)
    assert result["count"] == 6 and result["acc"] == pytest.approx(4 / 6)
    assert result["confusion"] == [[2, 1, 1], [0, 1, 0], [0, 0, 1]]
    assert result["per_class_acc"] == pytest.approx([0.5, 1.0, 1.0])

