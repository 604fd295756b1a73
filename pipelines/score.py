"""Score an existing image corpus with Janus (aesthetic rating, and alignment with a prompt column), on Ray;
resumable with --run-id.

python pipelines/score.py --input s3://bucket/corpus.parquet --image-column image --prompt-column prompt
python pipelines/score.py --input ./photos --input-format images      # aesthetic only
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from janus_batch.jobs.cli import SCORE_WEIGHT_FLAGS, add_score_weights, common_parser, main  # noqa: E402

FLAGS = {
    "input": "input.path",
    "input_format": "input.format",
    "image_column": "input.image_column",
    "image_uri_column": "input.image_uri_column",
    "id_column": "input.id_column",
    "prompt_column": "input.prompt_column",
    **SCORE_WEIGHT_FLAGS,
}


def parser():
    p = common_parser(__doc__.split("\n\n")[0])
    p.add_argument("--input", help="Parquet file/folder or image folder, local or s3://")
    p.add_argument("--input-format", choices=["parquet", "images"], help="default: parquet")
    p.add_argument("--image-column", help="encoded image bytes or HF Image struct (default: image)")
    p.add_argument("--image-uri-column", help="paths / s3:// URIs of the images, instead of bytes")
    p.add_argument("--id-column", help="passed through to the output (default: image_id; '': none)")
    p.add_argument("--prompt-column", help="what each image should show, for the alignment (default: none)")
    add_score_weights(p)
    return p


if __name__ == "__main__":
    main("score", parser(), FLAGS, None)
