"""Batch jobs: pydantic specs, `build_pipeline(spec) -> ray.data.Dataset` and `run(spec) -> summary`."""

from janus_batch.jobs.pipeline import build_pipeline, describe_plan, run
from janus_batch.jobs.specs import (
    CaptionJob,
    ImageInput,
    JobSpec,
    ModelSpec,
    OutputSpec,
    PromptInput,
    ResourceSpec,
    SynthesizeJob,
)

__all__ = [
    "CaptionJob",
    "ImageInput",
    "JobSpec",
    "ModelSpec",
    "OutputSpec",
    "PromptInput",
    "ResourceSpec",
    "SynthesizeJob",
    "build_pipeline",
    "describe_plan",
    "run",
]
