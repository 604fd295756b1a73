"""Text-to-image synthesis with Janus over a Parquet file of prompts, on Ray; resumable with --run-id.

    python pipelines/synthesize.py                       # tiny model, built-in prompts, local Ray -> ./outputs/
    python pipelines/synthesize.py --input s3://bucket/prompts/ --model deepseek-community/Janus-Pro-7B \\
        --output s3://bucket/images --output-format webdataset --images-per-prompt 16 --actors 8
    python pipelines/synthesize.py --input prompts.parquet --keep-top 4 --caption  # a curated corpus
    ray job submit --working-dir . -- python pipelines/synthesize.py --config job.yaml

Any curation option (--keep-top, --min-alignment, --min-aesthetic, --score-weights, --caption, --write-all) makes
the job a curate job: the same model scores each prompt's candidates, keeps the best, and captions them.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from janus_batch.jobs.cli import SCORE_WEIGHT_FLAGS, add_score_weights, common_parser, main  # noqa: E402
from janus_batch.options import DEFAULT_CAPTION_INSTRUCTION, ImageSampling  # noqa: E402

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
CURATE_FLAGS = {
    "keep_top": "selection.keep_top",
    "min_alignment": "selection.min_alignment",
    "min_aesthetic": "selection.min_aesthetic",
    **SCORE_WEIGHT_FLAGS,
    "caption": "caption",
    "caption_instruction": "caption_instruction",
    "write_all": "write_all",
}
DEFAULT = ImageSampling()


class Caption(argparse.Action):
    """`--caption [INSTRUCTION]`: caption the kept images, with INSTRUCTION if given."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.caption, namespace.caption_instruction = True, value


def kind_of(args: argparse.Namespace, data: dict) -> str:
    """curate when a curation flag is given or the YAML says so, else synthesize."""
    curating = any(getattr(args, dest) is not None for dest in CURATE_FLAGS)
    return "curate" if curating or data.get("kind") == "curate" else "synthesize"


def parser():
    p = common_parser(__doc__.split("\n\n")[0])
    p.add_argument("--input", help="Parquet file or folder of prompts, local or s3:// (default: built-in prompts)")
    p.add_argument("--prompt-column", help="default: prompt")
    p.add_argument(
        "--id-column", help="default: prompt_id (keys the random numbers with the seed); '': none, the prompt is the id"
    )
    p.add_argument("--images-per-prompt", type=int, help=f"default: {DEFAULT.images_per_prompt}")
    p.add_argument("--cfg-weight", type=float, help=f"default: {DEFAULT.cfg_weight:g}")
    p.add_argument("--temperature", type=float, help=f"default: {DEFAULT.temperature:g}")
    p.add_argument("--top-k", type=int, help="default: off")
    p.add_argument("--top-p", type=float, help="default: off")
    p.add_argument("--seed", type=int, help=f"default: {DEFAULT.seed}")
    p.add_argument("--greedy", action="store_true", default=None, help="argmax instead of sampling")
    curation = p.add_argument_group("curation (any of these makes the job a curate job)")
    curation.add_argument("--keep-top", type=int, metavar="K", help="keep the K best candidates per prompt by score")
    curation.add_argument("--min-alignment", type=float, metavar="X", help="keep only alignment (P(Yes)) >= X")
    curation.add_argument("--min-aesthetic", type=float, metavar="X", help="keep only aesthetic (rating 1-9) >= X")
    add_score_weights(curation)
    curation.add_argument(
        "--caption",
        action=Caption,
        nargs="?",
        metavar="INSTRUCTION",
        help=f"caption the kept images (default instruction: {DEFAULT_CAPTION_INSTRUCTION})",
    )
    curation.add_argument(
        "--write-all",
        action="store_true",
        default=None,
        help="write every candidate's image (default: the kept ones'; every candidate's row is written)",
    )
    p.set_defaults(caption=None, caption_instruction=None)
    return p


if __name__ == "__main__":
    main(kind_of, parser(), {**FLAGS, **CURATE_FLAGS}, None)
