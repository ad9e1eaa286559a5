"""Normalisation from the training split and the in-memory loader: seeded epochs, sharding,
dtypes, memory format, normalise-then-pad."""
from __future__ import annotations

import json

import pytest
import torch

from resnetlab.data import AugmentSpec, InMemoryLoader, Normalizer, compute_normalizer
from resnetlab.errors import ConfigError, DataError


def labelled_images(n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with i % 256 and has label i, so a batch shows which samples it holds."""
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1, 1).expand(n, 3, 8, 8).contiguous()
    return images, torch.arange(n)


# --- normaliser -----------------------------------------------------------------------------------
def test_per_pixel_mean_is_the_mean_image_and_centres_the_train_set():
    images = torch.randint(0, 256, (500, 3, 8, 8), dtype=torch.uint8)
    norm = compute_normalizer(images, "per_pixel")
    assert norm.mean.shape == (3, 8, 8) and norm.std.shape == (3, 1, 1) and torch.equal(norm.std, torch.ones(3, 1, 1))
    assert torch.allclose(norm.mean, images.double().mean(0).div(255).float(), atol=1e-6)
    out = norm(images)
    assert out.dtype == torch.float32 and out.mean(0).abs().max() < 1e-5


def test_per_channel_gives_zero_mean_unit_std_per_channel():
    images = torch.randint(0, 256, (300, 3, 8, 8), dtype=torch.uint8)
    images[:, 1] //= 4  # channels with different statistics
    norm = compute_normalizer(images, "per_channel")
    assert norm.mean.shape == norm.std.shape == (3, 1, 1)
    out = norm(images).double()
    assert torch.allclose(out.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(out.std((0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("mode", ["per_pixel", "per_channel"])
def test_normaliser_round_trips_through_json(mode):
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8)
    norm = compute_normalizer(images, mode)
    back = Normalizer.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert back.mode == mode and torch.equal(back.mean, norm.mean) and torch.equal(back.std, norm.std)
    assert torch.equal(back(images), norm(images))


def test_normaliser_errors():
    with pytest.raises(DataError, match="per_pixel"):
        compute_normalizer(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "per_image")
    with pytest.raises(DataError, match="invalid normaliser record"):
        Normalizer.from_dict({"mode": "per_pixel"})


# --- loader ---------------------------------------------------------------------------------------
def epoch(loader, number):
    loader.set_epoch(number)
    return [y.tolist() for _, y in loader]


def test_every_sample_once_per_epoch_and_lengths():
    images, labels = labelled_images(100)
    loader = InMemoryLoader(images, labels, batch_size=32)
    batches = epoch(loader, 0)
    assert len(loader) == len(batches) == 4 and [len(b) for b in batches] == [32, 32, 32, 4]
    assert sorted(sum(batches, [])) == list(range(100))
    dropping = InMemoryLoader(images, labels, batch_size=32, drop_last=True)
    assert len(dropping) == 3 and [len(b) for b in epoch(dropping, 0)] == [32] * 3


def test_order_is_a_function_of_seed_and_epoch():
    images, labels = labelled_images(100)
    a = InMemoryLoader(images, labels, batch_size=10, seed=3)
    b = InMemoryLoader(images, labels, batch_size=10, seed=3)
    assert epoch(a, 0) == epoch(b, 0) and epoch(a, 5) == epoch(b, 5)
    assert epoch(a, 0) != epoch(a, 1)
    assert epoch(a, 0) != epoch(InMemoryLoader(images, labels, batch_size=10, seed=4), 0)
    assert epoch(a, 2) == epoch(a, 2)  # iterating again replays the epoch
    assert sum(epoch(InMemoryLoader(images, labels, batch_size=10, shuffle=False), 0), []) == list(range(100))


def test_augmentation_is_reproducible_per_epoch():
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    loader = InMemoryLoader(images, torch.arange(64), batch_size=16, seed=1, augment=AugmentSpec(crop_padding=2))
    loader.set_epoch(1)
    first = [x.clone() for x, _ in loader]
    again = [x for x, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_disjoint_equal_slices(world_size):
    images, labels = labelled_images(100)
    per_rank = []
    for rank in range(world_size):
        loader = InMemoryLoader(images, labels, batch_size=8, seed=7, rank=rank, world_size=world_size)
        per_rank.append(sum(epoch(loader, 4), []))
    assert all(len(samples) == 100 // world_size for samples in per_rank)
    seen = sum(per_rank, [])
    assert len(seen) == len(set(seen)) == (100 // world_size) * world_size


def test_batches_are_normalised_padded_with_zero_and_typed():
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(40)
    norm = compute_normalizer(images, "per_pixel")
    loader = InMemoryLoader(images, labels, batch_size=40, shuffle=False, normalizer=norm, dtype=torch.bfloat16)
    x, y = next(iter(loader))
    assert x.dtype == torch.bfloat16 and y.dtype == torch.int64 and x.shape == (40, 3, 8, 8)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x.float(), norm(images), atol=2e-2)
    plain = next(iter(InMemoryLoader(images, labels, batch_size=40, shuffle=False, channels_last=False)))[0]
    assert plain.dtype == torch.float32 and plain.is_contiguous() and torch.equal(plain, images.float() / 255)
    # normalise first, then pad: a crop that shows padding shows exact zeros (= the mean image)
    pad_only = AugmentSpec(crop_padding=4, flip=False)
    crops = InMemoryLoader(images, labels, batch_size=40, normalizer=norm, augment=pad_only)
    x, _ = next(iter(crops))
    assert (x == 0).any() and ((x == 0).float().mean() > 0.1)


def test_labels_follow_their_images_through_augmentation():
    images, labels = labelled_images(100)
    loader = InMemoryLoader(images, labels, batch_size=25, augment=AugmentSpec(crop_padding=2, flip=True))
    for x, y in loader:
        # a crop's centre pixel is never padding and each image is constant: it encodes the label
        assert torch.equal((x[:, :, 4, 4] * 255).round().long(), (y % 256)[:, None].expand(-1, 3))


def mirrored_per_image(loader, number) -> torch.Tensor:
    """Which images the loader mirrored in epoch `number`, by image index. The images are dark on
    their left half, so a mirrored one is dark on its right half instead."""
    loader.set_epoch(number)
    mirrored = torch.zeros(len(loader.images), dtype=torch.bool)
    for x, y in loader:
        mirrored[y] = x[:, :, :, 4:].abs().sum((1, 2, 3)) == 0
    return mirrored


def left_dark_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.randint(1, 256, (n, 3, 8, 8), dtype=torch.uint8)
    images[:, :, :, :4] = 0
    return images, torch.arange(n)


def test_alternating_flips_mirror_each_image_in_every_other_epoch():
    images, labels = left_dark_images(200)
    spec = AugmentSpec(crop_padding=0, flip=True, flip_mode="alternate")
    loader = InMemoryLoader(images, labels, batch_size=64, seed=5, augment=spec)
    epochs = [mirrored_per_image(loader, number) for number in range(4)]
    assert torch.equal(epochs[1], ~epochs[0]) and torch.equal(epochs[2], epochs[0]) and torch.equal(epochs[3], ~epochs[0])
    assert 60 < int(epochs[0].sum()) < 140  # the phase is drawn per image, about half start mirrored
    other_seed = InMemoryLoader(images, labels, batch_size=64, seed=6, augment=spec)
    assert not torch.equal(mirrored_per_image(other_seed, 0), epochs[0])
    # random flips: epochs are independent, so some images keep their orientation from one to the next
    random = InMemoryLoader(images, labels, batch_size=64, seed=5, augment=AugmentSpec(crop_padding=0, flip=True))
    assert (mirrored_per_image(random, 0) == mirrored_per_image(random, 1)).any()


def test_alternating_flip_phase_is_shared_by_all_ranks():
    images, labels = left_dark_images(120)
    spec = AugmentSpec(crop_padding=0, flip=True, flip_mode="alternate")
    whole = mirrored_per_image(InMemoryLoader(images, labels, batch_size=16, seed=2, augment=spec), 3)
    for rank in range(2):
        shard = InMemoryLoader(images, labels, batch_size=16, seed=2, augment=spec, rank=rank, world_size=2)
        shard.set_epoch(3)
        for x, y in shard:
            assert torch.equal(x[:, :, :, 4:].abs().sum((1, 2, 3)) == 0, whole[y])


def test_unknown_flip_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="flip_mode"):
        AugmentSpec(flip_mode="sometimes")


def test_bad_loader_arguments_are_config_errors():
    images, labels = labelled_images(10)
    with pytest.raises(ConfigError):
        InMemoryLoader(images, labels[:5], batch_size=2)
    with pytest.raises(ConfigError):
        InMemoryLoader(images, labels, batch_size=2, rank=2, world_size=2)
    with pytest.raises(ConfigError):
        InMemoryLoader(images.float(), labels, batch_size=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_cpu_batches_for_the_same_seed():
    images = torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(96)
    norm = compute_normalizer(images)
    kwargs = dict(batch_size=32, seed=11, normalizer=norm, augment=AugmentSpec(cutout=8))
    cpu, gpu = InMemoryLoader(images, labels, **kwargs), InMemoryLoader(images, labels, device="cuda", **kwargs)
    for loader in (cpu, gpu):
        loader.set_epoch(3)
    for (x_cpu, y_cpu), (x_gpu, y_gpu) in zip(cpu, gpu):
        assert x_gpu.is_cuda and y_gpu.is_cuda and x_gpu.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y_cpu, y_gpu.cpu())
        assert torch.allclose(x_cpu, x_gpu.cpu(), atol=1e-5)
