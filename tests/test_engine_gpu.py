"""The engine's GPU path: CUDA graphs against eager, graphs kept across batches, the KV cache planned from GPU
memory. Skipped without a GPU (CI has none); on a GPU machine with torch and transformers only (no Ray, no S3
server), run it as

    python -m pytest --noconftest tests/test_engine_gpu.py
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from janus_batch.engine import JanusEngine, decoder
from janus_batch.engine.prompts import generation_prompt
from janus_batch.model.tiny import build_tiny_model
from janus_batch.options import ImageSampling, TextSampling
from tests.reference import reference_attention, reference_generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

PROMPTS = ["a red fox", "A watercolor painting of a lighthouse on a cliff above a stormy sea", "portrait"]


@pytest.fixture(scope="module")
def engines() -> dict[bool, JanusEngine]:
    """Two engines on one model, by whether they use CUDA graphs. fp32 and the real 576-token geometry: ten KV
    buckets per image, so ten graphs per batch shape."""
    model, processor = build_tiny_model(384)
    model = model.to("cuda")
    return {graphs: JanusEngine(model, processor, kv_cache_tokens=1 << 16, cuda_graphs=graphs) for graphs in (0, 1)}


@pytest.fixture(scope="module")
def engine(engines) -> JanusEngine:
    return engines[True]


def graph_count(engine: JanusEngine) -> int:
    steps = [b.run_step for b in engine.memory.static_batches.values()]
    return sum(len(step.graphs) for step in steps if isinstance(step, decoder.CudaGraphs))


def run_images(engine: JanusEngine, prompts: list[str], temperature: float) -> np.ndarray:
    ids = [engine.encode(generation_prompt(p)) for p in prompts]
    keys = list(range(len(ids)))
    return engine.generate_image_tokens(ids, keys, ImageSampling(temperature=temperature)).cpu().numpy()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cuda_graphs_make_the_eager_tokens_and_replay_for_later_batches(engines, engine, temperature):
    eager = run_images(engines[False], PROMPTS, temperature)
    graphed = run_images(engine, PROMPTS, temperature)
    np.testing.assert_array_equal(graphed, eager)
    captured = graph_count(engine)
    assert captured >= 9  # one per KV bucket the 575 decode steps pass through

    # Another batch of the same shape (other prompts, another length): the same graphs replay, none is added.
    others = ["a cat on a sofa", "mountains at dawn, oil on canvas", "x"]
    graphed = run_images(engine, others, temperature)
    np.testing.assert_array_equal(graphed, run_images(engines[False], others, temperature))
    assert graph_count(engine) == captured


def test_graphs_are_captured_anew_after_the_kv_cache_is_released(engine):
    # As after an out-of-memory retry, or the bench's release before its reference rows: every graph goes, and the
    # next capture needs a new pool (PyTorch asserts when capturing into the id of a pool no graph uses).
    first = run_images(engine, PROMPTS, 0.0)
    engine.memory.release()
    assert engine.memory.graph_pool is None and graph_count(engine) == 0
    np.testing.assert_array_equal(run_images(engine, PROMPTS, 0.0), first)
    assert graph_count(engine) >= 9


def test_understanding_with_cuda_graphs_matches_eager(engines, engine):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)) for _ in range(3)]
    questions = [None, "What is in the middle?", "How many?"]
    eager = engines[False].understand(images, questions, TextSampling(max_new_tokens=40))
    assert engine.understand(images, questions, TextSampling(max_new_tokens=40)) == eager
    assert graph_count(engine) > 0


def test_bf16_tokens_differ_from_the_reference_loop_only_by_attention_rounding(monkeypatch):
    # As on CPU (tests/test_engine_generation.py): with the reference's attention call in place of the engine's,
    # one prompt's 576 greedy tokens in bf16 are the reference loop's, every one (eager: the stand-in syncs).
    model, processor = build_tiny_model(384)
    model = model.to("cuda", torch.bfloat16)
    engine = JanusEngine(model, processor, cuda_graphs=False, kv_cache_tokens=1 << 16)
    ids = [engine.encode(generation_prompt(PROMPTS[1]))]
    want = reference_generate(model, ids[0], engine.pad_id, 1, 5.0, greedy=True)[0]
    monkeypatch.setattr(decoder, "F", SimpleNamespace(scaled_dot_product_attention=reference_attention))
    got = engine.generate_image_tokens(ids, [0], ImageSampling(greedy=True))
    np.testing.assert_array_equal(got.cpu().numpy(), want.numpy())


def test_kv_cache_is_planned_from_gpu_memory_and_respected():
    model, processor = build_tiny_model(384)
    engine = JanusEngine(model.to("cuda", torch.bfloat16), processor, gpu_memory_utilization=0.5)
    total = torch.cuda.mem_get_info()[1]
    slots = engine.memory.capacity
    per_slot = decoder.bytes_per_slot(engine.lm, engine.dtype)
    assert 0.3 * total < slots * per_slot < 0.5 * total  # what is left of half the GPU after a small workspace
    torch.cuda.reset_peak_memory_stats()
    engine.generate_images(PROMPTS, ImageSampling(images_per_prompt=16))
    assert engine.memory.kv.capacity == slots
    assert torch.cuda.max_memory_allocated() <= 0.5 * total
