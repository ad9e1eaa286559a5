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
                rgb = image if image.mode == "RGB" else image.convert("RGB")
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
