"""Command lines of the job scripts in pipelines/: flags for the common fields, --config for all of them.

Each script names its job kind (registry.KINDS) and maps its own flags to fields of that kind's spec, e.g.
`--images-per-prompt` to `sampling.images_per_prompt`.

A YAML file gives the whole spec (the same fields as the pydantic models); flags override it. S3 secrets
are never flags: use the AWS environment variables, a profile, or the YAML file. No message shows them: a
bad spec names the field and the rule, not the value.

A job that fails prints one line, `job failed: ...`, with the error underneath Ray's wrappers first (a task's
or an actor's own exception) and, for a store's error, which store; `--verbose` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import yaml
from pydantic import ValidationError

from janus_batch.io.storage import StorageConfig, one_line
from janus_batch.jobs.pipeline import describe_plan, run
from janus_batch.jobs.registry import KINDS
from janus_batch.jobs.specs import ROWS_PER_CALL, JobSpec

# flag dest -> dotted field path, for the flags every job has
COMMON_FLAGS = {
    "run_id": "run_id",
    "model": "model.source",
    "dtype": "model.dtype",
    "allow_pickle": "model.allow_pickle",
    "revision": "model.revision",
    "prompt_format": "model.prompt_format",
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
    "wait_for_lease": "lease.wait",
}


def common_parser(description: str) -> argparse.ArgumentParser:
    # Every flag defaults to None ("not given": the YAML or the spec's default applies); help says the default.
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", type=Path, help="YAML file with the job spec; flags override it")
    p.add_argument("--dry-run", action="store_true", help="print the resolved spec and the plan, run nothing")
    p.add_argument("--verbose", action="store_true", help="print the traceback of a failed job")
    p.add_argument("--run-id", help="rerun with the same id to resume a run (default: a new id)")
    p.add_argument("--model", help="HF id, local dir or s3:// prefix (default: the embedded tiny model)")
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        default=None,
        help="load pickle (.bin) weights, e.g. deepseek-ai/Janus-Pro-7B's (with torch.load(weights_only=True)); "
        "only if you trust the source",
    )
    p.add_argument("--revision", help="Hugging Face ids only: branch, tag, commit or refs/pr/N (default: main)")
    p.add_argument(
        "--prompt-format",
        choices=["auto", "janus-pro", "janus-1.3b"],
        help="chat roles (default: auto, as the checkpoint tells: Janus-1.3B by its name)",
    )
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
    p.add_argument(
        "--wait-for-lease",
        action="store_true",
        default=None,
        help="if another driver is running this run id, wait for it to end (default: refuse)",
    )
    return p


class ScoreWeights(argparse.Action):
    """`--score-weights A,B`: the alignment and aesthetic weights of the combined score."""

    def __call__(self, parser, namespace, value, option_string=None):
        try:
            alignment, aesthetic = (float(w) for w in value.split(","))
        except ValueError:
            parser.error(f"{option_string} takes two numbers, ALIGNMENT,AESTHETIC (e.g. 1,0.5), not {value!r}")
        namespace.alignment_weight, namespace.aesthetic_weight = alignment, aesthetic


SCORE_WEIGHT_FLAGS = {"alignment_weight": "scores.alignment_weight", "aesthetic_weight": "scores.aesthetic_weight"}


def add_score_weights(p: argparse.ArgumentParser, extra_help: str = "") -> None:
    p.add_argument(
        "--score-weights",
        action=ScoreWeights,
        metavar="A,B",
        help=f"weights of alignment and aesthetic (scaled to [0, 1]) in the combined score (default: 1,1){extra_help}",
    )
    p.set_defaults(alignment_weight=None, aesthetic_weight=None)


def set_path(data: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for depth, name in enumerate(parents, 1):
        if data.get(name) is None:
            data[name] = {}
        if not isinstance(data[name], dict):  # e.g. `input: x.parquet` in the YAML, then --prompt-column
            field = ".".join(parents[:depth])
            raise ValueError(
                f"{field} must be a mapping of fields (set {dotted} with a flag), not a {type(data[name]).__name__}"
            )
        data = data[name]
    data[leaf] = value


# A script's job kind: a name, or a choice from the flags given and the YAML's fields (the synthesis script's
# curation flags make a curate job).
KindOf = str | Callable[[argparse.Namespace, dict], str]


def build_spec(kind: KindOf, args: argparse.Namespace, flags: dict[str, str]) -> JobSpec:
    """YAML (if any), then every flag that was given, validated as the spec of job kind `kind`."""
    data = load_yaml(args.config) if args.config else {}
    kind = kind if isinstance(kind, str) else kind(args, data)
    for dest, dotted in {**COMMON_FLAGS, **flags}.items():
        value = getattr(args, dest, None)
        if value is not None:
            set_path(data, dotted, value)
    return KINDS[kind].spec.model_validate(data)


def load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:  # its text quotes the offending lines, which may hold a secret: say where only
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(
            f"{path} is not valid YAML: {getattr(e, 'problem', None) or type(e).__name__}{where}"
        ) from None
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of spec fields, not a {type(data).__name__}")
    return data or {}


def spec_errors(e: ValidationError) -> str:
    """One line per error: the field and the rule broken, never the value given (it can be a secret)."""
    lines = []
    for error in e.errors(include_url=False, include_input=False, include_context=False):
        where = ".".join(str(part) for part in error["loc"]) or "spec"
        lines.append(f"  {where}: {error['msg']}")
    return "\n".join(lines)


# ---- the error a user sees ---------------------------------------------------------------------------------

ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
# The line of a formatted traceback that states an exception: `module.Type: message`, or a bare `module.Type`.
EXCEPTION_LINE = re.compile(r"(?P<type>[A-Za-z_][\w.]*)(?P<message>: .*)?")


def is_ray_error(e: BaseException) -> bool:
    return type(e).__module__.split(".")[0] == "ray"


def underlying_error(e: BaseException) -> BaseException:
    """The exception under Ray's wrappers: a task's own (RayTaskError.cause), or what a Ray error was raised from."""
    from ray.exceptions import RayTaskError

    while is_ray_error(e):
        cause = e.cause if isinstance(e, RayTaskError) else e.__cause__
        if cause is None or cause is e:
            break
        e = cause
    return e


def last_worker_exception(text: str) -> str | None:
    """The outermost non-Ray exception a worker's formatted traceback states, as `Type: message` (first line):
    the one our code raised, with its context, around whatever it caught. Ray keeps this text when the exception
    object lost its causes on the way back (a task's error wrapped in Ray Data's UserCodeException, an actor that
    failed to start). An exception's line follows its last frame (indented) or a header line."""
    found, previous = None, ""
    for line in ANSI_COLOUR.sub("", text).splitlines():
        follows_frame = previous[:1].isspace() or previous.startswith(("Traceback", "ray::"))
        match = EXCEPTION_LINE.fullmatch(line) if line[:1].strip() and follows_frame else None
        if match and not match["type"].startswith("ray."):
            found = match["type"].rsplit(".", 1)[-1] + (match["message"] or "")
        previous = line
    return found


def failure_message(e: BaseException, storage: StorageConfig) -> str:
    """One line for a failed job: the underlying error first (not Ray's wrapper), and the store of an S3 error."""
    error = underlying_error(e)
    if is_ray_error(error):
        message = last_worker_exception(str(e)) or last_worker_exception(str(error)) or one_line(error)
    elif isinstance(error, (ValueError, OSError)):
        message = one_line(error)
    else:
        message = f"{type(error).__name__}: {one_line(error)}"
    # S3 errors from pyarrow ("AWS Error ... during GetObject operation") and botocore ("An error occurred (...)
    # when calling the PutObject operation") name the call, not the store.
    if re.search(r"AWS Error|when calling the \w+ operation", message) and "S3 store" not in message:
        message = f"{message} ({storage.store_name('s3://')})"
    return message


def main(kind: KindOf, parser: argparse.ArgumentParser, flags: dict[str, str], argv: list[str] | None) -> None:
    """A job script: the spec of job kind `kind` from --config and the flags (`flags`: the script's own, flag dest
    -> dotted field path), then --dry-run's plan or the run."""
    args = parser.parse_args(argv)
    try:
        spec = build_spec(kind, args, flags)
    except ValidationError as e:
        sys.exit(f"invalid job spec:\n{spec_errors(e)}")
    except ValueError as e:
        sys.exit(f"invalid job spec: {e}")
    if args.dry_run:
        if spec.run_id is not None:  # show the id this run would use; a new one is made only when it runs
            spec = spec.with_run_id()
        print(json.dumps(spec.public_dump(), indent=2))
        print(f"plan ({spec.kind}):")
        print(describe_plan(spec))
        return
    try:
        run(spec)
    except Exception as e:
        if args.verbose:
            traceback.print_exception(e)
        sys.exit(f"job failed: {failure_message(e, spec.storage)}")
