"""SiLU-and-mul and its quantized flavours, and the standalone quant ops, from one Helion kernel.

``y = round(silu(f32(gate))) * up`` for an input laid out ``[gate | up]`` (the product rounded to the input dtype as
well), with ``silu(g) = g / (1 + exp(-g))`` in fp32; or ``y = input`` for the standalone quant ops. Then one quant
epilogue from :func:`helion_fusions.quant.epilogues.store_quantized`: none, static fp8 (per tensor, token or
channel), dynamic per-token, per-group or per-tensor fp8, or nvfp4.

The kernel sees a row as ``[num_groups, group]`` and tiles both tokens and groups, so a decode-sized call
still spreads over many programs. Only the per-token flavour needs a whole row per program
(``num_groups == 1``). Dynamic per-tensor quantization needs the whole tensor's amax first: a single-row input
takes one launch; otherwise one launch takes the amax (an atomic max per tile), keeping the input in L2
(``evict_last``: T = 1024 took 0.89-0.94x the time on an H200), and a second quantizes it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, partial
from typing import Any

import helion
import torch

from helion_fusions import quant
from helion_fusions.kernels.silu_mul import silu, silu_mul_kernel, silu_mul_rows_kernel
import helion_fusions.ops.common as common
from helion_fusions.quant import Quant, StaticScale
from helion_fusions.runtime import checks
from helion_fusions.runtime.checks import FP8_DTYPES
from helion_fusions.runtime.library import register
from helion_fusions.runtime.registry import (
    Dim,
    KernelLaunch,
    OpSpec,
    Outputs,
    Shape,
    tokens_dim,
)

HIDDEN_GRID = (2048, 4096, 8192, 14336)
GROUP_SIZES = (64, 128)
TOKEN_GROUP_SIZES = (32, 64, 128)  # per_token_group_fp8_quant takes smaller groups too
POINTWISE_GROUP = 128  # groups of a row for the flavours that need no row reduction
# Gated per-token quant of at most this many rows, SPLIT_ROW_MIN_HIDDEN wide or more, splits each row over
# programs of POINTWISE_GROUP groups: one launch stores every group's amax, a second quantizes with their max.
# On an H200 (CUDA graph, L2 warm) a whole gated row per program took 5.4-5.9 us at H = 14336 (T = 1, 16), the
# split 3.6 us; at H = 8192 (and ungated at every width) the split's second launch (about 1 us) made it slower.
SPLIT_ROW_TOKENS = 16
SPLIT_ROW_MIN_HIDDEN = 12288
# Gated per-token quant from this token bucket on, this wide or wider, walks each row in two passes
# (silu_mul_rows_kernel). On an H200 at T = 1024-16384, H = 14336 it took 0.67-0.89x the time of a whole row per
# program (which leaves the activation's arithmetic unoverlapped); at H = 2048-8192 1.01-1.11x. The width is the
# log-midpoint of 8192 and 14336, where the config lookup (nearest tuned width) switches between their entries.
ROWS_MIN_BUCKET = 1024
ROWS_MIN_HIDDEN = 10837
# the input streamed through L2, the row walk's stash kept (H200, per-token T = 1024, H = 14336: 36.9 us, 40.1 without)
LOAD_POLICIES = ({"x": "first"}, {"x": "first", "stash": "last"})


# --- reference ------------------------------------------------------------------------------

def silu_and_mul_reference(input: torch.Tensor) -> torch.Tensor:
    """The unfused eager composite ``silu(gate) * up``, rounded to the input dtype after each step."""
    d = input.shape[-1] // 2
    return silu(input[:, :d].float()).to(input.dtype) * input[:, d:]


# --- host glue ------------------------------------------------------------------------------

def _launch(
    input: torch.Tensor,
    out: torch.Tensor,
    flavour: Quant,
    *,
    gated: bool,
    scale_out: torch.Tensor | None = None,
    scale_in: torch.Tensor | None = None,
    group: int | None = None,
    has_scale_ub: bool = False,
    use_ue8m0: bool = False,
    swizzled: bool = False,
    static_layout: StaticScale = StaticScale.TENSOR,
    fp8_max: float | None = None,
    amax_floor: float = quant.FP8_AMAX_FLOOR,
    scale_group_m: int = 1,
) -> KernelLaunch:
    tokens, width = input.shape
    hidden = width // 2 if gated else width
    group = group or pointwise_group(hidden)
    groups = hidden // group
    x = input.view(tokens, 2 if gated else 1, groups, group)
    if fp8_max is None:
        fp8_max = quant.fp8_max_for(out.dtype) if out.dtype in FP8_DTYPES else 0.0
    if scale_in is not None and static_layout is StaticScale.CHANNEL:  # as the kernel's [NG, G], a view
        step = scale_in.stride(0)
        scale_in = scale_in.as_strided((groups, group), (group * step, step))
    elif scale_in is not None and static_layout is not StaticScale.GROUP and flavour is not Quant.PER_TOKEN_OF_GROUPS:
        # a 0-dim scale as [1]
        scale_in = scale_in.reshape(-1)
    dummy = _placeholder(input.device)  # stands in for unused tensor arguments; never read
    flags = (gated, int(flavour), has_scale_ub, use_ue8m0, swizzled, int(static_layout), float(fp8_max))
    args = (x, common.kernel_view(out, flavour, tokens, groups), dummy if scale_out is None else scale_out,
            scale_out.view(torch.int32) if swizzled else dummy,  # 4-byte aligned: check_nvfp4_outputs
            dummy if scale_in is None else scale_in, float(amax_floor), scale_group_m, *flags)
    key = (input.dtype, out.dtype, hidden, group, *flags)
    return KernelLaunch(silu_mul_kernel, args, key, {"T": tokens, "H": hidden}, input.device, input.dtype)


@cache
def _placeholder(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.float32, device=device)


def _check_input(input: Any, gated: bool) -> tuple[int, int]:
    checks.check_input_2d("input", input)
    tokens, width = input.shape
    if gated and width % 2:
        raise ValueError(f"input: expected [num_tokens, 2 * d] laid out [gate | up], got an odd last dim {width}")
    return tokens, width // 2 if gated else width


def _check_fp8(name: str, value: Any, input: torch.Tensor, tokens: int, hidden: int) -> torch.Tensor:
    return checks.check_like(name, value, (tokens, hidden), input.device, FP8_DTYPES)


def _check_token_scale(name: str, scale: Any, input: torch.Tensor, tokens: int) -> torch.Tensor:
    return checks.check_tensor(name, scale, dtypes=(torch.float32,), shape=(tokens, 1), device=input.device)


def _op(gated: bool, prepare: Callable[..., tuple[KernelLaunch, ...]]):
    """Wrap a host wrapper: argument checks run first, and an empty input launches nothing."""
    def wrapper(**kwargs: Any) -> tuple[KernelLaunch, ...]:
        tokens, hidden = _check_input(kwargs["input"], gated)
        launches = prepare(tokens=tokens, hidden=hidden, **kwargs)
        return launches if tokens else ()
    return wrapper


# Flavours both kinds of op share, with ``gated`` bound per op.

def _activation(input: torch.Tensor, gated: bool) -> torch.Tensor:
    """What the op quantizes: ``silu(gate) * up``, or the input itself."""
    return silu_and_mul_reference(input) if gated else input


def pointwise_group(hidden: int) -> int:
    return POINTWISE_GROUP if hidden % POINTWISE_GROUP == 0 else hidden


def split_rows(tokens: int, hidden: int, gated: bool) -> bool:
    """Whether per-token quant of ``[tokens, hidden]`` splits its rows over programs (see SPLIT_ROW_TOKENS)."""
    return gated and tokens <= SPLIT_ROW_TOKENS and hidden % POINTWISE_GROUP == 0 and hidden >= SPLIT_ROW_MIN_HIDDEN


def walks_rows(tokens: int, hidden: int, gated: bool) -> bool:
    """Whether per-token quant walks its rows: ROWS_MIN_HIDDEN wide or wider, from ROWS_MIN_BUCKET by token
    bucket, as configs are picked."""
    return gated and hidden >= ROWS_MIN_HIDDEN and tokens_dim().bucket(tokens) >= ROWS_MIN_BUCKET


def _per_token_launches(input: torch.Tensor, result: torch.Tensor, scale_out: torch.Tensor,
                        scale_ub: torch.Tensor | None, *, gated: bool, tokens: int,
                        hidden: int) -> tuple[KernelLaunch, ...]:
    """Per-token quant: a row walked in two passes (:func:`walks_rows`), a row per program, or split over
    programs in two launches (:func:`split_rows`)."""
    has_ub = scale_ub is not None
    if walks_rows(tokens, hidden, gated):
        group = pointwise_group(hidden)
        view = (tokens, hidden // group, group)
        # the rounded activation, written whole by the first pass before the second reads it
        stash = common.scratch("silu_mul.rows", view, input.dtype, input.device)
        args = (input.view(tokens, 2, *view[1:]), stash, common.kernel_view(result, Quant.PER_TOKEN, *view[:2]),
                scale_out, _placeholder(input.device) if scale_ub is None else scale_ub.reshape(1),
                quant.FP8_AMAX_FLOOR, has_ub, quant.fp8_max_for(result.dtype))
        return (KernelLaunch(silu_mul_rows_kernel, args, (input.dtype, result.dtype, hidden, group, has_ub),
                             {"T": tokens, "H": hidden}, input.device, input.dtype),)
    if not split_rows(tokens, hidden, gated):
        return (_launch(input, result, Quant.PER_TOKEN, gated=gated, scale_out=scale_out, scale_in=scale_ub,
                        group=hidden, has_scale_ub=has_ub),)
    # written whole by the first launch before the second reads it; a launch plan keeps it for its calls
    amaxes = torch.empty(tokens, hidden // POINTWISE_GROUP, dtype=torch.float32, device=input.device)
    return (_launch(input, result, Quant.GROUP_AMAX, gated=gated, scale_out=amaxes, scale_in=scale_ub,
                    has_scale_ub=has_ub),
            _launch(input, result, Quant.PER_TOKEN_OF_GROUPS, gated=gated, scale_out=scale_out, scale_in=amaxes,
                    has_scale_ub=has_ub))


def _prepare_per_token(result, input, scale, scale_ub=None, *, gated, tokens, hidden):
    _check_fp8("result", result, input, tokens, hidden)
    _check_token_scale("scale", scale, input, tokens)
    checks.check_scale_ub("scale_ub", scale_ub, input.device)
    return _per_token_launches(input, result, scale.view(-1), scale_ub, gated=gated, tokens=tokens, hidden=hidden)


def _reference_per_token(result, input, scale, scale_ub=None, *, gated):
    y = _activation(input, gated)
    quant.quantize_per_group_reference(y, result, scale, y.shape[-1], scale_ub)


def _prepare_nvfp4(names, input, is_sf_swizzled_layout=True, *, gated, tokens, hidden, **tensors):
    """``names`` maps result / scale / global_scale to the op's own argument names."""
    result, block_scale, global_scale = (tensors[names[role]] for role in ("result", "scale", "global_scale"))
    checks.check_scalar_scale(names["global_scale"], global_scale, input.device)
    flat = common.check_nvfp4_outputs(names["result"], result, names["scale"], block_scale, tokens, hidden,
                                      input.device, is_sf_swizzled_layout)
    return (_launch(input, result, Quant.NVFP4, gated=gated, scale_out=flat, scale_in=global_scale,
                    group=quant.NVFP4_BLOCK, swizzled=bool(is_sf_swizzled_layout)),)


def _reference_nvfp4(names, input, is_sf_swizzled_layout=True, *, gated, **tensors):
    result, block_scale, global_scale = (tensors[names[role]] for role in ("result", "scale", "global_scale"))
    quant.quantize_nvfp4_reference(_activation(input, gated), result, block_scale, global_scale,
                                   is_sf_swizzled_layout)


# Activation ops ([gate | up] input).

def _prepare_silu_and_mul(result, input, *, tokens, hidden):
    checks.check_like("result", result, (tokens, hidden), input.device, (input.dtype,))
    return (_launch(input, result, Quant.NONE, gated=True),)


def _reference_silu_and_mul(result, input):
    result.copy_(silu_and_mul_reference(input))


def _prepare_silu_static(result, input, scale, *, tokens, hidden):
    _check_fp8("result", result, input, tokens, hidden)
    checks.check_scalar_scale("scale", scale, input.device)
    return (_launch(input, result, Quant.STATIC, gated=True, scale_in=scale),)


def _reference_silu_static(result, input, scale):
    quant.quantize_static_reference(silu_and_mul_reference(input), scale, result)


def _prepare_silu_per_block(out, input, scales, group_size, scale_ub=None, is_scale_transposed=False,
                            scale_ue8m0=False, *, tokens, hidden):
    _check_fp8("out", out, input, tokens, hidden)
    checks.check_group_size("group_size", group_size, hidden, GROUP_SIZES)
    scales = checks.check_group_scale("scales", scales, tokens, hidden // group_size, input.device,
                                      is_scale_transposed)
    has_ub = checks.check_scale_ub("scale_ub", scale_ub, input.device)
    return (_launch(input, out, Quant.PER_GROUP, gated=True, scale_out=scales, scale_in=scale_ub, group=group_size,
                    has_scale_ub=has_ub, use_ue8m0=bool(scale_ue8m0)),)


def _reference_silu_per_block(out, input, scales, group_size, scale_ub=None, is_scale_transposed=False,
                              scale_ue8m0=False):
    y = silu_and_mul_reference(input)
    scales = checks.group_scale_view(scales, y.shape[0], y.shape[1] // group_size, is_scale_transposed)
    quant.quantize_per_group_reference(y, out, scales, group_size, scale_ub, scale_ue8m0)


# Standalone quant ops ([T, H] input).

def _prepare_static_quant(result, input, scale, group_shape=None, *, tokens, hidden):
    _check_fp8("result", result, input, tokens, hidden)
    layout, scale, group_m, group_n = common.static_scale(scale, group_shape, tokens, hidden, input.device)
    group = group_n if layout is StaticScale.GROUP else None
    return (_launch(input, result, Quant.STATIC, gated=False, scale_in=scale, static_layout=layout, group=group,
                    scale_group_m=group_m),)


def _reference_static_quant(result, input, scale, group_shape=None):
    tokens, hidden = input.shape
    layout, scale, group_m, group_n = common.static_scale(scale, group_shape, tokens, hidden, input.device)
    if tokens == 0:
        return
    if layout is StaticScale.GROUP:  # one scale per element
        scale = scale.repeat_interleave(group_m, 0).repeat_interleave(group_n, 1)
    elif layout is not StaticScale.TENSOR:
        scale = scale.unsqueeze(1) if layout is StaticScale.TOKEN else scale.unsqueeze(0)
    quant.quantize_static_reference(input, scale, result)


def _tensor_scale(scale: Any, device: torch.device) -> torch.Tensor:
    """The element the per-tensor scale goes to: the first of ``scale``, as a [1] view. Like the engine op,
    any shape is taken (a [T, 1] tensor too); its other elements are left alone."""
    checks.check_tensor("scale", scale, dtypes=(torch.float32,), device=device)
    if scale.numel() == 0:
        raise ValueError(f"scale: expected at least one float32 element, got shape {list(scale.shape)}")
    return scale.as_strided((1,), (1,))


def _prepare_dynamic_quant(result, input, scale, *, tokens, hidden):
    _check_fp8("result", result, input, tokens, hidden)
    scale = _tensor_scale(scale, input.device)
    if tokens == 1:  # the row's amax is the tensor's: per-token quant
        return _per_token_launches(input, result, scale, None, gated=False, tokens=tokens, hidden=hidden)
    # an empty input launches nothing (the reference writes the floor scale); otherwise the first launch
    # leaves the scale in the scratch, and the second quantizes with it and copies it to ``scale``
    # int32 words (quant.AMAX_WORD ...), zero between calls: the amax launch's last tile resets them
    scratch = common.scratch("quant.amax", (quant.AMAX_SCRATCH_WORDS,), torch.int32, input.device, zeroed=True)
    word = quant.SCALE_WORD
    return (_launch(input, result, Quant.AMAX, gated=False, scale_out=scratch),
            _launch(input, result, Quant.PER_TENSOR, gated=False, scale_out=scale,
                    scale_in=scratch.view(torch.float32)[word:word + 1]))


def _reference_dynamic_quant(result, input, scale):
    quant.quantize_per_tensor_reference(input, result, _tensor_scale(scale, input.device))


def _prepare_group_quant(input, output_q, output_s, group_size, eps, fp8_min, fp8_max, scale_ue8m0,
                         dummy_is_scale_transposed=False, dummy_is_tma_aligned=False, *, tokens, hidden):
    _check_fp8("output_q", output_q, input, tokens, hidden)
    checks.check_group_size("group_size", group_size, hidden, TOKEN_GROUP_SIZES)
    # any strides: row-major, column-major and TMA-aligned scales are all written in place
    checks.check_group_scale("output_s", output_s, tokens, hidden // group_size, input.device, None)
    eps = checks.check_positive_float("eps", eps)
    fp8_max = checks.check_fp8_range(output_q, fp8_min, fp8_max)
    return (_launch(input, output_q, Quant.PER_GROUP, gated=False, scale_out=output_s, group=group_size,
                    use_ue8m0=bool(scale_ue8m0), fp8_max=fp8_max, amax_floor=eps),)


def _reference_group_quant(input, output_q, output_s, group_size, eps, fp8_min, fp8_max, scale_ue8m0,
                           dummy_is_scale_transposed=False, dummy_is_tma_aligned=False):
    quant.quantize_per_group_reference(input, output_q, output_s, group_size, None, scale_ue8m0, eps, fp8_max)


# --- tuning grid, seeds and bench inputs -----------------------------------------------------

def _group_of(flavour: Quant, gated: bool) -> Callable[[Shape], int]:
    """The group a flavour's kernel sees for a shape (bench and tuning use the default group 128)."""
    if flavour is Quant.NVFP4:
        return lambda shape: quant.NVFP4_BLOCK
    pointwise = lambda shape: pointwise_group(shape["H"])  # noqa: E731
    if flavour is Quant.PER_TOKEN:
        return lambda shape: pointwise(shape) if split_rows(shape["T"], shape["H"], gated) else shape["H"]
    return pointwise


def _pow2_at_most(value: int) -> int:
    return 1 << (max(value, 1).bit_length() - 1)


def _tile(hidden: int, group: int, rows: int, elements: int, warps: int) -> helion.Config:
    """``rows`` tokens by as many groups as make ``elements`` per program (whole rows when groups are rows)."""
    groups = hidden // group
    group_block = 1 if groups == 1 else min(_pow2_at_most(max(elements // (rows * group), 1)),
                                             1 << (groups - 1).bit_length())
    return helion.Config(block_sizes=[rows, group_block], num_warps=warps)


def _rows_tile(hidden: int, elements: int, warps: int) -> helion.Config:
    """A config of silu_mul_rows_kernel: one token a program, group tiles of about ``elements`` in both passes."""
    groups = _pow2_at_most(max(elements // pointwise_group(hidden), 1))
    return helion.Config(block_sizes=[1, groups, groups], num_warps=warps)


def _tuning(flavour: Quant, gated: bool):
    group_of = _group_of(flavour, gated)
    rows_walked = lambda shape: flavour is Quant.PER_TOKEN and walks_rows(shape["T"], shape["H"], gated)  # noqa: E731

    def default_config(shape: Shape) -> helion.Config:
        hidden = shape["H"]
        if rows_walked(shape):
            return _rows_tile(hidden, 2048, 4)
        if hidden // group_of(shape) == 1:  # a whole row per program
            return _tile(hidden, hidden, 1, hidden, 4 if hidden <= 4096 else 8)
        return _tile(hidden, group_of(shape), 1, 2048, 4)

    def seed_configs(shape: Shape) -> list[helion.Config]:
        hidden, tokens = shape["H"], shape["T"]
        group = group_of(shape)
        if rows_walked(shape):
            return [_rows_tile(hidden, e, w) for e, w in ((1024, 4), (2048, 4), (2048, 8), (4096, 8))]
        if hidden // group == 1:
            # whole rows: 8-16 warps reached 34-67 % of copy bandwidth at H=8192-14336 (H100 80GB HBM3)
            return [_tile(hidden, group, 1, hidden, w) for w in ((4, 8) if hidden <= 4096 else (8, 16, 32))]
        if tokens <= 16:
            # decode: 2048 elements a program left T=1, d=8192 1.2 us behind torch.compile (H100 80GB HBM3)
            return [_tile(hidden, group, 1, e, 4) for e in (256, 512, 1024, 2048)] + [_tile(hidden, group, 1, 256, 8)]
        seeds = [_tile(hidden, group, 1, 2048, 4), _tile(hidden, group, 1, 4096, 8)]
        return seeds + ([_tile(hidden, group, 4, 4096, 8)] if tokens >= 128 else [])

    def search_configs(shape: Shape) -> list[helion.Config]:
        hidden, tokens = shape["H"], shape["T"]
        group = group_of(shape)
        if rows_walked(shape):  # group tiles of 512-8192 elements, 4-32 of them a thread
            return [_rows_tile(hidden, e, w) for e in (512, 1024, 2048, 4096, 8192) for w in (2, 4, 8, 16)
                    if 4 <= e // (32 * w) <= 32]
        if hidden // group == 1:
            whole = [_tile(hidden, group, 1, hidden, 4 if hidden > 4096 else 16)]
            if hidden <= 4096:
                return whole
            # rows too long to hold in registers: Helion's looped reduction (the row's amax in chunks, then
            # a second pass that recomputes and stores each chunk, reading it again from L2)
            return whole + [helion.Config(block_sizes=[1, 1], num_warps=w, reduction_loops=[chunk])
                            for chunk in (1024, 2048, 4096) for w in (4, 8)]
        # tiles of 256-8192 elements with 4-32 of them a thread (1-32 up to T = 256: at T = 1, d = 14336 on an
        # H200, 256-element tiles took 1.16 us under a CUDA graph, 2048-element ones 1.76), each also with
        # consecutive programs walking along a row (loop_orders [[1, 0]]), as Inductor's pointwise kernels do
        fewest = 1 if tokens <= 256 else 4
        tiles = [_tile(hidden, group, 1, elements, warps) for elements in (256, 512, 1024, 2048, 4096, 8192)
                 for warps in (1, 2, 4, 8) if fewest <= elements // (32 * warps) <= 32]
        tiles.append(_tile(hidden, group, 2 if tokens >= 2 else 1, 8192, 8))
        return [variant for tile in tiles for variant in (tile, helion.Config(**tile.config, loop_orders=[[1, 0]]))]

    return default_config, seed_configs, search_configs


def _outputs(flavour: Quant, gated: bool, names: dict[str, str]) -> Outputs:
    """What ``helion_fusions.functional`` allocates: the result (and its scales) in the engines' layouts."""
    return common.quant_output_spec(flavour, names, lambda call: _check_input(call["input"], gated), TOKEN_GROUP_SIZES)


def _inputs(flavour: Quant, gated: bool, names: dict[str, str], allocated: Outputs, **fixed: Any):
    """make_inputs for one op: random activations, the op's fixed arguments, its outputs poisoned."""
    def make(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        tokens, hidden = shape["T"], shape["H"]
        generator = torch.Generator(device="cpu").manual_seed(tokens * 7919 + hidden)
        width = 2 * hidden if gated else hidden
        kwargs: dict[str, Any] = {"input": torch.randn(tokens, width, generator=generator).to(dtype=dtype,
                                                                                              device=device)}
        if flavour is Quant.NVFP4:
            kwargs[names["global_scale"]] = torch.tensor([448.0 * 6.0 / 16.0], device=device)
            kwargs["is_sf_swizzled_layout"] = True
        elif flavour is Quant.STATIC:
            kwargs[names["scale"]] = torch.tensor([0.02], device=device)
        elif flavour is Quant.PER_GROUP:
            kwargs["group_size"] = common.bench_group(hidden)
        kwargs.update(fixed)
        kwargs.update({name: common.poison_(tensor) for name, tensor in allocated.allocate(kwargs).items()})
        if "fp8_max" in kwargs:  # the device's fp8 flavour sets the range (224 for e4m3fnuz)
            bound = quant.fp8_max_for(kwargs[names["result"]].dtype)
            kwargs.update(fp8_min=-bound, fp8_max=bound)
        return kwargs
    return make


def _declare(name: str, schema: str, prepare, reference, flavour: Quant, gated: bool, names: dict[str, str],
             overload: str = "", functional_schema: str | None = None, **fixed: Any) -> OpSpec:
    default_config, seed_configs, search_configs = _tuning(flavour, gated)
    allocated = _outputs(flavour, gated, names)
    return register(OpSpec(
        name=name, schema=schema, family="silu_mul" if gated else "quant", kernel=silu_mul_kernel,
        prepare=_op(gated, prepare), reference=reference,
        problem=(tokens_dim(), Dim("H", HIDDEN_GRID)), make_inputs=_inputs(flavour, gated, names, allocated, **fixed),
        default_config=default_config, seed_configs=seed_configs, search_configs=search_configs, outputs=allocated,
        overload=overload, functional_schema=functional_schema,
        extra_kernels=(silu_mul_rows_kernel,) if flavour is Quant.PER_TOKEN and gated else (),
        load_policies=LOAD_POLICIES,
    ))


_RESULT = {"result": "result", "scale": "scale"}
_SILU_NVFP4 = {"result": "result", "scale": "result_block_scale", "global_scale": "input_global_scale"}
_FP4 = {"result": "output", "scale": "output_scale", "global_scale": "input_scale"}

SILU_AND_MUL = _declare(
    "silu_and_mul", "(Tensor! result, Tensor input) -> ()",
    _prepare_silu_and_mul, _reference_silu_and_mul, Quant.NONE, True, _RESULT)
SILU_AND_MUL_QUANT = _declare(
    "silu_and_mul_quant", "(Tensor! result, Tensor input, Tensor scale) -> ()",
    _prepare_silu_static, _reference_silu_static, Quant.STATIC, True, _RESULT)
SILU_AND_MUL_DYNAMIC_PER_TOKEN_QUANT = _declare(
    "silu_and_mul_dynamic_per_token_quant",
    "(Tensor! result, Tensor input, Tensor! scale, Tensor? scale_ub) -> ()",
    partial(_prepare_per_token, gated=True), partial(_reference_per_token, gated=True), Quant.PER_TOKEN, True,
    _RESULT, scale_ub=None)
SILU_AND_MUL_PER_BLOCK_QUANT = _declare(
    "silu_and_mul_per_block_quant",
    "(Tensor! out, Tensor input, Tensor! scales, int group_size, Tensor? scale_ub=None, "
    "bool is_scale_transposed=False, bool scale_ue8m0=False) -> ()",
    _prepare_silu_per_block, _reference_silu_per_block, Quant.PER_GROUP, True, {"result": "out", "scale": "scales"})
SILU_AND_MUL_NVFP4_QUANT = _declare(
    "silu_and_mul_nvfp4_quant",
    "(Tensor! result, Tensor! result_block_scale, Tensor input, Tensor input_global_scale, "
    "bool is_sf_swizzled_layout=True) -> ()",
    partial(_prepare_nvfp4, _SILU_NVFP4, gated=True), partial(_reference_nvfp4, _SILU_NVFP4, gated=True),
    Quant.NVFP4, True, _SILU_NVFP4)

STATIC_SCALED_FP8_QUANT = _declare(
    "static_scaled_fp8_quant", "(Tensor! result, Tensor input, Tensor scale, int[]? group_shape=None) -> ()",
    _prepare_static_quant, _reference_static_quant, Quant.STATIC, False, _RESULT)
DYNAMIC_SCALED_FP8_QUANT = _declare(
    "dynamic_scaled_fp8_quant", "(Tensor! result, Tensor input, Tensor! scale) -> ()",
    _prepare_dynamic_quant, _reference_dynamic_quant, Quant.PER_TENSOR, False, _RESULT)
DYNAMIC_PER_TOKEN_SCALED_FP8_QUANT = _declare(
    "dynamic_per_token_scaled_fp8_quant", "(Tensor! result, Tensor input, Tensor! scale, Tensor? scale_ub) -> ()",
    partial(_prepare_per_token, gated=False), partial(_reference_per_token, gated=False), Quant.PER_TOKEN, False,
    _RESULT, scale_ub=None)
PER_TOKEN_GROUP_FP8_QUANT = _declare(
    "per_token_group_fp8_quant",
    "(Tensor input, Tensor! output_q, Tensor! output_s, int group_size, float eps, float fp8_min, float fp8_max, "
    "bool scale_ue8m0, bool dummy_is_scale_transposed, bool dummy_is_tma_aligned) -> ()",
    _prepare_group_quant, _reference_group_quant, Quant.PER_GROUP, False, {"result": "output_q", "scale": "output_s"},
    eps=1e-10, fp8_min=None, fp8_max=None, scale_ue8m0=False, dummy_is_scale_transposed=False,
    dummy_is_tma_aligned=False)
# the engine's two overloads: ``scaled_fp4_quant.out`` writes the tensors it is given (keyword-only), and the
# functional default ``scaled_fp4_quant(input, input_scale, is_sf_swizzled_layout)`` returns them
SCALED_FP4_QUANT = _declare(
    "scaled_fp4_quant",
    "(Tensor input, Tensor input_scale, bool is_sf_swizzled_layout, *, Tensor(a!) output, Tensor(b!) output_scale) "
    "-> ()",
    partial(_prepare_nvfp4, _FP4, gated=False), partial(_reference_nvfp4, _FP4, gated=False), Quant.NVFP4, False,
    _FP4, overload="out",
    functional_schema="(Tensor input, Tensor input_scale, bool is_sf_swizzled_layout) -> (Tensor, Tensor)")
