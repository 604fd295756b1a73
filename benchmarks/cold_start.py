"""Model actor cold start: a fresh process loads a Janus checkpoint from local disk and runs its first forward batch
(KV cache planning and allocation, CUDA graph capture included), as a Ray model actor does when it starts.

    python -m benchmarks.cold_start --model 7b --dir /tmp/janus-pro-7b-random   # H100 target: <= 90 s
    python -m benchmarks.cold_start --model tiny --quick --dir /tmp/janus-tiny  # CPU smoke run (CI)

The first run writes random weights at the model's real dims to DIR as a real checkpoint (safetensors and
processor files). Before each measurement the checkpoint's pages are dropped from the OS page cache, so the
weights come from disk, not memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

IMAGES_PER_PROMPT = 16


# torch and the model are imported in the processes that use them: the parent only starts them and keeps time.
def write_checkpoint(size: str, out: Path, quick: bool) -> None:
    import torch

    from janus_batch.model.random_init import build_random_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, processor = build_random_model(size, device, dtype, quick)
    model.save_pretrained(out)
    processor.save_pretrained(out)


def drop_from_page_cache(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def first_batch(source: str) -> dict:
    """What the child process times: load the engine, then make one forward batch of images (as many as its KV
    cache holds: on a GPU, planning the cache is part of the first batch)."""
    import torch

    from benchmarks.bench import PROMPT
    from janus_batch.engine import JanusEngine
    from janus_batch.options import ImageSampling

    start = time.perf_counter()
    engine = JanusEngine.from_pretrained(source)
    loaded = time.perf_counter()
    length = len(engine.generation_ids(PROMPT)) + engine.num_gen_tokens
    prompts = max(1, engine.memory.batch_limit(2, length) // IMAGES_PER_PROMPT)
    sampling = ImageSampling(images_per_prompt=IMAGES_PER_PROMPT)
    images = engine.generate_images([PROMPT] * prompts, sampling, prompt_ids=range(prompts))
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    done = time.perf_counter()
    return {"load_s": loaded - start, "first_batch_s": done - loaded, "images": len(images)}


def in_fresh_process(*flags: str) -> str:
    """Run this script with `flags` in a new process and return its stdout; its stderr shows through. The parent
    never touches the GPU itself: memory its allocator kept would be missing from the timed process."""
    command = [sys.executable, "-m", "benchmarks.cold_start", *flags]
    return subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True).stdout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "1b", "7b"], default="tiny")
    parser.add_argument("--dir", type=Path, required=True, help="checkpoint directory (written on the first run)")
    parser.add_argument("--quick", action="store_true", help="the 64 px tiny model: a smoke test")
    parser.add_argument("--json", default=None, help="also write the timings to this JSON file")
    parser.add_argument("--write", action="store_true", help=argparse.SUPPRESS)  # the checkpoint-writing process
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the timed process
    args = parser.parse_args(argv)

    if args.write:
        write_checkpoint(args.model, args.dir, args.quick)
        return
    if args.child:
        print(json.dumps(first_batch(str(args.dir))))
        return
    if not (args.dir / "config.json").exists():
        start = time.perf_counter()
        in_fresh_process("--model", args.model, "--dir", str(args.dir), "--write", *(["--quick"] * args.quick))
        print(f"wrote a random {args.model} checkpoint to {args.dir} in {time.perf_counter() - start:.1f} s")
    drop_from_page_cache(args.dir)
    start = time.perf_counter()
    stdout = in_fresh_process("--dir", str(args.dir), "--child")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["total_s"] = time.perf_counter() - start
    result["start_s"] = result["total_s"] - result["load_s"] - result["first_batch_s"]  # interpreter, imports
    print(
        f"cold start {result['total_s']:.1f} s: process start and imports {result['start_s']:.1f} s, "
        f"load {result['load_s']:.1f} s, first batch ({result['images']} images) {result['first_batch_s']:.1f} s"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
