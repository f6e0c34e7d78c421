"""Class probabilities of a loaded model on this rank's device: of a split, or of images in memory."""
from __future__ import annotations

import numpy as np
import torch

from cifar_dist.errors import ConfigError
from cifar_dist.engine.build import autocast_context, build_array_input, build_eval_input, resolve_amp_dtype
from cifar_dist.engine.distributed import DistEnv, gather_objects
from cifar_dist.engine.evaluation import tta_output
from cifar_dist.inference.weights import LoadedModel
from cifar_dist.progress import progress

DEFAULT_BATCH_SIZE = 500


@torch.no_grad()
def probabilities(model, loader, transform, autocast, tta: dict, num_classes: int,
                  what: str = "scoring", shown: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities N × C, labels N) of a loader's images in order, over all ranks (collective); tta holds
    `tta_output`'s level, average and fraction.

    Evaluation loaders give each rank a contiguous shard, so the ranks' parts in rank order are
    the images in order, every image once.
    """
    model.eval()
    parts, labels = [torch.zeros(0, num_classes)], [torch.zeros(0, dtype=torch.int64)]
    for images, batch_labels in progress(loader, len(loader), what, shown):
        with autocast():
            output = tta_output(model, transform(images), **tta)
            parts.append((output if tta["average"] == "probabilities" else torch.softmax(output, dim=1)).cpu())
        labels.append(batch_labels.cpu())
    shards = gather_objects((torch.cat(parts).numpy(), torch.cat(labels).numpy()))
    return np.concatenate([p for p, _ in shards]), np.concatenate([y for _, y in shards])


def require_val_split(cfg, purpose: str) -> None:
    if cfg.data.val_fraction <= 0:
        raise ConfigError(f"{purpose} needs the val split, but data.val_fraction=0 in the checkpoint's config (the "
                          "model saw no held-out train images); fitting on the test split is refused")


class Scorer:
    """A loaded model on this rank's device, with the precision its config asks for."""

    def __init__(self, loaded: LoadedModel, env: DistEnv, batch_size: int = DEFAULT_BATCH_SIZE):
        self.cfg, self.env, self.batch_size = loaded.cfg, env, batch_size
        self.model = loaded.on(env.device)
        tc = self.cfg.train
        self.autocast = autocast_context(env.device, resolve_amp_dtype(tc.amp, tc.amp_dtype, env.device))

    def _tta(self, level) -> dict:
        """TTA at `level` by the checkpoint's rule (train.tta_average, train.tta_fraction: overridable)."""
        return {"level": level, "average": self.cfg.train.tta_average, "fraction": self.cfg.train.tta_fraction}

    def split(self, split: str, tta_level) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, labels) of a data split of the config (val, test), every image once."""
        loader, transform = build_eval_input(self.cfg, self.env, split, self.batch_size)
        return probabilities(self.model, loader, transform, self.autocast, self._tta(tta_level),
                             self.cfg.model.num_classes, f"{split} split, TTA {tta_level}", self.env.is_main)

    def images(self, images: np.ndarray, tta_level) -> np.ndarray:
        """Probabilities of NHWC uint8 images, in their order."""
        loader, transform = build_array_input(self.cfg, self.env, images, self.batch_size)
        return probabilities(self.model, loader, transform, self.autocast, self._tta(tta_level),
                             self.cfg.model.num_classes, f"{len(images)} images, TTA {tta_level}",
                             self.env.is_main)[0]
