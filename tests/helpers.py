"""Small helpers the test modules share (fixtures are in conftest.py)."""

from __future__ import annotations

import io
import socket

from PIL import Image


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    """`image` as the bytes of an image file in `fmt` (PNG, JPEG, ...)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()
