"""Ray Serve app: captioning, VQA and image generation over HTTP, with dynamic batching into one JanusEngine.

    serve run janus_batch.serve:app                                   # tiny default model, CPU, port 8000
    serve run janus_batch.serve:build_app model=deepseek-community/Janus-Pro-1B num_gpus=1
    serve run janus_batch/serve_config.yaml                           # or `serve deploy` it to a running cluster

Routes (JSON in, JSON out; images travel as base64 strings of encoded PNG/JPEG/WebP bytes):
    POST /v1/caption   {"images": [b64, ...], "instruction"?, "max_new_tokens"?, "greedy"?, "temperature"?, "seed"?}
    POST /v1/vqa       {"images": [b64, ...], "questions": [str, ...], ...same options}
    POST /v1/generate  {"prompts": [str, ...], "images_per_prompt"?, "cfg_weight"?, "temperature"?, "top_k"?,
                        "top_p"?, "seed"?, "greedy"?, "output_uri"?}  -> base64 PNGs, or URIs under output_uri
    GET  /healthz, /v1/models, /v1/stats

One replica holds one model (on one GPU when num_gpus > 0). Concurrent requests are queued by `serve.batch` and
run as one engine call (one for understanding, one for generation); requests whose sampling options differ are
split into separate engine calls within a batch, since the engine takes one set of options per call. Everything a
request can get wrong is checked before it joins a batch, so a bad request never fails its neighbours.
"""

import asyncio
import base64
import io
import itertools
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import fsspec
import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve
from ray.serve import Application

from janus_batch.engine import GeneratedImage, ImageInputError, JanusEngine, decode_image
from janus_batch.engine.engine import DEFAULT_CAPTION_INSTRUCTION, memory_share
from janus_batch.model.tiny import ensure_tiny_model

MAX_TEXT_CHARS = 8192  # any prompt, question or instruction; the token limit is checked against the model
# JSON around the images: the request body may be this much larger than its base64 images.
BODY_SLACK_BYTES = 2**20
DEFAULT_NEW_TOKENS = 128  # for understanding requests that do not say, capped by the server's max_new_tokens


class ServeArgs(BaseModel):
    """Application builder arguments (`serve run janus_batch.serve:build_app key=value`, or `args:` in a config)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="HF id, local dir or s3:// prefix; None: the embedded tiny model")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for s3:// I/O")
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

    @model_validator(mode="after")
    def check_replicas(self) -> "ServeArgs":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
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


class StrictBody(BaseModel):
    # A misspelt option is an error, not silently ignored; so is NaN or Infinity (JSON parsers accept both).
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class UnderstandOptions(StrictBody):
    images: list[str] = Field(min_length=1, description="base64-encoded image files")
    max_new_tokens: int | None = Field(None, ge=1, description=f"default: {DEFAULT_NEW_TOKENS} or the server's limit")
    greedy: bool = True
    temperature: float = Field(1.0, ge=0)
    seed: int = 0


class CaptionRequest(UnderstandOptions):
    instruction: Text = Field(DEFAULT_CAPTION_INSTRUCTION, min_length=1)


class VQARequest(UnderstandOptions):
    questions: list[Text] = Field(min_length=1, description="one question per image")

    @model_validator(mode="after")
    def check_questions(self) -> "VQARequest":
        if len(self.questions) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.questions)} questions")
        for i, question in enumerate(self.questions):
            if not question.strip():
                raise ValueError(f"questions[{i}] is empty")
        return self


class GenerateRequest(StrictBody):
    prompts: list[Text] = Field(min_length=1)
    images_per_prompt: int = Field(1, ge=1)
    cfg_weight: float = 5.0
    temperature: float = Field(1.0, ge=0)
    top_k: int | None = Field(None, ge=1)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int = 0
    greedy: bool = False
    output_uri: str | None = Field(None, description="write PNGs under this prefix (s3:// or a path)")


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


def parse_body(model: type[BaseModel], body: bytes) -> Any:
    """Validate a JSON body whatever its Content-Type: 400 when it is not JSON, 422 when it does not fit."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        if errors[0]["type"] == "json_invalid":  # then the only error
            raise HTTPException(400, f"malformed JSON body: {errors[0]['ctx']['error']}") from None
        # Without the inputs (they may be megabytes of base64) and contexts (they may hold exception objects).
        raise HTTPException(422, [{key: err[key] for key in ("type", "loc", "msg")} for err in errors]) from None


# ---- jobs handed to the batch methods ----------------------------------------------------------------------


@dataclass
class UnderstandJob:
    pixels: list[np.ndarray]  # preprocessed images
    questions: list[str | None]  # None: caption with `options[0]` (the instruction)
    options: tuple  # engine options; only jobs with equal options share an engine call

    @property
    def outputs(self) -> int:
        return len(self.pixels)


@dataclass
class GenerateJob:
    prompts: list[str]
    options: tuple  # options[0] is images_per_prompt

    @property
    def outputs(self) -> int:
        return len(self.prompts) * self.options[0]


@dataclass
class Batched:
    outputs: list  # this job's share of the engine call's outputs
    batch_size: int
    error: Exception | None = None  # the engine call of this job's group failed (other groups' results stand)


async def run_by_options(
    jobs: list[UnderstandJob] | list[GenerateJob], call: Callable[[tuple, list], Awaitable[list]]
) -> list[Batched]:
    """One engine call, `call(options, group)`, per set of options among `jobs` (the engine takes one set per
    call); each job gets its share of the outputs. A call that fails fails its own group's jobs only."""
    groups: dict[tuple, list[int]] = {}
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


# ---- the deployment ----------------------------------------------------------------------------------------

api = FastAPI(title="janus-batch")


@serve.deployment
@serve.ingress(api)
class JanusServer:
    def __init__(self, args: ServeArgs):
        self.args = args
        self.engine = JanusEngine.from_pretrained(
            args.model or str(ensure_tiny_model()),
            dtype=args.dtype,
            device="cuda" if args.num_gpus > 0 else "cpu",
            storage_options=args.storage_options or None,
            max_batch_rows=args.max_batch_rows,
            gpu_memory_utilization=memory_share(args.gpu_memory_utilization, args.num_gpus),
        )
        # Understanding and generation batches are queued separately but share the model: one engine call at
        # a time, run in a thread so the event loop keeps accepting (and batching) requests meanwhile.
        self.engine_lock = asyncio.Lock()
        # Image requests are read and decoded a few at a time: one body may be hundreds of MB of base64
        # (max_images_per_request x max_image_bytes), and max_ongoing_requests of them could exhaust the replica.
        self.intake = asyncio.Semaphore(max(1, int(args.num_cpus)))
        self.max_body_bytes = args.max_images_per_request * 4 * -(-args.max_image_bytes // 3) + BODY_SLACK_BYTES
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
        async def call(options: tuple, group: list[UnderstandJob]) -> list:
            instruction, max_new_tokens, greedy, temperature, seed = options
            return await self.run_engine(
                "understand",
                self.engine.understand,
                [p for job in group for p in job.pixels],
                [q for job in group for q in job.questions],
                instruction=instruction,
                max_new_tokens=max_new_tokens,
                greedy=greedy,
                temperature=temperature,
                seed=seed,
                # Keyed on the row's index in its own request, so sampled text does not depend on the batch.
                row_ids=[i for job in group for i in range(len(job.pixels))],
            )

        self.stats["understand_requests"] += len(jobs)
        return await run_by_options(jobs, call)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.05)
    async def generate_batch(self, jobs: list[GenerateJob]) -> list[Batched]:
        async def call(options: tuple, group: list[GenerateJob]) -> list:
            images_per_prompt, cfg_weight, temperature, top_k, top_p, seed, greedy = options
            # Prompt ids default to the prompt text: an image depends on (prompt, seed, index), never the batch.
            return await self.run_engine(
                "generate",
                self.engine.generate_images,
                [p for job in group for p in job.prompts],
                images_per_prompt=images_per_prompt,
                cfg_weight=cfg_weight,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
                greedy=greedy,
            )

        self.stats["generate_requests"] += len(jobs)
        return await run_by_options(jobs, call)

    # ---- request checks (all before batching) ---------------------------------------------------------

    async def read_body(self, http: Request) -> bytes:
        """The request body, refused with 413 as soon as it outgrows what the image limits allow."""
        if int(http.headers.get("content-length", 0)) > self.max_body_bytes:
            raise HTTPException(413, f"request body over this server's limit of {self.max_body_bytes} bytes")
        body = bytearray()
        async for chunk in http.stream():  # Content-Length may be absent (chunked) or wrong
            body += chunk
            if len(body) > self.max_body_bytes:
                raise HTTPException(413, f"request body over this server's limit of {self.max_body_bytes} bytes")
        return bytes(body)

    def check_limit(self, what: str, value: int, limit: int) -> None:
        if value > limit:
            raise HTTPException(422, f"{what} is {value}, over this server's limit of {limit}")

    def load_images(self, images: list[str]) -> list[np.ndarray]:
        """base64 strings -> preprocessed arrays, or a 4xx naming the first bad image."""
        self.check_limit("number of images", len(images), self.args.max_images_per_request)
        pixels = []
        for i, b64 in enumerate(images):
            try:
                data = base64.b64decode(b64, validate=True)
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

    def check_output_uri(self, uri: str) -> None:
        if ".." in uri.replace("\\", "/").split("/"):
            raise HTTPException(422, f"output_uri must not contain '..': {uri}")
        allowed = self.args.allowed_output_prefixes
        if not any(uri.rstrip("/") == p.rstrip("/") or uri.startswith(p.rstrip("/") + "/") for p in allowed):
            raise HTTPException(403, f"output_uri {uri} is not under an allowed prefix {allowed}")

    # ---- routes ---------------------------------------------------------------------------------------

    def new_tokens(self, request: UnderstandOptions) -> int:
        if request.max_new_tokens is None:
            return min(DEFAULT_NEW_TOKENS, self.args.max_new_tokens)
        self.check_limit("max_new_tokens", request.max_new_tokens, self.args.max_new_tokens)
        return request.max_new_tokens

    async def understanding_job(self, http: Request, body: type[CaptionRequest] | type[VQARequest]) -> UnderstandJob:
        """Read and check a caption or VQA request and decode its images, under the intake limit. The job holds
        the preprocessed images only (0.44 MB each at 384 px): the base64 never waits in the batch queue."""
        async with self.intake:
            request = parse_body(body, await self.read_body(http))
            max_new_tokens = self.new_tokens(request)
            if isinstance(request, VQARequest):
                questions, instruction = list(request.questions), DEFAULT_CAPTION_INSTRUCTION
                for i, question in enumerate(questions):
                    self.check_question(f"questions[{i}]", question, max_new_tokens)
            else:
                questions, instruction = [None] * len(request.images), request.instruction
                self.check_question("instruction", instruction, max_new_tokens)
            pixels = await asyncio.to_thread(self.load_images, request.images)  # decoding is CPU work
        return UnderstandJob(
            pixels, questions, (instruction, max_new_tokens, request.greedy, request.temperature, request.seed)
        )

    async def understand(self, job: UnderstandJob) -> UnderstandResponse:
        done: Batched = await self.understand_batch(job)
        if done.error is not None:
            raise done.error
        results = [TextOut(text=r.text, num_tokens=r.num_tokens, finish_reason=r.finish_reason) for r in done.outputs]
        return UnderstandResponse(model=self.engine.model_id, batch_size=done.batch_size, results=results)

    @api.post("/v1/caption")
    async def caption(self, http: Request) -> UnderstandResponse:
        return await self.understand(await self.understanding_job(http, CaptionRequest))

    @api.post("/v1/vqa")
    async def vqa(self, http: Request) -> UnderstandResponse:
        return await self.understand(await self.understanding_job(http, VQARequest))

    @api.post("/v1/generate")
    async def generate(self, http: Request) -> GenerateResponse:
        request: GenerateRequest = parse_body(GenerateRequest, await self.read_body(http))
        self.check_limit("number of prompts", len(request.prompts), self.args.max_prompts_per_request)
        self.check_limit("images_per_prompt", request.images_per_prompt, self.args.max_images_per_prompt)
        for i, prompt in enumerate(request.prompts):
            if (error := self.engine.check_prompt(prompt)) is not None:
                raise HTTPException(422, f"prompts[{i}]: {error}")
        if request.output_uri is not None:
            self.check_output_uri(request.output_uri)
        options = (
            request.images_per_prompt,
            request.cfg_weight,
            request.temperature,
            request.top_k,
            request.top_p,
            request.seed,
            request.greedy,
        )
        done: Batched = await self.generate_batch(GenerateJob(request.prompts, options))
        if done.error is not None:
            raise done.error
        images = await asyncio.to_thread(
            self.deliver_images, done.outputs, request.images_per_prompt, request.output_uri
        )
        return GenerateResponse(model=self.engine.model_id, batch_size=done.batch_size, images=images)

    def deliver_images(
        self, generated: list[GeneratedImage], per_prompt: int, output_uri: str | None
    ) -> list[ImageOut]:
        """PNG-encode; inline as base64, or write under output_uri/<request id>/ and return the URIs."""
        outs, files = [], {}
        if output_uri is not None:
            fs, root = fsspec.core.url_to_fs(output_uri, **self.args.storage_options)
            request_dir = uuid.uuid4().hex  # concurrent requests to one prefix never overwrite each other
            fs.makedirs(f"{root.rstrip('/')}/{request_dir}", exist_ok=True)
        for n, image in enumerate(generated):
            png = png_bytes(image.pixels)
            out = ImageOut(prompt_index=n // per_prompt, sample_index=image.sample_index, seed=image.seed)
            if output_uri is None:
                out.image = base64.b64encode(png).decode()
            else:
                name = f"{request_dir}/{out.prompt_index:03d}_{out.sample_index:03d}.png"
                files[f"{root.rstrip('/')}/{name}"] = png
                out.uri = f"{output_uri.rstrip('/')}/{name}"
            outs.append(out)
        if files:
            fs.pipe(files)
        return outs

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        await self.check_health()
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        engine, args = self.engine, self.args
        return {
            "model": engine.model_id,
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
