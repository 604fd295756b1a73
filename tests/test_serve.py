"""The Ray Serve app over real HTTP on localhost, with the tiny model on CPU: captions, VQA, generation (inline
PNGs, a local folder, S3 on a moto server), concurrent requests batched into one engine call, bad requests."""

import asyncio
import base64
import io
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import ray
import requests
import s3fs
import yaml
from PIL import Image
from ray import serve
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from janus_batch.serve import GenerateJob, ServeArgs, build_app, run_by_options

BATCH = 4  # max_batch_size of the test deployment
BUCKET = "serve-out"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def b64_image(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


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
    """Base URL of the running app, and the local folder it may write generated images under."""
    if not ray.is_initialized():  # other test modules share the session's Ray
        ray.init(num_cpus=2, include_dashboard=False)
    out_dir = tmp_path_factory.mktemp("serve-out")
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
        storage_options=s3_options,
    )
    serve.run(build_app(args), name="janus-test", route_prefix="/")
    yield f"http://127.0.0.1:{port}", out_dir
    serve.shutdown()


def post(url: str, route: str, body: dict | bytes) -> requests.Response:
    if isinstance(body, bytes):  # sent as is, e.g. malformed JSON
        return requests.post(url + route, data=body, timeout=60)
    return requests.post(url + route, json=body, timeout=60)


def engine_calls(url: str) -> dict[str, int]:
    stats = requests.get(url + "/v1/stats", timeout=10).json()
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
    info = requests.get(url + "/v1/models", timeout=10).json()
    assert info["device"] == "cpu" and info["generated_image_size"] == 64
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


LONG_TEXT = "qzj " * 1500  # ~6000 byte-level tokens: over the tiny model's 2048 positions, under 8192 characters

BAD_REQUESTS = [
    ("/v1/caption", b'{"images": [', 400, "malformed JSON body"),
    ("/v1/caption", {}, 422, "Field required"),
    ("/v1/caption", {"images": "abc"}, 422, "Input should be a valid array"),
    ("/v1/caption", {"images": IMAGES[:1], "max_new_token": 4}, 422, "Extra inputs are not permitted"),
    ("/v1/caption", {"images": IMAGES + IMAGES[:1]}, 422, "number of images is 5, over this server's limit of 4"),
    ("/v1/caption", {"images": [big_noise_png()]}, 413, "over this server's limit of 100000"),
    ("/v1/caption", {"images": ["A" * 2_000_000]}, 413, "request body over this server's limit"),
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
    ("/v1/generate", {"prompts": ["a"], "images_per_prompt": 5}, 422, "images_per_prompt is 5, over this server's"),
    ("/v1/generate", {"prompts": ["a"], "images_per_prompt": 0}, 422, "greater than or equal to 1"),
    ("/v1/generate", b'{"prompts": ["a"], "cfg_weight": NaN}', 422, "Input should be a finite number"),
    ("/v1/generate", b'{"prompts": ["a"], "temperature": Infinity}', 422, "Input should be a finite number"),
    ("/v1/generate", {"prompts": ["a"], "output_uri": "/etc/janus"}, 403, "not under an allowed prefix"),
    ("/v1/generate", {"prompts": ["a"], "output_uri": f"s3://{BUCKET}/elsewhere"}, 403, "not under an allowed"),
    ("/v1/generate", {"prompts": ["a"], "output_uri": f"s3://{BUCKET}/allowed/../x"}, 422, "must not contain '..'"),
]


@pytest.mark.parametrize(("route", "body", "status", "message"), BAD_REQUESTS)
def test_bad_requests_get_a_specific_4xx_before_batching(server, route, body, status, message):
    url, _ = server
    before = engine_calls(url)
    response = post(url, route, body)
    assert response.status_code == status, response.text
    assert message in str(response.json()["detail"])
    assert engine_calls(url) == before


def test_config_file_and_import_paths():
    """`serve run janus_batch/serve_config.yaml` and `serve run janus_batch.serve:app` resolve to valid apps."""
    config = yaml.safe_load((Path(__file__).parents[1] / "janus_batch" / "serve_config.yaml").read_text())
    schema = ServeDeploySchema.parse_obj(config)
    (application,) = schema.applications
    assert application.import_path == "janus_batch.serve:build_app"
    args = ServeArgs.model_validate(application.args)
    assert args.num_gpus == 1 and args.max_replicas > args.min_replicas
    assert isinstance(build_app(args), Application)

    from janus_batch.serve import app

    assert isinstance(app, Application)
    with pytest.raises(ValueError, match="min_replicas"):
        ServeArgs(min_replicas=3, max_replicas=2)


def test_an_engine_call_that_fails_fails_only_its_own_requests():
    """Jobs of one batch with other options run as separate engine calls: one of them failing leaves the others'
    results, each job its own share of its call's outputs."""
    seen = []

    async def call(options: tuple, group: list[GenerateJob]) -> list:
        seen.append(options[5])
        if options[5] == 4:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return [(prompt, i) for job in group for prompt in job.prompts for i in range(options[0])]

    def job(prompts: list[str], seed: int) -> GenerateJob:
        return GenerateJob(prompts, (2, 5.0, 1.0, None, None, seed, False))

    jobs = [job(["fox"], 3), job(["cat"], 4), job(["dog", "owl"], 3)]
    fox, cat, dog_owl = asyncio.run(run_by_options(jobs, call))
    assert seen == [3, 4]  # one call per set of options
    assert (fox.outputs, fox.batch_size, fox.error) == ([("fox", 0), ("fox", 1)], 2, None)
    assert dog_owl.outputs == [("dog", 0), ("dog", 1), ("owl", 0), ("owl", 1)] and dog_owl.error is None
    assert cat.outputs == [] and cat.batch_size == 1 and "illegal memory access" in str(cat.error)
