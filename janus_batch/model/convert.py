"""DeepSeek's original Janus checkpoints (config.json `model_type: "multi_modality"`) -> transformers' Janus.

deepseek-ai/Janus-Pro-7B, Janus-Pro-1B and Janus-1.3B ship DeepSeek's own module tree (a timm SigLIP ViT,
MlpProjector aligners, LlamaGen's VQ-16, a Llama LM) and config. `load_janus` converts them in memory on
every load; to convert once, to a Hugging Face-format directory that loads faster and anywhere:

    python -m janus_batch.model.convert SRC DST [--allow-pickle] [--dtype bfloat16]

SRC is any source load_janus accepts (directory, HF id, s3:// prefix). deepseek-ai's published weights are
pickle files (pytorch_model*.bin): pass --allow-pickle if you trust them; DST gets safetensors.

The key mapping follows DeepSeek's module names (janus/models in deepseek-ai/Janus) and transformers'
conversion script: the ViT's fused `attn.qkv` is split into q/k/v, its `pos_embed` loses the batch axis, the
unused attention-pool head and the VQ codebook-usage counter are dropped. The architecture dims of the
vision tower and the VQ model are not in the original config.json: DeepSeek's code looks them up by name
(`siglip_large_patch16_384`, `VQ-16`), and so does this module. Our extension: the `params` of
`vision_config` (width, layers, heads, patch_size, mlp_ratio) and of `gen_vision_config` (ch, ch_mult,
z_channels, num_res_blocks) may override those named dims; the tiny test checkpoints use it.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
from pathlib import Path

import torch
from transformers import (
    GenerationConfig,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusImageProcessorPil,
    JanusProcessor,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from janus_batch.model.loading import (
    ORIGINAL_MODEL_TYPE,
    ModelLoadError,
    ModelNotFoundError,
    check_loading_info,
    read_config,
    read_state_dict,
    resolve_dtype,
    resolve_source,
    weight_files,
)
from janus_batch.model.tiny import BOI, BOS, EOI, EOS, IMAGE, PAD

# (DeepSeek prefix, transformers prefix); "#" is a layer number, copied across. The first match wins, so
# specific rules precede the general ones they overlap. The same table converts both ways.
KEY_RULES = [
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    # SigLIP-L/16 as a timm VisionTransformer
    ("vision_model.vision_tower.patch_embed.proj.", "model.vision_model.embeddings.patch_embedding."),
    ("vision_model.vision_tower.pos_embed", "model.vision_model.embeddings.position_embedding.weight"),
    ("vision_model.vision_tower.blocks.#.norm1.", "model.vision_model.encoder.layers.#.layer_norm1."),
    ("vision_model.vision_tower.blocks.#.norm2.", "model.vision_model.encoder.layers.#.layer_norm2."),
    ("vision_model.vision_tower.blocks.#.attn.qkv.", "model.vision_model.encoder.layers.#.self_attn.qkv."),
    (
        "vision_model.vision_tower.blocks.#.attn.proj.",
        "model.vision_model.encoder.layers.#.self_attn.projection_layer.",
    ),
    ("vision_model.vision_tower.blocks.#.mlp.", "model.vision_model.encoder.layers.#.mlp."),
    ("vision_model.vision_tower.norm.", "model.vision_model.post_layernorm."),
    # MlpProjector "mlp_gelu" of depth 2: Sequential(Linear, GELU, Linear)
    ("aligner.layers.0.", "model.aligner.fc1."),
    ("aligner.layers.2.", "model.aligner.hidden_layers.0."),
    ("gen_aligner.layers.0.", "model.generation_aligner.fc1."),
    ("gen_aligner.layers.2.", "model.generation_aligner.hidden_layers.0."),
    ("gen_head.output_mlp_projector.", "model.generation_head.proj_out."),
    ("gen_head.vision_head.", "model.generation_head.vision_head."),
    ("gen_embed.", "model.generation_embeddings."),
    # VQ-16: conv_blocks[i].res / .attn / .downsample|.upsample, mid = [res, attn, res]
    ("gen_vision_model.encoder.conv_blocks.#.res.", "model.vqmodel.encoder.down.#.block."),
    ("gen_vision_model.encoder.conv_blocks.", "model.vqmodel.encoder.down."),
    ("gen_vision_model.decoder.conv_blocks.#.res.", "model.vqmodel.decoder.up.#.block."),
    ("gen_vision_model.decoder.conv_blocks.", "model.vqmodel.decoder.up."),
    ("gen_vision_model.encoder.mid.0.", "model.vqmodel.encoder.mid.block_1."),
    ("gen_vision_model.encoder.mid.1.", "model.vqmodel.encoder.mid.attn_1."),
    ("gen_vision_model.encoder.mid.2.", "model.vqmodel.encoder.mid.block_2."),
    ("gen_vision_model.decoder.mid.0.", "model.vqmodel.decoder.mid.block_1."),
    ("gen_vision_model.decoder.mid.1.", "model.vqmodel.decoder.mid.attn_1."),
    ("gen_vision_model.decoder.mid.2.", "model.vqmodel.decoder.mid.block_2."),
    ("gen_vision_model.", "model.vqmodel."),
]
# In the original checkpoints but not used by Janus: SigLIP's pooling head, VQ training statistics, and
# the rotary tables that old transformers versions saved.
DROPPED = re.compile(
    r"^vision_model\.vision_tower\.attn_pool\.|^gen_vision_model\.quantize\.codebook_used$|\.rotary_emb\.inv_freq$"
)
POSITION_EMBEDDING = "model.vision_model.embeddings.position_embedding.weight"
_VISION_QKV = re.compile(r"^model\.vision_model\.encoder\.layers\.\d+\.self_attn\.([qkv])_proj\.")

# Dims DeepSeek's code takes from the model name (janus/models/siglip_vit.py, vq_model.py).
SIGLIP_PRESETS = {
    "siglip_large_patch16_384": {"width": 1024, "layers": 24, "heads": 16, "patch_size": 16, "mlp_ratio": 4.0},
}
VQ_PRESETS = {"VQ-16": {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "z_channels": 256, "num_res_blocks": 2}}


@functools.cache
def _prefix_pattern(prefix: str) -> re.Pattern:
    return re.compile(r"(\d+)".join(re.escape(part) for part in prefix.split("#")))


def rename_key(key: str, to_hf: bool = True) -> str | None:
    """`key` in the other format, or None if no rule matches."""
    for original, hf in KEY_RULES:
        src, dst = (original, hf) if to_hf else (hf, original)
        match = _prefix_pattern(src).match(key)
        if match:
            return (dst.replace("#", match.group(1)) if match.groups() else dst) + key[match.end() :]
    return None


def hf_state_dict_from_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    converted, unknown = {}, []
    for key, tensor in state_dict.items():
        if DROPPED.search(key):
            continue
        new = rename_key(key)
        if new is None:
            unknown.append(key)
        elif ".self_attn.qkv." in new:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3), strict=True):
                converted[new.replace(".qkv.", f".{name}.")] = part
        elif new == POSITION_EMBEDDING:
            converted[new] = tensor.squeeze(0)  # timm keeps a batch axis: (1, patches, width)
        else:
            converted[new] = tensor
    if unknown:
        raise ModelLoadError(
            f"{len(unknown)} tensors of the original checkpoint have no Janus counterpart, e.g. {unknown[:5]}"
        )
    return converted


def original_state_dict_from_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of hf_state_dict_from_original (without the dropped tensors); tests use it to build
    original-format checkpoints from the tiny model."""
    original = {}
    for key, tensor in state_dict.items():
        qkv = _VISION_QKV.match(key)
        if qkv and qkv.group(1) != "q":
            continue  # fused with q below
        if qkv:
            tensor = torch.cat([state_dict[key.replace(".q_proj.", f".{p}_proj.")] for p in "qkv"])
            key = key.replace(".q_proj.", ".qkv.")
        elif key == POSITION_EMBEDDING:
            tensor = tensor.unsqueeze(0)
        name = rename_key(key, to_hf=False)
        if name is None:
            raise ValueError(f"no original name for {key}")
        original[name] = tensor
    return original


def janus_config_from_original(
    config: dict, *, image_token_id: int, bos_token_id: int, eos_token_id: int, pad_token_id: int
) -> JanusConfig:
    try:
        language = dict(config["language_config"])
        vision, aligner = config["vision_config"], config["aligner_config"]["params"]
        gen_vision, gen_aligner = config["gen_vision_config"], config["gen_aligner_config"]["params"]
        gen_head = config["gen_head_config"]["params"]
    except (KeyError, TypeError) as e:
        raise ModelLoadError(f"original Janus config.json lacks {e}") from e

    vision_params = vision.get("params", {})
    name = vision_params.get("model_name")
    if vision.get("cls") != "CLIPVisionTower" or name not in SIGLIP_PRESETS:
        raise ModelLoadError(
            f"unsupported vision tower {vision.get('cls')!r} / {name!r}: Janus checkpoints use CLIPVisionTower "
            f"with one of {sorted(SIGLIP_PRESETS)}"
        )
    vit = {**SIGLIP_PRESETS[name], **vision_params}
    select = vit.get("select_layer", -1)  # DeepSeek builds only the blocks up to the selected layer
    layers = vit["layers"] + select + 1 if select <= 0 else min(vit["layers"], select)
    vq_name = gen_vision.get("cls")
    if vq_name not in VQ_PRESETS:
        raise ModelLoadError(f"unsupported image tokenizer {vq_name!r}: expected one of {sorted(VQ_PRESETS)}")
    vq = {**VQ_PRESETS[vq_name], **gen_vision.get("params", {})}
    for section, params in (("aligner_config", aligner), ("gen_aligner_config", gen_aligner)):
        if params.get("projector_type", "mlp_gelu") != "mlp_gelu":
            raise ModelLoadError(f"unsupported {section} projector {params['projector_type']!r}: expected 'mlp_gelu'")

    for key in ("model_type", "torch_dtype", "dtype"):
        language.pop(key, None)
    text = LlamaConfig(
        **{
            **language,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "pad_token_id": pad_token_id,
            "tie_word_embeddings": False,  # the original checkpoints store lm_head separately
        }
    )
    image_size = vit.get("image_size", 384)
    return JanusConfig(
        text_config=text.to_dict(),
        vision_config=dict(
            hidden_size=vit["width"],
            num_hidden_layers=layers,
            num_attention_heads=vit["heads"],
            image_size=image_size,
            patch_size=vit["patch_size"],
            mlp_ratio=float(vit["mlp_ratio"]),
            projection_dim=aligner["n_embed"],
            depth=aligner.get("depth", 2),
            num_image_tokens=(image_size // vit["patch_size"]) ** 2,
        ),
        vq_config=dict(
            embed_dim=vq["n_embed"],
            num_embeddings=vq["image_token_size"],
            latent_channels=vq["z_channels"],
            base_channels=vq["ch"],
            channel_multiplier=list(vq["ch_mult"]),
            num_res_blocks=vq["num_res_blocks"],
            projection_dim=gen_aligner["n_embed"],
            num_hidden_layers=gen_aligner.get("depth", 2),
            image_token_embed_dim=gen_head["image_token_embed"],
        ),
        image_token_id=image_token_id,
        tie_word_embeddings=False,
    )


def original_tokenizer(local_dir: Path) -> PreTrainedTokenizerFast:
    """DeepSeek's tokenizer.json with Janus' special tokens named, as transformers' JanusProcessor wants."""
    tokenizer_file = local_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelNotFoundError(f"no tokenizer.json in {local_dir}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI},
    )
    missing = [t for t in (BOS, EOS, PAD, IMAGE, BOI, EOI) if t not in tokenizer.get_vocab()]
    if missing:
        raise ModelLoadError(f"{tokenizer_file} lacks Janus' special tokens {missing}")
    return tokenizer


def original_processor(local_dir: Path, tokenizer: PreTrainedTokenizerFast, config: JanusConfig) -> JanusProcessor:
    """JanusProcessor with the PIL image processor, set up from DeepSeek's preprocessor_config.json."""
    preprocessor_file = local_dir / "preprocessor_config.json"
    settings = json.loads(preprocessor_file.read_text()) if preprocessor_file.is_file() else {}
    size = config.vision_config.image_size
    image_processor = JanusImageProcessorPil(
        size={"height": size, "width": size},
        image_mean=settings.get("image_mean", [0.5] * 3),
        image_std=settings.get("image_std", [0.5] * 3),
        min_size=settings.get("min_size", 14),
        background_color=tuple(settings.get("background_color", (127, 127, 127))),
    )
    return JanusProcessor(
        image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=config.vision_config.num_image_tokens
    )


def load_original(
    local_dir: Path, raw_config: dict, files: list[Path], dtype: torch.dtype | str
) -> tuple[JanusForConditionalGeneration, JanusProcessor]:
    """Model and processor from an original-format directory: its config.json, its weight files. `dtype`
    may be "auto": the checkpoint's own."""
    tokenizer = original_tokenizer(local_dir)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (BOS, EOS, PAD, IMAGE, BOI)}
    config = janus_config_from_original(
        raw_config, image_token_id=ids[IMAGE], bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD]
    )
    state_dict = hf_state_dict_from_original(read_state_dict(files))
    model, info = JanusForConditionalGeneration.from_pretrained(
        None, config=config, state_dict=state_dict, dtype=dtype, output_loading_info=True
    )
    check_loading_info(info, local_dir)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        generation_kwargs={"boi_token_id": ids[BOI]},
        _from_model_config=False,  # else the custom keys vanish on save / reload
    )
    return model.eval(), original_processor(local_dir, tokenizer, config)


def convert(source: str, out_dir: str | Path, *, allow_pickle: bool = False, dtype: str = "auto") -> Path:
    """Write `source` (original format) as a Hugging Face-format checkpoint (safetensors) to `out_dir`."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    local_dir = resolve_source(source, allow_pickle=allow_pickle)
    raw_config = read_config(local_dir)
    if raw_config["model_type"] != ORIGINAL_MODEL_TYPE:
        raise ModelLoadError(f"{source} is already in Hugging Face format (model_type {raw_config['model_type']!r})")
    torch_dtype = dtype if dtype == "auto" else resolve_dtype(dtype, torch.device("cpu"))
    model, processor = load_original(local_dir, raw_config, weight_files(local_dir, allow_pickle), torch_dtype)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert an original DeepSeek Janus checkpoint to HF format.")
    parser.add_argument("source", help="original checkpoint: directory, HF id (deepseek-ai/Janus-Pro-7B), s3:// prefix")
    parser.add_argument("out_dir", help="new directory for the Hugging Face-format checkpoint")
    parser.add_argument("--allow-pickle", action="store_true", help="read pickle (.bin) weights; only if trusted")
    parser.add_argument("--dtype", default="auto", help="bfloat16, float16, float32 or auto (as stored)")
    args = parser.parse_args(argv)
    print(convert(args.source, args.out_dir, allow_pickle=args.allow_pickle, dtype=args.dtype))


if __name__ == "__main__":
    main()
