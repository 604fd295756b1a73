"""Image inputs: DeepSeek's preprocessing with the checkpoint's settings, documented conversions, and specific
errors for bad bytes."""

from __future__ import annotations

import contextlib
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from janus_batch.engine import JanusEngine
from janus_batch.engine.images import normalize, value_table
from janus_batch.model.load import load_janus
from janus_batch.model.preprocessing import ImageInputError, Preprocessing, decode_image, preprocess_image, to_rgb
from janus_batch.model.tiny import build_tiny_model
from janus_batch.options import TextSampling
from tests.helpers import encoded
from tests.reference import reference_pixels

GRAY = (127, 127, 127)  # int(0.5 * 255): the published checkpoints' background colour


def test_preprocess_resizes_long_side_and_pads_with_gray():
    red = Image.new("RGB", (200, 100), (255, 0, 0))
    pixels = preprocess_image(red, 384)
    assert pixels.shape == (384, 384, 3) and pixels.dtype == np.uint8
    # 200x100 -> 384x192, centred: rows 0..95 and 288..383 are padding.
    assert (pixels[:96] == GRAY).all() and (pixels[288:] == GRAY).all()
    assert (pixels[100:280, 10:370] == (255, 0, 0)).all()


def test_normalize_scales_to_minus_one_one_as_deepseek_does():
    pixels = preprocess_image(Image.new("RGB", (200, 100), (255, 0, 0)), 384)
    scaled = normalize(torch.from_numpy(np.stack([pixels, pixels])))
    assert scaled.shape == (2, 3, 384, 384) and scaled.dtype == torch.float32
    # DeepSeek's processor: float32 pixels / 255, then (x - 0.5) / 0.5, bit for bit.
    deepseek = ((pixels.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    assert np.array_equal(scaled[1].numpy(), deepseek)
    assert scaled[0, :, 0, 0].tolist() == [(np.float32(127) / 255 - 0.5) / 0.5] * 3
    assert scaled[0, :, 200, 200].tolist() == [1.0, -1.0, -1.0]


# preprocessor_config.json settings: the published ones, Janus-1.3B's first revision (no normalisation), and
# another mean / std / minimum side / rescale factor.
SETTINGS = {
    "published": {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "rescale_factor": 1 / 255, "min_size": 14},
    "janus-1.3b-08b9a5d": {"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "rescale_factor": 1 / 255, "min_size": 14},
    "clip": {
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "rescale_factor": 0.0039,
        "min_size": 40,
    },
}
NORMALIZE = {"published": True, "janus-1.3b-08b9a5d": False, "clip": True}


def preprocessing_of(name: str) -> Preprocessing:
    settings = SETTINGS[name]
    return Preprocessing(
        image_mean=tuple(settings["image_mean"]),
        image_std=tuple(settings["image_std"]),
        rescale_factor=settings["rescale_factor"],
        do_normalize=NORMALIZE[name],
        min_size=settings["min_size"],
    )


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_preprocessing_is_deepseeks_with_the_checkpoints_settings(name):
    # Bit for bit DeepSeek's VLMImageProcessor (tests/reference.py) for each setting, on wide, tall, square
    # and thin images (the thin ones meet min_size).
    preprocessing = preprocessing_of(name)
    table = torch.from_numpy(value_table(preprocessing))
    rng = np.random.default_rng(0)
    for w, h in [(640, 480), (300, 600), (384, 384), (1000, 12), (9, 700)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ours = normalize(torch.from_numpy(preprocess_image(image, 384, preprocessing)[None]), table)[0].numpy()
        theirs = reference_pixels(image, 384, {**SETTINGS[name], "do_normalize": NORMALIZE[name]})
        np.testing.assert_array_equal(ours, theirs, err_msg=f"{w}x{h}")


@pytest.mark.parametrize("layout", ["processor_config.json", "preprocessor_config.json"])
@pytest.mark.compat
def test_the_engine_preprocesses_as_the_checkpoint_says(tiny_model_dir, tmp_path, layout):
    # The settings as transformers 5 saves them (a section of processor_config.json), or in their own file
    # (DeepSeek's and transformers 4's, e.g. deepseek-community/*). Janus-1.3B's first revision has
    # do_normalize false: the vision tower then gets pixels in [0, 1].
    local = tmp_path / "model"
    local.mkdir()
    for path in tiny_model_dir.iterdir():
        (local / path.name).write_bytes(path.read_bytes())
    processor_config = json.loads((local / "processor_config.json").read_text())
    settings = {**SETTINGS["clip"], "do_normalize": False}

    def write_settings(values: dict) -> None:
        if layout == "processor_config.json":
            config = {**processor_config, "image_processor": values}
        else:
            config = {**values, "image_processor_type": "VLMImageProcessor", "image_size": 64}
        (local / layout).write_text(json.dumps(config))

    write_settings({**processor_config["image_processor"], **settings})
    engine = JanusEngine.from_pretrained(str(local), device="cpu")
    assert engine.preprocessing == Preprocessing(
        image_mean=tuple(settings["image_mean"]),
        image_std=tuple(settings["image_std"]),
        rescale_factor=0.0039,
        do_normalize=False,
        min_size=40,
    )
    seen = []
    engine.model.model.vision_model.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 64, 3), dtype=np.uint8))
    engine.understand([image], sampling=TextSampling(max_new_tokens=1))
    np.testing.assert_array_equal(seen[0][0].numpy(), reference_pixels(image, 64, settings))

    # Without the settings: the published checkpoints' values (not transformers' CLIP defaults).
    write_settings({"do_normalize": True})
    assert list(load_janus(str(local), device="cpu").processor.image_processor.image_mean) == [0.5] * 3
    assert JanusEngine.from_pretrained(str(local), device="cpu").preprocessing == Preprocessing()


@pytest.mark.compat
def test_preprocess_matches_transformers_janus_image_processor():
    # Where DeepSeek's int() and transformers' round() agree on the resized size, the two must be equal.
    from transformers import JanusImageProcessorPil

    hf = JanusImageProcessorPil(size={"height": 384, "width": 384}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    rng = np.random.default_rng(0)
    for w, h in [(640, 480), (300, 600), (384, 384)]:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        theirs = hf(image, return_tensors="np")["pixel_values"][0]
        ours = normalize(torch.from_numpy(preprocess_image(image, 384)[None]))[0].numpy()
        np.testing.assert_allclose(ours, theirs, atol=2e-2)


@pytest.mark.parametrize(
    "data,message",
    [
        (b"", "empty image bytes"),
        (b"this is not an image at all", "not a decodable image"),
        ("a string", "expected encoded image bytes"),
        (None, "expected encoded image bytes"),
    ],
)
def test_undecodable_inputs(data, message):
    with pytest.raises(ImageInputError, match=message):
        decode_image(data)


def test_truncated_images():
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    for fmt in ("PNG", "JPEG"):
        data = encoded(image, fmt)
        with pytest.raises(ImageInputError, match="corrupt or truncated"):
            decode_image(data[: len(data) // 2])


def test_every_accepted_format_decodes_and_others_are_refused():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 24, 3), dtype=np.uint8))
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        assert decode_image(encoded(image, fmt)).size == (24, 16), fmt
    # EPS would run Ghostscript; the others are rarely used readers of untrusted bytes.
    for fmt in ("EPS", "PPM", "ICO", "TGA", "PCX"):
        with pytest.raises(ImageInputError, match="not in an accepted format: PNG, JPEG"):
            decode_image(encoded(image, fmt))


def chunk(kind: bytes, body: bytes) -> bytes:
    """A PNG chunk."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def test_malformed_headers_are_input_errors():
    # PIL raises these as OSError or ValueError while opening the file, before any pixel is read: they were a
    # 500 in Serve.
    image = Image.fromarray(np.full((8, 8, 3), 100, np.uint8))
    png = encoded(image, "PNG")
    huge_text = chunk(b"zTXt", b"k\0\0" + zlib.compress(b"x" * 20_000_000))
    for data in [encoded(image, "JPEG")[:30], encoded(image, "BMP")[:20], png[:33] + huge_text + png[33:]]:
        with pytest.raises(ImageInputError, match="not a decodable image"):
            decode_image(data)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns of some damage it reads through
def test_damaged_files_of_every_accepted_format_are_input_errors_or_images():
    # Cut and flipped bytes: whatever PIL meets, decode_image raises ImageInputError or gives an RGB image.
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8))
    for fmt in ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"):
        data = encoded(image, fmt)
        damaged = [data[:cut] for cut in range(1, min(len(data), 200), 3)]
        for _ in range(60):
            flipped = bytearray(data)
            for at in rng.integers(0, min(len(data), 300), 3):
                flipped[at] = int(rng.integers(0, 256))
            damaged.append(bytes(flipped))
        for data in damaged:
            with contextlib.suppress(ImageInputError):
                assert decode_image(data).mode == "RGB"


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny data chunk (a decompression-bomb shape)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_huge_and_zero_size_images():
    with pytest.raises(ImageInputError, match="decompression bomb"):
        decode_image(png_header_only(20_000, 20_000))  # 400 M pixels: over PIL's own hard limit too
    with pytest.raises(ImageInputError, match="decompression bomb"):
        decode_image(png_header_only(9_000, 9_000))  # 81 M: over our limit, under PIL's
    with pytest.raises(ImageInputError, match="exceeds the limit of 100"):
        decode_image(encoded(Image.new("RGB", (20, 20))), max_pixels=100)
    with pytest.raises(ImageInputError, match="zero-size"):
        to_rgb(Image.new("RGB", (0, 5)))


@pytest.mark.parametrize(
    "image,expected",
    [
        (Image.new("L", (4, 4), 200), (200, 200, 200)),
        (Image.new("LA", (4, 4), (90, 0)), (90, 90, 90)),
        (Image.new("RGBA", (4, 4), (10, 20, 30, 0)), (10, 20, 30)),  # alpha dropped, as DeepSeek does
        (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
        (Image.new("P", (4, 4), 0), (0, 0, 0)),
        (Image.new("1", (4, 4), 1), (255, 255, 255)),
        (Image.new("I;16", (4, 4), 65535), (255, 255, 255)),  # scaled, not clipped
        (Image.new("I;16", (4, 4), 32768), (128, 128, 128)),
        (Image.new("F", (4, 4), 300.0), (255, 255, 255)),
    ],
    ids=["L", "LA", "RGBA", "CMYK", "P", "1", "I16-max", "I16-mid", "F"],
)
def test_modes_are_converted_to_rgb(image, expected):
    fmt = "TIFF" if image.mode in ("CMYK", "F") else "PNG"
    for candidate in (image, decode_image(encoded(image, fmt))):
        rgb = to_rgb(candidate)
        assert rgb.mode == "RGB"
        assert rgb.getpixel((1, 1)) == expected


def test_engine_rejects_bad_images_with_the_specific_error():
    model, processor = build_tiny_model(64)
    engine = JanusEngine(model, processor)
    with pytest.raises(ImageInputError, match="not a decodable image"):
        engine.understand([b"garbage"])
