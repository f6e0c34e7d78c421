"""Batched augmentation ops against independent references (torch slicing, torchvision), rates
within binomial bounds, mixing arithmetic, and reproducibility of the whole pipeline."""
import colorsys
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

from cifar_dist.augment import color, geometric, mix
from cifar_dist.augment.pipeline import EvalTransform, TrainAugment, make_generator
from cifar_dist.config import AugmentConfig
from cifar_dist.engine.loss import soft_target_cross_entropy

ALL_OFF = AugmentConfig(
    crop_padding=0, flip="none", rotate_degrees=0.0, perspective_distortion=0.0, perspective_prob=0.0,
    brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, cutout_size=0, mixup_prob=0.0, cutmix_prob=0.0,
)


def only(**changes) -> AugmentConfig:
    return dataclasses.replace(ALL_OFF, **changes)


def uint8_images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator)


def float_images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def cpu_generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_binomial(count: int, trials: int, p: float, sds: float = 4.0) -> None:
    sd = math.sqrt(trials * p * (1 - p))
    expected = f"{trials * p:.0f} ± {sds * sd:.0f}"
    assert abs(count - trials * p) <= sds * sd, f"{count} of {trials}; expected {expected}"


# ---------------------------------------------------------------- geometric


def test_flip_mirrors_masked_samples_only():
    images = float_images(6)
    mask = torch.tensor([True, False, True, True, False, False])
    out = geometric.flip(images, mask)
    for i in range(6):
        expected = torch.flip(images[i], dims=[-1]) if mask[i] else images[i]
        assert torch.equal(out[i], expected), i
    assert not torch.equal(out[0], images[0])
    assert not torch.equal(out[1], torch.flip(images[1], dims=[-1]))


def test_translate_equals_slice_of_reflect_padded_image():
    p = 4
    shifts = torch.tensor([[-4, -4], [4, 4], [0, 0], [3, -2], [-1, 4], [2, 0]])
    images = float_images(len(shifts))
    out = geometric.translate(images, shifts, p)
    padded = F.pad(images, (p, p, p, p), mode="reflect")
    for i, (dx, dy) in enumerate(shifts.tolist()):
        assert torch.equal(out[i], padded[i, :, p + dy : p + dy + 32, p + dx : p + dx + 32]), (dx, dy)
    # x and y swapped is a different image: the reference can tell them apart.
    assert not torch.equal(out[3], padded[3, :, p + 3 : p + 3 + 32, p - 2 : p - 2 + 32])
    mask = torch.tensor([True, False, True, False, True, True])
    assert torch.equal(geometric.translate(images, shifts, p, mask), geometric.flip(out, mask))
    as_bytes = (images * 255).to(torch.uint8)
    expected = geometric.flip(geometric.translate(as_bytes, shifts, p), mask)
    assert torch.equal(geometric.translate(as_bytes, shifts, p, mask), expected)
    channels_last = as_bytes.contiguous(memory_format=torch.channels_last)  # as the loaders give it
    moved = geometric.translate(channels_last, shifts, p, mask)
    assert torch.equal(moved, expected) and moved.is_contiguous()


def test_random_shifts_cover_the_range_and_pipeline_crops_land_on_them():
    shifts = geometric.random_shifts(5000, 4, cpu_generator())
    for axis in range(2):
        assert sorted(shifts[:, axis].unique().tolist()) == list(range(-4, 5))

    images = uint8_images(8)
    out, _ = TrainAugment(only(crop_padding=4))(images, torch.zeros(8, dtype=torch.long), cpu_generator(3))
    padded = F.pad(color.to_float01(images), (4,) * 4, mode="reflect")
    found = []
    for i in range(8):
        matches = [
            (dx, dy) for dx in range(-4, 5) for dy in range(-4, 5)
            if torch.equal(out[i], color.normalize(padded[i : i + 1, :, 4 + dy : 36 + dy, 4 + dx : 36 + dx])[0])
        ]
        assert len(matches) == 1, (i, matches)
        found += matches
    assert len(set(found)) > 1


def test_rotation_zero_is_identity_and_ninety_is_rot90_counter_clockwise():
    images = float_images(3)
    assert torch.allclose(geometric.rotate(images, torch.zeros(3)), images, atol=1e-5)
    rotated = geometric.rotate(images, torch.full((3,), 90.0))
    ccw = torch.rot90(images, 1, dims=(-2, -1))
    assert torch.allclose(rotated[..., 1:-1, 1:-1], ccw[..., 1:-1, 1:-1], atol=1e-4)
    clockwise = torch.rot90(images, -1, dims=(-2, -1))
    assert (rotated - clockwise)[..., 1:-1, 1:-1].abs().max() > 0.1


def test_rotation_matches_torchvision_bilinear_per_sample():
    images = float_images(3, seed=1)
    angles = torch.tensor([30.0, -12.5, 7.0])
    out = geometric.rotate(images, angles)
    for i, angle in enumerate(angles.tolist()):
        # fill=None is plain zero padding; torchvision's fill=0 also darkens the edge pixels by the
        # sampled coverage (a mask blend), which we do not copy.
        reference = TF.rotate(images[i], angle, interpolation=InterpolationMode.BILINEAR, fill=None)
        assert torch.allclose(out[i], reference, atol=1e-4), angle
    wrong_direction = TF.rotate(images[0], -30.0, interpolation=InterpolationMode.BILINEAR)
    assert (out[0] - wrong_direction).abs().max() > 0.1


CORNERS = [[0, 0], [31, 0], [31, 31], [0, 31]]
MOVED = [[3, 2], [29, 1], [30, 28], [2, 31]]


def test_perspective_identity_and_match_with_torchvision():
    images = float_images(2, seed=2)
    start = torch.tensor([CORNERS, CORNERS])
    assert torch.allclose(geometric.perspective(images, start, start), images, atol=1e-5)

    end = torch.tensor([MOVED, CORNERS])
    out = geometric.perspective(images, start, end)
    reference = TF.perspective(images[0], CORNERS, MOVED, interpolation=InterpolationMode.BILINEAR)
    assert torch.allclose(out[0, :, 2:-2, 2:-2], reference[:, 2:-2, 2:-2], atol=1e-4)
    assert torch.allclose(out[1], images[1], atol=1e-5)
    swapped = TF.perspective(images[0], MOVED, CORNERS, interpolation=InterpolationMode.BILINEAR)
    assert (out[0] - swapped)[:, 2:-2, 2:-2].abs().max() > 0.1


def test_rotate_then_perspective_is_one_resampling_of_the_sequence():
    images = float_images(2, seed=3)
    angles = torch.full((2,), 90.0)
    start, end = torch.tensor([CORNERS, CORNERS]), torch.tensor([MOVED, MOVED])
    h, w = images.shape[-2:]
    combined = geometric.warp(images, geometric.rotation_matrices(angles, h, w)
                              @ geometric.perspective_matrices(start, end, h, w))
    sequence = geometric.perspective(geometric.rotate(images, angles), start, end)
    assert torch.allclose(combined[..., 2:-2, 2:-2], sequence[..., 2:-2, 2:-2], atol=1e-4)
    other_order = geometric.rotate(geometric.perspective(images, start, end), angles)
    assert (combined - other_order)[..., 2:-2, 2:-2].abs().max() > 0.1


def test_random_perspective_points_follow_torchvision_ranges_and_rate():
    n, prob = 20000, 0.5
    start, end, applied = geometric.random_perspective_points(n, 32, 32, 0.2, prob, cpu_generator())
    assert torch.equal(start[0], torch.tensor(CORNERS))
    inward = (end - start) * torch.tensor([[1, 1], [-1, 1], [-1, -1], [1, -1]])
    assert inward.min() == 0 and inward.max() == int(0.2 * 16)  # 0 … 3 pixels inward
    assert torch.equal(end[~applied], start[~applied])
    assert_binomial(int(applied.sum()), n, prob)
    assert (end[applied] != start[applied]).any(-1).any(-1).float().mean() > 0.99
    _, _, rarely = geometric.random_perspective_points(n, 32, 32, 0.2, 0.2, cpu_generator(1))
    assert_binomial(int(rarely.sum()), n, 0.2)


def test_flip_rate_and_angles_range():
    mask = geometric.random_flip_mask(20000, cpu_generator())
    assert_binomial(int(mask.sum()), 20000, 0.5)
    angles = geometric.random_angles(20000, 15.0, cpu_generator())
    assert angles.abs().max() <= 15.0 and angles.min() < -14.9 and angles.max() > 14.9


def test_cutout_zeroes_a_clipped_square():
    images = float_images(3) + 0.1  # no zero pixels to begin with
    centres = torch.tensor([[10, 20], [0, 0], [31, 5]])  # (x, y); the last two are clipped
    out = geometric.cutout(images, centres, 8)
    for i, (cx, cy) in enumerate(centres.tolist()):
        expected = images[i].clone()
        expected[:, max(cy - 4, 0) : cy + 4, max(cx - 4, 0) : cx + 4] = 0
        assert torch.equal(out[i], expected)
    assert [int((out[i, 0] == 0).sum()) for i in range(3)] == [64, 16, 40]


# ---------------------------------------------------------------- colour


def test_zero_jitter_is_the_identity_exactly():
    images = float_images(4)
    assert torch.equal(color.color_jitter(images), images)
    assert color.random_jitter_factors(4, 0.0, 0.0, 0.0, 0.0, cpu_generator()) == (None, None, None, None)


def test_brightness_scales_and_clamps():
    images = float_images(3)
    factors = torch.tensor([0.5, 1.3, 2.0])
    out = color.color_jitter(images, brightness_factors=factors)
    assert torch.equal(out, (images * factors.view(-1, 1, 1, 1)).clamp(0, 1))
    assert not torch.equal(out, images)


def test_saturation_zero_is_torchvision_grayscale_and_others_match():
    images = float_images(3)
    gray = color.color_jitter(images, saturation_factors=torch.zeros(3))
    assert torch.allclose(gray, TF.rgb_to_grayscale(images, num_output_channels=3), atol=1e-6)
    factors = torch.tensor([0.4, 1.0, 1.7])
    out_s, out_c = color.color_jitter(images, saturation_factors=factors), color.color_jitter(images, contrast_factors=factors)
    for i, factor in enumerate(factors.tolist()):
        assert torch.allclose(out_s[i], TF.adjust_saturation(images[i], factor), atol=1e-6)
        assert torch.allclose(out_c[i], TF.adjust_contrast(images[i], factor), atol=1e-6)
    assert (out_c[0] - TF.adjust_contrast(images[0], 1.7)).abs().max() > 0.05


def gray_axis_rotation(shift: float) -> torch.Tensor:
    """exp(θ·[k]×), k = (1, 1, 1)/√3, θ = 2π·shift: the hue rotation built independently, in float64."""
    k = 1 / math.sqrt(3)
    cross = torch.tensor([[0.0, -k, k], [k, 0.0, -k], [-k, k, 0.0]], dtype=torch.float64)
    return torch.linalg.matrix_exp(2 * math.pi * shift * cross).float()


def rotate_colours(image: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,jhw->ihw", matrix, image)


def test_hue_is_a_rotation_about_the_gray_axis():
    images = float_images(6, seed=4)
    images[0, :, :8, :8] = 0.5  # gray: must stay gray
    shifts = torch.tensor([-0.5, -0.1, 0.0, 0.05, 0.25, 0.5])
    out = color.color_jitter(images, hue_shifts=shifts)
    for i, shift in enumerate(shifts.tolist()):
        expected = rotate_colours(images[i], gray_axis_rotation(shift)).clamp(0, 1)
        assert torch.allclose(out[i], expected, atol=1e-5), shift
    assert torch.allclose(out[0, :, :8, :8], images[0, :, :8, :8], atol=1e-6)
    assert torch.allclose(out[2], images[2], atol=1e-6)
    wrong_way = rotate_colours(images[1], gray_axis_rotation(0.1)).clamp(0, 1)
    assert (out[1] - wrong_way).abs().max() > 0.05


def test_hue_third_turns_cycle_channels_exactly_like_torchvision():
    images = float_images(2, seed=6)
    for shift, roll in ((1 / 3, 1), (-1 / 3, -1)):  # a positive shift takes red to green
        out = color.color_jitter(images, hue_shifts=torch.full((2,), shift))
        assert torch.allclose(out, images.roll(roll, dims=1), atol=1e-5), shift
        for i in range(2):
            assert torch.allclose(out[i], TF.adjust_hue(images[i], shift), atol=1e-5), shift


def hsv_hue_and_chroma(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pixel HSV hue (turns, by colorsys) and chroma (max − min)."""
    pixels = images.permute(0, 2, 3, 1).reshape(-1, 3)
    hues = torch.tensor([colorsys.rgb_to_hsv(*pixel)[0] for pixel in pixels.tolist()])
    return hues, pixels.amax(1) - pixels.amin(1)


def test_hue_follows_torchvision_hsv_shift_within_the_documented_tolerance():
    # The rotation is linear, HSV's shift is not: they agree on the hue angle, not channel by channel.
    images = float_images(32, seed=7)
    shifts = torch.linspace(-0.1, 0.1, 32)
    out = color.color_jitter(images, hue_shifts=shifts)
    reference = torch.stack([TF.adjust_hue(images[i], shift) for i, shift in enumerate(shifts.tolist())])
    (hue_out, _), (hue_ref, chroma_ref) = hsv_hue_and_chroma(out), hsv_hue_and_chroma(reference)
    coloured = chroma_ref > 0.1  # hue is ill-defined near gray
    hue_error = ((hue_out - hue_ref + 0.5) % 1 - 0.5).abs()[coloured]
    assert hue_error.mean() < 0.01 and hue_error.max() < 0.05  # turns; the shifts reach 0.1
    opposite = torch.stack([TF.adjust_hue(images[i], -shift) for i, shift in enumerate(shifts.tolist())])
    assert (out - reference).abs().mean() < 0.5 * (out - opposite).abs().mean()


def test_color_jitter_is_torchvision_steps_in_fixed_order_then_a_gray_axis_rotation():
    # Pixels in [0.3, 0.7] and mild factors: no intermediate clamp binds, so dropping them is exact.
    images = 0.3 + 0.4 * float_images(3, seed=5)
    b, c = torch.tensor([0.8, 1.1, 1.2]), torch.tensor([1.2, 0.9, 0.8])
    s, h = torch.tensor([0.85, 1.15, 1.0]), torch.tensor([0.1, -0.05, 0.0])
    out = color.color_jitter(images, b, c, s, h)
    for i in range(3):
        x = TF.adjust_brightness(images[i], b[i].item())
        x = TF.adjust_contrast(x, c[i].item())
        x = TF.adjust_saturation(x, s[i].item())
        expected = rotate_colours(x, gray_axis_rotation(h[i].item())).clamp(0, 1)
        assert torch.allclose(out[i], expected, atol=1e-5), i
    hue_first = rotate_colours(TF.adjust_brightness(images[0], 0.8), gray_axis_rotation(0.1)).clamp(0, 1)
    other_order = TF.adjust_saturation(TF.adjust_contrast(hue_first, 1.2), 0.85)
    assert (out[0] - other_order).abs().max() > 1e-3


def test_color_jitter_clamps_once_at_the_end():
    images = float_images(2, seed=8)
    b, c = torch.tensor([1.6, 1.6]), torch.tensor([1.3, 1.3])
    out = color.color_jitter(images, b, c)
    x = images * b.view(-1, 1, 1, 1)  # unclamped brightness, then contrast with its mean luma
    mean_luma = TF.rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    c = c.view(-1, 1, 1, 1)
    assert torch.allclose(out, (c * x + (1 - c) * mean_luma).clamp(0, 1), atol=1e-5)
    per_step = torch.stack([TF.adjust_contrast(TF.adjust_brightness(images[i], 1.6), 1.3) for i in range(2)])
    assert (out - per_step).abs().max() > 0.02  # torchvision clips between the steps


def test_jitter_and_normalize_is_jitter_then_normalize_in_one_pass():
    images_uint8 = uint8_images(16, seed=9)
    b, c, s, h = color.random_jitter_factors(16, 0.8, 0.8, 0.8, 0.3, cpu_generator(2))
    mean, std = color.channel_stats("cpu")
    out = color.jitter_and_normalize(images_uint8.float(), (b, c, s, h), mean, std)
    expected = color.normalize(color.color_jitter(color.to_float01(images_uint8), b, c, s, h))
    assert torch.allclose(out, expected, atol=1e-5)
    low, high = (0 - mean) / std, (1 - mean) / std
    assert ((out >= low) & (out <= high)).all() and (out == low).any() and (out == high).any()


def test_jitter_factor_ranges():
    b, c, s, h = color.random_jitter_factors(20000, 0.2, 0.3, 1.5, 0.1, cpu_generator())
    for factors, low, high in ((b, 0.8, 1.2), (c, 0.7, 1.3), (s, 0.0, 2.5), (h, -0.1, 0.1)):
        assert factors.min() >= low and factors.max() <= high
        assert factors.min() < low + 0.01 and factors.max() > high - 0.01



def test_normalised_shift_and_scale_by_hand():
    images = torch.randn(6, 3, 4, 4, generator=cpu_generator())
    out = color.shift_and_scale(images, 0.14, 0.13, cpu_generator(5))
    draws = cpu_generator(5)
    s = (torch.rand(6, 1, 1, 1, generator=draws) * 2 - 1) * 0.14
    c = (torch.rand(6, 1, 1, 1, generator=draws) * 2 - 1) * 0.13 + 1
    assert torch.equal(out, (images + s) * c)
    assert (s.abs() <= 0.14).all() and ((c - 1).abs() <= 0.13).all() and not torch.equal(out, images)


def test_shift_and_scale_in_the_pipeline_and_off_at_zero():
    images, labels = uint8_images(8), torch.arange(8) % 10
    plain = AugmentConfig(crop_padding=2, flip="alternating", rotate_degrees=0, perspective_prob=0, brightness=0,
                          contrast=0, saturation=0, hue=0, mixup_prob=0, cutmix_prob=0)
    on = dataclasses.replace(plain, brightness_shift=0.14, contrast_scale=0.13)
    base, _ = TrainAugment(plain, channels_last=False)(images, labels, make_generator(0, 0, 0, 0, "cpu"))
    moved, _ = TrainAugment(on, channels_last=False)(images, labels, make_generator(0, 0, 0, 0, "cpu"))
    # the same crops and flips (drawn first), then each image moved by its own (s, c): moved = (base + s)·c
    per_image_c = (moved - moved.mean(dim=(1, 2, 3), keepdim=True)).std(dim=(1, 2, 3)) / \
        (base - base.mean(dim=(1, 2, 3), keepdim=True)).std(dim=(1, 2, 3))
    assert ((per_image_c - 1).abs() <= 0.13 + 1e-5).all() and not torch.allclose(moved, base)


def test_eval_transform_is_reference_normalisation():
    images = uint8_images(4)
    out = EvalTransform()(images)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    assert torch.allclose(out, (images.float() / 255 - mean) / std, atol=1e-6)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert not torch.allclose(out, (images.float() / 255 - 0.5) / 0.25, atol=1e-3)


# ---------------------------------------------------------------- mixing


@pytest.mark.parametrize("alpha", [0.4, 1.0, 3.0])
def test_beta_sampler_moments(alpha):
    draws = mix.sample_beta(alpha, (200_000,), cpu_generator())
    assert draws.min() >= 0 and draws.max() <= 1 and torch.isfinite(draws).all()
    variance = 1 / (4 * (2 * alpha + 1))
    assert abs(draws.mean().item() - 0.5) < 5 * math.sqrt(variance / draws.numel())
    assert abs(draws.var().item() / variance - 1) < 0.03


def _ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    grid = torch.linspace(0, 1, 1001)
    cdf = lambda x: torch.searchsorted(x.sort().values, grid).float() / x.numel()
    return (cdf(a) - cdf(b)).abs().max().item()


def test_beta_sampler_matches_torch_distribution_shape():
    ours = mix.sample_beta(0.4, (100_000,), cpu_generator())
    torch.manual_seed(0)
    reference = torch.distributions.Beta(0.4, 0.4).sample((100_000,))
    wrong = torch.distributions.Beta(0.8, 0.8).sample((100_000,))
    assert _ks_distance(ours, reference) < 0.012
    assert _ks_distance(ours, wrong) > 0.03


def test_mix_kind_frequencies():
    images, labels = float_images(4, size=4), torch.arange(4)
    batches = 3000
    kinds = torch.stack([
        mix.mix_batch(images, labels, 10, 0.3, 0.2, 1.0, 1.0, make_generator(0, 0, 0, step, "cpu"))[2]["kind"]
        for step in range(batches)
    ])
    for kind, p in ((mix.NONE, 0.5), (mix.MIXUP, 0.3), (mix.CUTMIX, 0.2)):
        assert_binomial(int((kinds == kind).sum()), batches, p)


def test_mixup_pixels_and_soft_targets():
    images, labels = float_images(8), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    for step in range(20):
        generator = make_generator(0, 0, 0, step, "cpu")
        mixed, targets, info = mix.mix_batch(images, labels, 10, 1.0, 0.0, 1.0, 1.0, generator)
        if abs(info["lam"].item() - 0.5) > 0.05:
            break
    lam, perm = info["lam"].item(), info["perm"]
    assert mix.MIX_KINDS[int(info["kind"])] == "mixup" and 0 < lam < 1
    assert sorted(perm.tolist()) == list(range(8))
    assert torch.allclose(mixed, lam * images + (1 - lam) * images[perm], atol=1e-6)
    assert not torch.allclose(mixed, (1 - lam) * images + lam * images[perm], atol=1e-3)
    onehot = F.one_hot(labels, 10).float()
    assert torch.allclose(targets, lam * onehot + (1 - lam) * onehot[perm], atol=1e-6)
    assert torch.allclose(targets.sum(1), torch.ones(8), atol=1e-6)


def test_cutmix_lambda_is_exact_pasted_area():
    n = 6
    images = torch.arange(1, n + 1, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    labels = torch.arange(n)
    touched_border = 0
    for step in range(40):
        generator = make_generator(1, 0, 0, step, "cpu")
        mixed, targets, info = mix.mix_batch(images, labels, 10, 0.0, 1.0, 1.0, 1.0, generator)
        assert mix.MIX_KINDS[int(info["kind"])] == "cutmix"
        lam, perm = info["lam"].item(), info["perm"]
        pasted = mixed[:, 0] != images[:, 0]  # every partner differs from its image everywhere
        for i in range(n):
            if perm[i] == i:
                assert torch.equal(mixed[i], images[i])
                continue
            assert int(pasted[i].sum()) == round((1 - lam) * 32 * 32)
            assert torch.equal(mixed[i][:, pasted[i]], images[perm[i]][:, pasted[i]])
        box = pasted[(perm != torch.arange(n)).nonzero()[0, 0]]
        if box.any():
            rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
            assert int(box.sum()) == len(rows) * len(cols)  # a rectangle
            touched_border += int(rows[0] == 0 or rows[-1] == 31 or cols[0] == 0 or cols[-1] == 31)
        assert torch.allclose(targets.sum(1), torch.ones(n), atol=1e-6)
        onehot = F.one_hot(labels, 10).float()
        assert torch.allclose(targets, lam * onehot + (1 - lam) * onehot[perm], atol=1e-6)
    assert touched_border > 0  # clipped boxes were among those checked


def test_soft_target_cross_entropy_equals_cross_entropy_for_one_hot():
    logits = torch.randn(16, 10, generator=cpu_generator())
    labels = torch.randint(0, 10, (16,), generator=cpu_generator(1))
    onehot = F.one_hot(labels, 10).float()
    for eps in (0.0, 0.1, 0.2):
        ours = soft_target_cross_entropy(logits, onehot, label_smoothing=eps)
        assert abs(ours.item() - F.cross_entropy(logits, labels, label_smoothing=eps).item()) < 1e-6
    mismatched = soft_target_cross_entropy(logits, onehot, label_smoothing=0.1)
    assert abs(mismatched.item() - F.cross_entropy(logits, labels, label_smoothing=0.2).item()) > 1e-3


# ---------------------------------------------------------------- pipeline


def test_make_generator_streams_are_deterministic_and_distinct():
    draw = lambda *key: torch.rand(4, generator=make_generator(*key, "cpu"))
    assert torch.equal(draw(0, 0, 0, 0), draw(0, 0, 0, 0))
    keys = [(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 0), (0, 0, 0, 1), (0, 0, 1, 1)]
    first = [draw(*key) for key in keys]
    for i in range(len(first)):
        for j in range(i):
            assert not torch.equal(first[i], first[j]), (i, j)


def test_train_augment_is_reproducible_from_seed_rank_epoch_step():
    augment = TrainAugment(AugmentConfig(cutout_size=8))
    images, labels = uint8_images(32), torch.randint(0, 10, (32,), generator=cpu_generator())
    def run(seed, rank, epoch, step):
        return augment(images, labels, make_generator(seed, rank, epoch, step, "cpu"), epoch)

    out_a, targets_a = run(0, 0, 2, 5)
    out_b, targets_b = run(0, 0, 2, 5)
    assert torch.equal(out_a, out_b) and torch.equal(targets_a, targets_b)
    assert not torch.equal(out_a, run(0, 0, 2, 6)[0])
    assert not torch.equal(out_a, run(0, 1, 2, 5)[0])


def test_train_augment_output_format():
    images, labels = uint8_images(16), torch.randint(0, 10, (16,), generator=cpu_generator())
    out, targets = TrainAugment(AugmentConfig())(images, labels, make_generator(0, 0, 0, 0, "cpu"))
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert targets.shape == (16, 10) and targets.dtype == torch.float32
    assert torch.allclose(targets.sum(1), torch.ones(16), atol=1e-6)
    plain_format = TrainAugment(AugmentConfig(), channels_last=False)
    plain, _ = plain_format(images, labels, make_generator(0, 0, 0, 0, "cpu"))
    assert plain.is_contiguous() and torch.equal(plain, out)
    with pytest.raises(ValueError, match="uint8"):
        TrainAugment(AugmentConfig())(images.float(), labels, make_generator(0, 0, 0, 0, "cpu"))


def test_all_strengths_zero_equals_eval_transform_exactly():
    images, labels = uint8_images(16), torch.randint(0, 10, (16,), generator=cpu_generator())
    out, targets = TrainAugment(ALL_OFF)(images, labels, make_generator(0, 0, 0, 0, "cpu"))
    assert torch.equal(out, EvalTransform()(images))
    assert torch.equal(targets, F.one_hot(labels, 10).float())
    augmented, _ = TrainAugment(AugmentConfig())(images, labels, make_generator(0, 0, 0, 0, "cpu"))
    assert not torch.allclose(augmented, out, atol=1e-2)


def _flip_states(out, images):
    plain, flipped = EvalTransform()(images), EvalTransform()(torch.flip(images, dims=[-1]))
    states = []
    for i in range(len(images)):
        is_plain, is_flipped = torch.equal(out[i], plain[i]), torch.equal(out[i], flipped[i])
        assert is_plain != is_flipped, i  # exactly one of the two
        states.append(is_flipped)
    return torch.tensor(states)


def test_random_flip_in_pipeline():
    images = uint8_images(64)
    labels = torch.zeros(64, dtype=torch.long)
    out, _ = TrainAugment(only(flip="random"))(images, labels, make_generator(0, 0, 0, 0, "cpu"))
    assert_binomial(int(_flip_states(out, images).sum()), 64, 0.5)


def test_alternating_flip_alternates_per_image_across_epochs():
    images, labels = uint8_images(64), torch.zeros(64, dtype=torch.long)
    augment = TrainAugment(only(flip="alternating"))
    states = [
        _flip_states(augment(images, labels, make_generator(0, 0, epoch, 0, "cpu"), epoch)[0], images)
        for epoch in range(3)
    ]
    assert torch.equal(states[1], ~states[0]) and torch.equal(states[2], states[0])
    assert_binomial(int(states[0].sum()), 64, 0.5)
    # The state follows the image, not its place in the batch or the step.
    perm = torch.randperm(64, generator=cpu_generator())
    shuffled = augment(images[perm], labels, make_generator(0, 0, 0, 7, "cpu"), 0)[0]
    assert torch.equal(_flip_states(shuffled, images[perm]), states[0][perm])
    other_augment = TrainAugment(only(flip="alternating"), seed=1)
    other_seed = other_augment(images, labels, make_generator(0, 0, 0, 0, "cpu"), 0)[0]
    assert not torch.equal(_flip_states(other_seed, images), states[0])


def test_cutout_in_pipeline_fills_a_clipped_square_with_normalised_black():
    images = uint8_images(32) | 1  # no black pixels to begin with
    labels = torch.zeros(32, dtype=torch.long)
    out, _ = TrainAugment(only(cutout_size=8))(images, labels, make_generator(0, 0, 0, 0, "cpu"))
    plain, black = EvalTransform()(images), EvalTransform()(torch.zeros_like(images[:1]))
    changed = (out != plain).any(1)
    assert torch.equal(changed, (out == black).all(1))
    sizes = changed.flatten(1).sum(1)
    assert sizes.max() == 64 and sizes.min() >= 16 and (sizes < 64).any()  # some squares clipped


def test_perspective_alone_leaves_unselected_samples_exact():
    n = 200
    images = uint8_images(n, size=24)  # a side that is not a power of two: resampling would not be exact
    cfg = only(perspective_distortion=0.5, perspective_prob=0.3)
    out, _ = TrainAugment(cfg)(images, torch.zeros(n, dtype=torch.long), make_generator(0, 0, 0, 0, "cpu"))
    untouched = (out == EvalTransform()(images)).flatten(1).all(1)
    assert_binomial(int((~untouched).sum()), n, 0.3)


# --- the recipe, split between host and device -----------------------------------------------

def test_torchvision_path_runs_the_host_ops_with_pil_and_leaves_the_rest_to_the_device():
    from torchvision import transforms as T

    from cifar_dist.augment.recipe import HOST_OPS, device_part, host_transforms
    from cifar_dist.config import AugmentConfig

    cfg = AugmentConfig(cutout_size=8, mixup_prob=0.2, cutmix_prob=0.3)
    device = device_part(cfg, "torchvision")
    assert all(getattr(device, key) == off for key, off in HOST_OPS.items())
    assert (device.cutout_size, device.mixup_prob, device.cutmix_prob) == (8, 0.2, 0.3)  # honoured on the device
    assert device_part(cfg, "gpu") == cfg and device_part(cfg, "ffcv") == cfg
    kinds = [type(t) for t in host_transforms(cfg).transforms]
    assert kinds == [T.RandomCrop, T.RandomHorizontalFlip, T.RandomRotation, T.ColorJitter, T.RandomPerspective]
    assert [type(t) for t in host_transforms(AugmentConfig(flip="none", rotate_degrees=0, perspective_prob=0,
                                                           brightness=0, contrast=0, saturation=0,
                                                           hue=0)).transforms] == [T.RandomCrop]
