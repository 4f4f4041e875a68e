"""Bad arguments raise TypeError / ValueError naming the argument, through the public torch op."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from conftest import is_fp8_op, is_nvfp4_op, spec_params

from helion_fusions.registry import REGISTRY, OpSpec
from helion_fusions.testing import poisoned

TOKENS, HIDDEN = 5, 256
PER_BLOCK = REGISTRY["rms_norm_per_block_quant"]
FP8_OPS = [s.name for s in REGISTRY.values() if is_fp8_op(s)]
NVFP4_OPS = [s.name for s in REGISTRY.values() if is_nvfp4_op(s)]
RESULT_OPS = [s.name for s in REGISTRY.values() if "result" in s.arg_names and not is_nvfp4_op(s)]
RESIDUAL_OPS = [s.name for s in REGISTRY.values() if "residual" in s.arg_names]
STATIC_SCALE_OPS = [s.name for s in REGISTRY.values() if is_fp8_op(s) and "scale_ub" not in s.arg_names]
SCALE_UB_OPS = [s.name for s in REGISTRY.values() if "scale_ub" in s.arg_names]


def _inputs(spec: OpSpec, tokens: int = TOKENS, hidden: int = HIDDEN) -> dict[str, Any]:
    kwargs = spec.make_inputs(tokens, hidden, torch.bfloat16, torch.device("cpu"))
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


@pytest.mark.parametrize("spec", spec_params())
def test_input_dtype(spec: OpSpec) -> None:
    _raises(TypeError, "input", spec, input=torch.randn(TOKENS, HIDDEN))


@pytest.mark.parametrize("spec", spec_params())
def test_input_not_2d(spec: OpSpec) -> None:
    _raises(ValueError, "input", spec, input=torch.randn(TOKENS, 2, HIDDEN // 2, dtype=torch.bfloat16))


@pytest.mark.parametrize("spec", spec_params())
def test_input_last_dim_not_contiguous(spec: OpSpec) -> None:
    _raises(ValueError, "input", spec, input=torch.randn(HIDDEN, TOKENS, dtype=torch.bfloat16).t())


@pytest.mark.parametrize("spec", spec_params())
def test_weight_shape(spec: OpSpec) -> None:
    _raises(ValueError, "weight", spec, weight=torch.ones(HIDDEN + 1, dtype=torch.bfloat16))


@pytest.mark.parametrize("spec", spec_params())
def test_weight_dtype(spec: OpSpec) -> None:
    _raises(TypeError, "weight", spec, weight=torch.ones(HIDDEN, dtype=torch.float16))


@pytest.mark.parametrize("epsilon", [-1e-6, 0.0])
@pytest.mark.parametrize("spec", spec_params())
def test_epsilon_not_positive(spec: OpSpec, epsilon: float) -> None:
    _raises(ValueError, "epsilon", spec, epsilon=epsilon)


@pytest.mark.parametrize("spec", spec_params(FP8_OPS))
def test_result_dtype_fp8_op(spec: OpSpec) -> None:
    _raises(TypeError, "result", spec, result=torch.empty(TOKENS, HIDDEN, dtype=torch.bfloat16))


def test_result_dtype_unquantized_op() -> None:
    _raises(TypeError, "result", REGISTRY["rms_norm"], result=torch.empty(TOKENS, HIDDEN, dtype=torch.float16))


@pytest.mark.parametrize("spec", spec_params(RESULT_OPS))
def test_result_shape(spec: OpSpec) -> None:
    result = _inputs(spec)["result"]
    _raises(ValueError, "result", spec, result=torch.empty(TOKENS + 1, HIDDEN, dtype=result.dtype))


@pytest.mark.parametrize("spec", spec_params(STATIC_SCALE_OPS))
def test_static_scale_not_one_element(spec: OpSpec) -> None:
    _raises(ValueError, "scale", spec, scale=torch.tensor([0.1, 0.2]))


@pytest.mark.parametrize("spec", spec_params(STATIC_SCALE_OPS))
def test_static_scale_dtype(spec: OpSpec) -> None:
    _raises(TypeError, "scale", spec, scale=torch.tensor([0.1], dtype=torch.float64))


@pytest.mark.parametrize("spec", spec_params(SCALE_UB_OPS))
def test_dynamic_scale_shape(spec: OpSpec) -> None:
    _raises(ValueError, "scale", spec, scale=torch.empty(TOKENS, 3))


@pytest.mark.parametrize("spec", spec_params(SCALE_UB_OPS))
def test_dynamic_scale_dtype(spec: OpSpec) -> None:
    scale = _inputs(spec)["scale"]
    _raises(TypeError, "scale", spec, scale=torch.empty(scale.shape, dtype=torch.bfloat16))


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

@pytest.mark.parametrize("group_size", [32, 256, 100])
def test_group_size_not_supported(group_size: int) -> None:
    _raises(ValueError, "group_size", PER_BLOCK, group_size=group_size)


def test_group_size_not_dividing_hidden() -> None:
    kwargs = _inputs(PER_BLOCK, hidden=192)
    kwargs.update(group_size=128, scale=torch.empty(TOKENS, 1))
    with pytest.raises(ValueError, match=r"^group_size: 128 does not divide the hidden size 192"):
        PER_BLOCK.op(**kwargs)


def test_per_block_scale_shape() -> None:
    _raises(ValueError, "scale", PER_BLOCK, scale=torch.empty(TOKENS, HIDDEN // 64))


@pytest.mark.parametrize("transposed", [False, True])
def test_transposed_flag_disagrees_with_strides(transposed: bool) -> None:
    groups = HIDDEN // 128
    scale = torch.empty(groups, TOKENS).t() if not transposed else torch.empty(TOKENS, groups)
    with pytest.raises(ValueError, match=rf"^scale: is_scale_transposed={transposed}"):
        PER_BLOCK.op(**{**_inputs(PER_BLOCK), "scale": scale, "is_scale_transposed": transposed})


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
    _raises(ValueError, "result_scale", spec, result_scale=wrong, is_sf_swizzled_layout=swizzled)


@pytest.mark.parametrize("spec", spec_params(NVFP4_OPS))
def test_nvfp4_result_scale_dtype(spec: OpSpec) -> None:
    _raises(TypeError, "result_scale", spec, result_scale=torch.zeros(128, 4, dtype=torch.bfloat16))


@pytest.mark.parametrize("spec", spec_params(NVFP4_OPS))
def test_nvfp4_result_dtype_and_shape(spec: OpSpec) -> None:
    _raises(TypeError, "result", spec, result=torch.empty(TOKENS, HIDDEN // 2, dtype=torch.float8_e4m3fn))
    _raises(ValueError, "result", spec, result=torch.empty(TOKENS, HIDDEN, dtype=torch.uint8))


@pytest.mark.parametrize("spec", spec_params(NVFP4_OPS))
def test_nvfp4_global_scale(spec: OpSpec) -> None:
    _raises(ValueError, "global_scale", spec, global_scale=torch.tensor([1.0, 2.0]))
    _raises(TypeError, "global_scale", spec, global_scale=torch.tensor([1.0], dtype=torch.bfloat16))


# --- devices --------------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="a device mismatch needs a CUDA device")
@pytest.mark.parametrize("spec", spec_params())
def test_weight_on_another_device(spec: OpSpec) -> None:
    _raises(ValueError, "weight", spec, weight=torch.ones(HIDDEN, dtype=torch.bfloat16, device="cuda"))
