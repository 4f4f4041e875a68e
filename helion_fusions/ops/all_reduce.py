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

Two paths, the same bytes:

* **fused** (CUDA tensors, an NCCL group, symmetric memory on every rank): one Helion kernel
  (:mod:`helion_fusions.kernels.all_reduce`) reads every rank's input from a symmetric workspace, sums,
  normalizes and quantizes. The op copies ``input`` into the workspace inside the kernel, unless ``input``
  is the workspace: a producer that writes its output into :func:`workspace` saves that copy. Its config names
  the algorithm (:data:`ALGORITHM`): one-shot, every rank reducing every row (the default), or two-shot, each
  rank reducing its share of the rows and the ranks gathering the quantized results (from ``W`` tokens on;
  fewer run one-shot).
* **fallback** (anything else, one warning per op names why): ``torch.distributed.all_gather`` of the
  inputs, the ordered fp32 sum, and ``<op>``.

No rank hangs on another's bad call: before any data moves, each rank checks its arguments as ``<op>``
does, and the ranks exchange (status, whether they can take the fused path, input shape, dtype, and a
digest of the kernel variant and layout the call needs). If a rank failed or the ranks differ, every
rank raises the same ValueError, naming each rank's problem. The variant includes the fused kernel's
config, from this GPU's config file (:func:`fused_config`): ranks whose files differ raise alike. The
fused path is taken only where every rank offers it; its setup (the workspace's allocation and
rendezvous, the kernel's compile) ends with an exchange of every rank's outcome, so a failure on one
rank sends every rank to the fallback. The exchange reads its result on the host, so it runs once per
(op, group, input shape, dtype, variant): a CUDA-graph capture replays only a call agreed before (call
the op once first; that call also sets up the workspace and compiles the kernel). A rank whose call
matches one agreed before does not exchange again, so ranks must make their calls in the same order: a
call that differs from the others' only on a rank where the others repeat an agreed call is not caught.
"""

from __future__ import annotations

import json
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import helion
import torch
import torch.distributed as dist

from helion_fusions.kernels.all_reduce import all_reduce_rms_norm_kernel
from helion_fusions.ops.rms_norm import RMS_NORM, rows_in_registers
from helion_fusions.quant import Quant
from helion_fusions.runtime import dispatch, symmetric
from helion_fusions.runtime.launcher import fast_launch
from helion_fusions.runtime.library import register_composite
from helion_fusions.runtime.registry import (
    NAMESPACE,
    REGISTRY,
    Dim,
    KernelLaunch,
    OpSpec,
    Shape,
    TunedKernel,
    bind,
    tokens_dim,
)

PREFIX = "all_reduce_"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_DIMS = 4  # input dims described in the exchange
# signal-pad slots per rank that a workspace provides: one per program of the persistent kernel (one program
# per SM: 132 on an H200), with room for larger GPUs
PROGRAM_SLOTS = 512
# the problem key of the fused kernel's configs: the world size (only configs tuned for it apply), then as the
# rms_norm ops; the grid is what `make autotune-tp` tunes and `python -m perf.bench_tp` measures
PROBLEM = (Dim("W", (2,), exact=True), tokens_dim((1, 8, 32, 128, 512, 2048, 8192)), Dim("H", (4096, 8192)))
ROWS_PER_TILE = (1, 2, 4, 8)
NUM_WARPS = (4, 8, 16, 32)
ELEMENTS_PER_THREAD = (4, 64)  # per thread, in a candidate's tile: fewer leave threads idle, more spill
# the fused kernel's algorithm, a key of its config ("one_shot" where absent): every rank reads every peer's
# rows (one-shot), or each rank reduces, normalizes and quantizes every W-th row and the ranks gather the
# results (two-shot; see kernels/all_reduce.py)
ALGORITHM, ONE_SHOT, TWO_SHOT = "algorithm", "one_shot", "two_shot"
STAGES = ("out", "scale", "residual")  # the two-shot's symmetric buffers of results, one allocation each

_forced_algorithm: str | None = None  # tests: every fused call takes this algorithm (the config's rows and warps)
_agreed: dict[tuple[Any, ...], bool] = {}  # agreed calls -> whether they take the fused path
_warned: set[str] = set()
_fallback_reasons: dict[tuple[Any, ...], str] = {}


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


def agree(op: str, group: dist.ProcessGroup, group_name: str, input: Any, error: Exception | None,
          variant: int = 0, offer: Callable[[], bool] | None = None, variant_text: str = "") -> bool:
    """Every rank returns the same path, or every rank raises the same ValueError: some rank's arguments
    failed its checks (``error``), or the ranks' inputs differ in shape or dtype, or their calls in
    ``variant`` (a digest of the kernel variant, config and layout a fused call needs; ``variant_text``
    names its config in the error).

    ``offer``: this rank can take the fused path, and this sets it up (collectively: every rank that
    offered calls it, and it returns the same on every rank). Returns True where every rank offered and
    the setup succeeded everywhere: the fused path; False: the fallback."""
    key = (op, group_name, tuple(_describe(input)), getattr(input, "device", None), variant)
    if error is None and key in _agreed:
        return _agreed[key]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{op}: this call (input {list(getattr(input, 'shape', []))}) was never made before the "
                           "CUDA-graph capture; call it once first, so the ranks agree on it outside the capture")
    mine = torch.tensor([int(error is None), int(offer is not None), *_describe(input), variant], dtype=torch.int64,
                        device=_exchange_device(group))
    world = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    rows = [g.tolist() for g in gathered]
    if all(row[0] for row in rows) and all(row[2:] == rows[0][2:] for row in rows):
        fused = all(row[1] for row in rows)
        if fused:
            fused = offer()
        _agreed[key] = fused
        return fused
    details: list[Any] = [None] * world
    dist.all_gather_object(details, (None if error is None else f"{type(error).__name__}: {error}", variant_text),
                           group=group)
    variants_differ = len({row[-1] for row in rows}) > 1
    problems = []
    for rank, (row, (message, text)) in enumerate(zip(rows, details)):
        if message is not None:
            problems.append(f"rank {rank}: {message}")
        else:
            dtype = _DTYPES[row[-2]] if row[-2] < len(_DTYPES) else "another dtype"
            shape = [s for s in row[3:-2] if s >= 0] + (["..."] if row[2] > _MAX_DIMS else [])
            described = f"rank {rank}: input {shape} {dtype}"
            if variants_differ:
                described += (f", call variant {row[-1]:#x} (flags, optional arguments, layouts, input in the "
                              f"workspace, kernel config){': ' + text if text else ''}")
            problems.append(described)
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


# --- the fused path -------------------------------------------------------------------------

def default_config(shape: Shape) -> helion.Config:
    """The fused kernel's config where no config file has one: a function of the agreed (T, H) only.

    Persistent (symmetric-memory kernels must be), one program per SM. Each tile of rows costs two barriers,
    so larger calls take more rows per tile; a row's bytes do not depend on it (batch invariance).
    """
    tokens, hidden = shape["T"], shape["H"]
    rows = 1 if tokens <= 1024 else 2 if tokens <= 2048 else 4
    return helion.Config(block_sizes=[rows], num_warps=min(32, (4 if hidden <= 2048 else 8) * rows),
                         pid_type="persistent_blocked")


def candidate_configs(shape: Shape) -> list[helion.Config]:
    """What `make autotune-tp` tries on a shape: the default first, then each rows per tile (up to the token
    count) and warp count whose tile holds ``ELEMENTS_PER_THREAD`` elements per thread, persistent."""
    configs = [default_config(shape)]
    low, high = ELEMENTS_PER_THREAD
    # two-shot where every rank owns a row: a tile is rows per rank, cdiv(T, W) rows at most
    algorithms = [(ONE_SHOT, max(shape["T"], 1))] + ([(TWO_SHOT, -(-shape["T"] // shape["W"]))]
                                                     if shape["T"] >= shape["W"] else [])
    for algorithm, most_rows in algorithms:
        extra = {} if algorithm == ONE_SHOT else {ALGORITHM: TWO_SHOT}
        for rows in ROWS_PER_TILE:
            for warps in NUM_WARPS:
                config = helion.Config(block_sizes=[rows], num_warps=warps, pid_type="persistent_blocked", **extra)
                if rows <= most_rows and low <= rows * shape["H"] / (32 * warps) <= high and config not in configs:
                    configs.append(config)
    return configs


def algorithm(config: helion.Config) -> str:
    return config.config.get(ALGORITHM, ONE_SHOT)


def helion_config(config: helion.Config) -> helion.Config:
    """``config`` less the algorithm: what Helion compiles (the algorithm is the kernel's TWO_SHOT flag)."""
    return helion.Config(**{k: v for k, v in config.config.items() if k != ALGORITHM})


def config_problem(config: dict[str, Any], shape: Shape | None = None) -> str | None:
    """What a stored config must not do: leave the persistent layout of one program per SM (each program waits
    at barriers for the same program on every rank: every one must be resident), or loop over a row, or name
    an algorithm other than one-shot and two-shot."""
    if config.get(ALGORITHM, ONE_SHOT) not in (ONE_SHOT, TWO_SHOT):
        return f"{ALGORITHM} must be {ONE_SHOT!r} or {TWO_SHOT!r}, got {config[ALGORITHM]!r}"
    if config.get("pid_type") not in ("persistent_blocked", "persistent_interleaved"):
        return f"pid_type must be persistent_blocked or persistent_interleaved, got {config.get('pid_type')!r}"
    if config.get("num_sm_multiplier", 1) != 1:
        return f"num_sm_multiplier must be 1 (one program per SM), got {config['num_sm_multiplier']!r}"
    return rows_in_registers(config)


def fused_config(name: str, launch: KernelLaunch, world: int) -> tuple[helion.Config, str]:
    """The fused kernel's config for op ``name``'s call with ``launch`` (the rms_norm op's) on ``world`` ranks,
    and where it comes from: this GPU's config file for the op, found and checked as every op's is (problem
    key ``{W, T, H}``; only entries tuned for this W apply), else :func:`default_config`."""
    problem = {"W": world, **launch.problem}
    if launch.device.type != "cuda":  # no fused kernel runs off a GPU, and no GPU to look configs up for
        config, source = default_config(problem), "the architecture default"
    else:
        config, source = dispatch.tuned_config(TUNED[name], problem, launch.dtype, launch.device.index or 0,
                                               dispatch.batch_invariant())
    if algorithm(config) == TWO_SHOT and problem["T"] < world:
        # a config tuned for more tokens (the tuner tries two-shot from W tokens on): here a rank would own no
        # row, and at one token a two-shot tile of several rows does not compile (a size-1 dim)
        config, source = helion_config(config), source + ", one-shot for fewer tokens than ranks"
    if _forced_algorithm is not None:
        config = helion.Config(**{**config.config, ALGORITHM: _forced_algorithm})
        source += f", {ALGORITHM} forced to {_forced_algorithm}"
    return config, source


def config_text(config: helion.Config) -> str:
    return json.dumps(dict(config), sort_keys=True)


def stage_shapes(launch: KernelLaunch, world: int, two_shot: bool) -> tuple[tuple[tuple[int, ...], torch.dtype], ...]:
    """The shape and dtype of each of :data:`STAGES` for the fused kernel's call: the two-shot's results for its
    ``cdiv(T, W)`` rows (out as the kernel views it, the scales row-major, the residual), or a one-element
    stand-in where the call has none or runs one-shot (the kernel takes the argument, never reads it)."""
    x, residual, _, out, scale_out, *_ = launch.args
    quant, has_residual = launch.args[9], launch.args[10]
    tokens, groups, group = x.shape
    rows = -(-tokens // world)
    unused = ((1,), torch.float32)
    if not two_shot:
        return (unused, unused, unused)
    scale = {int(Quant.PER_TOKEN): ((rows,), scale_out.dtype), int(Quant.PER_GROUP): ((rows, groups), scale_out.dtype),
             int(Quant.NVFP4): ((rows * groups,), torch.uint8)}.get(int(quant), unused)
    return (((rows, *out.shape[1:]), out.dtype), scale,
            ((rows, groups, group), residual.dtype) if has_residual else unused)


def stages(group: dist.ProcessGroup | None, group_name: str, launch: KernelLaunch, world: int,
           two_shot: bool) -> tuple[torch.Tensor, ...] | None:
    """The stage buffers of the call (see :func:`stage_shapes`): set up where ``group`` is given (collective on
    first use, as :func:`symmetric.workspace`), else only those set up before; None where one is missing."""
    found = []
    for role, (shape, dtype) in zip(STAGES, stage_shapes(launch, world, two_shot)):
        hidden = 1 if len(shape) == 1 else int(torch.Size(shape[1:]).numel())
        if group is None:
            space = symmetric.known(group_name, shape[0], hidden, dtype, launch.device, role)
        else:
            space = symmetric.workspace(group, group_name, shape[0], hidden, dtype, launch.device, PROGRAM_SLOTS, role)
        if space is None:
            return None
        found.append(space.view(shape))
    return tuple(found)


def _kernel_args(launch: KernelLaunch, space: symmetric.Workspace, group_name: str, copy_in: bool,
                 staged: tuple[torch.Tensor, ...], two_shot: bool) -> tuple[Any, ...]:
    """The fused kernel's arguments, from the rms_norm kernel's launch of the same call (its arguments are
    ``x, residual, weight, out, scale_out, scale_words, scale_in, epsilon, amax_floor, *flags``)."""
    x = launch.args[0]
    rows = space.rows(x.shape[0]).view(x.shape)
    return (x, rows, space.signal_pads, *launch.args[1:7], *staged, *launch.args[7:9], group_name, space.rank,
            copy_in, two_shot, *launch.args[9:])


def _is_workspace(input: torch.Tensor, space: symmetric.Workspace | None) -> bool:
    return space is not None and input.is_contiguous() and input.data_ptr() == space.buffer.data_ptr()


def _unavailable(group: dist.ProcessGroup, input: torch.Tensor, launches: tuple[KernelLaunch, ...]) -> str | None:
    """Why this rank cannot offer the fused path for this call (None: it can)."""
    reason = symmetric.unavailable_reason(group, input.device)
    if reason is not None:
        return reason
    tokens, hidden = input.shape
    if tokens == 0:
        return "an empty input"
    if not symmetric.fits(tokens, hidden, input.dtype):
        return f"a workspace for {tokens} x {hidden} {input.dtype} would exceed {symmetric.MAX_BYTES} bytes"
    if len(launches) != 1:
        return "a call the rms_norm kernel does not serve in one launch"
    return None


def variant(launch: KernelLaunch, copy_in: bool, config: helion.Config) -> int:
    """What the ranks' fused kernels and their layouts must agree on, as a 32-bit digest: the kernel variant
    (dtypes, hidden size, quant flags), which arguments share storage, each tensor's shape and strides,
    whether the input is copied into the workspace, and the kernel's config."""
    layout = [(tuple(a.shape), a.stride()) for a in launch.args if isinstance(a, torch.Tensor)]
    return zlib.crc32(repr((launch.key, dispatch.storage_pattern(launch.args), layout, copy_in,
                            config_text(config))).encode())


_plans: dict[tuple[Any, ...], Callable[[tuple[Any, ...]], None]] = {}


def plan(base: OpSpec, name: str, launch: KernelLaunch, op_args: tuple[Any, ...], space: symmetric.Workspace,
         group_name: str, copy_in: bool, config: helion.Config) -> Callable[[tuple[Any, ...]], None]:
    """Compile (once) and lay out the fused launch with ``config`` for calls with this signature (``op_args``:
    the rms_norm op's arguments, in its schema's order); builds, never launches. A kernel that cannot run
    here (too many registers for its warps, say) raises here, before any rank launches."""
    key = (name, copy_in, config_text(config), dispatch.call_signature(op_args))
    found = _plans.get(key)
    if found is not None:
        return found
    two_shot = algorithm(config) == TWO_SHOT
    staged = stages(None, group_name, launch, space.world_size, two_shot)
    if staged is None:
        raise RuntimeError("the fused kernel's stage buffers are not set up (call stages() with the group first)")
    args = _kernel_args(launch, space, group_name, copy_in, staged, two_shot)
    device = launch.device
    programs = helion.runtime.get_num_sm(device)
    if programs > PROGRAM_SLOTS:
        raise RuntimeError(f"{programs} SMs: the workspace's signal pads hold {PROGRAM_SLOTS} programs per rank")
    kernel = dispatch.kernel_for(all_reduce_rms_norm_kernel, dispatch.storage_pattern(args))
    compiled = kernel.bind(args).compile_config(helion_config(config))
    laid_out = fast_launch(compiled, args, op_args, device.index or 0)
    if laid_out is None:  # launch through Helion's host code, with this call's views
        dispatch.build_triton(compiled, args)

        def laid_out(call_args: tuple[Any, ...]) -> None:
            (again,) = base.prepare(**dict(zip(base.arg_names, call_args)))
            compiled(*_kernel_args(again, space, group_name, copy_in,
                                   stages(None, group_name, again, space.world_size, two_shot), two_shot))
    _plans[key] = laid_out
    return laid_out


def _set_up(base: OpSpec, name: str, group: dist.ProcessGroup, group_name: str, launch: KernelLaunch,
            op_args: tuple[Any, ...], copy_in: bool, config: helion.Config) -> bool:
    """The fused path's setup for an agreed call, on every rank: the workspace, then the kernel's compile; True
    where both succeeded on every rank (else every rank records why, and falls back)."""
    x, device = launch.args[0], launch.device
    tokens, hidden = launch.problem["T"], launch.problem["H"]
    space = symmetric.workspace(group, group_name, tokens, hidden, x.dtype, device, PROGRAM_SLOTS)
    if space is None:
        _fallback_reasons[(name, group_name)] = symmetric.failure(group_name, tokens, hidden, x.dtype, device) or ""
        return False
    if stages(group, group_name, launch, space.world_size, algorithm(config) == TWO_SHOT) is None:
        _fallback_reasons[(name, group_name)] = "the symmetric stage buffers could not be set up on every rank"
        return False
    problem = None
    try:
        plan(base, name, launch, op_args, space, group_name, copy_in, config)
    except Exception as error:  # noqa: BLE001 - a compile failure on one rank sends every rank to the fallback
        problem = f"the fused kernel does not build: {type(error).__name__}: {str(error).splitlines()[0][:300]}"
    failed = symmetric.all_ranks_ok(group, device, problem)
    if failed:
        _fallback_reasons[(name, group_name)] = "; ".join(failed)
        return False
    return True


def workspace(group_name: str, tokens: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """The symmetric workspace's first ``tokens`` rows ``[tokens, hidden]`` on the current GPU, for a producer to
    write its partial result into and pass as ``input``: the op then skips its copy into the workspace.

    Collective on first use for each (group, dtype, power-of-two token capacity, hidden): every rank of the
    group calls it in the same order, outside CUDA-graph capture. Raises RuntimeError on every rank where
    some rank cannot set it up (then pass ordinary tensors; the op falls back).
    """
    group = process_group("workspace", group_name)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    reason = symmetric.unavailable_reason(group, device)
    if reason is not None:
        raise RuntimeError(f"workspace: no symmetric memory here ({reason})")
    if not symmetric.fits(tokens, hidden, dtype):
        raise RuntimeError(f"workspace: {tokens} x {hidden} {dtype} exceeds {symmetric.MAX_BYTES} bytes")
    space = symmetric.workspace(group, group_name, tokens, hidden, dtype, device, PROGRAM_SLOTS)
    if space is None:
        raise RuntimeError(f"workspace: {symmetric.failure(group_name, tokens, hidden, dtype, device)}")
    return space.rows(tokens)


def _declare(base: OpSpec) -> Any:
    name, schema = PREFIX + base.name, with_group(base.schema)
    arguments = torch._C.parse_schema(f"{NAMESPACE}::{name}{schema}").arguments
    names = tuple(a.name for a in arguments)
    defaults = {a.name: a.default_value for a in arguments if a.has_default_value()}

    def implementation(*args: Any, **kwargs: Any) -> None:
        call = bind(name, names, defaults, args, kwargs)
        group_name = call.pop("group_name")
        group = process_group(name, group_name)
        launches: tuple[KernelLaunch, ...] = ()
        try:
            launches = base.prepare(**call)  # the rms_norm op's own argument checks, before any rank moves data
            device = _exchange_device(group)
            if call["input"].device.type != device.type:
                raise ValueError(f"{name}: input: expected a {device.type} tensor for the group's "
                                 f"{dist.get_backend(group)} backend, got one on {call['input'].device}")
            error = None
        except (ValueError, TypeError) as failed:
            error = failed
        input = call["input"]
        op_args = tuple(call.values())
        reason, copy_in, digest, offer, config, source = "its arguments", True, 0, None, None, ""
        if error is None:
            if len(launches) == 1:
                space = symmetric.known(group_name, *input.shape, input.dtype, input.device)
                copy_in = not _is_workspace(input, space)
                config, source = fused_config(name, launches[0], dist.get_world_size(group))
                digest = variant(launches[0], copy_in, config)
            reason = _unavailable(group, input, launches)
            if reason is None:
                launch = launches[0]

                def offer() -> bool:
                    return _set_up(base, name, group, group_name, launch, op_args, copy_in, config)
        text = "" if config is None else f"config {config_text(config)} from {source}"
        if agree(name, group, group_name, input, error, digest, offer, text):
            space = symmetric.known(group_name, *input.shape, input.dtype, input.device)
            plan(base, name, launches[0], op_args, space, group_name, copy_in, config)(op_args)
            return
        if name not in _warned:
            _warned.add(name)
            why = reason or _fallback_reasons.get((name, group_name)) or "another rank cannot use symmetric memory"
            warnings.warn(f"helion_fusions: {name}: no fused kernel for this call ({why}); running "
                          f"torch.distributed.all_gather, an fp32 sum in rank order and helion_fusions.{base.name}",
                          stacklevel=2)
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
# each op's configs, in configs/<device>/all_reduce_<op>.json: the fused kernel's, tuned per op
TUNED = {name: TunedKernel(name, all_reduce_rms_norm_kernel, PROBLEM, default_config, config_problem, (ALGORITHM,))
         for name in OPS}
