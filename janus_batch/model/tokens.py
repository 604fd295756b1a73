"""Janus' special tokens, as its tokenizer names them (DeepSeek's tokenizer.json and transformers' JanusProcessor):
the converter names them in DeepSeek's tokenizer, the engine builds prompts with them, the tiny model trains them.
And the prompt formats: Janus-Pro and Janus-1.3B name the chat roles differently (the engine holds the roles);
`prompt_format_of` tells a checkpoint's format from what it records (`prompt_format` in config.json, written by the
converter) or else from its name: Janus-1.3B's config.json is identical to Janus-Pro-1B's, so nothing else tells
them apart. Without torch: a job's driver tells the format before any model loads.
"""

import re

from janus_batch.model.sources import ModelLoadError

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE = "<image_placeholder>"
BOI = "<begin_of_image>"
EOI = "<end_of_image>"
SPECIAL_TOKENS = (BOS, EOS, PAD, IMAGE, BOI, EOI)

# Chat-role conventions (the engine holds the roles): Janus-Pro's, and Janus-1.3B's.
PROMPT_FORMATS = ("janus-pro", "janus-1.3b")
DEFAULT_PROMPT_FORMAT = "janus-pro"


def prompt_format_of(name: str, recorded: str | None = None) -> tuple[str, str]:
    """(prompt format, how it was told) of the checkpoint `name` (an HF id, directory or s3:// prefix):
    `recorded` (config.json's `prompt_format`) if set, else from the last part of the name that names a Janus
    model, `_` read as `-`: Janus-1.3B's when it says Janus-1.3B (deepseek-ai/Janus-1.3B, /models/janus_1.3b,
    /models/Janus-1.3B/original, the HF cache's models--deepseek-ai--Janus-1.3B/snapshots/HASH), else Janus-Pro's."""
    if recorded is not None:
        if recorded not in PROMPT_FORMATS:
            raise ModelLoadError(f"config.json has prompt_format {recorded!r}; expected one of {PROMPT_FORMATS}")
        return recorded, "recorded in config.json"
    # Later parts may be a revision or a subfolder (snapshots/HASH, original/), so the nearest part naming a model
    # decides; "--" separates the parts of an HF cache folder's name.
    for part in reversed(re.split(r"/|--", name.lower().replace("_", "-"))):
        if "janus-1.3b" in part:
            return "janus-1.3b", f"the name {name!r} says Janus-1.3B"
        if "janus-pro" in part:
            break
    return DEFAULT_PROMPT_FORMAT, "the default: the name does not say Janus-1.3B"
