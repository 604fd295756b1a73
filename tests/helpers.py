"""Small helpers the test modules share (fixtures are in conftest.py)."""

from __future__ import annotations

import contextlib
import io
import socket

from PIL import Image


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that nothing listens on right now: all held open while picking,
    since a port closed after one pick may be the next pick too."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    """`image` as the bytes of an image file in `fmt` (PNG, JPEG, ...)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()
