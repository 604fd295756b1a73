"""Text-to-image synthesis with Janus over a Parquet file of prompts, on Ray; resumable with --run-id.

    python pipelines/synthesize.py                       # tiny model, built-in prompts, local Ray -> ./outputs/
    python pipelines/synthesize.py --input s3://bucket/prompts/ --model deepseek-community/Janus-Pro-7B \\
        --output s3://bucket/images --output-format webdataset --images-per-prompt 16 --actors 8
    ray job submit --working-dir . -- python pipelines/synthesize.py --config job.yaml
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from janus_batch.jobs.cli import common_parser, main  # noqa: E402
from janus_batch.jobs.specs import SynthesizeJob  # noqa: E402

FLAGS = {
    "input": "input.path",
    "prompt_column": "input.prompt_column",
    "id_column": "input.id_column",
    "images_per_prompt": "images_per_prompt",
    "cfg_weight": "cfg_weight",
    "temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "seed": "seed",
    "greedy": "greedy",
}


def parser():
    p = common_parser(__doc__.splitlines()[0])
    p.add_argument("--input", help="Parquet file or folder of prompts, local or s3:// (default: built-in prompts)")
    p.add_argument("--prompt-column", help="default: prompt")
    p.add_argument("--id-column", help="default: prompt_id (keys the random numbers with the seed)")
    p.add_argument("--images-per-prompt", type=int, help="default: 16")
    p.add_argument("--cfg-weight", type=float, help="default: 5")
    p.add_argument("--temperature", type=float, help="default: 1")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int, help="default: 0")
    p.add_argument("--greedy", action="store_true", default=None, help="argmax instead of sampling")
    return p


if __name__ == "__main__":
    main(SynthesizeJob, parser(), FLAGS, None)
