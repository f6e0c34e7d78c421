"""Loaders behind one interface: iterate to get (uint8 NCHW images, int64 labels) on the device.

- `ffcv`: FFCV `Loader` over the betons (decode and move only).
- `gpu`: the whole split resident on the device, a seeded permutation per epoch.
- `torchvision`: a `DataLoader` running the host part of the augmentation recipe per image with PIL
  in worker processes (the reference project's way; the baseline), see `augment/recipe.py`.

Training loaders reshuffle per epoch from (seed, epoch), shard across ranks and drop the last
partial batch. Evaluation loaders give each rank a contiguous, unpadded shard, so every image is
counted exactly once across ranks. Batches come in channels_last memory when asked (the model's
format), else contiguous NCHW; `split_size` is the number of images in the split.
"""
from __future__ import annotations

import signal

import numpy as np
import torch

from cifar_dist.augment.recipe import host_transforms
from cifar_dist.config import AugmentConfig, DataConfig
from cifar_dist.data.beton import checked_beton, require_ffcv
from cifar_dist.data.splits import load_split


def shard_bounds(num_samples: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) of rank's contiguous evaluation shard; sizes differ by at most one."""
    base, extra = divmod(num_samples, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The same global order on every rank and device for a given (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


class GpuLoader:
    """The whole split kept on the device as uint8; batches are index gathers."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, train: bool, seed: int,
                 rank: int, world_size: int, device: torch.device, channels_last: bool):
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0
        self.split_size = len(labels)
        if not train:
            start, stop = shard_bounds(len(labels), rank, world_size)
            images, labels = images[start:stop], labels[start:stop]
        nhwc = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        # NHWC bytes are channels_last NCHW as they are; contiguous NCHW needs one copy, made here once.
        self.images = nhwc.permute(0, 3, 1, 2)
        if not channels_last:
            self.images = self.images.contiguous()
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)
        self.total = len(labels)
        per_rank = self.total // world_size if train else self.total
        self.num_batches = per_rank // batch_size if train else -(-per_rank // batch_size)
        self.num_samples = self.num_batches * batch_size if train else per_rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def indices(self) -> torch.Tensor:
        """This rank's sample order for the current epoch: every world_size-th image of the global order
        (DistributedSampler's interleaving), so the ranks' batches of a step together are the batch a
        single process would take at that step, whatever the world size."""
        if not self.train:
            return torch.arange(self.total)
        order = epoch_permutation(self.total, self.seed, self.epoch)
        return order[self.rank::self.world_size][: self.num_samples]

    def __iter__(self):
        order = self.indices().to(self.labels.device)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            yield self.images[batch], self.labels[batch]


class FfcvLoader:
    """FFCV's Loader over one beton; `distributed=True` for training with several ranks."""

    def __init__(self, cfg: DataConfig, split: str, batch_size: int, train: bool, seed: int,
                 rank: int, world_size: int, device: torch.device, channels_last: bool):
        require_ffcv()
        from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

        path, entry = checked_beton(cfg, split)
        total = entry["num_images"]
        if train and cfg.train_subset:
            total = min(total, cfg.train_subset)
        self.split_size = total
        if train:
            indices = np.arange(total)
            order, distributed, drop_last = OrderOption.RANDOM, world_size > 1, True
        else:
            indices = np.arange(*shard_bounds(total, rank, world_size))
            order, distributed, drop_last = OrderOption.SEQUENTIAL, False, False
        pipelines = {
            "image": [SimpleRGBImageDecoder(), ToTensor(), ToDevice(device, non_blocking=True),
                      ToTorchImage(channels_last=channels_last)],
            "label": [IntDecoder(), ToTensor(), Squeeze(), ToDevice(device, non_blocking=True)],
        }
        self.loader = Loader(str(path), batch_size=batch_size, num_workers=max(1, cfg.num_workers),
                             order=order, distributed=distributed, seed=seed, indices=indices,
                             drop_last=drop_last, pipelines=pipelines, os_cache=True)
        self.num_samples = len(self.loader) * batch_size if train else len(indices)

    def set_epoch(self, epoch: int) -> None:
        self.loader.next_epoch = epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            yield images, labels.long().reshape(-1)


class _PilDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image
        from torchvision.transforms.functional import pil_to_tensor

        image = Image.fromarray(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return pil_to_tensor(image), int(self.labels[index])


def _ignore_sigint(_worker_id: int) -> None:
    """A Ctrl-C is the trainer's to handle (finish the step, save); workers carry on until it stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class TorchvisionLoader:
    """A DataLoader with per-image PIL augmentation in worker processes: the baseline."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, train: bool, seed: int,
                 rank: int, world_size: int, device: torch.device, channels_last: bool, num_workers: int,
                 augment: AugmentConfig | None):
        self.device, self.seed, self.epoch = device, seed, 0
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.split_size = len(labels)
        if train:
            dataset = _PilDataset(images, labels, host_transforms(augment) if augment else None)
            self.sampler = torch.utils.data.DistributedSampler(
                dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True)
        else:
            start, stop = shard_bounds(len(labels), rank, world_size)
            dataset = _PilDataset(images[start:stop], labels[start:stop])
            self.sampler = torch.utils.data.SequentialSampler(dataset)
        self.generator = torch.Generator()
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, drop_last=train, num_workers=num_workers,
            pin_memory=device.type == "cuda", persistent_workers=False, generator=self.generator,
            worker_init_fn=_ignore_sigint)
        self.num_samples = len(self.loader) * batch_size if train else len(dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.generator.manual_seed(self.seed * 1_000_003 + self.epoch)  # per-worker PIL randomness
        for images, labels in self.loader:
            images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            yield images, labels.to(self.device, non_blocking=True)


def build_loader(cfg: DataConfig, split: str, batch_size: int, train: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", channels_last: bool = True,
                 host_augment: AugmentConfig | None = None):
    """The loader named by cfg.loader for one split; batch_size is per rank.

    host_augment: the recipe whose per-image part the torchvision loader applies (training only);
    the other loaders deliver raw bytes and ignore it.
    """
    device = torch.device(device)
    if cfg.loader == "ffcv":
        return FfcvLoader(cfg, split, batch_size, train, seed, rank, world_size, device, channels_last)
    images, labels = load_split(cfg, split)
    if cfg.loader == "gpu":
        return GpuLoader(images, labels, batch_size, train, seed, rank, world_size, device, channels_last)
    return TorchvisionLoader(images, labels, batch_size, train, seed, rank, world_size, device, channels_last,
                             cfg.num_workers, host_augment if train else None)
