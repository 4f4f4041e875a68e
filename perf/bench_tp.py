"""``python -m perf.bench_tp``: all_reduce + rms_norm (+ quant) over the GPUs of one host, a process per GPU.

For each ``all_reduce_<op>`` and shape, every rank runs, in CUDA graphs (medians of replays; each row holds
the slowest rank's time):

* ``nccl_unfused``: NCCL ``all_reduce`` of the input, then ``helion_fusions.<op>``;
* ``symm_unfused``: torch's symmetric-memory two-shot all-reduce (``symm_mem.two_shot_all_reduce_``), then
  ``<op>`` (empty where this torch or machine has none);
* ``compile_unfused``: NCCL ``all_reduce``, then ``torch.compile(<op>'s reference)``, the token dim dynamic;
* ``ours``: ``torch.ops.helion_fusions.all_reduce_<op>``.

``speedup_vs_best = best_baseline_us / ours_us``. Before timing, each path's outputs are compared with the
contract (``helion_fusions.ops.all_reduce.reference``): ``ours`` must match it byte for byte on every rank;
``nccl_flips`` counts the elements where NCCL's own summation order moved the NCCL path's output
(NUMERICS.md: reported, not hidden). Writes ``perf/results/<device>_x<W>.csv`` and ``.md``. Without two
GPUs it runs the comparisons only, on two CPU processes over gloo, and prints them.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import multiprocessing
import os
import statistics
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from tabulate import tabulate

from helion_fusions.ops import all_reduce
from helion_fusions.runtime import symmetric
from helion_fusions.runtime.device import device_identity
from helion_fusions.runtime.registry import REGISTRY, shape_text
from helion_fusions.tools.cli import parse_shape
from helion_fusions.tools.testing import clone_kwargs, compare_outputs, graph_of, outputs_ok, rank_input, replay_us
from perf.tables import RESULTS, write_csv

GRID = {d.name: d.grid for d in all_reduce.PROBLEM}  # the grid make autotune-tp tunes
TOKENS, HIDDEN = GRID["T"], GRID["H"]
OPS = ("rms_norm", "fused_add_rms_norm", "fused_add_rms_norm_static_fp8_quant", "rms_norm_dynamic_per_token_quant",
       "rms_norm_per_block_quant", "fused_add_rms_norm_nvfp4_quant")
NVFP4_TOKENS = (1, 128, 2048)
CPU_SHAPES = ((1, 256), (7, 256))
COLUMNS = ["device", "op", "world_size", "T", "H", "dtype", "nccl_unfused_us", "symm_unfused_us", "compile_unfused_us",
           "ours_us", "best_baseline_us", "speedup_vs_best", "nccl_flips", "torch", "helion", "repro"]


def _paths(base_name: str, group_name: str, symm: torch.Tensor | None,
           compiled: Callable[..., None]) -> dict[str, Callable[[dict[str, Any]], None] | None]:
    """Each path as a function of a copy of the op's arguments (this rank's partial input in ``input``)."""
    base = REGISTRY[base_name]
    ours = all_reduce.OPS[all_reduce.PREFIX + base_name]

    def nccl(call: dict[str, Any], then: Callable[..., None] = base.op) -> None:
        dist.all_reduce(call["input"])
        then(**call)

    def symm_mem(call: dict[str, Any]) -> None:
        symm.copy_(call["input"])  # the producer's write into the symmetric buffer
        torch.ops.symm_mem.two_shot_all_reduce_(symm, "sum", group_name)
        base.op(**{**call, "input": symm})

    return {"nccl_unfused": nccl, "symm_unfused": symm_mem if symm is not None else None,
            "compile_unfused": lambda call: nccl(call, compiled),
            "ours": lambda call: ours(**call, group_name=group_name)}


def _symmetric_buffer(like: torch.Tensor, group_name: str) -> torch.Tensor | None:
    """A symmetric-memory copy target for torch's two-shot all-reduce, or None where there is none."""
    try:
        from torch.distributed import _symmetric_memory as symm_mem

        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before torch 2.13, deprecated since
            symm_mem.enable_symm_mem_for_group(group_name)
        buffer = symm_mem.empty(like.shape, dtype=like.dtype, device=like.device)
        symm_mem.rendezvous(buffer, group_name)
        return buffer if hasattr(torch.ops.symm_mem, "two_shot_all_reduce_") else None
    except Exception:  # noqa: BLE001  (no symmetric memory here: the column stays empty)
        return None


def _graph_us(step: Callable[[], None], reps: int) -> float:
    """Median replay time per call of ``reps`` calls captured in a CUDA graph, the ranks starting together."""
    step()
    return replay_us(graph_of(step, reps), reps)


@functools.cache
def _compiled_reference(base_name: str) -> Callable[..., None]:
    """``torch.compile`` of the op's reference, the token dim dynamic: one per op for all its rows."""
    return torch.compile(REGISTRY[base_name].reference, dynamic=True)


def measure(base_name: str, shape: dict[str, int], dtype: torch.dtype, device: torch.device, rank: int, world: int,
            reps: int) -> dict[str, Any]:
    """One row on this rank: the paths' outputs against the contract, then (on GPUs) their times."""
    base = REGISTRY[base_name]
    group_name = dist.group.WORLD.group_name
    kwargs = base.make_inputs(shape, dtype, device)
    kwargs["input"] = rank_input(shape, dtype, device, rank)
    expected = clone_kwargs(kwargs)
    all_reduce.reference(base, expected, [rank_input(shape, dtype, device, r) for r in range(world)])
    gpu = device.type == "cuda"
    paths = _paths(base_name, group_name, _symmetric_buffer(kwargs["input"], group_name) if gpu else None,
                   _compiled_reference(base_name) if gpu else base.reference)
    row: dict[str, Any] = {"op": all_reduce.PREFIX + base_name, "world_size": world, **shape,
                           "dtype": str(dtype).removeprefix("torch.")}
    for name in ("nccl_unfused", "ours"):
        path = paths[name]
        call = clone_kwargs(kwargs)
        path(call)
        results = compare_outputs(base.mutated_args, call, expected)
        if name == "ours" and not outputs_ok(results, max_flip_fraction=0):
            raise AssertionError(f"rank {rank}: {row['op']} {shape_text(shape)}: ours differs from the contract: "
                                 f"{results}")
        if name == "nccl_unfused":
            row["nccl_flips"] = sum(r.flips + r.worse for r in results.values())
    if gpu:
        for name, path in paths.items():
            call = clone_kwargs(kwargs)
            row[f"{name}_us"] = _graph_us(lambda: path(call), reps) if path is not None else None
    return row


def _worker(rank: int, world: int, init: str, backend: str, jobs: list[tuple[str, dict[str, int]]], dtype: str,
            reps: int, out: str) -> None:
    os.environ.update(symmetric.NO_MULTICAST)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=5))
    try:
        rows = []
        for base_name, shape in jobs:
            row = measure(base_name, shape, getattr(torch, dtype), device, rank, world, reps)
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, row)  # each row keeps the slowest rank's times
            for key in row:
                if key.endswith("_us") and row[key] is not None:
                    row[key] = max(r[key] for r in gathered)
            rows.append(row)
        if rank == 0:
            torch.save(rows, out)
    finally:
        dist.destroy_process_group()


def summary(rows: list[dict]) -> str:
    """The table's headline figures: speedup over the best baseline, and ours at T <= 32."""
    speedups = [row["speedup_vs_best"] for row in rows]
    small = [row["ours_us"] for row in rows if row["T"] <= 32]
    lines = [f"- speedup_vs_best: geomean {statistics.geometric_mean(speedups):.2f}x over {len(rows)} rows, "
             f"{min(speedups):.2f}-{max(speedups):.2f}x; rows below 1.0: {sum(s < 1.0 for s in speedups)}"]
    if small:
        lines.append(f"- ours at T <= 32: {min(small):.1f}-{max(small):.1f} us")
    lines.append(f"- nccl_flips (the NCCL path off the contract by its summation order): "
                 f"{sum(row['nccl_flips'] for row in rows)}; ours equals the contract on every rank")
    return "\n".join(lines)


def write_results(rows: list[dict], out: Path) -> str:
    identity, label = device_identity(), torch.cuda.get_device_name()
    name = f"{identity.name}_x{rows[0]['world_size']}"
    for row in rows:
        baselines = [row[k] for k in ("nccl_unfused_us", "symm_unfused_us", "compile_unfused_us") if row.get(k)]
        row.update(device=identity.name, best_baseline_us=min(baselines), torch=version("torch"),
                   helion=version("helion"), repro=f"python -m perf.bench_tp --ops {row['op']} "
                                                   f"--shape T={row['T']},H={row['H']}")
        row["speedup_vs_best"] = row["best_baseline_us"] / row["ours_us"]
    write_csv(out / f"{name}.csv", COLUMNS, rows)
    shown = COLUMNS[1:13]
    table = tabulate([[r.get(c) for c in shown] for r in rows], headers=shown, floatfmt=".1f", tablefmt="github")
    text = (f"# all_reduce + rms_norm on {rows[0]['world_size']} x {label} ({name})\n\n"
            f"torch {version('torch')}, helion {version('helion')}; CUDA graphs, medians, the slowest rank's time "
            f"in us; written by `python -m perf.bench_tp`.\n\n{summary(rows)}\n\n{table}\n")
    (out / f"{name}.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default=",".join(all_reduce.PREFIX + o for o in OPS),
                        help=f"comma-separated, of {sorted(all_reduce.OPS)}")
    parser.add_argument("--shape", default=None, metavar="T=1/8,H=4096", help="token counts and hidden sizes")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--reps", type=int, default=20, help="calls per captured graph")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    names = args.ops.split(",")
    unknown = [n for n in names if n not in all_reduce.OPS]
    if unknown:
        parser.error(f"--ops: unknown {unknown}; choose from {sorted(all_reduce.OPS)}")
    gpus = torch.cuda.device_count()
    backend, world = ("nccl", gpus) if gpus >= 2 else ("gloo", 2)
    chosen = parse_shape(parser, args.shape) if args.shape else {}
    unknown_dims = set(chosen) - {"T", "H"}
    if unknown_dims:
        parser.error(f"--shape: the all_reduce_ ops have the dims T and H, not {sorted(unknown_dims)}")
    tokens, hidden = chosen.get("T"), chosen.get("H")
    jobs = []
    for name in names:
        base = name.removeprefix(all_reduce.PREFIX)
        if backend == "gloo":
            grid = [(t, h) for t, h in CPU_SHAPES]
        else:
            grid = [(t, h) for h in (hidden or HIDDEN) for t in (tokens or (NVFP4_TOKENS if "nvfp4" in base else TOKENS))]
        jobs += [(base, {"T": t, "H": h}) for t, h in grid]
    with tempfile.TemporaryDirectory() as scratch:
        context = multiprocessing.get_context("spawn")
        processes = [context.Process(target=_worker, args=(rank, world, f"{scratch}/init", backend, jobs, args.dtype,
                                                           args.reps, f"{scratch}/rows.pt")) for rank in range(world)]
        for process in processes:
            process.start()
        for process in processes:
            process.join()
        if any(p.exitcode != 0 for p in processes):
            print(f"a rank failed: exit codes {[p.exitcode for p in processes]}", file=sys.stderr)
            return 1
        rows = torch.load(f"{scratch}/rows.pt", weights_only=False)
    if backend == "gloo":
        print(f"No two GPUs: {world} CPU ranks over gloo; every path's outputs against the contract "
              "(ours byte for byte; nccl_flips: the all_reduce path's elements off by the reduction order)")
        print(tabulate([[r["op"], r["T"], r["H"], r.get("nccl_flips")] for r in rows],
                       headers=["op", "T", "H", "nccl_flips"], tablefmt="github"))
        return 0
    print(write_results(rows, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
