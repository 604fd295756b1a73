"""Command lines of the job scripts in pipelines/: flags for the common fields, --config for all of them.

A YAML file gives the whole spec (the same fields as the pydantic models); flags override it. S3 secrets
are never flags: use the AWS environment variables, a profile, or the YAML file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml
from pydantic import ValidationError

from janus_batch.jobs.specs import ROWS_PER_CALL, JobSpec

# flag dest -> dotted field path, for the flags every job has
COMMON_FLAGS = {
    "run_id": "run_id",
    "model": "model.source",
    "dtype": "model.dtype",
    "output": "output.path",
    "output_format": "output.format",
    "image_format": "output.image_format",
    "rows_per_file": "output.rows_per_file",
    "actors": "resources.actors",
    "min_actors": "resources.min_actors",
    "max_actors": "resources.max_actors",
    "gpus_per_actor": "resources.gpus_per_actor",
    "cpus_per_actor": "resources.cpus_per_actor",
    "cpus_per_task": "resources.cpus_per_task",
    "batch_size": "resources.batch_size",
    "max_batch_rows": "resources.max_batch_rows",
    "gpu_memory_utilization": "resources.gpu_memory_utilization",
    "s3_endpoint": "storage.endpoint_url",
    "s3_region": "storage.region",
    "aws_profile": "storage.profile",
}


def common_parser(description: str) -> argparse.ArgumentParser:
    # Every flag defaults to None ("not given": the YAML or the spec's default applies); help says the default.
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", type=Path, help="YAML file with the job spec; flags override it")
    p.add_argument("--dry-run", action="store_true", help="print the resolved spec and the plan, run nothing")
    p.add_argument("--run-id", help="rerun with the same id to resume a run (default: a new id)")
    p.add_argument("--model", help="HF id, local dir or s3:// prefix (default: the embedded tiny model)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--output", help="output root, local or s3:// (default: ./outputs); the run writes in OUTPUT/RUN_ID")
    p.add_argument("--output-format", choices=["parquet", "webdataset", "files"])
    p.add_argument("--image-format", choices=["png", "jpeg", "webp"])
    p.add_argument("--rows-per-file", type=int)
    p.add_argument("--actors", type=int, help="model actors (fixed pool)")
    p.add_argument("--min-actors", type=int, help="autoscaling pool: minimum actors (with --max-actors)")
    p.add_argument("--max-actors", type=int)
    p.add_argument("--gpus-per-actor", type=float, help="default: 1 if the cluster has GPUs, else 0")
    p.add_argument("--cpus-per-actor", type=float)
    p.add_argument("--cpus-per-task", type=float, help="CPUs per CPU-stage task")
    p.add_argument(
        "--batch-size", type=int, help=f"input rows per model call (default: {ROWS_PER_CALL} images or texts a call)"
    )
    p.add_argument("--max-batch-rows", type=int, help="rows per forward pass (default: as many as GPU memory holds)")
    p.add_argument("--gpu-memory-utilization", type=float, help="share of a GPU's memory a model actor may use")
    p.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (MinIO, Ceph, ...)")
    p.add_argument("--s3-region")
    p.add_argument("--aws-profile", help="named AWS profile (default: the AWS credential chain)")
    return p


def set_path(data: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        if data.get(name) is None:
            data[name] = {}
        data = data[name]
    data[leaf] = value


def build_spec(cls: type[JobSpec], args: argparse.Namespace, flags: dict[str, str]) -> JobSpec:
    """YAML (if any), then every flag that was given, validated as `cls`."""
    data = (yaml.safe_load(args.config.read_text()) if args.config else None) or {}
    for dest, dotted in {**COMMON_FLAGS, **flags}.items():
        value = getattr(args, dest, None)
        if value is not None:
            set_path(data, dotted, value)
    return cls.model_validate(data)


def main(cls: type[JobSpec], parser: argparse.ArgumentParser, flags: dict[str, str], argv: list[str] | None) -> None:
    args = parser.parse_args(argv)
    try:
        spec = build_spec(cls, args, flags)
    except ValidationError as e:
        sys.exit(f"invalid job spec:\n{e}")
    from janus_batch.jobs.pipeline import describe_plan, run

    if args.dry_run:
        if spec.run_id is not None:  # show the id this run would use; a new one is made only when it runs
            spec = spec.with_run_id()
        print(json.dumps(spec.public_dump(), indent=2))
        print(f"plan ({spec.kind}):")
        print(describe_plan(spec))
        return
    try:
        run(spec)
    except (ValueError, OSError) as e:  # bad input, model or output: say what, not a traceback
        sys.exit(f"job failed: {e}")
