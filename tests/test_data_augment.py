"""Batched augmentation: every crop offset and flip as frequent as in the per-sample version,
exactly the per-sample result for each drawn offset, shapes and devices preserved."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from resnetlab.data import augment
from resnetlab.data.augment import AugmentSpec, augment_batch
from resnetlab.errors import ConfigError

H = W = 32
PAD = 4


def coordinate_batch(n: int, channels: int = 3) -> torch.Tensor:
    """Every pixel holds 1 + its row-major position, so a crop's content tells its offset."""
    grid = (torch.arange(H * W, dtype=torch.float32) + 1).view(1, 1, H, W)
    return grid.expand(n, channels, H, W).clone()


def recover(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dy, dx, flipped) of each crop from the centre pixels (always inside the original image)."""
    centre = out[:, 0, 16, 16].long() - 1
    flipped = out[:, 0, 16, 17] < out[:, 0, 16, 16]
    row, col = centre // W, centre % W
    dy = row - 16 + PAD
    dx = torch.where(flipped, col - (W - 1 - 16) + PAD, col - 16 + PAD)
    return dy, dx, flipped


def chi_square(counts: torch.Tensor) -> float:
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def chi_square_limit(cells: int) -> float:
    # mean (cells-1), sd sqrt(2(cells-1)): 5 sd is far outside chance for a fixed seed
    dof = cells - 1
    return dof + 5 * (2 * dof) ** 0.5


def reference_crop(x: torch.Tensor, dy, dx, flipped, mode="zeros") -> torch.Tensor:
    """The per-sample version: pad one image, slice its window, maybe mirror it."""
    padded = F.pad(x, (PAD,) * 4, mode="constant" if mode == "zeros" else "reflect")
    crops = []
    for i in range(len(x)):
        crop = padded[i, :, dy[i] : dy[i] + H, dx[i] : dx[i] + W]
        crops.append(crop.flip(2) if flipped[i] else crop)
    return torch.stack(crops)


def test_crop_offsets_are_uniform_over_all_81_positions():
    n = 81 * 200
    out = augment.random_crop(coordinate_batch(n, 1), PAD, generator=torch.Generator().manual_seed(0))
    dy, dx, flipped = recover(out)
    assert not flipped.any()
    counts = torch.bincount(dy * 9 + dx, minlength=81).double()
    assert counts.numel() == 81 and (counts > 0).all()
    assert chi_square(counts) < chi_square_limit(81)


def test_crop_flip_draws_offsets_and_flips_independently_and_uniformly():
    n = 162 * 150
    out = augment.random_crop_flip(coordinate_batch(n, 1), PAD, generator=torch.Generator().manual_seed(1))
    dy, dx, flipped = recover(out)
    counts = torch.bincount((dy * 9 + dx) * 2 + flipped.long(), minlength=162).double()
    assert counts.numel() == 162 and chi_square(counts) < chi_square_limit(162)


def test_flip_frequency_is_one_half():
    n = 20_000
    x = coordinate_batch(n, 1)
    out = augment.random_flip(x, generator=torch.Generator().manual_seed(2))
    flipped = out[:, 0, 0, 0] != x[:, 0, 0, 0]
    assert torch.equal(out[flipped], x[flipped].flip(3)) and torch.equal(out[~flipped], x[~flipped])
    assert abs(flipped.double().mean().item() - 0.5) < 5 * (0.25 / n) ** 0.5


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_each_crop_equals_the_per_sample_crop(mode):
    x = torch.randn(64, 3, H, W)
    generator = torch.Generator().manual_seed(3)
    coords = augment.random_crop_flip(coordinate_batch(64), PAD, mode, generator=torch.Generator().manual_seed(3))
    dy, dx, flipped = recover(coords)  # same seed -> same draws as below
    out = augment.random_crop_flip(x, PAD, mode, generator=generator)
    assert torch.equal(out, reference_crop(x, dy, dx, flipped, mode))
    if mode == "zeros":
        corner = out[(dy == 0) & (dx == 0) & ~flipped]
        assert (corner[:, :, :PAD, :] == 0).all() and (corner[:, :, :, :PAD] == 0).all()


def test_shapes_dtypes_channels_last_and_determinism():
    x = torch.randn(16, 3, H, W).contiguous(memory_format=torch.channels_last)
    spec = AugmentSpec(crop_padding=4, flip=True, cutout=8)
    a = augment_batch(x, spec, torch.Generator().manual_seed(5))
    b = augment_batch(x.contiguous(), spec, torch.Generator().manual_seed(5))
    assert a.shape == x.shape and a.dtype == x.dtype and torch.equal(a, b)
    assert not torch.equal(a, augment_batch(x, spec, torch.Generator().manual_seed(6)))
    bf16 = augment_batch(x.bfloat16(), spec, torch.Generator().manual_seed(5))
    assert bf16.dtype == torch.bfloat16 and bf16.shape == x.shape


def test_no_padding_and_no_spec_change_nothing():
    x = torch.randn(4, 3, H, W)
    assert torch.equal(augment.random_crop(x, padding=0), x)
    assert torch.equal(augment_batch(x, AugmentSpec(crop_padding=0, flip=False)), x)


def test_cutout_zeroes_one_clipped_square_with_uniform_centres():
    n, size = 20_000, 8
    out = augment.cutout(torch.ones(n, 3, H, W), size, generator=torch.Generator().manual_seed(7))
    holes = out[:, 0] == 0
    assert torch.equal(out[:, 0] == 0, out[:, 2] == 0)  # same square in every channel
    rows, cols = holes.any(2), holes.any(1)
    assert (holes.sum((1, 2)) == rows.sum(1) * cols.sum(1)).all()  # a rectangle
    assert (rows.sum(1) <= size).all() and (rows.sum(1) >= size // 2).all()
    # a centre at row r covers rows r-4 .. r+3, clipped: the first covered row is max(0, r-4), so
    # rows 1..27 are hit equally often and row 0 five times as often (centres 0..4)
    first_row = rows.int().argmax(1)
    counts = torch.bincount(first_row, minlength=H).double()
    assert counts[28:].sum() == 0
    assert chi_square(counts[1:28]) < chi_square_limit(27)
    assert abs(counts[0] / counts[1:28].mean() - 5) < 0.5


def test_bad_specs_are_config_errors():
    with pytest.raises(ConfigError):
        AugmentSpec(padding_mode="edge")
    with pytest.raises(ConfigError):
        augment.random_crop(torch.zeros(1, 3, 8, 8), 2, "wrap")


def test_flip_tta_averages_logits_of_image_and_mirror():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 5))
    x = torch.randn(2, 3, 4, 4)
    expected = (model(x) + model(x.flip(3))) / 2
    assert torch.allclose(augment.flip_tta_logits(model, x), expected)


def test_shift_moves_the_content_and_fills_zeros():
    x = torch.arange(1, 26, dtype=torch.float32).view(1, 1, 5, 5)
    down_right = augment.shift(x, 1, 1)
    assert torch.equal(down_right[..., 1:, 1:], x[..., :-1, :-1])
    assert not down_right[..., 0, :].any() and not down_right[..., :, 0].any()
    up_left = augment.shift(x, -1, 2)
    assert torch.equal(up_left[..., :-1, 2:], x[..., 1:, :-2])
    assert not up_left[..., -1, :].any() and not up_left[..., :, :2].any()
    assert augment.shift(x, 0, 0) is x


def test_shift_with_reflect_fill_mirrors_the_border_like_reflect_padded_crops():
    x = torch.arange(1, 26, dtype=torch.float32).view(1, 1, 5, 5)
    down_right = augment.shift(x, 1, 1, "reflect")
    assert torch.equal(down_right[..., 1:, 1:], x[..., :-1, :-1])
    assert torch.equal(down_right[..., 0, 1:], x[..., 1, :-1])  # row -1 of the image mirrors row 1
    assert torch.equal(down_right[..., 1:, 0], x[..., :-1, 1])
    assert torch.equal(down_right, torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")[..., :5, :5])
    assert not torch.equal(down_right, augment.shift(x, 1, 1))
    with pytest.raises(ConfigError, match="padding_mode"):
        augment.shift(x, 1, 1, "wrap")


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_flip_shift_tta_fills_its_views_as_the_training_crops_were_padded(padding_mode):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 6, 4))
    x = torch.randn(2, 3, 6, 6)
    mode = "constant" if padding_mode == "zeros" else "reflect"
    views = [torch.nn.functional.pad(image, (1, 1, 1, 1), mode=mode)[..., 1 - r : 7 - r, 1 - c : 7 - c]
             for image in (x, x.flip(3)) for r, c in augment.SHIFT_TTA_OFFSETS]
    expected = torch.stack([model(v) for v in views]).mean(dim=0)
    assert torch.allclose(augment.tta_logits(model, x, "flip-shift", padding_mode), expected, atol=1e-6)


def test_flip_shift_tta_averages_ten_distinct_views():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 6, 4))
    x = torch.randn(3, 3, 6, 6)
    views = []
    for image in (x, x.flip(3)):
        for rows, cols in ((0, 0), (1, 1), (-1, -1), (1, -1), (-1, 1)):
            padded = torch.nn.functional.pad(image, (1, 1, 1, 1))
            views.append(padded[..., 1 - rows : 7 - rows, 1 - cols : 7 - cols])
    assert len({tuple(v.flatten().tolist()) for v in views}) == 10
    expected = torch.stack([model(v) for v in views]).mean(dim=0)
    assert torch.allclose(augment.flip_shift_tta_logits(model, x), expected, atol=1e-6)
    assert torch.allclose(augment.tta_logits(model, x, "flip-shift"), expected, atol=1e-6)
    assert torch.allclose(augment.tta_logits(model, x, "flip"), augment.flip_tta_logits(model, x))
    assert torch.equal(augment.tta_logits(model, x, "none"), model(x))
