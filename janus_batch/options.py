"""The options of the engine's tasks, declared once: sampling for synthesis and for captioning / VQA, and what the
scores ask (engine/scoring.py). The engine takes them, and the job specs, the Serve requests and the Ray stages
embed them, so a default or a bound lives here and nowhere else. Outside the engine package, which imports torch:
a job's driver and its CPU workers build and check them without loading torch or transformers.

Frozen pydantic models: validated wherever they are built (YAML, CLI flags, JSON bodies, Python), hashable (the
engine keeps decode state per batch shape and options; Serve groups requests by them).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

DEFAULT_CAPTION_INSTRUCTION = "Describe this image in detail."


class Options(BaseModel):
    # Errors name the field and the rule, not the value given, as the job specs' do; NaN and infinity are refused.
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True, allow_inf_nan=False)


# Seeds are 64-bit: the sampler keys its noise on all 64 bits, so a wider seed would repeat a narrower one's images.
Seed = Annotated[int, Field(ge=0, lt=2**64)]
# Below it, logits / temperature overflow float32 (sampling.sample): a colder draw is the greedy one anyway.
MIN_TEMPERATURE = 1e-3


def check_temperature(temperature: float) -> float:
    if 0 < temperature < MIN_TEMPERATURE:
        raise ValueError(f"must be 0 (greedy) or at least {MIN_TEMPERATURE:g}")
    return temperature


Temperature = Annotated[float, Field(ge=0), AfterValidator(check_temperature)]


class ImageSampling(Options):
    """Text-to-image synthesis with classifier-free guidance, as in DeepSeek's generation_inference.py."""

    images_per_prompt: int = Field(16, ge=1, le=1024)
    # Bounded so that the mixed logits stay finite in float32 (DeepSeek uses 5).
    cfg_weight: float = Field(5.0, ge=0, le=100, description="logits = uncond + cfg_weight * (cond - uncond)")
    temperature: Temperature = Field(1.0, description="0: greedy")
    top_k: int | None = Field(None, ge=1, description="None: off, as in DeepSeek's code")
    top_p: float | None = Field(None, gt=0, le=1, description="None: off, as in DeepSeek's code")
    seed: Seed = Field(0, description="with the prompt id and the image index, keys each image's random numbers")
    greedy: bool = Field(False, description="argmax at every step (temperature, top_k and top_p unused)")

    @property
    def effective_temperature(self) -> float:
        return 0.0 if self.greedy else self.temperature


class TextSampling(Options):
    """Captioning and VQA: greedy by default, as DeepSeek's inference.py decodes."""

    max_new_tokens: int = Field(128, ge=1)
    greedy: bool = True
    temperature: Temperature = Field(1.0, description="with greedy false; 0: greedy")
    seed: Seed = Field(0, description="with the row id, keys each row's random numbers (greedy false)")
    ignore_eos: bool = Field(False, description="make max_new_tokens tokens whatever EOS (benchmarks)")

    @property
    def effective_temperature(self) -> float:
        return 0.0 if self.greedy else self.temperature


PROMPT_FIELD = "{prompt}"  # in the alignment question


class ScoreOptions(Options):
    """What the scores ask and how they combine. The labels' tokens are checked against the model's tokenizer
    when a `Scorer` is built (see engine/scoring.py)."""

    alignment_question: str = Field(
        'Does this figure show "{prompt}"? Please answer yes or no.',
        description="{prompt} is replaced by the prompt (stripped); the score is P('Yes')",
    )
    aesthetic_question: str = Field(
        "Rate the aesthetic quality of this image from {low} to {high}. Answer with one number.",
        description="{low} and {high} are replaced by the scale's ends",
    )
    aesthetic_low: int = Field(1, ge=0, description="the scale's lowest rating")
    aesthetic_high: int = Field(9, ge=1, description="the scale's highest rating; every rating a single token")
    alignment_weight: float = Field(1.0, ge=0)
    aesthetic_weight: float = Field(1.0, ge=0, description="of the rating scaled to [0, 1]")

    @field_validator("alignment_question")
    @classmethod
    def one_prompt_field(cls, template: str) -> str:
        if template.count(PROMPT_FIELD) != 1:
            raise ValueError(f"must contain {PROMPT_FIELD} exactly once")
        return template

    @field_validator("aesthetic_question")
    @classmethod
    def not_empty(cls, question: str) -> str:
        if not question.strip():
            raise ValueError("empty question")
        return question

    @model_validator(mode="after")
    def valid_scale_and_weights(self) -> ScoreOptions:
        if self.aesthetic_low >= self.aesthetic_high:
            raise ValueError("aesthetic_low must be below aesthetic_high")
        if self.alignment_weight + self.aesthetic_weight == 0:
            raise ValueError("alignment_weight and aesthetic_weight are both 0: no combined score")
        return self

    def alignment_text(self, prompt: str) -> str:
        return self.alignment_question.replace(PROMPT_FIELD, prompt.strip())

    @property
    def aesthetic_text(self) -> str:
        return self.aesthetic_question.replace("{low}", str(self.aesthetic_low)).replace(
            "{high}", str(self.aesthetic_high)
        )

    @property
    def ratings(self) -> list[int]:
        return list(range(self.aesthetic_low, self.aesthetic_high + 1))

    def combined(self, alignment: float | None, aesthetic: float) -> float:
        scaled = (aesthetic - self.aesthetic_low) / (self.aesthetic_high - self.aesthetic_low)
        if alignment is None:
            return scaled
        total = self.alignment_weight + self.aesthetic_weight
        return (self.alignment_weight * alignment + self.aesthetic_weight * scaled) / total
