"""Run the trainer (also under torchrun) with test-only models registered; dump per-rank state hashes.

Usage: train_run.py [--config FILE] [key=value ...]; env DUMP_DIR=folder writes rank<r>.json there.
Test models: `tiny_nobn` (no BatchNorm, no dropout) and `nan_after` (its logits turn NaN after
NAN_AFTER training forwards, to exercise the non-finite-loss guard).
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from cifar_dist import models
from cifar_dist.train import main


class TinyNoBN(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class NanAfter(TinyNoBN):
    def __init__(self, num_classes: int, after: int):
        super().__init__(num_classes)
        self.after, self.calls = after, 0

    def forward(self, x):
        logits = super().forward(x)
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                logits = logits * float("nan")
        return logits


models.BUILDERS["tiny_nobn"] = lambda cfg: TinyNoBN(cfg.num_classes)
models.BUILDERS["nan_after"] = lambda cfg: NanAfter(cfg.num_classes, int(os.environ.get("NAN_AFTER", "10")))


def state_hash(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


if __name__ == "__main__":
    dump_dir = os.environ.get("DUMP_DIR")
    if dump_dir:
        from cifar_dist.engine import trainer as trainer_module

        original_fit = trainer_module.Trainer.fit

        def fit_and_dump(self):
            code = original_fit(self)
            record = {"exit": code, "model": state_hash(self.model),
                      "ema": state_hash(self.ema.module) if self.ema else None,
                      "history": self.history}
            Path(dump_dir, f"rank{self.env.rank}.json").write_text(json.dumps(record))
            return code

        trainer_module.Trainer.fit = fit_and_dump
    sys.exit(main())
