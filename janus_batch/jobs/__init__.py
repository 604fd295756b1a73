"""Batch jobs: pydantic specs, `build_pipeline(spec) -> ray.data.Dataset` and `run(spec) -> summary`.

Each job kind (synthesize.py, caption.py, curate.py, score.py) owns its spec, input, stages and output schema
behind kinds.JobKind; registry.KINDS names them; pipeline.py runs any of them.
"""

from janus_batch.jobs.caption import CaptionJob, ImageInput
from janus_batch.jobs.curate import CurateJob
from janus_batch.jobs.pipeline import RunIncomplete, build_pipeline, describe_plan, run
from janus_batch.jobs.registry import KINDS
from janus_batch.jobs.score import ScoreInput, ScoreJob
from janus_batch.jobs.specs import JobSpec, LeaseSpec, ModelSpec, OutputSpec, ResourceSpec
from janus_batch.jobs.synthesize import PromptInput, SynthesizeJob

__all__ = [
    "KINDS",
    "CaptionJob",
    "CurateJob",
    "ImageInput",
    "JobSpec",
    "LeaseSpec",
    "ModelSpec",
    "OutputSpec",
    "PromptInput",
    "ResourceSpec",
    "RunIncomplete",
    "ScoreInput",
    "ScoreJob",
    "SynthesizeJob",
    "build_pipeline",
    "describe_plan",
    "run",
]
