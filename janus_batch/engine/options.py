"""The sampling options of the engine's two tasks, declared once: the engine takes them, and the job specs, the
Serve requests and the Ray stages embed them, so a default or a bound lives here and nowhere else.

Frozen pydantic models: validated wherever they are built (YAML, CLI flags, JSON bodies, Python), hashable (the
engine keeps decode state per batch shape and options; Serve groups requests by them).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_CAPTION_INSTRUCTION = "Describe this image in detail."


class Options(BaseModel):
    # Errors name the field and the rule, not the value given, as the job specs' do; NaN and infinity are refused.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True, allow_inf_nan=False)


class ImageSampling(Options):
    """Text-to-image synthesis with classifier-free guidance, as in DeepSeek's generation_inference.py."""

    images_per_prompt: int = Field(16, ge=1, le=1024)
    cfg_weight: float = Field(5.0, description="logits = uncond + cfg_weight * (cond - uncond)")
    temperature: float = Field(1.0, ge=0, description="0: greedy")
    top_k: int | None = Field(None, ge=1, description="None: off, as in DeepSeek's code")
    top_p: float | None = Field(None, gt=0, le=1, description="None: off, as in DeepSeek's code")
    seed: int = Field(0, description="with the prompt id and the image index, keys each image's random numbers")
    greedy: bool = Field(False, description="argmax at every step (temperature, top_k and top_p unused)")

    @property
    def effective_temperature(self) -> float:
        return 0.0 if self.greedy else self.temperature


class TextSampling(Options):
    """Captioning and VQA: greedy by default, as DeepSeek's inference.py decodes."""

    max_new_tokens: int = Field(128, ge=1)
    greedy: bool = True
    temperature: float = Field(1.0, ge=0, description="with greedy false; 0: greedy")
    seed: int = Field(0, description="with the row id, keys each row's random numbers (greedy false)")
    ignore_eos: bool = Field(False, description="make max_new_tokens tokens whatever EOS (benchmarks)")

    @property
    def effective_temperature(self) -> float:
        return 0.0 if self.greedy else self.temperature
