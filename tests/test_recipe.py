"""configs/fast.yaml is airbench94's recipe: pinned on real data against the record's own formulas."""
from __future__ import annotations

import math

import pytest
import torch

from cifar_dist.config import load_config
from cifar_dist.engine.distributed import DistEnv
from cifar_dist.engine.evaluation import tta_views
from cifar_dist.engine.trainer import Outcome, Trainer

# legacy/airbench94.py, main(): the record's own numbers and formulas
BATCH, EPOCHS, LR, MOMENTUM, WD, BIAS_SCALER = 1024, 9.9, 11.5, 0.85, 0.0153, 64.0
KILOSTEP = 1024 * (1 + 1 / (1 - MOMENTUM))
STEPS_PER_EPOCH = 50_000 // BATCH  # drop_last
TOTAL_STEPS = math.ceil(STEPS_PER_EPOCH * EPOCHS)


def airbench_lr_factor(step: int) -> float:
    warmup = int(TOTAL_STEPS * 0.23)
    if step < warmup:
        return 0.2 * (1 - step / warmup) + 1.0 * step / warmup
    frac = (step - warmup) / (TOTAL_STEPS - warmup)
    return 1.0 * (1 - frac) + 0.07 * frac


@pytest.fixture(scope="module")
def trained(real_data_root, tmp_path_factory):
    """The fast recipe on all 50,000 training images for 3 steps, whitening bias frozen after 2 of them."""
    run_dir = tmp_path_factory.mktemp("recipe")
    cfg = load_config("configs/fast.yaml", [f"data.root={real_data_root}", "data.val_fraction=0",
                                            "train.compile=false", f"run.dir={run_dir}", "train.max_steps=3",
                                            f"train.whiten_bias_epochs={2 / STEPS_PER_EPOCH}"])
    trainer = Trainer(cfg, DistEnv(), log=lambda *a, **k: None)
    seen = []  # the whitening bias each training forward sees, i.e. after 0, 1, 2 steps
    trainer.run.model.register_forward_pre_hook(
        lambda module, _: seen.append(module.whiten.bias.detach().clone()) if module.training else None)
    assert trainer.fit() == Outcome.MAX_STEPS
    trainer.close()  # the run and its model stay for the tests; the run folder is let go
    return trainer, seen


def test_steps_and_learning_rates_are_the_records(trained):
    trainer, _ = trained
    run = trainer.run
    assert (run.plan.steps_per_epoch, run.plan.total_steps, run.plan.global_batch_size) == (48, 476, 1024)
    groups = {g["name"]: i for i, g in enumerate(run.optimizer.param_groups)}
    lr = LR / KILOSTEP  # un-decoupled learning rate for SGD on the summed loss
    base = {"weights": lr, "whiten_bias": lr, "norm_bias": lr * BIAS_SCALER}
    peak = int(0.23 * TOTAL_STEPS)
    for name, index in groups.items():
        group = run.optimizer.param_groups[index]
        assert group["initial_lr"] == pytest.approx(base[name], rel=1e-12)
        assert group["initial_lr"] * group["weight_decay"] == pytest.approx(WD * BATCH / KILOSTEP, rel=1e-12)
        schedule = run.scheduler.lr_lambdas[index]
        for step in (0, peak, TOTAL_STEPS):
            if name == "whiten_bias" and step > 0:
                continue
            assert base[name] * schedule(step) == pytest.approx(base[name] * airbench_lr_factor(step), rel=1e-12)
        assert group["lr"] == pytest.approx(base[name] * airbench_lr_factor(3) * (name != "whiten_bias"), rel=1e-12)
    assert airbench_lr_factor(0) == 0.2 and airbench_lr_factor(peak) == 1.0
    assert airbench_lr_factor(TOTAL_STEPS) == pytest.approx(0.07)
    assert run.optimizer.defaults["momentum"] == MOMENTUM and run.optimizer.defaults["nesterov"]
    # the recipe's own freeze: 3 epochs of the whitening bias
    recipe = load_config("configs/fast.yaml").train
    assert recipe.whiten_bias_epochs == 3 and recipe.label_smoothing == 0.2 and recipe.loss_reduction == "sum"


def test_whitening_bias_trains_then_freezes(trained):
    trainer, seen = trained
    final = trainer.run.model.whiten.bias.detach()
    assert len(seen) == 3
    assert not torch.equal(seen[1], seen[0])  # trained in the first steps
    assert torch.equal(seen[2], final)  # frozen from step 2 on: the third step left it alone
    index = [g["name"] for g in trainer.run.optimizer.param_groups].index("whiten_bias")
    assert trainer.run.optimizer.param_groups[index]["lr"] == 0.0


def test_lookahead_decay_and_tta_are_the_records(trained):
    trainer, _ = trained
    ema = trainer.run.ema
    assert (ema.every, ema.lookahead) == (5, True)
    for step in (5, 250, TOTAL_STEPS):  # alpha_schedule = 0.95**5 * (step / total)**3
        assert ema.decay_at(step) == pytest.approx(0.95**5 * (step / TOTAL_STEPS) ** 3, rel=1e-12)
    assert trainer.cfg.train.tta == 2
    weights = [w for w, _ in tta_views(torch.zeros(1, 3, 32, 32), trainer.cfg.train.tta)]
    assert weights == [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]


# airbench94_muon.py and the 2025 record's cifar10_speedrun.py, main(): their numbers and formulas
MUON_RECORDS = {
    "configs/fast_muon.yaml": dict(batch=2000, steps=math.ceil(8 * 25), whiten_steps=math.ceil(3 * 25),
                                   head_lr=0.67, bias_lr=0.053, muon_lr=0.24, muon_momentum=0.6, momentum=0.85,
                                   wd=2e-6 * 2000, muon_wd=0.0, normalize=(1, 1), smoothing=0.2),
    "configs/fast_muon_short.yaml": dict(batch=1536, steps=math.ceil(7.59 * 32), whiten_steps=math.ceil(0.19 * 32),
                                         head_lr=0.5415, bias_lr=0.0573, muon_lr=0.205, muon_momentum=0.655,
                                         momentum=0.825, wd=1.0418e-6 * 1536, muon_wd=1.0418e-6 * 1536,
                                         normalize=(2, 17), smoothing=0.09),
}


@pytest.mark.parametrize("path", list(MUON_RECORDS))
def test_the_muon_recipes_are_the_records(real_data_root, tmp_path, path):
    from cifar_dist.engine.build import build_run

    record = MUON_RECORDS[path]
    cfg = load_config(path, [f"data.root={real_data_root}", "data.val_fraction=0", "train.compile=false",
                             f"run.dir={tmp_path}"])
    run = build_run(cfg, DistEnv())
    assert (run.plan.global_batch_size, run.plan.total_steps) == (record["batch"], record["steps"])
    groups = {g["name"]: (i, g) for i, g in enumerate(run.optimizer.param_groups)}
    index, filters = groups["filters"]
    assert filters["muon"] and len(filters["params"]) == 6  # every trainable conv filter, not the whitening one
    assert (filters["initial_lr"], filters["momentum"], filters["weight_decay"]) == pytest.approx(
        (record["muon_lr"], record["muon_momentum"], record["muon_wd"]))
    assert (filters["normalize_every"], filters["normalize_every_end"]) == record["normalize"]
    base = {"weights": record["head_lr"], "norm_bias": record["bias_lr"], "whiten_bias": record["bias_lr"]}
    for name, lr in base.items():
        i, group = groups[name]
        assert group["initial_lr"] == pytest.approx(lr, rel=1e-12) and group["momentum"] == record["momentum"]
        assert group["initial_lr"] * group["weight_decay"] == pytest.approx(record["wd"], rel=1e-9)
        schedule = run.scheduler.lr_lambdas[i]
        if name == "whiten_bias":  # its own line to 0 over its steps, then frozen
            assert [schedule(s) for s in (0, 1, record["whiten_steps"])] == pytest.approx(
                [1.0, 1 - 1 / record["whiten_steps"], 0.0])
        else:  # lr × (1 − step / total_train_steps)
            assert [schedule(s) for s in (0, 50, record["steps"])] == pytest.approx([1.0, 1 - 50 / record["steps"], 0])
    assert run.scheduler.lr_lambdas[index](50) == pytest.approx(1 - 50 / record["steps"])
    assert cfg.train.label_smoothing == record["smoothing"] and not run.ema.enabled
    assert run.model.fc.weight.std().item() == pytest.approx(1.0, rel=1e-5) and run.model.scale == 1 / 256
