"""``python -m helion_fusions.tools.autotune_tp`` (``make autotune-tp``): tune the all_reduce_ ops on this host's GPUs.

A process per GPU (NCCL; NVLink multicast off in every one). For each op and shape ``{W, T, H}`` of the grid (W:
the number of GPUs), every rank builds the same candidates in the same order
(:func:`helion_fusions.ops.all_reduce.candidate_configs`: the one-shot and, where T >= W, the two-shot algorithm,
each with rows per tile and warp counts, persistent). The ranks
exchange an ok flag after each step that can fail on one rank alone (the build, the check, the CUDA-graph
capture), so a candidate that fails anywhere is dropped everywhere before any rank launches it again. A
surviving candidate's outputs must equal the contract (:func:`helion_fusions.ops.all_reduce.reference`) byte
for byte on every rank; it is then timed in a CUDA graph (median replay, the ranks starting each replay
together; the slowest rank's time counts), and the fastest is kept. Every rank sees the same times, so every
rank picks the same winner; rank 0 writes ``configs/<device>/all_reduce_<op>.json`` after each op, so an
interrupted run resumes (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from helion_fusions.ops import all_reduce
from helion_fusions.runtime import config_store, dispatch, symmetric
from helion_fusions.runtime.device import device_identity
from helion_fusions.runtime.registry import REGISTRY, TunedKernel, normalize_call, shape_text, shapes
from helion_fusions.tools.cli import add_grid_arguments, parse_shape
from helion_fusions.tools.testing import clone_kwargs, compare_outputs, graph_of, outputs_ok, rank_input, replay_us

BUDGET_EXIT = 3  # rank 0's exit code when the budget ran out before every shape was tuned
TIMEOUT = datetime.timedelta(minutes=10)  # a rank lost in a collective fails the run instead of hanging it


class Ranks:
    """This rank's view of the group, and the exchanges that keep every rank's choices the same."""

    def __init__(self, rank: int, world: int, log: Any) -> None:
        self.rank, self.world = rank, world
        self.log = log if rank == 0 else lambda *args, **kwargs: None  # rank 0 reports for every rank
        self.device = torch.device("cuda", rank)
        self.group, self.group_name = dist.group.WORLD, dist.group.WORLD.group_name

    def all_ok(self, problem: str | None, where: str) -> bool:
        """Whether the step succeeded on every rank (each rank passes its own ``problem``; rank 0 logs them)."""
        failed = symmetric.all_ranks_ok(self.group, self.device, problem)
        if failed:
            self.log(f"  {where}: " + "; ".join(f[:300] for f in failed))
        return not failed

    def from_rank0(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def slowest(self, value: float) -> float:
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, value)
        return max(gathered)


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:300]}"


def tune_shape(tuned: TunedKernel, shape: dict[str, int], dtype: torch.dtype, ranks: Ranks,
               reps: int) -> config_store.Entry | None:
    """Check and time every candidate on one shape, on every rank; the same entry (or None) on every rank."""
    base = REGISTRY[tuned.name.removeprefix(all_reduce.PREFIX)]
    rows = {"T": shape["T"], "H": shape["H"]}
    call = normalize_call(base, (), base.make_inputs(rows, dtype, ranks.device))
    call["input"] = rank_input(rows, dtype, ranks.device, ranks.rank)
    expected = clone_kwargs(call)
    all_reduce.reference(base, expected, [rank_input(rows, dtype, ranks.device, r) for r in range(ranks.world)])
    (launch,) = base.prepare(**call)
    space = symmetric.workspace(ranks.group, ranks.group_name, rows["T"], rows["H"], dtype, ranks.device,
                                all_reduce.PROGRAM_SLOTS)
    where = f"{tuned.name} {shape_text(shape)}"
    if space is None:
        ranks.log(f"  {where}: no symmetric workspace: "
                  f"{symmetric.failure(ranks.group_name, rows['T'], rows['H'], dtype, ranks.device)}")
        return None
    configs = all_reduce.candidate_configs(shape)
    if any(all_reduce.algorithm(c) == all_reduce.TWO_SHOT for c in configs):
        # collective, on every rank alike; where it fails everywhere, the two-shot candidates are dropped
        if all_reduce.stages(ranks.group, ranks.group_name, launch, ranks.world, True) is None:
            ranks.log(f"  {where}: no symmetric stage buffers; trying one-shot candidates only")
            configs = [c for c in configs if all_reduce.algorithm(c) == all_reduce.ONE_SHOT]
    all_reduce.stages(ranks.group, ranks.group_name, launch, ranks.world, False)
    timed: list[tuple[float, int]] = []
    for index, config in enumerate(configs):
        trial = clone_kwargs(call)
        args = tuple(trial[name] for name in base.arg_names)
        candidate = f"{where} candidate {index} {dict(config)}"
        problem = None
        try:
            run = all_reduce.plan(base, tuned.name, launch, tuple(call[n] for n in base.arg_names), space,
                                  ranks.group_name, True, config)
        except Exception as error:  # noqa: BLE001 - exchanged: a build failure anywhere drops the candidate everywhere
            problem = f"does not build: {_first_line(error)}"
        if not ranks.all_ok(problem, candidate):
            continue
        try:
            run(args)
            torch.cuda.synchronize()
            results = compare_outputs(base.mutated_args, trial, expected)
            if outputs_ok(results, max_flip_fraction=0):
                graph = graph_of(lambda: run(args), reps)
            else:
                problem = f"differs from the contract: {results}"
        except Exception as error:  # noqa: BLE001
            problem = f"fails: {_first_line(error)}"
        if not ranks.all_ok(problem, candidate):
            continue
        timed.append((ranks.slowest(replay_us(graph, reps)), index))
    if not timed:
        return None
    elapsed, index = min(timed)
    default = next((t for t, i in timed if i == 0), None)  # candidate 0 is the default config
    return config_store.Entry(dtype=str(dtype).removeprefix("torch."), shape=dict(shape),
                              config=dict(configs[index].config), time_us=round(elapsed, 3),
                              seed_time_us=None if default is None else round(default, 3),
                              source="seed" if index == 0 else "tuned")


def _resumed(path: Path, tuned: TunedKernel, fresh: bool, log: Any) -> list[config_store.Entry]:
    if fresh or not path.exists():
        return []
    try:
        return list(config_store.load(path, tuned.name, tuned.dim_names, dispatch.spec_hash(tuned),
                                      tuned.config_problem, tuned.extra_config_keys).entries)
    except config_store.ConfigError as error:
        log(f"not resuming from {error}")
        return []


def _rank(rank: int, world: int, init: str, names: list[str], grid: list[dict[str, int]], dtype_name: str,
          root: Path, deadline: float, reps: int, fresh: bool) -> None:
    os.environ.update(symmetric.NO_MULTICAST)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init}", rank=rank, world_size=world, timeout=TIMEOUT,
                            device_id=torch.device("cuda", rank))
    identity, dtype = device_identity(rank), getattr(torch, dtype_name)
    skipped = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, disable=rank != 0) as progress:
            ranks = Ranks(rank, world, progress.console.log)
            task = progress.add_task("tuning", total=len(names) * len(grid))
            for name in names:
                tuned = all_reduce.TUNED[name]
                path = root / identity.name / f"{name}.json"
                entries = ranks.from_rank0(_resumed(path, tuned, fresh, ranks.log) if rank == 0 else None)
                for shape in grid:
                    progress.update(task, description=f"{name} {shape_text(shape)}")
                    if any(e.matches(dtype_name, shape) for e in entries):
                        pass
                    elif not ranks.from_rank0(time.monotonic() < deadline):
                        skipped.append(f"{name} {shape_text(shape)}")
                    else:
                        entry = tune_shape(tuned, shape, dtype, ranks, reps)
                        if entry is None:
                            ranks.log(f"  {name} {shape_text(shape)}: no candidate passed; keeping the default")
                        else:
                            entries.append(entry)
                            ranks.log(f"{name} {shape_text(shape)}: {entry.time_us:.2f} us ({entry.source}; "
                                      f"default {entry.seed_time_us} us) {entry.config}")
                    progress.advance(task)
                if rank == 0 and entries:
                    config_store.save(path, name, identity.name, identity.family, dispatch.spec_hash(tuned),
                                      tuned.dim_names, entries)
    finally:
        dist.destroy_process_group()
    if skipped and rank == 0:
        print(f"budget reached; not tuned (re-run to resume): {', '.join(skipped)}")
        sys.exit(BUDGET_EXIT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_grid_arguments(parser)
    parser.add_argument("--budget-minutes", type=float, default=60.0, help="stop starting new shapes after this")
    parser.add_argument("--out", type=Path, default=None, help="config root (default: the package's configs/)")
    parser.add_argument("--fresh", action="store_true", help="ignore existing results instead of resuming")
    parser.add_argument("--reps", type=int, default=20, help="calls per captured graph")
    args = parser.parse_args(argv)
    names = list(all_reduce.TUNED) if args.ops == "all" else args.ops.split(",")
    unknown = [n for n in names if n not in all_reduce.TUNED]
    if unknown:
        parser.error(f"--ops: unknown op names {unknown}; choose from {sorted(all_reduce.TUNED)}")
    gpus = torch.cuda.device_count()
    if gpus < 2:
        cuda = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a torch built without CUDA"
        print(f"autotune_tp tunes the all_reduce_ ops across GPUs: it needs at least two CUDA GPUs on this host, "
              f"found {gpus} (torch {torch.__version__}, {cuda})", file=sys.stderr)
        return 2
    dims = [d.name for d in all_reduce.PROBLEM]
    grid: list[dict[str, int]] = []
    for text in args.shape or [""]:
        selection = parse_shape(parser, text) if text else {}
        if set(selection) - set(dims) or selection.get("W", [gpus]) != [gpus]:
            parser.error(f"--shape: the all_reduce_ ops have the dims {dims} (W: this host's {gpus} GPUs), "
                         f"got {text!r}")
        grid += [s for s in shapes(all_reduce.PROBLEM, {**selection, "W": [gpus]}) if s not in grid]
    root = args.out or config_store.config_root()
    print(f"tuning {len(grid)} shapes of {len(names)} ops on {gpus} x {torch.cuda.get_device_name()}, budget "
          f"{args.budget_minutes:g} min, results in {root}")
    deadline = time.monotonic() + 60 * args.budget_minutes
    with tempfile.TemporaryDirectory() as scratch:
        context = multiprocessing.get_context("spawn")
        processes = [context.Process(target=_rank, args=(rank, gpus, f"{scratch}/init", names, grid, args.dtype, root,
                                                         deadline, args.reps, args.fresh)) for rank in range(gpus)]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
    codes = [p.exitcode for p in processes]
    if codes[0] == BUDGET_EXIT and not any(codes[1:]):
        return 1
    if any(codes):
        print(f"a rank failed: exit codes {codes}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
