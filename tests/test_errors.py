"""Bad arguments raise TypeError / ValueError naming the argument, through the public torch op."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from conftest import arg, is_fp8_op, is_nvfp4_op, problem_shape, spec_params

from helion_fusions.runtime.registry import REGISTRY, OpSpec
from helion_fusions.tools.testing import poisoned

TOKENS, HIDDEN = 5, 256
PER_BLOCK = REGISTRY["rms_norm_per_block_quant"]
FP8_OPS = [s.name for s in REGISTRY.values() if is_fp8_op(s)]
NVFP4_OPS = [s.name for s in REGISTRY.values() if is_nvfp4_op(s)]
NORM_OPS = [s.name for s in REGISTRY.values() if "weight" in s.arg_names]
INPUT_OPS = [s.name for s in REGISTRY.values() if "input" in s.arg_names]
RESULT_OPS = [s.name for s in REGISTRY.values() if arg(s, "result") and not is_nvfp4_op(s)]
RESIDUAL_OPS = [s.name for s in REGISTRY.values() if "residual" in s.arg_names]
STATIC_SCALE_OPS = [s.name for s in REGISTRY.values()
                    if is_fp8_op(s) and "scale" in s.arg_names and "scale_ub" not in s.arg_names]
SCALE_UB_OPS = [s.name for s in REGISTRY.values() if "scale_ub" in s.arg_names]
# (the GEMMs' group and layout errors: tests/test_scaled_mm.py)
GROUP_OPS = [s.name for s in REGISTRY.values() if "group_size" in s.arg_names and s.family != "scaled_mm"]
TRANSPOSED_FLAG_OPS = [s.name for s in REGISTRY.values() if "is_scale_transposed" in s.arg_names
                       and s.family != "scaled_mm"]


def _inputs(spec: OpSpec, tokens: int = TOKENS, hidden: int = HIDDEN) -> dict[str, Any]:
    kwargs = spec.make_inputs(problem_shape(spec, tokens, hidden), torch.bfloat16, torch.device("cpu"))
    if kwargs.get("residual", ...) is None:
        kwargs["residual"] = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    return kwargs


def _raises(error: type[Exception], argument: str, spec: OpSpec, **overrides: Any) -> None:
    kwargs = _inputs(spec)
    kwargs.update(overrides)
    with pytest.raises(error, match=rf"^{re.escape(argument)}: "):
        spec.op(**kwargs)


def test_valid_inputs_pass() -> None:
    for spec in REGISTRY.values():
        spec.op(**_inputs(spec))


@pytest.mark.parametrize("spec", spec_params(INPUT_OPS))
def test_input_dtype(spec: OpSpec) -> None:
    _raises(TypeError, "input", spec, input=torch.randn(TOKENS, HIDDEN, dtype=torch.float64))


@pytest.mark.parametrize("spec", spec_params(INPUT_OPS))
def test_input_not_2d(spec: OpSpec) -> None:
    _raises(ValueError, "input", spec, input=torch.randn(TOKENS, 2, HIDDEN // 2, dtype=torch.bfloat16))


@pytest.mark.parametrize("spec", spec_params(INPUT_OPS))
def test_input_last_dim_not_contiguous(spec: OpSpec) -> None:
    _raises(ValueError, "input", spec, input=torch.randn(HIDDEN, TOKENS, dtype=torch.bfloat16).t())


@pytest.mark.parametrize("spec", spec_params(NORM_OPS))
def test_weight_shape(spec: OpSpec) -> None:
    _raises(ValueError, "weight", spec, weight=torch.ones(HIDDEN + 1, dtype=torch.bfloat16))


@pytest.mark.parametrize("spec", spec_params(NORM_OPS))
def test_weight_dtype(spec: OpSpec) -> None:
    _raises(TypeError, "weight", spec, weight=torch.ones(HIDDEN, dtype=torch.float16))


@pytest.mark.parametrize("epsilon", [-1e-6, 0.0])
@pytest.mark.parametrize("spec", spec_params(NORM_OPS))
def test_epsilon_not_positive(spec: OpSpec, epsilon: float) -> None:
    _raises(ValueError, "epsilon", spec, epsilon=epsilon)


@pytest.mark.parametrize("spec", spec_params(FP8_OPS))
def test_result_dtype_fp8_op(spec: OpSpec) -> None:
    name = arg(spec, "result")
    _raises(TypeError, name, spec, **{name: torch.empty(TOKENS, HIDDEN, dtype=torch.bfloat16)})


@pytest.mark.parametrize("spec", spec_params(["rms_norm", "silu_and_mul"]))
def test_result_dtype_unquantized_op(spec: OpSpec) -> None:
    _raises(TypeError, "result", spec, result=torch.empty(TOKENS, HIDDEN, dtype=torch.float16))


@pytest.mark.parametrize("spec", spec_params(RESULT_OPS))
def test_result_shape(spec: OpSpec) -> None:
    name = arg(spec, "result")
    result = _inputs(spec)[name]
    _raises(ValueError, name, spec, **{name: torch.empty(TOKENS + 1, HIDDEN, dtype=result.dtype)})


@pytest.mark.parametrize("spec", spec_params([n for n in STATIC_SCALE_OPS if n != "dynamic_scaled_fp8_quant"]))
def test_static_scale_not_one_element(spec: OpSpec) -> None:
    # (dynamic_scaled_fp8_quant writes the first element of a scale of any shape, as the engine op does)
    _raises(ValueError, "scale", spec, scale=torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("spec", spec_params(STATIC_SCALE_OPS))
def test_static_scale_dtype(spec: OpSpec) -> None:
    _raises(TypeError, "scale", spec, scale=torch.tensor([0.1], dtype=torch.float64))


@pytest.mark.parametrize("spec", spec_params(SCALE_UB_OPS))
def test_dynamic_scale_shape(spec: OpSpec) -> None:
    name = arg(spec, "scale")
    _raises(ValueError, name, spec, **{name: torch.empty(TOKENS, 3)})


@pytest.mark.parametrize("spec", spec_params(SCALE_UB_OPS))
def test_dynamic_scale_dtype(spec: OpSpec) -> None:
    name = arg(spec, "scale")
    _raises(TypeError, name, spec, **{name: torch.empty(_inputs(spec)[name].shape, dtype=torch.bfloat16)})


@pytest.mark.parametrize("spec", spec_params(SCALE_UB_OPS))
def test_scale_ub_not_one_element(spec: OpSpec) -> None:
    _raises(ValueError, "scale_ub", spec, scale_ub=torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize("spec", spec_params(RESIDUAL_OPS))
def test_residual_shape(spec: OpSpec) -> None:
    _raises(ValueError, "residual", spec, residual=torch.randn(TOKENS, HIDDEN * 2, dtype=torch.bfloat16))


@pytest.mark.parametrize("spec", spec_params(RESIDUAL_OPS))
def test_residual_dtype(spec: OpSpec) -> None:
    _raises(TypeError, "residual", spec, residual=torch.randn(TOKENS, HIDDEN, dtype=torch.float16))


# --- per-block ------------------------------------------------------------------------------------

@pytest.mark.parametrize("group_size", [16, 32, 256, 100])
@pytest.mark.parametrize("spec", spec_params(GROUP_OPS))
def test_group_size_not_supported(spec: OpSpec, group_size: int) -> None:
    if group_size == 32 and spec.name == "per_token_group_fp8_quant":
        pytest.skip("per_token_group_fp8_quant takes groups of 32 (tests/test_compat.py)")
    _raises(ValueError, "group_size", spec, group_size=group_size)


@pytest.mark.parametrize("spec", spec_params(GROUP_OPS))
def test_group_size_not_dividing_hidden(spec: OpSpec) -> None:
    # make_inputs allocates scales for groups of 128, so narrow its hidden size of 256 to 192 afterwards
    kwargs = {name: value[..., :value.shape[-1] * 3 // 4]
              if isinstance(value, torch.Tensor) and value.dim() and value.shape[-1] in (HIDDEN, 2 * HIDDEN) else value
              for name, value in _inputs(spec).items()}
    kwargs.update({"group_size": 128, arg(spec, "scale"): torch.empty(TOKENS, 1)})
    with pytest.raises(ValueError, match=r"^group_size: 128 does not divide the hidden size 192"):
        spec.op(**kwargs)


@pytest.mark.parametrize("spec", spec_params(GROUP_OPS))
def test_per_block_scale_shape(spec: OpSpec) -> None:
    name = arg(spec, "scale")
    _raises(ValueError, name, spec, **{name: torch.empty(TOKENS, HIDDEN // 64)})


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("spec", spec_params(TRANSPOSED_FLAG_OPS))
def test_transposed_flag_disagrees_with_strides(spec: OpSpec, transposed: bool) -> None:
    groups, name = HIDDEN // 128, arg(spec, "scale")
    scale = torch.empty(groups, TOKENS).t() if not transposed else torch.empty(TOKENS, groups)
    with pytest.raises(ValueError, match=rf"^{name}: is_scale_transposed={transposed}"):
        spec.op(**{**_inputs(spec), name: scale, "is_scale_transposed": transposed})


# --- nvfp4 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", spec_params(NVFP4_OPS))
def test_nvfp4_hidden_not_multiple_of_16(spec: OpSpec) -> None:
    kwargs = _inputs(spec, hidden=264)
    with pytest.raises(ValueError, match=r"^input: nvfp4 needs a hidden size divisible by 16"):
        spec.op(**kwargs)


@pytest.mark.parametrize("swizzled", [True, False])
@pytest.mark.parametrize("spec", spec_params(NVFP4_OPS))
def test_nvfp4_result_scale_size(spec: OpSpec, swizzled: bool) -> None:
    # The swizzled size for (5, 256) is 128x4 bytes; the linear one 5x16.
    wrong = poisoned((TOKENS, HIDDEN // 16), torch.uint8, "cpu") if swizzled else poisoned((128, 4), torch.uint8, "cpu")
    name = arg(spec, "block_scale")
    _raises(ValueError, name, spec, **{name: wrong, "is_sf_swizzled_layout": swizzled})


@pytest.mark.parametrize("spec", spec_params(NVFP4_OPS))
def test_nvfp4_result_scale_dtype(spec: OpSpec) -> None:
    name = arg(spec, "block_scale")
    _raises(TypeError, name, spec, **{name: torch.zeros(128, 4, dtype=torch.bfloat16)})


@pytest.mark.parametrize("spec", spec_params(NVFP4_OPS))
def test_nvfp4_result_dtype_and_shape(spec: OpSpec) -> None:
    name = arg(spec, "result")
    _raises(TypeError, name, spec, **{name: torch.empty(TOKENS, HIDDEN // 2, dtype=torch.float8_e4m3fn)})
    _raises(ValueError, name, spec, **{name: torch.empty(TOKENS, HIDDEN, dtype=torch.uint8)})


@pytest.mark.parametrize("spec", spec_params(NVFP4_OPS))
def test_nvfp4_result_not_4_byte_aligned(spec: OpSpec) -> None:
    """Blocks are stored as 4-byte words: a row starting off a 4-byte boundary is refused, not misaddressed."""
    name = arg(spec, "result")
    base = torch.empty(TOKENS, HIDDEN // 2 + 2, dtype=torch.uint8)
    _raises(ValueError, name, spec, **{name: base[:, :HIDDEN // 2]})  # row stride not a multiple of 4
    flat = torch.empty(TOKENS * (HIDDEN // 2) + 8, dtype=torch.uint8)
    _raises(ValueError, name, spec, **{name: flat[2:2 + TOKENS * (HIDDEN // 2)].view(TOKENS, HIDDEN // 2)})


@pytest.mark.parametrize("spec", spec_params(NVFP4_OPS))
def test_nvfp4_global_scale(spec: OpSpec) -> None:
    name = arg(spec, "global_scale")
    _raises(ValueError, name, spec, **{name: torch.tensor([1.0, 2.0])})
    _raises(TypeError, name, spec, **{name: torch.tensor([1.0], dtype=torch.bfloat16)})


# --- devices --------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device mismatch needs a CUDA device")
@pytest.mark.parametrize("spec", spec_params(NORM_OPS))
def test_weight_on_another_device(spec: OpSpec) -> None:
    _raises(ValueError, "weight", spec, weight=torch.ones(HIDDEN, dtype=torch.bfloat16, device="cuda"))


# --- silu_mul and the standalone quant ops --------------------------------------------------------

@pytest.mark.parametrize("spec", spec_params([s.name for s in REGISTRY.values() if s.family == "silu_mul"]))
def test_gated_input_needs_an_even_width(spec: OpSpec) -> None:
    _raises(ValueError, "input", spec, input=torch.randn(TOKENS, 2 * HIDDEN + 1).to(torch.bfloat16))


STATIC = REGISTRY["static_scaled_fp8_quant"]


@pytest.mark.parametrize(("scale", "group_shape", "message"), [
    (torch.full((HIDDEN,), 0.1), None, "scale: a 1-D scale of 256 elements needs group_shape"),
    (torch.full((3, 2), 0.1), None, "scale: expected one element, or [T / group_m, H / group_n] dividing the input"),
    (torch.full((TOKENS, 2), 0.1), [1, 64], "group_shape: [1, 64] does not match the scale's groups (1, 128)"),
    (torch.full((TOKENS,), 0.1), [1, 2], "scale: a 1-D scale must hold one row or one column"),
    (torch.full((TOKENS,), 0.1), [1, -1, 1], "group_shape: expected two ints"),
    (torch.full((TOKENS,), 0.1), [0, -1], "group_shape: expected two ints (group_m, group_n), each positive or -1"),
    (torch.full((HIDDEN,), 0.1), [1, -1], "scale: a 1-D scale must hold one row or one column"),
    (torch.full((TOKENS,), 0.1), [-1, 1], "scale: a 1-D scale must hold one row or one column"),
], ids=["1d_without_group_shape", "not_dividing", "mismatched_group_shape", "1d_not_a_row_or_column", "three_ints",
        "zero_group", "token_count", "channel_count"])
def test_static_scale_layout_errors(scale: torch.Tensor, group_shape: Any, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        STATIC.op(**{**_inputs(STATIC), "scale": scale, "group_shape": group_shape})


GROUP_QUANT = REGISTRY["per_token_group_fp8_quant"]


@pytest.mark.parametrize(("overrides", "error", "name"), [
    ({"fp8_min": -400.0}, ValueError, "fp8_min"),
    ({"fp8_max": 500.0, "fp8_min": -500.0}, ValueError, "fp8_max"),
    ({"fp8_max": 0.0, "fp8_min": 0.0}, ValueError, "fp8_max"),
    ({"eps": 0.0}, ValueError, "eps"),
], ids=["asymmetric_range", "beyond_dtype", "zero_max", "zero_eps"])
def test_group_quant_arguments(overrides: dict[str, Any], error: type[Exception], name: str) -> None:
    _raises(error, name, GROUP_QUANT, **overrides)
