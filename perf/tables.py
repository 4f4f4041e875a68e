"""What the benchmarks share: the results folder, the CSV writer, the geomean and torch.compile's cache limits."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def allow_static_compiles() -> None:
    """Let ``torch.compile(dynamic=False)`` keep a graph per shape: past dynamo's default of 8 recompiles of a
    function, its later calls run eagerly, and a ``compile`` column would time eager code."""
    torch._dynamo.config.cache_size_limit = 4096
    torch._dynamo.config.accumulated_cache_size_limit = 1 << 16


def geomean(values: list[float]) -> float:
    values = [v for v in values if v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    """``rows`` as a CSV of ``columns`` (other keys left out), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
