"""Engine quickstart, no Ray: synthesize images for a few prompts, then caption them, into a local folder.

    python -m janus_batch.demo [--model SOURCE] [--out outputs/demo]
    python -m janus_batch.demo --model deepseek-ai/Janus-Pro-7B --allow-pickle   # its weights are pickle files

SOURCE is a Hugging Face id, a local directory or an s3:// prefix; the default is the embedded tiny random
model (its images are noise and its captions gibberish: it exists to run every code path anywhere).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from PIL import Image

from janus_batch.engine import JanusEngine
from janus_batch.model.tiny import ensure_tiny_model
from janus_batch.options import ImageSampling, TextSampling

DEMO_PROMPTS = [
    "A photo of a red fox sitting in the snow, golden hour.",
    "A watercolor painting of a lighthouse on a cliff above a stormy sea.",
    "A city street at night with neon lights, cinematic.",
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF id, local dir or s3:// prefix (default: tiny model)")
    parser.add_argument("--allow-pickle", action="store_true", help="load pickle (.bin) weights; only if trusted")
    parser.add_argument("--revision", default=None, help="Hugging Face ids only: branch, tag, commit or refs/pr/N")
    parser.add_argument("--prompt-format", default="auto", choices=["auto", "janus-pro", "janus-1.3b"])
    parser.add_argument("--out", default="outputs/demo")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    engine = JanusEngine.from_pretrained(
        args.model or str(ensure_tiny_model()),
        allow_pickle=args.allow_pickle,
        revision=args.revision,
        prompt_format=args.prompt_format,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    images = engine.generate_images(
        DEMO_PROMPTS, ImageSampling(images_per_prompt=args.images_per_prompt, seed=args.seed)
    )
    print(f"synthesized {len(images)} images in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    captions = engine.understand([Image.fromarray(im.pixels) for im in images], None, TextSampling(max_new_tokens=32))
    print(f"captioned {len(captions)} images in {time.perf_counter() - start:.1f} s")

    with open(out / "captions.jsonl", "w") as f:
        for image, caption in zip(images, captions, strict=True):
            name = f"{DEMO_PROMPTS.index(image.prompt):03d}_{image.sample_index:02d}.png"
            Image.fromarray(image.pixels).save(out / name)
            record = {"file": name, "prompt": image.prompt, "seed": image.seed, "caption": caption.text}
            f.write(json.dumps(record) + "\n")
    print(f"wrote {len(images)} images and captions.jsonl to {out}/ (model {engine.model_id})")


if __name__ == "__main__":
    main()
