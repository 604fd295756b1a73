"""Visual question answering with Janus: pipelines/caption.py's task vqa (a question per row), on Ray; resumable.

python pipelines/vqa.py --input s3://bucket/vqa.parquet --question-column question --id-column image_id
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from caption import FLAGS, parser  # noqa: E402

from janus_batch.jobs.cli import main  # noqa: E402

if __name__ == "__main__":
    main("caption", parser(task="vqa", description=__doc__.split("\n\n")[0]), FLAGS, None)
