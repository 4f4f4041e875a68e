"""RMSNorm and its quantized flavours, from one Helion kernel.

``y = round(f32(x) * rstd) * weight`` with ``rstd = 1 / sqrt(f32(sum(f64(x)^2)) / H + eps)`` (the sum
order-independent, each step rounded once; :func:`helion_fusions.quant.row_rstd`; both products rounded to
the input dtype), optionally after adding the residual: ``residual <- round(f32(input) +
f32(residual))``, and ``x`` is that rounded sum, as the engine's ``fused_add_rms_norm`` and
``fused_add_rms_norm_static_fp8_quant`` kernels normalize it (the nvfp4 flavour too, like
``fused_add_rms_norm`` followed by ``scaled_fp4_quant``), or the fp32 sum for the dynamic
per-token and per-block flavours, as the engine's dynamic kernels keep it; then one quant
epilogue from :mod:`helion_fusions.quant`: none, static fp8, dynamic per-token fp8,
per-group fp8, or nvfp4.

The kernel sees the row as ``[num_groups, group]`` (``group = H`` when there are no
groups), so per-group scales are a reduction over the last dim, and the variance a
reduction over both. That fp32 summation order differs from the reference's (as any
GPU reduction does), so rstd may differ by one ulp and a value may land on the other
side of a rounding tie: the contract bounds such flips at 1e-4 of elements, and a
dynamic scale whose group maximum flips moves by the same step of the activation dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import helion
import torch

from helion_fusions import quant
from helion_fusions.kernels.rms_norm import rms_norm_kernel
import helion_fusions.ops.common as common
from helion_fusions.ops.common import check_nvfp4_outputs
from helion_fusions.quant import Quant
from helion_fusions.runtime.checks import (
    FP8_DTYPES,
    check_group_scale,
    check_group_size,
    check_input_2d,
    check_like,
    check_positive_float,
    check_scalar_scale,
    check_scale_ub,
    check_tensor,
    group_scale_view,
)
from helion_fusions.runtime.library import register
from helion_fusions.runtime.registry import (
    Dim,
    KernelLaunch,
    OpSpec,
    Outputs,
    Shape,
    tokens_dim,
)

HIDDEN_GRID = (2048, 4096, 5120, 8192)
GROUP_SIZES = (64, 128)


# --- reference ------------------------------------------------------------------------------

def rms_norm_reference(
    input: torch.Tensor, weight: torch.Tensor | None, epsilon: float, residual: torch.Tensor | None = None,
    round_sum: bool = True,
) -> torch.Tensor:
    """The unfused eager composite; writes ``residual`` in place when given, and normalizes that rounded
    sum (``round_sum``) or the fp32 one. No weight: the normalized rows."""
    x = input.float()
    if residual is not None:
        x = x + residual.float()
        residual.copy_(x.to(residual.dtype))
        if round_sum:
            x = residual.float()
    rstd = quant.row_rstd(x.unsqueeze(-2), x.shape[-1], epsilon).unsqueeze(-1)
    y = (x * rstd).to(input.dtype)
    return y if weight is None else y * weight


# --- host glue ------------------------------------------------------------------------------

def _check_norm(input: Any, weight: Any, epsilon: Any) -> tuple[int, int]:
    check_input_2d("input", input)
    tokens, hidden = input.shape
    if weight is not None:  # ``Tensor? weight`` where the engine's schema has it
        check_tensor("weight", weight, dtypes=(input.dtype,), shape=(hidden,), device=input.device, contiguous=True)
    check_positive_float("epsilon", epsilon)
    return tokens, hidden


@functools.cache
def _unit_weight(hidden: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The weight of a call without one: ones (a product by one is exact, so the bytes are the unweighted rows)."""
    return torch.ones(hidden, dtype=dtype, device=device)


def _check_like_input(name: str, value: Any, input: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> torch.Tensor:
    return check_like(name, value, input.shape, input.device, dtypes)


def _launch(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    epsilon: float,
    out: torch.Tensor,
    flavour: Quant,
    *,
    residual: torch.Tensor | None = None,
    scale_out: torch.Tensor | None = None,
    scale_in: torch.Tensor | None = None,
    group: int | None = None,
    has_scale_ub: bool = False,
    use_ue8m0: bool = False,
    swizzled: bool = False,
) -> tuple[KernelLaunch, ...]:
    tokens, hidden = input.shape
    if tokens == 0:
        return ()
    group = group or hidden
    groups = hidden // group
    x = input.view(tokens, groups, group)
    if weight is None:
        weight = _unit_weight(hidden, input.dtype, input.device)
    fp8_max = quant.fp8_max_for(out.dtype) if flavour in (Quant.STATIC, Quant.PER_TOKEN, Quant.PER_GROUP) else 0.0
    dummy = weight  # stands in for unused tensor arguments; never read
    # the engine's dynamic kernels normalize the fp32 sum, the others the sum rounded to the input dtype
    round_sum = residual is not None and flavour not in (Quant.PER_TOKEN, Quant.PER_GROUP)
    flags = (int(flavour), residual is not None, round_sum, has_scale_ub, use_ue8m0, swizzled, fp8_max)
    args = (
        x,
        x if residual is None else residual.view(tokens, groups, group),
        weight.view(groups, group),
        common.kernel_view(out, flavour, tokens, groups),
        dummy if scale_out is None else scale_out,
        scale_out.view(torch.int32) if swizzled else dummy,  # 4-byte aligned: check_nvfp4_outputs
        dummy if scale_in is None else scale_in.reshape(-1),  # a 0-dim scale as [1]
        float(epsilon),
        quant.FP8_AMAX_FLOOR,
        *flags,
    )
    key = (input.dtype, out.dtype, hidden, group, *flags)
    return (KernelLaunch(rms_norm_kernel, args, key, {"T": tokens, "H": hidden}, input.device, input.dtype),)


def _check_fp8_result(result: Any, input: torch.Tensor) -> torch.Tensor:
    return _check_like_input("result", result, input, FP8_DTYPES)


def _check_residual(residual: Any, input: torch.Tensor) -> torch.Tensor | None:
    return None if residual is None else _check_like_input("residual", residual, input, (input.dtype,))


def _prepare_rms_norm(result, input, weight, epsilon):
    _check_norm(input, weight, epsilon)
    _check_like_input("result", result, input, (input.dtype,))
    return _launch(input, weight, epsilon, result, Quant.NONE)


def _reference_rms_norm(result, input, weight, epsilon):
    result.copy_(rms_norm_reference(input, weight, epsilon))


def _prepare_fused_add_rms_norm(input, residual, weight, epsilon):
    _check_norm(input, weight, epsilon)
    _check_residual(residual, input)
    return _launch(input, weight, epsilon, input, Quant.NONE, residual=residual)


def _reference_fused_add_rms_norm(input, residual, weight, epsilon):
    input.copy_(rms_norm_reference(input, weight, epsilon, residual))


def _prepare_static(result, input, weight, scale, epsilon, residual=None):
    _check_norm(input, weight, epsilon)
    _check_fp8_result(result, input)
    check_scalar_scale("scale", scale, input.device)
    _check_residual(residual, input)
    return _launch(input, weight, epsilon, result, Quant.STATIC, residual=residual, scale_in=scale)


def _reference_static(result, input, weight, scale, epsilon, residual=None):
    quant.quantize_static_reference(rms_norm_reference(input, weight, epsilon, residual), scale, result)


def _prepare_per_token(result, input, weight, scale, epsilon, scale_ub, residual):
    tokens, _ = _check_norm(input, weight, epsilon)
    _check_fp8_result(result, input)
    check_tensor("scale", scale, dtypes=(torch.float32,), shape=(tokens, 1), device=input.device)
    has_ub = check_scale_ub("scale_ub", scale_ub, input.device)
    _check_residual(residual, input)
    return _launch(input, weight, epsilon, result, Quant.PER_TOKEN, residual=residual, scale_out=scale.view(-1),
                   scale_in=scale_ub, has_scale_ub=has_ub)


def _reference_per_token(result, input, weight, scale, epsilon, scale_ub, residual):
    y = rms_norm_reference(input, weight, epsilon, residual, round_sum=False)
    quant.quantize_per_group_reference(y, result, scale, y.shape[-1], scale_ub)


def _prepare_per_block(result, input, weight, scale, epsilon, scale_ub, residual, group_size, is_scale_transposed,
                       scale_ue8m0=False):
    tokens, hidden = _check_norm(input, weight, epsilon)
    _check_fp8_result(result, input)
    check_group_size("group_size", group_size, hidden, GROUP_SIZES)
    scale = check_group_scale("scale", scale, tokens, hidden // group_size, input.device, is_scale_transposed)
    has_ub = check_scale_ub("scale_ub", scale_ub, input.device)
    _check_residual(residual, input)
    return _launch(input, weight, epsilon, result, Quant.PER_GROUP, residual=residual, scale_out=scale,
                   scale_in=scale_ub, group=group_size, has_scale_ub=has_ub, use_ue8m0=bool(scale_ue8m0))


def _reference_per_block(result, input, weight, scale, epsilon, scale_ub, residual, group_size, is_scale_transposed,
                         scale_ue8m0=False):
    y = rms_norm_reference(input, weight, epsilon, residual, round_sum=False)
    scale = group_scale_view(scale, y.shape[0], y.shape[1] // group_size, is_scale_transposed)
    quant.quantize_per_group_reference(y, result, scale, group_size, scale_ub, scale_ue8m0)


def _prepare_nvfp4(result, result_scale, input, weight, global_scale, epsilon, is_sf_swizzled_layout=True,
                   residual=None):
    tokens, hidden = _check_norm(input, weight, epsilon)
    check_scalar_scale("global_scale", global_scale, input.device)
    _check_residual(residual, input)
    flat = check_nvfp4_outputs("result", result, "result_scale", result_scale, tokens, hidden, input.device,
                               is_sf_swizzled_layout)
    return _launch(input, weight, epsilon, result, Quant.NVFP4, residual=residual, scale_out=flat,
                   scale_in=global_scale, group=quant.NVFP4_BLOCK, swizzled=bool(is_sf_swizzled_layout))


def _reference_nvfp4(result, result_scale, input, weight, global_scale, epsilon, is_sf_swizzled_layout=True,
                     residual=None):
    y = rms_norm_reference(input, weight, epsilon, residual)
    quant.quantize_nvfp4_reference(y, result, result_scale, global_scale, is_sf_swizzled_layout)


# --- tuning grid, seeds and bench inputs -----------------------------------------------------

# row elements a thread holds at most: past it the row spills from registers (on an H200, T = 16384, H = 14336 under
# H = 8192's config of 4 rows by 16 warps, 128 a thread: 6.9 ms against torch.compile's 0.58)
MAX_ROW_ELEMENTS = 64


def row_elements(config: dict[str, Any], hidden: int) -> int:
    """The row elements a thread of ``config`` holds at width ``hidden`` (padded to a power of two)."""
    padded = 1 << (hidden - 1).bit_length()
    return config["block_sizes"][0] * padded // (32 * config.get("num_warps", 4))


def default_config(shape: Shape) -> helion.Config:
    """Architecture default: one row per program, the full row in registers (more warps for a very wide row)."""
    hidden = shape["H"]
    warps = 4 if hidden <= 2048 else 8
    while row_elements({"block_sizes": [1], "num_warps": warps}, hidden) > MAX_ROW_ELEMENTS and warps < 32:
        warps *= 2
    return helion.Config(block_sizes=[1], num_warps=warps)


def seed_configs(shape: Shape) -> list[helion.Config]:
    """Curated starting points.

    No seed sets ``reduction_loops``: the row stays in registers (Helion's default); see
    :func:`rows_in_registers`.
    """
    hidden, tokens = shape["H"], shape["T"]
    seeds = [helion.Config(block_sizes=[1], num_warps=w) for w in (4, 8, 16)]
    if hidden <= 4096 and tokens >= 128:
        seeds += [helion.Config(block_sizes=[b], num_warps=w) for b in (2, 4) for w in (4, 8)]
    return [seed for seed in seeds if rows_in_registers(seed.config, shape) is None]


def search_configs(shape: Shape) -> list[helion.Config]:
    """Row-block sizes (up to the token count) and warp counts that keep 4-64 row elements per thread."""
    hidden, tokens = shape["H"], shape["T"]
    configs = [helion.Config(block_sizes=[block], num_warps=warps)
               for block in (1, 2, 4, 8) if block <= max(tokens, 1) for warps in (2, 4, 8, 16, 32)]
    return [c for c in configs if 4 <= row_elements(c.config, hidden) <= MAX_ROW_ELEMENTS]


def rows_in_registers(config: dict[str, Any], shape: Shape | None = None) -> str | None:
    """Configs may not loop over the row: the residual is updated in place, so a looped
    reduction would read it again after writing it and normalize the wrong values. Nor may a thread hold more
    than ``MAX_ROW_ELEMENTS`` of the rows at the shape's width."""
    if any(loop is not None for loop in config.get("reduction_loops") or ()):
        return (f"reduction_loops must be None (the row stays in registers; the in-place residual "
                f"update relies on it), got {config['reduction_loops']}")
    if shape is not None and row_elements(config, shape["H"]) > MAX_ROW_ELEMENTS:
        return (f"block_sizes {config['block_sizes']} with num_warps {config.get('num_warps', 4)} hold "
                f"{row_elements(config, shape['H'])} row elements a thread at H={shape['H']}; at most "
                f"{MAX_ROW_ELEMENTS} stay in registers")
    return None


def _outputs(flavour: Quant, in_place: bool) -> Outputs | None:
    """What ``helion_fusions.functional`` allocates: the result (and its scales) in the engines' layouts."""
    if in_place:
        return None
    names = {"result": "result", "scale": "result_scale" if flavour is Quant.NVFP4 else "scale"}

    def check(call: dict[str, Any]) -> tuple[int, int]:
        return _check_norm(call["input"], call["weight"], call["epsilon"])
    return common.quant_output_spec(flavour, names, check, GROUP_SIZES)


def _activations(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    generator = torch.Generator(device="cpu").manual_seed(tokens * 7919 + hidden)
    input = torch.randn(tokens, hidden, generator=generator).to(dtype=dtype, device=device)
    weight = (1.0 + 0.5 * torch.randn(hidden, generator=generator)).to(dtype=dtype, device=device)
    residual = torch.randn(tokens, hidden, generator=generator).to(dtype=dtype, device=device)
    return {"input": input, "weight": weight, "residual": residual, "epsilon": 1e-6}


def _inputs(flavour: Quant, with_residual: bool, allocated: Outputs | None):
    def make(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        kwargs = _activations(shape["T"], shape["H"], dtype, device)
        hidden = shape["H"]
        residual = kwargs.pop("residual")
        if with_residual:
            kwargs["residual"] = residual
        if flavour is Quant.STATIC:
            kwargs["scale"] = torch.tensor([0.015], device=device)
        elif flavour in (Quant.PER_TOKEN, Quant.PER_GROUP):
            kwargs.update(scale_ub=None, residual=kwargs.get("residual"))
            if flavour is Quant.PER_GROUP:
                kwargs.update(group_size=common.bench_group(hidden), is_scale_transposed=False)
        elif flavour is Quant.NVFP4:
            kwargs.update(global_scale=torch.tensor([448.0 * 6.0 / 8.0], device=device), is_sf_swizzled_layout=True)
        if allocated is not None:
            kwargs.update({name: common.poison_(tensor) for name, tensor in allocated.allocate(kwargs).items()})
        return kwargs
    return make


# the weight, which every program reads, kept in L2; with the rows streamed past it (on an H200, T = 1024,
# H = 8192: 13.8 and 14.3 us against 14.7 with no policy; T = 16384: x streamed took 137 us against 133)
LOAD_POLICIES = ({"weight": "last"}, {"x": "first", "weight": "last"})


def _declare(name: str, schema: str, prepare, reference, flavour: Quant, with_residual: bool = False,
             read_and_written: tuple[str, ...] = ()) -> OpSpec:
    allocated = _outputs(flavour, in_place="input" in read_and_written)
    return register(OpSpec(
        name=name, schema=schema, family="rms_norm", kernel=rms_norm_kernel, prepare=prepare, reference=reference,
        make_inputs=_inputs(flavour, with_residual, allocated),
        problem=(tokens_dim(), Dim("H", HIDDEN_GRID)),
        default_config=default_config, seed_configs=seed_configs, search_configs=search_configs,
        read_and_written=read_and_written, config_problem=rows_in_registers, outputs=allocated,
        load_policies=LOAD_POLICIES,
    ))


RMS_NORM = _declare(
    "rms_norm", "(Tensor! result, Tensor input, Tensor? weight, float epsilon) -> ()",
    _prepare_rms_norm, _reference_rms_norm, Quant.NONE)
FUSED_ADD_RMS_NORM = _declare(
    "fused_add_rms_norm", "(Tensor! input, Tensor! residual, Tensor? weight, float epsilon) -> ()",
    _prepare_fused_add_rms_norm, _reference_fused_add_rms_norm, Quant.NONE, True, ("input", "residual"))
RMS_NORM_STATIC_FP8_QUANT = _declare(
    "rms_norm_static_fp8_quant",
    "(Tensor! result, Tensor input, Tensor weight, Tensor scale, float epsilon) -> ()",
    _prepare_static, _reference_static, Quant.STATIC)
FUSED_ADD_RMS_NORM_STATIC_FP8_QUANT = _declare(
    "fused_add_rms_norm_static_fp8_quant",
    "(Tensor! result, Tensor input, Tensor! residual, Tensor weight, Tensor scale, float epsilon) -> ()",
    _prepare_static, _reference_static, Quant.STATIC, True, ("residual",))
RMS_NORM_DYNAMIC_PER_TOKEN_QUANT = _declare(
    "rms_norm_dynamic_per_token_quant",
    "(Tensor! result, Tensor input, Tensor weight, Tensor! scale, float epsilon, Tensor? scale_ub, "
    "Tensor!? residual) -> ()",
    _prepare_per_token, _reference_per_token, Quant.PER_TOKEN)
RMS_NORM_PER_BLOCK_QUANT = _declare(
    "rms_norm_per_block_quant",
    "(Tensor! result, Tensor input, Tensor weight, Tensor! scale, float epsilon, Tensor? scale_ub, "
    "Tensor!? residual, int group_size, bool is_scale_transposed, bool scale_ue8m0=False) -> ()",
    _prepare_per_block, _reference_per_block, Quant.PER_GROUP)
RMS_NORM_NVFP4_QUANT = _declare(
    "rms_norm_nvfp4_quant",
    "(Tensor! result, Tensor! result_scale, Tensor input, Tensor weight, Tensor global_scale, float epsilon, "
    "bool is_sf_swizzled_layout=True) -> ()",
    _prepare_nvfp4, _reference_nvfp4, Quant.NVFP4)
FUSED_ADD_RMS_NORM_NVFP4_QUANT = _declare(
    "fused_add_rms_norm_nvfp4_quant",
    "(Tensor! result, Tensor! result_scale, Tensor input, Tensor! residual, Tensor weight, Tensor global_scale, "
    "float epsilon, bool is_sf_swizzled_layout=True) -> ()",
    _prepare_nvfp4, _reference_nvfp4, Quant.NVFP4, True, ("residual",))
