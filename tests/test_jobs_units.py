"""Batch jobs without a Ray cluster: specs and their messages, the CLI, S3 configuration, the stage callables
on good and bad rows, and the checks that fail a bad job before any model is loaded."""

from __future__ import annotations

import io
import itertools
import json
import runpy
import subprocess
import sys
import tarfile
from datetime import date, datetime, timezone
from decimal import Decimal
from pathlib import Path

import moto.settings
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import s3fs
from PIL import Image
from pydantic import ValidationError

from janus_batch import stages
from janus_batch.engine import JanusEngine
from janus_batch.engine import engine as engine_module
from janus_batch.io.commits import RunFiles
from janus_batch.io.readers import list_input_files
from janus_batch.io.storage import StorageConfig, read_bytes, write_bytes
from janus_batch.io.writers import RunWriter
from janus_batch.jobs import KINDS, CaptionJob, CurateJob, ScoreJob, SynthesizeJob
from janus_batch.jobs.kinds import model_stage_args
from janus_batch.jobs.pipeline import cpu_shortfall, prepare
from janus_batch.jobs.specs import RUN_ID, ModelSpec, ResourceSpec, resolve_run_id
from janus_batch.model.load import load_janus
from janus_batch.model.preprocessing import decode_image, preprocess_image
from janus_batch.options import DEFAULT_CAPTION_INSTRUCTION, ImageSampling, TextSampling
from tests.helpers import encoded, free_port
from tests.jobs_data import prepared_images, sample_images, write_parquet

pytest_plugins = ["tests.jobs_fixtures"]
REPO = Path(__file__).resolve().parents[1]


# ---- specs and CLI ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data,message",
    [
        ({"sampling": {"images_per_prompt": 0}}, "sampling.images_per_prompt"),
        ({"images_per_prompt": 4}, "images_per_prompt"),  # a sampling option belongs under sampling
        ({"resources": {"min_actors": 2}}, "set both min_actors and max_actors"),
        ({"resources": {"min_actors": 3, "max_actors": 2}}, "min_actors (3) > max_actors (2)"),
        ({"resources": {"batch_size": 64}, "sampling": {"images_per_prompt": 32}}, "keep it <= 1024"),
        ({"output": {"format": "csv"}}, "output.format"),
        ({"run_id": "../escape"}, "run_id"),
        ({"run_id": "nightly-{now:%H:%M}"}, "letters, digits"),
        ({"run_id": "nightly-{day}"}, "the only placeholder is"),
        ({"promts": "typo"}, "promts"),
    ],
)
def test_synthesize_spec_messages_name_the_field(data, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SynthesizeJob.model_validate(data)


def test_min_aesthetic_must_be_on_the_rating_scale():
    assert CurateJob(selection={"min_aesthetic": 9}).selection.min_aesthetic == 9
    assert CurateJob(selection={"min_aesthetic": 0.5}, scores={"aesthetic_low": 0}).selection.min_aesthetic == 0.5
    for threshold in (0.5, 9.5, 60):  # 60: a 0-100 rating on the default 1-9 scale keeps nothing
        with pytest.raises(ValidationError, match=f"min_aesthetic {threshold:g} is off the rating scale 1..9"):
            CurateJob(selection={"min_aesthetic": threshold})


def test_run_id_templates_name_the_slot(monkeypatch):
    # A scheduled run's id comes from its slot: two firings in one slot resume one run, the next slot is new.
    spec = SynthesizeJob(run_id="nightly-{now:%Y%m%d}")
    before = datetime.now(timezone.utc)
    run_id = spec.with_run_id().run_id
    assert run_id in {f"nightly-{t:%Y%m%d}" for t in (before, datetime.now(timezone.utc))}
    assert resolve_run_id("nightly-{now:%Y%m%d}", datetime(2026, 3, 1, 23, 59, tzinfo=timezone.utc)) == (
        "nightly-20260301"
    )
    assert SynthesizeJob(run_id="r1").with_run_id().run_id == "r1"
    fresh = {SynthesizeJob().with_run_id().run_id for _ in range(3)}  # no id: a new one every time
    assert len(fresh) == 3 and all(RUN_ID.fullmatch(r) for r in fresh)


def test_caption_spec_modes():
    with pytest.raises(ValidationError, match="needs input.question_column"):
        CaptionJob.model_validate({"task": "vqa", "input": {"path": "x"}})
    with pytest.raises(ValidationError, match="instruction is the caption prompt: task 'vqa' asks each row's"):
        CaptionJob.model_validate({"task": "vqa", "input": {"path": "x", "question_column": "q"}, "instruction": "Hi"})
    vqa = CaptionJob.model_validate({"task": "vqa", "input": {"path": "x", "question_column": "q"}})
    assert CaptionJob.model_validate(vqa.model_dump()) == vqa  # a dumped spec (--dry-run's) validates again
    # e.g. captioning a synthesized corpus by its `key`: the output has a `key` of its own.
    with pytest.raises(ValidationError, match="input.id_column 'key' is passed through beside the job's own 'key'"):
        CaptionJob.model_validate({"input": {"path": "x", "id_column": "key"}})
    # The columns the job adds between its stages are taken too: they overwrote the id, and the job crashed.
    for kind, name in itertools.product((CaptionJob, ScoreJob), ("question", "pixels")):
        with pytest.raises(ValidationError, match=f"input.id_column '{name}' is passed through beside"):
            kind.model_validate({"input": {"path": "x", "id_column": name}})
    with pytest.raises(ValidationError, match="input.image_uri_column 'answer'"):
        CaptionJob.model_validate(
            {"task": "vqa", "input": {"path": "x", "image_uri_column": "answer", "question_column": "q"}}
        )
    with pytest.raises(ValidationError, match="use task 'vqa'"):
        CaptionJob.model_validate({"input": {"path": "x", "question_column": "q"}})
    uri = CaptionJob.model_validate({"input": {"path": "x", "image_uri_column": "url"}})
    assert uri.input.image_column is None  # a URI column replaces the default bytes column
    folder = CaptionJob.model_validate({"input": {"path": "x", "format": "images"}})
    assert folder.input.id_column is None and folder.text_column == "caption"
    assert CaptionJob.model_validate(folder.model_dump()).input == folder.input  # a dumped spec validates again
    # A column given for a source that does not read it was dropped without a word.
    with pytest.raises(ValidationError, match="format 'images' reads files, which have no columns: unset id_column"):
        CaptionJob.model_validate({"input": {"path": "x", "format": "images", "id_column": "name"}})
    with pytest.raises(ValidationError, match="image_column .* or image_uri_column .*, not both"):
        CaptionJob.model_validate({"input": {"path": "x", "image_column": "b", "image_uri_column": "url"}})
    # Both would otherwise fail only once the job runs, after its model actors have started.
    with pytest.raises(ValidationError, match="task 'vqa' needs a question per row: use Parquet input"):
        CaptionJob.model_validate({"task": "vqa", "input": {"path": "x", "format": "images", "question_column": "q"}})
    with pytest.raises(ValidationError, match="instruction is empty"):
        CaptionJob.model_validate({"input": {"path": "x"}, "instruction": "  "})
    with pytest.raises(ValidationError, match="output format 'files' writes images"):
        CaptionJob.model_validate({"input": {"path": "x"}, "output": {"format": "files"}})


def test_the_driver_and_the_cpu_stages_run_without_torch(tiny_model_dir, tmp_path):
    """A job's driver (the entry points, the job kinds, the checks of a job before it runs) and its CPU workers
    (stages.py, the report) never import torch or transformers, which cost 5 to 7 s of CPU and about 500 MB per
    process: only a model actor loads the engine."""
    table = pa.table({"prompt_id": ["a"], "prompt": ["a red fox"]})
    source = write_parquet(table, str(tmp_path / "p.parquet"), StorageConfig())
    code = (
        "import sys; sys.path[:0] = ['pipelines']\n"
        "import synthesize, caption, vqa, score, janus_batch.stages, janus_batch.report\n"
        "from janus_batch.jobs import SynthesizeJob\n"
        "from janus_batch.jobs.pipeline import prepare\n"
        "prepare(SynthesizeJob(input={'path': sys.argv[1]}, model={'source': sys.argv[2]}))\n"
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    )
    root = Path(__file__).parent.parent
    command = [sys.executable, "-c", code, source, str(tiny_model_dir)]
    loaded = subprocess.run(command, cwd=root, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_every_kind_is_registered_under_its_spec_kind():
    # cli.py and pipeline.py find a job's kind (its stages, input, output schema) by its spec's `kind`.
    for name, kind in KINDS.items():
        assert kind.spec.model_fields["kind"].default == name
    assert KINDS["caption"].spec is CaptionJob and KINDS["synthesize"].spec is SynthesizeJob


def test_default_batch_size_fills_several_forward_batches():
    # 512 outputs a call: a call smaller than the engine's forward batch (on a GPU, hundreds of rows) would
    # leave the GPU underused.
    assert SynthesizeJob().resources.batch_size == 32  # prompts: 32 x 16 images
    assert SynthesizeJob(sampling={"images_per_prompt": 4}).resources.batch_size == 128
    assert SynthesizeJob(sampling=ImageSampling(images_per_prompt=1000)).resources.batch_size == 1
    assert CaptionJob(input={"path": "x"}).resources.batch_size == 512
    assert SynthesizeJob(resources={"batch_size": 3}).resources.batch_size == 3
    mine = ResourceSpec(actors=2)
    assert SynthesizeJob(resources=mine).resources.batch_size == 32 and mine.batch_size is None  # not mutated


def run_script(script: str, args: list[str], monkeypatch) -> None:
    """A pipelines/ script as `python pipelines/SCRIPT ARGS` runs it, in this process (no import cost)."""
    monkeypatch.setattr(sys, "argv", [script, *args])
    runpy.run_path(str(REPO / "pipelines" / script), run_name="__main__")


def test_cli_yaml_flags_and_dry_run(tmp_path, monkeypatch, capsys):
    config = tmp_path / "job.yaml"
    config.write_text(
        "input: {path: s3://b/prompts.parquet, prompt_column: text}\n"
        "sampling: {images_per_prompt: 8, seed: 4}\n"
        "storage: {endpoint_url: 'http://127.0.0.1:9000', key: AKIA, secret: hunter2}\n"
        "output: {path: s3://b/out, format: webdataset}\n"
    )
    args = ["--config", str(config), "--images-per-prompt", "3", "--actors", "2", "--dry-run"]
    run_script("synthesize.py", args, monkeypatch)
    out = capsys.readouterr().out
    spec = json.loads(out[: out.index("plan (")])
    assert spec["sampling"]["images_per_prompt"] == 3 and spec["resources"]["actors"] == 2  # flags override the file
    assert spec["sampling"]["seed"] == 4  # and the file's other sampling options stay
    assert spec["resources"]["batch_size"] == 170 and "170 prompts per call" in out  # 510 of 512 images a call
    assert spec["input"]["prompt_column"] == "text" and spec["output"]["format"] == "webdataset"
    assert spec["storage"]["secret"] == "***" and "hunter2" not in out
    assert "3 images per prompt" in out and "webdataset to s3://b/out/<new run id>/data" in out

    with pytest.raises(SystemExit, match="needs input.question_column"):
        run_script("vqa.py", ["--input", "x.parquet", "--dry-run"], monkeypatch)

    # A config that cannot be read, or whose field is no mapping for a flag to go into: an invalid spec, said so.
    with pytest.raises(SystemExit, match=f"invalid job spec: cannot read {tmp_path}/none.yaml: No such file"):
        run_script("synthesize.py", ["--config", str(tmp_path / "none.yaml")], monkeypatch)
    config.write_text("input: s3://b/prompts.parquet\n")
    with pytest.raises(SystemExit, match="invalid job spec: input must be a mapping of fields .*, not a str"):
        run_script("synthesize.py", ["--config", str(config), "--prompt-column", "text"], monkeypatch)

    # A run-id template is shown resolved, as the run would use it.
    before = datetime.now(timezone.utc)
    run_script("synthesize.py", ["--run-id", "daily-{now:%Y%m%d}", "--dry-run"], monkeypatch)
    out = capsys.readouterr().out
    run_id = json.loads(out[: out.index("plan (")])["run_id"]
    assert run_id in {f"daily-{t:%Y%m%d}" for t in (before, datetime.now(timezone.utc))}
    assert f"outputs/{run_id}/data" in out


def test_cli_sampling_flags(monkeypatch, capsys):
    def dry_run(script: str, args: list[str]) -> dict:
        run_script(script, [*args, "--dry-run"], monkeypatch)
        out = capsys.readouterr().out
        return json.loads(out[: out.index("plan (")])

    assert dry_run("caption.py", ["--input", "x"])["sampling"]["greedy"] is True
    args = ["--input", "x", "--sample", "--temperature", "0.7", "--seed", "3", "--max-new-tokens", "9"]
    sampled = dry_run("caption.py", args)["sampling"]
    assert (sampled["greedy"], sampled["temperature"], sampled["seed"], sampled["max_new_tokens"]) == (False, 0.7, 3, 9)
    assert dry_run("synthesize.py", [])["sampling"]["greedy"] is False
    args = ["--greedy", "--cfg-weight", "3", "--temperature", "0.5", "--top-k", "7", "--top-p", "0.9", "--seed", "2"]
    assert dry_run("synthesize.py", args)["sampling"] == {
        "images_per_prompt": 16,
        "cfg_weight": 3.0,
        "temperature": 0.5,
        "top_k": 7,
        "top_p": 0.9,
        "seed": 2,
        "greedy": True,
    }
    monkeypatch.setattr(sys, "argv", ["caption.py", "--help"])
    with pytest.raises(SystemExit):
        runpy.run_path(str(REPO / "pipelines" / "caption.py"), run_name="__main__")
    assert "(default: None)" not in capsys.readouterr().out  # help states real defaults only


# ---- storage ---------------------------------------------------------------------------------------------


def test_storage_config_arrow_and_fsspec_reach_the_same_store(storage, bucket, s3_server):
    write_bytes(f"{bucket}/a/b.bin", b"hello", storage)  # pyarrow, scheme http from the endpoint
    assert s3fs.S3FileSystem(**storage.storage_options()).cat(f"{bucket}/a/b.bin") == b"hello"
    assert read_bytes(f"{bucket}/a/b.bin", storage, 100) == b"hello"
    with pytest.raises(ValueError, match="exceeds the limit of 3"):
        read_bytes(f"{bucket}/a/b.bin", storage, 3)


def test_profile_resolves_to_explicit_keys(tmp_path, monkeypatch):
    (tmp_path / "credentials").write_text("[batch]\naws_access_key_id = AKIDX\naws_secret_access_key = SECRETX\n")
    (tmp_path / "config").write_text("[profile batch]\nregion = eu-west-3\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    resolved = StorageConfig(profile="batch").resolved()
    keys = (resolved.key.get_secret_value(), resolved.secret.get_secret_value(), resolved.token)
    assert keys == ("AKIDX", "SECRETX", None) and (resolved.region, resolved.profile) == ("eu-west-3", None)
    assert "SECRETX" not in repr(resolved) and resolved.storage_options()["secret"] == "SECRETX"


# ---- CPU stages ------------------------------------------------------------------------------------------


def test_prepare_prompts_reports_each_bad_row():
    batch = pa.table(
        {
            "prompt": ["a fox", None, "a cat", "a dog", "an owl"],
            "prompt_id": ["p0", "p1", None, "dup", "dup"],
            "row_hash": pa.array([1, 2, 3, 4, 5], pa.uint64()),
        }
    )
    out = stages.prepare_prompts(batch, prompt_column="prompt", id_column="prompt_id", duplicates={"dup"})
    assert out["error"].to_pylist() == [
        None,
        "prompt is null",
        "prompt_id is null",
        "duplicate prompt_id 'dup': more than one input row has it",
        "duplicate prompt_id 'dup': more than one input row has it",
    ]
    wrong_type = pa.table({"prompt": [7], "prompt_id": [1], "row_hash": pa.array([9], pa.uint64())})
    out = stages.prepare_prompts(wrong_type, prompt_column="prompt", id_column="prompt_id", duplicates=set())
    assert out.to_pylist() == [
        {"row_hash": 9, "prompt_id": "1", "prompt": None, "error": "prompt must be string, got int"}
    ]
    no_ids = stages.prepare_prompts(batch.slice(0, 1), prompt_column="prompt", id_column=None, duplicates=set())
    assert no_ids["prompt_id"].to_pylist() == ["a fox"]  # the prompt text is the id
    # So a repeated prompt is a repeated id: it would make the same images twice.
    twice = pa.table({"prompt": ["a fox", "a fox"], "row_hash": pa.array([1, 2], pa.uint64())})
    out = stages.prepare_prompts(twice, prompt_column="prompt", id_column=None, duplicates={"a fox"})
    assert out["error"].to_pylist() == ["duplicate prompt 'a fox': more than one input row has it"] * 2


def test_prepare_images_reports_each_bad_row(tmp_path, storage):
    good = sample_images(2)
    png = encoded(Image.new("RGB", (30, 50), (10, 200, 30)))
    cases = [
        (good[0], None),
        ({"bytes": good[1], "path": "x.jpg"}, None),  # a Hugging Face Image struct
        (png[: len(png) // 2], "corrupt or truncated"),
        (b"this is not an image", "not a decodable image"),
        (b"", "empty image bytes"),
        (None, "image is null"),
        (encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (250, 250, 3), np.uint8))), "exceeds"),
    ]
    structs = [c if isinstance(c, dict) else (None if c is None else {"bytes": c, "path": None}) for c, _ in cases]
    batch = pa.table(
        {
            "image": structs,
            "image_id": [f"i{i}" for i in range(len(cases))],
            "row_hash": pa.array(range(len(cases)), pa.uint64()),
        }
    )
    out = prepared_images(batch, storage)
    for (_, expected), error, pixels in zip(cases, out["error"].to_pylist(), out["pixels"].to_pylist(), strict=True):
        if expected is None:
            assert error is None
            array = np.frombuffer(pixels, np.uint8).reshape(64, 64, 3)
            assert any((array == preprocess_image(decode_image(data), 64)).all() for data in good)
        else:
            assert expected in error and pixels is None
    assert out.column_names == ["row_hash", "image_id", "question", "pixels", "error"]


def test_prepare_images_from_uris_and_questions(tmp_path, storage):
    (tmp_path / "ok.png").write_bytes(sample_images(1)[0])
    batch = pa.table(
        {
            "url": [str(tmp_path / "ok.png"), str(tmp_path / "missing.png"), str(tmp_path / "ok.png"), None],
            "question": ["what?", "what?", "  ", "what?"],
            "row_hash": pa.array(range(4), pa.uint64()),
        }
    )
    out = prepared_images(
        batch, storage, image_column=None, image_uri_column="url", id_column=None, question_column="question",
        passthrough=["url"],
    )  # fmt: skip
    errors = out["error"].to_pylist()
    assert errors[0] is None and errors[1].startswith("no such file") and errors[2] == "empty question"
    assert errors[3] == "url is null"


def test_an_unreachable_store_stops_the_task_instead_of_committing_errors(tmp_path):
    # A store that is down (here: nothing listens on the port) may be up on a retry, or for the resumed job:
    # the rows must not be committed with that as their error.
    down = StorageConfig(
        endpoint_url=f"http://127.0.0.1:{free_port()}", region="us-east-1", key="k", secret="s", retries={"attempts": 1}
    )
    batch = pa.table({"url": ["s3://bucket/a.png"], "row_hash": pa.array([0], pa.uint64())})
    with pytest.raises(stages.StorageUnavailable, match=r"read s3://bucket/a.png: .*AWS Error NETWORK_CONNECTION"):
        prepared_images(
            batch, down, image_column=None, image_uri_column="url", id_column=None, question_column=None,
            passthrough=["url"],
        )  # fmt: skip


# ---- model stages, called directly -------------------------------------------------------------------------


def test_synthesizer_rows_and_per_row_errors(tiny_model_dir, storage, monkeypatch):
    stage = stages.Synthesizer(
        model=ModelSpec(source=str(tiny_model_dir)).model_dump(),
        gpus=0,
        storage=storage,
        batching=dict(max_batch_rows=8, gpu_memory_utilization=0.9),
        call_timeout_s=600,
        sampling=ImageSampling(images_per_prompt=2),
    )
    batch = pa.table(
        {
            "row_hash": pa.array([1, 2, 3, 4], pa.uint64()),
            "prompt_id": ["a", "b", "c", "d"],
            "prompt": ["a fox", "   ", "x " * 3000, "a cat"],
            "error": [None, None, None, None],
        }
    )
    out = stage(batch).to_pylist()
    assert [(r["prompt_id"], r["sample_index"]) for r in out] == [
        ("a", 0),
        ("a", 1),
        ("b", None),
        ("c", None),
        ("d", 0),
        ("d", 1),
    ]
    assert out[2]["error"] == "empty prompt" and out[3]["error"].startswith("prompt too long")
    assert len(out[0]["pixels"]) == 64 * 64 * 3 and out[0]["width"] == 64

    # An engine failure that only some rows cause is pinned on those rows; the others still get images.
    real = stage.engine.generate_images

    def flaky(prompts, sampling, **kwargs):
        if "a cat" in prompts:
            raise RuntimeError("boom")
        return real(prompts, sampling, **kwargs)

    monkeypatch.setattr(stage.engine, "generate_images", flaky)
    out = stage(pa.concat_tables([batch.slice(0, 1), batch.slice(3, 1)])).to_pylist()
    assert [(r["prompt_id"], r["error"]) for r in out] == [("a", None), ("a", None), ("d", "RuntimeError: boom")]


def test_describer_caption_and_vqa(tiny_model_dir, storage):
    batch = pa.table(
        {
            "row_hash": pa.array([1, 2, 3], pa.uint64()),
            "image_id": ["x", "y", "z"],
            "image": [{"bytes": b, "path": None} for b in sample_images(2)] + [{"bytes": b"junk", "path": None}],
        }
    )
    prepared = prepared_images(batch, storage)
    stage = stages.Describer(
        model=ModelSpec(source=str(tiny_model_dir)).model_dump(),
        gpus=0,
        storage=storage,
        batching=dict(max_batch_rows=8, gpu_memory_utilization=0.9),
        call_timeout_s=600,
        sampling=TextSampling(max_new_tokens=5),
        instruction=DEFAULT_CAPTION_INSTRUCTION,
        resume_key="row_hash",
        text_column="caption",
    )
    out = stage(prepared).to_pylist()
    assert [r["image_id"] for r in out] == ["x", "y", "z"]
    assert all(isinstance(r["caption"], str) and 1 <= r["num_tokens"] <= 5 for r in out[:2])
    assert out[2]["caption"] is None and "not a decodable image" in out[2]["error"]
    assert out[0]["key"] == "0000000000000001"


# ---- fail fast -------------------------------------------------------------------------------------------


def test_cpu_shortfall_is_named_before_a_run_would_wait_forever():
    # On 1 CPU the default 1 CPU per model actor waits for a 2nd CPU (Ray Data's file listing) that never comes.
    default = SynthesizeJob()
    assert cpu_shortfall(default, 2) is None
    warning = cpu_shortfall(default, 1)
    assert warning.startswith("this run needs 2 CPUs to start") and "the cluster has 1" in warning
    assert "--cpus-per-actor" in warning
    small = SynthesizeJob(resources={"actors": 1, "cpus_per_actor": 0})
    assert cpu_shortfall(small, 1) is None
    pool = SynthesizeJob(resources={"min_actors": 4, "max_actors": 8, "cpus_per_actor": 2})  # the minimum counts
    assert cpu_shortfall(pool, 9) is None and "needs 9 CPUs" in cpu_shortfall(pool, 8)


def test_actors_sharing_a_gpu_share_its_memory(monkeypatch):
    asked = {}

    def from_pretrained(source, **kwargs):  # what the model actor asks of the engine, without loading a model
        asked.update(kwargs)
        return type("Loaded", (), {"weights_hash": None})()

    monkeypatch.setattr(JanusEngine, "from_pretrained", from_pretrained)

    def batching(**resources) -> dict:
        spec = SynthesizeJob(model={"source": "/models/janus"}, resources=resources)
        actor = model_stage_args(spec)[1]
        stages.load_engine(actor["model"], actor["gpus"], actor["storage"], actor["batching"])
        return {name: asked[name] for name in ("max_batch_rows", "gpu_memory_utilization")}

    assert batching(gpus_per_actor=1) == {"max_batch_rows": None, "gpu_memory_utilization": 0.9}
    assert batching(gpus_per_actor=0.5, max_batch_rows=32)["gpu_memory_utilization"] == pytest.approx(0.45)
    assert batching(gpus_per_actor=2, gpu_memory_utilization=0.8)["gpu_memory_utilization"] == pytest.approx(0.8)
    assert batching(gpus_per_actor=0)["gpu_memory_utilization"] == 1.0  # CPU: no GPU memory to share
    with pytest.raises(ValidationError, match="gpu_memory_utilization"):
        SynthesizeJob(resources={"gpu_memory_utilization": 0})


def test_bad_jobs_fail_before_any_model_is_loaded(tmp_path, storage, bucket, tiny_model_dir, monkeypatch):
    loads = []
    monkeypatch.setattr(engine_module, "load_janus", lambda *args, **kwargs: loads.append(args) or load_janus(*args))
    prompts = write_parquet(pa.table({"text": ["a"], "prompt_id": ["p"]}), f"{bucket}/in/p.parquet", storage)
    base = {"output": {"path": str(tmp_path / "out")}, "storage": storage.model_dump()}
    with pytest.raises(ValueError, match=r"has no prompt column 'prompt'; its columns are \['text', 'prompt_id'\]"):
        prepare(SynthesizeJob.model_validate({**base, "input": {"path": prompts}}))
    no_ids = write_parquet(pa.table({"prompt": ["a"]}), f"{bucket}/in/no-ids.parquet", storage)
    with pytest.raises(ValueError, match=r"has no id column 'prompt_id'.*optional: --id-column '' or id_column: null"):
        prepare(SynthesizeJob.model_validate({**base, "input": {"path": no_ids}}))
    for kind in (SynthesizeJob, CurateJob):  # '' is none (--id-column ''), as null is: it crashed curate jobs
        assert kind.model_validate({**base, "input": {"path": no_ids, "id_column": ""}}).input.id_column is None
    with pytest.raises(FileNotFoundError, match="input path does not exist"):
        prepare(SynthesizeJob.model_validate({**base, "input": {"path": f"{bucket}/nothing/here"}}))
    with pytest.raises(ValueError, match="cannot read the config of model '/no/such/model'"):
        job = {**base, "input": {"path": prompts, "prompt_column": "text"}, "model": {"source": "/no/such/model"}}
        prepare(SynthesizeJob.model_validate(job))
    with pytest.raises(ValueError, match="has no image column 'image'"):
        prepare(CaptionJob.model_validate({**base, "input": {"path": prompts}}))
    with pytest.raises(ValueError, match="has no image column 'image', no id column 'image_id', no prompt column 'p'"):
        prepare(ScoreJob.model_validate({**base, "input": {"path": prompts, "prompt_column": "p"}}))
    nested = write_parquet(pa.table({"prompt": ["a"], "prompt_id": [{"n": 1}]}), f"{bucket}/in/n.parquet", storage)
    with pytest.raises(ValueError, match=r"id column 'prompt_id' is struct<n: int64>, not a single value"):
        prepare(SynthesizeJob.model_validate({**base, "input": {"path": nested}}))
    pickled = tmp_path / "pickled"  # as deepseek-ai/Janus-Pro-1B: config.json and a pytorch_model.bin
    pickled.mkdir()
    (pickled / "config.json").write_bytes((tiny_model_dir / "config.json").read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    job = {**base, "input": {"path": prompts, "prompt_column": "text"}, "model": {"source": str(pickled)}}
    with pytest.raises(ValueError, match="has only pickle weights .* --allow-pickle"):
        prepare(SynthesizeJob.model_validate(job))
    # Bad credentials: wrong keys, with the S3-protocol server checking keys from here on.
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    wrong_keys = {**base["storage"], "key": "AKIDWRONG", "secret": "wrong"}
    job = {**base, "storage": wrong_keys, "input": {"path": prompts, "prompt_column": "text"}}
    with pytest.raises(OSError, match="cannot read input .*ACCESS_DENIED"):
        prepare(SynthesizeJob.model_validate(job))
    assert loads == []


def test_webdataset_json_holds_any_passthrough_id_column():
    # Passed-through id columns may be of any Arrow type; a type json cannot write failed the write task.
    table = pa.table(
        {
            "key": ["000000000"],
            "caption": ["a cat"],
            "day": pa.array([date(2026, 11, 25)], pa.date32()),
            "blob": [b"\x00\xff"],
            "amount": pa.array([Decimal("1.50")], pa.decimal128(5, 2)),
            "created_at": pa.array([datetime(2026, 11, 25, 7, tzinfo=timezone.utc)], pa.timestamp("us", tz="UTC")),
            "error": pa.array([None], pa.string()),
        }
    )
    run = RunFiles("unused", pafs.LocalFileSystem(), "key", pa.string())
    writer = RunWriter(run, "webdataset", schema=table.schema, rows_per_file=1, text_column="caption")
    _, (_, shard) = writer.webdataset("task", table)
    with tarfile.open(fileobj=io.BytesIO(shard)) as tar:
        assert tar.extractfile("000000000.txt").read() == b"a cat"
        meta = json.loads(tar.extractfile("000000000.json").read())
    assert meta["day"] == "2026-11-25" and meta["blob"] == "AP8=" and meta["amount"] == "1.50"
    assert meta["created_at"] == "2026-11-25T07:00:00+00:00"


def test_inputs_that_ray_would_reject_later_are_refused_up_front(tmp_path):
    with pytest.raises(ValidationError, match="endpoint_url must start with http:// or https://"):
        StorageConfig(endpoint_url="localhost:9000")
    single = tmp_path / "prompts.pq"
    single.write_bytes(b"")
    with pytest.raises(ValueError, match="prompts.pq is not a parquet file"):
        list_input_files(str(single), StorageConfig(), ["parquet"])
