"""Column names and Arrow schemas of the job outputs.

Every output row carries `key` (deterministic, unique per (input row, sample), safe as a file name) and the
resume key of its input row (`row_hash` for Parquet inputs, `path` for image folders), which Ray Data's
checkpointing uses to skip finished inputs on a rerun.
"""

from __future__ import annotations

import json

import pyarrow as pa

ERROR = "error"
ROW_HASH = "row_hash"  # Ray Data's read_parquet(include_row_hash=True): hash of (file path, row position)
PATH = "path"  # Ray Data's read_binary_files(include_paths=True)

# Encoded image, laid out as Hugging Face `datasets` stores its Image feature.
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

COMMON = [
    ("model_id", pa.string()),
    ("weights_hash", pa.string()),
    ("run_id", pa.string()),
    ("created_at", pa.timestamp("us", tz="UTC")),
    (ERROR, pa.string()),
]

SYNTHESIZE = pa.schema(
    [
        ("key", pa.string()),
        (ROW_HASH, pa.uint64()),
        ("prompt_id", pa.string()),
        ("prompt", pa.string()),
        ("sample_index", pa.int32()),
        ("seed", pa.int64()),
        ("image", IMAGE_TYPE),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("cfg_weight", pa.float32()),
        ("temperature", pa.float32()),
        *COMMON,
    ]
)


def understanding_schema(resume_key: str, id_columns: list[tuple[str, pa.DataType]], text_column: str) -> pa.Schema:
    """Caption / VQA rows: the input's id columns passed through, then the generated text."""
    resume_type = pa.uint64() if resume_key == ROW_HASH else pa.string()
    return pa.schema(
        [
            ("key", pa.string()),
            (resume_key, resume_type),
            *[(name, typ) for name, typ in id_columns if name != resume_key],
            ("question", pa.string()),
            (text_column, pa.string()),
            ("num_tokens", pa.int32()),
            ("finish_reason", pa.string()),
            *COMMON,
        ]
    )


def with_hf_image_feature(schema: pa.Schema, column: str = "image") -> pa.Schema:
    """Schema metadata that makes `datasets` load `column` as an Image feature (else it sees a struct).
    Other columns are inferred from their Arrow types, which `datasets` does itself when absent here."""
    features = {column: {"_type": "Image"}}
    metadata = dict(schema.metadata or {})
    metadata[b"huggingface"] = json.dumps({"info": {"features": features}}).encode()
    return schema.with_metadata(metadata)
