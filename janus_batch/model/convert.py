"""DeepSeek's original Janus checkpoints (config.json `model_type: "multi_modality"`) -> transformers' Janus.

deepseek-ai/Janus-Pro-7B, Janus-Pro-1B and Janus-1.3B ship DeepSeek's own module tree (a timm SigLIP ViT,
MlpProjector aligners, LlamaGen's VQ-16, a Llama LM) and config. `load_janus` converts them in memory on
every load; to convert once, to a Hugging Face-format directory that loads faster and anywhere:

    python -m janus_batch.model.convert SRC DST [--allow-pickle] [--dtype bfloat16]

SRC is any source load_janus accepts (directory, HF id, s3:// prefix). deepseek-ai/Janus-Pro-7B and -1B publish
pickle weights (pytorch_model*.bin): pass --allow-pickle if you trust them; DST gets safetensors, and the prompt
format SRC's name tells (`prompt_format` in DST's config.json: the name of DST may not tell it).

The config follows DeepSeek's semantics (janus/models/modeling_vlm.py): the language model is
`LlamaConfig(**language_config)` (of its keys, those that shape the model are kept: LLAMA_FIELDS), the generation
head's input width is `gen_head_config.params.n_embed`. What transformers' Janus cannot hold, or what does not
fit together, fails with a ModelLoadError that names the field.

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
from tokenizers import Tokenizer
from transformers import (
    GenerationConfig,
    JanusConfig,
    JanusForConditionalGeneration,
    JanusProcessor,
    LlamaConfig,
    PreTrainedTokenizerFast,
)

from janus_batch.model.checkpoint import (
    ORIGINAL_MODEL_TYPE,
    build_image_processor,
    check_loading_info,
    read_config,
    read_preprocessing,
    read_state_dict,
    resolve_dtype,
)
from janus_batch.model.sources import ModelLoadError, ModelNotFoundError, resolve_source, weight_files
from janus_batch.model.tokens import BOI, BOS, EOI, EOS, IMAGE, PAD, SPECIAL_TOKENS, prompt_format_of

# (DeepSeek prefix, transformers prefix); "#" is a layer number, copied across. The first match wins, so
# specific rules precede the general ones they overlap.
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

# Dims DeepSeek's code takes from the model name (janus/models/siglip_vit.py, vq_model.py).
SIGLIP_PRESETS = {
    "siglip_large_patch16_384": {"width": 1024, "layers": 24, "heads": 16, "patch_size": 16, "mlp_ratio": 4.0},
}
VQ_PRESETS = {"VQ-16": {"ch": 128, "ch_mult": [1, 1, 2, 2, 4], "z_channels": 256, "num_res_blocks": 2}}
# The language_config keys that shape the model, as LlamaConfig reads them; absent ones take its defaults (the
# published Janus-Pro-7B config lists only 5 keys: hidden 4096, 32 heads and FFN 11008 are defaults).
LLAMA_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
)


@functools.cache
def _prefix_pattern(prefix: str) -> re.Pattern:
    return re.compile(r"(\d+)".join(re.escape(part) for part in prefix.split("#")))


def rename_key(key: str) -> str | None:
    """`key` in transformers' names, or None if no rule matches."""
    for original, hf in KEY_RULES:
        match = _prefix_pattern(original).match(key)
        if match:
            return (hf.replace("#", match.group(1)) if match.groups() else hf) + key[match.end() :]
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


def janus_config_from_original(
    config: dict, *, image_token_id: int, bos_token_id: int, eos_token_id: int, pad_token_id: int
) -> JanusConfig:
    """transformers' JanusConfig for DeepSeek's config.json, read as DeepSeek's code reads it (janus/models:
    `LlamaConfig(**language_config)`, the named SigLIP and VQ dims, the MlpProjector and vision_head params).
    What transformers' Janus cannot hold, or what does not fit together, is a ModelLoadError naming the field."""
    try:
        language = config["language_config"]
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

    # DeepSeek passes language_config to LlamaConfig whole; of its keys, these shape the model (the rest, such
    # as use_cache or torch_dtype in re-saved copies, are settings of the run, not of the model).
    text = LlamaConfig(
        **{key: language[key] for key in LLAMA_FIELDS if key in language},
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,  # the original checkpoints store lm_head apart from the embeddings
    )
    hidden = text.hidden_size
    image_size = vit.get("image_size", 384)
    # transformers' Janus has one width where DeepSeek has two: the generation aligner's output and the
    # generation head's inner width are both its vq_config.projection_dim.
    try:
        expected = {
            "language_config.num_attention_heads": (hidden % text.num_attention_heads, 0, "a divisor of hidden_size"),
            "aligner_config.params.projector_type": (aligner.get("projector_type", "mlp_gelu"), "mlp_gelu", None),
            "aligner_config.params.depth": (aligner.get("depth", 2), 2, None),
            "aligner_config.params.input_dim": (
                aligner.get("input_dim", vit["width"]),
                vit["width"],
                "the vision width",
            ),
            "aligner_config.params.n_embed": (aligner["n_embed"], hidden, "the language model's hidden_size"),
            "gen_aligner_config.params.projector_type": (
                gen_aligner.get("projector_type", "mlp_gelu"),
                "mlp_gelu",
                None,
            ),
            "gen_aligner_config.params.depth": (gen_aligner.get("depth", 2), 2, None),
            "gen_aligner_config.params.input_dim": (
                gen_aligner.get("input_dim", vq["n_embed"]),
                vq["n_embed"],
                "n_embed of gen_vision_config",
            ),
            "gen_aligner_config.params.n_embed": (gen_aligner["n_embed"], hidden, "the language model's hidden_size"),
            "gen_head_config.params.n_embed": (gen_head["n_embed"], hidden, "the language model's hidden_size"),
            "gen_head_config.params.image_token_embed": (
                gen_head["image_token_embed"],
                gen_aligner["n_embed"],
                "gen_aligner_config's n_embed (transformers' Janus shares that width)",
            ),
            "gen_head_config.params.image_token_size": (
                gen_head["image_token_size"],
                vq["image_token_size"],
                "image_token_size of gen_vision_config",
            ),
            "vision_config.params.image_size": (image_size % vit["patch_size"], 0, "a multiple of the patch size"),
        }
    except KeyError as e:
        raise ModelLoadError(f"original Janus config.json lacks {e}") from e
    for field, (value, want, meaning) in expected.items():
        if value != want:
            what = f"{want!r}" + (f" ({meaning})" if meaning else "")
            raise ModelLoadError(f"original config.json: {field} must be {what}, not {value!r}")
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
            image_token_embed_dim=gen_head["n_embed"],  # the head's input width (DeepSeek's vision_head n_embed)
        ),
        image_token_id=image_token_id,
        tie_word_embeddings=False,
    )


def original_tokenizer(local_dir: Path) -> PreTrainedTokenizerFast:
    """DeepSeek's tokenizer.json with Janus' special tokens named, as transformers' JanusProcessor wants, and the
    additional special tokens of its special_tokens_map.json marked special (the chat roles, <|ref|>, ...), as
    DeepSeek's LlamaTokenizerFast.from_pretrained marks them: decoding with skip_special_tokens drops them."""
    tokenizer_file = local_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelNotFoundError(f"no tokenizer.json in {local_dir}")
    # Checked in the file itself: naming a token below would add any that is missing, with a new id.
    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab(with_added_tokens=True)
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ModelLoadError(f"{tokenizer_file} lacks Janus' special tokens {missing}")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer_file),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        padding_side="left",
        extra_special_tokens={"image_token": IMAGE, "boi_token": BOI, "eoi_token": EOI},
    )
    special_map = local_dir / "special_tokens_map.json"
    listed = json.loads(special_map.read_text()).get("additional_special_tokens", []) if special_map.is_file() else []
    # One missing from the vocabulary would get an id past the embeddings: the model could never make it.
    present = [t["content"] if isinstance(t, dict) else t for t in listed]
    tokenizer.add_special_tokens({"extra_special_tokens": [t for t in present if t in vocab]})
    return tokenizer


def original_processor(local_dir: Path, tokenizer: PreTrainedTokenizerFast, config: JanusConfig) -> JanusProcessor:
    """JanusProcessor with the PIL image processor, set up from DeepSeek's preprocessor_config.json."""
    image_processor = build_image_processor(read_preprocessing(local_dir), config.vision_config.image_size)
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
    try:
        model, info = JanusForConditionalGeneration.from_pretrained(
            None, config=config, state_dict=state_dict, dtype=dtype, output_loading_info=True
        )
    except RuntimeError as e:  # tensors of other shapes than config.json describes
        raise ModelLoadError(f"the weights in {local_dir} do not fit its config.json: {e}") from e
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
    files = weight_files(local_dir, allow_pickle, source)
    model, processor = load_original(local_dir, raw_config, files, torch_dtype)
    # Recorded, so the copy keeps the prompt format its source's name told (the copy's name may not).
    model.config.prompt_format = prompt_format_of(source, raw_config.get("prompt_format"))[0]
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
