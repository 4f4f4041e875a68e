"""Every op's Helion kernel, run eagerly on CPU (HELION_INTERPRET=1), against the op's reference.

Outputs start poison-filled, so an element the kernel forgets to write shows up as a mismatch.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from conftest import (
    ACTIVATION_DTYPES,
    FP8_DTYPES,
    arg,
    is_fp8_op,
    is_nvfp4_op,
    is_poison,
    round_up,
    run_against_reference,
    widen,
    with_fp8_result,
    written,
)

from helion_fusions import quant
from helion_fusions.runtime.registry import REGISTRY, OpSpec
from helion_fusions.tools.testing import poisoned

pytestmark = pytest.mark.usefixtures("interpret")

TOKENS = (0, 1, 7, 300)
ODD_HIDDEN = (17, 1025, 5137)
NVFP4_HIDDEN = (16 * 17, 1040, 5136)
PER_BLOCK_HIDDEN = {64: (64 * 17, 64 * 81), 128: (128 * 3, 128 * 41)}
SCALE_LAYOUTS = ("row_major", "transposed", "tma_aligned")

PER_BLOCK = REGISTRY["rms_norm_per_block_quant"]
GROUP_OPS = [spec for spec in REGISTRY.values() if "group_size" in spec.arg_names
             and spec.family != "scaled_mm"]  # (GEMMs: tests/test_scaled_mm.py)
NVFP4_OPS = [spec for spec in REGISTRY.values() if is_nvfp4_op(spec)]
ROW_OPS = [spec for spec in REGISTRY.values() if not is_nvfp4_op(spec) and "group_size" not in spec.arg_names
           and spec.dim_names == ("T", "H")]  # (GEMMs: tests/test_scaled_mm.py)
# (the GEMMs' scale_ub: tests/test_scaled_mm.py)
SCALE_UB_OPS = [spec for spec in REGISTRY.values() if "scale_ub" in spec.arg_names and "T" in spec.dim_names]


def _ids(spec: OpSpec, *rest: Any) -> str:
    return "-".join([spec.name, *(str(r).removeprefix("torch.") for r in rest)])


def _inputs(spec: OpSpec, tokens: int, hidden: int, dtype: torch.dtype, fp8: torch.dtype | None = None) -> dict:
    kwargs = spec.make_inputs({"T": tokens, "H": hidden}, dtype, torch.device("cpu"))
    return kwargs if fp8 is None else with_fp8_result(spec, kwargs, fp8)


def _row_op_cases() -> list[Any]:
    cases = []
    for spec in ROW_OPS:
        fp8s = FP8_DTYPES if is_fp8_op(spec) else (None,)
        for tokens, hidden, dtype, fp8 in itertools.product(TOKENS, ODD_HIDDEN, ACTIVATION_DTYPES, fp8s):
            cases.append(pytest.param(spec, tokens, hidden, dtype, fp8, id=_ids(spec, tokens, hidden, dtype, fp8)))
    return cases


@pytest.mark.parametrize(("spec", "tokens", "hidden", "dtype", "fp8"), _row_op_cases())
def test_row_ops_match_reference(spec: OpSpec, tokens: int, hidden: int, dtype: torch.dtype, fp8) -> None:
    run_against_reference(spec, _inputs(spec, tokens, hidden, dtype, fp8))


def _scale_ub_cases() -> list[Any]:
    return [pytest.param(spec, residual, id=_ids(spec, "residual" if residual else "no_residual"))
            for spec in SCALE_UB_OPS for residual in ((False, True) if "residual" in spec.arg_names else (False,))]


@pytest.mark.parametrize(("spec", "with_residual"), _scale_ub_cases())
@pytest.mark.parametrize("tokens", (1, 7, 300))
@pytest.mark.parametrize("with_scale_ub", (False, True), ids=("no_scale_ub", "scale_ub"))
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=str)
def test_optional_residual_and_scale_ub(spec: OpSpec, tokens: int, with_residual: bool, with_scale_ub: bool, fp8):
    hidden = 1152  # a multiple of the per-block op's default group
    kwargs = _inputs(spec, tokens, hidden, torch.float16, fp8)
    if with_residual:
        kwargs["residual"] = torch.randn(tokens, hidden, dtype=torch.float16)
    if with_scale_ub:
        # Below most rows' amax, so the bound clamps (and the quantized values saturate).
        kwargs["scale_ub"] = torch.tensor([1.5])
    expected = run_against_reference(spec, kwargs)
    if with_scale_ub:
        assert float(expected[arg(spec, "scale")].max()) == pytest.approx(1.5 / quant.fp8_max_for(fp8))


# --- per-block scale layouts ---------------------------------------------------------------------

def _per_block_scale(layout: str, tokens: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A poisoned [tokens, groups] scale in ``layout``, and the buffer it views (with any padding)."""
    if layout == "row_major":
        base = poisoned((tokens, groups), torch.float32, "cpu")
        return base, base
    if layout == "transposed":
        base = poisoned((groups, tokens), torch.float32, "cpu")
        return base.t(), base
    base = poisoned((groups, round_up(tokens, 4)), torch.float32, "cpu")  # stride (1, round_up(T, 4))
    return base[:, :tokens].t(), base


def _per_block_inputs(spec, tokens, hidden, group, layout, dtype=torch.bfloat16, fp8=torch.float8_e4m3fn):
    kwargs = _inputs(spec, tokens, hidden, dtype, fp8)
    scale, base = _per_block_scale(layout, tokens, hidden // group)
    kwargs.update({arg(spec, "scale"): scale, "group_size": group})
    if "is_scale_transposed" in spec.arg_names:
        kwargs["is_scale_transposed"] = layout != "row_major"
    return kwargs, base


def _layout_cases() -> list[Any]:
    return [
        pytest.param(spec, layout, group, tokens, hidden, id=f"{spec.name}-{layout}-g{group}-T{tokens}-H{hidden}")
        for spec in GROUP_OPS
        for layout, (group, hiddens), tokens in itertools.product(SCALE_LAYOUTS, PER_BLOCK_HIDDEN.items(), TOKENS)
        for hidden in hiddens
    ]


@pytest.mark.parametrize(("spec", "layout", "group", "tokens", "hidden"), _layout_cases())
def test_per_block_scale_layouts(spec: OpSpec, layout: str, group: int, tokens: int, hidden: int) -> None:
    kwargs, base = _per_block_inputs(spec, tokens, hidden, group, layout)
    run_against_reference(spec, kwargs)
    if layout == "tma_aligned":
        assert is_poison(base[:, tokens:]), "the TMA padding columns of the scale buffer were written"


def _per_block_option_cases() -> list[Any]:
    cases = []
    for spec in GROUP_OPS:
        residuals = (False, True) if "residual" in spec.arg_names else (False,)
        bounds = (False, True) if "scale_ub" in spec.arg_names else (False,)
        for group, with_scale_ub, with_residual in itertools.product(PER_BLOCK_HIDDEN, bounds, residuals):
            cases.append(pytest.param(spec, group, with_scale_ub, with_residual, id=_ids(
                spec, f"g{group}", "scale_ub" if with_scale_ub else "no_scale_ub",
                "residual" if with_residual else "no_residual")))
    return cases


@pytest.mark.parametrize(("spec", "group", "with_scale_ub", "with_residual"), _per_block_option_cases())
@pytest.mark.parametrize("scale_ue8m0", (False, True), ids=("fp32_scale", "ue8m0"))
@pytest.mark.parametrize("dtype", ACTIVATION_DTYPES, ids=str)
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=str)
def test_per_block_options(spec, group, with_scale_ub, with_residual, scale_ue8m0, dtype, fp8) -> None:
    tokens, hidden = 300, PER_BLOCK_HIDDEN[group][0]
    layout = SCALE_LAYOUTS[(with_scale_ub + 2 * with_residual + scale_ue8m0) % len(SCALE_LAYOUTS)]
    kwargs, _ = _per_block_inputs(spec, tokens, hidden, group, layout, dtype, fp8)
    kwargs["scale_ue8m0"] = scale_ue8m0
    if with_scale_ub:
        kwargs["scale_ub"] = torch.tensor([1.5])
    if with_residual:
        kwargs["residual"] = torch.randn(tokens, hidden, dtype=dtype)
    expected = run_against_reference(spec, kwargs)
    if scale_ue8m0:
        mantissa = expected[arg(spec, "scale")].contiguous().view(torch.int32) & 0x7FFFFF
        assert bool((mantissa == 0).all()), "ue8m0 scales must be powers of two"


# --- nvfp4 --------------------------------------------------------------------------------------

def _nvfp4_cases() -> list[Any]:
    return [
        pytest.param(spec, swizzled, tokens, hidden, dtype, id=_ids(spec, "swizzled" if swizzled else "linear",
                                                                    tokens, hidden, dtype))
        for spec in NVFP4_OPS
        for swizzled, tokens, hidden, dtype in itertools.product((True, False), TOKENS, NVFP4_HIDDEN,
                                                                 ACTIVATION_DTYPES)
    ]


def _swizzled_padding(tokens: int, hidden: int) -> torch.Tensor:
    """Mask over the swizzled buffer's bytes that no (row, block) maps to."""
    cols = hidden // quant.NVFP4_BLOCK
    rows_padded, cols_padded = quant.swizzled_scale_shape(tokens, cols)
    used = quant.swizzled_scale_offset(torch.arange(tokens)[:, None], torch.arange(cols)[None, :], cols)
    padding = torch.ones(rows_padded * cols_padded, dtype=torch.bool)
    padding[used.reshape(-1)] = False
    return padding


@pytest.mark.parametrize(("spec", "swizzled", "tokens", "hidden", "dtype"), _nvfp4_cases())
def test_nvfp4_matches_reference(spec: OpSpec, swizzled: bool, tokens: int, hidden: int, dtype) -> None:
    kwargs = _inputs(spec, tokens, hidden, dtype)
    kwargs["is_sf_swizzled_layout"] = swizzled
    name = arg(spec, "block_scale")
    if not swizzled:
        kwargs[name] = poisoned((tokens, hidden // quant.NVFP4_BLOCK), torch.uint8, "cpu")
    run_against_reference(spec, kwargs)
    if swizzled:
        flat = kwargs[name].reshape(-1)
        assert bool((flat[_swizzled_padding(tokens, hidden)] == 0).all()), "swizzled padding must be zero-filled"


@pytest.mark.parametrize("spec", NVFP4_OPS, ids=lambda s: s.name)
@pytest.mark.parametrize(("scale_dtype", "swizzled"), [(torch.int32, True), (torch.float8_e4m3fn, False)],
                         ids=("int32-swizzled", "fp8-linear"))
def test_nvfp4_scale_buffer_dtypes(spec: OpSpec, scale_dtype: torch.dtype, swizzled: bool) -> None:
    tokens, hidden = 130, 1040
    kwargs = _inputs(spec, tokens, hidden, torch.bfloat16)
    cols = hidden // quant.NVFP4_BLOCK
    rows, cols = quant.swizzled_scale_shape(tokens, cols) if swizzled else (tokens, cols)
    per_byte = torch.empty((), dtype=scale_dtype).element_size()
    kwargs.update({arg(spec, "block_scale"): poisoned((rows, cols // per_byte), scale_dtype, "cpu"),
                   "is_sf_swizzled_layout": swizzled})
    run_against_reference(spec, kwargs)


# --- strides and saturation ---------------------------------------------------------------------

@pytest.mark.parametrize("spec", [s for s in REGISTRY.values() if "input" in s.arg_names], ids=lambda s: s.name)
@pytest.mark.parametrize("tokens", (7, 300))
def test_strided_rows(spec: OpSpec, tokens: int) -> None:
    """Row strides wider than the row: the kernel reads and writes only the row's own columns."""
    hidden = 1152  # legal for every op: a multiple of 128 and of 16
    kwargs = _inputs(spec, tokens, hidden, torch.bfloat16)
    if "residual" in spec.arg_names and kwargs.get("residual") is None:
        kwargs["residual"] = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    mutated = written(spec, kwargs)
    buffers = {}
    for name in ("input", "residual", arg(spec, "result"), arg(spec, "scale")):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() == 2 and value.size(0) == tokens:
            kwargs[name], buffers[name] = widen(value, 64, output=name in mutated)
    assert buffers, spec.name
    before = {name: base[:, kwargs[name].size(1):].clone() for name, base in buffers.items()}
    run_against_reference(spec, kwargs)
    for name, base in buffers.items():
        gap = base[:, kwargs[name].size(1):]
        assert torch.equal(gap.view(torch.uint8), before[name].view(torch.uint8)), f"{name}: bytes past the row changed"


@pytest.mark.parametrize("spec", [s for s in ROW_OPS if "scale" in s.arg_names and is_fp8_op(s)
                                  and "scale" not in s.mutated_args], ids=lambda s: s.name)
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=str)
def test_static_quant_saturates_at_the_dtype_max(spec: OpSpec, fp8: torch.dtype) -> None:
    kwargs = _inputs(spec, 7, 1025, torch.bfloat16, fp8)
    kwargs["scale"] = torch.tensor([1e-6])
    run_against_reference(spec, kwargs)
    magnitudes = kwargs[arg(spec, "result")].float().abs()
    assert float(magnitudes.max()) == quant.fp8_max_for(fp8)
    assert float((magnitudes == quant.fp8_max_for(fp8)).float().mean()) > 0.9


@pytest.mark.parametrize("spec", [PER_BLOCK, *(s for s in NVFP4_OPS if s.family == "rms_norm")], ids=lambda s: s.name)
def test_grouped_rows_match(spec: OpSpec) -> None:
    """Grouped ops see a row as [groups, group] and sum the variance per group first.

    That fp32 order differs from the reference's single sum, so now and then rstd differs by
    one ulp, a value lands on the other side of a rounding tie, and when that value is its
    group's amax the scale moves by one activation step. The contract bounds such ties.
    """
    tokens, hidden = 300, 1152
    for seed in range(16):
        generator = torch.Generator().manual_seed(seed)
        kwargs = _inputs(spec, tokens, hidden, torch.float16)
        kwargs["input"] = torch.randn(tokens, hidden, generator=generator).to(torch.float16)
        if "residual" in spec.arg_names:
            kwargs["residual"] = torch.randn(tokens, hidden, generator=generator).to(torch.float16)
        if spec is PER_BLOCK:
            kwargs.update(group_size=64, scale=poisoned((tokens, hidden // 64), torch.float32, "cpu"))
        run_against_reference(spec, kwargs)
