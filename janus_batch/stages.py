"""Ray Data callables: CPU preprocessing, the model actor stages, CPU postprocessing.

Every stage takes and returns Arrow tables. A row that cannot be processed keeps flowing with `error` set
(and no payload), so one bad row never fails its batch, and every input row reaches the output.
The model stages run inside actors holding one JanusEngine each; everything else runs as CPU tasks,
so the model never waits on decoding, encoding or writing.
"""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
from PIL import Image

from janus_batch.curation import CANDIDATE_FIELDS, Candidate, SelectionRule, select_candidates
from janus_batch.io.readers import id_key, row_key
from janus_batch.io.schemas import ERROR
from janus_batch.io.storage import StorageConfig, StoreUnavailable, read_bytes
from janus_batch.io.writers import IMAGE_EXTENSIONS
from janus_batch.model.preprocessing import decode_image, preprocess_image
from janus_batch.options import ImageSampling, ScoreOptions, TextSampling

# ---- shared ----------------------------------------------------------------------------------------------


def load_engine(model: dict, gpus: float, storage: StorageConfig, batching: dict):
    """The engine for a job's `model` (a ModelSpec's fields, and `weights_hash`: the weights that made the run's
    rows so far, or None). A model whose weights changed under the same source is refused: its rows would
    differ from the run's. `batching`: the engine's batch settings, gpu_memory_utilization as a whole GPU's.

    The engine (torch, transformers) is imported here, in the model actor: this module is also what the driver
    and the CPU workers import, and they never need it."""
    import torch

    from janus_batch.engine import JanusEngine
    from janus_batch.engine.memory import memory_share
    from janus_batch.model.tiny import ensure_tiny_model

    # The tiny default is written per node into the local cache: a path from the driver may not exist here.
    source = model["source"] or str(ensure_tiny_model())
    share = memory_share(batching["gpu_memory_utilization"], gpus)  # actors that share a GPU share its memory
    engine = JanusEngine.from_pretrained(
        source,
        dtype=None if model["dtype"] == "auto" else getattr(torch, model["dtype"]),
        device="cuda" if gpus > 0 else "cpu",
        storage_options=storage.storage_options(),
        allow_pickle=model["allow_pickle"],
        revision=model["revision"],
        prompt_format=model["prompt_format"],
        **dict(batching, gpu_memory_utilization=share),
    )
    if model.get("weights_hash") and engine.weights_hash != model["weights_hash"]:
        raise ValueError(
            f"model {source} has other weights ({engine.weights_hash}) than those that made this run's rows "
            f"({model['weights_hash']}): it changed in place; restore it, or start a new run id"
        )
    return engine


MAX_ERROR_CHARS = 500  # an exception's text can hold anything: a whole path, or a value's repr


def describe(e: BaseException) -> str:
    """An error message for a row: input errors say what is wrong; anything else names its type too."""
    text = str(e) if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {e}"
    return text if len(text) <= MAX_ERROR_CHARS else f"{text[:MAX_ERROR_CHARS]}... ({len(text)} characters)"


def short(value: object, limit: int = 80) -> str:
    """A row's value for a message: its repr, cut to `limit` characters (a value can be a whole image)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} bytes" if isinstance(value, (bytes, bytearray)) else f"{len(text)} characters"
    return f"{text[:limit]}... ({size})"


def is_device_failure(e: BaseException) -> bool:
    """Out of device memory, or an error of the device's runtime: the device's problem, not the row's. Known by
    type, as torch (>= 2.8) raises them: torch.OutOfMemoryError (torch.cuda.OutOfMemoryError is the same class),
    and torch.AcceleratorError, which a failed CUDA runtime call raises (C10_CUDA_CHECK: an illegal memory access,
    a launch failure, ...). Never by message: a row's own error may quote any text. A CUDA library's failed status
    (cuBLAS, cuDNN) is a plain RuntimeError that torch gives no type to tell apart: it counts as the row's."""
    import torch

    return isinstance(e, (torch.OutOfMemoryError, torch.AcceleratorError))


def results_per_row(call: Callable[[list], list], rows: list) -> tuple[list, list[str | None]]:
    """(results, errors) of `call(rows)`, one result per row. When the batch fails, each row is tried alone: a
    failure that only some rows cause is pinned on them (result None, error set) and the others still get their
    results. A device failure of a row is raised (is_device_failure): the task fails, and with it the job, with
    the block's rows uncommitted, so a rerun of the run id makes them, instead of keeping them as errors."""
    if not rows:
        return [], []
    try:
        return call(rows), [None] * len(rows)
    except Exception:  # something in the batch breaks the engine (or the device did once): find which rows
        pass
    results, errors = [], []
    for row in rows:
        try:
            results.append(call([row])[0])
            errors.append(None)
        except Exception as e:
            if is_device_failure(e):
                raise
            results.append(None)
            errors.append(describe(e))
    return results, errors


class StorageUnavailable(StoreUnavailable):
    """Reading a row's image failed because of the store, after the store's own retries (network, throttling,
    timeouts, an expired token: janus_batch.io.storage decides): raised, so Ray retries the task, and if it
    still fails the job stops with the row uncommitted, to be resumed. Never committed as the row's error, which
    a rerun would keep."""


def read_input(uri: str, storage: StorageConfig, max_bytes: int) -> bytes:
    """The bytes at `uri`. A store fault raises StorageUnavailable; anything else (no such file, a bad name, a
    symlink loop, a permission, a directory) is the row's error, as a ValueError."""
    try:
        return read_bytes(uri, storage, max_bytes)
    except StoreUnavailable as e:
        raise StorageUnavailable(str(e)) from e  # names the read, the store and the last error
    except Exception as e:
        if isinstance(e, OSError) and e.errno is not None:  # its text repeats the path, which may be 5,000 long
            raise ValueError(f"cannot read {short(uri)}: {os.strerror(e.errno)} ({errno.errorcode[e.errno]})") from e
        raise ValueError(describe(e)) from e


def as_text(name: str, value: object) -> tuple[str | None, str | None]:
    """(text, error) of a text column's value. Binary holding UTF-8 (Parquet written without a string type) is
    text; invalid UTF-8, null or another type is the row's error."""
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8"), None
        except UnicodeDecodeError as e:
            return None, f"{name} is not valid UTF-8 text (byte {value[e.start]:#04x} at offset {e.start})"
    if value is None:
        return None, f"{name} is null"
    if not isinstance(value, str):
        return None, f"{name} must be string, got {type(value).__name__}"
    return value, None


def as_id(name: str, value: object) -> tuple[str | None, str | None]:
    """(text, error) of a prompt id: any type will do (its text keys the images' noise); binary must be UTF-8."""
    if value is None or isinstance(value, (bytes, bytearray)):
        return as_text(name, value)
    return str(value), None


# The watchdog process of a model actor. It reads one byte per change from its stdin: b"1" when a call starts,
# b"0" when it ends; end of file when the actor is gone. A call past the timeout: SIGKILL to the actor.
WATCHDOG = """
import os, select, signal, sys, time
actor, timeout = int(sys.argv[1]), float(sys.argv[2])
deadline = None
while True:
    wait = None if deadline is None else max(deadline - time.monotonic(), 0)
    if select.select([0], [], [], wait)[0]:
        state = os.read(0, 4096)
        if not state:
            break
        deadline = time.monotonic() + timeout if state.endswith(b"1") else None
    elif deadline is not None and time.monotonic() >= deadline:
        print(f"[janus-batch] a model call ran past call_timeout_s={timeout:g}: killing its actor (pid {actor}), "
              "which Ray restarts to retry the call", file=sys.stderr, flush=True)
        os.kill(actor, signal.SIGKILL)
        break
"""


class CallWatchdog:
    """Bounds each model call of an actor to `timeout_s`: past it, a watchdog process SIGKILLs the actor, and Ray
    restarts the actor and retries the task. A process, not a thread: a thread cannot act while the actor is
    stopped (SIGSTOP) or stuck in native code holding the GIL, and Ray does not notice either (it checks that
    nodes are alive, not that actors make progress)."""

    def __init__(self, timeout_s: float):
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-c", WATCHDOG, str(os.getpid()), str(timeout_s)],
            stdin=subprocess.PIPE,
            start_new_session=True,  # a signal to the actor's process group does not stop its watchdog
        )

    @contextmanager
    def bound(self) -> Iterator[None]:
        self.tell(b"1")
        try:
            yield
        finally:
            self.tell(b"0")

    def tell(self, state: bytes) -> None:
        self.process.stdin.write(state)
        self.process.stdin.flush()


class ModelStage:
    """A model actor of the pipeline: one engine, loaded once per actor; each call bounded by call_timeout_s."""

    def __init__(self, *, model: dict, gpus: float, storage: StorageConfig, batching: dict, call_timeout_s: float):
        self.engine = load_engine(model, gpus, storage, batching)
        self.watchdog = CallWatchdog(call_timeout_s)

    def __call__(self, batch: pa.Table) -> pa.Table:
        with self.watchdog.bound():
            return self.process(batch)

    def process(self, batch: pa.Table) -> pa.Table:
        """One model call: the block's rows in, its output rows out (each stage's own work)."""
        raise NotImplementedError


# ---- synthesize ------------------------------------------------------------------------------------------

QUALITY = {"jpeg": {"quality": 95}, "webp": {"quality": 95}}  # PIL's default 75 shows artifacts
GENERATED = pa.schema(
    [
        ("row_hash", pa.uint64()),
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("sample_index", pa.int32()),
        ("pixels", pa.binary()),  # raw uint8 [height, width, 3]
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("model_id", pa.string()),
        ("weights_hash", pa.string()),
        (ERROR, pa.string()),
    ]
)


def prompt_row(
    raw_prompt: object, raw_id: object, prompt_column: str, id_column: str | None, duplicates: set
) -> tuple[str | None, str | None, str | None]:
    """(prompt, prompt id, error) of an input row: a missing, mistyped or undecodable prompt or id, or an id in
    `duplicates`, is its error. Without an id column, `raw_id` is the raw prompt."""
    prompt, error = as_text("prompt", raw_prompt)
    pid = prompt
    if id_column:
        pid, id_error = as_id(id_column, raw_id)
        error = error or id_error
    if error is None and id_key(raw_id) in duplicates:
        error = f"duplicate {id_column or prompt_column} {short(pid)}: more than one input row has it"
    return prompt, pid, error


def prepare_prompts(
    batch: pa.Table,
    *,
    prompt_column: str,
    id_column: str | None,
    duplicates: set,
    dropped: dict[int, str] | None = None,
) -> pa.Table:
    """Input rows -> (row_hash, prompt_id, prompt, error). Rows with a missing, mistyped or undecodable prompt or
    id, or an id shared with another row (without an id column: the same prompt text, which would make the same
    images), get an error; the engine checks the prompt text itself later. `dropped`: row_hash -> why the row is
    not generated (a duplicate prompt, see curate.duplicate_prompt_errors), before any other error of the row."""
    prompts = batch[prompt_column].to_pylist()
    ids = batch[id_column].to_pylist() if id_column else prompts
    drops = [dropped.get(h) for h in batch["row_hash"].to_pylist()] if dropped else [None] * batch.num_rows
    out_prompts, out_ids, errors = [], [], []
    for raw_prompt, raw_id, drop in zip(prompts, ids, drops, strict=True):
        prompt, pid, error = prompt_row(raw_prompt, raw_id, prompt_column, id_column, duplicates)
        out_prompts.append(prompt)
        out_ids.append(pid)
        errors.append(drop or error)
    return pa.table(
        {
            "row_hash": batch["row_hash"],
            "prompt_id": pa.array(out_ids, pa.string()),
            "prompt": pa.array(out_prompts, pa.string()),
            ERROR: pa.array(errors, pa.string()),
        }
    )


class PromptStage(ModelStage):
    """Model stage of the prompt kinds: (row_hash, prompt_id, prompt, error) -> the rows of each prompt
    (`outputs`), or one error row per prompt: its own check's, or its model call's (results_per_row)."""

    schema: pa.Schema  # of the rows out

    def check_prompt(self, prompt: str) -> str | None:
        return self.engine.check_prompt(prompt)

    def process(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        for row in rows:
            if row[ERROR] is None:
                row[ERROR] = self.check_prompt(row["prompt"])
        good = [row for row in rows if row[ERROR] is None]
        outputs, errors = results_per_row(self.outputs, good)
        for row, error in zip(good, errors, strict=True):
            row[ERROR] = error
        outputs_of = {row["row_hash"]: row_outputs for row, row_outputs in zip(good, outputs, strict=True)}

        out = []
        model = dict(model_id=self.engine.model_id, weights_hash=self.engine.weights_hash)
        for row in rows:
            base = dict(row_hash=row["row_hash"], prompt_id=row["prompt_id"], prompt=row["prompt"], **model)
            if row[ERROR] is not None:
                out.append(dict(base, error=row[ERROR]))  # the schema's other columns null
            else:
                out += [dict(base, **output) for output in outputs_of[row["row_hash"]]]
        return pa.Table.from_pylist(out, schema=self.schema)

    def outputs(self, rows: list[dict]) -> list[list[dict]]:
        """Per row, the columns of its output rows beyond `base` (one model call for all the rows)."""
        raise NotImplementedError


class Synthesizer(PromptStage):
    """Prompt stage: one row per image."""

    schema = GENERATED

    def __init__(self, *, sampling: ImageSampling, **engine_args):
        super().__init__(**engine_args)
        self.sampling = sampling

    def outputs(self, rows: list[dict]) -> list[list[dict]]:
        n = self.sampling.images_per_prompt
        prompt_ids = [r["prompt_id"] for r in rows]
        images = self.engine.generate_images([r["prompt"] for r in rows], self.sampling, prompt_ids=prompt_ids)
        out = []
        for image in images:
            height, width, _ = image.pixels.shape
            out.append(dict(sample_index=image.sample_index, pixels=image.pixels.tobytes(), width=width, height=height))
        return [out[i * n : (i + 1) * n] for i in range(len(rows))]


# ---- curate: generate, score, select, caption in one model actor ------------------------------------------

CURATED = pa.schema([*GENERATED, *CANDIDATE_FIELDS])


def candidate_key(row_hash: int, sample_index: int) -> str:
    """The output key of image `sample_index` of an input row (its caption's random numbers are keyed on it)."""
    return f"{row_key(row_hash)}_{sample_index:04d}"


class Curator(PromptStage):
    """Model stage of curation: (row_hash, prompt_id, prompt, error) -> a row per candidate image with its scores,
    rank and `kept`, or one error row per prompt. Per call, on the actor's one model: generate the candidates,
    score their uint8 pixels (no PNG round trip), select per prompt, caption the kept ones. Every candidate's row
    leaves (a fixed count per input, which the commit protocol needs); with `write_all` False only the kept ones
    carry their pixels. `caption_sampling` None: no captions."""

    schema = CURATED

    def __init__(
        self,
        *,
        sampling: ImageSampling,
        scores: ScoreOptions,
        selection: SelectionRule,
        caption_sampling: TextSampling | None,
        caption_instruction: str,
        write_all: bool,
        **engine_args,
    ):
        super().__init__(**engine_args)
        self.sampling, self.selection, self.write_all = sampling, selection, write_all
        self.caption_sampling, self.caption_instruction = caption_sampling, caption_instruction
        from janus_batch.engine import Scorer  # in the actor, as the engine (load_engine)

        self.scorer = Scorer(self.engine, scores)  # refuses options the tokenizer cannot score
        check = caption_sampling and self.engine.check_question(caption_instruction, caption_sampling.max_new_tokens)
        if check:
            raise ValueError(f"caption instruction: {check}")

    def check_prompt(self, prompt: str) -> str | None:
        return self.engine.check_prompt(prompt) or self.scorer.check_prompt(prompt)

    def outputs(self, rows: list[dict]) -> list[list[dict]]:
        """The candidate rows of each row's prompt: generated, scored, ranked, the kept ones captioned."""
        n = self.sampling.images_per_prompt
        prompts = [r["prompt"] for r in rows]
        images = self.engine.generate_images(prompts, self.sampling, prompt_ids=[r["prompt_id"] for r in rows])
        scores = self.scorer.score(np.stack([image.pixels for image in images]), [image.prompt for image in images])
        selected = []
        for p in range(len(rows)):
            prompt_images, prompt_scores = images[p * n : (p + 1) * n], scores[p * n : (p + 1) * n]
            candidates = [
                Candidate(image.sample_index, score.alignment, score.aesthetic, score.combined)
                for image, score in zip(prompt_images, prompt_scores, strict=True)
            ]
            selected += select_candidates(candidates, self.selection)
        kept = [i for i, s in enumerate(selected) if s.kept]
        captions = {}
        if self.caption_sampling is not None and kept:
            keys = [candidate_key(rows[i // n]["row_hash"], images[i].sample_index) for i in kept]
            texts = self.engine.understand(
                [images[i].pixels for i in kept],
                None,
                self.caption_sampling,
                instruction=self.caption_instruction,
                row_ids=keys,
            )
            captions = {i: text.text for i, text in zip(kept, texts, strict=True)}
        out = []
        for i, (image, score, (rank, is_kept)) in enumerate(zip(images, scores, selected, strict=True)):
            height, width, _ = image.pixels.shape
            out.append(
                dict(
                    sample_index=image.sample_index,
                    pixels=image.pixels.tobytes() if is_kept or self.write_all else None,
                    width=width,
                    height=height,
                    alignment=score.alignment,
                    aesthetic=score.aesthetic,
                    score=score.combined,
                    rank=rank,
                    kept=is_kept,
                    caption=captions.get(i),
                )
            )
        return [out[p * n : (p + 1) * n] for p in range(len(rows))]


def encode_images(
    batch: pa.Table,
    *,
    image_format: str,
    run_id: str,
    sampling: ImageSampling,
    schema: pa.Schema,
    progress=None,
) -> pa.Table:
    """Model output -> output rows: raw pixels encoded as PNG/JPEG/WebP, keys, the sampling options and run
    metadata."""
    ext = IMAGE_EXTENSIONS[image_format]
    keys, images = [], []
    for row_hash, sample, pixels, width, height in zip(
        *(batch[c].to_pylist() for c in ("row_hash", "sample_index", "pixels", "width", "height")), strict=True
    ):
        key = row_key(row_hash) if sample is None else candidate_key(row_hash, sample)
        keys.append(key)
        if pixels is None:
            images.append(None)
            continue
        array = np.frombuffer(pixels, np.uint8).reshape(height, width, 3)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=image_format.upper(), **QUALITY.get(image_format, {}))
        images.append({"bytes": buffer.getvalue(), "path": f"{key}.{ext}"})
    n = batch.num_rows
    seeds = pa.array([None if s is None else sampling.seed for s in batch["sample_index"].to_pylist()], pa.int64())
    table = batch.drop_columns(["pixels"]).append_column("key", pa.array(keys, pa.string()))
    table = table.append_column("image", pa.array(images, schema.field("image").type))
    table = table.append_column("seed", seeds)
    table = add_run_columns(
        table,
        run_id,
        cfg_weight=pa.array([sampling.cfg_weight] * n, pa.float32()),
        temperature=pa.array([sampling.temperature] * n, pa.float32()),
    )
    report(progress, table)
    return table.select(schema.names).cast(schema)


# ---- caption / VQA ---------------------------------------------------------------------------------------

PREPARED_IMAGE = "pixels"  # uint8 [S, S, 3] resized and padded (preprocess_image), as raw bytes
PREPARED_TEXT = "question"  # the row's question (VQA) or prompt (scoring)
PREPARED_COLUMNS = (PREPARED_TEXT, PREPARED_IMAGE, ERROR)  # what prepare_images adds beside the passed-through ones


def prepare_images(
    batch: pa.Table,
    *,
    resume_key: str,
    image_column: str | None,
    image_uri_column: str | None,
    id_column: str | None,
    question_column: str | None,
    passthrough: list[str],
    duplicates: set,
    image_size: int,
    storage: StorageConfig,
    max_image_bytes: int,
    question_name: str = "question",
) -> pa.Table:
    """Input rows -> (resume key, passthrough id columns, question, pixels, error): fetch, decode and
    preprocess each image as DeepSeek does; any failure of the row (missing file, bad path, not an image,
    truncated, too large, ...) is its error. A fault of the store raises StorageUnavailable. `question_name`:
    what the question column holds, for its errors (scoring reads a prompt there)."""
    n = batch.num_rows
    ids = batch[id_column].to_pylist() if id_column else [None] * n
    questions = batch[question_column].to_pylist() if question_column else [None] * n
    if image_uri_column:
        sources = batch[image_uri_column].to_pylist()
    elif image_column:
        sources = batch[image_column].to_pylist()
    else:  # an image folder: read_binary_files' columns
        sources = batch["bytes"].to_pylist()
    pixels, texts, errors = [], [], []
    for source, image_id, raw_question in zip(sources, ids, questions, strict=True):
        error, array = None, None
        question, question_error = as_text(question_name, raw_question) if question_column else (None, None)
        if id_column and image_id is not None and id_key(image_id) in duplicates:
            error = f"duplicate {id_column} {short(image_id)}: more than one input row has it"
        elif question_column:
            error = question_error or (None if question.strip() else f"empty {question_name}")
        if error is None:
            try:
                array = load_image(source, image_uri_column, storage, max_image_bytes, image_size)
            except StorageUnavailable:
                raise
            except Exception as e:
                error = describe(e)
        pixels.append(None if array is None else array.tobytes())
        texts.append(question)
        errors.append(error)
    columns = {name: batch[name] for name in dict.fromkeys([resume_key, *passthrough])}
    columns[PREPARED_TEXT] = pa.array(texts, pa.string())
    columns[PREPARED_IMAGE] = pa.array(pixels, pa.binary())
    columns[ERROR] = pa.array(errors, pa.string())
    return pa.table(columns)


def load_image(source: object, uri_column: str | None, storage: StorageConfig, max_bytes: int, size: int):
    """A row's image, fetched, decoded and preprocessed. Whatever the decoder meets is an ImageInputError, the
    row's error, never the store's (a store fault raises from the fetch)."""
    return preprocess_image(decode_image(image_bytes(source, uri_column, storage, max_bytes)), size)


def image_bytes(source: object, uri_column: str | None, storage: StorageConfig, max_bytes: int) -> bytes:
    """The encoded image of a row: read from its URI; from a Hugging Face Image struct, its bytes or else, as
    `datasets` does, the file at its path; or the bytes themselves."""
    if uri_column:
        return read_image_at(uri_column, source, storage, max_bytes)
    if isinstance(source, dict):  # a Hugging Face Image struct
        if source.get("bytes") is None and source.get("path") is not None:
            return read_image_at("image path", source["path"], storage, max_bytes)
        source = source.get("bytes")
    if source is None:
        raise ValueError("image is null")
    if not isinstance(source, (bytes, bytearray)):
        raise ValueError(f"image must be bytes, got {type(source).__name__}")
    if len(source) > max_bytes:
        raise ValueError(f"image of {len(source)} bytes exceeds the limit of {max_bytes}")
    return bytes(source)


def read_image_at(name: str, value: object, storage: StorageConfig, max_bytes: int) -> bytes:
    uri, error = as_text(name, value)
    if error is None:
        if uri.startswith("s3://"):
            error = s3_key_error(uri)
        elif not uri.startswith("/"):
            error = f"{name} {short(uri)} is neither an absolute path nor an s3:// URI"
    if error is not None:
        raise ValueError(error)
    return read_input(uri, storage, max_bytes)


S3_MAX_KEY_BYTES = 1024


def s3_key_error(uri: str) -> str | None:
    """What S3 would refuse in the URI itself: its reply to pyarrow's HeadObject (400, no body) would say no more
    than an expired token's does."""
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key:
        return f"{short(uri)} names no object (s3://BUCKET/KEY)"
    if len(key.encode()) > S3_MAX_KEY_BYTES:
        return f"{short(uri)}: its key has {len(key.encode())} bytes, S3 allows {S3_MAX_KEY_BYTES}"
    return None


class ImageStage(ModelStage):
    """Model stage of the image kinds: prepared images (+ a question each) -> the batch's rows with `columns`
    added, one model call for the rows without an error; a row the call fails gets its error (results_per_row)."""

    drop: list[str]  # the prepared columns the output does not keep

    def __init__(self, *, resume_key: str, **engine_args):
        super().__init__(**engine_args)
        self.resume_key = resume_key

    def check(self, question: str | None) -> str | None:
        """Why a row's question cannot be used, or None (the prepare stage checked its image)."""
        return None

    def process(self, batch: pa.Table) -> pa.Table:
        size = self.engine.image_size
        errors = batch[ERROR].to_pylist()
        questions = batch[PREPARED_TEXT].to_pylist()
        for i, question in enumerate(questions):
            errors[i] = errors[i] or self.check(question)
        keys = [row_key(k) for k in batch[self.resume_key].to_pylist()]
        good = [i for i, e in enumerate(errors) if e is None]
        pixels = batch[PREPARED_IMAGE].to_pylist()

        def call(rows: list[int]) -> list:
            images = np.stack([np.frombuffer(pixels[i], np.uint8).reshape(size, size, 3) for i in rows])
            return self.outputs(images, [questions[i] for i in rows], [keys[i] for i in rows])

        results, good_errors = results_per_row(call, good)
        result_of = dict(zip(good, results, strict=True))
        for i, error in zip(good, good_errors, strict=True):
            errors[i] = error
        n = batch.num_rows
        columns = {
            "key": pa.array(keys, pa.string()),
            **self.columns([result_of.get(i) for i in range(n)]),
            "model_id": pa.array([self.engine.model_id] * n, pa.string()),
            "weights_hash": pa.array([self.engine.weights_hash] * n, pa.string()),
            ERROR: pa.array(errors, pa.string()),
        }
        table = batch.drop_columns([PREPARED_IMAGE, ERROR, *self.drop])
        for name, array in columns.items():
            table = table.append_column(name, array)
        return table

    def outputs(self, images: np.ndarray, questions: list[str | None], keys: list[str]) -> list:
        """A result per image, in one model call."""
        raise NotImplementedError

    def columns(self, results: list) -> dict[str, pa.Array]:
        """The output columns of the results (None for a row in error)."""
        raise NotImplementedError


class Describer(ImageStage):
    """Image stage for captioning and VQA: text, tokens, finish reason."""

    drop = []

    def __init__(self, *, sampling: TextSampling, instruction: str, text_column: str, **engine_args):
        super().__init__(**engine_args)
        self.sampling = sampling
        self.instruction = instruction
        self.text_column = text_column

    def outputs(self, images: np.ndarray, questions: list[str | None], keys: list[str]) -> list:
        return self.engine.understand(
            list(images), questions, self.sampling, instruction=self.instruction, row_ids=keys
        )

    def columns(self, results: list) -> dict[str, pa.Array]:
        return {
            self.text_column: pa.array([r and r.text for r in results], pa.string()),
            "num_tokens": pa.array([r and r.num_tokens for r in results], pa.int32()),
            "finish_reason": pa.array([r and r.finish_reason for r in results], pa.string()),
        }


class ImageScorer(ImageStage):
    """Image stage of scoring an image corpus: a prompt each in `question` (or None: the aesthetic alone) ->
    alignment, aesthetic, combined score."""

    drop = [PREPARED_TEXT]

    def __init__(self, *, scores: ScoreOptions, **engine_args):
        from janus_batch.engine import Scorer  # in the actor, as the engine (load_engine)

        super().__init__(**engine_args)
        self.scorer = Scorer(self.engine, scores)

    def check(self, question: str | None) -> str | None:
        return None if question is None else self.scorer.check_prompt(question)

    def outputs(self, images: np.ndarray, questions: list[str | None], keys: list[str]) -> list:
        return self.scorer.score(images, questions)

    def columns(self, results: list) -> dict[str, pa.Array]:
        return {
            "alignment": pa.array([s and s.alignment for s in results], pa.float32()),
            "aesthetic": pa.array([s and s.aesthetic for s in results], pa.float32()),
            "score": pa.array([s and s.combined for s in results], pa.float32()),
        }


def finish_text_rows(batch: pa.Table, *, run_id: str, schema: pa.Schema, progress=None) -> pa.Table:
    table = add_run_columns(batch, run_id)
    report(progress, table)
    return table.select(schema.names).cast(schema)


# ---- postprocessing helpers ------------------------------------------------------------------------------


def add_run_columns(table: pa.Table, run_id: str, **columns: pa.Array) -> pa.Table:
    n = table.num_rows
    now = datetime.now(timezone.utc)
    columns = dict(
        columns,
        run_id=pa.array([run_id] * n, pa.string()),
        created_at=pa.array([now] * n, pa.timestamp("us", tz="UTC")),
    )
    for name, array in columns.items():
        table = table.append_column(name, array)
    return table


def report(progress, table: pa.Table) -> None:
    """Tell the job's progress counter about finished rows (fire and forget)."""
    if progress is not None:
        progress.add.remote(table.num_rows, table.num_rows - table[ERROR].null_count)
