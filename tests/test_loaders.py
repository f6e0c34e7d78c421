"""Loaders: sharding across ranks, per-epoch reshuffles from a seed, exact evaluation counts."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cifar_dist.config import load_config
from cifar_dist.data.loaders import build_loader, shard_bounds
from conftest import balanced_labels, decode_ids, id_images, run_cli, run_torchrun, write_batches_folder

LOADERS = ("ffcv", "gpu", "torchvision")
SCRIPT = "tests/scripts/loader_ids.py"


@pytest.fixture(scope="module")
def odd_data(tmp_path_factory):
    """500 train images (450 train / 50 val after the split) and an odd-sized test split of 101."""
    root = tmp_path_factory.mktemp("odd") / "data"
    write_batches_folder(root, id_images(500), balanced_labels(500), id_images(101, seed=2), np.arange(101) % 10)
    result = run_cli("prepare", f"data.root={root}", "data.require_full_size=false", "data.num_workers=1")
    assert result.returncode == 0, result.stderr
    return root


def test_shard_bounds_cover_exactly_once():
    for total in (0, 1, 7, 101):
        for world in (1, 2, 3, 8):
            pieces = [range(*shard_bounds(total, r, world)) for r in range(world)]
            assert sorted(i for p in pieces for i in p) == list(range(total))
            assert max(map(len, pieces)) - min(map(len, pieces)) <= 1


def test_two_ranks_shard_reshuffle_and_count_exactly(odd_data, tmp_path):
    result = run_torchrun(2, [SCRIPT, odd_data, tmp_path, *LOADERS])
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    train_ids = set(range(500)) - set(_val_ids(odd_data))
    for name in LOADERS:
        per_rank = [r[name] for r in ranks]
        batches = per_rank[0]["batches"]
        assert batches == 450 // 2 // 16 == per_rank[1]["batches"], name  # drop_last: 14 batches of 16
        for epoch in range(2):
            seen = [[i for batch in r["train"][epoch] for i in batch] for r in per_rank]
            assert all(len(s) == batches * 16 == r["num_samples"] for s, r in zip(seen, per_rank)), name
            assert not set(seen[0]) & set(seen[1]), f"{name}: ranks overlap in epoch {epoch}"
            union = set(seen[0]) | set(seen[1])
            assert union <= train_ids and len(union) == 2 * batches * 16, name
            assert len(seen[0]) == len(set(seen[0])), f"{name}: an image repeats within a rank"
        for r in per_rank:
            assert r["train"][0] != r["train"][1], f"{name}: epochs 0 and 1 have the same order"
            assert r["train"][0] == r["train"][2], f"{name}: epoch 0 again differs (not seeded)"
        test_seen = per_rank[0]["test"] + per_rank[1]["test"]
        assert sorted(test_seen) == list(range(101)), f"{name}: evaluation must count each image once"
        assert [len(r["test"]) for r in per_rank] == [51, 50]


def _val_ids(root) -> list[int]:
    cfg = load_config(None, [f"data.root={root}", "data.loader=gpu", "data.require_full_size=false"])
    loader = build_loader(cfg.data, "val", 64, train=False)
    return [i for images, _ in loader for i in decode_ids(images).tolist()]


@pytest.mark.parametrize("name", LOADERS)
def test_single_process_batches_are_uint8_nchw_and_seeded(odd_data, name):
    cfg = load_config(None, [f"data.root={odd_data}", f"data.loader={name}", "data.require_full_size=false",
                             "data.num_workers=1"])
    first = build_loader(cfg.data, "train", 32, train=True, seed=3)
    images, labels = next(iter(first))
    assert str(images.dtype) == "torch.uint8"
    assert tuple(images.shape) == (32, 3, 32, 32) and str(labels.dtype) == "torch.int64"
    ids = decode_ids(images)
    assert np.array_equal(labels.numpy(), balanced_labels(500)[ids])  # labels travel with their images
    again = build_loader(cfg.data, "train", 32, train=True, seed=3)
    other_seed = build_loader(cfg.data, "train", 32, train=True, seed=4)
    assert np.array_equal(ids, decode_ids(next(iter(again))[0]))
    assert not np.array_equal(ids, decode_ids(next(iter(other_seed))[0]))


def test_train_subset_limits_the_epoch(odd_data):
    for name in ("ffcv", "gpu"):
        cfg = load_config(None, [f"data.root={odd_data}", f"data.loader={name}", "data.require_full_size=false",
                                 "data.train_subset=100", "data.num_workers=1"])
        loader = build_loader(cfg.data, "train", 10, train=True)
        assert len(loader) == 10 and loader.num_samples == 100
