"""load_janus: every source (directory, HF cache, s3://), both checkpoint formats, and every error."""

from __future__ import annotations

import hashlib
import json
import os
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
from transformers import JanusForConditionalGeneration, JanusImageProcessorPil, JanusProcessor

from janus_batch.model import (
    CorruptWeightsError,
    ModelLoadError,
    ModelNotFoundError,
    PickleWeightsError,
    S3AccessError,
    WrongModelTypeError,
    convert,
    load_janus,
    loading,
)
from janus_batch.model.tiny import BOS, EOS, IMAGE, PAD, build_tiny_model, write_tiny_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


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
    files = loading.weight_files(other, allow_pickle=False)
    assert loading.weights_hash(files, other) != load_janus(str(tiny_model_dir), device="cpu").weights_hash


def test_pickle_weights_need_the_opt_in(tiny_model_dir, tiny64, tmp_path):
    local = copy_checkpoint(tiny_model_dir, tmp_path / "pickled", weights=False)
    torch.save(tiny64[0].state_dict(), local / "pytorch_model.bin")
    with pytest.raises(PickleWeightsError, match="allow_pickle=True"):
        load_janus(str(local), device="cpu")
    assert_same_weights(load_janus(str(local), device="cpu", allow_pickle=True).model, tiny64[0])


def test_damaged_pickle_weights(tiny_model_dir, tmp_path):
    local = copy_checkpoint(tiny_model_dir, tmp_path / "pickled", weights=False)
    (local / "pytorch_model.bin").write_bytes(os.urandom(3000))
    with pytest.raises(CorruptWeightsError, match=r"cannot load the weights pytorch_model\.bin"):
        load_janus(str(local), device="cpu", allow_pickle=True)


# ---- errors -------------------------------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_janus(str(tmp_path / "nowhere"), device="cpu")


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


def lay_out_hf_cache(hub: Path, repo_id: str, files: Path) -> Path:
    """The hub cache as huggingface_hub writes it: blobs, a snapshot of symlinks, refs/main."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for path in files.iterdir():
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf" / "hub"


def test_hub_id_resolves_from_the_offline_cache(offline_hub, tiny_model_dir, tiny64):
    snapshot = lay_out_hf_cache(offline_hub, "tiny-org/tiny-janus", tiny_model_dir)
    loaded = load_janus("tiny-org/tiny-janus", device="cpu")
    assert loaded.local_dir == snapshot
    assert loaded.model_id == "tiny-org/tiny-janus"
    assert_same_weights(loaded.model, tiny64[0])
    # Same files, same hash, wherever they come from.
    assert loaded.weights_hash == load_janus(str(tiny_model_dir), device="cpu").weights_hash
    assert load_janus("tiny-org/tiny-janus", revision=COMMIT, device="cpu").local_dir == snapshot


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
    download = loading._download

    def counting(fs, files, uri):
        calls.append(len(files))
        time.sleep(0.3)
        download(fs, files, uri)

    monkeypatch.setattr(loading, "_download", counting)
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
    assert (mirror / loading.S3_MARKER).is_file()
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


# ---- DeepSeek's original format -----------------------------------------------------------------------


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
    weights = {k: v.contiguous().clone() for k, v in convert.original_state_dict_from_hf(model.state_dict()).items()}
    weights["vision_model.vision_tower.attn_pool.latent"] = torch.zeros(1, 1, vision.hidden_size)
    weights["gen_vision_model.quantize.codebook_used"] = torch.zeros(65536)
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


# Published config.json of deepseek-ai/Janus-Pro-7B and -1B, less the keys conversion ignores.
def published_config(hidden: int, layers: int, heads: int, ffn: int) -> dict:
    return {
        "model_type": "multi_modality",
        "language_config": {
            "hidden_size": hidden,
            "intermediate_size": ffn,
            "max_position_embeddings": 16384,
            "model_type": "llama",
            "num_attention_heads": heads,
            "num_hidden_layers": layers,
            "num_key_value_heads": heads,
            "torch_dtype": "bfloat16",
            "vocab_size": 102400,
        },
        "vision_config": {
            "cls": "CLIPVisionTower",
            "model_type": "vision",
            "params": {
                "image_size": 384,
                "model_name": "siglip_large_patch16_384",
                "select_feature": "same",
                "select_layer": -1,
            },
        },
        "aligner_config": {
            "cls": "MlpProjector",
            "model_type": "aligner",
            "params": {"depth": 2, "input_dim": 1024, "n_embed": hidden, "projector_type": "mlp_gelu"},
        },
        "gen_vision_config": {
            "cls": "VQ-16",
            "model_type": "gen_vision",
            "params": {"image_token_size": 16384, "n_embed": 8},
        },
        "gen_aligner_config": {
            "cls": "MlpProjector",
            "model_type": "gen_aligner",
            "params": {"depth": 2, "input_dim": 8, "n_embed": hidden, "projector_type": "mlp_gelu"},
        },
        "gen_head_config": {
            "cls": "vision_head",
            "model_type": "gen_head",
            "params": {"image_token_embed": hidden, "image_token_size": 16384, "n_embed": hidden},
        },
    }


@pytest.mark.parametrize(
    "dims,params", [((4096, 30, 32, 11008), 7.4078e9), ((2048, 24, 16, 5632), 2.0766e9)], ids=["7B", "1B"]
)
def test_published_configs_map_to_the_real_architecture(dims, params):
    config = convert.janus_config_from_original(
        published_config(*dims), image_token_id=100581, bos_token_id=100000, eos_token_id=100001, pad_token_id=100002
    )
    assert config.vision_config.hidden_size == 1024 and config.vision_config.num_hidden_layers == 24
    assert config.vision_config.num_image_tokens == 576 and config.vq_config.num_patches == 24
    assert list(config.vq_config.channel_multiplier) == [1, 1, 2, 2, 4] and config.vq_config.base_channels == 128
    with torch.device("meta"):
        model = JanusForConditionalGeneration(config)
    # Janus-Pro's published sizes (7.42B / 2.09B) also count SigLIP's unused pooling head (12.6M).
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=1e-4)
    # Every weight of the real-size model has an original name that maps back to it.
    for key in model.state_dict():
        fused = key.replace(".k_proj.", ".qkv.").replace(".v_proj.", ".qkv.").replace(".q_proj.", ".qkv.")
        name = convert.rename_key(fused if "vision_model.encoder" in key else key, to_hf=False)
        assert name is not None and convert.rename_key(name) is not None, key
    assert len(convert.KEY_RULES) == len({hf for _, hf in convert.KEY_RULES})  # the table is one-to-one
