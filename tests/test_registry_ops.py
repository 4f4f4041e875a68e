"""Registration: every op is a real torch custom op with the engine's schema, passes opcheck and compiles."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import assert_outputs_match, clone_kwargs, problem_shape, spec_params, written

from helion_fusions.runtime.registry import NAMESPACE, REGISTRY, OpSpec

# Argument names in schema order, and the mutated ones: keyword-identical to the engine's ops.
EXPECTED_SCHEMAS = {
    "rms_norm": (["result", "input", "weight", "epsilon"], ["result"]),
    "fused_add_rms_norm": (["input", "residual", "weight", "epsilon"], ["input", "residual"]),
    "rms_norm_static_fp8_quant": (["result", "input", "weight", "scale", "epsilon"], ["result"]),
    "fused_add_rms_norm_static_fp8_quant": (
        ["result", "input", "residual", "weight", "scale", "epsilon"], ["result", "residual"]),
    "rms_norm_dynamic_per_token_quant": (
        ["result", "input", "weight", "scale", "epsilon", "scale_ub", "residual"], ["result", "scale", "residual"]),
    "rms_norm_per_block_quant": (
        ["result", "input", "weight", "scale", "epsilon", "scale_ub", "residual", "group_size", "is_scale_transposed",
         "scale_ue8m0"], ["result", "scale", "residual"]),
    "rms_norm_nvfp4_quant": (
        ["result", "result_scale", "input", "weight", "global_scale", "epsilon", "is_sf_swizzled_layout"],
        ["result", "result_scale"]),
    "fused_add_rms_norm_nvfp4_quant": (
        ["result", "result_scale", "input", "residual", "weight", "global_scale", "epsilon", "is_sf_swizzled_layout"],
        ["result", "result_scale", "residual"]),
    "silu_and_mul": (["result", "input"], ["result"]),
    "silu_and_mul_quant": (["result", "input", "scale"], ["result"]),
    "silu_and_mul_dynamic_per_token_quant": (["result", "input", "scale", "scale_ub"], ["result", "scale"]),
    "silu_and_mul_per_block_quant": (
        ["out", "input", "scales", "group_size", "scale_ub", "is_scale_transposed", "scale_ue8m0"], ["out", "scales"]),
    "silu_and_mul_nvfp4_quant": (
        ["result", "result_block_scale", "input", "input_global_scale", "is_sf_swizzled_layout"],
        ["result", "result_block_scale"]),
    "static_scaled_fp8_quant": (["result", "input", "scale", "group_shape"], ["result"]),
    "dynamic_scaled_fp8_quant": (["result", "input", "scale"], ["result", "scale"]),
    "dynamic_per_token_scaled_fp8_quant": (["result", "input", "scale", "scale_ub"], ["result", "scale"]),
    "per_token_group_fp8_quant": (
        ["input", "output_q", "output_s", "group_size", "eps", "fp8_min", "fp8_max", "scale_ue8m0",
         "dummy_is_scale_transposed", "dummy_is_tma_aligned"], ["output_q", "output_s"]),
    "scaled_fp4_quant": (
        ["input", "input_scale", "is_sf_swizzled_layout", "output", "output_scale"], ["output", "output_scale"]),
    "rotary_embedding": (["positions", "query", "key", "head_size", "cos_sin_cache", "is_neox", "rope_dim_offset",
                          "inverse"], ["query", "key"]),
    "rotary_embedding_and_cache": (
        ["positions", "query", "key", "value", "key_cache", "value_cache", "slot_mapping", "head_size",
         "cos_sin_cache", "is_neox", "kv_cache_dtype", "k_scale", "v_scale"],
        ["query", "key", "key_cache", "value_cache"]),
    "fused_qk_norm_rope": (
        ["qkv", "num_heads_q", "num_heads_k", "num_heads_v", "head_dim", "eps", "q_weight", "k_weight",
         "cos_sin_cache", "is_neox", "position_ids", "forced_token_heads_per_warp"], ["qkv"]),
    "rotary_embedding_static_fp8_quant": (
        ["positions", "query", "key", "query_out", "key_out", "head_size", "cos_sin_cache", "is_neox", "q_scale",
         "k_scale"], ["query_out", "key_out"]),
    "rotary_embedding_fp8_quant_and_cache": (
        ["positions", "query", "query_out", "key", "value", "key_cache", "value_cache", "slot_mapping", "head_size",
         "cos_sin_cache", "is_neox", "kv_cache_dtype", "q_scale", "k_scale", "v_scale"],
        ["query_out", "key", "key_cache", "value_cache"]),
    "concat_and_cache_mla_rope": (
        ["positions", "q_pe", "k_pe", "kv_c", "kv_cache", "slot_mapping", "cos_sin_cache", "is_neox",
         "kv_cache_dtype", "scale"], ["q_pe", "k_pe", "kv_cache"]),
    "concat_and_cache_mla": (["kv_c", "k_pe", "kv_cache", "slot_mapping", "kv_cache_dtype", "scale"], ["kv_cache"]),
    "scaled_mm": (["out", "a", "b", "a_scales", "b_scales", "bias"], ["out"]),
    "scaled_mm_static_fp8_quant": (["out", "a", "b", "a_scales", "b_scales", "scale", "bias"], ["out"]),
    "scaled_mm_per_group_fp8_quant": (["out", "a", "b", "a_scales", "b_scales", "scales", "group_size", "bias", "eps",
                                       "is_scale_transposed", "scale_ue8m0"], ["out", "scales"]),
    "scaled_mm_per_token_fp8_quant": (["out", "a", "b", "a_scales", "b_scales", "scales", "bias", "scale_ub"],
                                      ["out", "scales"]),
    "scaled_mm_silu_mul_static_fp8_quant": (["out", "a", "b", "a_scales", "b_scales", "scale", "bias"], ["out"]),
    "scaled_mm_silu_mul_per_group_fp8_quant": (["out", "a", "b", "a_scales", "b_scales", "scales", "group_size", "bias",
                                                "eps", "is_scale_transposed", "scale_ue8m0"], ["out", "scales"]),
    "scaled_mm_silu_mul_per_token_fp8_quant": (["out", "a", "b", "a_scales", "b_scales", "scales", "bias", "scale_ub"],
                                               ["out", "scales"]),
}


def _small_inputs(spec: OpSpec, tokens: int = 5, with_optional_residual: bool = False) -> dict[str, Any]:
    kwargs = spec.make_inputs(problem_shape(spec, tokens, 256), torch.bfloat16, torch.device("cpu"))
    if with_optional_residual:
        kwargs["residual"] = torch.randn(tokens, 256, dtype=torch.bfloat16)  # (no GEMM has a residual)
    return kwargs


def _case_params() -> list[Any]:
    """Every op with its default inputs, plus the ops whose residual is optional with one given."""
    params = [pytest.param(spec, False, id=spec.name) for spec in REGISTRY.values()]
    params += [pytest.param(spec, True, id=f"{spec.name}-residual") for spec in REGISTRY.values()
               if "residual" in (kwargs := _small_inputs(spec, 1)) and kwargs["residual"] is None]
    return params


def test_the_registry_holds_every_declared_op() -> None:
    assert set(REGISTRY) == set(EXPECTED_SCHEMAS)


@pytest.mark.parametrize("spec", spec_params())
def test_op_is_registered_with_its_schema(spec: OpSpec) -> None:
    packet = getattr(getattr(torch.ops, NAMESPACE), spec.name)
    assert spec.op is (getattr(packet, spec.overload) if spec.overload else packet)
    schema = spec.op_overload._schema
    assert schema == torch._C.parse_schema(f"{spec.qualname}{spec.schema}")
    assert [a.name for a in schema.arguments] == EXPECTED_SCHEMAS[spec.name][0] == spec.arg_names
    assert not schema.returns


@pytest.mark.parametrize("spec", spec_params())
def test_mutated_args(spec: OpSpec) -> None:
    assert spec.mutated_args == EXPECTED_SCHEMAS[spec.name][1]
    assert set(spec.read_and_written) <= set(spec.mutated_args)


@pytest.mark.parametrize("spec", spec_params())
def test_declaration_is_complete(spec: OpSpec) -> None:
    kwargs = _small_inputs(spec)
    assert set(kwargs) <= set(spec.arg_names)
    schema = spec.op_overload._schema
    required = {a.name for a in schema.arguments if not a.has_default_value()}
    assert required <= set(kwargs), f"make_inputs misses {required - set(kwargs)}"
    assert callable(spec.reference) and callable(spec.prepare)
    assert spec.problem and all(d.grid for d in spec.problem)
    assert sum(d.bucketed for d in spec.problem) == 1, "one bucketed dim (the token count)"
    tensors = {name: v for name, v in kwargs.items() if isinstance(v, torch.Tensor)}
    touched = spec.touched_elements(kwargs) if spec.touched_elements is not None else {}
    assert all(name in tensors and 0 <= count <= tensors[name].numel() for name, count in touched.items())
    assert spec.bytes_moved(kwargs) >= sum(touched.get(name, v.numel()) * v.element_size() for name, v in tensors.items())
    largest = {d.name: d.grid[-1] for d in spec.problem}
    assert spec.default_config(largest) is not None
    assert spec.seed_configs(largest)


@pytest.mark.parametrize("mode", ["reference_path", "interpret"])
@pytest.mark.parametrize(("spec", "with_residual"), _case_params())
def test_opcheck(request, fp8_allclose_shim, mode: str, spec: OpSpec, with_residual: bool) -> None:
    request.getfixturevalue(mode)
    torch.library.opcheck(spec.op, (), _small_inputs(spec, with_optional_residual=with_residual))


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["reference_path", "interpret"])
@pytest.mark.parametrize(("spec", "with_residual"), _case_params())
def test_compile_fullgraph(request, fresh_dynamo, mode: str, spec: OpSpec, with_residual: bool) -> None:
    request.getfixturevalue(mode)
    op = spec.op
    outputs = written(spec, _small_inputs(spec, with_optional_residual=with_residual))

    def call(**kwargs: Any) -> list[torch.Tensor]:
        op(**kwargs)
        return [kwargs[name] for name in outputs]

    compiled = torch.compile(call, fullgraph=True)  # raises on any graph break
    for tokens in (5, 9):  # a second token count exercises the recompile / dynamic-shape path
        kwargs = _small_inputs(spec, tokens, with_optional_residual=with_residual)
        eager = clone_kwargs(kwargs)
        returned = compiled(**kwargs)
        call(**eager)
        assert_outputs_match(spec, kwargs, eager, max_flip_fraction=0)
        for name, tensor in zip(outputs, returned, strict=True):
            assert torch.equal(tensor.view(torch.uint8), kwargs[name].view(torch.uint8)), name


@pytest.mark.parametrize("spec", spec_params())
def test_positional_call_equals_keyword_call(interpret, spec: OpSpec) -> None:
    by_keyword = _small_inputs(spec)
    by_position = clone_kwargs(by_keyword)
    spec.op(**by_keyword)
    schema = spec.op_overload._schema
    value = {a.name: by_position[a.name] if a.name in by_position else a.default_value for a in schema.arguments}
    spec.op(*[value[a.name] for a in schema.arguments if not a.kwarg_only],
            **{a.name: value[a.name] for a in schema.arguments if a.kwarg_only})
    assert_outputs_match(spec, by_position, by_keyword, max_flip_fraction=0)
