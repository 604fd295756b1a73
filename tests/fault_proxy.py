"""A fault-injecting HTTP proxy on 127.0.0.1 in front of an S3-protocol server, for storage fault tests.

    with FaultProxy(s3_server.endpoint_url, seed=0) as proxy:
        storage = StorageConfig(endpoint_url=proxy.url, ...)
        proxy.set(rate=0.2, kinds=["slowdown", "reset", "reset_mid"])   # 20% of requests fail
        proxy.set(rate=1.0, methods={"DELETE"}, path_regex=r"\\.pending\\.", max_faults=1)  # one failed delete
        proxy.set(rate=0.0)                                               # healthy again
        proxy.requests, proxy.faults, proxy.log                           # what it saw and did

Fault kinds, as a flaky S3 endpoint shows them:
- "slowdown":  503 with S3's `SlowDown` XML error body (the request body is read first, the connection kept);
- "reset":     the connection is reset (RST) after the request arrives, before any response;
- "reset_mid": the request is forwarded, the response's headers and half its body are sent, then a reset.

Each request is forwarded whole over plain HTTP/1.1 (keep-alive, `Expect: 100-continue` and chunked request
bodies handled; bodies up to MAX_BODY_BYTES), so a request that gets no fault reaches the server unchanged.
Which requests fail is drawn from a `random.Random(seed)` in arrival order: the same seed and the same
sequence of requests give the same faults.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import re
import socket
import struct
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

KINDS = ("slowdown", "reset", "reset_mid")
MAX_BODY_BYTES = 256 * 2**20
# Hop-by-hop headers, and those the proxy recomputes for the body it forwards whole.
DROPPED_HEADERS = {"connection", "keep-alive", "transfer-encoding", "expect", "content-length", "proxy-connection"}
SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>"
)


@dataclass
class Faults:
    """What to inject: `rate` of the requests matching `methods` (None: all) and `path_regex` (searched in the
    path and query; None: all) get one of `kinds`, chosen at random; at most `max_faults` (None: no limit)."""

    rate: float = 0.0
    kinds: tuple[str, ...] = KINDS
    methods: frozenset[str] | None = None
    path_regex: str | None = None
    max_faults: int | None = None
    injected: int = field(default=0, init=False)


class FaultProxy:
    """Start with `with FaultProxy(upstream_url) as proxy:` (or `start()` / `stop()`); point clients at `.url`."""

    def __init__(self, upstream_url: str, seed: int = 0):
        upstream = urlparse(upstream_url)
        if upstream.scheme != "http":
            raise ValueError(f"the fault proxy speaks plain http, got {upstream_url!r}")
        self.upstream = (upstream.hostname, upstream.port or 80)
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.faults_config = Faults()
        self.requests = 0  # requests seen
        self.faults = 0  # faults injected
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, fault kind or None) per request
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread: threading.Thread | None = None

    def set(
        self,
        rate: float,
        kinds: list[str] | tuple[str, ...] = KINDS,
        methods: set[str] | None = None,
        path_regex: str | None = None,
        max_faults: int | None = None,
    ) -> None:
        """Replace the fault settings (takes effect from the next request)."""
        if not 0 <= rate <= 1:
            raise ValueError(f"rate must be in [0, 1], got {rate}")
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds:
            raise ValueError(f"fault kinds are {KINDS}, got {list(kinds)}")
        config = Faults(
            rate=rate,
            kinds=tuple(kinds),
            methods=None if methods is None else frozenset(m.upper() for m in methods),
            path_regex=path_regex,
            max_faults=max_faults,
        )
        with self.lock:
            self.faults_config = config

    def count(self, method: str | None = None, path_regex: str | None = None, faulted: bool | None = None) -> int:
        """Requests seen so far with this method and path (None: any), faulted or not (None: either)."""
        with self.lock:
            log = list(self.log)
        return sum(
            1
            for m, path, kind in log
            if (method is None or m == method.upper())
            and (path_regex is None or re.search(path_regex, path))
            and (faulted is None or (kind is not None) == faulted)
        )

    def draw(self, method: str, path: str) -> str | None:
        """The fault for this request (None: forward it), and count it."""
        with self.lock:
            config = self.faults_config
            self.requests += 1
            kind = None
            matches = (config.methods is None or method in config.methods) and (
                config.path_regex is None or re.search(config.path_regex, path)
            )
            under_limit = config.max_faults is None or config.injected < config.max_faults
            if matches and under_limit and self.random.random() < config.rate:
                kind = self.random.choice(config.kinds)
                config.injected += 1
                self.faults += 1
            self.log.append((method, path, kind))
            return kind

    def start(self) -> FaultProxy:
        self.thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self.thread is not None:
            self.thread.join()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(ProxyHandler):
            pass

        Handler.proxy = proxy
        return Handler


class ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and BaseHTTPRequestHandler answers `Expect: 100-continue`
    proxy: FaultProxy
    upstream: http.client.HTTPConnection | None = None

    def log_message(self, format, *args) -> None:  # one line per request otherwise
        pass

    def do_request(self) -> None:
        body = self.read_body()
        if body is None:
            return
        kind = self.proxy.draw(self.command, self.path)
        if kind == "reset":
            self.reset()
            return
        if kind == "slowdown":
            self.send_response(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(SLOWDOWN_BODY)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(SLOWDOWN_BODY)
            return
        try:
            status, reason, headers, data = self.forward(body)
        except (OSError, http.client.HTTPException):
            self.reset()  # the server went away: the client sees what it would have seen without the proxy
            return
        self.send_response(status, reason)
        for name, value in headers:
            if name.lower() not in DROPPED_HEADERS:
                self.send_header(name, value)
        if self.command == "HEAD":  # no body, but the length of the object it describes
            length = next((v for n, v in headers if n.lower() == "content-length"), None)
            if length is not None:
                self.send_header("Content-Length", length)
        else:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if kind == "reset_mid":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.reset()
            return
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_request

    def read_body(self) -> bytes | None:
        """The whole request body (de-chunked), or None when it is too large (answered with 413)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts, size = [], 0
            while True:
                chunk_size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if chunk_size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(parts)
                size += chunk_size
                if size > MAX_BODY_BYTES:
                    return self.too_large()
                parts.append(self.rfile.read(chunk_size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            return self.too_large()
        return self.rfile.read(length)

    def too_large(self) -> None:
        self.send_error(413, f"the fault proxy forwards bodies up to {MAX_BODY_BYTES} bytes")
        self.close_connection = True
        return None

    def forward(self, body: bytes) -> tuple[int, str, list[tuple[str, str]], bytes]:
        """Send the request upstream on this client connection's upstream connection (reopened once if the
        server closed it); returns status, reason, headers and the whole (de-chunked) response body."""
        headers = {name: value for name, value in self.headers.items() if name.lower() not in DROPPED_HEADERS}
        headers["Content-Length"] = str(len(body))
        for attempt in range(2):
            if self.upstream is None:
                self.upstream = http.client.HTTPConnection(*self.proxy.upstream, timeout=60)
            try:
                self.upstream.request(self.command, self.path, body=body, headers=headers)
                response = self.upstream.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException):
                self.upstream.close()
                self.upstream = None
                if attempt == 1:
                    raise
                continue
            if response.will_close:
                self.upstream.close()
                self.upstream = None
            return response.status, response.reason, response.getheaders(), data
        raise AssertionError("unreachable")

    def reset(self) -> None:
        """Close the client connection with a TCP reset (SO_LINGER 0), as a dropped connection shows."""
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True

    def finish(self) -> None:
        with contextlib.suppress(OSError):  # the connection was reset on purpose
            super().finish()
        if self.upstream is not None:
            self.upstream.close()
