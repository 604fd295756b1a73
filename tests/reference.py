"""The test oracles: DeepSeek's reference algorithms re-expressed on transformers' Janus submodules.

`reference_generate` follows DeepSeek's `generation_inference.py` step for step: one prompt, `parallel_size`
images, rows interleaved [cond, uncond, cond, uncond, ...], the unconditional row keeps its first and last
token and has pad in between, a DynamicCache through `language_model`, CFG on the generation head's logits,
softmax(logits / temperature) + multinomial (or argmax when greedy), then VQ decode and DeepSeek's uint8 cast.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


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
def first_step_distribution(
    model,
    input_ids: list[int],
    pad_id: int,
    cfg_weight: float,
    temperature: float,
    uncond_ids: list[int] | None = None,
):
    """The exact distribution of the first image token: softmax((uncond + w (cond - uncond)) / T).
    `uncond_ids` overrides the unconditional prompt (to model a wrong one)."""
    lm = model.model.language_model
    if uncond_ids is None:
        uncond_ids = [input_ids[0]] + [pad_id] * (len(input_ids) - 2) + [input_ids[-1]]
    hidden = [lm(input_ids=torch.tensor([ids])).last_hidden_state[0, -1] for ids in (input_ids, uncond_ids)]
    logits = model.model.generation_head(torch.stack(hidden)).double()
    mixed = logits[1] + cfg_weight * (logits[0] - logits[1])
    return torch.softmax(mixed / temperature, dim=-1).numpy()


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
