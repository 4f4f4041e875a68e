"""What the benchmarks share: the results folder, the CSV writer, the geomean, timing on shared buffer sets,
torch.compile's cache limits and the GPU lock around Inductor's autotuning in worker processes."""

from __future__ import annotations

import csv
import functools
import math
import statistics
from pathlib import Path
from typing import Any, Callable, Collection, Sequence

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def allow_static_compiles() -> None:
    """Let ``torch.compile(dynamic=False)`` keep a graph per shape: past dynamo's default of 8 recompiles of a
    function, its later calls run eagerly, and a ``compile`` column would time eager code."""
    torch._dynamo.config.cache_size_limit = 4096
    torch._dynamo.config.accumulated_cache_size_limit = 1 << 16


def lock_inductor_benchmarks(lock: Any) -> None:
    """Make Inductor's runtime autotuning hold ``lock``: at a new kernel's first call it times the kernel's candidate
    configs on the GPU, and a worker compiling its next shape would run those timings inside another worker's row.
    On an H200, a row at T = 128 read 11.6 us (ours) and 10.5 (torch.compile) in a bench with the workers compiling,
    against 6.2 and 7.6 for the same kernels timed in a process of their own."""
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    unlocked = CachingAutotuner.bench

    @functools.wraps(unlocked)
    def bench(self: Any, *args: Any, **kwargs: Any) -> Any:
        with lock:
            return unlocked(self, *args, **kwargs)

    CachingAutotuner.bench = bench


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


def read_csv(path: Path, columns: Sequence[str], text: Collection[str], ints: Collection[str]) -> list[dict]:
    """A CSV that :func:`write_csv` wrote, typed: ``text`` columns as strings ("" where empty), ``ints`` as int,
    the others as float; an empty or missing cell (a column an older run did not write) as None."""
    def typed(column: str, value: str | None) -> Any:
        if column in text:
            return value or ""
        if not value:
            return None
        return int(value) if column in ints else float(value)

    with open(path, newline="") as handle:
        return [{column: typed(column, row.get(column)) for column in columns} for row in csv.DictReader(handle)]


def replace_rows(earlier: list[dict], rows: list[dict], key: Callable[[dict], Any]) -> list[dict]:
    """The ``earlier`` rows whose ``key`` ``rows`` do not measure again, then ``rows``."""
    measured = {key(r) for r in rows}
    return [r for r in earlier if key(r) not in measured] + rows


def on_sets(timing: Callable[[list[Callable[[], Any]]], list[float]], versions: Sequence[Callable[..., Any]],
            sets: Sequence[dict[str, Any]], others: Sequence[Callable[[], Any]] = ()) -> tuple[list[float], list[float]]:
    """``timing`` (a ``Timer`` method) of every version called on every buffer set (keyword arguments), in one
    alternating run with ``others``: each version's mean over the sets, and the times of ``others``."""
    k, calls = len(versions), [functools.partial(fn, **kwargs) for kwargs in sets for fn in versions]
    times = timing(calls + list(others))
    return [statistics.fmean(times[i:len(calls):k]) for i in range(k)], times[len(calls):]
