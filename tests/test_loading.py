"""load_janus: every source (directory, HF cache, s3://), both checkpoint formats, and every error; the converter
pinned to the published checkpoints' key names, shapes and configs (tests/data/checkpoints)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import runpy
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import moto.settings
import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image
from tokenizers import Tokenizer
from transformers import (
    JanusConfig,
    JanusForConditionalGeneration,
    JanusImageProcessorPil,
    JanusProcessor,
    JanusVisionConfig,
    JanusVQVAEConfig,
    LlamaConfig,
)

from janus_batch.engine import JanusEngine
from janus_batch.model import checkpoint, convert, sources
from janus_batch.model.checkpoint import CorruptWeightsError, WrongModelTypeError
from janus_batch.model.load import load_janus
from janus_batch.model.sources import (
    ModelLoadError,
    ModelNotFoundError,
    PickleWeightsError,
    S3AccessError,
    check_weights,
)
from janus_batch.model.tiny import build_tiny_model, write_tiny_model
from janus_batch.model.tokens import BOS, EOS, IMAGE, PAD, prompt_format_of

COMMIT = "0123456789abcdef0123456789abcdef01234567"
# Facts about the published checkpoints (tests/data/checkpoints/README.md): configs and processor files as
# published, and every original tensor's name and shape.
CHECKPOINTS = Path(__file__).parent / "data" / "checkpoints"
PUBLISHED = ("Janus-Pro-7B", "Janus-Pro-1B", "Janus-1.3B")
# Special ids of the real tokenizer (DESIGN.md).
REAL_IDS = dict(image_token_id=100581, bos_token_id=100000, eos_token_id=100001, pad_token_id=100002)


def published_config(name: str) -> dict:
    return json.loads((CHECKPOINTS / "configs" / name / "config.json").read_text())


def published_keys(name: str) -> dict[str, list[int]]:
    return json.loads((CHECKPOINTS / "keys" / f"{name}.original.json").read_text())


def key_patterns(keys) -> set[str]:
    """Tensor names with their layer and block numbers as '#'."""
    return {re.sub(r"\.\d+(?=\.|$)", ".#", key) for key in keys}


@pytest.fixture(scope="module")
def tiny64() -> tuple[JanusForConditionalGeneration, JanusProcessor]:
    return build_tiny_model(64)


def assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    mine, theirs = model.state_dict(), reference.state_dict()
    assert mine.keys() == theirs.keys()
    for key, tensor in theirs.items():
        assert torch.equal(mine[key], tensor), key


def copy_checkpoint(src: Path, dst: Path, *, weights: bool = True) -> Path:
    shutil.copytree(src, dst, ignore=None if weights else shutil.ignore_patterns("*.safetensors"))
    return dst


# ---- Hugging Face format, local directory -------------------------------------------------------------


@pytest.mark.compat
def test_directory_loads_the_exact_model_and_a_pil_processor(tiny_model_dir, tiny64):
    loaded = load_janus(str(tiny_model_dir), device="cpu")
    assert_same_weights(loaded.model, tiny64[0])
    assert not loaded.model.training
    assert loaded.model.dtype == torch.float32  # CPU default
    assert isinstance(loaded.processor, JanusProcessor)
    assert isinstance(loaded.processor.image_processor, JanusImageProcessorPil)
    assert loaded.processor.num_image_tokens == 16
    assert loaded.source == loaded.model_id == str(tiny_model_dir)
    assert loaded.local_dir == tiny_model_dir
    assert len(loaded.weights_hash) == 16
    assert load_janus(tiny_model_dir, device="cpu").weights_hash == loaded.weights_hash  # stable, PathLike ok


@pytest.mark.parametrize(
    "dtype,expected",
    [("bf16", torch.bfloat16), ("float16", torch.float16), (torch.float32, torch.float32), ("auto", torch.float32)],
)
@pytest.mark.compat
def test_dtype_and_device_overrides(tiny_model_dir, tiny64, dtype, expected):
    loaded = load_janus(str(tiny_model_dir), dtype=dtype, device=torch.device("cpu"))
    assert {p.dtype for p in loaded.model.parameters()} == {expected}
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    reference = tiny64[0].state_dict()
    for key, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, reference[key].to(tensor.dtype)), key


def test_unknown_dtype_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="unsupported dtype 'int4'"):
        load_janus(str(tiny_model_dir), dtype="int4", device="cpu")


def test_weights_hash_follows_the_weights(tiny_model_dir, tmp_path):
    other = write_tiny_model(tmp_path / "seed1", image_size=64, seed=1)  # same layout, other values
    files = sources.weight_files(other, allow_pickle=False)
    assert checkpoint.weights_hash(files, other) != load_janus(str(tiny_model_dir), device="cpu").weights_hash


@pytest.mark.compat
def test_pickle_weights_need_the_opt_in(tiny_model_dir, tiny64, tmp_path):
    local = copy_checkpoint(tiny_model_dir, tmp_path / "pickled", weights=False)
    torch.save(tiny64[0].state_dict(), local / "pytorch_model.bin")
    with pytest.raises(PickleWeightsError, match="allow_pickle=True"):
        load_janus(str(local), device="cpu")
    assert_same_weights(load_janus(str(local), device="cpu", allow_pickle=True).model, tiny64[0])


@pytest.mark.compat
def test_damaged_pickle_weights(tiny_model_dir, tmp_path):
    local = copy_checkpoint(tiny_model_dir, tmp_path / "pickled", weights=False)
    (local / "pytorch_model.bin").write_bytes(os.urandom(3000))
    with pytest.raises(CorruptWeightsError, match=r"cannot load the weights pytorch_model\.bin"):
        load_janus(str(local), device="cpu", allow_pickle=True)


# ---- errors -------------------------------------------------------------------------------------------


def test_missing_directory(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_janus(str(tmp_path / "nowhere"), device="cpu")
    monkeypatch.chdir(tmp_path)  # relative paths that look like owner/name are local directories, not HF ids
    for relative in ["./Janus-Pro-7B", "../Janus-Pro-7B"]:
        with pytest.raises(ModelNotFoundError, match=f"model directory '{re.escape(relative)}' does not exist"):
            load_janus(relative, device="cpu")
    with pytest.raises(ModelNotFoundError, match="'org/x..y' is not a local directory, nor a valid Hugging Face id"):
        load_janus("org/x..y", device="cpu")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_janus(str(tmp_path), device="cpu")


def test_directory_without_weights(tiny_model_dir, tmp_path):
    local = copy_checkpoint(tiny_model_dir, tmp_path / "no-weights", weights=False)
    with pytest.raises(ModelNotFoundError, match=r"no weights .*\*\.safetensors"):
        load_janus(str(local), device="cpu")


def test_missing_shard_named_by_the_index(tiny_model_dir, tmp_path):
    local = copy_checkpoint(tiny_model_dir, tmp_path / "sharded", weights=False)
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (local / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelNotFoundError, match="model-00001-of-00002.safetensors"):
        load_janus(str(local), device="cpu")


def test_other_architecture_is_named(tiny_model_dir, tmp_path):
    local = copy_checkpoint(tiny_model_dir, tmp_path / "llama")
    (local / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(WrongModelTypeError, match=r"model_type 'llama' .*LlamaForCausalLM.*expected 'janus'"):
        load_janus(str(local), device="cpu")


def test_truncated_weights(tiny_model_dir, tmp_path):
    local = copy_checkpoint(tiny_model_dir, tmp_path / "truncated")
    weights = local / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CorruptWeightsError, match=r"model\.safetensors is corrupted.*truncated"):
        load_janus(str(local), device="cpu")


def test_garbage_weights(tiny_model_dir, tmp_path):
    local = copy_checkpoint(tiny_model_dir, tmp_path / "garbage")
    (local / "model.safetensors").write_bytes(os.urandom(4096))
    with pytest.raises(CorruptWeightsError, match=r"model\.safetensors is not a safetensors file"):
        load_janus(str(local), device="cpu")


@pytest.mark.compat
def test_weights_of_another_shape(tiny_model_dir, tmp_path):
    local = copy_checkpoint(tiny_model_dir, tmp_path / "missing-tensor")
    weights = safetensors.torch.load_file(local / "model.safetensors")
    del weights["model.aligner.fc1.bias"]
    safetensors.torch.save_file(weights, local / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"1 missing \(e\.g\. \['model\.aligner\.fc1\.bias'\]\)"):
        load_janus(str(local), device="cpu")


def test_revision_only_for_hub_ids(tiny_model_dir):
    with pytest.raises(ValueError, match="revision"):
        load_janus(str(tiny_model_dir), revision="main", device="cpu")


# ---- Hugging Face id, offline cache -------------------------------------------------------------------


def lay_out_hf_cache(hub: Path, repo_id: str, files: Path, ref: str = "main", commit: str = COMMIT) -> Path:
    """The hub cache as huggingface_hub writes it: blobs, a snapshot of symlinks, refs/<ref>."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for path in files.iterdir():
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf" / "hub"


@pytest.mark.compat
def test_hub_id_resolves_from_the_offline_cache(offline_hub, tiny_model_dir, tiny64):
    snapshot = lay_out_hf_cache(offline_hub, "tiny-org/tiny-janus", tiny_model_dir)
    loaded = load_janus("tiny-org/tiny-janus", device="cpu")
    assert loaded.local_dir == snapshot
    assert loaded.model_id == "tiny-org/tiny-janus"
    assert_same_weights(loaded.model, tiny64[0])
    # Same files, same hash, wherever they come from.
    assert loaded.weights_hash == load_janus(str(tiny_model_dir), device="cpu").weights_hash
    assert load_janus("tiny-org/tiny-janus", revision=COMMIT, device="cpu").local_dir == snapshot


def test_a_revision_picks_its_snapshot(offline_hub, tiny_model_dir, tiny64, tmp_path):
    # As deepseek-ai/Janus-Pro-7B: pickle weights on main, safetensors in the pull-request revision refs/pr/109.
    pickled = copy_checkpoint(tiny_model_dir, tmp_path / "pickled", weights=False)
    torch.save(tiny64[0].state_dict(), pickled / "pytorch_model.bin")
    lay_out_hf_cache(offline_hub, "tiny-org/janus", pickled)
    lay_out_hf_cache(offline_hub, "tiny-org/janus", tiny_model_dir, ref="refs/pr/109", commit="f" * 40)
    with pytest.raises(PickleWeightsError):
        load_janus("tiny-org/janus", device="cpu")
    engine = JanusEngine.from_pretrained("tiny-org/janus", revision="refs/pr/109", device="cpu")
    assert_same_weights(engine.model, tiny64[0])


def test_unknown_hub_id_offline(offline_hub):
    with pytest.raises(ModelNotFoundError, match=r"'tiny-org/missing'.*not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        load_janus("tiny-org/missing", device="cpu")


# ---- s3:// --------------------------------------------------------------------------------------------


def upload(s3_server, local_dir: Path, uri: str) -> None:
    fs = s3_server.filesystem()
    for path in local_dir.iterdir():
        fs.put_file(str(path), f"{uri.removeprefix('s3://')}/{path.name}")


@pytest.fixture
def counted_downloads(monkeypatch, tmp_path) -> list[int]:
    """Files fetched per download, in a fresh node cache. A download holds its lock a little longer so
    that concurrent loaders really overlap."""
    monkeypatch.setenv("JANUS_BATCH_CACHE", str(tmp_path / "node-cache"))
    calls: list[int] = []
    download = sources._download

    def counting(fs, files, uri):
        calls.append(len(files))
        time.sleep(0.3)
        download(fs, files, uri)

    monkeypatch.setattr(sources, "_download", counting)
    return calls


def test_s3_concurrent_loaders_download_once(s3_server, tiny_model_dir, tiny64, counted_downloads, tmp_path):
    uri = f"{s3_server.make_bucket()}/models/tiny-janus"
    upload(s3_server, tiny_model_dir, uri)
    barrier = threading.Barrier(2)

    def load(_):
        barrier.wait()
        return load_janus(uri, storage_options=s3_server.storage_options, device="cpu")

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(load, range(2))
    assert counted_downloads == [len(list(tiny_model_dir.iterdir()))]
    assert first.local_dir == second.local_dir
    mirror = first.local_dir
    assert mirror.parent == tmp_path / "node-cache" / "s3" / uri.removeprefix("s3://").rsplit("/", 1)[0]
    assert mirror.name.startswith("tiny-janus-")
    assert (mirror / sources.S3_MARKER).is_file()
    assert not list(mirror.parent.glob("*.tmp-*"))  # the temporary download directory was renamed
    assert first.model_id == uri
    assert first.weights_hash == second.weights_hash == load_janus(str(tiny_model_dir), device="cpu").weights_hash
    assert_same_weights(first.model, tiny64[0])
    assert_same_weights(second.model, tiny64[0])

    again = load_janus(uri + "/", storage_options=s3_server.storage_options, device="cpu")
    assert again.local_dir == mirror and len(counted_downloads) == 1  # reused

    # Changed objects get a fresh mirror instead of mixing with the old files.
    s3_server.filesystem().pipe(f"{uri.removeprefix('s3://')}/notes.txt", b"retrained")
    changed = load_janus(uri, storage_options=s3_server.storage_options, device="cpu")
    assert changed.local_dir != mirror and (changed.local_dir / "notes.txt").read_bytes() == b"retrained"
    assert len(counted_downloads) == 2


def test_s3_missing_prefix(s3_server, counted_downloads):
    with pytest.raises(ModelNotFoundError, match="no objects under s3://.*/nothing-here"):
        load_janus(f"{s3_server.make_bucket()}/nothing-here", storage_options=s3_server.storage_options)
    assert counted_downloads == []


def test_s3_missing_bucket(s3_server, counted_downloads):
    with pytest.raises(ModelNotFoundError, match="bucket does not exist"):
        load_janus("s3://no-such-bucket/model", storage_options=s3_server.storage_options)


def test_s3_bad_credentials(s3_server, tiny_model_dir, counted_downloads, monkeypatch):
    uri = f"{s3_server.make_bucket()}/model"
    upload(s3_server, tiny_model_dir, uri)
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks keys from now on
    bad = {**s3_server.storage_options, "key": "AKIDWRONG", "secret": "wrong"}
    with pytest.raises(S3AccessError, match="access to s3://.* denied.*credentials"):
        load_janus(uri, storage_options=bad)
    assert counted_downloads == []


def test_s3_pickle_only_fails_before_downloading(s3_server, tiny_model_dir, tiny64, counted_downloads, tmp_path):
    local = copy_checkpoint(tiny_model_dir, tmp_path / "pickled", weights=False)
    torch.save(tiny64[0].state_dict(), local / "pytorch_model.bin")
    uri = f"{s3_server.make_bucket()}/pickled"
    upload(s3_server, local, uri)
    with pytest.raises(PickleWeightsError, match="allow_pickle=True"):
        load_janus(uri, storage_options=s3_server.storage_options)
    assert counted_downloads == []
    loaded = load_janus(uri, storage_options=s3_server.storage_options, allow_pickle=True, device="cpu")
    assert_same_weights(loaded.model, tiny64[0])
    assert (loaded.local_dir / "pytorch_model.bin").is_file()


# ---- DeepSeek's original format -----------------------------------------------------------------------


# DeepSeek's module names for transformers' (janus/models: siglip_vit.py, projector.py, vq_model.py and
# modeling_vlm.py), written out here apart from convert.KEY_RULES, the table under test; the published key names
# pin them (test_the_tiny_original_checkpoint_has_the_published_names).
DEEPSEEK_NAMES = [
    (r"^model\.language_model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^model\.vision_model\.embeddings\.patch_embedding\.", "vision_model.vision_tower.patch_embed.proj."),
    (r"^model\.vision_model\.embeddings\.position_embedding\.weight$", "vision_model.vision_tower.pos_embed"),
    (r"^model\.vision_model\.encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"vision_model.vision_tower.blocks.\1.norm\2."),
    (
        r"^model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.",
        r"vision_model.vision_tower.blocks.\1.attn.qkv.",
    ),
    (
        r"^model\.vision_model\.encoder\.layers\.(\d+)\.self_attn\.projection_layer\.",
        r"vision_model.vision_tower.blocks.\1.attn.proj.",
    ),
    (r"^model\.vision_model\.encoder\.layers\.(\d+)\.mlp\.", r"vision_model.vision_tower.blocks.\1.mlp."),
    (r"^model\.vision_model\.post_layernorm\.", "vision_model.vision_tower.norm."),
    (r"^model\.aligner\.fc1\.", "aligner.layers.0."),  # MlpProjector: Sequential(Linear, GELU, Linear)
    (r"^model\.aligner\.hidden_layers\.0\.", "aligner.layers.2."),
    (r"^model\.generation_aligner\.fc1\.", "gen_aligner.layers.0."),
    (r"^model\.generation_aligner\.hidden_layers\.0\.", "gen_aligner.layers.2."),
    (r"^model\.generation_head\.proj_out\.", "gen_head.output_mlp_projector."),
    (r"^model\.generation_head\.vision_head\.", "gen_head.vision_head."),
    (r"^model\.generation_embeddings\.", "gen_embed."),
    (r"^model\.vqmodel\.(en|de)coder\.(?:down|up)\.(\d+)\.block\.", r"gen_vision_model.\1coder.conv_blocks.\2.res."),
    (r"^model\.vqmodel\.(en|de)coder\.(?:down|up)\.", r"gen_vision_model.\1coder.conv_blocks."),
    (r"^model\.vqmodel\.(en|de)coder\.mid\.block_1\.", r"gen_vision_model.\1coder.mid.0."),
    (r"^model\.vqmodel\.(en|de)coder\.mid\.attn_1\.", r"gen_vision_model.\1coder.mid.1."),
    (r"^model\.vqmodel\.(en|de)coder\.mid\.block_2\.", r"gen_vision_model.\1coder.mid.2."),
    (r"^model\.vqmodel\.", "gen_vision_model."),
]


def deepseek_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' Janus weights in DeepSeek's names and layout: the ViT's q/k/v fused into one qkv, its
    position embedding with timm's batch axis; plus the tensors the published checkpoints hold that Janus does
    not use (SigLIP's attention pool, the VQ codebook-usage counter), with the published names."""
    original = {}
    for key, tensor in hf.items():
        fused = re.match(r"(model\.vision_model\..*\.self_attn\.)([qkv])_proj\.(.*)", key)
        if fused and fused[2] != "q":
            continue
        if fused:
            tensor = torch.cat([hf[f"{fused[1]}{p}_proj.{fused[3]}"] for p in "qkv"])
            key = f"{fused[1]}qkv.{fused[3]}"
        if key.endswith("position_embedding.weight"):
            tensor = tensor[None]
        name = next(re.sub(p, r, key) for p, r in DEEPSEEK_NAMES if re.match(p, key))
        original[name] = tensor.contiguous().clone()
    unused = [k for k in published_keys("Janus-Pro-1B") if "attn_pool" in k or k.endswith("codebook_used")]
    original.update({k: torch.zeros(4) for k in unused})
    return original


def write_original_checkpoint(out: Path, image_size: int = 64, pickle: bool = False) -> Path:
    """The tiny model laid out as deepseek-ai publishes Janus: DeepSeek's config, key names and processor
    files, weights in two shards plus the tensors Janus does not use."""
    model, processor = build_tiny_model(image_size)
    text, vision, vq = model.config.text_config, model.config.vision_config, model.config.vq_config
    config = {
        "model_type": "multi_modality",
        "architectures": ["MultiModalityCausalLM"],
        "language_config": {
            "model_type": "llama",
            "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size,
            "max_position_embeddings": text.max_position_embeddings,
            "num_attention_heads": text.num_attention_heads,
            "num_hidden_layers": text.num_hidden_layers,
            "num_key_value_heads": text.num_key_value_heads,
            "vocab_size": text.vocab_size,
            "torch_dtype": "float32",
        },
        "vision_config": {
            "cls": "CLIPVisionTower",
            "model_type": "vision",
            "params": {
                "image_size": image_size,
                "model_name": "siglip_large_patch16_384",
                "select_feature": "same",
                "select_layer": -1,
                # our extension: the tiny dims instead of SigLIP-L's
                "width": vision.hidden_size,
                "layers": vision.num_hidden_layers,
                "heads": vision.num_attention_heads,
                "mlp_ratio": vision.mlp_ratio,
            },
        },
        "aligner_config": {
            "cls": "MlpProjector",
            "model_type": "aligner",
            "params": {
                "depth": 2,
                "input_dim": vision.hidden_size,
                "n_embed": text.hidden_size,
                "projector_type": "mlp_gelu",
            },
        },
        "gen_vision_config": {
            "cls": "VQ-16",
            "model_type": "gen_vision",
            "params": {
                "image_token_size": vq.num_embeddings,
                "n_embed": vq.embed_dim,
                "ch": vq.base_channels,
                "ch_mult": list(vq.channel_multiplier),
                "z_channels": vq.latent_channels,
                "num_res_blocks": vq.num_res_blocks,
            },
        },
        "gen_aligner_config": {
            "cls": "MlpProjector",
            "model_type": "gen_aligner",
            "params": {
                "depth": 2,
                "input_dim": vq.embed_dim,
                "n_embed": text.hidden_size,
                "projector_type": "mlp_gelu",
            },
        },
        "gen_head_config": {
            "cls": "vision_head",
            "model_type": "gen_head",
            "params": {
                "image_token_embed": vq.image_token_embed_dim,
                "image_token_size": vq.num_embeddings,
                "n_embed": text.hidden_size,
            },
        },
    }
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    weights = deepseek_state_dict(model.state_dict())
    keys = sorted(weights)
    stem, suffix = ("pytorch_model", "bin") if pickle else ("model", "safetensors")
    weight_map = {}
    for i, shard in enumerate([keys[: len(keys) // 2], keys[len(keys) // 2 :]], 1):
        name = f"{stem}-{i:05d}-of-00002.{suffix}"
        tensors = {k: weights[k] for k in shard}
        if pickle:
            torch.save(tensors, out / name)
        else:
            safetensors.torch.save_file(tensors, out / name)
        weight_map.update(dict.fromkeys(shard, name))
    (out / f"{stem}.{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    processor.tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "model_max_length": 16384, "tokenizer_class": "LlamaTokenizer"})
    )
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "additional_special_tokens": [IMAGE]})
    )
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "background_color": [127, 127, 127],
                "do_normalize": True,
                "image_mean": [0.5, 0.5, 0.5],
                "image_processor_type": "VLMImageProcessor",
                "image_size": image_size,
                "image_std": [0.5, 0.5, 0.5],
                "min_size": 14,
                "processor_class": "VLChatProcessor",
                "rescale_factor": 1 / 255,
            }
        )
    )
    (out / "processor_config.json").write_text(
        json.dumps(
            {"image_tag": IMAGE, "num_image_tokens": vision.num_image_tokens, "processor_class": "VLChatProcessor"}
        )
    )
    return out


def assert_same_behaviour(loaded, reference: JanusForConditionalGeneration, reference_processor) -> None:
    """Same outputs for understanding (image + text -> logits) and generation (VQ decode), same
    preprocessing."""
    processor = loaded.processor
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    pixels = processor.image_processor(image, return_tensors="pt").pixel_values
    assert torch.equal(pixels, reference_processor.image_processor(image, return_tensors="pt").pixel_values)
    for text in ["a red fox", f"{IMAGE} Describe this image.", "0123456789 neon"]:
        assert processor.tokenizer(text).input_ids == reference_processor.tokenizer(text).input_ids
    tokens = processor.tokenizer("Describe this image.", add_special_tokens=False).input_ids
    image_id = reference.config.image_token_id
    input_ids = torch.tensor([[processor.tokenizer.bos_token_id] + [image_id] * processor.num_image_tokens + tokens])
    with torch.no_grad():
        mine = loaded.model(input_ids=input_ids, pixel_values=pixels).logits
        theirs = reference(input_ids=input_ids, pixel_values=pixels).logits
        assert torch.equal(mine, theirs)
        codes = torch.randint(
            0, reference.config.vq_config.num_embeddings, (1, reference.config.vq_config.num_patches**2)
        )
        assert torch.equal(loaded.model.decode_image_tokens(codes), reference.decode_image_tokens(codes))


@pytest.mark.parametrize("image_size", [64, 384])
@pytest.mark.compat
def test_original_format_converts_exactly(tmp_path, image_size):
    source = write_original_checkpoint(tmp_path / "original", image_size)
    loaded = load_janus(str(source), device="cpu")
    reference, reference_processor = build_tiny_model(image_size)
    assert_same_weights(loaded.model, reference)
    for part in ("text_config", "vision_config", "vq_config"):
        mine, theirs = getattr(loaded.model.config, part).to_dict(), getattr(reference.config, part).to_dict()
        assert {k: v for k, v in mine.items() if k != "dtype"} == {k: v for k, v in theirs.items() if k != "dtype"}
    assert loaded.model.config.image_token_id == reference.config.image_token_id
    assert loaded.model.generation_config.generation_kwargs == reference.generation_config.generation_kwargs
    assert isinstance(loaded.processor.image_processor, JanusImageProcessorPil)
    assert loaded.processor.num_image_tokens == reference_processor.num_image_tokens
    assert_same_behaviour(loaded, reference, reference_processor)


def test_original_pickle_weights_need_the_opt_in(tmp_path, tiny64):
    source = write_original_checkpoint(tmp_path / "original", pickle=True)
    with pytest.raises(PickleWeightsError, match="allow_pickle=True"):
        load_janus(str(source), device="cpu")
    assert_same_weights(load_janus(str(source), device="cpu", allow_pickle=True).model, tiny64[0])


def test_original_unknown_tensor_is_named(tmp_path):
    source = write_original_checkpoint(tmp_path / "original")
    safetensors.torch.save_file(
        {"vision_model.vision_tower.extra.weight": torch.zeros(1)}, source / "extra.safetensors"
    )
    (source / "model.safetensors.index.json").unlink()  # every *.safetensors file is read then
    with pytest.raises(ModelLoadError, match=r"no Janus counterpart.*vision_tower\.extra\.weight"):
        load_janus(str(source), device="cpu")


@pytest.mark.compat
def test_convert_cli_writes_a_hugging_face_checkpoint(tmp_path, tiny64, capsys):
    source = write_original_checkpoint(tmp_path / "original")
    convert.main([str(source), str(tmp_path / "hf")])
    assert capsys.readouterr().out.strip() == str(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "janus"
    assert list((tmp_path / "hf").glob("*.safetensors"))
    loaded = load_janus(str(tmp_path / "hf"), device="cpu")
    assert_same_weights(loaded.model, tiny64[0])
    assert_same_behaviour(loaded, *tiny64)
    with pytest.raises(FileExistsError):
        convert.main([str(source), str(tmp_path / "hf")])


def edit_tokenizer_json(source: Path, edit) -> None:
    path = source / "tokenizer.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))


def test_the_special_tokens_map_marks_the_chat_roles_special_as_deepseek_loads_it(tmp_path):
    # DeepSeek's LlamaTokenizerFast.from_pretrained makes the map's additional_special_tokens special: decoding
    # with skip_special_tokens drops them. A tokenizer.json may hold them as plain added tokens.
    source = write_original_checkpoint(tmp_path / "original")

    def plain_roles(data: dict) -> dict:
        for token in data["added_tokens"]:
            if token["content"] in ("<|User|>", "<|Assistant|>"):
                token["special"] = False
        return data

    edit_tokenizer_json(source, plain_roles)
    shutil.copy(CHECKPOINTS / "configs" / "Janus-Pro-1B" / "special_tokens_map.json", source)  # as published
    tokenizer = load_janus(str(source), device="cpu").processor.tokenizer
    ids = tokenizer.encode("<|Assistant|> a red fox<|User|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "a red fox"
    assert len(tokenizer) == len(Tokenizer.from_file(str(source / "tokenizer.json")).get_vocab(True))  # no new id

    (source / "special_tokens_map.json").unlink()  # then only tokenizer.json says, and it says plain
    tokenizer = load_janus(str(source), device="cpu").processor.tokenizer
    assert "<|User|>" in tokenizer.decode(ids, skip_special_tokens=True)


def test_a_tokenizer_json_without_a_janus_special_token_is_refused(tmp_path):
    source = write_original_checkpoint(tmp_path / "original")
    edit_tokenizer_json(source, lambda data: json.loads(json.dumps(data).replace(IMAGE, "<img>")))
    with pytest.raises(ModelLoadError, match=re.escape(f"lacks Janus' special tokens {[IMAGE]}")):
        load_janus(str(source), device="cpu")


def test_the_tiny_original_checkpoint_has_the_published_names(tmp_path):
    source = write_original_checkpoint(tmp_path / "original")
    index = json.loads((source / "model.safetensors.index.json").read_text())
    assert key_patterns(index["weight_map"]) == key_patterns(published_keys("Janus-Pro-1B"))


# ---- the published checkpoints -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,tensors,params",
    [("Janus-Pro-7B", 1018, 7.4078e9), ("Janus-Pro-1B", 964, 2.0766e9), ("Janus-1.3B", 964, 2.0766e9)],
)
@pytest.mark.compat
def test_published_keys_convert_to_exactly_the_model_the_config_describes(name, tensors, params):
    config = convert.janus_config_from_original(published_config(name), **REAL_IDS)
    with torch.device("meta"):
        model = JanusForConditionalGeneration(config)
    want = {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
    assert len(want) == tensors
    # Janus-Pro's published sizes (7.42B / 2.09B) also count SigLIP's unused pooling head (12.6M).
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=1e-4)
    original = {key: torch.empty(shape, device="meta") for key, shape in published_keys(name).items()}
    dropped = sorted(key for key in original if convert.DROPPED.search(key))
    assert len(dropped) == 14 and dropped[0] == "gen_vision_model.quantize.codebook_used"
    assert all(".attn_pool." in key for key in dropped[1:])
    converted = convert.hf_state_dict_from_original(original)
    assert {key: tuple(tensor.shape) for key, tensor in converted.items()} == want  # nothing missing or extra
    assert len(convert.KEY_RULES) == len({hf for _, hf in convert.KEY_RULES})  # the table is one-to-one


def transformers_conversion_config(original: dict) -> JanusConfig:
    """The config that transformers' own conversion (models/janus/convert_janus_weights_to_hf.py) makes, from
    what it reads: these language_config keys (and torch_dtype, a setting of the run), the vision image size
    and aligner width and depth, the VQ sizes, the generation aligner's width and gen_head's image_token_embed;
    everything else is the config classes' defaults."""
    language = original["language_config"]
    text_keys = (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_act",
        "max_position_embeddings",
    )
    text = LlamaConfig(
        **{key: language[key] for key in text_keys if key in language},
        pad_token_id=REAL_IDS["pad_token_id"],
        bos_token_id=REAL_IDS["bos_token_id"],
        eos_token_id=REAL_IDS["eos_token_id"],
    )
    aligner = original["aligner_config"]["params"]
    vision = JanusVisionConfig(
        image_size=original["vision_config"]["params"]["image_size"],
        projection_dim=aligner["n_embed"],
        depth=aligner["depth"],
    )
    gen = original["gen_vision_config"]["params"]
    vq = JanusVQVAEConfig(
        embed_dim=gen["n_embed"],
        num_embeddings=gen["image_token_size"],
        projection_dim=original["gen_aligner_config"]["params"]["n_embed"],
        image_token_embed_dim=original["gen_head_config"]["params"]["image_token_embed"],
    )
    return JanusConfig(text_config=text, vision_config=vision, vq_config=vq, image_token_id=REAL_IDS["image_token_id"])


TEXT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_parameters",
    "attention_bias",
    "mlp_bias",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
# Every field of the vision and VQ configs shapes the model or its numbers.
VISION_FIELDS = tuple(JanusVisionConfig().to_dict().keys() - JanusConfig().to_dict().keys() - {"model_type"})
VQ_FIELDS = tuple(JanusVQVAEConfig().to_dict().keys() - JanusConfig().to_dict().keys() - {"model_type"})
# Where ours differs from transformers' conversion on purpose, and why.
DELIBERATE = {
    # transformers' script leaves JanusConfig's default (tied) and calls tie_weights(), which makes lm_head the
    # input embeddings; the published checkpoints store language_model.lm_head.weight apart from them.
    "tie_word_embeddings": (False, True),
}


def config_fields(config: JanusConfig) -> dict:
    fields = {f"text_config.{k}": getattr(config.text_config, k) for k in TEXT_FIELDS}
    fields |= {f"vision_config.{k}": getattr(config.vision_config, k) for k in VISION_FIELDS}
    fields |= {f"vq_config.{k}": getattr(config.vq_config, k) for k in VQ_FIELDS}
    fields = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
    return fields | {"image_token_id": config.image_token_id, "tie_word_embeddings": config.tie_word_embeddings}


@pytest.mark.parametrize("name", PUBLISHED)
@pytest.mark.compat
def test_the_converted_config_is_what_transformers_conversion_makes(name):
    ours = config_fields(convert.janus_config_from_original(published_config(name), **REAL_IDS))
    theirs = config_fields(transformers_conversion_config(published_config(name)))
    assert len(VISION_FIELDS) > 10 and len(VQ_FIELDS) > 10
    assert {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]} == DELIBERATE


def test_only_the_language_fields_that_shape_the_model_are_taken():
    # A re-saved copy's language_config carries settings of a run; DeepSeek's LlamaConfig(**...) would take them
    # all, but they are not the model's.
    clean = convert.janus_config_from_original(published_config("Janus-Pro-7B"), **REAL_IDS)
    resaved = published_config("Janus-Pro-7B")
    resaved["language_config"] |= {
        "use_cache": False,
        "output_attentions": True,
        "_name_or_path": "/data/janus",
        "architectures": ["LlamaForCausalLM"],
        "transformers_version": "4.38.2",
    }
    assert convert.janus_config_from_original(resaved, **REAL_IDS).text_config.to_dict() == clean.text_config.to_dict()
    tuned = published_config("Janus-Pro-7B")
    tuned["language_config"] |= {"rms_norm_eps": 1e-5, "rope_theta": 500000.0}  # these shape the numbers: kept
    text = convert.janus_config_from_original(tuned, **REAL_IDS).text_config
    assert text.rms_norm_eps == 1e-5 and text.rope_parameters["rope_theta"] == 500000.0


@pytest.mark.parametrize(
    "section,key,value,field",
    [
        ("gen_head_config", "image_token_embed", 1024, "gen_head_config.params.image_token_embed must be 2048"),
        ("gen_head_config", "n_embed", 1024, "gen_head_config.params.n_embed must be 2048"),
        ("gen_head_config", "image_token_size", 8192, "gen_head_config.params.image_token_size must be 16384"),
        ("aligner_config", "n_embed", 1024, "aligner_config.params.n_embed must be 2048"),
        ("aligner_config", "depth", 3, "aligner_config.params.depth must be 2"),
        ("gen_aligner_config", "input_dim", 16, "gen_aligner_config.params.input_dim must be 8"),
        ("aligner_config", "projector_type", "linear", "aligner_config.params.projector_type must be 'mlp_gelu'"),
    ],
)
def test_config_mismatches_name_the_field(section, key, value, field):
    # gen_head's image_token_embed is the head's inner width: transformers' Janus holds it in the width it shares
    # with the generation aligner. Taken for the head's input width (its n_embed) it failed with a bare
    # size-mismatch RuntimeError once a variant had them differ.
    config = published_config("Janus-Pro-1B")
    config[section]["params"][key] = value
    with pytest.raises(ModelLoadError, match=re.escape(field)):
        convert.janus_config_from_original(config, **REAL_IDS)


def lay_out_janus_pro_1b(out: Path) -> Path:
    """A directory laid out as deepseek-ai/Janus-Pro-1B is published: its config and processor files, a
    tokenizer.json (the tiny model's: the real one is not among the facts) and one pytorch_model.bin of bf16
    tensors with the published names and shapes, each a view of one zero (no memory, no download)."""
    shutil.copytree(CHECKPOINTS / "configs" / "Janus-Pro-1B", out)
    for path in out.iterdir():
        path.chmod(0o644)
    build_tiny_model(64)[1].tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    zero = torch.zeros((), dtype=torch.bfloat16)
    torch.save(
        {key: zero.expand(shape) for key, shape in published_keys("Janus-Pro-1B").items()}, out / "pytorch_model.bin"
    )
    return out


@pytest.mark.compat
def test_a_full_size_janus_pro_1b_laid_out_as_published_loads(tmp_path):
    local = lay_out_janus_pro_1b(tmp_path / "Janus-Pro-1B")
    with pytest.raises(PickleWeightsError) as refused:
        load_janus(str(local), device="cpu")
    message = str(refused.value)
    for way_out in (
        "--allow-pickle",
        "deepseek-community/Janus-Pro-1B",
        f"python -m janus_batch.model.convert {local}",
    ):
        assert way_out in message
    loaded = load_janus(str(local), device="cpu", dtype="bf16", allow_pickle=True)  # check_loading_info passed
    model = loaded.model
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(2.0766e9, rel=1e-4)
    assert model.config.text_config.hidden_size == 2048 and model.config.vision_config.num_image_tokens == 576
    assert loaded.processor.image_processor.min_size == 14 and loaded.processor.num_image_tokens == 576


def test_a_pickle_index_without_its_shards_says_pickle_not_missing(offline_hub, tmp_path):
    # What a download of deepseek-ai/Janus-Pro-7B without allow_pickle leaves in the HF cache: the JSON files,
    # pytorch_model.bin.index.json among them, and no shards.
    files = tmp_path / "files"
    shutil.copytree(CHECKPOINTS / "configs" / "Janus-Pro-7B", files)
    keys = sorted(published_keys("Janus-Pro-7B"))
    shards = {key: f"pytorch_model-0000{1 + (i >= 600)}-of-00002.bin" for i, key in enumerate(keys)}
    (files / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": shards}))
    lay_out_hf_cache(offline_hub, "deepseek-ai/Janus-Pro-7B", files)
    with pytest.raises(PickleWeightsError, match="deepseek-ai/Janus-Pro-7B has only pickle weights.*--allow-pickle"):
        load_janus("deepseek-ai/Janus-Pro-7B", device="cpu")


def test_a_pickle_only_hub_repo_fails_before_any_download(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # The Hub's file lists as published on main (no Hub here); nothing may be downloaded.
    listings = {
        "deepseek-ai/Janus-Pro-7B": [
            "config.json",
            "pytorch_model-00001-of-00002.bin",
            "pytorch_model-00002-of-00002.bin",
            "pytorch_model.bin.index.json",
            "tokenizer.json",
        ],
        "deepseek-ai/Janus-Pro-1B": ["config.json", "pytorch_model.bin", "tokenizer.json"],
    }
    monkeypatch.setattr(sources, "hub_files", lambda repo_id, revision: listings[repo_id])
    monkeypatch.setattr(sources, "snapshot_download", lambda *args, **kwargs: pytest.fail("downloaded"))
    for repo_id in listings:
        with pytest.raises(PickleWeightsError, match=f"{repo_id} has only pickle weights.*deepseek-community"):
            load_janus(repo_id, device="cpu")


class Payload:
    """Unpickling this object would create a file: what a hostile pickle does instead."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.mark.compat
@pytest.mark.parametrize("checkpoint_format", ["hf", "original"])
def test_allowed_pickle_weights_load_tensors_only(tiny_model_dir, tmp_path, checkpoint_format):
    if checkpoint_format == "hf":
        local = copy_checkpoint(tiny_model_dir, tmp_path / "pickled", weights=False)
        weights = local / "pytorch_model.bin"
    else:
        local = write_original_checkpoint(tmp_path / "original", pickle=True)
        weights = local / "pytorch_model-00001-of-00002.bin"
    marker = tmp_path / "code-ran"
    torch.save({"model.aligner.fc1.weight": Payload(marker)}, weights)
    with pytest.raises(CorruptWeightsError, match=weights.name):
        load_janus(str(local), device="cpu", allow_pickle=True)
    assert not marker.exists()


def test_the_converter_records_the_prompt_format_its_source_tells(tmp_path):
    source = write_original_checkpoint(tmp_path / "Janus-1.3B")
    assert JanusEngine.from_pretrained(str(source), device="cpu").prompt_format == "janus-1.3b"  # from the name
    convert.main([str(source), str(tmp_path / "converted")])
    assert json.loads((tmp_path / "converted" / "config.json").read_text())["prompt_format"] == "janus-1.3b"
    assert JanusEngine.from_pretrained(str(tmp_path / "converted"), device="cpu").prompt_format == "janus-1.3b"
    convert.main([str(write_original_checkpoint(tmp_path / "pro")), str(tmp_path / "pro-converted")])
    assert JanusEngine.from_pretrained(str(tmp_path / "pro-converted"), device="cpu").prompt_format == "janus-pro"


@pytest.mark.parametrize(
    "name, told",
    [
        ("deepseek-ai/Janus-1.3B", "janus-1.3b"),
        ("/models/janus_1.3b", "janus-1.3b"),
        ("/models/Janus-1.3B/original/", "janus-1.3b"),
        ("s3://bucket/janus-1.3b", "janus-1.3b"),
        ("/hf/hub/models--deepseek-ai--Janus-1.3B/snapshots/0123abcd", "janus-1.3b"),
        ("/hf/hub/models--deepseek-ai--Janus-Pro-1B/snapshots/0123abcd", "janus-pro"),
        ("/runs/janus-1.3b-sweep/Janus-Pro-1B", "janus-pro"),  # the nearest part naming a model decides
        ("/models/checkpoint-500", "janus-pro"),
    ],
)
def test_the_prompt_format_is_told_from_the_part_of_the_path_that_names_the_model(name, told):
    assert prompt_format_of(name)[0] == told


def test_a_snapshot_folder_of_janus_1_3b_in_the_hf_cache_gets_its_roles(tmp_path):
    # snapshot_download's answer, which users pass on as a local directory.
    snapshot = write_original_checkpoint(tmp_path / "models--deepseek-ai--Janus-1.3B" / "snapshots" / "08b9a5d")
    assert JanusEngine.from_pretrained(str(snapshot), device="cpu").prompt_format == "janus-1.3b"


def test_the_readme_models_table_loads_every_published_checkpoint(monkeypatch, capsys):
    # Each row's command is what the jobs run: it must give the spec that loads that checkpoint (flags checked by
    # the real CLI, --dry-run: nothing downloads), with --allow-pickle exactly where the weights are pickle.
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    models = readme[readme.index("## Models") : readme.index("## Layout")]
    rows = [line.split("|")[1:-1] for line in models.splitlines() if line.startswith("| `")]
    names = [row[0].strip().strip("`") for row in rows]
    assert sorted(names) == sorted(
        ["deepseek-community/Janus-Pro-7B", "deepseek-community/Janus-Pro-1B"]
        + [f"deepseek-ai/{name}" for name in PUBLISHED]
    )
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name, (_, _, weights, needs_pickle, command) in zip(names, rows, strict=True):
        argv = command.strip().strip("`").split()
        assert argv[:2] == ["python", "pipelines/synthesize.py"]
        monkeypatch.setattr("sys.argv", [argv[1], *argv[2:], "--dry-run"])
        runpy.run_path(str(Path(__file__).parents[1] / argv[1]), run_name="__main__")
        spec = json.loads(capsys.readouterr().out.split("\nplan (")[0])
        pickle = "pickle" in weights
        assert spec["model"]["source"] == name and spec["model"]["allow_pickle"] is pickle
        assert needs_pickle.strip() == ("yes" if pickle else "no")
        assert prompt_format_of(name)[0] == ("janus-1.3b" if name.endswith("1.3B") else "janus-pro")


def test_check_weights_fails_as_loading_would_from_the_file_list(
    s3_server, tiny_model_dir, tiny64, tmp_path, counted_downloads
):
    # For job drivers: the pickle-only (or weightless) checkpoint is refused before any model loads, and nothing
    # is downloaded.
    pickled = copy_checkpoint(tiny_model_dir, tmp_path / "pickled", weights=False)
    torch.save(tiny64[0].state_dict(), pickled / "pytorch_model.bin")
    uri = f"{s3_server.make_bucket()}/pickled"
    upload(s3_server, pickled, uri)
    for source, options in [(str(pickled), None), (uri, s3_server.storage_options)]:
        with pytest.raises(PickleWeightsError, match=f"{source} has only pickle weights"):
            check_weights(source, storage_options=options)
        check_weights(source, allow_pickle=True, storage_options=options)
    assert counted_downloads == []
    check_weights(str(tiny_model_dir))
    with pytest.raises(ModelNotFoundError, match="no weights"):
        check_weights(str(copy_checkpoint(tiny_model_dir, tmp_path / "empty", weights=False)))
    with pytest.raises(ValueError, match="revision"):
        check_weights(str(tiny_model_dir), revision="main")
