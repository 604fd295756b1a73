"""Hostile inputs, row by row: every bad row becomes that row's error with a specific, short message (never a
crashed or hung job), a fault of the store stops the task instead, input folders are counted as Ray reads them
or refused naming the file, and a hung or stopped model call is bounded. The end-to-end run over these rows is
tests/test_jobs_e2e.py::test_bad_row_corpus."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image
from ray.data import ActorPoolStrategy

from janus_batch import stages
from janus_batch.io import readers
from janus_batch.io.storage import StorageConfig, write_bytes
from janus_batch.jobs import CaptionJob, SynthesizeJob, run
from janus_batch.jobs.pipeline import prepare
from janus_batch.model.preprocessing import decode_image, preprocess_image
from janus_batch.options import ImageSampling
from tests.helpers import encoded
from tests.jobs_data import SMALL_RESOURCES, prepared_images, sample_images, write_parquet

pytest_plugins = ["tests.jobs_fixtures"]


def bmp_rejected_at_open() -> bytes:
    """A BMP with a compression PIL does not support: PIL's open raises a plain OSError, which a job took for
    a storage fault and retried forever."""
    data = bytearray(encoded(Image.new("RGB", (8, 8), (1, 2, 3)), "BMP"))
    data[30:34] = struct.pack("<I", 4)  # biCompression: JPEG-in-BMP
    return bytes(data)


def hostile_files(folder: Path) -> dict[str, str]:
    """Local paths that cannot be read, each for its own reason, and one good image: name -> path."""
    (folder / "good.png").write_bytes(sample_images(1)[0])
    (folder / "loop_a").symlink_to(folder / "loop_b")
    (folder / "loop_b").symlink_to(folder / "loop_a")
    os.mkfifo(folder / "fifo.png")
    (folder / "folder.png").mkdir()
    (folder / "bad.bmp").write_bytes(bmp_rejected_at_open())
    return {
        "good": str(folder / "good.png"),
        "long name": str(folder / ("x" * 5000 + ".png")),
        "symlink loop": str(folder / "loop_a" / "x.png"),
        "missing": str(folder / "missing.png"),
        "directory": str(folder / "folder.png"),
        "fifo": str(folder / "fifo.png"),
        "device": "/dev/zero",
        "nul": str(folder / "a\0b.png"),
        "relative": "photos/cat.png",
        "bmp": str(folder / "bad.bmp"),
    }


# What each hostile path's error says (a part of it).
HOSTILE_PATH_ERRORS = {
    "long name": "File name too long (ENAMETOOLONG)",
    "symlink loop": "ymlink",  # "Symlink loop from ..." (Python's resolve) or "symbolic links (ELOOP)"
    "missing": "no such file",
    "directory": "not a file",
    "fifo": "not a file",
    "device": "not a file",
    "nul": "null byte",
    "relative": "neither an absolute path nor an s3:// URI",
    "bmp": "not a decodable image: Unsupported BMP compression (4)",
}


def assert_good(pixels: bytes, image: bytes) -> None:
    array = np.frombuffer(pixels, np.uint8).reshape(64, 64, 3)
    np.testing.assert_array_equal(array, preprocess_image(decode_image(image), 64))


def assert_short(errors: list) -> None:
    """No error message holds a whole value: no image bytes, no 5,000-character path."""
    for error in errors:
        assert error is None or (len(error) < 300 and "\\x" not in error and "x" * 200 not in error), error


# ---- image paths and URIs --------------------------------------------------------------------------------


def test_bad_paths_and_undecodable_files_are_the_rows_errors(tmp_path, storage, bucket):
    # Each was once taken for a storage fault (retried forever: the job hung) or crashed the batch.
    paths = hostile_files(tmp_path)
    write_bytes(f"{bucket}/good.png", sample_images(1)[0], storage)
    uris = {
        **paths,
        "s3 good": f"{bucket}/good.png",
        "s3 missing": f"{bucket}/missing.png",
        "s3 long key": f"{bucket}/{'k' * 5000}.png",
        "s3 bucket only": bucket,
    }
    args = dict(image_column=None, image_uri_column="url", id_column=None, passthrough=["url"])
    out = prepared_images(pa.table({"url": pa.array([*uris.values(), None, "  "], pa.string())}), storage, **args)
    binary = prepared_images(pa.table({"url": pa.array([paths["good"].encode(), b"\xff\xfe.png"])}), storage, **args)
    names = [*uris, "null", "blank", "binary good", "binary"]
    errors = dict(zip(names, out["error"].to_pylist() + binary["error"].to_pylist(), strict=True))
    pixels = dict(zip(names, out["pixels"].to_pylist() + binary["pixels"].to_pylist(), strict=True))
    for name, expected in {
        **HOSTILE_PATH_ERRORS,
        "s3 missing": "no such file",
        "s3 long key": "its key has 5004 bytes, S3 allows 1024",
        "s3 bucket only": "names no object (s3://BUCKET/KEY)",
        "binary": "url is not valid UTF-8 text (byte 0xff at offset 0)",
        "null": "url is null",
        "blank": "url '  ' is neither an absolute path nor an s3:// URI",
    }.items():
        assert expected in errors[name] and pixels[name] is None, (name, errors[name])
    for name in ("good", "s3 good", "binary good"):
        assert errors[name] is None
        assert_good(pixels[name], sample_images(1)[0])
    assert_short(errors.values())


def test_image_structs_bytes_or_path(tmp_path, storage):
    # A Hugging Face Image struct holds bytes, or only a path (then `datasets` reads the file): the latter was
    # reported as "image is null". Bytes that PIL rejects with a plain OSError are the row's error too.
    paths = hostile_files(tmp_path)
    good = sample_images(2)
    structs = [
        {"bytes": good[0], "path": "a.jpg"},
        {"bytes": None, "path": paths["good"]},
        {"bytes": bmp_rejected_at_open(), "path": None},
        {"bytes": None, "path": paths["long name"]},
        {"bytes": None, "path": paths["missing"]},
        {"bytes": None, "path": "relative.png"},
        {"bytes": None, "path": None},
        None,
    ]
    out = prepared_images(pa.table({"image": structs, "image_id": [f"i{i}" for i in range(len(structs))]}), storage)
    errors = out["error"].to_pylist()
    assert errors[:2] == [None, None]
    assert_good(out["pixels"][0].as_py(), good[0])
    assert_good(out["pixels"][1].as_py(), sample_images(1)[0])
    assert errors[2] == "not a decodable image: Unsupported BMP compression (4)"
    assert "File name too long (ENAMETOOLONG)" in errors[3] and errors[4].startswith("no such file")
    assert errors[5] == "image path 'relative.png' is neither an absolute path nor an s3:// URI"
    assert errors[6:] == ["image is null", "image is null"]
    assert_short(errors)


class StubS3(ThreadingHTTPServer):
    """An S3 endpoint answering every request with one error: `status`, and S3's XML error body (HEAD replies
    carry none), or 200 with a small body to HEAD when only GET should fail."""

    def __init__(self, status: int, code: str, message: str, fail_head: bool = True):
        body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.send_response(status if fail_head else 200)
                self.send_header("Content-Length", str(len(body) if fail_head else 10))
                self.end_headers()

            def do_GET(self):
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def storage(self) -> StorageConfig:
        return StorageConfig(
            endpoint_url=f"http://127.0.0.1:{self.server_address[1]}",
            region="us-east-1",
            key="k",
            secret="s",
            retries={"attempts": 2, "max_seconds": 2},
        )


@pytest.mark.parametrize(
    "reply,store_fault",
    [
        ((503, "SlowDown", "Please reduce your request rate."), True),
        ((500, "InternalError", "We encountered an internal error."), True),
        ((400, "ExpiredToken", "The provided token has expired.", False), True),  # HEAD passes, GET says why
        ((403, "AccessDenied", "Access Denied"), False),
    ],
)
def test_store_faults_stop_the_task_and_refusals_are_the_rows(reply, store_fault):
    # Throttling, the store's own errors and an expired token may pass: retried (Ray retries the task, then the
    # job stops, uncommitted, to be resumed). A refused permission is this row's: committed as its error.
    server = StubS3(*reply)
    batch = pa.table({"url": ["s3://bucket/a.png"]})
    args = dict(image_column=None, image_uri_column="url", id_column=None, passthrough=["url"])
    try:
        if store_fault:
            with pytest.raises(stages.StorageUnavailable, match="s3://bucket/a.png"):
                prepared_images(batch, server.storage(), **args)
        else:
            assert "ACCESS_DENIED" in prepared_images(batch, server.storage(), **args)["error"][0].as_py()
    finally:
        server.shutdown()


# ---- text and ids ----------------------------------------------------------------------------------------


def test_binary_text_columns_are_decoded_or_the_rows_error():
    # Parquet written without a string type gives binary columns: UTF-8 is text, anything else the row's error
    # (it was a crash, UnicodeDecodeError, or a prompt written as "b'...'").
    batch = pa.table(
        {
            "prompt": pa.array([b"a fox", b"\xff\xfe fox", None, b"a cat", b"an owl"], pa.binary()),
            "prompt_id": pa.array([b"p0", b"p1", b"p2", b"\xc3(", b"p4"], pa.binary()),
            "row_hash": pa.array(range(5), pa.uint64()),
        }
    )
    out = stages.prepare_prompts(batch, prompt_column="prompt", id_column="prompt_id", duplicates=set())
    assert out["prompt"].to_pylist() == ["a fox", None, None, "a cat", "an owl"]
    assert out["prompt_id"].to_pylist() == ["p0", "p1", "p2", None, "p4"]
    assert out["error"].to_pylist() == [
        None,
        "prompt is not valid UTF-8 text (byte 0xff at offset 0)",
        "prompt is null",
        "prompt_id is not valid UTF-8 text (byte 0xc3 at offset 0)",
        None,
    ]
    questions = pa.table({"image": [sample_images(1)[0]] * 2, "question": pa.array([b"Which colour?", b"\x80?"])})
    out = prepared_images(questions, StorageConfig(), id_column=None, question_column="question", passthrough=[])
    assert out["question"].to_pylist() == ["Which colour?", None]
    assert out["error"].to_pylist() == [None, "question is not valid UTF-8 text (byte 0x80 at offset 0)"]


def test_nan_and_huge_ids_are_duplicates_with_short_messages(ray_cluster, tmp_path):
    # NaN != NaN in Python: rows sharing a NaN id were not flagged. In two files, so the NaNs meet in the shuffle.
    local = StorageConfig()
    write_parquet(pa.table({"id": [1.0, float("nan")], "prompt": ["a", "b"]}), str(tmp_path / "in/0.parquet"), local)
    write_parquet(pa.table({"id": [float("nan"), 2.0], "prompt": ["c", "d"]}), str(tmp_path / "in/1.parquet"), local)
    dups = readers.duplicate_ids(readers.read_parquet(str(tmp_path / "in"), local, ["id", "prompt"], 0.25), "id")
    assert len(dups) == 1
    table = pq.read_table(tmp_path / "in").append_column("row_hash", pa.array(range(4), pa.uint64()))
    out = stages.prepare_prompts(table, prompt_column="prompt", id_column="id", duplicates=dups)
    assert out["error"].to_pylist() == [None, *["duplicate id 'nan': more than one input row has it"] * 2, None]
    images = pa.table({"image": [sample_images(1)[0]] * 3, "image_id": [float("nan"), float("nan"), 1.0]})
    out = prepared_images(images, local, duplicates=dups)
    assert out["error"].to_pylist() == [*["duplicate image_id nan: more than one input row has it"] * 2, None]

    # Huge values are named by their start: an id, or a prompt that is its own id, can hold a whole image.
    blob = sample_images(1)[0] * 50
    out = prepared_images(pa.table({"image": [blob] * 2, "image_id": [blob] * 2}), local, duplicates={blob})
    assert out["error"][0].as_py() == (
        f"duplicate image_id {repr(blob)[:80]}... ({len(blob)} bytes): more than one input row has it"
    )
    text = "a red fox " * 600
    prompts = pa.table({"prompt": [text, text], "row_hash": pa.array([1, 2], pa.uint64())})
    out = stages.prepare_prompts(prompts, prompt_column="prompt", id_column=None, duplicates={text})
    assert out["error"][0].as_py() == (
        f"duplicate prompt {repr(text)[:80]}... (6002 characters): more than one input row has it"
    )
    assert_short(out["error"].to_pylist())


# ---- input folders ---------------------------------------------------------------------------------------


def test_folders_count_what_ray_reads_and_refuse_what_it_cannot(ray_cluster, tmp_path, tiny_model_dir):
    # A hidden file was counted as an input but skipped by Ray: the run never finished (0 rows a rerun).
    folder = tmp_path / "photos"
    names = ["a.png", ".hidden.png", "_tmp.png", ".cache/x.png", "_parts/y.png", "sub/.z.png", "sub/w.jpg",
             "notes.txt", "photo?.png", "up.PNG"]  # fmt: skip
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(sample_images(1)[0])
    counted = readers.list_input_files(str(folder), StorageConfig(), readers.IMAGE_EXTENSIONS)
    read = readers.read_image_folder(str(folder), StorageConfig(), 0.25).select_columns(["path"]).take_all()
    relative = sorted(str(Path(p).relative_to(folder)) for p in counted)
    assert relative == sorted(str(Path(r["path"]).relative_to(folder)) for r in read)
    assert relative == ["a.png", "sub/.z.png", "sub/w.jpg", "up.PNG"]  # hidden only at the top, as Ray has it

    # A Parquet folder: hidden files are not inputs; a file that is not Parquet, or whose columns differ, refuses
    # the job before any model loads, naming the file (it was a raw Arrow error naming none).
    prompts = tmp_path / "prompts"
    write_parquet(pa.table({"prompt_id": ["a"], "prompt": ["a fox"]}), str(prompts / "part-0.parquet"), StorageConfig())
    write_parquet(pa.table({"prompt_id": ["b"], "prompt": ["a cat"]}), str(prompts / "part-1.parquet"), StorageConfig())
    (prompts / "._part-0.parquet").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (prompts / "_SUCCESS").write_bytes(b"")
    spec = SynthesizeJob.model_validate(
        {"input": {"path": str(prompts)}, "model": {"source": str(tiny_model_dir)}, "output": {"path": str(tmp_path)}}
    )
    assert [Path(f).name for f in prepare(spec).files] == ["part-0.parquet", "part-1.parquet"]
    (prompts / "part-2.parquet").write_text("prompt_id,prompt\nc,a dog\n")
    with pytest.raises(ValueError, match=r"input file \S+/part-2.parquet is not a Parquet file"):
        prepare(spec)
    binary = pa.table({"prompt_id": ["c"], "prompt": pa.array([b"a dog"], pa.binary())})
    write_parquet(binary, str(prompts / "part-2.parquet"), StorageConfig())
    with pytest.raises(
        ValueError, match=r"input files \S+/part-0.parquet and \S+/part-2.parquet have different columns "
        r"\('prompt': string / binary\)"
    ):  # fmt: skip
        prepare(spec)


# ---- a whole job -----------------------------------------------------------------------------------------


@contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging: one hostile row used to hang a whole job."""

    def expire(*args):
        raise TimeoutError(f"the job did not finish in {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_caption_job_over_the_hostile_corpus(ray_cluster, storage, bucket, tiny_model_dir, tmp_path):
    # Every row comes out, each bad one with its own error, and the good ones captioned; the job ends in time.
    paths = hostile_files(tmp_path)
    png = sample_images(1)[0]
    write_bytes(f"{bucket}/img/good.png", png, storage)
    by_bytes = {
        "ok": png,
        "truncated": png[:60],
        "text": b"hello world",
        "empty": b"",
        "bmp bytes": bmp_rejected_at_open(),
        "twin": png,
    }
    by_path = {**{name: paths[name] for name in HOSTILE_PATH_ERRORS}, "path ok": paths["good"]}
    by_path |= {"s3 ok": f"{bucket}/img/good.png", "s3 missing": f"{bucket}/img/nope.png"}
    by_path["s3 long key"] = f"{bucket}/img/{'k' * 5000}.png"
    images = [{"bytes": data, "path": None} for data in by_bytes.values()]
    images += [{"bytes": None, "path": path} for path in by_path.values()]
    ids = [*by_bytes, *by_path, "twin", "null"]
    table = pa.table({"image_id": ids, "image": [*images, {"bytes": png, "path": None}, None]})
    source = write_parquet(table, f"{bucket}/in/images.parquet", storage)
    job = CaptionJob.model_validate(
        dict(
            input={"path": source},
            model={"source": str(tiny_model_dir)},
            resources=SMALL_RESOURCES,
            storage=storage.model_dump(),
            output={"path": str(tmp_path / "out")},
            sampling={"max_new_tokens": 4},
            run_id="c",
        )
    )
    with time_limit(300):
        summary = run(job)
    rows = pq.read_table(tmp_path / "out/c/data").to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(ids)  # every row accounted for, once
    errors = {r["image_id"]: r["error"] for r in rows}
    for name in ("ok", "path ok", "s3 ok"):
        assert errors.pop(name) is None
    assert all(isinstance(r["caption"], str) for r in rows if r["error"] is None)
    expected = {
        **HOSTILE_PATH_ERRORS,
        "bmp bytes": "not a decodable image: Unsupported BMP compression (4)",
        "truncated": "truncated",
        "text": "not a decodable image",
        "empty": "empty image bytes",
        "twin": "duplicate image_id 'twin'",
        "null": "image is null",
        "s3 missing": "no such file",
        "s3 long key": "its key has 5008 bytes, S3 allows 1024",
    }
    assert set(errors) == set(expected)
    for name, error in errors.items():
        assert expected[name] in error, (name, error)
    assert_short(errors.values())
    assert [r["error"] is None for r in rows].count(False) == len(ids) - 3  # both twins
    assert (summary["status"], summary["inputs"], summary["errors"]) == ("succeeded", len(ids), len(ids) - 3)


# ---- hung and stopped model calls ------------------------------------------------------------------------


def watchdog_over(pid: int, timeout_s: float) -> subprocess.Popen:
    """The watchdog script of CallWatchdog, watching process `pid` (CallWatchdog watches its own process)."""
    command = [sys.executable, "-I", "-c", stages.WATCHDOG, str(pid), str(timeout_s)]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("state", ["hung", "stopped"])
def test_the_watchdog_kills_a_call_past_its_timeout(state):
    # A stopped process runs no thread of its own: the watchdog is another process, and SIGKILL reaches it.
    actor = subprocess.Popen(["sleep", "60"])
    if state == "stopped":
        os.kill(actor.pid, signal.SIGSTOP)
    watchdog = watchdog_over(actor.pid, 0.5)
    watchdog.stdin.write(b"1")  # a call starts
    watchdog.stdin.flush()
    assert actor.wait(timeout=10) == -signal.SIGKILL
    assert b"ran past call_timeout_s=0.5: killing its actor" in watchdog.stderr.read()
    assert watchdog.wait(timeout=10) == 0


def test_the_watchdog_spares_calls_in_time_and_goes_with_its_actor():
    actor = subprocess.Popen(["sleep", "60"])
    watchdog = watchdog_over(actor.pid, 0.5)
    for state in (b"1", b"0", b"1", b"0"):  # calls that end in time
        watchdog.stdin.write(state)
        watchdog.stdin.flush()
    time.sleep(1.5)
    assert actor.poll() is None
    watchdog.stdin.close()  # what the actor's exit does
    assert watchdog.wait(timeout=10) == 0
    actor.kill()
    actor.wait()


class StopsOnce(stages.Synthesizer):
    """The real model stage, whose first call stops its own process (SIGSTOP): `marks` records the attempts."""

    def __init__(self, *, marks: str, **kwargs):
        super().__init__(**kwargs)
        self.marks = Path(marks)

    def process(self, batch: pa.Table) -> pa.Table:
        attempt = len(list(self.marks.iterdir()))
        (self.marks / str(attempt)).touch()
        if attempt == 0:
            os.kill(os.getpid(), signal.SIGSTOP)
        return super().process(batch)


def test_a_stopped_model_actor_is_killed_and_its_call_retried(ray_cluster, tiny_model_dir, tmp_path):
    # Ray checks that nodes are alive, not that actors make progress: a SIGSTOPped (or hung) actor stalled the
    # job forever. Past call_timeout_s its watchdog kills the actor; Ray restarts it and retries the call.
    rows = pa.table(
        {
            "row_hash": pa.array([0, 1], pa.uint64()),
            "prompt_id": ["a", "b"],
            "prompt": ["a fox", "a cat"],
            "error": pa.array([None, None], pa.string()),
        }
    )
    stage = dict(
        model={**SynthesizeJob().model.model_dump(), "source": str(tiny_model_dir)},
        gpus=0,
        storage=StorageConfig(),
        batching=dict(max_batch_rows=8, gpu_memory_utilization=0.9),
        # Well above a call of 2 tiny images on a loaded 2-core machine (at 2 s the retry itself was once killed
        # too), well below the test's patience.
        call_timeout_s=6,
        sampling=ImageSampling(images_per_prompt=1),
        marks=str(tmp_path),
    )
    ds = ray.data.from_arrow(rows).map_batches(
        StopsOnce,
        fn_constructor_kwargs=stage,
        compute=ActorPoolStrategy(size=1),
        batch_size=2,
        batch_format="pyarrow",
        num_cpus=0.25,
    )
    out = ds.take_all()
    assert sorted((r["prompt_id"], r["sample_index"], r["error"]) for r in out) == [("a", 0, None), ("b", 0, None)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0", "1"]  # stopped once, then retried
