"""The trainer: DDP equivalence, exact resumes, restarts, checkpoints, guards, errors, learning."""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from cifar_dist.config import ModelConfig, load_config
from cifar_dist.engine import checkpoint
from cifar_dist.models import build_model
from conftest import (EXIT_DIVERGED, EXIT_PREEMPTED, REPO, SCRIPT, assert_bitwise_equal, free_port, kill_last_worker,
                      start_and_act, start_and_signal, states, tiny_args, torchrun_train, train)

@pytest.fixture(scope="module")
def uninterrupted(data_root, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    result = train(tiny_args(data_root, run_dir))
    assert result.returncode == 0, result.stderr[-8000:]
    return run_dir


def test_resume_after_max_steps_is_bitwise_identical(data_root, uninterrupted, tmp_path):
    first = train(tiny_args(data_root, tmp_path, "train.max_steps=20"))  # stops mid-epoch 2 (14 steps/epoch)
    assert first.returncode == 0, first.stderr[-8000:]
    assert states(tmp_path)["step"] == 20
    second = train(tiny_args(data_root, tmp_path))
    assert second.returncode == 0, second.stderr[-8000:]
    assert "resumed from" in second.stdout and "step 20" in second.stdout
    assert_bitwise_equal(states(tmp_path), states(uninterrupted))
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert [h["val_acc"] for h in history] == [h["val_acc"] for h in reference]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_signal_mid_epoch_then_resume_is_bitwise_identical(data_root, uninterrupted, tmp_path, sig):
    code, output = start_and_signal([sys.executable, SCRIPT, *tiny_args(data_root, tmp_path)], "epoch 1 step 5/",
                                    sig=sig)
    assert code == EXIT_PREEMPTED, output[-3000:]
    saved = states(tmp_path)
    assert saved["epoch"] == 0 and 5 <= saved["step"] < 14  # mid-epoch, right after the signal
    second = train(tiny_args(data_root, tmp_path))
    assert second.returncode == 0, second.stderr[-8000:]
    assert_bitwise_equal(states(tmp_path), states(uninterrupted))


def test_a_different_model_does_not_resume(data_root, uninterrupted):
    result = train(tiny_args(data_root, uninterrupted, "model.widths=[8,16,32]", "train.epochs=3"))
    assert result.returncode == 2
    assert "model settings" in result.stderr and "train.resume=never" in result.stderr


def test_corrupt_last_falls_back_to_previous_and_bad_path_errors(data_root, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("last.pt", "last.prev.pt"):
        (run_dir / name).write_bytes((uninterrupted / name).read_bytes())
    (run_dir / "last.pt").write_bytes((run_dir / "last.pt").read_bytes()[:5000])  # truncated
    result = train(tiny_args(data_root, run_dir, "train.epochs=3"))
    assert result.returncode == 0, result.stderr[-8000:]
    assert "falling back to the previous checkpoint" in result.stdout
    assert states(run_dir)["epoch"] == 3

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    result = train(tiny_args(data_root, tmp_path / "other", f"train.resume={bad}"))
    assert result.returncode == 2 and f"checkpoint {bad} is corrupt" in result.stderr
    assert "Traceback" not in result.stderr


def test_checkpoint_loads_into_a_bare_model(uninterrupted):
    state = checkpoint.load(uninterrupted / "best_ema.pt")
    cfg = load_config(None, [f"model.{k}={json.dumps(v)}" for k, v in state["config"]["model"].items()])
    model = build_model(cfg.model)
    model.load_state_dict(state["ema"]["module"], strict=True)
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])
    assert {"optimizer", "scheduler", "scaler", "config", "progress", "package_version"} <= state.keys()


def test_checkpoint_write_killed_leaves_a_loadable_last(tmp_path):
    writer = (
        "import sys, torch\n"
        "from pathlib import Path\n"
        "from cifar_dist.engine import checkpoint\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1\n"
        "    state = {'format_version': checkpoint.FORMAT_VERSION, 'config': {'model': {}, 'train': {}}, 'ema': None,\n"
        "             'model': {'w': torch.full((4_000_000,), float(i))}, 'optimizer': {}, 'scheduler': {},\n"
        "             'scaler': {}, 'progress': {'global_step': i}, 'world_size': 1,\n"
        "             'rank_local': [{'model': [], 'ema': []}]}\n"
        "    checkpoint.save(state, Path(sys.argv[1]) / 'last.pt', keep_previous=True)\n"
        "    print(i, flush=True)\n"
    )
    for delay in (0.0, 0.05, 0.13, 0.31):
        proc = subprocess.Popen([sys.executable, "-c", writer, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "1"  # one whole write exists
        time.sleep(delay)
        proc.kill()
        proc.wait()
        state = checkpoint.load_resume_state(tmp_path, "auto", log=lambda *_: None)
        step = state["progress"]["global_step"]
        assert torch.equal(state["model"]["w"], torch.full((4_000_000,), float(step)))


def test_nonfinite_losses_are_skipped_then_stop_with_checkpoint_intact(data_root, tmp_path):
    # epoch 1 (14 steps) is clean, epoch 2 turns NaN at step 17
    args = tiny_args(data_root, tmp_path, "model.name=nan_after", "model.nan_after=16", "train.max_nonfinite_steps=3",
                     "train.ema_decay=0")
    result = train(args)
    assert result.returncode == EXIT_DIVERGED, result.stderr[-8000:]
    assert "3 consecutive steps with a non-finite loss" in result.stdout
    assert result.stdout.count("step skipped") == 3
    state = checkpoint.load(tmp_path / "last.pt")
    assert state["progress"]["epoch"] == 1 and state["progress"]["global_step"] == 14
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_config_errors_are_clear(data_root, tmp_path):
    result = train(tiny_args(data_root, tmp_path, "train.epohcs=3"))
    assert result.returncode == 2 and "unknown config key 'train.epohcs'" in result.stderr
    assert "did you mean 'train.epochs'" in result.stderr
    result = train(tiny_args(data_root, tmp_path, "train.lr=fast"))
    assert result.returncode == 2 and "'train.lr' expects float" in result.stderr
    result = train(tiny_args(data_root, tmp_path, "model.widths=[8,16]"))
    assert result.returncode == 2 and "config key 'model.widths' must be three positive integers" in result.stderr
    result = train(tiny_args(data_root, tmp_path, "train.sync_bn=on"))
    assert result.returncode == 2 and "train.sync_bn=on needs CUDA" in result.stderr
    result = torchrun_train(tiny_args(data_root, tmp_path, "train.global_batch_size=33"))
    assert result.returncode != 0
    assert "train.global_batch_size=33 is not divisible by world size 2" in result.stderr
    assert not (tmp_path / "last.pt").exists()


def test_two_ranks_one_step_equals_single_process_on_the_global_batch(data_root, tmp_path):
    common = ["model.name=tiny_nobn", "data.train_subset=32", "train.epochs=1", "train.max_steps=1",
              "train.ema_decay=0", "train.grad_clip_norm=0", "train.deterministic=false",
              "augment.crop_padding=0", "augment.flip=none", "augment.brightness=0", "augment.contrast=0",
              "augment.saturation=0", "augment.hue=0", "augment.mixup_prob=0", "augment.cutmix_prob=0",
              "train.lr=0.5", "train.schedule=cosine", "train.warmup_epochs=0"]
    single = train(tiny_args(data_root, tmp_path / "one", *common))
    assert single.returncode == 0, single.stderr[-8000:]
    double = torchrun_train(tiny_args(data_root, tmp_path / "two", *common))
    assert double.returncode == 0, double.stderr[-8000:]
    one, two = checkpoint.load(tmp_path / "one" / "last.pt"), checkpoint.load(tmp_path / "two" / "last.pt")
    assert one["progress"]["global_step"] == two["progress"]["global_step"] == 1
    sys.path.insert(0, str(REPO / "tests" / "scripts"))
    from tiny_models import TinyNoBN
    torch.manual_seed(0)  # train.seed: the trainer seeds before building, so this is the initial state
    initial = TinyNoBN(10).state_dict()
    for key in one["model"]:
        torch.testing.assert_close(one["model"][key], two["model"][key], rtol=0, atol=1e-6)
    assert max(float((one["model"][k] - initial[k]).abs().max()) for k in initial) > 1e-3  # it did step


def test_two_ranks_sigterm_resume_bitwise_ema_identical_and_exact_counts(data_root, tmp_path):
    dump_u, dump_i = tmp_path / "dump_u", tmp_path / "dump_i"
    dump_u.mkdir(), dump_i.mkdir()
    result = torchrun_train(tiny_args(data_root, tmp_path / "u"), env={"DUMP_DIR": str(dump_u)})
    assert result.returncode == 0, result.stderr[-8000:]
    ranks = [json.loads((dump_u / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["ema"] == ranks[1]["ema"] and ranks[0]["model"] == ranks[1]["model"]
    assert [h["val_count"] for h in ranks[0]["history"]] == [50, 50]

    # The one-node launcher of launch/train (torchrun's own agent turns a worker's 75 into its exit 1).
    cmd = [sys.executable, "-m", "cifar_dist.launch.local", "--nproc", "2", "--",
           *tiny_args(data_root, tmp_path / "i")]
    code, output = start_and_signal(cmd, "epoch 2 step 1/")  # 13 steps of slack for the launcher to forward it
    assert code == EXIT_PREEMPTED, output[-3000:]
    assert "Traceback" not in output and "To resume: cifar-dist train" in output
    saved = states(tmp_path / "i")
    assert saved["epoch"] == 1 and 14 + 1 <= saved["step"] < 28, output[-6000:]
    result = torchrun_train(tiny_args(data_root, tmp_path / "i"), env={"DUMP_DIR": str(dump_i)})
    assert result.returncode == 0, result.stderr[-8000:]
    assert_bitwise_equal(states(tmp_path / "i"), states(tmp_path / "u"))
    resumed = [json.loads((dump_i / f"rank{r}.json").read_text()) for r in range(2)]
    assert resumed[0]["ema"] == resumed[1]["ema"] == ranks[0]["ema"]


def test_two_ranks_lookahead_ends_with_the_model_equal_to_its_ema_on_every_rank(data_root, tmp_path):
    # The EMA must start from the weights DDP broadcast from rank 0, frozen ones included (the fast
    # net's whitening filters come from each rank's own images): else the ranks' EMAs and, through
    # the lookahead, their models drift apart.
    dump = tmp_path / "dump"
    dump.mkdir()
    lookahead = ["train.ema_decay=0.95", "train.ema_every=5", "train.ema_ramp=cubic", "train.ema_lookahead=true"]
    result = torchrun_train(tiny_args(data_root, tmp_path / "run", *lookahead), env={"DUMP_DIR": str(dump)})
    assert result.returncode == 0, result.stderr[-8000:]
    ranks = [json.loads((dump / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["model"] == ranks[0]["ema"] == ranks[1]["model"] == ranks[1]["ema"]
    final = json.loads((tmp_path / "run" / "final.json").read_text())
    assert final["model"] == final["ema"]


def test_resume_on_another_world_size_says_so(data_root, tmp_path):
    first = train(tiny_args(data_root, tmp_path, "train.max_steps=10"))
    assert first.returncode == 0, first.stderr[-8000:]
    second = torchrun_train(tiny_args(data_root, tmp_path))
    assert second.returncode == 0, second.stderr[-8000:]
    assert "saved with world size 1 on world size 2" in second.stdout
    assert states(tmp_path)["epoch"] == 2


def test_torchrun_restarts_after_a_rank_is_killed(data_root, tmp_path):
    # --standalone as in launch/train: a c10d rendezvous, which gives each restart round its own group.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--max-restarts", "1",
           "--standalone", SCRIPT,
           *tiny_args(data_root, tmp_path, "train.epochs=3")]
    code, output = start_and_act(cmd, "epoch 2 step 4/", lambda proc: kill_last_worker(proc, "train_run.py"))
    assert code == 0, output[-20000:]
    assert "resumed from" in output and "at the start of epoch 2, after step 14 of 42" in output
    assert states(tmp_path)["epoch"] == 3
    history = [json.loads(line)["epoch"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert history == [1, 2, 3]


def test_wandb_offline_keeps_history_and_run_id_across_resume(data_root, tmp_path):
    result = train(tiny_args(data_root, tmp_path, "logging.wandb.mode=offline", "train.max_steps=20"))
    assert result.returncode == 0, result.stderr[-8000:]
    run_id = checkpoint.load(tmp_path / "last.pt")["progress"]["wandb_run_id"]
    assert run_id
    result = train(tiny_args(data_root, tmp_path, "logging.wandb.mode=offline"))
    assert result.returncode == 0, result.stderr[-8000:]
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run_id in r.name for r in runs)
    files = [f for r in runs for f in r.glob("*.wandb")]
    assert len(files) == 2 and all(f.stat().st_size > 1000 for f in files)


def test_epochs_record_their_tflops_and_the_plan_says_why_a_cpu_has_no_mfu(uninterrupted):
    plan = json.loads((uninterrupted / "plan.json").read_text())
    assert plan["train_flops_per_image"] > 0 and plan["peak_tflops"] == 0
    assert plan["mfu"].startswith(f"unknown peak for {plan['device_name']}")
    for line in (uninterrupted / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert "mfu" not in record
        assert record["tflops"] == pytest.approx(plan["train_flops_per_image"] * record["images_per_s"] / 1e12)


def test_wandb_disabled_writes_nothing(uninterrupted):
    assert not (uninterrupted / "wandb").exists()
    assert {p.name for p in uninterrupted.iterdir()} >= {"metrics.jsonl", "summary.csv", "last.pt", "best.pt"}


def test_learns_real_data(real_data_root, tmp_path):
    """A small net on a 10k-image subset of the real training split, a few CPU minutes: > 50% val acc."""
    result = subprocess.run(
        [sys.executable, "-m", "cifar_dist", "train", "--config", "configs/smoke.yaml",
         f"data.root={real_data_root}", f"run.dir={tmp_path}", "data.train_subset=10000",
         "model.widths=[32,64,64]", "train.epochs=4", "train.global_batch_size=128", "train.lr=0.2",
         "train.ema_decay=0.99", "augment.mixup_prob=0", "augment.cutmix_prob=0"],
        cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-8000:]
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    best = max(max(h["val_acc"], h["ema_val_acc"]) for h in history)
    print(f"real-data val accuracy after {len(history)} epochs: {best:.4f}")
    assert history[-1]["val_count"] == 5000
    assert best > 0.5


def test_time_based_checkpoints_leave_the_run_unchanged(data_root, uninterrupted, tmp_path):
    result = train(tiny_args(data_root, tmp_path, "train.checkpoint_interval_min=1e-6"))  # after every step
    assert result.returncode == 0, result.stderr[-8000:]
    # The flags of step n (a checkpoint is due) are read with step n + 1, so the checkpoint is written after step
    # n + 1, and it answers step n + 1's own request too: with one at every step, a checkpoint after every second
    # step, steps 2, 4, ..., 12 of each 14-step epoch (its end writes one anyway).
    assert result.stdout.count("checkpoint: ") == 2 * 6
    assert_bitwise_equal(states(tmp_path), states(uninterrupted))


def test_gradient_accumulation_matches_the_full_batch(data_root, tmp_path):
    common = ["model.name=tiny_nobn", "data.train_subset=32", "train.epochs=1", "train.max_steps=1",
              "train.ema_decay=0", "train.grad_clip_norm=0", "augment.mixup_prob=0", "augment.cutmix_prob=0",
              "augment.crop_padding=0", "augment.flip=none", "augment.brightness=0", "augment.contrast=0",
              "augment.saturation=0", "augment.hue=0", "train.warmup_epochs=0", "train.schedule=cosine"]
    for name, accum in (("full", 1), ("accum", 4)):
        result = train(tiny_args(data_root, tmp_path / name, *common, f"train.grad_accum_steps={accum}"))
        assert result.returncode == 0, result.stderr[-8000:]
    full, accum = checkpoint.load(tmp_path / "full" / "last.pt"), checkpoint.load(tmp_path / "accum" / "last.pt")
    for key in full["model"]:
        torch.testing.assert_close(full["model"][key], accum["model"][key], rtol=0, atol=1e-6)


def test_bf16_autocast_and_compile_after_ddp_on_two_ranks(data_root, tmp_path):
    args = tiny_args(data_root, tmp_path, "model.name=tiny_nobn", "train.amp=true", "train.compile=true",
                     "train.epochs=1", "train.deterministic=false")
    result = torchrun_train(args)
    assert result.returncode == 0, result.stderr[-8000:]
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert history[0]["val_count"] == 50 and history[0]["nonfinite_steps"] == 0
    assert all(torch.isfinite(v).all() for v in checkpoint.load(tmp_path / "last.pt")["model"].values())


def test_val_fraction_zero_evaluates_on_the_test_split(data_root, tmp_path):
    result = train(tiny_args(data_root, tmp_path / "run", "data.val_fraction=0", "train.epochs=1"))
    assert result.returncode == 0, result.stderr[-8000:]
    assert "evaluated on the test split" in result.stdout
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["val_count"] == 100  # the synthetic test split


def test_default_run_dir_is_found_again_by_a_restart(data_root, tmp_path):
    env = {"TORCHELASTIC_RUN_ID": "job-42"}
    args = [a for a in tiny_args(data_root, "unused", "train.max_steps=5") if not a.startswith("run.dir")]
    first = subprocess.run([sys.executable, str(REPO / SCRIPT), *args], cwd=tmp_path, capture_output=True,
                           text=True, env={**os.environ, **env})
    assert first.returncode == 0, first.stderr[-8000:]
    (run_dir,) = list((tmp_path / "runs").iterdir())
    assert run_dir.name.startswith("smoke-") and (run_dir / "job_id").read_text().strip() == "job-42"
    again = subprocess.run([sys.executable, str(REPO / SCRIPT), *args, "train.epochs=1"], cwd=tmp_path,
                           capture_output=True, text=True, env={**os.environ, **env})
    assert again.returncode == 0, again.stderr[-8000:]
    assert list((tmp_path / "runs").iterdir()) == [run_dir] and "resumed from" in again.stdout


@pytest.mark.parametrize("loader", ["ffcv", "torchvision"])
def test_training_runs_on_every_loader(data_root, tmp_path, loader):
    if loader == "ffcv":
        prepared = subprocess.run([sys.executable, "-m", "cifar_dist", "prepare", f"data.root={data_root}",
                                   "data.require_full_size=false", "data.num_workers=1"], cwd=REPO,
                                  capture_output=True, text=True)
        assert prepared.returncode == 0, prepared.stderr
    result = train(tiny_args(data_root, tmp_path, f"data.loader={loader}", "train.epochs=1", "train.tta=2"))
    assert result.returncode == 0, result.stderr[-8000:]
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert record["val_count"] == 50 and record["global_step"] == 14


def test_slurm_environment_forms_the_group(data_root, tmp_path):
    """Two tasks as srun starts them: SLURM_* variables only, no torchrun variables."""
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    base.update(SLURM_NTASKS="2", SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="localhost", OMP_NUM_THREADS="1",
                MASTER_PORT=str(free_port()), DUMP_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, SCRIPT, *tiny_args(data_root, tmp_path / "run", "train.epochs=1")],
                              cwd=REPO, env={**base, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-4000:] + outputs[1][-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]  # ranks 0 and 1
    assert ranks[0]["model"] == ranks[1]["model"] and ranks[0]["history"][0]["val_count"] == 50
    assert ["epoch 1 |" in out for out in outputs] == [True, False]  # only rank 0 logs


def test_fp16_with_grad_scaler_resumes_bitwise(data_root, tmp_path):
    fp16 = ["train.amp=true", "train.amp_dtype=fp16", "train.epochs=1"]
    whole = train(tiny_args(data_root, tmp_path / "whole", *fp16))
    assert whole.returncode == 0, whole.stderr[-8000:]
    first = train(tiny_args(data_root, tmp_path / "split", *fp16, "train.max_steps=6"))
    assert first.returncode == 0, first.stderr[-8000:]
    scaler = checkpoint.load(tmp_path / "split" / "last.pt")["scaler"]
    assert scaler["scale"] == 65536.0 and scaler["_growth_tracker"] == 6  # six finite fp16 steps
    second = train(tiny_args(data_root, tmp_path / "split", *fp16))
    assert second.returncode == 0, second.stderr[-8000:]
    assert_bitwise_equal(states(tmp_path / "split"), states(tmp_path / "whole"))
    assert checkpoint.load(tmp_path / "whole" / "last.pt")["scaler"] == checkpoint.load(
        tmp_path / "split" / "last.pt")["scaler"]


# --- issue: engine second pass ----------------------------------------------------------------

def test_fp16_overflows_are_the_scalers_business_not_divergence(data_root, tmp_path):
    """20 steps in a row whose gradient overflows (finite loss): skipped by the scaler, not counted."""
    args = tiny_args(data_root, tmp_path, "model.name=overflow_first", "train.amp=true", "train.amp_dtype=fp16",
                     "train.max_nonfinite_steps=3", "train.ema_decay=0")
    result = train(args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "step skipped" not in result.stdout
    state = checkpoint.load(tmp_path / "last.pt")
    assert state["progress"]["global_step"] == 28 and state["progress"]["nonfinite_total"] == 0
    assert state["scaler"]["scale"] == 65536.0 * 0.5**20  # halved at each of the 20 overflows
    assert state["scaler"]["_growth_tracker"] == 8  # the 8 steps after them were taken


def test_two_ranks_count_each_image_of_an_odd_split_once(tmp_path):
    from conftest import balanced_labels, id_images, write_batches_folder

    root = tmp_path / "data"
    write_batches_folder(root, id_images(500), balanced_labels(500), id_images(101, seed=1), balanced_labels(101))
    result = torchrun_train(tiny_args(root, tmp_path / "run", "data.val_fraction=0", "train.epochs=1"))
    assert result.returncode == 0, result.stderr[-8000:]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record["val_count"] == 101


def test_attention_resnet_with_dropout_resumes_bitwise(data_root, tmp_path):
    args = ("model.name=attention_resnet", "model.width=4", "model.dropout=0.3", "train.epochs=1")
    whole = train(tiny_args(data_root, tmp_path / "whole", *args))
    assert whole.returncode == 0, whole.stderr[-8000:]
    first = train(tiny_args(data_root, tmp_path / "split", *args, "train.max_steps=6"))
    assert first.returncode == 0, first.stderr[-8000:]
    second = train(tiny_args(data_root, tmp_path / "split", *args))
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr[-8000:]
    assert_bitwise_equal(states(tmp_path / "split"), states(tmp_path / "whole"))
    other_seed = train(tiny_args(data_root, tmp_path / "seed1", *args, "train.seed=1"))
    assert other_seed.returncode == 0
    assert not torch.equal(states(tmp_path / "seed1")["model"]["fc.weight"], states(tmp_path / "whole")["model"]["fc.weight"])


def test_resume_compares_only_the_chosen_models_options(data_root, tmp_path):
    first = train(tiny_args(data_root, tmp_path, "model.name=tiny_nobn", "train.max_steps=3"))
    assert first.returncode == 0, first.stderr[-8000:]
    again = train(tiny_args(data_root, tmp_path, "model.name=tiny_nobn", "model.width=5", "model.widths=[4,4,4]",
                            "train.max_steps=5"))
    assert again.returncode == 0 and "resumed from" in again.stdout, again.stderr[-8000:]


def test_run_plan_is_printed_and_saved_with_a_config_that_reproduces_the_run(data_root, tmp_path):
    args = tiny_args(data_root, tmp_path / "run", "train.epochs=1", "train.grad_accum_steps=2")
    result = torchrun_train(args)
    assert result.returncode == 0, result.stderr[-8000:]
    assert "run plan:" in result.stdout and result.stdout.count("run plan:") == 1  # rank 0 only
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert (plan["world_size"], plan["micro_batch_size"], plan["grad_accum_steps"]) == (2, 8, 2)
    assert (plan["steps_per_epoch"], plan["total_steps"], plan["train_images"], plan["eval_images"]) == (14, 14, 450, 50)
    assert (plan["amp_dtype"], plan["grad_scaler"], plan["sync_bn"], plan["compile"]) == ("off", False, False, "off")
    model = build_model(ModelConfig(name="fast", options={"widths": [8, 16, 16]}))
    assert plan["parameters"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    saved = load_config(tmp_path / "run" / "config.yaml")
    wanted = load_config(args[1], args[2:])
    assert saved.run.dir == "" and saved == dataclasses.replace(wanted, run=dataclasses.replace(wanted.run, dir=""))


def test_wandb_online_without_a_key_stops_before_anything(data_root, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    env.update(HOME=str(tmp_path), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "cifar_dist", "train",
                             *tiny_args(data_root, tmp_path / "run", "logging.wandb.mode=online")],
                            cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "wandb login" in result.stderr and "WANDB_API_KEY" in result.stderr
    assert "logging.wandb.mode=offline" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_wandb_online_with_a_key_but_no_server_falls_back_to_offline(data_root, tmp_path):
    env = {"WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}", "HOME": str(tmp_path)}
    started = time.monotonic()
    result = train(tiny_args(data_root, tmp_path / "run", "logging.wandb.mode=online", "train.epochs=1"), env=env)
    assert result.returncode == 0, result.stderr[-8000:]
    assert time.monotonic() - started < 120
    assert "is not reachable" in result.stdout and "logging offline instead" in result.stdout
    assert len(list((tmp_path / "run" / "wandb").glob("offline-run-*"))) == 1


MUON = ["train.optimizer=muon", "train.muon.lr=0.05", "train.ema_decay=0"]


def test_muon_trains_identically_on_two_ranks_and_resumes_bitwise(data_root, tmp_path):
    """Muon's orthogonalised updates come from all-reduced gradients, so the ranks stay identical; its
    momentum buffers and renormalisation counters are optimizer state, so a resume continues bitwise."""
    dump = tmp_path / "dump"
    dump.mkdir()
    result = torchrun_train(tiny_args(data_root, tmp_path / "ranks", *MUON), env={"DUMP_DIR": str(dump)})
    assert result.returncode == 0, result.stderr[-8000:]
    ranks = [json.loads((dump / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["model"] == ranks[1]["model"]
    assert "muon (lr 0.05) on the conv filters" in result.stdout

    whole = train(tiny_args(data_root, tmp_path / "whole", *MUON))
    assert whole.returncode == 0, whole.stderr[-8000:]
    first = train(tiny_args(data_root, tmp_path / "resumed", *MUON, "train.max_steps=20"))
    assert first.returncode == 0, first.stderr[-8000:]
    state = checkpoint.load(tmp_path / "resumed" / "last.pt")
    muon_group = state["optimizer"]["param_groups"][0]
    assert muon_group["muon"] and muon_group["step"] == 20  # the filters' group, with its counters
    second = train(tiny_args(data_root, tmp_path / "resumed", *MUON))
    assert second.returncode == 0, second.stderr[-8000:]
    resumed, whole = (checkpoint.load(tmp_path / name / "last.pt")["model"] for name in ("resumed", "whole"))
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[k], whole[k]) for k in whole), "the resumed Muon run differs"

    other = train(tiny_args(data_root, tmp_path / "resumed", "train.optimizer=sgd", "train.epochs=3"))
    assert other.returncode == 2
    assert "trained with train.optimizer=muon, but the config asks for train.optimizer=sgd" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
