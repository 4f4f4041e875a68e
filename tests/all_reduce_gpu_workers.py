"""The ranks of the 2-GPU all_reduce tests (tests/test_all_reduce_gpu.py): one process per GPU, NCCL.

Each rank makes every fused call with its own partial inputs and saves, on the CPU, what it wrote and which
path each op took to ``<out>/rank<r>.pt``; the test compares the ranks with each other and with the reference.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

import torch
import torch.distributed as dist

from all_reduce_workers import as_bytes, call_kwargs, cases, saved_result  # noqa: F401 - the test reads them from here
from helion_fusions.ops import all_reduce
from helion_fusions.runtime.registry import OpSpec
from helion_fusions.runtime.symmetric import NO_MULTICAST
SHAPES = ((1, 4096), (7, 4096), (33, 2048), (5, 17), (3000, 1024))
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
if os.environ.get("ALL_REDUCE_GPU_QUICK") == "1":  # a first look: bf16 and three shapes (each case compiles)
    SHAPES, DTYPES = ((1, 4096), (5, 17), (3000, 1024)), (torch.bfloat16,)
GRAPH_OP = "fused_add_rms_norm_static_fp8_quant"
ZERO_COPY_OP = "rms_norm_dynamic_per_token_quant"
TIMEOUT = datetime.timedelta(seconds=300)  # a rank may wait while the other compiles


def on_gpu(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def written(base: OpSpec, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {name: kwargs[name].cpu() for name in base.mutated_args if kwargs.get(name) is not None}


def fused(name: str, copy_in: bool = True, algorithm: str = all_reduce.ONE_SHOT) -> bool:
    """Whether calls of ``name`` have taken the fused path with ``algorithm`` (a laid-out fused launch exists)."""
    return any(key[0] == name and key[1] is copy_in
               and json.loads(key[2]).get(all_reduce.ALGORITHM, all_reduce.ONE_SHOT) == algorithm
               for key in all_reduce._plans)


def refreshed(base: OpSpec, shape: tuple[int, int], dtype: torch.dtype, rank: int, seed: int) -> dict[str, Any]:
    """The call's inputs (the partial input and a residual) drawn again, for a replay with new data."""
    generator = torch.Generator().manual_seed(seed * 100 + rank)
    kwargs = call_kwargs(base, shape, dtype, rank)
    kwargs["input"] = (torch.randn(shape, generator=generator) * (1 + rank)).to(dtype)
    if kwargs.get("residual") is not None:
        kwargs["residual"] = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return kwargs


def _graph(world: str, rank: int) -> list[dict[str, Any]]:
    """One op captured in a CUDA graph after an eager call, replayed on new inputs copied into its buffers."""
    base = next(b for b in all_reduce.BASES if b.name == GRAPH_OP)
    op = all_reduce.OPS[all_reduce.PREFIX + base.name]
    shape, dtype = (7, 4096), torch.bfloat16
    kwargs = on_gpu(refreshed(base, shape, dtype, rank, 0))
    op(**kwargs, group_name=world)  # agrees, sets up the workspace, compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        op(**kwargs, group_name=world)
    replays = []
    for seed in (1, 2):
        fresh = refreshed(base, shape, dtype, rank, seed)
        for name in ("input", "residual"):
            kwargs[name].copy_(fresh[name])
        graph.replay()
        torch.cuda.synchronize()
        replays.append({"seed": seed, "outputs": written(base, kwargs)})
    return replays


def _zero_copy(world: str, rank: int, algorithm: str) -> dict[str, Any]:
    """The producer writes its partial input into the workspace; the op reads it there (no copy)."""
    base = next(b for b in all_reduce.BASES if b.name == ZERO_COPY_OP)
    shape, dtype = (7, 4096), torch.bfloat16
    kwargs = on_gpu(call_kwargs(base, shape, dtype, rank))
    space = all_reduce.workspace(world, *shape, dtype)
    space.copy_(kwargs["input"])
    kwargs["input"] = space
    all_reduce.OPS[all_reduce.PREFIX + base.name](**kwargs, group_name=world)
    torch.cuda.synchronize()
    return {"fused": fused(all_reduce.PREFIX + base.name, copy_in=False, algorithm=algorithm),
            "outputs": written(base, kwargs)}


def run(rank: int, world_size: int, init_file: str, out: str) -> None:
    os.environ.update(NO_MULTICAST)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=TIMEOUT, device_id=torch.device("cuda", rank))
    with saved_result(rank, out) as result:
        world = dist.group.WORLD.group_name
        for algorithm in (all_reduce.ONE_SHOT, all_reduce.TWO_SHOT):
            all_reduce._forced_algorithm = algorithm
            outputs, paths = [], []
            for base, shape, dtype in cases(SHAPES, DTYPES):
                kwargs = on_gpu(call_kwargs(base, shape, dtype, rank))
                all_reduce.OPS[all_reduce.PREFIX + base.name](**kwargs, group_name=world)
                torch.cuda.synchronize()
                outputs.append(written(base, kwargs))
                paths.append(fused(all_reduce.PREFIX + base.name, algorithm=algorithm))
            result[algorithm] = {"outputs": outputs, "fused": paths, "graph": _graph(world, rank),
                                 "zero_copy": _zero_copy(world, rank, algorithm)}
        all_reduce._forced_algorithm = None
