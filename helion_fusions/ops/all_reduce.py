"""all_reduce + RMSNorm (+ residual) + quant, for tensor-parallel layers: one op per rms_norm family op.

``torch.ops.helion_fusions.all_reduce_<op>`` takes the arguments of ``helion_fusions.<op>`` (an rms_norm
family op) with ``str group_name`` after its required ones: the name of a process group
(``group.group_name``; the default group's is ``torch.distributed.group.WORLD.group_name``). Every rank
of the group calls it with its partial ``input``.

Contract (NUMERICS.md): ``x = sum over ranks r = 0..W-1 of input_r``, accumulated in fp32 in rank order
and rounded once to the input dtype; then ``<op>``'s own contract on ``x`` (with a residual,
``round(f32(x) + f32(residual))`` is written back to ``residual``). Every rank writes identical bytes:
each sums the same gathered inputs in the same order. Where ``<op>`` normalizes ``input`` in place
(``fused_add_rms_norm``), this op writes its result into the rank's ``input``.

This version runs each op as ``torch.distributed.all_gather`` of the inputs, the ordered fp32 sum, and
``<op>`` (one warning per op says so); it has no single-kernel path over symmetric memory yet.

No rank hangs on another's bad call: before any data moves, each rank checks its arguments as ``<op>``
does, and the ranks exchange (status, input shape, dtype). If a rank failed or the ranks differ, every
rank raises the same ValueError, naming each rank's problem. The exchange reads its result on the host,
so it runs once per (op, group, input shape, dtype): a CUDA-graph capture replays only a call agreed
before (call the op once first).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist

from helion_fusions.ops.rms_norm import RMS_NORM
from helion_fusions.runtime.library import register_composite
from helion_fusions.runtime.registry import REGISTRY, NAMESPACE, OpSpec, bind

PREFIX = "all_reduce_"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_DIMS = 4  # input dims described in the exchange

_agreed: set[tuple[Any, ...]] = set()
_warned: set[str] = set()


def with_group(schema: str) -> str:
    """``schema`` with ``str group_name`` after its required arguments (before the first with a default)."""
    arguments, returns = schema[1:].split(") -> ", 1)
    parts = arguments.split(", ")
    first_default = next((i for i, p in enumerate(parts) if "=" in p), len(parts))
    return "(" + ", ".join(parts[:first_default] + ["str group_name"] + parts[first_default:]) + ") -> " + returns


def process_group(op: str, group_name: Any) -> dist.ProcessGroup:
    """The process group registered as ``group_name``, or a clear error naming the argument."""
    if not isinstance(group_name, str) or not group_name:
        raise TypeError(f"{op}: group_name: expected the name of a process group (a non-empty str), got {group_name!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(f"{op}: group_name {group_name!r}: torch.distributed is not initialized "
                         "(call torch.distributed.init_process_group first)")
    try:
        return dist.distributed_c10d._resolve_process_group(group_name)
    except (RuntimeError, ValueError, KeyError):
        raise ValueError(f"{op}: group_name: no process group is registered as {group_name!r} (pass group.group_name; "
                         f"the default group's is {dist.group.WORLD.group_name!r})") from None


def _exchange_device(group: dist.ProcessGroup) -> torch.device:
    """Where the group's collectives take their tensors (NCCL: the current GPU)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _describe(input: Any) -> list[int]:
    """The exchanged description of ``input``: its dims, its first ``_MAX_DIMS`` sizes (-1 past them), dtype."""
    if not isinstance(input, torch.Tensor):
        return [-1] * (_MAX_DIMS + 2)
    sizes = list(input.shape[:_MAX_DIMS]) + [-1] * (_MAX_DIMS - min(input.dim(), _MAX_DIMS))
    dtype = _DTYPES.index(input.dtype) if input.dtype in _DTYPES else len(_DTYPES)
    return [input.dim(), *sizes, dtype]


def agree(op: str, group: dist.ProcessGroup, group_name: str, input: Any, error: Exception | None) -> None:
    """Every rank returns, or every rank raises the same ValueError: some rank's arguments failed its checks
    (``error``), or the ranks' inputs differ in shape or dtype."""
    key = (op, group_name, tuple(_describe(input)), getattr(input, "device", None))
    if error is None and key in _agreed:
        return
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{op}: this call (input {list(getattr(input, 'shape', []))}) was never made before the "
                           "CUDA-graph capture; call it once first, so the ranks agree on it outside the capture")
    mine = torch.tensor([int(error is None), *_describe(input)], dtype=torch.int64, device=_exchange_device(group))
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    rows = [g.tolist() for g in gathered]
    if all(row[0] for row in rows) and all(row == rows[0] for row in rows):
        _agreed.add(key)
        return
    errors: list[Any] = [None] * world
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}", group=group)
    problems = []
    for rank, (row, message) in enumerate(zip(rows, errors)):
        if message is not None:
            problems.append(f"rank {rank}: {message}")
        else:
            dtype = _DTYPES[row[-1]] if row[-1] < len(_DTYPES) else "another dtype"
            shape = [s for s in row[2:-1] if s >= 0] + (["..."] if row[1] > _MAX_DIMS else [])
            problems.append(f"rank {rank}: input {shape} {dtype}")
    raise ValueError(f"{op}: the {world} ranks of group {group_name!r} do not make the same valid call, so none "
                     "of them runs it:\n  " + "\n  ".join(problems)) from error


def ordered_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """``sum(parts)`` accumulated in fp32 in list (rank) order, rounded once to their dtype."""
    total = parts[0].to(torch.float32, copy=True)
    for part in parts[1:]:
        total += part.to(torch.float32)
    return total.to(parts[0].dtype)


def reference(base: OpSpec, call: dict[str, Any], inputs: list[torch.Tensor]) -> None:
    """The contract for one rank's call (its arguments less ``group_name``), given every rank's ``input``."""
    summed = ordered_sum(inputs)
    if "input" in base.mutated_args:
        call["input"].copy_(summed)
    else:
        call = {**call, "input": summed}
    base.reference(**call)


def _declare(base: OpSpec) -> Any:
    name, schema = PREFIX + base.name, with_group(base.schema)
    arguments = torch._C.parse_schema(f"{NAMESPACE}::{name}{schema}").arguments
    names = tuple(a.name for a in arguments)
    defaults = {a.name: a.default_value for a in arguments if a.has_default_value()}

    def implementation(*args: Any, **kwargs: Any) -> None:
        call = bind(name, names, defaults, args, kwargs)
        group_name = call.pop("group_name")
        group = process_group(name, group_name)
        try:
            base.prepare(**call)  # the rms_norm op's own argument checks, before any rank moves data
            device = _exchange_device(group)
            if call["input"].device.type != device.type:
                raise ValueError(f"{name}: input: expected a {device.type} tensor for the group's "
                                 f"{dist.get_backend(group)} backend, got one on {call['input'].device}")
            error = None
        except (ValueError, TypeError) as failed:
            error = failed
        agree(name, group, group_name, call["input"], error)
        if name not in _warned:
            _warned.add(name)
            warnings.warn(f"helion_fusions: {name}: no fused multi-GPU kernel in this version; running "
                          f"torch.distributed.all_gather, an fp32 sum in rank order and helion_fusions.{base.name}",
                          stacklevel=2)
        input = call["input"]
        parts = [torch.empty_like(input, memory_format=torch.contiguous_format) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, input.contiguous(), group=group)
        summed = ordered_sum(parts)
        if "input" in base.mutated_args:
            input.copy_(summed)
        else:
            call["input"] = summed
        base.op(**call)

    return register_composite(name, schema, implementation)


BASES = tuple(spec for spec in REGISTRY.values() if spec.family == RMS_NORM.family)
OPS = {PREFIX + base.name: _declare(base) for base in BASES}
