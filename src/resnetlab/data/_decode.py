"""Image decoding for the worker processes of folder.py: numpy and PIL only, nothing that a
forked child could find in a half-held state (torch, CUDA)."""
from __future__ import annotations

import os

import numpy as np


def decode_chunk(task: tuple[str, list[str], tuple[int, int] | None]):
    """Decode `names` under `root` to uint8 n x 3 x H x W. Returns (array or None, formats,
    problems): problems are (index, kind, message), kind "bad" (unreadable) or "size" (not `size`)."""
    from PIL import Image

    root, names, size = task
    out = None
    formats, problems = set(), []
    for i, name in enumerate(names):
        try:
            with Image.open(os.path.join(root, name)) as image:
                image.load()
                formats.add(image.format or "unknown")
                eight_bit = as_eight_bit(image)
                rgb = eight_bit if eight_bit.mode == "RGB" else eight_bit.convert("RGB")
                # tobytes + frombuffer: a third cheaper than np.asarray's array-interface path
                pixels = np.frombuffer(rgb.tobytes(), np.uint8).reshape(rgb.height, rgb.width, 3)
        except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
            problems.append((i, "bad", f"{type(error).__name__}: {error}"))
            continue
        if size is None:
            size = pixels.shape[:2]
        if pixels.shape[:2] != tuple(size):
            problems.append((i, "size", f"{pixels.shape[1]}x{pixels.shape[0]}"))
            continue
        if out is None:
            out = np.zeros((len(names), 3, *size), dtype=np.uint8)
        out[i] = pixels.transpose(2, 0, 1)
    return out, formats, problems


def as_eight_bit(image):
    """16-bit grey ("I;16*", or "I" from older Pillow) as 8-bit grey: the top 8 bits. PIL's own
    convert("RGB") clips such values at 255, which turns a 16-bit image white."""
    if image.mode != "I" and not image.mode.startswith("I;16"):
        return image
    from PIL import Image

    wide = np.asarray(image).astype(np.int64).clip(0, 65535)
    return Image.fromarray((wide >> 8).astype(np.uint8))
