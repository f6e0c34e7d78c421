"""Mixup and cutmix on whole batches, and their soft targets (the loss that reads them: engine/loss.py).

One of {none, mixup, cutmix} is chosen per batch, with one λ per batch (timm's convention): the
batch is mixed with a permutation of itself, image i with image perm[i]. The choice, λ and
the cutmix box stay on the device and become one per-pixel weight for a `lerp`, so mixing
never waits for the GPU (no host-side branch); `info` holds them as tensors
(`MIX_KINDS[int(info["kind"])]` names the choice).
"""
from __future__ import annotations

import math

import torch

MIX_KINDS = ("none", "mixup", "cutmix")
NONE, MIXUP, CUTMIX = range(3)


def _log_standard_gamma(
    alpha: float, shape: tuple, generator: torch.Generator, candidates: int
) -> torch.Tensor:
    """log of Gamma(alpha, 1) samples by Marsaglia–Tsang, vectorised over `candidates` tries each.

    α < 1 uses Gamma(α) = Gamma(α + 1)·U^(1/α). Each try is accepted with probability > 0.95,
    so all tries of one sample fail with probability < 0.05**candidates (< 1e-20 by default);
    that sample then takes d = α − 1/3 (the proposal's centre) instead of looping on a host check.
    """
    device = generator.device
    boosted = alpha + 1.0 if alpha < 1.0 else alpha
    d = boosted - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    normal = torch.randn(*shape, candidates, generator=generator, device=device)
    uniform = torch.rand(*shape, candidates, generator=generator, device=device)
    v = (1.0 + c * normal) ** 3
    log_v = torch.log(v.clamp_min(1e-30))
    accepted = (v > 0) & (torch.log(uniform) < 0.5 * normal**2 + d - d * v + d * log_v)
    first = accepted.to(torch.uint8).argmax(dim=-1, keepdim=True)
    chosen_log_v = torch.where(accepted.any(dim=-1), log_v.gather(-1, first).squeeze(-1), 0.0)
    log_gamma = math.log(d) + chosen_log_v
    if alpha < 1.0:
        open_uniform = 1.0 - torch.rand(shape, generator=generator, device=device)  # in (0, 1]
        log_gamma = log_gamma + torch.log(open_uniform) / alpha
    return log_gamma


def sample_beta(alpha: float, shape: tuple, generator: torch.Generator, candidates: int = 16) -> torch.Tensor:
    """Beta(alpha, alpha) samples as X / (X + Y), X, Y ~ Gamma(alpha), computed in log space
    so that small alpha (X and Y both underflowing) stays finite."""
    if alpha <= 0:
        raise ValueError(f"a Beta(α, α) needs α > 0; got α = {alpha}")
    log_x, log_y = _log_standard_gamma(alpha, (2, *shape), generator, candidates).unbind(0)
    return torch.sigmoid(log_x - log_y)


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, num_classes) float32; a scatter, so no device-to-host check of the label range."""
    targets = torch.zeros(labels.shape[0], num_classes, device=labels.device)
    return targets.scatter_(1, labels.view(-1, 1).long(), 1.0)


def cutmix_box(lam: torch.Tensor, height: int, width: int, generator: torch.Generator):
    """(inside (H, W) bool, pasted_lam): a box of side ⌊size·√(1 − λ)⌋ at a uniform centre,
    clipped at the border; pasted_lam = 1 − box area / (H·W), the exact share kept."""
    device = generator.device
    ratio = torch.sqrt(1.0 - lam)
    cut_h, cut_w = torch.floor(height * ratio).long(), torch.floor(width * ratio).long()
    centre_y = torch.randint(0, height, (), generator=generator, device=device)
    centre_x = torch.randint(0, width, (), generator=generator, device=device)
    top, left = centre_y - cut_h // 2, centre_x - cut_w // 2
    rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
    in_rows = (rows >= top) & (rows < top + cut_h)
    in_cols = (cols >= left) & (cols < left + cut_w)
    area = in_rows.sum() * in_cols.sum()
    return in_rows[:, None] & in_cols[None, :], 1.0 - area.to(torch.float32) / (height * width)


def mix_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    mixup_prob: float,
    cutmix_prob: float,
    mixup_alpha: float,
    cutmix_alpha: float,
    generator: torch.Generator,
):
    """Mixup with probability mixup_prob, else cutmix with probability cutmix_prob, else nothing.

    Returns (mixed images, soft targets (N, num_classes), info) with
    targets = λ·onehot(y) + (1 − λ)·onehot(y[perm]); for cutmix λ is the exact kept area.
    info: {"kind": 0-d long index into MIX_KINDS, "lam": 0-d float, "perm": (N,) long}.
    """
    targets = one_hot(labels, num_classes)
    device = images.device
    if mixup_prob <= 0 and cutmix_prob <= 0:
        info = {"kind": torch.full((), NONE, device=device), "lam": torch.ones((), device=device),
                "perm": torch.arange(images.shape[0], device=device)}
        return images, targets, info
    choice = torch.rand((), generator=generator, device=device)
    kind = torch.where(choice < mixup_prob, MIXUP, torch.where(choice < mixup_prob + cutmix_prob, CUTMIX, NONE))
    perm = torch.randperm(images.shape[0], generator=generator, device=device)
    # Share of each pixel taken from the image itself: λ everywhere for mixup, 0 inside the
    # cutmix box and 1 elsewhere; lerp(partner, image, 1) is exactly the image.
    lam = torch.ones((), device=device)
    keep = lam.expand(*images.shape[-2:])
    if mixup_prob > 0:
        lam = torch.where(kind == MIXUP, sample_beta(mixup_alpha, (), generator), lam)
        keep = lam.expand(*images.shape[-2:])
    if cutmix_prob > 0:
        inside, pasted_lam = cutmix_box(sample_beta(cutmix_alpha, (), generator), *images.shape[-2:], generator)
        is_cutmix = kind == CUTMIX
        keep = torch.where(inside & is_cutmix, 0.0, keep)
        lam = torch.where(is_cutmix, pasted_lam, lam)
    # lerp_ into the partners' copy: torch.lerp(partners, images, keep) without another batch-sized
    # buffer. index_select copies whole images; images[perm] is several times slower on CPUs.
    mixed = images.index_select(0, perm).lerp_(images, keep.to(images.dtype))
    targets = lam * targets + (1.0 - lam) * targets[perm]
    return mixed, targets, {"kind": kind, "lam": lam, "perm": perm}

