"""Run under torchrun: dump the image ids each rank's loaders yield, per loader, epoch and split.

Usage: loader_ids.py DATA_ROOT OUT_DIR LOADER [LOADER ...]
"""
import json
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import decode_ids  # noqa: E402

from cifar_dist.config import load_config  # noqa: E402
from cifar_dist.data.loaders import build_loader  # noqa: E402
from cifar_dist.engine.distributed import init_distributed  # noqa: E402

root, out_dir, loaders = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
env = init_distributed("cpu")
result = {}
for name in loaders:
    cfg = load_config(None, [f"data.root={root}", f"data.loader={name}", "data.require_full_size=false",
                             "data.num_workers=1", "data.val_fraction=0.1"])
    train = build_loader(cfg.data, "train", 16, train=True, seed=7, rank=env.rank, world_size=env.world_size)
    epochs = []
    for epoch in (0, 1, 0):
        train.set_epoch(epoch)
        epochs.append([decode_ids(images).tolist() for images, _ in train])
    test = build_loader(cfg.data, "test", 16, train=False, rank=env.rank, world_size=env.world_size)
    result[name] = {"train": epochs, "num_samples": train.num_samples, "batches": len(train),
                    "test": [i for images, _ in test for i in decode_ids(images).tolist()]}
(out_dir / f"rank{env.rank}.json").write_text(json.dumps(result))
if dist.is_initialized():
    dist.destroy_process_group()
