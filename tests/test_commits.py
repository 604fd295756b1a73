"""The commit protocol without Ray: write tasks as the writer does, damage the run folder the ways a crash, a storage
fault or a person can, and check that `reconcile` finds exactly the inputs whose rows are all in the data.
Every output format, locally and on the S3-protocol server."""

from __future__ import annotations

import json
import tarfile
from datetime import datetime, timezone
from types import SimpleNamespace

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.data._internal.planner.plan_write_op import WRITE_UUID_KWARG_NAME

from janus_batch.io import schemas
from janus_batch.io.commits import Reconciled, RunFiles, reconcile
from janus_batch.io.storage import fs_path
from janus_batch.io.writers import RunWriter
from janus_batch.jobs import SynthesizeJob
from janus_batch.jobs.pipeline import summarize

pytest_plugins = ["tests.jobs_fixtures"]
IMAGES_PER_PROMPT = 2
FORMATS = ["parquet", "webdataset", "files"]


def synth_rows(prompts: list[int], failed: tuple[int, ...] = ()) -> pa.Table:
    """Output rows as the synthesize job makes them: a prompt's images, or one error row."""
    rows = []
    for p in prompts:
        base = dict(row_hash=2**63 + p, prompt_id=f"p{p}", prompt=f"prompt {p}", weights_hash="w1", model_id="m")
        if p in failed:
            rows.append(dict(base, key=f"{p:016x}", error="prompt is empty"))
            continue
        for i in range(IMAGES_PER_PROMPT):
            image = {"bytes": f"png {p} {i}".encode(), "path": f"{p:016x}_{i:04d}.png"}
            rows.append(dict(base, key=f"{p:016x}_{i:04d}", sample_index=i, image=image, width=8, height=8))
    return pa.Table.from_pylist(rows, schema=schemas.SYNTHESIZE)


@pytest.fixture(params=["local", "s3"])
def run_dir(request, tmp_path, storage, s3_server):
    if request.param == "local":
        return str(tmp_path / "run")
    return f"{s3_server.make_bucket()}/out/run"


def writer(run_dir: str, storage, output_format: str) -> RunWriter:
    run = RunFiles(fs_path(run_dir), storage.filesystem(run_dir), schemas.ROW_HASH, pa.uint64())
    return RunWriter(run, output_format, schema=schemas.SYNTHESIZE, rows_per_file=1, text_column="prompt")


def write_task(sink: RunWriter, index: int, table: pa.Table) -> str:
    sink.write([table], SimpleNamespace(kwargs={WRITE_UUID_KWARG_NAME: "w"}, task_idx=index))
    return f"w_{index:06d}"


def check(sink: RunWriter) -> tuple[set[int], object]:
    state = reconcile(sink.run, sink.task_reader(), lambda failed: 1 if failed else IMAGES_PER_PROMPT)
    return {k - 2**63 for k in state.done.to_pylist()}, state


def files(sink: RunWriter) -> set[str]:
    return {*sink.run.list("data"), *sink.run.list("images"), *sink.run.list("_index")}


@pytest.mark.parametrize("output_format", FORMATS)
def test_committed_tasks_are_found_with_their_errors(run_dir, storage, output_format):
    sink = writer(run_dir, storage, output_format)
    write_task(sink, 0, synth_rows([0, 1], failed=(1,)))
    write_task(sink, 1, synth_rows([2]))
    done, state = check(sink)
    assert done == {0, 1, 2} and (state.rows, state.errors) == (5, 1) and state.weights_hashes == {"w1"}
    assert not state.deleted and not state.requeued


@pytest.mark.parametrize("output_format", FORMATS)
def test_a_deleted_data_file_requeues_its_inputs(run_dir, storage, output_format):
    sink = writer(run_dir, storage, output_format)
    lost = write_task(sink, 0, synth_rows([0, 1]))
    write_task(sink, 1, synth_rows([2]))
    main = f"data/{lost}.{'tar' if output_format == 'webdataset' else 'parquet'}"
    sink.run.delete([main])
    done, state = check(sink)
    assert done == {2} and state.requeued == 2 and state.rows == 2
    assert not any(lost in f for f in files(sink))  # its index and images are gone too: nothing left to duplicate


@pytest.mark.parametrize("output_format", FORMATS)
def test_a_deleted_index_is_rebuilt_from_the_data(run_dir, storage, output_format):
    sink = writer(run_dir, storage, output_format)
    first = write_task(sink, 0, synth_rows([0, 1], failed=(0,)))
    write_task(sink, 1, synth_rows([2]))
    sink.run.delete([f"_index/{first}.parquet"])
    assert check(sink)[0] == {0, 1, 2}
    sink.run.delete(list(sink.run.list("_index")))  # the whole folder
    done, state = check(sink)
    assert done == {0, 1, 2} and (state.rows, state.errors) == (5, 1)
    assert len(sink.run.list("_index")) == 2  # indexed again


def test_leftovers_of_unfinished_tasks_are_deleted(tmp_path, storage):
    sink = writer(str(tmp_path / "run"), storage, "files")
    write_task(sink, 0, synth_rows([0]))
    # A task that wrote its images but died before its main file, and a half-written temporary file.
    orphan = write_task(sink, 1, synth_rows([1]))
    sink.run.delete([f"data/{orphan}.parquet", f"_index/{orphan}.parquet"])
    (tmp_path / "run/data/w_000002.parquet.tmp-0123").write_bytes(b"PAR1 half")
    done, state = check(sink)
    assert done == {0} and state.requeued == 0
    assert files(sink) == {
        "data/w_000000.parquet",
        "_index/w_000000.parquet",
        "images/w_000000/0000000000000000_0000.png",
        "images/w_000000/0000000000000000_0001.png",
        "images/w_000000/metadata.parquet",
    }


@pytest.mark.parametrize("output_format", FORMATS)
def test_a_damaged_task_is_deleted_whole(run_dir, storage, output_format):
    sink = writer(run_dir, storage, output_format)
    damaged = write_task(sink, 0, synth_rows([0, 1]))
    write_task(sink, 1, synth_rows([2]))
    fs = sink.run.filesystem
    if output_format == "files":  # an image gone
        sink.run.delete([f"images/{damaged}/{0:016x}_0001.png"])
    else:  # the main file cut short, as by a copy that failed half way
        main = sink.run.path(f"data/{damaged}.{'tar' if output_format == 'webdataset' else 'parquet'}")
        with fs.open_input_stream(main) as f:
            data = f.read()
        with fs.open_output_stream(main) as f:
            f.write(data[: len(data) // 2])
    done, state = check(sink)
    assert done == {2} and not any(damaged in f for f in files(sink))


def test_a_prompt_short_of_its_images_is_not_done(tmp_path, storage):
    sink = writer(str(tmp_path / "run"), storage, "parquet")
    rows = synth_rows([0, 1])
    write_task(sink, 0, rows.slice(0, 3))  # prompt 1 has one image of two
    sink.run.delete(["_index/w_000000.parquet"])  # so the data file itself is read
    assert check(sink)[0] == set()


def test_rows_in_two_data_files_are_refused_naming_them(tmp_path, storage):
    sink = writer(str(tmp_path / "run"), storage, "parquet")
    write_task(sink, 0, synth_rows([0, 1]))
    write_task(sink, 1, synth_rows([1, 2]))  # as two drivers at once would
    write_task(sink, 2, synth_rows([3]).slice(0, 1))  # and a damaged task, deleted: the message names the others
    with pytest.raises(ValueError, match=r"1 inputs have output rows in more than one data file \(w_000000, w_000001"):
        check(sink)


@pytest.mark.parametrize("output_format", FORMATS)
def test_a_task_whose_inputs_are_all_in_other_tasks_is_deleted(run_dir, storage, output_format):
    # A write task of a failed attempt committing late, after the rerun made its inputs again: the same rows twice.
    sink = writer(run_dir, storage, output_format)
    first, second = write_task(sink, 0, synth_rows([0, 1])), write_task(sink, 1, synth_rows([2]))
    late = write_task(sink, 2, synth_rows([1, 2], failed=(2,)))  # remade: p2 failed this time, p1 did not
    done, state = check(sink)
    assert done == {0, 1, 2} and state.rows == 3 * IMAGES_PER_PROMPT and state.errors == 0
    assert all(late not in f for f in files(sink)) and any(first in f for f in files(sink))
    assert any(second in f for f in files(sink)) and any(late in f for f in state.deleted)


def test_webdataset_shards_hold_samples_only_and_unsigned_ids_as_strings(tmp_path, storage):
    sink = writer(str(tmp_path / "run"), storage, "webdataset")
    task = write_task(sink, 0, synth_rows([0, 1], failed=(1,)))
    with tarfile.open(tmp_path / f"run/data/{task}.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile(f"{0:016x}_0000.json").read())
    assert sorted(names) == sorted(f"{0:016x}_{i:04d}.{ext}" for i in range(2) for ext in ("png", "txt", "json"))
    assert meta["row_hash"] == str(2**63)  # beyond int64: JSON readers would overflow on the number
    errors = pq.read_table(tmp_path / f"run/data/{task}.errors.parquet")
    assert errors["prompt_id"].to_pylist() == ["p1"] and errors["error"].to_pylist() == ["prompt is empty"]


def test_a_webdataset_task_of_no_sample_writes_no_shard(tmp_path, storage):
    # A model call whose rows are all errors (or, in curation, all unkept): an empty tar would break `datasets`.
    sink = writer(str(tmp_path / "run"), storage, "webdataset")
    task = write_task(sink, 0, synth_rows([0, 1], failed=(0, 1)))
    write_task(sink, 1, synth_rows([2]))
    assert sorted(sink.run.list("data")) == [f"data/{task}.parquet", "data/w_000001.tar"]
    done, state = check(sink)
    assert done == {0, 1, 2} and state.errors == 2
    (tmp_path / "run/_index").rename(tmp_path / "index-gone")  # read again from the data files
    assert check(sink)[0] == {0, 1, 2}
    rows = datasets.load_dataset("webdataset", data_files=str(tmp_path / "run/data/*.tar"), split="train")
    assert rows.num_rows == IMAGES_PER_PROMPT


def test_files_format_keeps_parquet_readers_and_imagefolder_apart(tmp_path, storage):
    sink = writer(str(tmp_path / "run"), storage, "files")
    task = write_task(sink, 0, synth_rows([0, 1], failed=(1,)))
    table = pq.read_table(tmp_path / "run/data")  # a folder of Parquet files only
    assert table["file_name"].to_pylist() == [
        f"images/{task}/{0:016x}_0000.png",
        f"images/{task}/{0:016x}_0001.png",
        None,
    ]
    local = pq.read_table(tmp_path / f"run/images/{task}/metadata.parquet")
    assert local["file_name"].to_pylist() == [f"{0:016x}_0000.png", f"{0:016x}_0001.png"]
    for name in table["file_name"].to_pylist()[:2]:
        assert (tmp_path / "run" / name).read_bytes().startswith(b"png 0")


def test_a_run_is_succeeded_only_when_every_input_is_in_the_data():
    spec = SynthesizeJob(run_id="s", sampling={"images_per_prompt": 2})
    before = Reconciled(pa.array([], pa.uint64()), 0, 0, set(), 0, [])
    after = Reconciled(pa.array([1, 2], pa.uint64()), 3, 1, {"w"}, 0, [])  # one prompt failed: one row
    now = datetime.now(timezone.utc)
    partial = summarize(spec, 3, before, after, now, 1.0, "janus-pro")
    assert (partial["status"], partial["inputs_done"], partial["expected_rows"]) == ("incomplete", 2, 5)
    assert partial["prompt_format"] == "janus-pro"
    done = summarize(spec, 2, before, after, now, 1.0, "janus-pro")
    assert (done["status"], done["expected_rows"], done["rows_written"], done["errors_written"]) == (
        "succeeded",
        3,
        3,
        1,
    )
