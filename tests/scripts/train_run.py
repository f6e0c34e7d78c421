"""Run the trainer (also under torchrun) with the test-only models of tiny_models.py registered;
dump per-rank state hashes.

Usage: train_run.py [--config FILE] [key=value ...]; env DUMP_DIR=folder writes rank<r>.json there.
"""
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

import tiny_models  # noqa: F401  (registers the test models)
from cifar_dist.train import main


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
            outcome = original_fit(self)
            record = {"exit": int(outcome.exit_code), "model": state_hash(self.run.model),
                      "ema": state_hash(self.run.ema.module) if self.run.ema.enabled else None,
                      "history": self.progress.history}
            Path(dump_dir, f"rank{self.env.rank}.json").write_text(json.dumps(record))
            return outcome

        trainer_module.Trainer.fit = fit_and_dump
    sys.exit(main())
