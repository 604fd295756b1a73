"""DeepSeek's prompts: its conversation template as its processor applies it, per model family.

The special-token names come from the model layer; the roles and the system prompt are DeepSeek's own.
"""

from __future__ import annotations

import logging

from janus_batch.model.tokens import BOI, DEFAULT_PROMPT_FORMAT, EOI, IMAGE, prompt_format_of

# The chat roles of DeepSeek's conversation template per model family, as DeepSeek's own scripts pass them:
# Janus-Pro's (demo/app_januspro.py, its README) and Janus-1.3B's (inference.py, generation_inference.py, demo/app.py).
PROMPT_ROLES = {"janus-pro": ("<|User|>", "<|Assistant|>"), "janus-1.3b": ("User", "Assistant")}
# DeepSeek's VLChatProcessor system prompt, used for understanding (not for image generation).
DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)
log = logging.getLogger(__name__)


def chat_prompt(message: str, roles: tuple[str, str], system_prompt: str) -> str:
    """DeepSeek's conversation template (janus/utils/conversation.py, "deepseek") as its processor applies it to
    one user message and an open assistant turn: the message stripped, the system prompt (if any) and the message
    each followed by a blank line, the whole prompt stripped."""
    user, assistant = roles
    system = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{system}{user}: {message.strip()}\n\n{assistant}:".strip()


def generation_prompt(prompt: str, prompt_format: str = DEFAULT_PROMPT_FORMAT) -> str:
    """DeepSeek's generation prompt: the template with an empty system prompt, then <begin_of_image>."""
    return chat_prompt(prompt, PROMPT_ROLES[prompt_format], "") + BOI


def understanding_prompt(
    question: str, num_image_tokens: int, system_prompt: str, prompt_format: str = DEFAULT_PROMPT_FORMAT
) -> str:
    """DeepSeek's understanding prompt: the user message is the image, a newline and the question (so stripping it
    strips the question's end), and the image's placeholder becomes <begin_of_image>, `num_image_tokens`
    placeholders and <end_of_image> (VLChatProcessor.add_image_token)."""
    image = BOI + IMAGE * num_image_tokens + EOI
    return chat_prompt(f"{image}\n{question}", PROMPT_ROLES[prompt_format], system_prompt)


def resolve_prompt_format(prompt_format: str, model_id: str, recorded: str | None) -> str:
    """The chat roles to use: `prompt_format` as asked, or for "auto" as the checkpoint tells (the format its config
    records, else its name: `prompt_format_of`). Logged once, with the reason."""
    if prompt_format == "auto":
        prompt_format, why = prompt_format_of(model_id, recorded)
    elif prompt_format in PROMPT_ROLES:
        why = "as asked"
    else:
        raise ValueError(f"prompt_format must be 'auto' or one of {sorted(PROMPT_ROLES)}, got {prompt_format!r}")
    log.info("%s: prompt format %s (%s)", model_id or "model", prompt_format, why)
    return prompt_format


def reserved_tokens(tokenizer, prompt_format: str) -> list[str]:
    """The special tokens the prompts and the CFG rows are built of: in a user's text they would change the template
    (a second image placeholder, say, has no image to take), so text holding one is refused."""
    added = tokenizer.get_added_vocab()
    template = (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token, IMAGE, BOI, EOI)
    return [t for t in (*template, *PROMPT_ROLES[prompt_format]) if t in added]


def text_error(
    what: str, text: str, reserved: list[str], length: int, context: int, new_tokens: str, count: int
) -> str | None:
    """Why `text` (a prompt or a question, `length` tokens in its template) cannot be used, or None: empty once
    stripped, holding a `reserved` token, or too long for the model's `context` with `count` `new_tokens` after."""
    if not text.strip():
        return f"empty {what}"
    if (token := next((t for t in reserved if t in text), None)) is not None:
        return f"{what} contains {token!r}, a special token of the prompt template"
    if length + count > context:
        return (
            f"{what} too long: {length} prompt tokens + {count} {new_tokens} exceeds the model's context of "
            f"{context} positions"
        )
    return None
