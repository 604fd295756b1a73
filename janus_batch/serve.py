"""Ray Serve app: captioning, VQA and image generation over HTTP, with dynamic batching into one JanusEngine.

    serve run janus_batch.serve:app                                   # tiny default model, CPU, port 8000
    serve run janus_batch.serve:build_app model=deepseek-community/Janus-Pro-1B num_gpus=1
    serve run janus_batch/serve_config.yaml                           # or `serve deploy` it to a running cluster

Routes (JSON in, sent as Content-Type: application/json, and JSON out; images travel as base64 strings of encoded
PNG, JPEG, WebP, GIF, BMP or TIFF files):
    POST /v1/caption   {"images": [b64, ...], "instruction"?, "max_new_tokens"?, "greedy"?, "temperature"?, "seed"?,
                        "ignore_eos"?}
    POST /v1/vqa       {"images": [b64, ...], "questions": [str, ...], ...same options}
    POST /v1/generate  {"prompts": [str, ...], "images_per_prompt"? (default 1), "cfg_weight"?, "temperature"?,
                        "top_k"?, "top_p"?, "seed"?, "greedy"?, "output_uri"?}  -> base64 PNGs, or URIs under it
    GET  /healthz, /v1/models, /v1/stats

One replica holds one model (on one GPU when num_gpus > 0). Concurrent requests are queued by `serve.batch` and
run as one engine call (one for understanding, one for generation); requests whose sampling options differ are
split into separate engine calls within a batch, since the engine takes one set of options per call. The options
are the engine's own (janus_batch/options.py: ImageSampling, TextSampling), their fields flat in the body,
with Serve's caps on top (ServeArgs; a max_new_tokens not given is the default capped at the server's). Everything
a request can get wrong is checked before it joins a batch, so a bad request never fails its neighbours.

Exposing it:
- Auth: with a token configured (`auth_token_env`, `auth_token_file` or `auth_token`), every route but /healthz,
  /docs and /openapi.json included, needs `Authorization: Bearer <token>` (else 401, before any body is read).
  The replica learns the bind host from the running Serve instance (`http_options.host`, e.g. `serve run --host`
  or a config's `http_options`): on anything but a loopback address it refuses to start without a token.
- Bodies: JSON by Content-Type (415 otherwise: no web page can send one cross-site without a CORS preflight, which
  is not answered), validated strictly, a 422 listing at most MAX_REPORTED_ERRORS errors. Each route takes at most
  what its limits allow (/v1/generate: its prompts, about 1 MB by default; /v1/caption and /v1/vqa: their
  images, 225 MB by default), refused with 413; a body must arrive within
  `body_timeout_s` (408). No lock is held while a body arrives; bodies held at once are bounded by
  `max_buffered_bytes` (503 with Retry-After beyond). Parsing and image decoding run in threads.
- output_uri: checked as the target filesystem will read it (no `?`, `#`, `::`, backslash, control character,
  empty / `.` / `..` segment, or over-long segment: 422), under an allowed prefix (403); each request writes a
  new folder (a random name) and never replaces an object. A target under an existing file is a 409.
- Nothing returned names a server path, the allowed prefixes or a credential: `model` is the last component of
  the model's name; `storage_options` and the token are masked in reprs and validation errors. Serve itself logs
  a config file's args when it imports the app: there, no keys in storage_options, no literal auth_token.
"""

import asyncio
import base64
import contextlib
import hmac
import io
import ipaddress
import itertools
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import fsspec
import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, Secret, SecretStr, ValidationError, model_validator
from ray import serve
from ray.serve import Application

from janus_batch.engine import GeneratedImage, JanusEngine
from janus_batch.engine.memory import memory_share
from janus_batch.model.preprocessing import ImageInputError, decode_image
from janus_batch.model.tiny import ensure_tiny_model
from janus_batch.options import DEFAULT_CAPTION_INSTRUCTION, ImageSampling, TextSampling

MAX_TEXT_CHARS = 8192  # any prompt, question or instruction; the token limit is checked against the model
# Request bodies are limited per route to what its limits allow: base64 images, texts of MAX_TEXT_CHARS (a
# character outside the BMP is 12 bytes as a JSON escape pair, \uXXXX\uXXXX), and this much for the rest.
JSON_BYTES_PER_CHAR = 12
BODY_SLACK_BYTES = 2**16
# output_uri: S3 keys stop at 1024 bytes and the request folder and file name add 45; a local file name at 255.
MAX_OUTPUT_PATH_BYTES = 960
MAX_SEGMENT_BYTES = 255
MIN_TOKEN_CHARS = 16
OPEN_PATHS = ("/healthz",)  # no token needed: load balancers and Kubernetes probes call it


class ServeArgs(BaseModel):
    """Application builder arguments (`serve run janus_batch.serve:build_app key=value`, or `args:` in a config)."""

    # Errors never echo the input: it may hold credentials.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    model: str | None = Field(None, description="HF id, local dir or s3:// prefix; None: the embedded tiny model")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    allow_pickle: bool = Field(False, description="load pickle (.bin) weights (weights_only); only if trusted")
    revision: str | None = Field(None, description="Hugging Face ids only: a branch, tag, commit or refs/pr/N")
    prompt_format: Literal["auto", "janus-pro", "janus-1.3b"] = "auto"  # auto: as the checkpoint tells
    storage_options: Secret[dict[str, Any]] = Field(
        default_factory=lambda: Secret({}), description="fsspec options for s3:// I/O; masked in reprs"
    )
    # Bearer-token auth: on whenever a token is configured, which it must be when Serve binds a non-loopback host.
    # The token itself: from Python only. Serve logs a config file's args (and so storage_options) as given.
    auth_token: SecretStr | None = Field(None, description="the token itself")
    auth_token_env: str | None = Field(None, description="an environment variable of the replicas that holds it")
    auth_token_file: str | None = Field(None, description="a file on the replicas' nodes that holds it")
    # Replicas: one model each; on a GPU when num_gpus > 0.
    num_gpus: float = Field(0, ge=0)
    num_cpus: float = Field(1, gt=0, description="per replica; also how many image requests it decodes at once")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0)
    max_ongoing_requests: int = Field(64, ge=1)
    # Batching: requests per engine call, and how long the first request waits for company.
    max_batch_size: int = Field(16, ge=1)
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    max_batch_rows: int | None = Field(
        None,
        ge=1,
        description="at most this many images (or understanding rows) per forward pass; None: as many "
        "as GPU memory holds (64 on CPU)",
    )
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="share of a GPU's memory a replica may use, times num_gpus if < 1"
    )
    # Request limits.
    max_images_per_request: int = Field(16, ge=1)
    max_image_bytes: int = Field(10 * 2**20, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_prompts_per_request: int = Field(8, ge=1)
    max_images_per_prompt: int = Field(16, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    allowed_output_prefixes: list[str] = Field(
        default_factory=list, description="output_uri must lie under one of these; empty: output_uri refused"
    )
    body_timeout_s: float = Field(30, gt=0, description="a request body must have arrived within this; else 408")
    max_buffered_bytes: int = Field(
        2**30, ge=1, description="request bodies a replica holds at once, received and not yet decoded; beyond: 503"
    )

    @model_validator(mode="after")
    def check_replicas(self) -> "ServeArgs":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self

    @model_validator(mode="after")
    def check_token_source(self) -> "ServeArgs":
        given = [name for name in ("auth_token", "auth_token_env", "auth_token_file") if getattr(self, name)]
        if len(given) > 1:
            raise ValueError(f"give one of {' / '.join(given)}, not several")
        return self


REQUEST_LIMITS = (
    "max_images_per_request",
    "max_image_bytes",
    "max_image_pixels",
    "max_prompts_per_request",
    "max_images_per_prompt",
    "max_new_tokens",
)


# ---- request and response bodies -------------------------------------------------------------------------


Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
# Any list in a body: far above the servers' limits (max_images_per_request, ...), which are checked after
# parsing, so that validation stops at once on a body of a million items rather than reporting each.
MAX_LIST_ITEMS = 1024
MAX_REPORTED_ERRORS = 20  # a 422 lists at most this many


class StrictBody(BaseModel):
    # A misspelt option is an error, not silently ignored; so is NaN or Infinity (JSON parsers accept both).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def refuse_unknown_fields(cls, data: Any) -> Any:
        # One error for all of them: `extra="forbid"` makes one per field, a million for a body of a million.
        if isinstance(data, dict) and (unknown := sorted(data.keys() - cls.model_fields.keys())):
            shown = ", ".join(repr(name[:40]) for name in unknown[:5])
            more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
            raise ValueError(f"unknown fields {shown}{more}: extra inputs are not permitted")
        return data


# The requests inherit the engine's options, so the body stays flat ({"prompts": [...], "seed": 1}) and each
# default and bound is the one in options.py; `sampling` gives them back as the options object.


class UnderstandRequest(StrictBody, TextSampling):
    images: list[str] = Field(min_length=1, max_length=MAX_LIST_ITEMS, description="base64-encoded image files")

    @property
    def sampling(self) -> TextSampling:
        return TextSampling(**self.model_dump(include=set(TextSampling.model_fields)))


class CaptionRequest(UnderstandRequest):
    instruction: Text = Field(DEFAULT_CAPTION_INSTRUCTION, min_length=1)


class VQARequest(UnderstandRequest):
    questions: list[Text] = Field(min_length=1, max_length=MAX_LIST_ITEMS, description="one question per image")

    @model_validator(mode="after")
    def check_questions(self) -> "VQARequest":
        if len(self.questions) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.questions)} questions")
        for i, question in enumerate(self.questions):
            if not question.strip():
                raise ValueError(f"questions[{i}] is empty")
        return self


class GenerateRequest(StrictBody, ImageSampling):
    prompts: list[Text] = Field(min_length=1, max_length=MAX_LIST_ITEMS)
    # Serve's own default, with the options' bounds: one image per prompt (a caller waits for all of them).
    images_per_prompt: Annotated[int, ImageSampling.model_fields["images_per_prompt"]] = 1
    output_uri: str | None = Field(None, description="write PNGs under this prefix (s3:// or a path)")

    @property
    def sampling(self) -> ImageSampling:
        return ImageSampling(**self.model_dump(include=set(ImageSampling.model_fields)))


class TextOut(BaseModel):
    text: str
    num_tokens: int
    finish_reason: Literal["eos", "length"]


class UnderstandResponse(BaseModel):
    model: str
    batch_size: int  # requests that shared this request's engine call
    results: list[TextOut]


class ImageOut(BaseModel):
    prompt_index: int
    sample_index: int
    seed: int
    image: str | None = None  # base64 PNG, when no output_uri was asked for
    uri: str | None = None


class GenerateResponse(BaseModel):
    model: str
    batch_size: int
    images: list[ImageOut]


def parse_body(model: type[BaseModel], body: bytes | bytearray) -> Any:
    """Validate a JSON body, strictly (JSON's types as they are: "2" is no integer, 1 no boolean): 400 when it is
    not JSON, 422 when it does not fit, listing the first MAX_REPORTED_ERRORS errors."""
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        if errors[0]["type"] == "json_invalid":  # then the only error
            raise HTTPException(400, f"malformed JSON body: {errors[0]['ctx']['error']}") from None
        # Without the inputs (they may be megabytes of base64) and contexts (they may hold exception objects).
        detail = [{key: err[key] for key in ("type", "loc", "msg")} for err in errors[:MAX_REPORTED_ERRORS]]
        if len(errors) > MAX_REPORTED_ERRORS:
            more = len(errors) - MAX_REPORTED_ERRORS
            detail.append({"type": "more_errors", "loc": [], "msg": f"and {more} more errors"})
        raise HTTPException(422, detail) from None


# ---- jobs handed to the batch methods ----------------------------------------------------------------------


@dataclass
class UnderstandJob:
    pixels: list[np.ndarray]  # preprocessed images
    questions: list[str]  # a caption's instruction, or a VQA question, per image
    options: TextSampling  # only jobs with equal options share an engine call

    @property
    def outputs(self) -> int:
        return len(self.pixels)


@dataclass
class GenerateJob:
    prompts: list[str]
    options: ImageSampling

    @property
    def outputs(self) -> int:
        return len(self.prompts) * self.options.images_per_prompt


@dataclass
class Batched:
    outputs: list  # this job's share of the engine call's outputs
    batch_size: int
    error: Exception | None = None  # the engine call of this job's group failed (other groups' results stand)


async def run_by_options(
    jobs: list[UnderstandJob] | list[GenerateJob], call: Callable[[Any, list], Awaitable[list]]
) -> list[Batched]:
    """One engine call, `call(options, group)`, per set of options among `jobs` (the engine takes one set per
    call; equal options are equal and hash alike, being frozen); each job gets its share of the outputs. A call
    that fails fails its own group's jobs only."""
    groups: dict[ImageSampling | TextSampling, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.options, []).append(i)
    results: list[Batched | None] = [None] * len(jobs)
    for options, members in groups.items():
        group = [jobs[i] for i in members]
        try:
            outputs = await call(options, group)
        except Exception as e:
            for i in members:
                results[i] = Batched([], len(group), e)
            continue
        starts = itertools.accumulate((job.outputs for job in group), initial=0)
        for i, (start, end) in zip(members, itertools.pairwise(starts), strict=True):
            results[i] = Batched(outputs[start:end], len(group))
    return results


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# ---- auth ----------------------------------------------------------------------------------------------------


def serve_http_host() -> str:
    """The host the running Serve instance's HTTP proxies bind (`http_options.host`). Ray 2.60 has no public
    getter: this is the controller client that serve.status() and serve.get_app_handle() use."""
    return serve.context._get_global_client().http_config.host


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost, or "": it may mean any address
        return False


def read_auth_token(args: ServeArgs, bind_host: str) -> str | None:
    """The bearer token callers must send, or None (no auth) when none is configured and Serve binds a loopback
    address only. Read on the replica: the environment variable or file lives where the replica runs."""
    if args.auth_token is not None:
        token = args.auth_token.get_secret_value()
    elif args.auth_token_env is not None:
        if args.auth_token_env not in os.environ:
            raise ValueError(f"auth_token_env: {args.auth_token_env} is not set in this replica's environment")
        token = os.environ[args.auth_token_env]
    elif args.auth_token_file is not None:
        try:
            token = Path(args.auth_token_file).read_text()
        except OSError as e:
            raise ValueError(f"auth_token_file: cannot read {args.auth_token_file}: {e.strerror}") from None
    elif is_loopback(bind_host):
        return None
    else:
        raise ValueError(
            f"Serve's HTTP proxies bind {bind_host!r}, not a loopback address, and no auth token is configured: "
            "set auth_token_env or auth_token_file in the app's args, or bind 127.0.0.1"
        )
    token = token.strip()  # a file's or a Kubernetes secret's trailing newline
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(
            f"the auth token has {len(token)} characters, under {MIN_TOKEN_CHARS}: use a random one "
            "(`openssl rand -hex 32`)"
        )
    return token


class BearerAuth:
    """ASGI middleware: when the replica has a token, every route but OPEN_PATHS (the docs and the OpenAPI schema
    included, and unknown paths) answers 401 unless the request has `Authorization: Bearer <token>`. It runs
    before the route, so no body is read for a caller without the token."""

    def __init__(self, app: Callable) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            token: bytes | None = serve.get_replica_context().servable_object.auth_token
            route = scope["path"].removeprefix(scope.get("root_path", ""))
            if token is not None and route not in OPEN_PATHS and not has_token(scope["headers"], token):
                response = JSONResponse(
                    {"detail": "missing or wrong bearer token"}, 401, headers={"WWW-Authenticate": "Bearer"}
                )
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def has_token(headers: list[tuple[bytes, bytes]], token: bytes) -> bool:
    scheme, _, credentials = dict(headers).get(b"authorization", b"").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), token)


# ---- where generated images may go ----------------------------------------------------------------------------


@dataclass
class OutputFolder:
    fs: fsspec.AbstractFileSystem
    path: str  # as `fs` sees it
    uri: str  # the same place as the caller wrote it, for the URIs returned


def protocols(fs_class: type) -> tuple[str, ...]:
    return (fs_class.protocol,) if isinstance(fs_class.protocol, str) else tuple(fs_class.protocol)


def allowed_prefix(uri: str) -> tuple[type, str]:
    """A server-given prefix -> (fsspec filesystem class, path as it sees it)."""
    fs_class = fsspec.get_filesystem_class(fsspec.core.split_protocol(uri)[0] or "file")
    return fs_class, fs_class._strip_protocol(uri)


def output_path(uri: str, allowed: list[tuple[type, str]]) -> tuple[str, str]:
    """A caller's output_uri -> (protocol, path as the target filesystem will see it), or a 4xx. Characters that
    a filesystem reads as something else than a path (s3fs: `?versionId=`, fsspec: `::` chaining, `#`) are refused
    rather than interpreted, and so are `.`, `..` and empty segments: the path checked is the path written. The
    errors name no allowed prefix and no server path."""
    if not uri.isprintable():
        raise HTTPException(422, "output_uri must not contain control or other non-printable characters")
    for text, why in (("?", "a query"), ("#", "a fragment"), ("::", "a filesystem chain"), ("\\", "a backslash")):
        if text in uri:
            raise HTTPException(422, f"output_uri must not contain {text!r} ({why})")
    protocol = fsspec.core.split_protocol(uri)[0] or "file"
    candidates = [(fs_class, prefix) for fs_class, prefix in allowed if protocol in protocols(fs_class)]
    if not candidates:
        raise HTTPException(403, "output_uri is not under a prefix this server allows")
    path = candidates[0][0]._strip_protocol(uri)
    segments = path.removeprefix("/").split("/")
    if any(segment in ("", ".", "..") for segment in segments):
        raise HTTPException(422, "output_uri must not have empty, '.' or '..' path segments")
    if max(len(segment.encode()) for segment in segments) > MAX_SEGMENT_BYTES:
        raise HTTPException(422, f"output_uri has a path segment over {MAX_SEGMENT_BYTES} bytes")
    if len(path.encode()) > MAX_OUTPUT_PATH_BYTES:
        raise HTTPException(422, f"output_uri is over {MAX_OUTPUT_PATH_BYTES} bytes")
    if not any(path == prefix or path.startswith(prefix.rstrip("/") + "/") for _, prefix in candidates):
        raise HTTPException(403, "output_uri is not under a prefix this server allows")
    return protocol, path


# ---- the deployment ----------------------------------------------------------------------------------------

api = FastAPI(title="janus-batch")
api.add_middleware(BearerAuth)  # before serve.ingress freezes the app


@serve.deployment
@serve.ingress(api)
class JanusServer:
    def __init__(self, args: ServeArgs):
        self.args = args
        # First, so that a missing token fails the replica before the model loads.
        token = read_auth_token(args, serve_http_host())
        self.auth_token = token.encode() if token is not None else None  # read by BearerAuth
        self.engine = JanusEngine.from_pretrained(
            args.model or str(ensure_tiny_model()),
            dtype=args.dtype,
            device="cuda" if args.num_gpus > 0 else "cpu",
            storage_options=args.storage_options.get_secret_value() or None,
            allow_pickle=args.allow_pickle,
            revision=args.revision,
            prompt_format=args.prompt_format,
            max_batch_rows=args.max_batch_rows,
            gpu_memory_utilization=memory_share(args.gpu_memory_utilization, args.num_gpus),
        )
        # Understanding and generation batches are queued separately but share the model: one engine call at
        # a time, run in a thread so the event loop keeps accepting (and batching) requests meanwhile.
        self.engine_lock = asyncio.Lock()
        # Image requests, once their body is in, are parsed and decoded a few at a time (CPU work). While bodies
        # arrive, only their bytes are bounded: max_buffered_bytes in all (one body may be hundreds of MB).
        self.intake = asyncio.Semaphore(max(1, int(args.num_cpus)))
        self.buffered_bytes = 0
        text_bytes = MAX_TEXT_CHARS * JSON_BYTES_PER_CHAR
        # Per image its base64 and a question (VQA); one instruction (captions).
        per_image = 4 * -(-args.max_image_bytes // 3) + text_bytes
        self.understand_body_limit = args.max_images_per_request * per_image + text_bytes + BODY_SLACK_BYTES
        self.generate_body_limit = args.max_prompts_per_request * text_bytes + BODY_SLACK_BYTES
        self.output_prefixes = [allowed_prefix(prefix) for prefix in args.allowed_output_prefixes]
        self.model_name = self.engine.model_id.rstrip("/").rsplit("/", 1)[-1]  # never a server path
        self.stats: Counter[str] = Counter()
        for batch_method in (self.understand_batch, self.generate_batch):
            batch_method.set_max_batch_size(args.max_batch_size)
            batch_method.set_batch_wait_timeout_s(args.batch_wait_timeout_s)

    async def check_health(self) -> None:
        """Called by Serve every few seconds (and by /healthz); raising marks the replica unhealthy. A broken CUDA
        context raises at a synchronise; while an engine call runs, its own error says so instead: a synchronise
        then would stall this event loop for the whole queued decode, and could meet a CUDA graph capture."""
        if self.engine.device.type == "cuda" and not self.engine_lock.locked():
            torch.cuda.synchronize(self.engine.device)  # idle: returns at once

    # ---- batched engine calls -------------------------------------------------------------------------

    async def run_engine(self, kind: str, fn: Callable[..., list], *args, **kwargs) -> list:
        async with self.engine_lock:
            outputs = await asyncio.to_thread(fn, *args, **kwargs)
        self.stats[f"{kind}_engine_calls"] += 1
        return outputs

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)  # both reset from ServeArgs in __init__
    async def understand_batch(self, jobs: list[UnderstandJob]) -> list[Batched]:
        async def call(options: TextSampling, group: list[UnderstandJob]) -> list:
            return await self.run_engine(
                "understand",
                self.engine.understand,
                [p for job in group for p in job.pixels],
                [q for job in group for q in job.questions],
                options,
                # Keyed on the row's index in its own request, so sampled text does not depend on the batch.
                row_ids=[i for job in group for i in range(len(job.pixels))],
            )

        self.stats["understand_requests"] += len(jobs)
        return await run_by_options(jobs, call)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def generate_batch(self, jobs: list[GenerateJob]) -> list[Batched]:
        async def call(options: ImageSampling, group: list[GenerateJob]) -> list:
            # Prompt ids default to the prompt text: an image depends on (prompt, seed, index), never the batch.
            return await self.run_engine(
                "generate", self.engine.generate_images, [p for job in group for p in job.prompts], options
            )

        self.stats["generate_requests"] += len(jobs)
        return await run_by_options(jobs, call)

    # ---- request checks (all before batching) ---------------------------------------------------------

    @contextlib.asynccontextmanager
    async def received_body(self, http: Request, limit: int) -> AsyncIterator[bytearray]:
        """The whole request body, counted in the replica's buffered bytes until the block ends."""
        # A browser sends any other type cross-site without asking first (a form, a plain-text fetch): refused, no
        # web page can make a replica work.
        if http.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            raise HTTPException(415, "the body must be JSON, sent with Content-Type: application/json")
        body = bytearray()
        try:
            await self.receive(http, limit, body)
            yield body
        finally:
            self.buffered_bytes -= len(body)

    async def receive(self, http: Request, limit: int, body: bytearray) -> None:
        """Read the request body into `body`, with no lock held (a slow client delays no one else): 413 as soon as
        it outgrows `limit`, 408 when it has not arrived within body_timeout_s, 503 while the replica holds
        max_buffered_bytes of bodies already."""
        declared = http.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"request body over this route's limit of {limit} bytes")
        try:
            async with asyncio.timeout(self.args.body_timeout_s):
                async for chunk in http.stream():  # Content-Length may be absent (chunked) or wrong
                    if len(body) + len(chunk) > limit:
                        raise HTTPException(413, f"request body over this route's limit of {limit} bytes")
                    if self.buffered_bytes + len(chunk) > self.args.max_buffered_bytes:
                        raise HTTPException(
                            503, "this replica holds too many request bodies; retry", headers={"Retry-After": "1"}
                        )
                    body += chunk
                    self.buffered_bytes += len(chunk)
        except TimeoutError:
            raise HTTPException(408, f"request body not received within {self.args.body_timeout_s:g} s") from None

    def check_limit(self, what: str, value: int, limit: int) -> None:
        if value > limit:
            raise HTTPException(422, f"{what} is {value}, over this server's limit of {limit}")

    def load_images(self, images: list[str]) -> list[np.ndarray]:
        """base64 strings -> preprocessed arrays, or a 4xx naming the first bad image."""
        self.check_limit("number of images", len(images), self.args.max_images_per_request)
        pixels = []
        for i, b64 in enumerate(images):
            try:
                # Line breaks allowed: `base64` and MIME wrap their output at 76 columns.
                data = base64.b64decode("".join(b64.split()), validate=True)
            except ValueError as e:  # binascii.Error, or a non-ASCII character
                raise HTTPException(422, f"images[{i}]: invalid base64 ({e})") from None
            if len(data) > self.args.max_image_bytes:
                raise HTTPException(
                    413, f"images[{i}]: {len(data)} bytes, over this server's limit of {self.args.max_image_bytes}"
                )
            try:
                pixels.append(self.engine.prepare_image(decode_image(data, max_pixels=self.args.max_image_pixels)))
            except ImageInputError as e:
                raise HTTPException(422, f"images[{i}]: {e}") from None
        return pixels

    def check_question(self, field: str, text: str, max_new_tokens: int) -> None:
        if (error := self.engine.check_question(text, max_new_tokens)) is not None:
            raise HTTPException(422, f"{field}: {error}")

    def text_sampling(self, request: UnderstandRequest) -> TextSampling:
        """The request's options; a max_new_tokens it does not give is the default, capped at this server's."""
        options = request.sampling
        if "max_new_tokens" not in request.model_fields_set:
            return options.model_copy(update={"max_new_tokens": min(options.max_new_tokens, self.args.max_new_tokens)})
        self.check_limit("max_new_tokens", options.max_new_tokens, self.args.max_new_tokens)
        return options

    def understanding_job(self, body: type[CaptionRequest] | type[VQARequest], data: bytearray) -> UnderstandJob:
        """Parse and check a caption or VQA request and decode its images (CPU work, run in a thread). The job
        holds the preprocessed images only (0.44 MB each at 384 px): the base64 never waits in the batch queue."""
        request = parse_body(body, data)
        options = self.text_sampling(request)
        if isinstance(request, VQARequest):
            questions = list(request.questions)
            for i, question in enumerate(questions):
                self.check_question(f"questions[{i}]", question, options.max_new_tokens)
        else:
            # A caption asks its instruction of every image, so captions and questions can share an engine call.
            questions = [request.instruction] * len(request.images)
            self.check_question("instruction", request.instruction, options.max_new_tokens)
        return UnderstandJob(self.load_images(request.images), questions, options)

    def generate_request(self, data: bytearray) -> GenerateRequest:
        """Parse and check a generation request (run in a thread)."""
        request = parse_body(GenerateRequest, data)
        self.check_limit("number of prompts", len(request.prompts), self.args.max_prompts_per_request)
        self.check_limit("images_per_prompt", request.images_per_prompt, self.args.max_images_per_prompt)
        for i, prompt in enumerate(request.prompts):
            if (error := self.engine.check_prompt(prompt)) is not None:
                raise HTTPException(422, f"prompts[{i}]: {error}")
        return request

    def output_folder(self, output_uri: str) -> OutputFolder:
        """Check output_uri and make this request's folder under it, a new name (no write of this request can
        replace an earlier object), before the engine runs: a bad target fails the request with a 4xx at once."""
        protocol, path = output_path(output_uri, self.output_prefixes)
        fs = fsspec.filesystem(protocol, **self.args.storage_options.get_secret_value())
        name = uuid.uuid4().hex
        try:
            fs.makedirs(f"{path}/{name}", exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise HTTPException(409, "output_uri lies under an existing file") from None
        uri = path if fsspec.core.split_protocol(output_uri)[0] is None else f"{protocol}://{path}"
        return OutputFolder(fs, f"{path}/{name}", f"{uri}/{name}")

    # ---- routes ---------------------------------------------------------------------------------------

    async def understand(self, http: Request, body: type[CaptionRequest] | type[VQARequest]) -> UnderstandResponse:
        # The intake lock is taken once the body is in.
        async with self.received_body(http, self.understand_body_limit) as data, self.intake:
            job = await asyncio.to_thread(self.understanding_job, body, data)
        done: Batched = await self.understand_batch(job)
        if done.error is not None:
            raise done.error
        results = [TextOut(text=r.text, num_tokens=r.num_tokens, finish_reason=r.finish_reason) for r in done.outputs]
        return UnderstandResponse(model=self.model_name, batch_size=done.batch_size, results=results)

    @api.post("/v1/caption")
    async def caption(self, http: Request) -> UnderstandResponse:
        return await self.understand(http, CaptionRequest)

    @api.post("/v1/vqa")
    async def vqa(self, http: Request) -> UnderstandResponse:
        return await self.understand(http, VQARequest)

    @api.post("/v1/generate")
    async def generate(self, http: Request) -> GenerateResponse:
        async with self.received_body(http, self.generate_body_limit) as data:
            request = await asyncio.to_thread(self.generate_request, data)
        folder = None
        if request.output_uri is not None:
            folder = await asyncio.to_thread(self.output_folder, request.output_uri)
        done: Batched = await self.generate_batch(GenerateJob(request.prompts, request.sampling))
        if done.error is not None:
            raise done.error
        images = await asyncio.to_thread(self.deliver_images, done.outputs, request.images_per_prompt, folder)
        return GenerateResponse(model=self.model_name, batch_size=done.batch_size, images=images)

    def deliver_images(
        self, generated: list[GeneratedImage], per_prompt: int, folder: OutputFolder | None
    ) -> list[ImageOut]:
        """PNG-encode; inline as base64, or write into the request's folder and return the URIs."""
        outs, files = [], {}
        for n, image in enumerate(generated):
            png = png_bytes(image.pixels)
            out = ImageOut(prompt_index=n // per_prompt, sample_index=image.sample_index, seed=image.seed)
            if folder is None:
                out.image = base64.b64encode(png).decode()
            else:
                name = f"{out.prompt_index:03d}_{out.sample_index:03d}.png"
                files[f"{folder.path}/{name}"] = png
                out.uri = f"{folder.uri}/{name}"
            outs.append(out)
        if files:
            folder.fs.pipe(files, mode="create")  # refuses to replace an object (S3: If-None-Match)
        return outs

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        await self.check_health()
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        engine, args = self.engine, self.args
        return {
            "model": self.model_name,
            "weights_hash": engine.weights_hash,
            "device": str(engine.device),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "understanding_image_size": engine.image_size,
            "generated_image_size": engine.gen_image_size,
            "limits": {name: getattr(args, name) for name in REQUEST_LIMITS},
        }

    @api.get("/v1/stats")
    async def get_stats(self) -> dict[str, int]:
        return dict(self.stats)


def build_app(args: ServeArgs) -> Application:
    """Serve's application builder: Serve validates `args` into ServeArgs from the CLI or a config file."""
    return JanusServer.options(
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": args.num_gpus},
        autoscaling_config={
            "min_replicas": args.min_replicas,
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
        },
        max_ongoing_requests=args.max_ongoing_requests,
    ).bind(args)


app = build_app(ServeArgs())
