"""Bad and unusual image files: corrupt or truncated JPEG/PNG, empty or fake files, a decompression
bomb, an empty class folder -- one line naming the file (and how to skip it), for loading, `train`
and `predict`; and every image mode Pillow hands back (grey, grey+alpha, palette, 1-bit, CMYK,
RGBA, 16-bit grey, 48-bit RGB) becomes the RGB pixels a person would expect.
(tests/test_data_formats.py and tests/test_data_cli.py cover plain grey/RGBA and the inspect CLI.)"""
from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from evalkit import assert_one_line_error, run_cli, write_checkpoint, write_image_folder
from PIL import Image

from resnetlab.data import load_dataset
from resnetlab.errors import DataError

TRAIN = ["--model", "resnet8", "--set", "model.options.width=0.25", "--val-size", "6", "--epochs", "1",
         "--device", "cpu", "--precision", "fp32", "--set", "train.batch_size=16", "--set", "runtime.threads=1",
         "--quiet"]


def png_bytes(pixels: np.ndarray, color_type: int, bit_depth: int = 16) -> bytes:
    """A PNG written by hand, for what Pillow cannot write (48-bit RGB). color_type 0 grey, 2 RGB."""
    height, width = pixels.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + pixels[row].astype(dtype).tobytes() for row in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


SIZE = 8
RGB = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
GREY16 = (np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE) * 1021)
RGB48 = np.stack([GREY16, 65535 - GREY16, np.full_like(GREY16, 0x80FF)], axis=-1)
PALETTE = Image.fromarray(RGB).quantize(16)

# file name -> (bytes, the RGB pixels expected, H x W x 3)
MODES = {
    "grey.png": (encoded(Image.fromarray(RGB[..., 0]), "PNG"), np.repeat(RGB[..., :1], 3, axis=2)),
    "grey-alpha.png": (encoded(Image.fromarray(RGB[..., 0]).convert("LA"), "PNG"), np.repeat(RGB[..., :1], 3, axis=2)),
    "palette.png": (encoded(PALETTE, "PNG"), np.asarray(PALETTE.convert("RGB"))),
    "bilevel.png": (encoded(Image.fromarray(RGB[..., 0] > 127), "PNG"),
                    np.repeat(np.where(RGB[..., :1] > 127, 255, 0), 3, axis=2)),
    "rgba.png": (encoded(Image.fromarray(np.dstack([RGB, RGB[..., :1]]), "RGBA"), "PNG"), RGB),
    "grey16.png": (png_bytes(GREY16, 0), np.repeat((GREY16 >> 8)[..., None], 3, axis=2)),
    "rgb48.png": (png_bytes(RGB48, 2), (RGB48 >> 8)),
}


@pytest.fixture
def mode_folder(tmp_path):
    for index, (name, (data, _)) in enumerate(MODES.items()):
        folder = tmp_path / "train" / f"{index:02d}-{name.split('.')[0]}"
        folder.mkdir(parents=True)
        (folder / name).write_bytes(data)
    return tmp_path


def test_every_image_mode_becomes_the_expected_rgb_pixels(mode_folder):
    train = load_dataset(mode_folder, val_size=0).train
    assert train.images.shape == (len(MODES), 3, SIZE, SIZE)
    for label, (name, (_, expected)) in enumerate(MODES.items()):
        got = train.images[train.labels == label][0].permute(1, 2, 0).numpy()
        assert np.array_equal(got, expected.astype(np.uint8)), name


def test_sixteen_bit_grey_is_not_clipped_to_white(mode_folder):
    """Pillow's own convert("RGB") clips 16-bit grey at 255: every pixel above 255 came out white."""
    train = load_dataset(mode_folder, val_size=0).train
    label = list(MODES).index("grey16.png")
    grey = train.images[train.labels == label][0, 0]
    assert grey.float().std() > 30 and int(grey.min()) == 0 and int(grey.max()) == GREY16.max() >> 8


def test_predict_reads_sixteen_bit_grey_like_its_eight_bit_copy(capsys, tmp_path):
    checkpoint = write_checkpoint(tmp_path / "model.safetensors")
    wide = tmp_path / "grey16.png"
    wide.write_bytes(MODES["grey16.png"][0])
    narrow = tmp_path / "grey8.png"
    Image.fromarray((GREY16 >> 8).astype(np.uint8)).save(narrow)
    code, out, err = run_cli(capsys, "predict", "--checkpoint", checkpoint, wide, narrow, "--json", "--device", "cpu")
    assert code == 0, err
    first, second = ({k: v for k, v in p.items() if k != "image"} for p in json.loads(out))
    assert first == second


def _bomb() -> bytes:
    """A PNG whose header claims 30000 x 30000 pixels (900 M, past Pillow's bomb limit)."""
    small = png_bytes(np.zeros((1, 1), np.uint8), 0, bit_depth=8)
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    ihdr = struct.pack(">I", 13) + b"IHDR" + header + struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return small[:8] + ihdr + small[8 + len(ihdr):]


GOOD_PNG = encoded(Image.fromarray(RGB), "PNG")
GOOD_JPEG = encoded(Image.fromarray(RGB), "JPEG")
CORRUPT = {
    "truncated.jpg": GOOD_JPEG[: len(GOOD_JPEG) // 2],
    "garbage-body.jpg": GOOD_JPEG[:200] + bytes(range(256)) * 4,
    "truncated.png": GOOD_PNG[: len(GOOD_PNG) // 2],
    "bad-idat.png": GOOD_PNG[:45] + b"\x00" * 20 + GOOD_PNG[65:],
    "empty.png": b"",
    "text.jpg": b"this is not an image\n",
    "bomb.png": _bomb(),
}


@pytest.mark.parametrize("name", list(CORRUPT))
def test_a_corrupt_file_is_named_and_can_be_skipped(tmp_path, name):
    write_image_folder(tmp_path, "train", per_class=3, size=SIZE)
    bad = tmp_path / "train" / "cat" / f"zz-{name}"
    bad.write_bytes(CORRUPT[name])
    with pytest.raises(DataError) as error:
        load_dataset(tmp_path, val_size=0)
    message = str(error.value)
    assert "\n" not in message and str(bad) in message and "--skip-bad-images" in message, message
    train = load_dataset(tmp_path, val_size=0, skip_bad_images=True).train
    assert len(train.labels) == 9


@pytest.mark.parametrize("name", ["truncated.jpg", "bad-idat.png", "text.jpg", "bomb.png"])
def test_predict_on_a_corrupt_file_is_one_line(capsys, tmp_path, name):
    checkpoint = write_checkpoint(tmp_path / "model.safetensors")
    bad = tmp_path / name
    bad.write_bytes(CORRUPT[name])
    assert_one_line_error(*run_cli(capsys, "predict", "--checkpoint", checkpoint, bad, "--device", "cpu"), str(bad))


def test_train_on_a_corrupt_image_is_one_line_then_skips_it_when_asked(capsys, tmp_path):
    data = write_image_folder(tmp_path / "data", "train", per_class=12)
    bad = data / "train" / "dog" / "zz-truncated.jpg"
    bad.write_bytes(CORRUPT["truncated.jpg"])
    code, out, err = run_cli(capsys, "train", *TRAIN, "--data-dir", data, "--out", tmp_path / "run")
    assert_one_line_error(code, out, err, str(bad), "--skip-bad-images")
    assert not (tmp_path / "run").exists()
    code, out, err = run_cli(capsys, "train", *TRAIN, "--data-dir", data, "--out", tmp_path / "run",
                             "--skip-bad-images")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["skip_bad_images"] is True


def test_train_with_an_empty_class_folder_is_one_line(capsys, tmp_path):
    data = write_image_folder(tmp_path / "data", "train", per_class=4)
    (data / "train" / "frog").mkdir()
    code, out, err = run_cli(capsys, "train", *TRAIN, "--data-dir", data, "--out", tmp_path / "run")
    assert_one_line_error(code, out, err, "frog", "no images")
    assert not (tmp_path / "run").exists()
