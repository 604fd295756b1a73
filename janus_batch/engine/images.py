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

from janus_batch.model import DEFAULT_PREPROCESSING, Preprocessing

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000 x 8000


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


def prepare_image(image: Image.Image | bytes | np.ndarray, size: int, preprocessing: Preprocessing) -> np.ndarray:
    """Encoded bytes, a PIL image or an already preprocessed array -> uint8 [size, size, 3] (`preprocess_image`)."""
    if isinstance(image, np.ndarray):
        if image.shape != (size, size, 3) or image.dtype != np.uint8:
            raise ValueError(
                f"a preprocessed image must be uint8 of shape {(size, size, 3)}, got {image.dtype} {image.shape}"
            )
        return image
    pil = to_rgb(image) if isinstance(image, Image.Image) else decode_image(image)
    return preprocess_image(pil, size, preprocessing)


def preprocess_image(image: Image.Image, size: int, preprocessing: Preprocessing = DEFAULT_PREPROCESSING) -> np.ndarray:
    """DeepSeek's understanding preprocessing up to the scaling: long side to `size` (bicubic), the other side at
    least `min_size`, pad to a square with the background colour. Returns uint8 [size, size, 3], a quarter of the
    float pixels' bytes to ship; `normalize` scales them on the model's device."""
    width, height = image.size
    long_side = max(width, height)
    new_w = max(int(width / long_side * size), preprocessing.min_size)
    new_h = max(int(height / long_side * size), preprocessing.min_size)
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    square = Image.new("RGB", (size, size), preprocessing.background)
    square.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
    return np.asarray(square, dtype=np.uint8).copy()


def value_table(preprocessing: Preprocessing) -> np.ndarray:
    """float32 [3, 256]: what each uint8 value of each channel becomes, computed with DeepSeek's arithmetic
    (rescale in float64 and cast to float32, then (x - mean) / std in float32), so that a lookup gives its
    pixel values exactly, on any device."""
    values = np.arange(256, dtype=np.float64)
    scaled = (values * preprocessing.rescale_factor if preprocessing.do_rescale else values).astype(np.float32)
    table = np.stack([scaled] * 3)
    if preprocessing.do_normalize:
        mean = np.array(preprocessing.image_mean, dtype=np.float32)[:, None]
        std = np.array(preprocessing.image_std, dtype=np.float32)[:, None]
        table = (table - mean) / std
    return table


def normalize(pixels: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [n, S, S, 3] -> float32 [n, 3, S, S], scaled as DeepSeek's processor does. `table`: `value_table` on
    the pixels' device; default: the published checkpoints' scaling, to [-1, 1]."""
    if table is None:
        table = torch.from_numpy(value_table(DEFAULT_PREPROCESSING)).to(pixels.device)
    return table[torch.arange(3, device=pixels.device), pixels.long()].permute(0, 3, 1, 2)


def vq_decode(vqmodel, image_tokens: torch.Tensor, vq_batch: int, device: torch.device) -> np.ndarray:
    """VQ-decode [n, tokens] image tokens to uint8 images [n, H, W, 3].

    Always in chunks of exactly `vq_batch` images (the last one padded): convolution results vary with the batch
    shape in the last bits, so a fixed shape keeps every image independent of its batch."""
    n = len(image_tokens)
    padded = torch.zeros((-(-n // vq_batch) * vq_batch, image_tokens.shape[1]), dtype=torch.long)
    padded[:n] = image_tokens
    chunks = [pixels_to_uint8(vqmodel.decode(padded[i : i + vq_batch].to(device))) for i in range(0, n, vq_batch)]
    return np.concatenate(chunks)[:n]


def pixels_to_uint8(decoded: torch.Tensor) -> np.ndarray:
    """VQ decoder output [n, 3, H, W] in [-1, 1] -> uint8 [n, H, W, 3], truncating like DeepSeek's code."""
    scaled = ((decoded.float() + 1) / 2 * 255).clamp(0, 255)
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
