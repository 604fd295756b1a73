"""Text-to-image synthesis with Janus over a Parquet file of prompts, on Ray; resumable with --run-id.

    python pipelines/synthesize.py                       # tiny model, built-in prompts, local Ray -> ./outputs/
    python pipelines/synthesize.py --input s3://bucket/prompts/ --model deepseek-community/Janus-Pro-7B \\
        --output s3://bucket/images --output-format webdataset --images-per-prompt 16 --actors 8
    ray job submit --working-dir . -- python pipelines/synthesize.py --config job.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from janus_batch.engine import ImageSampling  # noqa: E402
from janus_batch.jobs.cli import common_parser, main  # noqa: E402

FLAGS = {
    "input": "input.path",
    "prompt_column": "input.prompt_column",
    "id_column": "input.id_column",
    "images_per_prompt": "sampling.images_per_prompt",
    "cfg_weight": "sampling.cfg_weight",
    "temperature": "sampling.temperature",
    "top_k": "sampling.top_k",
    "top_p": "sampling.top_p",
    "seed": "sampling.seed",
    "greedy": "sampling.greedy",
}
DEFAULT = ImageSampling()


def parser():
    p = common_parser(__doc__.splitlines()[0])
    p.add_argument("--input", help="Parquet file or folder of prompts, local or s3:// (default: built-in prompts)")
    p.add_argument("--prompt-column", help="default: prompt")
    p.add_argument("--id-column", help="default: prompt_id (keys the random numbers with the seed)")
    p.add_argument("--images-per-prompt", type=int, help=f"default: {DEFAULT.images_per_prompt}")
    p.add_argument("--cfg-weight", type=float, help=f"default: {DEFAULT.cfg_weight:g}")
    p.add_argument("--temperature", type=float, help=f"default: {DEFAULT.temperature:g}")
    p.add_argument("--top-k", type=int, help="default: off")
    p.add_argument("--top-p", type=float, help="default: off")
    p.add_argument("--seed", type=int, help=f"default: {DEFAULT.seed}")
    p.add_argument("--greedy", action="store_true", default=None, help="argmax instead of sampling")
    return p


if __name__ == "__main__":
    main("synthesize", parser(), FLAGS, None)
