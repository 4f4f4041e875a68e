"""A stand-in for ``perf.bench.bench_shape`` that spawned bench workers can import (tests only)."""

from __future__ import annotations

import os
import time

from perf import bench


def measure(job: bench.ShapeJob) -> dict:
    time.sleep(0.01)  # the compile phase, outside the lock
    with bench._gpu_lock:
        start = time.monotonic()
        time.sleep(0.05)
        return {"op": job.op, "T": job.shape["T"], "start": start, "end": time.monotonic(), "pid": os.getpid()}
