"""A job's progress: the rows its CPU stages finish, counted by a small actor, printed by the driver.

Its own module, importing Ray alone: the counter's actor process imports this module only, not the model's
libraries (seconds of CPU per job, beside the model actor starting)."""

from __future__ import annotations

import threading
import time

import ray


@ray.remote(num_cpus=0)
class ProgressCounter:
    def __init__(self):
        self.rows = 0
        self.errors = 0

    def add(self, rows: int, errors: int) -> None:
        self.rows += rows
        self.errors += errors

    def get(self) -> tuple[int, int]:
        return self.rows, self.errors


def report_progress(counter, total: int, before: int, start: float, stop: threading.Event, every: float) -> None:
    """Print rows done (of about `total`: an input that fails makes one row), rows/s and ETA every `every`
    seconds until `stop` is set."""
    while not stop.wait(every):
        rows, errors = ray.get(counter.get.remote())
        elapsed = time.perf_counter() - start
        rate = rows / elapsed
        left = max(total - before - rows, 0)
        eta = f"{left / rate:.0f} s" if rate > 0 else "?"
        print(f"[janus-batch] {before + rows}/{total} rows ({errors} errors), {rate:.2f} rows/s, ETA {eta}", flush=True)
