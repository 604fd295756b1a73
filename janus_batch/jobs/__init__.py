"""Batch jobs: pydantic specs, `build_pipeline(spec) -> ray.data.Dataset` and `run(spec) -> summary`."""

from janus_batch.jobs.pipeline import RunIncomplete, build_pipeline, describe_plan, run
from janus_batch.jobs.specs import (
    CaptionJob,
    ImageInput,
    JobSpec,
    LeaseSpec,
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
    "LeaseSpec",
    "ModelSpec",
    "OutputSpec",
    "PromptInput",
    "ResourceSpec",
    "RunIncomplete",
    "SynthesizeJob",
    "build_pipeline",
    "describe_plan",
    "run",
]
