"""The test oracles: DeepSeek's reference algorithms re-expressed on transformers' Janus submodules.

`reference_generate` follows DeepSeek's `generation_inference.py` step for step: one prompt, `parallel_size`
images, rows interleaved [cond, uncond, cond, uncond, ...], the unconditional row keeps its first and last
token and has pad in between, a DynamicCache through `language_model`, CFG on the generation head's logits,
softmax(logits / temperature) + multinomial (or argmax when greedy), then VQ decode and DeepSeek's uint8 cast.

The prompts are built here from DeepSeek's own rules (janus/models/processing_vlm.py, janus/utils/conversation.py
and the scripts' role names), not with the engine's helpers, and the pad token is looked up by name as
VLChatProcessor.pad_id does. `reference_pixels` is DeepSeek's VLMImageProcessor (image_processing_vlm.py).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import chi2_contingency, chisquare

# The role names DeepSeek's scripts put in the conversation: Janus-Pro's (demo/app_januspro.py) and Janus-1.3B's
# (inference.py, generation_inference.py, demo/app.py).
ROLES = {"janus-pro": ("<|User|>", "<|Assistant|>"), "janus-1.3b": ("User", "Assistant")}
# VLChatProcessor's tags and its system prompt.
IMAGE_TAG, IMAGE_START_TAG, IMAGE_END_TAG = "<image_placeholder>", "<begin_of_image>", "<end_of_image>"
PAD_TAG = "<\uff5c\u2581pad\u2581\uff5c>"
SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language."
)


def sft_prompt(conversation: list[tuple[str, str]], system_prompt: str) -> str:
    """apply_sft_template_for_multi_turn_prompts with the "deepseek" template (SeparatorStyle.DeepSeek): every
    message's content stripped; the system prompt, if any, then seps[0]; "role: content" then seps[i % 2], or
    "role:" for an empty message; the whole prompt stripped."""
    seps = ["\n\n", "<\uff5cend\u2581of\u2581sentence\uff5c>"]
    text = system_prompt + seps[0] if system_prompt else ""
    for i, (role, content) in enumerate(conversation):
        content = content.strip()
        text += f"{role}: {content}{seps[i % 2]}" if content else f"{role}:"
    return text.strip()


def pad_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(PAD_TAG)


def generation_ids(tokenizer, prompt: str, prompt_format: str = "janus-pro") -> list[int]:
    """generation_inference.py: the conversation with system_prompt="", then image_start_tag, encoded (BOS first)."""
    user, assistant = ROLES[prompt_format]
    text = sft_prompt([(user, prompt), (assistant, "")], "") + IMAGE_START_TAG
    return tokenizer.encode(text)


def understanding_ids(
    tokenizer,
    question: str,
    num_image_tokens: int,
    prompt_format: str = "janus-pro",
    system_prompt: str = SYSTEM_PROMPT,
) -> list[int]:
    """inference.py: the message "<image_placeholder>\\n{question}" through VLChatProcessor.process_one: the template
    with the system prompt, encoded, then each image tag id replaced by begin, num_image_tokens tags and end."""
    user, assistant = ROLES[prompt_format]
    text = sft_prompt([(user, f"{IMAGE_TAG}\n{question}"), (assistant, "")], system_prompt)
    image, start, end = (tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_TAG, IMAGE_START_TAG, IMAGE_END_TAG))
    ids = []
    for token in tokenizer.encode(text):
        ids += [start] + [image] * num_image_tokens + [end] if token == image else [token]
    return ids


def reference_pixels(image: Image.Image, image_size: int, settings: dict) -> np.ndarray:
    """VLMImageProcessor.preprocess of one RGB image, float32 [3, S, S]. `settings`: its preprocessor_config.json
    keys (image_mean, image_std, rescale_factor, do_normalize, min_size)."""
    width, height = image.size
    max_size = max(width, height)
    size = [
        max(int(height / max_size * image_size), settings["min_size"]),
        max(int(width / max_size * image_size), settings["min_size"]),
    ]
    # torchvision's resize of a PIL image is PIL's resize (bicubic).
    image = image.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    background = tuple(int(x * 255) for x in settings["image_mean"])  # DeepSeek's __init__ derives it so
    width, height = image.size
    if width != height:  # expand2square
        side = max(width, height)
        square = Image.new(image.mode, (side, side), background)
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        image = square
    x = np.asarray(image).transpose(2, 0, 1)
    x = (x.astype(np.float64) * settings["rescale_factor"]).astype(np.float32)  # transformers' rescale
    if settings["do_normalize"]:
        mean = np.array(settings["image_mean"], dtype=np.float32)
        std = np.array(settings["image_std"], dtype=np.float32)
        x = ((x.T - mean) / std).T  # transformers' normalize, channels first
    return x


@torch.inference_mode()
def reference_generate(
    model,
    input_ids: list[int],
    pad_id: int,
    parallel_size: int,
    cfg_weight: float,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
    steps: int | None = None,
) -> tuple[torch.Tensor, np.ndarray | None]:
    """Returns (tokens [parallel_size, steps], uint8 images [parallel_size, H, W, 3]).
    The images are None when `steps` stops before the last token."""
    lm = model.model.language_model
    grid = model.config.vq_config.num_patches
    n_tokens = grid * grid
    steps = steps or n_tokens

    device = lm.get_input_embeddings().weight.device
    tokens = torch.zeros((parallel_size * 2, len(input_ids)), dtype=torch.long, device=device)
    for i in range(parallel_size * 2):
        tokens[i, :] = torch.tensor(input_ids)
        if i % 2 != 0:
            tokens[i, 1:-1] = pad_id
    inputs_embeds = lm.get_input_embeddings()(tokens)

    generated = torch.zeros((parallel_size, steps), dtype=torch.long, device=device)
    past = None
    for i in range(steps):
        outputs = lm(inputs_embeds=inputs_embeds, use_cache=True, past_key_values=past)
        past = outputs.past_key_values
        logits = model.model.generation_head(outputs.last_hidden_state[:, -1, :])
        logit_cond = logits[0::2, :]
        logit_uncond = logits[1::2, :]
        logits = logit_uncond + cfg_weight * (logit_cond - logit_uncond)
        if greedy:
            next_token = torch.argmax(logits, dim=-1, keepdim=True)
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_token = torch.multinomial(probs, num_samples=1, generator=generator)
        generated[:, i] = next_token.squeeze(dim=-1)
        next_token = torch.cat([next_token.unsqueeze(dim=1), next_token.unsqueeze(dim=1)], dim=1).view(-1)
        inputs_embeds = model.prepare_embeddings_for_image_generation(next_token).unsqueeze(dim=1)

    if steps != n_tokens:
        return generated.cpu(), None
    dec = model.model.vqmodel.decode(generated)
    dec = dec.to(torch.float32).cpu().numpy().transpose(0, 2, 3, 1)
    dec = np.clip((dec + 1) / 2 * 255, 0, 255)
    visual_img = np.zeros((parallel_size, dec.shape[1], dec.shape[2], 3), dtype=np.uint8)
    visual_img[:, :, :] = dec
    return generated.cpu(), visual_img


@torch.inference_mode()
def first_step_logits(
    model, input_ids: list[int], pad_id: int, cfg_weight: float, uncond_ids: list[int] | None = None
) -> torch.Tensor:
    """The CFG logits of the first image token, float64: uncond + w (cond - uncond), from an fp32 copy of the
    model's forward. `uncond_ids` overrides the unconditional prompt (to model a wrong one)."""
    lm = model.model.language_model
    if uncond_ids is None:
        uncond_ids = [input_ids[0]] + [pad_id] * (len(input_ids) - 2) + [input_ids[-1]]
    hidden = [lm(input_ids=torch.tensor([ids])).last_hidden_state[0, -1] for ids in (input_ids, uncond_ids)]
    logits = model.model.generation_head(torch.stack(hidden)).double()
    return logits[1] + cfg_weight * (logits[0] - logits[1])


def first_step_distribution(
    model,
    input_ids: list[int],
    pad_id: int,
    cfg_weight: float,
    temperature: float,
    uncond_ids: list[int] | None = None,
) -> np.ndarray:
    """The exact distribution of the first image token: softmax((uncond + w (cond - uncond)) / T)."""
    mixed = first_step_logits(model, input_ids, pad_id, cfg_weight, uncond_ids)
    return torch.softmax(mixed / temperature, dim=-1).numpy()


def truncated(probs: np.ndarray, top_k: int | None = None, top_p: float | None = None) -> np.ndarray:
    """`probs` restricted to its top_k most likely tokens, then to the nucleus: the most likely tokens until
    their mass reaches top_p (the token that crosses it included), renormalised."""
    order = np.argsort(-probs, kind="stable")
    keep = np.zeros(len(probs), dtype=bool)
    keep[order[: top_k or len(probs)]] = True
    kept = np.where(keep, probs, 0.0) / probs[keep].sum()
    if top_p is not None:
        before = np.cumsum(kept[order]) - kept[order]  # mass of the tokens ranked above each one
        keep[order[before >= top_p]] = False
        kept = np.where(keep, probs, 0.0) / probs[keep].sum()
    return kept


def gof_pvalue(samples: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square goodness of fit of token ids to `probs`; bins with expected count < 5 are pooled into one."""
    counts = np.bincount(samples, minlength=len(probs))
    expected = probs * len(samples)
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:  # nothing to pool: a sample there has probability 0
        obs, exp = (obs[:-1], exp[:-1]) if obs[-1] == 0 else (obs, exp + 1e-12)
    return float(chisquare(obs, exp * obs.sum() / exp.sum()).pvalue)


def two_sample_pvalue(a: np.ndarray, b: np.ndarray) -> float:
    """Chi-square test that two samples of token ids come from one distribution (rare ids pooled)."""
    size = max(a.max(), b.max()) + 1
    ca, cb = np.bincount(a, minlength=size), np.bincount(b, minlength=size)
    big = (ca + cb) >= 10
    table = np.array([np.append(ca[big], ca[~big].sum()), np.append(cb[big], cb[~big].sum())])
    table = table[:, table.sum(0) > 0]
    return float(chi2_contingency(table).pvalue)


def reference_attention(q, k, v, attn_mask, scale, enable_gqa):
    """A stand-in for the engine's attention call (`decoder.F.scaled_dot_product_attention`) that makes the call
    transformers makes for an unpadded batch, as in the reference loop: exactly the filled keys, no mask in
    decode, is_causal in prefill. The engine itself reads 64-slot buckets of its cache under a mask. It reads the
    mask on the host: eager runs only, no CUDA graphs."""
    filled = int(attn_mask[:, 0, -1].any(0).nonzero().max()) + 1
    causal = torch.ones(q.shape[2], filled, dtype=torch.bool, device=q.device).tril(filled - q.shape[2])
    assert (attn_mask[..., :filled] == causal).all()  # an unpadded batch: the mask only hides future slots
    k, v = k[:, :, :filled], v[:, :, :filled]
    return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale, enable_gqa=enable_gqa)
