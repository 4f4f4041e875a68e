"""helion_fusions.functional: every op as a plain function that allocates its outputs, on the CPU reference path."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import assert_outputs_match, clone_kwargs, problem_shape, spec_params

from helion_fusions import functional as F
from helion_fusions import quant
from helion_fusions.runtime.registry import REGISTRY, OpSpec

ALLOCATING = [name for name, spec in REGISTRY.items() if spec.outputs is not None]
IN_PLACE = [name for name, spec in REGISTRY.items() if spec.outputs is None]


def _hidden(spec: OpSpec) -> int:
    return dict(zip(spec.dim_names, (d.grid[0] for d in spec.problem)))["H"] if spec.family in ("rope", "kv_cache") \
        else 256


def _split(spec: OpSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments less the outputs the function allocates."""
    outputs = spec.outputs.names if spec.outputs is not None else ()
    return {name: value for name, value in kwargs.items() if name not in outputs}


def test_every_op_has_a_function_and_every_write_only_argument_is_allocated() -> None:
    assert sorted(F.__all__) == sorted(REGISTRY)
    for name, spec in REGISTRY.items():
        assert getattr(F, name).__name__ == name
        if spec.outputs is not None:
            assert set(spec.outputs.names) <= set(spec.mutated_args) - set(spec.read_and_written), name


@pytest.mark.parametrize("spec", spec_params(ALLOCATING))
@pytest.mark.parametrize("tokens", [0, 7])
def test_function_equals_the_op_on_preallocated_outputs(spec: OpSpec, tokens: int) -> None:
    kwargs = spec.make_inputs(problem_shape(spec, tokens, _hidden(spec)), torch.bfloat16, torch.device("cpu"))
    expected = clone_kwargs(kwargs)
    spec.op(**expected)
    inputs = clone_kwargs(_split(spec, kwargs))
    returned = getattr(F, spec.name)(**inputs)
    returned = returned if isinstance(returned, tuple) else (returned,)
    actual = {**inputs, **dict(zip(spec.outputs.names, returned, strict=True))}
    for name in spec.outputs.names:
        if expected[name] is not None:
            assert actual[name].shape == expected[name].shape and actual[name].dtype == expected[name].dtype, name
    assert_outputs_match(spec, actual, expected, max_flip_fraction=0)


@pytest.mark.parametrize("spec", spec_params(IN_PLACE))
def test_in_place_ops_return_none_and_write_their_arguments(spec: OpSpec) -> None:
    kwargs = spec.make_inputs(problem_shape(spec, 7, _hidden(spec)), torch.bfloat16, torch.device("cpu"))
    expected = clone_kwargs(kwargs)
    spec.op(**expected)
    assert getattr(F, spec.name)(**kwargs) is None
    assert_outputs_match(spec, kwargs, expected, max_flip_fraction=0)


def test_positional_arguments_and_optional_tensors_default_to_none() -> None:
    x = torch.randn(5, 256, dtype=torch.bfloat16)
    weight = torch.randn(256, dtype=torch.bfloat16)
    result, scale = F.rms_norm_dynamic_per_token_quant(x, weight, 1e-6)
    expected_result, expected_scale = torch.empty_like(result), torch.empty_like(scale)
    torch.ops.helion_fusions.rms_norm_dynamic_per_token_quant(expected_result, x, weight, expected_scale, 1e-6,
                                                              None, None)
    assert torch.equal(result.view(torch.uint8), expected_result.view(torch.uint8))
    assert torch.equal(scale, expected_scale) and scale.shape == (5, 1)


@pytest.mark.parametrize("transposed", [False, True])
def test_per_block_scales_follow_the_layout_flag(transposed: bool) -> None:
    x = torch.randn(5, 512, dtype=torch.float16)
    _, scales = F.silu_and_mul_per_block_quant(x, group_size=64, is_scale_transposed=transposed)
    assert scales.shape == (5, 4) and scales.stride() == ((1, 5) if transposed else (4, 1))
    _, scale = F.rms_norm_per_block_quant(x, torch.ones(512, dtype=torch.float16), 1e-6, group_size=128,
                                          is_scale_transposed=transposed)
    assert scale.shape == (5, 4) and scale.stride() == ((1, 5) if transposed else (4, 1))


@pytest.mark.parametrize(("transposed", "tma_aligned", "strides"),
                         [(False, False, (2, 1)), (True, False, (1, 5)), (False, True, (1, 8))])
def test_per_token_group_scales_follow_the_engine_flags(transposed: bool, tma_aligned: bool, strides) -> None:
    output_q, output_s = F.per_token_group_fp8_quant(torch.randn(5, 256, dtype=torch.bfloat16), 128, 1e-10, -448.0,
                                                     448.0, False, transposed, tma_aligned)
    assert output_q.dtype == torch.float8_e4m3fn and output_s.shape == (5, 2) and output_s.stride() == strides


@pytest.mark.parametrize("swizzled", [True, False])
def test_nvfp4_block_scales_swizzled_and_zero_padded_or_linear(swizzled: bool) -> None:
    x = torch.randn(5, 2 * 160, dtype=torch.bfloat16)
    packed, block_scale = F.silu_and_mul_nvfp4_quant(x, torch.tensor([100.0]), is_sf_swizzled_layout=swizzled)
    assert packed.shape == (5, 80) and packed.dtype == torch.uint8 and block_scale.dtype == torch.float8_e4m3fn
    if swizzled:
        assert block_scale.shape == quant.swizzled_scale_shape(5, 10)
        rows = torch.arange(128)[:, None].expand(128, 12)
        cols = torch.arange(12)[None, :].expand(128, 12)
        padding = ((rows >= 5) | (cols >= 10)).reshape(-1)
        offsets = quant.swizzled_scale_offset(rows.reshape(-1), cols.reshape(-1), 10)
        assert (block_scale.view(torch.uint8).reshape(-1)[offsets[padding]] == 0).all()
    else:
        assert block_scale.shape == (5, 10)


def test_rope_quant_outputs_are_fp8_like_query_and_key() -> None:
    spec = REGISTRY["rotary_embedding_static_fp8_quant"]
    kwargs = _split(spec, spec.make_inputs({"T": 3, "H": 4096}, torch.bfloat16, torch.device("cpu")))
    query_out, key_out = F.rotary_embedding_static_fp8_quant(**kwargs)
    assert query_out.shape == kwargs["query"].shape and key_out.shape == kwargs["key"].shape
    assert query_out.dtype == key_out.dtype == torch.float8_e4m3fn
    query_out, key_out = F.rotary_embedding_static_fp8_quant(**{**kwargs, "key": None, "k_scale": None})
    assert key_out is None


def test_compiles_without_graph_breaks() -> None:
    x = torch.randn(6, 256, dtype=torch.bfloat16)
    weight = torch.randn(256, dtype=torch.bfloat16)
    compiled = torch.compile(lambda a, w: F.rms_norm_dynamic_per_token_quant(a, w, 1e-6), fullgraph=True)
    result, scale = compiled(x, weight)
    expected_result, expected_scale = F.rms_norm_dynamic_per_token_quant(x, weight, 1e-6)
    assert torch.equal(result.view(torch.uint8), expected_result.view(torch.uint8))
    assert torch.equal(scale, expected_scale)


def test_argument_errors_name_the_argument() -> None:
    weight = torch.ones(256, dtype=torch.bfloat16)
    scale = torch.tensor([1.0])
    with pytest.raises(TypeError, match="input: expected a torch.Tensor, got str"):
        F.rms_norm_static_fp8_quant("x", weight, scale, 1e-6)
    with pytest.raises(TypeError, match=r"takes 4 arguments \(input, weight, scale, epsilon\), got 5"):
        F.rms_norm_static_fp8_quant(torch.ones(2, 256, dtype=torch.bfloat16), weight, scale, 1e-6, 5)
    with pytest.raises(TypeError, match=r"unexpected arguments \['eps'\]"):
        F.rms_norm_static_fp8_quant(torch.ones(2, 256, dtype=torch.bfloat16), weight, scale, eps=1e-6)
    with pytest.raises(TypeError, match="missing required argument 'epsilon'"):
        F.rms_norm_static_fp8_quant(torch.ones(2, 256, dtype=torch.bfloat16), weight, scale)
    with pytest.raises(ValueError, match="group_size: 128 does not divide the hidden size 192"):
        F.rms_norm_per_block_quant(torch.ones(2, 192, dtype=torch.bfloat16), torch.ones(192, dtype=torch.bfloat16),
                                   1e-6, group_size=128, is_scale_transposed=False)
    with pytest.raises(ValueError, match="input: expected .num_tokens, 2 . d. laid out .gate . up., got an odd"):
        F.silu_and_mul(torch.ones(2, 7, dtype=torch.bfloat16))
