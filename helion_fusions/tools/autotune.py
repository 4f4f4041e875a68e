"""``python -m helion_fusions.tools.autotune`` (``make autotune``): tune every op for the GPU it runs on.

For each op and shape of its grid (a GEMM's: the layers of a real model) it builds a small candidate set, curated
seeds first, then a neighbourhood of block sizes and warp counts. An op's shapes that share model dims are a unit:
parallel worker processes compile every candidate on each of the unit's shapes (its own launches), filling
Triton's on-disk cache, and hand back the files of the code Helion generated, which the tuning process loads
instead of generating it again. Then, shape by shape, it checks each candidate against the op's reference
(byte equality, allowing only the documented rounding ties) and times it: as ``make bench`` does for T (a
GEMM's M) > 256 (L2 flushed, host time hidden), and for smaller T replayed in a CUDA graph, with L2 warm
(``triton.testing.do_bench_cudagraph`` does not flush) unless the op declares cold operands (a GEMM's weights:
flushed, as ``make bench`` replays). The ``FINALISTS`` fastest are then timed again in turns and their medians
decide; a searched config is kept only where it beats the best seed on that shape.

Results are written after every (op, model dims), so an interrupted run resumes where it
stopped; ``--fresh`` starts over, and ``--retune`` searches the selected shapes again, replacing
only their entries (each stored config is the first seed: a searched one replaces it by beating it
on this GPU). ``--budget-minutes`` bounds the wall time.

``--revalidate`` is for a source change that leaves a kernel's tuned configs meaningful
(a shared helper another family uses changed, say): each entry of a stale file, and each entry
``make restamp`` marked stale (only its code changed), has its config checked
against the reference and timed again on this GPU, and saved under the current source
(source "revalidated"), instead of searching the shape again. An entry whose config now
fails, or runs more than ``REVALIDATE_SLOWDOWN`` times its recorded time, is searched
again, its old config among the seeds: a source change can move a shape's best config.
A stale file is replaced once its selected shapes are done; a run the budget stops saves
the entries it revalidated and drops the stale ones it did not reach.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import functools
import multiprocessing
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import helion
import torch
from helion.autotuner.local_cache import helion_triton_cache_dir
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

import helion_fusions.ops  # noqa: F401  (registers the ops)
from helion_fusions.runtime import config_store, dispatch
from helion_fusions.runtime.device import DeviceIdentity, device_identity
from helion_fusions.runtime.registry import REGISTRY, KernelLaunch, OpSpec, Shape, own_launches, shape_text
from helion_fusions.tools.cli import add_grid_arguments, selected_grid
from helion_fusions.tools.testing import (
    Timer,
    clone_kwargs,
    compare_outputs,
    outputs_ok,
)

MAX_FLIP_FRACTION = 1e-4
GRAPH_TIMING_MAX_TOKENS = 256
REVALIDATE_SLOWDOWN = 1.10
# from here a program has several rows to walk (T = 1024 is 7-8 rows per multiprocessor on an H200)
PIPELINE_MIN_TOKENS = 1024
PRECOMPILE_CHUNK = 8  # candidates a compile job takes (it makes the shape's inputs once)
# the fastest candidates of the first pass, timed again in turns FINAL_ROUNDS times each; the median decides
FINALISTS = 4
FINAL_ROUNDS = 3


def pipelined(config: helion.Config) -> helion.Config:
    """``config`` as a persistent kernel whose row loop is software-pipelined two deep.

    Triton then prefetches the next row with cp.async (LDGSTS, ``make sass``) while the current one
    is reduced and quantized, which a kernel whose epilogue costs about as much as its memory
    traffic needs to reach the bandwidth. The grid holds enough programs per multiprocessor to fill
    half of its 2048 threads (``num_sm_multiplier``), leaving room for the prefetch buffers.
    """
    warps = int(config.config.get("num_warps", 4))
    return helion.Config(**{**config.config, "pid_type": "persistent_interleaved", "range_num_stages": [2],
                            "num_sm_multiplier": max(1, 1024 // (32 * warps))})


def candidates(spec: OpSpec, shape: Shape, first: helion.Config | None = None) -> tuple[list[helion.Config], int]:
    """Seeds first (``first`` ahead of them), then the searched neighbourhood; returns (configs, number of seeds).

    From ``PIPELINE_MIN_TOKENS`` on, the neighbourhood also holds each seed under the op's L2 load policies
    (:func:`with_load_policies`), and each candidate as a pipelined persistent kernel (:func:`pipelined`)."""
    seeds = ([first] if first is not None else []) + spec.seed_configs(shape)
    seeds = list({repr(c): c for c in seeds}.values())
    seen = {repr(c) for c in seeds}
    extra = []
    for config in spec.search_configs(shape):
        if repr(config) not in seen:
            seen.add(repr(config))
            extra.append(config)
    if shape.get("T", 0) >= PIPELINE_MIN_TOKENS:
        extra += [c for c in with_load_policies(spec, shape, seeds) if repr(c) not in seen]
        extra += [pipelined(c) for c in seeds + extra if "pid_type" not in c.config]
    return seeds + extra, len(seeds)


_LOADED = re.compile(r"tl\.load\((\w+)")
_load_targets: dict[tuple[Any, ...], tuple[frozenset[str], ...]] = {}


def load_targets(spec: OpSpec, shape: Shape) -> tuple[frozenset[str], ...] | None:
    """For each entry of a config's ``load_eviction_policies`` on ``shape``'s call, the kernel arguments its load
    reads (found in the code Helion generates with that entry alone set); None unless the call is one launch of
    the op's own kernels. The loads depend on the kernel and its constants, not on sizes: the call is made with at
    most ``PIPELINE_MIN_TOKENS`` tokens, and each kernel and constants is looked at once."""
    small = {**shape, "T": min(shape["T"], PIPELINE_MIN_TOKENS)}
    launches = own_launches(spec.prepare(**spec.make_inputs(small, torch.bfloat16, torch.device("cpu"))))
    if len(launches) != 1:
        return None
    launch = launches[0]
    key = (launch.kernel, *(a for a in launch.args if not isinstance(a, torch.Tensor)))
    if key not in _load_targets:
        bound = launch.kernel.bind(launch.args)
        base = bound.config_spec.default_config().config
        count = len(base.get("load_eviction_policies", ()))
        targets = []
        for index in range(count):
            marked = ["last" if i == index else "" for i in range(count)]
            code = bound.to_triton_code(helion.Config(**{**base, "load_eviction_policies": marked}))
            targets.append(frozenset(m.group(1) for line in code.splitlines() if "evict_last" in line
                                     for m in [_LOADED.search(line)] if m))
        _load_targets[key] = tuple(targets)
    return _load_targets[key]


def with_load_policies(spec: OpSpec, shape: Shape, configs: list[helion.Config]) -> list[helion.Config]:
    """Each of ``configs`` under each of the op's ``load_policies`` (a policy naming no argument the shape's
    kernel loads adds nothing)."""
    targets = load_targets(spec, shape) if spec.load_policies else None
    variants = {}
    for config in configs if targets else ():
        for wanted in spec.load_policies:
            policies = [next((wanted[name] for name in sorted(names) if name in wanted), "") for names in targets]
            if any(policies):
                variant = helion.Config(**{**config.config, "load_eviction_policies": policies})
                variants.setdefault(repr(variant), variant)
    return list(variants.values())


@functools.lru_cache(maxsize=1)
def _job_launches(name: str, shape: tuple[tuple[str, int], ...], dtype_name: str) -> tuple[Any, ...]:
    """A worker's launches of one shape, each with its bound kernel (a worker's next job is often the same shape)."""
    spec = REGISTRY[name]
    launches = spec.prepare(**spec.make_inputs(dict(shape), getattr(torch, dtype_name), torch.device("cuda")))
    return tuple((launch, launch.kernel.bind(launch.args)) for launch in launches)


PrecompileJob = tuple[str, dict[str, int], str, list[dict[str, Any]]]  # op, shape, dtype, configs
GeneratedFiles = dict[tuple[str, int], str]  # a shape's generated code: (repr(config), launch position) -> file


def _precompile(job: PrecompileJob) -> tuple[list[str], dict[tuple[int, int], str]]:
    """Worker: compile and launch each config on the shape's launches (filling Triton's on-disk cache).

    Returns the errors of the configs that failed, and the file of the code Helion generated for each
    (config, launch) by their positions."""
    name, shape, dtype_name, configs = job
    where = f"{name} {shape_text(shape)}"
    errors, files = [], {}
    try:
        launches = _job_launches(name, tuple(shape.items()), dtype_name)
    except Exception as error:  # reported; the shape is then tuned without a warm cache
        return [f"{where}: {type(error).__name__}: {error}"], files
    for index, config in enumerate(configs):
        try:
            for position, (launch, bound) in enumerate(launches):
                if launch.tuned_as is not None:  # another op's launch, under that op's own config
                    continue
                compiled = bound.compile_config(helion.Config(**config))
                compiled(*launch.args)
                files[index, position] = compiled.__code__.co_filename  # Helion's generated module
            torch.cuda.synchronize()
        except Exception as error:  # a candidate that does not compile is reported and skipped
            errors.append(f"{where} {config}: {type(error).__name__}: {error}")
    return errors, files


def precompile_jobs(candidates_of: list[tuple[OpSpec, Shape, list[helion.Config]]],
                    dtype_name: str) -> list[PrecompileJob]:
    """Each shape's candidates, ``PRECOMPILE_CHUNK`` to a job, compiled on that shape: a shape's launches (how
    many, which flavour, what Helion specializes: a dim of size 1) may differ from its neighbours'."""
    return [(spec.name, dict(shape), dtype_name, [dict(c.config) for c in configs[i:i + PRECOMPILE_CHUNK]])
            for spec, shape, configs in candidates_of for i in range(0, len(configs), PRECOMPILE_CHUNK)]


def compiled_launch(launch: KernelLaunch, config: helion.Config, file: str | None) -> Callable[..., Any]:
    """``launch``'s kernel under ``config``: from the file of a worker's generated code, else compiled here. A launch
    of another op's kernel (``tuned_as``) runs as that op's calls do, under its own tuned config."""
    if launch.tuned_as is not None:
        compiled = dispatch.compiled_kernel(launch.tuned_as, launch)
        if compiled is dispatch._USE_REFERENCE:
            raise RuntimeError(f"{launch.tuned_as.name}: no kernel builds for {launch.problem}")
        return compiled
    if file is not None:
        from torch._inductor.codecache import PyCodeCache

        try:
            return getattr(PyCodeCache.load(Path(file).read_text()), launch.kernel.name)
        except OSError:  # removed since: generate it again
            pass
    return launch.kernel.bind(launch.args).compile_config(config)


@functools.cache
def _timer() -> Timer:
    return Timer(reps=25)


def _time_us(fn: Any, spec: OpSpec, shape: Shape) -> float:
    import triton.testing

    tokens = next((shape[d.name] for d in spec.problem if d.bucketed), 0)  # T, or a GEMM's M
    # medians, as make bench reports: Triton returns the mean by default, which a few slow samples can
    # dominate for a kernel of a few microseconds
    if tokens <= GRAPH_TIMING_MAX_TOKENS:
        if spec.cold_operands:  # as make bench times it: L2 flushed before each replay
            return _timer().graph(fn)
        return 1000.0 * triton.testing.do_bench_cudagraph(fn, rep=10, return_mode="median")
    # as make bench times it: the GPU is kept busy while the host enqueues fn, so host time (an op
    # of two launches, a CPU busy compiling) never shows as GPU time
    return _timer().eager(fn)


def final_times(first: list[tuple[float, int]], runs: dict[int, Callable[[], None]],
                time_us: Callable[[Callable[[], None]], float]) -> list[tuple[float, int]]:
    """(median time, index) of each finalist ``runs`` (by index): its first-pass time and ``FINAL_ROUNDS`` more,
    the finalists timed in turns.

    The first pass times each candidate once, seconds apart, and noise or clock drift of a few percent
    then ranks close candidates by chance.
    """
    times = {index: [t] for t, index in first if index in runs}
    for _ in range(FINAL_ROUNDS):
        for index, run in runs.items():
            times[index].append(time_us(run))
    return sorted((statistics.median(ts), index) for index, ts in times.items())


def _run_all(kernels: list[Callable[..., Any]], launches: list[KernelLaunch]) -> None:
    for kernel, launch in zip(kernels, launches):
        kernel(*launch.args)


def tune_shape(spec: OpSpec, shape: Shape, dtype: torch.dtype, device: torch.device,
               configs: list[helion.Config], num_seeds: int, log: Any,
               generated: GeneratedFiles | None = None) -> config_store.Entry | None:
    """Check and time every candidate on one shape.

    An op of several launches runs them all with the candidate config (another op's launch: with its own).
    ``generated`` holds the files of the code generated for this shape by ``(repr(config), launch position)``
    (:func:`_precompile`); a launch without one is compiled here (Helion caches bound kernels)."""
    generated = generated or {}
    kwargs = spec.make_inputs(shape, dtype, device)
    where = f"{spec.name} {shape_text(shape)}"
    expected = clone_kwargs(kwargs)
    spec.reference(**expected)
    best: list[tuple[float, int]] = []
    runs: dict[int, Callable[[], None]] = {}  # the FINALISTS fastest so far
    for index, config in enumerate(configs):
        trial = clone_kwargs(kwargs)
        launches = spec.prepare(**trial)
        try:
            # on the CPU smoke path the kernel runs in interpret mode, where configs do not apply
            kernels = ([compiled_launch(launch, config, generated.get((repr(config), position)))
                        for position, launch in enumerate(launches)]
                       if device.type == "cuda"
                       else [dispatch.interpreted(launch.kernel) for launch in launches])

            fn = functools.partial(_run_all, kernels, launches)
            fn()
        except Exception as error:
            log(f"  {where}: candidate {index} failed: {type(error).__name__}: {error}")
            continue
        results = compare_outputs(spec.mutated_args, trial, expected)
        if not outputs_ok(results, MAX_FLIP_FRACTION):
            detail = "; ".join(f"{name}: {result}" for name, result in results.items())
            log(f"  {where}: candidate {index} rejected ({detail})")
            continue
        if device.type == "cuda":
            elapsed = _time_us(fn, spec, shape)
        else:
            start = time.perf_counter()
            fn()
            elapsed = 1e6 * (time.perf_counter() - start)
        best.append((elapsed, index))
        if device.type == "cuda":
            runs[index] = fn
            if len(runs) > FINALISTS:
                del runs[max(runs, key=dict((i, t) for t, i in best).__getitem__)]
    if not best:
        return None
    first_seed = min((t for t, i in best if i < num_seeds), default=None)
    if len(runs) > 1:
        best = final_times(best, runs, lambda run: _time_us(run, spec, shape))
    # a seed's time from the same pass as the winner's where a seed reached the finals
    best_seed = min((t for t, i in best if i < num_seeds), default=first_seed)
    elapsed, index = min(best)
    source = "seed" if index < num_seeds else "tuned"
    config = dict(configs[index].config)
    return config_store.Entry(dtype=str(dtype).removeprefix("torch."), shape=dict(shape), config=config, time_us=round(elapsed, 3),
                              seed_time_us=None if best_seed is None else round(best_seed, 3), source=source)


def _key(spec: OpSpec, dtype: str, shape: Shape) -> tuple[Any, ...]:
    return (spec.name, dtype, *(shape[d] for d in spec.dim_names))


def _model_dims(spec: OpSpec, shape: Shape) -> dict[str, int]:
    return {d.name: shape[d.name] for d in spec.problem if not d.bucketed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_arguments(parser)
    parser.add_argument("--budget-minutes", type=float, default=15.0, help="stop starting new work after this")
    parser.add_argument("--out", type=Path, default=None, help="config root (default: the package's configs/)")
    parser.add_argument("--fresh", action="store_true", help="ignore existing results instead of resuming")
    parser.add_argument("--revalidate", action="store_true",
                        help="re-check and re-time the configs of stale files and of entries marked stale instead of "
                             "searching those shapes again")
    parser.add_argument("--retune", action="store_true",
                        help="search the selected shapes again even where tuned (their stored configs first among the "
                        "seeds), replacing only their entries")
    parser.add_argument("--jobs", type=int, default=min(16, os.cpu_count() or 1), help="parallel compile workers")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU smoke run: tiny shapes, interpret mode, checks the plumbing end to end")
    args = parser.parse_args(argv)

    grid = selected_grid(parser, args)
    dtype = getattr(torch, args.dtype)
    if args.smoke or not torch.cuda.is_available():
        if not args.smoke:
            parser.error("no CUDA device found; use --smoke for a CPU plumbing run")
        device = torch.device("cpu")
        identity = DeviceIdentity("cpu_smoke", "cpu", torch.float8_e4m3fn)
    else:
        device = torch.device("cuda")
        identity = device_identity()
    root = args.out or config_store.config_root()
    deadline = time.monotonic() + 60 * args.budget_minutes

    # units of work: an op's shapes that share model dims (one bind, one save), bucketed dims in order
    units: list[tuple[OpSpec, dict[str, int], list[dict[str, int]]]] = []
    for spec, shapes in grid:
        if args.smoke and not args.shape:  # tiny shapes: the plumbing, not the tuning
            shapes = [{d.name: (t if d.bucketed else 256) for d in spec.problem} for t in (1, 7)]
        for shape in shapes:
            model = _model_dims(spec, shape)
            unit = next((u for u in units if u[0] is spec and u[1] == model), None)
            if unit is None:
                units.append((spec, model, [shape]))
            else:
                unit[2].append(shape)

    existing: dict[str, list[config_store.Entry]] = {}
    stale: dict[tuple[Any, ...], config_store.Entry] = {}
    revalidating: set[str] = set()
    for spec in {u[0].name: u[0] for u in units}.values():
        path = root / identity.name / f"{spec.name}.json"
        if path.exists() and not args.fresh:
            try:
                existing[spec.name] = list(config_store.load(path, spec.name, spec.dim_names, dispatch.spec_hash(spec),
                                                             spec.config_problem).entries)
                marked = [e for e in existing[spec.name] if e.stale]
                if marked and args.revalidate:  # make restamp's: their config generates other code now
                    stale.update({_key(spec, e.dtype, e.shape): e for e in marked})
                    print(f"revalidating the {len(marked)} entries of {path} marked stale")
            except config_store.ConfigError as error:
                if not args.revalidate:
                    print(f"not resuming from {error}", file=sys.stderr)
                    continue
                old = config_store.load(path, spec.name, spec.dim_names, None, spec.config_problem).entries
                stale.update({_key(spec, e.dtype, e.shape): e for e in old})
                revalidating.add(spec.name)
                print(f"revalidating {len(old)} entries of {path}")

    def shape_configs(spec: OpSpec, shape: Shape) -> tuple[list[helion.Config], int]:
        old = stale.get(_key(spec, args.dtype, shape))
        if old:
            return [helion.Config(**old.config)], 1
        # a retune seeds with the stored config: a candidate replaces it only by beating it on this GPU
        stored = next((e for e in existing.get(spec.name, []) if e.matches(args.dtype, dict(shape))), None)
        return candidates(spec, shape, helion.Config(**stored.config) if stored else None)

    def done(spec: OpSpec, shape: Shape) -> bool:
        return not args.retune and any(e.matches(args.dtype, dict(shape)) and not e.stale
                                       for e in existing.get(spec.name, []))

    todo = [(spec, model, [s for s in ss if not done(spec, s)]) for spec, model, ss in units]
    todo = [(spec, model, ss) for spec, model, ss in todo if ss]
    print(f"tuning {sum(len(ss) for _, _, ss in todo)} shapes of {len(grid)} ops on {identity.name} "
          f"({identity.family}), budget {args.budget_minutes:g} min, results in {root / identity.name}")

    def save(spec: OpSpec, entries: list[config_store.Entry]) -> None:
        config_store.save(root / identity.name / f"{spec.name}.json", spec.name, identity.name, identity.family,
                          dispatch.spec_hash(spec), spec.dim_names, entries)

    if device.type == "cuda" and todo:
        # one Triton cache for this process and the compile workers, which find it in their environment
        os.environ.setdefault("TRITON_CACHE_DIR", helion_triton_cache_dir(device.index or 0))
        pool = concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"))
    else:
        pool = None  # on the CPU smoke path the kernel runs in interpret mode: nothing to compile
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns) as progress, pool or contextlib.nullcontext():
        log = progress.console.log

        def precompiled(spec: OpSpec, shapes: list[tuple[Shape, list[helion.Config]]]) -> dict[str, GeneratedFiles]:
            """Each shape's candidates compiled by the workers (a unit's shapes at once, before any is timed, so
            that no compile runs beside a timing): the files of their code by shape, as tune_shape takes them."""
            if pool is None:
                return {}
            progress.update(task, description=f"{spec.name}: compiling the candidates of {len(shapes)} shapes")
            jobs = precompile_jobs([(spec, shape, configs) for shape, configs in shapes], args.dtype)
            generated: dict[str, GeneratedFiles] = {}
            for (_, shape, _, configs), (errors, files) in zip(jobs, pool.map(_precompile, jobs)):
                for error in errors:
                    log(f"  precompile: {error.splitlines()[0][:200]}")
                generated.setdefault(shape_text(shape), {}).update(
                    {(repr(helion.Config(**configs[i])), position): file for (i, position), file in files.items()})
            return generated

        task = progress.add_task("tuning shapes", total=sum(len(ss) for _, _, ss in todo))
        skipped = []
        for position, (spec, model, ss) in enumerate(todo):
            entries = existing.setdefault(spec.name, [])
            # a stale file is replaced once all its selected shapes are revalidated or the budget stops the run:
            # saved earlier under the new hash, a run stopped from outside would drop the entries not reached yet
            last_unit = all(other is not spec for other, _, _ in todo[position + 1:])
            if time.monotonic() > deadline:
                skipped.append(f"{spec.name} {shape_text(model)}")
                progress.advance(task, len(ss))
                if entries and last_unit and spec.name in revalidating:
                    log(f"{spec.name}: budget reached; saving its {len(entries)} revalidated entries, the stale "
                        "ones not reached are dropped (tune those shapes again)")
                    save(spec, entries)
                continue
            generated = precompiled(spec, [(shape, shape_configs(spec, shape)[0]) for shape in ss])
            for shape in ss:
                where = f"{spec.name} {shape_text(shape)}"
                progress.update(task, description=where)
                configs, num_seeds = shape_configs(spec, shape)
                entry = tune_shape(spec, shape, dtype, device, configs, num_seeds, log,
                                   generated.get(shape_text(shape)))
                old = stale.get(_key(spec, args.dtype, shape))
                if old is not None and (entry is None or entry.time_us > REVALIDATE_SLOWDOWN * old.time_us):
                    now = "fails" if entry is None else f"takes {entry.time_us:.2f} us"
                    log(f"  {where}: the revalidated config {now} (recorded {old.time_us:.2f} us); "
                        "searching the shape again")
                    configs, num_seeds = candidates(spec, shape, helion.Config(**old.config))
                    files = precompiled(spec, [(shape, configs)]).get(shape_text(shape))
                    entry = tune_shape(spec, shape, dtype, device, configs, num_seeds, log, files)
                elif entry is not None and old is not None:
                    entry = dataclasses.replace(entry, source="revalidated", seed_time_us=None)
                if entry is None:
                    log(f"  {where}: no candidate passed; keeping the architecture default")
                else:
                    entries[:] = [e for e in entries if not e.matches(entry.dtype, entry.shape)]
                    entries.append(entry)
                    log(f"{where}: {entry.time_us:.2f} us ({entry.source}; best seed {entry.seed_time_us} us)")
                progress.advance(task)
            if entries and (last_unit or spec.name not in revalidating):
                save(spec, entries)
    if skipped:
        print(f"budget reached; not tuned (re-run to resume): {', '.join(skipped)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
