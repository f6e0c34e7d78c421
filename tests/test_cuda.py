"""The paths that need a CUDA device: AMP bf16/fp16 (the gradient scaler with fp16 only), torch.compile,
SyncBatchNorm under NCCL with one GPU, the gpu loader and the augmentation on CUDA.

Skipped where torch sees no CUDA device; `benchmarks/gpu_check.sh` runs them on a GPU machine.
"""
import json
import math

import pytest
import torch

from conftest import REPO, decode_ids, tiny_args, train
from cifar_dist.config import load_config
from cifar_dist.engine import checkpoint
from cifar_dist.engine.distributed import DistEnv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (benchmarks/gpu_check.sh runs these on a GPU machine)")
CUDA = "train.device=cuda"


def tiny_config(data_root, run_dir, *extra):
    return load_config(REPO / "configs/smoke.yaml", tiny_args(data_root, run_dir, CUDA, *extra)[2:])


@pytest.mark.parametrize("dtype, name, scaled", [("bf16", "bfloat16", False), ("fp16", "float16", True)])
def test_amp_trains_on_cuda_with_a_scaler_for_fp16_only(data_root, tmp_path, dtype, name, scaled):
    result = train(tiny_args(data_root, tmp_path, CUDA, "train.amp=true", f"train.amp_dtype={dtype}", "train.epochs=1"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["device"] == "cuda:0" and (plan["amp_dtype"], plan["grad_scaler"]) == (name, scaled)
    state = checkpoint.load(tmp_path / "last.pt")
    assert state["progress"]["global_step"] == 14 and state["progress"]["nonfinite_total"] == 0
    if scaled:  # 14 finite steps: no overflow, the scale untouched, its growth counter at 14
        assert (state["scaler"]["scale"], state["scaler"]["_growth_tracker"]) == (65536.0, 14)
    else:
        assert state["scaler"] == {}
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert math.isfinite(record["train_loss"]) and record["peak_memory_mb"] > 0


def test_fp16_overflows_on_cuda_are_skipped_by_the_scaler(data_root, tmp_path):
    args = tiny_args(data_root, tmp_path, CUDA, "model.name=overflow_first", "model.overflow_steps=20", "train.amp=true", "train.amp_dtype=fp16",
                     "train.max_nonfinite_steps=3", "train.ema_decay=0")
    result = train(args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    state = checkpoint.load(tmp_path / "last.pt")
    assert state["progress"]["global_step"] == 28 and state["progress"]["nonfinite_total"] == 0
    assert state["scaler"]["scale"] == 65536.0 * 0.5**20 and state["scaler"]["_growth_tracker"] == 8


def test_compiled_model_trains_and_matches_eager_on_cuda(data_root, tmp_path):
    from cifar_dist.engine.trainer import Outcome, Trainer

    cfg = tiny_config(data_root, tmp_path, "train.compile=true", "train.epochs=1", "train.deterministic=false")
    trainer = Trainer(cfg, DistEnv(device=torch.device("cuda", 0)), log=lambda *a, **k: None)
    assert trainer.fit() is Outcome.FINISHED
    trainer.close()
    run = trainer.run
    assert run.plan.compile == "default" and run.net is not run.model
    assert math.isfinite(trainer.progress.history[0]["train_loss"])
    images = torch.randn(32, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
    run.net.eval()  # the final evaluation compiled this graph (eval mode, no grad, batch 32)
    with torch.no_grad():
        torch.testing.assert_close(run.net(images), run.model(images), rtol=1e-4, atol=1e-4)


def test_sync_bn_under_nccl_with_one_gpu_matches_batch_norm(data_root, tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from cifar_dist.engine.build import build_model_for

    cfg = tiny_config(data_root, tmp_path, "train.sync_bn=on")
    device = torch.device("cuda", 0)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device)
    try:
        plain = build_model_for(cfg, device, channels_last=True, sync_bn=False)
        synced = build_model_for(cfg, device, channels_last=True, sync_bn=True)
        kinds = [type(m) for m in synced.modules()]
        assert torch.nn.SyncBatchNorm in kinds and torch.nn.BatchNorm2d not in kinds
        net = DistributedDataParallel(synced, device_ids=[0])
        images = torch.randn(16, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
        expected, found = plain(images), net(images)
        torch.testing.assert_close(found, expected)
        expected.square().mean().backward()
        found.square().mean().backward()
        for (name, p), q in zip(plain.named_parameters(), synced.parameters()):
            if p.grad is not None:
                torch.testing.assert_close(q.grad, p.grad, msg=name)
        for (name, a), b in zip(plain.named_buffers(), synced.buffers()):
            torch.testing.assert_close(b, a, msg=name)  # running statistics updated alike
        del net
    finally:
        dist.destroy_process_group()


def test_gpu_loader_on_cuda_gives_the_cpu_batches_and_augments_on_the_device(small_cifar):
    from cifar_dist.augment.pipeline import make_generator
    from cifar_dist.engine.build import build_eval_input, build_train_input

    cfg = load_config(None, [f"data.root={small_cifar}", "data.require_full_size=false", "data.loader=gpu",
                             "data.download=false"])
    cuda, cpu = DistEnv(device=torch.device("cuda", 0)), DistEnv()
    (loader, augment), (cpu_loader, _) = build_train_input(cfg, cuda, 64), build_train_input(cfg, cpu, 64)
    loader.set_epoch(3)
    cpu_loader.set_epoch(3)
    seen = []
    for (images, labels), (cpu_images, cpu_labels) in zip(loader, cpu_loader, strict=True):
        assert images.is_cuda and images.dtype == torch.uint8 and images.is_contiguous(memory_format=torch.channels_last)
        assert labels.is_cuda and labels.dtype == torch.int64
        assert torch.equal(images.cpu(), cpu_images) and torch.equal(labels.cpu(), cpu_labels)
        seen.extend(decode_ids(images).tolist())
        inputs, targets = augment(images, labels, make_generator(0, 0, 3, len(seen), images.device), epoch=3)
        assert inputs.is_cuda and inputs.dtype == torch.float32 and targets.shape == (64, 10)
        assert torch.allclose(targets.sum(dim=1), torch.ones(64, device="cuda"))
    assert len(seen) == len(set(seen)) == 448  # 450 training images, whole batches of 64
    eval_loader, transform = build_eval_input(cfg, cuda, "val", 32)
    count = 0
    for images, labels in eval_loader:
        count += len(labels)
        assert transform(images).is_cuda
    assert count == 50


def test_training_steps_never_wait_for_the_device(data_root, tmp_path):
    """No host read on a step's critical path: steps 2 to 14 of an epoch (bf16, clipping, EMA with lookahead, the
    flags agreed and masked on the device) run under torch.cuda.set_sync_debug_mode("error"), which raises at any
    operation that waits for the device. The epoch's start (its order copied to the device) and end (the sums
    read) lie outside that window; the flags are read through an event, which the mode allows."""
    from cifar_dist.engine.trainer import Trainer

    cfg = tiny_config(data_root, tmp_path, "train.epochs=1", "train.amp=true", "train.amp_dtype=bf16",
                      "train.deterministic=false", "train.ema_every=2", "train.ema_lookahead=true",
                      "logging.print_every_steps=0")
    trainer = Trainer(cfg, DistEnv(device=torch.device("cuda", 0)), log=lambda *a, **k: None)
    steps, timed = trainer.run.plan.steps_per_epoch, []
    report_step = trainer.logger.step

    def step(step_in_epoch, global_step, loss, lr):  # called after each optimizer step
        report_step(step_in_epoch, global_step, loss, lr)
        timed.append(step_in_epoch)
        torch.cuda.set_sync_debug_mode("error" if step_in_epoch < steps else "default")

    trainer.logger.step = step
    try:
        assert trainer.run_epoch(evaluate=False, save=False) is None
    finally:
        torch.cuda.set_sync_debug_mode("default")
        trainer.close()
    assert timed == list(range(1, steps + 1)) and steps == 14
    assert trainer.progress.global_step == 14 and trainer.progress.nonfinite_total == 0
    assert all(torch.isfinite(p).all() for p in trainer.run.model.parameters())
