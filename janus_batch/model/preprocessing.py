"""DeepSeek's understanding preprocessing, on the CPU: decoding user images safely, then resizing and padding them
as its processor does; and the settings a checkpoint records for it (read by checkpoint.py). PIL and numpy only:
the jobs' CPU stages run it without loading torch; the engine scales the result on its device (engine/images.py).

Conversions (documented behaviour, tested):
- grayscale, palette, CMYK, RGBA and other 8-bit modes -> RGB with PIL's `convert("RGB")`, as DeepSeek's
  code does (alpha is dropped, not composited);
- 16-bit and 32-bit integer grayscale -> 8 bit by scaling (PIL's own convert would clip to white);
- float images -> clipped to [0, 255].
Rejected with ImageInputError: bytes that are not an image in one of ACCEPTED_FORMATS (PNG, JPEG, WebP, GIF,
BMP, TIFF), malformed headers, truncated or corrupt data, zero-size images and images over `max_pixels`
(decompression bombs; checked from the header before any pixel is decoded).
"""

from __future__ import annotations

import io
from dataclasses import dataclass, fields

import numpy as np
from PIL import Image, UnidentifiedImageError


@dataclass(frozen=True)
class Preprocessing:
    """A checkpoint's understanding preprocessing settings (its preprocessor_config.json). DeepSeek's file and
    transformers' name them alike; transformers' adds do_rescale. The defaults, used where the file lacks a
    setting, are the published checkpoints' values."""

    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    do_rescale: bool = True  # DeepSeek's processor always rescales
    do_normalize: bool = True  # false in Janus-1.3B's first revision: pixels are then only rescaled
    min_size: int = 14  # the short side after resizing is at least this

    @property
    def background(self) -> tuple[int, ...]:
        """The padding colour as DeepSeek's processor (and transformers') derives it: int(255 x mean) per channel,
        (127, 127, 127) for mean 0.5. Both overwrite with it the background_color that their file lists."""
        return tuple(int(x * 255) for x in self.image_mean)

    @classmethod
    def of(cls, image_processor) -> Preprocessing:
        """The settings an image processor (transformers' JanusImageProcessorPil) holds."""
        values = {f.name: getattr(image_processor, f.name) for f in fields(cls)}
        return cls(**{**values, "image_mean": tuple(values["image_mean"]), "image_std": tuple(values["image_std"])})


DEFAULT_PREPROCESSING = Preprocessing()

DEFAULT_MAX_PIXELS = 64_000_000  # ~8000 x 8000
# The encodings of the images datasets, cameras and generators write. No other decoder runs on untrusted bytes:
# PIL's EPS reader runs Ghostscript, and its rarely used readers are the ones fuzzing breaks.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")  # JPEG includes MPO (phone cameras)


class ImageInputError(ValueError):
    """An input image that cannot be used; the message says why."""


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes in one of ACCEPTED_FORMATS into an RGB PIL image."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ImageInputError(f"expected encoded image bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise ImageInputError("empty image bytes")
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise ImageInputError(
            f"not a decodable image ({len(data)} bytes, not in an accepted format: {', '.join(ACCEPTED_FORMATS)})"
        ) from None
    except Image.DecompressionBombError as e:  # PIL's own hard limit, hit before ours can be checked
        raise ImageInputError(f"{e} (possible decompression bomb)") from None
    except Exception as e:  # a malformed header: PIL raises OSError, ValueError, SyntaxError, struct.error, ...
        raise ImageInputError(f"not a decodable image: {e or type(e).__name__}") from None
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
    except Exception as e:  # truncated or corrupt data: PIL reports it as OSError, ValueError, SyntaxError, ...
        raise ImageInputError(f"corrupt or truncated {image.format or ''} image: {e or type(e).__name__}") from None
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        scale = 256.0 if image.mode.startswith("I;16") else 257.0
        gray = np.asarray(image, dtype=np.float64) / scale
        image = Image.fromarray(np.clip(gray, 0, 255).astype(np.uint8), mode="L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


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
