"""Captioning (or VQA with --task vqa) with Janus over images in Parquet or a folder, on Ray; resumable.

python pipelines/caption.py --input s3://bucket/images.parquet --image-column image --id-column image_id
python pipelines/caption.py --input ./photos --input-format images --output-format webdataset
python pipelines/caption.py --task vqa --input questions.parquet --question-column question
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from janus_batch.jobs.cli import common_parser, main  # noqa: E402
from janus_batch.options import DEFAULT_CAPTION_INSTRUCTION, TextSampling  # noqa: E402

FLAGS = {
    "task": "task",
    "input": "input.path",
    "input_format": "input.format",
    "image_column": "input.image_column",
    "image_uri_column": "input.image_uri_column",
    "id_column": "input.id_column",
    "question_column": "input.question_column",
    "instruction": "instruction",
    "max_new_tokens": "sampling.max_new_tokens",
    "greedy": "sampling.greedy",
    "temperature": "sampling.temperature",
    "seed": "sampling.seed",
}
DEFAULT = TextSampling()


def parser(task: str | None = None, description: str = __doc__.split("\n\n")[0]):
    p = common_parser(description)
    if task is None:
        p.add_argument("--task", choices=["caption", "vqa"], help="default: caption")
    else:
        p.set_defaults(task=task)
    p.add_argument("--input", help="Parquet file/folder or image folder, local or s3://")
    p.add_argument("--input-format", choices=["parquet", "images"], help="default: parquet")
    p.add_argument("--image-column", help="encoded image bytes or HF Image struct (default: image)")
    p.add_argument("--image-uri-column", help="paths / s3:// URIs of the images, instead of bytes")
    p.add_argument("--id-column", help="passed through to the output (default: image_id; '': none)")
    p.add_argument("--question-column", help="VQA: the question per row")
    if task != "vqa":  # VQA asks each row's question instead
        p.add_argument("--instruction", help=f"the caption prompt (default: {DEFAULT_CAPTION_INSTRUCTION})")
    p.add_argument("--max-new-tokens", type=int, help=f"default: {DEFAULT.max_new_tokens}")
    p.add_argument(
        "--sample", dest="greedy", action="store_false", default=None, help="sample instead of greedy decoding"
    )
    p.add_argument("--temperature", type=float, help=f"with --sample (default: {DEFAULT.temperature:g})")
    p.add_argument("--seed", type=int, help=f"with --sample: keys each row's random numbers (default: {DEFAULT.seed})")
    return p


if __name__ == "__main__":
    main("caption", parser(), FLAGS, None)
