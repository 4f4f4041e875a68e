"""``python -m perf.bench`` (``make bench``): eager vs torch.compile vs ours, per op and shape.

One run per device. For each op and (T, H) of its grid it times the GPU work, with L2 flushed before every call
and the GPU kept busy while the host enqueues it (medians; the versions on the same buffers, a row of T <= 256
on four sets of them, averaged); worker processes compile the shapes in parallel and measure them one at a time:

* ``eager``: the op's reference (the unfused composite) run eagerly;
* ``compile``: ``torch.compile(reference, dynamic=False)``, compiled for this shape;
* ``compile_dynamic``: ``torch.compile(reference)`` with the token dimension marked dynamic;
* ``ours``: ``torch.ops.helion_fusions.<op>`` (dispatch included);
* for T <= 256, ``ours`` and ``compile`` again inside CUDA graphs (``*_graph_us``).

GB/s comes from the bytes the op must move; ``pct_copy_bw`` compares it with a device-to-device copy measured in
the same run, and ``pct_copy_same`` the time of a copy of the row's own bytes (timed with it) with ours. It writes
``perf/results/<device>.md``, ``.csv`` and ``.png``. Without a GPU it prints a correctness table on small shapes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import statistics
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tabulate import tabulate

import helion_fusions.ops  # noqa: F401  (registers the ops)
from helion_fusions.runtime import dispatch
from helion_fusions.runtime.device import device_identity
from helion_fusions.runtime.launcher import captured_launch
from helion_fusions.runtime.registry import (
    REGISTRY,
    OpSpec,
    Shape,
    normalize_call,
    shape_text,
)
from helion_fusions.tools.cli import add_grid_arguments, selected_grid
from helion_fusions.tools.testing import (
    Timer,
    clone_kwargs,
    compare_outputs,
    outputs_ok,
)
from perf.tables import (RESULTS, allow_static_compiles, geomean, lock_inductor_benchmarks, on_sets, read_csv,
                         replace_rows, write_csv)

GRAPH_MAX_TOKENS = 256
BUFFER_SETS = 4  # buffer placements a row of up to GRAPH_MAX_TOKENS tokens is timed on (bench_row)
ROW_DIMS = ("T", "H")  # the ops this bench measures: tokens by hidden size (GEMMs have their own problem dims)
COLUMNS = ["device", "op", "dtype", "shape", "T", "H", "bytes", "eager_us", "compile_us", "compile_dynamic_us", "ours_us",
           "ours_graph_us", "compile_graph_us", "gbps", "pct_copy_bw", "copy_same_us", "pct_copy_same", "speedup_vs_compile", "flips",
           "launches", "host_us", "host_kw_us", "launch_us", "copy_gbps", "helion", "triton", "torch", "kernel_hash", "compile_reused", "repro"]
_INT_COLUMNS = {"T", "H", "bytes", "flips", "launches", "compile_reused"}
_COMPILE_COLUMNS = ("compile_us", "compile_dynamic_us", "compile_graph_us")
_TEXT_COLUMNS = {"device", "op", "dtype", "shape", "helion", "triton", "torch", "kernel_hash", "repro"}


def copy_bandwidth_gbps(timer: Timer) -> float:
    source = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    target = torch.empty_like(source)
    elapsed_us = timer.eager(lambda: target.copy_(source))
    return 2 * source.numel() / elapsed_us / 1e3


def _mark_tokens_dynamic(kwargs: dict[str, Any], tokens: int) -> dict[str, Any]:
    marked = clone_kwargs(kwargs)
    if tokens > 1:  # every tensor with a token dimension (positions and slot mappings too); a table
        # whose length happens to equal T may stay static, so the marks are hints
        for value in marked.values():
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == tokens:
                torch._dynamo.maybe_mark_dynamic(value, 0)
    return marked


@dataclasses.dataclass(frozen=True)
class ShapeJob:
    """One row to measure, as a worker receives it."""
    op: str
    shape: dict[str, int]
    dtype: str
    reps: int
    copy_gbps: float
    device_name: str
    baseline: dict | None  # an earlier row whose torch.compile columns are reused


_gpu_lock: Any = contextlib.nullcontext()  # held while a worker measures: one row at a time on the GPU


def _init_worker(lock: Any) -> None:
    global _gpu_lock
    _gpu_lock = lock
    allow_static_compiles()
    lock_inductor_benchmarks(lock)


@functools.cache
def _timer(reps: int) -> Timer:
    return Timer(reps)


@functools.cache
def _compiled_references(op: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``torch.compile`` of the op's reference, static (one compile per shape) and with a dynamic T."""
    reference = REGISTRY[op].reference
    return torch.compile(reference, dynamic=False), torch.compile(reference)


def bench_shape(job: ShapeJob) -> dict:
    """Compile the reference and our kernel for one shape, then, holding the GPU lock, measure its row.

    The compiles (CPU-bound, with a few short launches) of other shapes overlap a row's timing;
    the timings themselves never overlap.
    """
    spec, dtype = REGISTRY[job.op], getattr(torch, job.dtype)
    static, dynamic = _compiled_references(job.op)
    kwargs = spec.make_inputs(job.shape, dtype, torch.device("cuda"))
    if job.baseline is None:
        static(**clone_kwargs(kwargs))
        dynamic(**_mark_tokens_dynamic(kwargs, job.shape.get("T", 0)))
    spec.op(**clone_kwargs(kwargs))
    torch.cuda.synchronize()
    with _gpu_lock:
        row = bench_row(spec, kwargs, job.shape, dtype, _timer(job.reps), job.copy_gbps, static,
                        dynamic, job.device_name, job.baseline)
    del kwargs
    torch.cuda.empty_cache()  # a worker keeps only the flush buffer between rows
    return row


def bench_shapes(jobs: list[ShapeJob], workers: int,
                 measure: Callable[[ShapeJob], dict] = bench_shape) -> Iterator[dict]:
    """``measure``'s rows in the order of ``jobs``; with several workers, in worker processes that hold
    ``_gpu_lock`` while they measure (and while Inductor autotunes: :func:`lock_inductor_benchmarks`)."""
    if workers <= 1:
        allow_static_compiles()
        yield from map(measure, jobs)
        return
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    # reentrant: a worker that holds it to time its row may still meet a first call that Inductor autotunes
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                                initargs=(context.RLock(),)) as pool:
        yield from pool.map(measure, jobs)


def _row_key(row: dict) -> tuple:
    return row["op"], row["dtype"], row["shape"]


def merge_rows(earlier: list[dict], rows: list[dict]) -> list[dict]:
    """``rows`` plus the ``earlier`` rows of shapes they do not measure again, in registry and grid order."""
    return sorted(replace_rows(earlier, rows, _row_key),
                  key=lambda r: (list(REGISTRY).index(r["op"]), r["dtype"], r["H"] or 0, r["T"] or 0))


def bench_row(spec: OpSpec, kwargs: dict[str, Any], shape: Shape, dtype: torch.dtype, timer: Timer,
              copy_gbps: float, compiled_static: Callable[..., Any], compiled_dynamic: Callable[..., Any],
              device_name: str, baseline: dict | None) -> dict:
    """One CSV row for ``kwargs`` (the shape's inputs); ``baseline``, an earlier row of this shape, supplies
    the torch.compile times instead."""
    tokens = shape.get("T", 0)
    expected, ours = clone_kwargs(kwargs), clone_kwargs(kwargs)
    spec.reference(**expected)
    spec.op(**ours)
    comparisons = compare_outputs(spec.mutated_args, ours, expected)
    flips = sum(c.flips + c.worse for c in comparisons.values())
    row: dict[str, Any] = {"device": device_name, "op": spec.name, "dtype": str(dtype).removeprefix("torch."),
                           "shape": shape_text(shape), "T": shape.get("T"), "H": shape.get("H"), "bytes": spec.bytes_moved(kwargs), "flips": flips,
                           "launches": dispatch.launch_count(spec, clone_kwargs(kwargs)),
                           "host_us": None, "host_kw_us": None, "launch_us": None}  # the host shape's: add_host_times
    # The versions run on the same buffers (residuals updated in place by every call: the same work), a small
    # row on BUFFER_SETS sets of them: with L2 flushed, a launch-bound kernel's time follows where its buffers
    # lie (on an H200 one kernel took 4.1 or 5.2 us on two clones of its inputs). Calls alternate (drift).
    row["compile_reused"] = int(baseline is not None)
    sets = [clone_kwargs(kwargs) for _ in range(BUFFER_SETS if tokens <= GRAPH_MAX_TOKENS else 1)]
    # the ceiling at this size: a device-to-device copy of the row's bytes (half read, half written), which
    # pays the same ramp-up and tail as the op where a 1 GiB copy hides them
    copy_source = torch.empty(row["bytes"] // 2, dtype=torch.uint8, device="cuda")
    copy_target = torch.empty_like(copy_source)
    same_copy = lambda: copy_target.copy_(copy_source)  # noqa: E731
    if baseline is not None:
        row.update({column: baseline[column] for column in _COMPILE_COLUMNS})
        (row["eager_us"], row["ours_us"]), (row["copy_same_us"],) = on_sets(
            timer.eager_each, [spec.reference, spec.op], sets, [same_copy])
    else:
        dynamic = functools.partial(compiled_dynamic, **_mark_tokens_dynamic(kwargs, tokens))
        (row["eager_us"], row["compile_us"], row["ours_us"]), (row["compile_dynamic_us"], row["copy_same_us"]) = \
            on_sets(timer.eager_each, [spec.reference, compiled_static, spec.op], sets, [dynamic, same_copy])
    if tokens > GRAPH_MAX_TOKENS:
        row["ours_graph_us"] = row["compile_graph_us"] = float("nan")
    elif baseline is not None:  # the compile graph column is the baseline's
        (row["ours_graph_us"],), _ = on_sets(timer.graph_each, [spec.op], sets)
    else:
        try:
            (row["ours_graph_us"], row["compile_graph_us"]), _ = on_sets(timer.graph_each,
                                                                          [spec.op, compiled_static], sets)
        except RuntimeError as error:  # a baseline that syncs cannot be captured: reported, not fatal
            torch.cuda.synchronize()
            print(f"warning: {spec.name} {shape_text(shape)}: torch.compile baseline not capturable: "
                  f"{str(error).splitlines()[0][:160]}")
            (row["ours_graph_us"],), _ = on_sets(timer.graph_each, [spec.op], sets)
            row["compile_graph_us"] = float("nan")
    row["gbps"] = row["bytes"] / row["ours_us"] / 1e3
    row["pct_copy_bw"] = 100.0 * row["gbps"] / copy_gbps
    row["pct_copy_same"] = 100.0 * row["copy_same_us"] / row["ours_us"]
    row["speedup_vs_compile"] = row["compile_us"] / row["ours_us"]
    row["copy_gbps"] = copy_gbps
    row.update({name: version(name) for name in ("helion", "triton", "torch")})
    row["kernel_hash"] = dispatch.spec_hash(spec)  # the kernel source measured (as in configs/)
    row["repro"] = f"python -m perf.bench --ops {spec.name} --shape {shape_text(shape)} --dtype {row['dtype']}"
    return row


HOST_TOKENS = 16


def host_shape(spec: OpSpec) -> dict[str, int]:
    """Where host time is measured: T=16 (launch-bound on any GPU), model dims nearest 4096."""
    return {d.name: HOST_TOKENS if d.bucketed else min(d.grid, key=lambda v: (abs(math.log(v / 4096)), v))
            for d in spec.problem}


def host_times(spec: OpSpec, dtype: torch.dtype, calls: int = 300, rounds: int = 15) -> dict[str, float]:
    """Host microseconds per repeat call at :func:`host_shape`, outside CUDA graphs (the GPU idles, so the
    host sets the pace): ``host_us`` as Inductor's wrapper calls the op (its overload, positional but for
    keyword-only arguments),
    ``host_kw_us`` through ``torch.ops`` with keywords, and ``launch_us`` the raw Triton launches of the same
    compiled kernels (``kernel[grid](...)``, arguments laid out beforehand).

    The three alternate, ``calls`` calls at a time, for ``rounds`` rounds; each reports its median round, so
    a burst of other work on the host lands in a few rounds of all three rather than in one of them."""
    import time

    kwargs = spec.make_inputs(host_shape(spec), dtype, torch.device("cuda"))
    bound = normalize_call(spec, (), kwargs)
    positional = tuple(bound[name] for name in spec.arg_names if name not in spec.keyword_only)
    keywords = {name: bound[name] for name in spec.keyword_only}
    default = spec.op_overload
    default(*positional, **keywords)  # compiles, and lays out the plan
    raw = []
    for launch in spec.prepare(**kwargs):
        kernel, grid, args, options = captured_launch(dispatch.compiled_kernel(spec, launch), launch.args)
        raw.append(functools.partial(kernel[grid], *args, **options))
    measured: dict[str, Callable[[], Any]] = {
        "host_us": lambda: default(*positional, **keywords),
        "host_kw_us": lambda: spec.op(**kwargs),
        "launch_us": lambda: [launch() for launch in raw],
    }
    samples: dict[str, list[float]] = {name: [] for name in measured}
    for _ in range(rounds):
        for name, fn in measured.items():
            fn()
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append(1e6 * (time.perf_counter() - start) / calls)
            torch.cuda.synchronize()
    return {name: statistics.median(values) for name, values in samples.items()}


def add_host_times(rows: list[dict], host: dict[str, dict[str, float]], dtype: str) -> list[str]:
    """Put each op's host times on its row at :func:`host_shape`; returns the ops that have no such row."""
    missing = []
    for op, times in host.items():
        key = (op, dtype, shape_text(host_shape(REGISTRY[op])))
        row = next((r for r in rows if _row_key(r) == key), None)
        if row is None:
            missing.append(op)
        else:
            row.update(times)
    return missing


def read_rows(path: Path) -> list[dict]:
    """Rows of an earlier run's CSV, typed as ``bench_row`` returns them."""
    rows = read_csv(path, COLUMNS, _TEXT_COLUMNS, _INT_COLUMNS)
    for row in rows:  # files written before problem keys had T and H only
        row["shape"] = row["shape"] or f"T={row['T']},H={row['H']}"
    return rows


def summary(rows: list[dict], copy_gbps: float) -> list[str]:
    runs = sorted({round(r["copy_gbps"]) for r in rows} | {round(copy_gbps)})
    lines = [f"copy bandwidth {', '.join(map(str, runs))} GB/s (read + write; each row uses the copy measured "
             "in its own run)"]
    speedups = [r["speedup_vs_compile"] for r in rows]
    worst = min(rows, key=lambda r: r["speedup_vs_compile"])
    lines.append(f"geomean speedup_vs_compile {geomean(speedups):.2f}x over {len(rows)} rows; "
                 f"min {worst['speedup_vs_compile']:.2f}x ({worst['op']} T={worst['T']} H={worst['H']}); "
                 f"rows below 1.0: {sum(s < 1.0 for s in speedups)}")
    large = [r for r in rows if r["T"] >= 4096]
    if large:
        low = min(large, key=lambda r: r["pct_copy_bw"])
        lines.append(f"T >= 4096: pct_copy_bw mean {statistics.mean(r['pct_copy_bw'] for r in large):.1f}%, "
                     f"min {low['pct_copy_bw']:.1f}% ({low['op']} T={low['T']} H={low['H']}); "
                     f"rows >= 85%: {sum(r['pct_copy_bw'] >= 85 for r in large)}/{len(large)}")
        same = [r for r in large if r["pct_copy_same"] is not None]
        if same:
            lines.append(f"T >= 4096 against a copy of the row's own bytes (`pct_copy_same`): mean "
                         f"{statistics.mean(r['pct_copy_same'] for r in same):.1f}%; rows >= 85%: "
                         f"{sum(r['pct_copy_same'] >= 85 for r in same)}/{len(same)}")
    decode = [r for r in rows if r["T"] <= 16 and math.isfinite(r["ours_graph_us"])]
    if decode:
        lines.append(f"T <= 16 under CUDA graphs: ours <= compile in "
                     f"{sum(r['ours_graph_us'] <= r['compile_graph_us'] for r in decode)}/{len(decode)} rows; "
                     f"ours {min(r['ours_graph_us'] for r in decode):.2f}-{max(r['ours_graph_us'] for r in decode):.2f} us")
    older = [r for r in rows if r["kernel_hash"] != dispatch.spec_hash(REGISTRY[r["op"]])]
    if older:
        lines.append(f"rows measured on an earlier kernel source (or not recorded): {len(older)}, of "
                     + ", ".join(dict.fromkeys(r["op"] for r in older)))
    reused = [r for r in rows if r["compile_reused"]]
    if reused:
        lines.append(f"rows whose torch.compile columns come from an earlier run on this device "
                     f"(`--reuse-baselines`): {len(reused)}")
    mismatched = [r for r in rows if r["flips"]]
    lines.append(f"rows with any byte differing from the reference: {len(mismatched)}"
                 + (f" (max {max(r['flips'] for r in mismatched)} rounding-tie flips)" if mismatched else ""))
    for family in dict.fromkeys(REGISTRY[r["op"]].family for r in rows):
        mine = [r for r in rows if REGISTRY[r["op"]].family == family]
        lines.append(f"{family} family: geomean speedup_vs_compile {geomean([r['speedup_vs_compile'] for r in mine]):.2f}x "
                     f"over {len(mine)} rows; rows below 1.0: {sum(r['speedup_vs_compile'] < 1.0 for r in mine)}")
    for op in dict.fromkeys(r["op"] for r in rows):
        mine = [r for r in rows if r["op"] == op]
        lines.append(f"  {op}: geomean {geomean([r['speedup_vs_compile'] for r in mine]):.2f}x, "
                     f"min {min(r['speedup_vs_compile'] for r in mine):.2f}x")
    return lines


def host_table(rows: list[dict]) -> list[str]:
    """The rows that carry host times, as a markdown table with how far each op is above its raw launch."""
    timed = [r for r in rows if r.get("host_us") is not None]
    if not timed:
        return []
    shown = [[r["op"], r["shape"], r["launches"], r["host_us"], r["host_kw_us"], r["launch_us"],
              r["host_us"] - r["launch_us"]] for r in timed]
    over = max(r["host_us"] - r["launch_us"] for r in timed)
    return ["", "## Host time per call (outside CUDA graphs)", "",
            "`host_us`: `torch.ops.helion_fusions.<op>.default` with positional arguments, as Inductor's wrapper "
            "calls it; `host_kw_us`: keyword arguments; `launch_us`: the raw Triton launch(es) of the same compiled "
            f"kernel(s). Largest host_us - launch_us: {over:.1f} us.", "",
            tabulate(shown, headers=["op", "shape", "launches", "host_us", "host_kw_us", "launch_us",
                                     "host - launch"], floatfmt=".1f", tablefmt="github")]


def write_results(rows: list[dict], copy_gbps: float, device_name: str, device_label: str, out: Path) -> None:
    write_csv(out / f"{device_name}.csv", COLUMNS, rows)
    shown = ["op", "T", "H", "eager_us", "compile_us", "compile_dynamic_us", "ours_us", "ours_graph_us",
             "compile_graph_us", "gbps", "pct_copy_bw", "pct_copy_same", "speedup_vs_compile", "flips", "launches"]
    table = tabulate([[r[c] for c in shown] for r in rows], headers=shown, floatfmt=".2f", tablefmt="github")
    text = "\n".join([f"# {device_label} ({device_name})", "",
                      f"helion {rows[0]['helion']}, triton {rows[0]['triton']}, torch {rows[0]['torch']}; "
                      f"dtype {rows[0]['dtype']}; times in us, medians with L2 flushed; written by `make bench`.", "",
                      *[f"- {line}" for line in summary(rows, copy_gbps)],
                      *host_table(rows),
                      "", "## All rows", "", table, ""])
    (out / f"{device_name}.md").write_text(text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axis = plt.subplots(figsize=(10, 5))
    for op in dict.fromkeys(r["op"] for r in rows):
        mine = [r for r in rows if r["op"] == op]
        axis.plot(range(len(mine)), [r["speedup_vs_compile"] for r in mine], marker="o", label=op)
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_xlabel("shape index (T-major over the H grid)")
    axis.set_ylabel("speedup vs torch.compile")
    axis.set_title(device_label)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / f"{device_name}.png", dpi=100)


def cpu_correctness(specs: list[OpSpec]) -> int:
    """No GPU: run each op's Helion kernel in interpret mode on small shapes against its reference."""
    rows, failures = [], 0
    for spec in specs:
        for tokens, hidden in ((1, 256), (7, 1024)):
            shape = {d.name: tokens if d.bucketed else hidden for d in spec.problem}
            kwargs = spec.make_inputs(shape, torch.bfloat16, torch.device("cpu"))
            expected, ours = clone_kwargs(kwargs), clone_kwargs(kwargs)
            spec.reference(**expected)
            with dispatch.interpreting():
                spec.op(**ours)
            results = compare_outputs(spec.mutated_args, ours, expected)
            ok = outputs_ok(results)
            failures += not ok
            rows.append([spec.name, shape_text(shape), "; ".join(f"{n}: {r}" for n, r in results.items()),
                         "ok" if ok else "MISMATCH"])
    print("No CUDA device: correctness of the Helion kernels (interpret mode) against the references")
    print(tabulate(rows, headers=["op", "shape", "comparison", "status"], tablefmt="github"))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_grid_arguments(parser)
    parser.add_argument("--reps", type=int, default=30, help="timed calls per measurement")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                        help="worker processes: each compiles its shapes' torch.compile baselines and our kernels "
                             "while another measures its row (rows are measured one at a time); 1 runs all here")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of an existing <device>.csv in --out that this run does not measure "
                             "again (a run split by --ops, or one cut short)")
    parser.add_argument("--reuse-baselines", action="store_true",
                        help="take the torch.compile columns from the existing <device>.csv rows of the same op, "
                             "shape, dtype and torch version instead of compiling the references again (a quick "
                             "rerun after a change to our kernels only); eager is timed again. Launch-bound rows "
                             "carry the other run's launch latency: a full run is the reference")
    parser.add_argument("--host-only", action="store_true",
                        help="measure only the host time per call of each selected op and write it into the "
                             "existing <device>.csv rows (host_us, host_kw_us, launch_us)")
    args = parser.parse_args(argv)
    grid = selected_grid(parser, args)
    specs = [spec for spec, _ in grid]
    if not torch.cuda.is_available():
        return cpu_correctness(specs)
    others = [spec.name for spec in specs if spec.dim_names != ROW_DIMS]
    if others and args.ops != "all":
        parser.error(f"--ops: {others} are not row ops (problem dims {list(ROW_DIMS)}); this bench measures those only")
    grid = [(spec, shapes) for spec, shapes in grid if spec.dim_names == ROW_DIMS]
    specs = [spec for spec, _ in grid]

    from rich.progress import track

    dtype = getattr(torch, args.dtype)
    identity = device_identity()
    existing = args.out / f"{identity.name}.csv"
    earlier = read_rows(existing) if existing.exists() else []
    if args.host_only and not earlier:
        parser.error(f"--host-only: it updates the host-time columns of {existing}, which holds no rows; "
                     "run a full bench first")
    label = torch.cuda.get_device_name()
    copy_gbps = copy_bandwidth_gbps(_timer(args.reps))
    torch.cuda.empty_cache()  # the copy's 2 GiB, before the workers allocate
    print(f"{label}: copy bandwidth {copy_gbps:.0f} GB/s")
    host = {}  # measured first, on a quiet host
    for spec in track(specs, description="host time per call"):
        host[spec.name] = host_times(spec, dtype)
        print(f"{spec.name}: " + ", ".join(f"{k} {v:.1f}" for k, v in host[spec.name].items()))
    if args.host_only:
        missing = add_host_times(earlier, host, args.dtype)
        if missing:
            print(f"no row at the host-time shape in {existing} for: {', '.join(missing)}")
        write_results(earlier, copy_gbps, identity.name, label, args.out)
        print("\n".join(host_table(earlier)))
        return 0
    reused = {_row_key(r): r for r in earlier
              if args.reuse_baselines and r["torch"] == version("torch") and r["compile_us"] is not None}
    jobs = [ShapeJob(spec.name, shape, args.dtype, args.reps, copy_gbps, identity.name,
                     reused.get((spec.name, args.dtype, shape_text(shape))))
            for spec, shapes in grid for shape in shapes]
    rows, drift = [], []
    for index, row in enumerate(track(bench_shapes(jobs, args.jobs), total=len(jobs), description="benchmarking")):
        add_host_times([row], {row["op"]: host[row["op"]]} if row["shape"] == shape_text(
            host_shape(REGISTRY[row["op"]])) else {}, args.dtype)
        rows.append(row)
        job = jobs[index]
        if job.baseline is not None:
            drift.append(row["eager_us"] / job.baseline["eager_us"])
        if index + 1 == len(jobs) or jobs[index + 1].op != job.op:  # save after every op
            write_results(merge_rows(earlier if args.append else [], rows), copy_gbps, identity.name, label,
                          args.out)
    print((args.out / f"{identity.name}.md").read_text())
    if drift:
        print(f"torch.compile times reused in {len(drift)} rows; eager, timed again, is {geomean(drift):.3f}x "
              f"its earlier time (geomean; min {min(drift):.3f}x, max {max(drift):.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
