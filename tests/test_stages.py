"""Fault isolation in the model stages, called in-process (no Ray): a row's own failure becomes that row's error;
a device failure fails the call (so its task, and the job, to be resumed) instead of committing every row of the
block as an error, which a rerun would keep."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from janus_batch import stages
from janus_batch.io.storage import StorageConfig
from janus_batch.jobs import ModelSpec
from janus_batch.options import DEFAULT_CAPTION_INSTRUCTION, ImageSampling, TextSampling
from tests.jobs_data import prepared_images, sample_images

# Text that names CUDA: a row's error may quote the row (a prompt, a path), and is still that row's own.
ROW_TEXT = "a poster of the CUDA logo"
# As torch raises them. Neither message names CUDA: builds without error messages, HIP and XPU say other things.
DEVICE_FAILURES = {
    "out of memory": torch.OutOfMemoryError("Tried to allocate 2.00 GiB; 1.50 GiB free"),
    "accelerator": torch.AcceleratorError("HIP error: an illegal memory access was encountered"),
}


@pytest.fixture(scope="module")
def model_stages(tiny_model_dir) -> dict:
    """The two model stages, each on the tiny model, and a block of three rows for each; the middle row holds
    ROW_TEXT."""
    engine_args = dict(
        model=ModelSpec(source=str(tiny_model_dir)).model_dump(),
        gpus=0,
        storage=StorageConfig(),
        batching=dict(max_batch_rows=8, gpu_memory_utilization=0.9),
        call_timeout_s=600,
    )
    synthesizer = stages.Synthesizer(sampling=ImageSampling(images_per_prompt=1), **engine_args)
    prompts = pa.table(
        {
            "row_hash": pa.array([1, 2, 3], pa.uint64()),
            "prompt_id": ["a", "b", "c"],
            "prompt": ["a fox", ROW_TEXT, "a cat"],
            "error": pa.array([None] * 3, pa.string()),
        }
    )
    describer = stages.Describer(
        sampling=TextSampling(max_new_tokens=2),
        instruction=DEFAULT_CAPTION_INSTRUCTION,
        resume_key="row_hash",
        text_column="answer",
        **engine_args,
    )
    images = pa.table(
        {
            "image": [{"bytes": b, "path": None} for b in sample_images(3)],
            "image_id": ["a", "b", "c"],
            "question": ["What is it?", ROW_TEXT, "Which colour?"],
        }
    )
    questions = prepared_images(images, StorageConfig(), question_column="question")
    return {
        "synthesize": (synthesizer, "generate_images", prompts),
        "describe": (describer, "understand", questions),
    }


def holds_row_text(texts) -> bool:
    return any(ROW_TEXT in str(text) for text in texts)


@pytest.mark.parametrize("failure", DEVICE_FAILURES.values(), ids=DEVICE_FAILURES.keys())
@pytest.mark.parametrize("name", ["synthesize", "describe"])
def test_a_device_failure_fails_the_call(model_stages, name, failure, monkeypatch):
    stage, method, batch = model_stages[name]

    def broken_device(*args, **kwargs):
        raise failure

    monkeypatch.setattr(stage.engine, method, broken_device)
    with pytest.raises(type(failure)) as raised:
        stage(batch)
    assert raised.value is failure


@pytest.mark.parametrize("name", ["synthesize", "describe"])
def test_a_rows_own_failure_is_that_rows_error(model_stages, name, monkeypatch):
    stage, method, batch = model_stages[name]
    real = getattr(stage.engine, method)

    def fails_on_the_row(inputs, *args, **kwargs):
        texts = args[0] if name == "describe" else inputs  # the questions, or the prompts
        if holds_row_text(texts):
            raise ValueError(f"cannot use {ROW_TEXT!r}")
        return real(inputs, *args, **kwargs)

    monkeypatch.setattr(stage.engine, method, fails_on_the_row)
    rows = stage(batch).to_pylist()
    assert [r["prompt_id" if name == "synthesize" else "image_id"] for r in rows] == ["a", "b", "c"]
    assert [r["error"] for r in rows] == [None, f"cannot use {ROW_TEXT!r}", None]
    payload = "pixels" if name == "synthesize" else "answer"
    assert rows[0][payload] is not None and rows[1][payload] is None and rows[2][payload] is not None
