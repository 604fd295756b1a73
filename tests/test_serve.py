"""The Ray Serve app over real HTTP on localhost, with the tiny model on CPU: captions, VQA, generation (inline
PNGs, a local folder, S3 on a moto server), concurrent requests batched into one engine call, bad requests; and
what exposing it needs: bearer-token auth, output_uri as the filesystem reads it, slow clients and floods, and no
secret or server path in any message."""

import asyncio
import base64
import io
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pytest
import ray
import requests
import s3fs
import yaml
from PIL import Image
from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from janus_batch.options import ImageSampling
from janus_batch.serve import GenerateJob, ServeArgs, build_app, read_auth_token, run_by_options
from tests.helpers import encoded, free_port

BATCH = 4  # max_batch_size of the test deployment
BUCKET = "serve-out"
TOKEN = "test-token-5f0c2a9e1b7d"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}
SECRET = "sentinel-secret-8d3b61f0"  # the app's S3 secret (moto takes any): no message or log may show it
BODY_TIMEOUT_S = 2.0
MAX_BUFFERED_BYTES = 2_500_000
STALLED_BYTES = 300_000  # of the body each stalled client sends


def b64_image(image: Image.Image, fmt: str = "PNG") -> str:
    return base64.b64encode(encoded(image, fmt)).decode()


RNG = np.random.default_rng(0)
IMAGES = [
    b64_image(Image.fromarray(RNG.integers(0, 256, (48, 80, 3), dtype=np.uint8))),
    b64_image(Image.new("RGB", (30, 90), (220, 20, 20)), "JPEG"),
    b64_image(Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1)), mode="L")),
    b64_image(Image.new("RGBA", (40, 40), (0, 128, 255, 100))),
]


@pytest.fixture(scope="module")
def s3_options(s3_server) -> dict:
    """Storage options for the session's moto S3 server (conftest.py), with the bucket the app writes to."""
    s3_server.make_bucket(BUCKET)
    return s3_server.storage_options


@pytest.fixture(scope="module")
def server(tmp_path_factory, s3_options) -> tuple[str, Path]:
    """Base URL of the running app (auth on: a token file), and the local folder it may write images under."""
    if not ray.is_initialized():  # other test modules share the session's Ray
        ray.init(num_cpus=2, include_dashboard=False)
    out_dir = tmp_path_factory.mktemp("serve-out")
    token_file = tmp_path_factory.mktemp("serve-token") / "token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = ServeArgs(
        num_cpus=0.5,
        max_batch_size=BATCH,
        batch_wait_timeout_s=0.5,  # long enough for the concurrent requests below to meet
        max_images_per_request=4,
        max_image_bytes=100_000,
        max_image_pixels=1_000_000,
        max_prompts_per_request=3,
        max_images_per_prompt=4,
        max_new_tokens=16,
        allowed_output_prefixes=[str(out_dir), f"s3://{BUCKET}/allowed"],
        storage_options={**s3_options, "secret": SECRET},
        auth_token_file=str(token_file),
        body_timeout_s=BODY_TIMEOUT_S,
        max_buffered_bytes=MAX_BUFFERED_BYTES,
    )
    serve.run(build_app(args), name="janus-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}", out_dir
    serve.shutdown()


def post(url: str, route: str, body: Any, headers: dict = AUTH, timeout: float = 60) -> requests.Response:
    if isinstance(body, dict):
        return requests.post(url + route, json=body, headers=headers, timeout=timeout)
    # Sent as is, e.g. malformed JSON; chunked when an iterator.
    return requests.post(url + route, data=body, headers={**JSON, **headers}, timeout=timeout)


def engine_calls(url: str) -> dict[str, int]:
    stats = requests.get(url + "/v1/stats", headers=AUTH, timeout=10).json()
    return {kind: stats.get(f"{kind}_engine_calls", 0) for kind in ("understand", "generate")}


def concurrently(url: str, calls: list[tuple[str, dict]]) -> list[requests.Response]:
    """Send all requests at the same moment, from one thread each."""
    barrier = threading.Barrier(len(calls))

    def send(call: tuple[str, dict]) -> requests.Response:
        barrier.wait()
        return post(url, *call)

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(send, calls))


def test_health_and_model_info(server):
    url, _ = server
    assert requests.get(url + "/healthz", timeout=10).json() == {"status": "ok"}
    info = requests.get(url + "/v1/models", headers=AUTH, timeout=10).json()
    assert info["device"] == "cpu" and info["generated_image_size"] == 64
    assert (
        info["model"] == "tiny-janus-64-seed0"
    )  # the model's name, not its path on the server  # the model's name, not a server path
    assert info["limits"]["max_new_tokens"] == 16 and info["limits"]["max_images_per_request"] == 4


def test_caption_and_vqa(server):
    url, _ = server
    caption = post(url, "/v1/caption", {"images": IMAGES[:2], "max_new_tokens": 8})
    assert caption.status_code == 200, caption.text
    body = caption.json()
    assert body["batch_size"] == 1 and len(body["results"]) == 2
    for result in body["results"]:
        assert result["finish_reason"] in ("eos", "length") and 1 <= result["num_tokens"] <= 8
        assert result["finish_reason"] == "eos" or result["num_tokens"] == 8
        assert isinstance(result["text"], str)

    vqa = post(url, "/v1/vqa", {"images": IMAGES[2:], "questions": ["How many?", "What colour is it?"]})
    assert vqa.status_code == 200, vqa.text
    answers = vqa.json()["results"]
    assert len(answers) == 2 and all(r["num_tokens"] >= 1 for r in answers)


def decode_png(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    return image


def test_generate_inline_local_and_s3(server, s3_options):
    url, out_dir = server
    request = {"prompts": ["a red fox", "a lighthouse"], "images_per_prompt": 2, "seed": 3}
    inline = post(url, "/v1/generate", request)
    assert inline.status_code == 200, inline.text
    images = inline.json()["images"]
    assert [(im["prompt_index"], im["sample_index"]) for im in images] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    pngs = [base64.b64decode(im["image"]) for im in images]
    for png in pngs:
        assert decode_png(png).size == (64, 64)
    assert pngs[0] != pngs[1]  # different image index, different noise

    # Same request written to a local folder: the same bytes, at the returned paths.
    local = post(url, "/v1/generate", {**request, "output_uri": str(out_dir / "run1")})
    assert local.status_code == 200, local.text
    uris = [im["uri"] for im in local.json()["images"]]
    assert all(im["image"] is None for im in local.json()["images"])
    assert [Path(u).read_bytes() for u in uris] == pngs
    assert all(Path(u).parent.parent == out_dir / "run1" for u in uris)

    # And to S3 (a moto server), with the deployment's storage options.
    prefix = f"s3://{BUCKET}/allowed/run2"
    remote = post(url, "/v1/generate", {**request, "output_uri": prefix})
    assert remote.status_code == 200, remote.text
    uris = [im["uri"] for im in remote.json()["images"]]
    assert all(u.startswith(prefix + "/") for u in uris)
    fs = s3fs.S3FileSystem(**s3_options)
    assert [fs.cat(u) for u in uris] == pngs


def test_concurrent_captions_share_one_engine_call(server):
    url, _ = server
    alone = post(url, "/v1/caption", {"images": [IMAGES[0]], "max_new_tokens": 8}).json()
    before = engine_calls(url)
    responses = concurrently(url, [("/v1/caption", {"images": [im], "max_new_tokens": 8}) for im in IMAGES])
    assert [r.status_code for r in responses] == [200] * BATCH
    assert [r.json()["batch_size"] for r in responses] == [BATCH] * BATCH
    assert engine_calls(url)["understand"] == before["understand"] + 1
    assert responses[0].json()["results"] == alone["results"]  # batching does not change the answer


def test_concurrent_generations_grouped_by_options(server):
    """Three requests in one batch window: the two with equal options share an engine call, the third (another
    seed) gets its own; each image is the one that prompt gives when sent alone."""
    url, _ = server
    fox = {"prompts": ["a red fox"], "images_per_prompt": 2, "seed": 3}
    alone = post(url, "/v1/generate", fox).json()["images"]
    before = engine_calls(url)
    calls = [fox, {**fox, "prompts": ["a city street", "a cat"]}, {**fox, "seed": 4}]
    responses = concurrently(url, [("/v1/generate", body) for body in calls])
    assert [r.status_code for r in responses] == [200] * 3
    assert [r.json()["batch_size"] for r in responses] == [2, 2, 1]
    assert engine_calls(url)["generate"] == before["generate"] + 2
    assert responses[0].json()["images"] == alone
    assert responses[2].json()["images"][0]["image"] != alone[0]["image"]


def big_noise_png() -> str:
    return b64_image(Image.fromarray(RNG.integers(0, 256, (200, 200, 3), dtype=np.uint8)))  # ~120 KB


TRUNCATED_JPEG = base64.b64encode(encoded(Image.new("RGB", (8, 8)), "JPEG")[:30]).decode()  # PIL: OSError at open
EPS = base64.b64encode(encoded(Image.new("RGB", (8, 8)), "EPS")).decode()
LONG_TEXT = "qzj " * 1500  # ~6000 byte-level tokens: over the tiny model's 2048 positions, under 8192 characters

BAD_REQUESTS = [
    ("/v1/caption", b'{"images": [', 400, "malformed JSON body"),
    ("/v1/caption", {}, 422, "Field required"),
    ("/v1/caption", {"images": "abc"}, 422, "Input should be a valid array"),
    ("/v1/caption", {"images": IMAGES[:1], "max_new_token": 4}, 422, "unknown fields 'max_new_token': extra inputs"),
    ("/v1/caption", {"images": [1] * 3000}, 422, "List should have at most 1024 items"),  # stops at once
    ("/v1/caption", {"images": IMAGES[:1], "greedy": "yes"}, 422, "Input should be a valid boolean"),
    ("/v1/caption", {"images": IMAGES[:1], "max_new_tokens": "8"}, 422, "Input should be a valid integer"),
    ("/v1/caption", {"images": IMAGES[:1], "max_new_tokens": True}, 422, "Input should be a valid integer"),
    ("/v1/caption", {"images": [TRUNCATED_JPEG]}, 422, "images[0]: not a decodable image"),
    (
        "/v1/caption",
        {"images": [EPS]},
        422,
        "images[0]: not a decodable image (708 bytes, not in an accepted",
    ),  # Ghostscript
    ("/v1/caption", {"images": IMAGES[:1], "greedy": False, "temperature": 1e-300}, 422, "must be 0 (greedy) or"),
    ("/v1/caption", {"images": IMAGES + IMAGES[:1]}, 422, "number of images is 5, over this server's limit of 4"),
    ("/v1/caption", {"images": [big_noise_png()]}, 413, "over this server's limit of 100000"),
    ("/v1/caption", {"images": ["A" * 2_000_000]}, 413, "request body over this route's limit"),
    ("/v1/caption", {"images": [b64_image(Image.new("L", (1001, 1000)))]}, 422, "exceeds the limit of 1000000"),
    ("/v1/caption", {"images": [base64.b64encode(b"not an image").decode()]}, 422, "images[0]: not a decodable"),
    ("/v1/caption", {"images": IMAGES[:1] + ["%%%"]}, 422, "images[1]: invalid base64"),
    ("/v1/caption", {"images": ["ééé"]}, 422, "images[0]: invalid base64"),
    ("/v1/caption", {"images": IMAGES[:1], "max_new_tokens": 17}, 422, "max_new_tokens is 17, over this server's"),
    ("/v1/caption", {"images": IMAGES[:1], "instruction": LONG_TEXT}, 422, "instruction: question too long"),
    ("/v1/caption", {"images": IMAGES[:1], "instruction": " \n"}, 422, "instruction: empty question"),
    ("/v1/vqa", {"images": IMAGES[:1], "questions": ["a", "b"]}, 422, "1 images but 2 questions"),
    ("/v1/vqa", {"images": IMAGES[:1], "questions": [" "]}, 422, "questions[0] is empty"),
    ("/v1/vqa", {"images": IMAGES[:1], "questions": [LONG_TEXT]}, 422, "questions[0]: question too long"),
    ("/v1/generate", {"prompts": ["a cat", "  "]}, 422, "prompts[1]: empty prompt"),
    ("/v1/generate", {"prompts": [LONG_TEXT]}, 422, "prompts[0]: prompt too long"),
    ("/v1/generate", {"prompts": [1]}, 422, "Input should be a valid string"),
    ("/v1/generate", {"prompts": ["a" * 8193]}, 422, "String should have at most 8192 characters"),
    ("/v1/generate", {"prompts": ["a"] * 4}, 422, "number of prompts is 4, over this server's limit of 3"),
    # Sized for what 3 prompts of 8192 characters can take, not for images (it took ~225 MB before).
    ("/v1/generate", {"prompts": ["a" * 8000] * 50}, 413, "request body over this route's limit of 360448 bytes"),
    ("/v1/generate", {"prompts": ["a"], "images_per_prompt": 5}, 422, "images_per_prompt is 5, over this server's"),
    ("/v1/generate", {"prompts": ["a"], "images_per_prompt": 0}, 422, "greater than or equal to 1"),
    ("/v1/generate", {"prompts": ["a"], "images_per_prompt": "2"}, 422, "Input should be a valid integer"),
    # Beyond 64 bits a seed would repeat another's images (2**64 + 5 gave seed 5's).
    ("/v1/generate", {"prompts": ["a"], "seed": 2**64 + 5}, 422, "less than 18446744073709551616"),
    ("/v1/generate", {"prompts": ["a"], "seed": -1}, 422, "greater than or equal to 0"),
    ("/v1/generate", {"prompts": ["a"], "cfg_weight": 1e308}, 422, "less than or equal to 100"),
    ("/v1/generate", b'{"prompts": ["a"], "cfg_weight": NaN}', 422, "Input should be a finite number"),
    ("/v1/generate", b'{"prompts": ["a"], "temperature": Infinity}', 422, "Input should be a finite number"),
    *[
        ("/v1/generate", {"prompts": ["a"], "output_uri": uri}, status, message)
        for uri, status, message in [
            ("/etc/janus", 403, "not under a prefix this server allows"),
            (f"s3://{BUCKET}/elsewhere", 403, "not under a prefix this server allows"),
            (f"memory://{BUCKET}/allowed", 403, "not under a prefix this server allows"),
            (f"s3://{BUCKET}/allowed/../x", 422, "must not have empty, '.' or '..' path segments"),
            (f"s3://{BUCKET}/allowed/./x", 422, "must not have empty, '.' or '..' path segments"),
            (f"s3://{BUCKET}/allowed//x", 422, "must not have empty, '.' or '..' path segments"),
            # s3fs reads ?versionId= as a version and writes to the key before it; fsspec chains at '::'.
            (f"s3://{BUCKET}/allowed/x?versionId=null", 422, "must not contain '?'"),
            (f"s3://{BUCKET}/allowed/x#frag", 422, "must not contain '#'"),
            (f"s3://{BUCKET}/allowed/x::memory://y", 422, "must not contain '::'"),
            (f"s3://elsewhere/x::s3://{BUCKET}/allowed/y", 422, "must not contain '::'"),
            (f"zip://a.png::file:///tmp/x::s3://{BUCKET}/allowed", 422, "must not contain '::'"),
            (f"s3://{BUCKET}/allowed/a\\b", 422, "must not contain '\\\\'"),
            (f"s3://{BUCKET}/allowed/a\x00b", 422, "must not contain control or other non-printable"),
            (f"s3://{BUCKET}/allowed/a\nb", 422, "must not contain control or other non-printable"),
            (f"s3://{BUCKET}/allowed/" + "a" * 300, 422, "a path segment over 255 bytes"),
            (f"s3://{BUCKET}/allowed/" + "/".join(["a" * 200] * 5), 422, "output_uri is over 960 bytes"),
        ]
    ],
]


@pytest.mark.parametrize(("route", "body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_a_specific_4xx_before_batching(server, route, body, status, message):
    url, _ = server
    before = engine_calls(url)
    response = post(url, route, body)
    assert response.status_code == status, response.text
    assert message in str(response.json()["detail"])
    assert engine_calls(url) == before
    # No message shows the allowed prefixes, a server path or the storage secret.
    for text in (f"{BUCKET}/allowed", str(server[1]), SECRET):
        assert text not in response.text


def test_bodies_must_be_sent_as_json(server):
    # The types a web page can send cross-site without a preflight (and none at all) are refused, before the body
    # is read; parameters of the JSON type are fine.
    url, _ = server
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
        response = requests.post(url + "/v1/generate", data=b'{"prompts": ["a"]}', headers=headers, timeout=10)
        assert response.status_code == 415, (content_type, response.text)
        assert response.json()["detail"] == "the body must be JSON, sent with Content-Type: application/json"
    response = post(url, "/v1/generate", b'{"prompts": []}', headers={**AUTH, "Content-Type": "Application/JSON; x=1"})
    assert response.status_code == 422 and "at least 1 item" in response.text


def test_a_body_of_many_errors_gets_a_short_answer(server):
    # A 6 MB body of 3 million bad items got a 260 MB answer and stalled the replica for 20 s.
    url, _ = server
    response = post(url, "/v1/caption", {"images": [1] * 1000})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert len(detail) == 21 and detail[-1] == {"type": "more_errors", "loc": [], "msg": "and 980 more errors"}
    unknown = post(url, "/v1/caption", {"images": IMAGES[:1], **{f"k{i:06d}": 1 for i in range(10_000)}})
    assert unknown.status_code == 422 and len(unknown.content) < 1000
    assert "unknown fields 'k000000', 'k000001', 'k000002', 'k000003', 'k000004' and 9995 more" in unknown.text


def test_base64_may_be_wrapped_in_lines(server):
    # As `base64` and MIME write it, at 76 columns.
    url, _ = server
    wrapped = base64.encodebytes(base64.b64decode(IMAGES[0])).decode()
    assert "\n" in wrapped
    answers = [post(url, "/v1/caption", {"images": [im], "max_new_tokens": 4}) for im in (IMAGES[0], wrapped)]
    assert [a.status_code for a in answers] == [200, 200], answers[1].text
    assert answers[0].json()["results"] == answers[1].json()["results"]


def test_every_route_but_healthz_needs_the_token(server):
    """Token on: the docs, the schema, unknown paths and every API route answer 401 (before reading any body)
    without `Authorization: Bearer <token>`; /healthz stays open for probes."""
    url, _ = server
    before = engine_calls(url)
    assert requests.get(url + "/healthz", timeout=10).json() == {"status": "ok"}
    wrong = [
        {},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
    ]
    routes = [("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/v1/models"), ("GET", "/v1/stats"), ("GET", "/x")]
    routes += [("POST", "/v1/caption"), ("POST", "/v1/vqa"), ("POST", "/v1/generate")]
    for method, route in routes:
        for headers in wrong:
            response = requests.request(method, url + route, headers=headers, json={"prompts": ["a"]}, timeout=10)
            assert response.status_code == 401, (route, headers, response.text)
            assert response.json() == {"detail": "missing or wrong bearer token"}
            assert response.headers["www-authenticate"] == "Bearer"
    assert requests.get(url + "/docs", headers={"Authorization": f"bearer {TOKEN}"}, timeout=10).status_code == 200
    assert "/v1/generate" in requests.get(url + "/openapi.json", headers=AUTH, timeout=10).json()["paths"]
    assert engine_calls(url) == before


def test_auth_token_sources_and_the_loopback_rule(tmp_path, monkeypatch):
    """No token is needed on a loopback bind only; elsewhere the replica refuses to start without one. A token
    comes from the args, an environment variable or a file (stripped), and must not be short."""
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        assert read_auth_token(ServeArgs(), host) is None
    for host in ("0.0.0.0", "::", "10.1.2.3", "janus.example.com", ""):
        with pytest.raises(ValueError, match="not a loopback address, and no auth token is configured"):
            read_auth_token(ServeArgs(), host)
    token_file = tmp_path / "token"
    token_file.write_text(f"  {TOKEN}\n")
    monkeypatch.setenv("JANUS_TEST_TOKEN", TOKEN + "\n")
    for args in (ServeArgs(auth_token=TOKEN), ServeArgs(auth_token_env="JANUS_TEST_TOKEN")):
        assert read_auth_token(args, "0.0.0.0") == TOKEN
        assert read_auth_token(args, "127.0.0.1") == TOKEN  # a token configured is required on any bind
    assert read_auth_token(ServeArgs(auth_token_file=str(token_file)), "0.0.0.0") == TOKEN
    with pytest.raises(ValueError, match="JANUS_UNSET_TOKEN is not set in this replica's environment"):
        read_auth_token(ServeArgs(auth_token_env="JANUS_UNSET_TOKEN"), "0.0.0.0")
    with pytest.raises(ValueError, match="auth_token_file: cannot read .*: No such file"):
        read_auth_token(ServeArgs(auth_token_file=str(tmp_path / "missing")), "0.0.0.0")
    with pytest.raises(ValueError, match="the auth token has 7 characters, under 16"):
        read_auth_token(ServeArgs(auth_token="letmein"), "0.0.0.0")
    with pytest.raises(ValidationError, match="give one of auth_token / auth_token_file, not several"):
        ServeArgs(auth_token=TOKEN, auth_token_file=str(token_file))


def test_output_uri_cannot_reach_another_callers_images(server, s3_options):
    """A victim's image URI, dressed as a version, a fragment or a chain, is refused; used as a folder it gets a
    new folder under it on S3 (never the same key) and a 409 on a local disk. The victim's bytes never change."""
    url, out_dir = server
    fs = s3fs.S3FileSystem(**s3_options)
    victim_request = {"prompts": ["a red fox"], "output_uri": f"s3://{BUCKET}/allowed/v"}
    (victim,) = post(url, "/v1/generate", victim_request).json()["images"]
    original = fs.cat(victim["uri"])
    attacker = {"prompts": ["a lighthouse"], "seed": 9}
    for target in (f"{victim['uri']}?versionId=null", f"{victim['uri']}#x", f"{victim['uri']}::memory://x"):
        response = post(url, "/v1/generate", {**attacker, "output_uri": target})
        assert response.status_code == 422, response.text
    beside = post(url, "/v1/generate", {**attacker, "output_uri": victim["uri"]})
    assert beside.status_code == 200, beside.text
    (written,) = beside.json()["images"]
    assert written["uri"].startswith(victim["uri"] + "/") and fs.cat(written["uri"]) != original
    assert fs.cat(victim["uri"]) == original

    (local,) = post(url, "/v1/generate", {"prompts": ["a red fox"], "output_uri": str(out_dir / "v")}).json()["images"]
    original = Path(local["uri"]).read_bytes()
    before = engine_calls(url)
    for target in (local["uri"], local["uri"] + "/deeper"):
        response = post(url, "/v1/generate", {**attacker, "output_uri": target})
        assert response.status_code == 409, response.text
        assert response.json()["detail"] == "output_uri lies under an existing file"
    assert engine_calls(url) == before  # refused before the engine ran
    assert Path(local["uri"]).read_bytes() == original


def stalled_request(url: str, route: str) -> socket.socket:
    """A client that sends its headers and STALLED_BYTES of a larger body, then nothing more."""
    address = urlparse(url)
    sock = socket.create_connection((address.hostname, address.port), timeout=BODY_TIMEOUT_S + 10)
    head = f"POST {route} HTTP/1.1\r\nHost: {address.netloc}\r\nAuthorization: Bearer {TOKEN}\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {STALLED_BYTES + 50_000}\r\n\r\n"
    sock.sendall(head.encode() + b'{"images": ["' + b"A" * (STALLED_BYTES - 13))
    return sock


def reply(sock: socket.socket) -> bytes:
    """The response the server sends on `sock`: its head and its Content-Length of body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(4096)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:"))[15:])
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def timed(url: str, route: str, body: dict | None) -> float:
    start = time.perf_counter()
    if body is None:
        response = requests.get(url + route, headers=AUTH, timeout=10)
    else:
        response = post(url, route, body, timeout=10)
    assert response.status_code == 200, response.text
    return time.perf_counter() - start


VALID = [
    ("/v1/caption", {"images": [IMAGES[0]], "max_new_tokens": 4}),  # VQA shares its path (and the intake lock)
    ("/v1/generate", {"prompts": ["a cat"]}),
    ("/healthz", None),
]


@pytest.mark.serial  # latencies against the idle ones: measured with no other test running
def test_slow_clients_delay_no_one(server):
    """Stalled bodies on every route, more than the intake lock admits at once: the other requests take at most a
    second longer than when idle, and each stalled body gets a 408 once body_timeout_s has passed. While they
    hold most of max_buffered_bytes, a large body gets a 503 (small ones still pass)."""
    url, _ = server
    for route, body in VALID:  # warm: a route's first call is slower
        timed(url, route, body)
    idle = [timed(url, route, body) for route, body in VALID]
    stalled = [stalled_request(url, route) for route in ("/v1/caption", "/v1/vqa", "/v1/generate") * 2]
    try:
        time.sleep(0.3)  # their bytes reach the replica
        large = post(url, "/v1/caption", {"images": ["A" * (MAX_BUFFERED_BYTES - 6 * STALLED_BYTES)]})
        assert large.status_code == 503 and large.headers["retry-after"] == "1", large.text
        busy = [timed(url, route, body) for route, body in VALID]
        assert all(b < i + 1.0 for b, i in zip(busy, idle, strict=True)), (idle, busy)
        replies = [reply(sock) for sock in stalled]
        assert all(reply.startswith(b"HTTP/1.1 408 ") for reply in replies), replies
        assert all(f"not received within {BODY_TIMEOUT_S:g} s".encode() in reply for reply in replies)
    finally:
        for sock in stalled:
            sock.close()


def flood_request(url: str, i: int) -> int:
    """One of a few kinds of bad or oversized request; its status code (0: the server closed the connection
    while the body was still being sent, after refusing it)."""
    kind = i % 6
    try:
        if kind == 0:
            response = post(url, "/v1/caption", b'{"images": [')
        elif kind == 1:
            response = post(url, "/v1/caption", {"images": ["%%%"] * 4})
        elif kind == 2:  # declared over the route's limit
            response = post(url, "/v1/generate", b"x" * 1_000_000)
        elif kind == 3:  # chunked, no length: cut off at the limit
            response = post(url, "/v1/generate", iter([b'{"prompts": ["'] + [b"a" * 2**16] * 16))
        elif kind == 4:
            response = post(url, "/v1/generate", {"prompts": ["a"], "output_uri": f"s3://{BUCKET}/allowed?x"})
        else:
            response = post(url, "/v1/generate", {"prompts": ["a"]}, headers={})
    except requests.ConnectionError:
        return 0
    return response.status_code


@pytest.mark.serial  # latencies against the idle ones: measured with no other test running
def test_a_flood_of_bad_requests_leaves_valid_ones_fast(server):
    """Three clients send bad and oversized requests as fast as they can (bounded) while valid captions are
    timed: their median latency stays within 2x of idle, and every flood request got a 4xx."""
    url, _ = server
    caption = VALID[0]
    idle = statistics.median(timed(url, *caption) for _ in range(3))
    done = threading.Event()

    def flood(start: int) -> list[int]:
        statuses = []
        for i in range(start, start + 300):
            if done.is_set():
                break
            statuses.append(flood_request(url, i))
        return statuses

    with ThreadPoolExecutor(3) as pool:
        floods = [pool.submit(flood, start) for start in (0, 2, 4)]
        time.sleep(0.2)
        try:
            busy = statistics.median(timed(url, *caption) for _ in range(5))
        finally:
            done.set()
        statuses = [status for f in floods for status in f.result()]
    assert busy < 2 * idle, (idle, busy)
    assert len(statuses) > 30 and all(400 <= status < 500 or status == 0 for status in statuses), statuses
    assert statuses.count(0) < len(statuses) / 6  # almost every refused upload still gets its 413


def test_config_file_and_import_paths():
    """`serve run janus_batch/serve_config.yaml` and `serve run janus_batch.serve:app` resolve to valid apps."""
    config = yaml.safe_load((Path(__file__).parents[1] / "janus_batch" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.parse_obj(config)
    (application,) = schema.applications
    assert application.import_path == "janus_batch.serve:build_app"
    args = ServeArgs.model_validate(application.args)
    assert args.num_gpus == 1 and args.max_replicas > args.min_replicas
    assert isinstance(build_app(args), Application)
    # It binds every address, so its replicas need the token from their environment.
    assert config["http_options"]["host"] == "0.0.0.0" and args.auth_token_env == "JANUS_BATCH_SERVE_TOKEN"
    with pytest.raises(ValueError, match="JANUS_BATCH_SERVE_TOKEN is not set"):
        read_auth_token(args, "0.0.0.0")

    from janus_batch.serve import app

    assert isinstance(app, Application)
    with pytest.raises(ValueError, match="min_replicas"):
        ServeArgs(min_replicas=3, max_replicas=2)


def test_an_engine_call_that_fails_fails_only_its_own_requests():
    """Jobs of one batch with other options run as separate engine calls: one of them failing leaves the others'
    results, each job its own share of its call's outputs."""
    seen = []

    async def call(options: ImageSampling, group: list[GenerateJob]) -> list:
        seen.append(options.seed)
        if options.seed == 4:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return [(prompt, i) for job in group for prompt in job.prompts for i in range(options.images_per_prompt)]

    def job(prompts: list[str], seed: int) -> GenerateJob:
        return GenerateJob(prompts, ImageSampling(images_per_prompt=2, seed=seed))

    jobs = [job(["fox"], 3), job(["cat"], 4), job(["dog", "owl"], 3)]
    fox, cat, dog_owl = asyncio.run(run_by_options(jobs, call))
    assert seen == [3, 4]  # one call per set of options
    assert (fox.outputs, fox.batch_size, fox.error) == ([("fox", 0), ("fox", 1)], 2, None)
    assert dog_owl.outputs == [("dog", 0), ("dog", 1), ("owl", 0), ("owl", 1)] and dog_owl.error is None
    assert cat.outputs == [] and cat.batch_size == 1 and "illegal memory access" in str(cat.error)


def test_no_secret_in_any_message_or_log(server):
    """The S3 secret and the token the app was given (run last: after every other request of this module) are
    in no repr, validation error, response or Ray log."""
    url, _ = server
    args = ServeArgs(storage_options={"key": "k", "secret": SECRET}, auth_token=TOKEN)
    assert SECRET not in repr(args) and TOKEN not in repr(args) and SECRET not in args.model_dump_json()
    with pytest.raises(ValidationError) as bad:
        ServeArgs(storage_options=[SECRET], auth_token=[TOKEN], auth_token_file=SECRET)
    assert SECRET not in str(bad.value) and TOKEN not in str(bad.value)
    for route in ("/v1/models", "/v1/stats", "/openapi.json", "/healthz"):
        assert SECRET not in requests.get(url + route, headers=AUTH, timeout=10).text
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    files = [path for path in logs.rglob("*") if path.is_file()]
    assert any("serve" in path.parts for path in files)  # the replica's and the proxy's logs are there
    for path in files:
        text = path.read_bytes()
        assert SECRET.encode() not in text and TOKEN.encode() not in text, path
