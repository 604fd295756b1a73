"""The engine's pixel conversions: an input image (bytes, PIL or preprocessed) to uint8 pixels, those to the vision
tower's floats on the model's device, and generated image tokens back to uint8 pixels."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from janus_batch.model.preprocessing import DEFAULT_PREPROCESSING, Preprocessing, decode_image, preprocess_image, to_rgb


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
