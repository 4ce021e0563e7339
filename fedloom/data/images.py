"""Images of any source (PIL images, HWC or CHW arrays) as fedloom's float32 [N, C, H, W] in [0, 1]."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .datasets import DataError

_GRAY_MODES = {"1", "L", "I", "I;16", "F"}
_CHANNELS = (1, 3, 4)


def pil_images(images: Sequence[Any], source: str) -> np.ndarray:
    """PIL images, all of one size, as float32 [N, C, H, W] in [0, 1]: grayscale when every image is
    grayscale, else RGB (palette, CMYK, ... images converted, an alpha channel dropped)."""
    if not images:
        raise DataError(f"{source}: the data is empty (0 examples)")
    modes = {image.mode for image in images}
    mode = "L" if modes <= _GRAY_MODES else "RGB"
    sizes = [image.size for image in images]
    odd = next((i for i, size in enumerate(sizes) if size != sizes[0]), None)
    if odd is not None:
        raise DataError(f"{source}: images must share one size; image 0 is {sizes[0][0]}x{sizes[0][1]}, "
                        f"image {odd} is {sizes[odd][0]}x{sizes[odd][1]} (resize them first)")
    pixels = np.stack([np.asarray(image if image.mode == mode else image.convert(mode)) for image in images])
    return array_images(pixels, source)


def array_images(pixels: np.ndarray, source: str) -> np.ndarray:
    """Image arrays [N, H, W], [N, H, W, C] or [N, C, H, W] (C in 1, 3, 4; channels-last preferred when
    both fit, as PIL and Hugging Face store them) as float32 [N, C, H, W]. Integers are 0..255 and divided
    by 255; floats must already lie in [0, 1]."""
    if pixels.dtype == object:
        raise DataError(f"{source}: images must share one shape (got arrays of different shapes)")
    if pixels.ndim == 3:
        pixels = pixels[:, None]
    elif pixels.ndim == 4 and pixels.shape[3] in _CHANNELS:
        pixels = pixels.transpose(0, 3, 1, 2)
    elif pixels.ndim != 4 or pixels.shape[1] not in _CHANNELS:
        raise DataError(f"{source}: images must be [N, H, W], [N, H, W, C] or [N, C, H, W] with C in 1, 3, 4; "
                        f"got shape {pixels.shape}")
    return _scaled(np.ascontiguousarray(pixels), source)


def _scaled(pixels: np.ndarray, source: str) -> np.ndarray:
    if pixels.dtype.kind in "iu":
        if pixels.size and (pixels.min() < 0 or pixels.max() > 255):
            raise DataError(f"{source}: integer pixel values must be 0..255, found {pixels.min()}..{pixels.max()}")
        return pixels.astype(np.float32) / np.float32(255)
    if pixels.dtype.kind == "b":
        return pixels.astype(np.float32)
    if pixels.dtype.kind != "f":
        raise DataError(f"{source}: pixel values must be numbers, got {pixels.dtype}")
    if pixels.size and not (np.nanmin(pixels) >= 0 and np.nanmax(pixels) <= 1):
        raise DataError(f"{source}: float pixel values must lie in [0, 1] (or be integers 0..255), "
                        f"found {np.nanmin(pixels)}..{np.nanmax(pixels)}")
    return pixels.astype(np.float32)
