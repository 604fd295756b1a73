"""Image input and output: decoding user images safely, DeepSeek's understanding preprocessing, pixels out.

Conversions (documented behaviour, tested):
- grayscale, palette, CMYK, RGBA and other 8-bit modes -> RGB with PIL's `convert("RGB")`, as DeepSeek's
  code does (alpha is dropped, not composited);
- 16-bit and 32-bit integer grayscale -> 8 bit by scaling (PIL's own convert would clip to white);
- float images -> clipped to [0, 255].
Rejected with ImageInputError: bytes that are not an image, truncated files, zero-size images and images
over `max_pixels` (decompression bombs; checked from the header before any pixel is decoded).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000 x 8000
PAD_GRAY = (127, 127, 127)  # int(0.5 * 255) per channel, DeepSeek's background colour
MIN_SIDE = 14  # DeepSeek's VLMImageProcessor min_size


class ImageInputError(ValueError):
    """An input image that cannot be used; the message says why."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes (PNG, JPEG, WebP, ...) into an RGB PIL image."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageInputError(f"expected encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageInputError("empty image bytes")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageInputError(f"not a decodable image ({len(data)} bytes, unknown format)") from None
    except Image.DecompressionBombError as e:  # PIL's own hard limit, hit before ours can be checked
        raise ImageInputError(f"{e} (possible decompression bomb)") from None
    return to_rgb(image, max_pixels)


def to_rgb(image: Image.Image, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Validate size, load pixels and convert to RGB (see the module docstring for the conversions)."""
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageInputError(f"zero-size image ({width}x{height})")
    if width * height > max_pixels:
        raise ImageInputError(
            f"image of {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} "
            "(possible decompression bomb)"
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports truncated/corrupt data as these
        raise ImageInputError(f"corrupt or truncated {image.format or ''} image: {e}") from None
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        scale = 256.0 if image.mode.startswith("I;16") else 257.0
        gray = np.asarray(image, dtype=np.float64) / scale
        image = Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def preprocess_image(image: Image.Image, size: int) -> np.ndarray:
    """DeepSeek's understanding preprocessing up to the scaling: long side to `size` (bicubic), pad to a square
    with gray (127, 127, 127). Returns uint8 [size, size, 3], a quarter of the float pixels' bytes to ship;
    `normalize` scales them to [-1, 1] on the model's device."""
    width, height = image.size
    long_side = max(width, height)
    new_w = max(int(width / long_side * size), MIN_SIDE)
    new_h = max(int(height / long_side * size), MIN_SIDE)
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    square = Image.new("RGB", (size, size), PAD_GRAY)
    square.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
    return np.asarray(square, dtype=np.uint8).copy()


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [n, S, S, 3] -> float32 [n, 3, S, S] in [-1, 1], scaled as DeepSeek's processor does."""
    return ((pixels.float() / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2)


def pixels_to_uint8(decoded: torch.Tensor) -> np.ndarray:
    """VQ decoder output [n, 3, H, W] in [-1, 1] -> uint8 [n, H, W, 3], truncating like DeepSeek's code."""
    scaled = ((decoded.float() + 1) / 2 * 255).clamp(0, 255)
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
