"""Engine pieces on their own: EMA, optimizer groups and rates, LR schedules, TTA, evaluation, collectives."""
from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from torch import nn

from cifar_dist.config import load_config
from cifar_dist.errors import ConfigError
from cifar_dist.engine.build import per_rank_batch_size, resolve_sync_bn
from cifar_dist.engine.ema import EMA, NoEMA
from cifar_dist.engine.evaluation import score_split, tta_output, tta_views
from cifar_dist.engine.optim import build_optimizer, lr_factor, parameter_groups, sgd_rates, whiten_bias_factor
from cifar_dist.models import build_model
from conftest import REPO, run_torchrun, shifted


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))


def scalar_model(value: float) -> nn.Linear:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def set_weight(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        model.weight.fill_(value)


# --- EMA ---------------------------------------------------------------------------------------

def test_ema_every_and_decay_per_step():
    model = scalar_model(1.0)
    ema = EMA(model, decay=0.9, every=2)
    set_weight(model, 3.0)
    ema.update(model, step=1)  # not a multiple of every: no update
    assert ema.module.weight.item() == 1.0
    ema.update(model, step=2)  # decay 0.9 per step, applied as 0.9**2 over the two steps
    assert ema.module.weight.item() == pytest.approx(0.81 * 1 + 0.19 * 3)
    assert model.weight.item() == 3.0  # no lookahead: the model is left alone


def test_ema_cubic_ramp_start_and_lookahead_follow_airbench():
    total = 100
    model = scalar_model(0.0)
    ema = EMA(model, decay=0.95, every=5, ramp="cubic", start_step=10, total_steps=total, lookahead=True)
    assert ema.decay_at(10) == 0.0  # still following the model exactly
    for step in (15, 50, 100):  # airbench: alpha_schedule = 0.95**5 * (step / total)**3
        assert ema.decay_at(step) == pytest.approx(0.95**5 * (step / total) ** 3, rel=1e-12)
    set_weight(model, 4.0)
    ema.update(model, step=10)
    assert ema.module.weight.item() == 4.0 == model.weight.item()
    set_weight(model, 8.0)
    ema.update(model, step=50)
    decay = 0.95**5 * 0.5**3
    expected = decay * 4.0 + (1 - decay) * 8.0
    assert ema.module.weight.item() == pytest.approx(expected)
    assert model.weight.item() == pytest.approx(expected)  # lookahead: copied back into the model
    set_weight(model, 1.0)
    ema.finish(model)  # the end of training: the model becomes the average
    assert model.weight.item() == pytest.approx(expected)
    plain = EMA(model, decay=0.5)
    set_weight(model, 2.0)
    plain.finish(model)
    assert model.weight.item() == 2.0  # without lookahead finish leaves the model alone


def test_no_ema_does_nothing():
    model = scalar_model(1.0)
    ema = NoEMA()
    ema.update(model, 1)
    ema.finish(model)
    ema.sync()
    ema.load_state_dict(ema.state_dict())
    assert (ema.enabled, ema.module, ema.float_buffers(), model.weight.item()) == (False, None, [], 1.0)


# --- optimizer: groups, rates, schedules -----------------------------------------------------

def test_parameter_groups_scale_bias_lr_but_keep_decay_per_step():
    model = build_model(load_config("configs/fast.yaml", ["model.widths=[8,8,8]"]).model)
    groups = {g["name"]: g for g in parameter_groups(model, lr=0.5, decay_per_step=0.01, bias_scaler=64.0,
                                                     decay_norm_and_bias=True)}
    assert set(groups) == {"weights", "norm_bias", "whiten_bias"}
    assert groups["whiten_bias"]["params"] == [model.whiten.bias]
    assert len(groups["norm_bias"]["params"]) == 6  # two BN layers per conv group, weights frozen
    assert groups["norm_bias"]["lr"] == 32.0 and groups["weights"]["lr"] == 0.5
    for group in groups.values():  # the decay per step, lr × weight_decay, is the same in every group
        assert group["lr"] * group["weight_decay"] == pytest.approx(0.01)
    plain = {g["name"]: g for g in parameter_groups(small_net_built(), 0.1, 0.001, 1.0, False)}
    assert plain["other"]["weight_decay"] == 0.0 and plain["norm_bias"]["weight_decay"] == 0.0
    assert plain["weights"]["weight_decay"] == pytest.approx(0.01)


def small_net_built() -> nn.Module:
    net = small_net()
    net(torch.zeros(1, 3, 5, 5))
    return net


def test_decoupled_rates_are_airbench_conversion():
    cfg = load_config("configs/fast.yaml").train
    kilostep_scale = 1024 * (1 + 1 / (1 - 0.85))  # airbench94.py: 1024 * (1 + 1 / (1 - momentum))
    lr, decay = sgd_rates(cfg, 1024)
    assert lr == pytest.approx(11.5 / kilostep_scale) and decay == pytest.approx(0.0153 * 1024 / kilostep_scale)
    mean_cfg = load_config("configs/fast.yaml", ["train.loss_reduction=mean"]).train
    assert sgd_rates(mean_cfg, 1024)[0] == pytest.approx(lr * 1024)  # the same step for a mean loss
    torch_cfg = load_config(None, ["train.lr=0.1", "train.weight_decay=5e-4"]).train
    assert sgd_rates(torch_cfg, 128) == pytest.approx((0.1, 0.1 * 5e-4))


def test_lr_schedules():
    # the record's triangular: 0.2 → 1 at int(0.23 · total), then → 0.07 at the end
    total = 476
    tri = [lr_factor(s, total, "triangular", 0, 0.23, 0.2, 0.07) for s in range(total + 1)]
    peak = int(0.23 * total)
    assert tri[0] == pytest.approx(0.2) and tri[peak] == pytest.approx(1.0) and tri[total] == pytest.approx(0.07)
    assert tri[peak // 2] == pytest.approx(0.2 + 0.8 * (peak // 2) / peak)
    assert max(tri) == tri[peak]
    cosine = [lr_factor(s, 100, "cosine", 10, 0.2, 0.0, 0.0) for s in range(100)]
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == pytest.approx(1.0)
    assert cosine[55] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(cosine[9:], cosine[10:]))
    # airbench94_muon: no warm-up, 1 at step 0 falling linearly to 0 at step `total` (200 steps)
    linear = [lr_factor(s, 200, "triangular", 0, 0.0, 0.0, 0.0) for s in range(201)]
    assert linear == pytest.approx([1 - s / 200 for s in range(201)], abs=1e-15)


def test_whitening_bias_factor_follows_the_schedule_or_its_own_line_then_freezes():
    main = functools.partial(lr_factor, total_steps=200, schedule="triangular", warmup_steps=0, peak_fraction=0.0,
                             start_factor=0.0, end_factor=0.0)
    follows = [whiten_bias_factor(s, main, 75, linear=False) for s in range(200)]
    assert follows[:75] == [main(s) for s in range(75)] and set(follows[75:]) == {0.0}
    # airbench94_muon: the whitening bias's lr falls to 0 over its own 75 steps (3 epochs of 25)
    own = [whiten_bias_factor(s, main, 75, linear=True) for s in range(200)]
    assert own[:75] == pytest.approx([1 - s / 75 for s in range(75)]) and set(own[75:]) == {0.0}
    assert whiten_bias_factor(150, main, None, linear=True) == main(150)  # no freeze: the main schedule


def test_whitening_bias_freezes_at_its_epoch():
    cfg = load_config("configs/fast.yaml", ["model.widths=[8,8,8]"]).train
    model = build_model(load_config("configs/fast.yaml", ["model.widths=[8,8,8]"]).model)
    optimizer, scheduler = build_optimizer(model, cfg, 1024, steps_per_epoch=48, total_steps=476)
    names = [g["name"] for g in optimizer.param_groups]
    whiten, weights = names.index("whiten_bias"), names.index("weights")
    lrs = []
    for _ in range(3 * 48 + 1):
        lrs.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert lrs[3 * 48 - 1][whiten] > 0 and lrs[3 * 48][whiten] == 0.0 and lrs[3 * 48][weights] > 0
    with pytest.raises(ConfigError, match="whiten_bias_epochs applies to models with a whitening layer"):
        build_optimizer(small_net_built(), cfg, 1024, 48, 476)
    muon = load_config(None, ["train.optimizer=muon"]).train
    with pytest.raises(ConfigError, match="train.optimizer=muon updates conv filters .* has no trainable ones"):
        build_optimizer(nn.Sequential(nn.Flatten(), nn.Linear(3072, 10)), muon, 128, 10, 100)


def test_batch_division_and_sync_bn_rules():
    assert per_rank_batch_size(128, 4, 2) == 16
    with pytest.raises(ConfigError, match="not divisible by world size 3"):
        per_rank_batch_size(128, 3, 1)
    cpu = torch.device("cpu")
    assert resolve_sync_bn("auto", cpu, 8) is False and resolve_sync_bn("off", cpu, 8) is False
    with pytest.raises(ConfigError, match="needs CUDA"):
        resolve_sync_bn("on", cpu, 2)


# --- TTA ---------------------------------------------------------------------------------------

def test_tta_views_and_weights_by_hand():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 5))  # neither flip- nor shift-invariant
    images = torch.rand(3, 3, 32, 32)
    mirror = images.flip(-1)
    up_left, down_right = shifted(images, -1, -1), shifted(images, 1, 1)
    expected = {
        0: model(images),
        1: 0.5 * model(images) + 0.5 * model(mirror),
        2: 0.25 * model(images) + 0.25 * model(mirror) + 0.125 * (
            model(up_left) + model(up_left.flip(-1)) + model(down_right) + model(down_right.flip(-1))),
    }
    for level, reference in expected.items():
        views = tta_views(images, level)
        assert sum(weight for weight, _ in views) == pytest.approx(1.0)
        torch.testing.assert_close(tta_output(model, images, level), reference, rtol=1e-5, atol=1e-5)
    assert [w for w, _ in tta_views(images, 2)] == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    channels_last = images.contiguous(memory_format=torch.channels_last)
    assert all(v.is_contiguous(memory_format=torch.channels_last) for _, v in tta_views(channels_last, 2))
    with pytest.raises(ValueError, match="TTA level"):
        tta_views(images, 3)


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
    result = score_split(Fixed(), [(images[:4], labels[:4]), (images[4:], labels[4:])], lambda x: x, 3)
    assert result["count"] == 6 and result["acc"] == pytest.approx(4 / 6)
    assert result["confusion"] == [[2, 1, 1], [0, 1, 0], [0, 0, 1]]
    assert result["per_class_acc"] == pytest.approx([0.5, 1.0, 1.0])


# --- collectives with two ranks ------------------------------------------------------------------

def test_average_and_ema_sync_give_the_mean_on_both_ranks(tmp_path):
    script = tmp_path / "average.py"
    script.write_text(
        "import json, os, sys, torch\n"
        "from torch import nn\n"
        "from cifar_dist.engine.distributed import average_tensors_, init_distributed, shutdown\n"
        "from cifar_dist.engine.ema import EMA\n"
        "env = init_distributed('cpu')\n"
        "values = [torch.full((3,), float(env.rank + 1)), torch.tensor([10.0 * env.rank]), torch.tensor([7])]\n"
        "average_tensors_(values)\n"
        "model = nn.BatchNorm1d(2)\n"
        "ema = EMA(model, decay=0.5)\n"
        "with torch.no_grad():\n"
        "    ema.module.weight.fill_(env.rank * 4.0)\n"
        "    ema.module.running_mean.fill_(env.rank * 2.0 + 1)\n"
        "ema.sync()\n"
        "out = {'values': [v.tolist() for v in values], 'weight': ema.module.weight.tolist(),\n"
        "       'running_mean': ema.module.running_mean.tolist()}\n"
        "open(os.path.join(sys.argv[1], f'rank{env.rank}.json'), 'w').write(json.dumps(out))\n"
        "shutdown()\n")
    result = run_torchrun(2, [str(script), str(tmp_path)], cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in range(2):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["values"] == [[1.5, 1.5, 1.5], [5.0], [7]]  # the integer tensor is left alone
        assert out["weight"] == [2.0, 2.0] and out["running_mean"] == [2.0, 2.0]


# --- the non-finite skip on the device and the flags read a step late ---------------------------------

def _masked_run(optimizer_name: str):
    """A tiny fast net with its optimizer, an EMA with lookahead and the MaskedStep over them, seeded alike."""
    from cifar_dist.engine.masked_step import MaskedStep

    cfg = load_config(None, ["model.name=fast", "model.widths=[8,16,16]", f"train.optimizer={optimizer_name}",
                             "train.momentum=0.9"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    optimizer, _ = build_optimizer(model, cfg.train, 32, steps_per_epoch=10, total_steps=100)
    ema = EMA(model, decay=0.8, every=1, lookahead=True)
    return model, optimizer, ema, MaskedStep(optimizer, model, ema)


def _set_grads(model: nn.Module, seed: int, scale: float = 1.0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=generator).to(memory_format=torch.preserve_format) * scale


def _everything(model, optimizer, ema) -> dict:
    """Every tensor a step may write, and the optimizer's host-side group values, copied."""
    tensors = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    tensors.update({f"ema.{k}": v.clone() for k, v in ema.module.state_dict().items()})
    for i, p in enumerate(model.parameters()):
        tensors.update({f"state{i}.{k}": v.clone() for k, v in optimizer.state[p].items()})
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {"tensors": tensors, "groups": groups}


def _assert_same(a: dict, b: dict) -> None:
    assert a["groups"] == b["groups"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for key in a["tensors"]:
        assert torch.equal(a["tensors"][key], b["tensors"][key]), key


@pytest.mark.parametrize("optimizer_name", ["sgd", "muon"])
def test_a_masked_step_is_the_plain_step_when_kept_and_leaves_every_bit_when_not(optimizer_name):
    plain_model, plain_opt, plain_ema, _ = _masked_run(optimizer_name)
    model, optimizer, ema, masked = _masked_run(optimizer_name)

    def plain_step(step: int, seed: int) -> None:
        _set_grads(plain_model, seed)
        plain_opt.step()
        plain_ema.update(plain_model, step)

    def masked_step(step: int, seed: int, scale: float = 1.0, keep: bool = True):
        _set_grads(model, seed, scale)
        taken = masked.take(lambda: ema.update(model, step), ema_updates=True)
        masked.keep(taken, torch.tensor(keep))
        return taken

    for step in (1, 2):  # the plain step and the kept one, with momentum and Muon's counters under way
        plain_step(step, seed=step)
        assert not masked_step(step, seed=step).nonfinite
        _assert_same(_everything(model, optimizer, ema), _everything(plain_model, plain_opt, plain_ema))

    before = _everything(model, optimizer, ema)
    taken = masked_step(3, seed=99, scale=float("nan"), keep=False)  # a NaN gradient: found, and put back
    assert taken.nonfinite
    if optimizer_name == "muon":  # Muon counts its steps on the host
        assert _everything(model, optimizer, ema)["groups"] != before["groups"]
    masked.undo_host(taken)  # the host learns of the skip a step later
    _assert_same(_everything(model, optimizer, ema), before)

    plain_step(3, seed=3)  # the skipped step never happened: the runs go on equal
    masked_step(3, seed=3)
    _assert_same(_everything(model, optimizer, ema), _everything(plain_model, plain_opt, plain_ema))


def test_a_skipped_first_step_keeps_the_zero_momentum_it_starts_from():
    model, optimizer, ema, masked = _masked_run("sgd")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    _set_grads(model, seed=0, scale=float("inf"))
    taken = masked.take(lambda: None, ema_updates=False)
    assert taken.nonfinite
    masked.keep(taken, torch.tensor(False))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    buffers = [optimizer.state[p]["momentum_buffer"] for p in model.parameters() if p.requires_grad]
    assert buffers and all(not b.any() for b in buffers)


def test_the_flags_keep_a_step_only_when_loss_and_update_are_finite_and_reach_the_host_as_agreed():
    from cifar_dist.engine.step_flags import agree

    finite, nan, inf = torch.tensor(1.0), torch.tensor(float("nan")), torch.tensor(float("inf"))
    seen = []
    for step, (loss, update_bad) in enumerate([(finite, False), (nan, True), (finite, True), (inf, False)], start=1):
        ok, pending = agree(step, loss, torch.tensor(update_bad), stop=2 if step == 3 else 0,
                            checkpoint_due=step == 2, distributed=False)
        flags = pending.read()
        assert bool(ok) == (not flags.skipped) and flags.step == step
        seen.append((flags.loss_nonfinite, flags.update_nonfinite, flags.skipped, flags.stop, flags.checkpoint_due))
    assert seen == [(False, False, False, 0, False), (True, True, True, 0, True), (False, True, True, 2, False),
                    (True, False, True, 0, False)]
