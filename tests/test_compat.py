"""Arguments engines pass that the first versions of the ops refused or broke on: 0-dim scales, ``weight=None``,
trailing schema arguments, transposed scales allocated ``[groups, tokens]``, group size 32. Each runs the
Helion kernel (interpret mode) and the reference, byte for byte, and generates code where only the compiler
would see a problem."""

from __future__ import annotations

from typing import Any

import helion
import pytest
import torch
from conftest import arg, assert_outputs_match, clone_kwargs, is_nvfp4_op, problem_shape, run_against_reference

from helion_fusions import quant
from helion_fusions.runtime import config_store, dispatch
from helion_fusions.runtime.registry import REGISTRY
from helion_fusions.tools.testing import code_generator, poisoned, triton_code, ulp_distance

CPU = torch.device("cpu")


def _inputs(name: str, tokens: int = 7, hidden: int = 256) -> dict[str, Any]:
    return REGISTRY[name].make_inputs(problem_shape(REGISTRY[name], tokens, hidden), torch.bfloat16, CPU)


@pytest.mark.parametrize("mode", ["interpret", "reference_path"])
@pytest.mark.parametrize("name", ["rms_norm", "fused_add_rms_norm"])
def test_weight_none_normalizes_without_a_weight(request, mode: str, name: str) -> None:
    request.getfixturevalue(mode)
    spec = REGISTRY[name]
    kwargs = {**_inputs(name), "weight": None}
    expected = run_against_reference(spec, kwargs)
    ones = {**clone_kwargs(expected), "weight": torch.ones(256, dtype=torch.bfloat16)}
    for written in spec.mutated_args:  # the same call with a weight of ones writes the same bytes
        ones[written] = clone_kwargs(_inputs(name))[written]
    spec.op(**ones)
    assert_outputs_match(spec, ones, kwargs, max_flip_fraction=0)


@pytest.mark.parametrize("name", ["rms_norm", "fused_add_rms_norm"])
def test_weight_none_passes_opcheck(fp8_allclose_shim, reference_path, name: str) -> None:
    torch.library.opcheck(REGISTRY[name].op, (), {**_inputs(name), "weight": None})


def test_qk_norm_rope_takes_the_heads_per_warp_hint(interpret) -> None:
    spec = REGISTRY["fused_qk_norm_rope"]
    kwargs = spec.make_inputs({"T": 5, "H": 4096}, torch.bfloat16, CPU)
    hinted = {**clone_kwargs(kwargs), "forced_token_heads_per_warp": 4}
    spec.op(**kwargs)
    spec.op(**hinted)
    assert torch.equal(kwargs["qkv"].view(torch.int16), hinted["qkv"].view(torch.int16))


@pytest.mark.parametrize("mode", ["interpret", "reference_path"])
@pytest.mark.parametrize("name", ["silu_and_mul_per_block_quant", "rms_norm_per_block_quant"])
def test_transposed_scales_allocated_groups_by_tokens(request, mode: str, name: str) -> None:
    """is_scale_transposed=True with scales allocated [groups, tokens] (row-major), as engines allocate them."""
    request.getfixturevalue(mode)
    spec = REGISTRY[name]
    scale = "scales" if "scales" in spec.arg_names else "scale"
    kwargs = {**_inputs(name), "group_size": 64, "is_scale_transposed": True}
    kwargs[scale] = poisoned((256 // 64, 7), torch.float32, CPU)
    expected = run_against_reference(spec, kwargs)
    column_major = {**clone_kwargs(kwargs), scale: poisoned((256 // 64, 7), torch.float32, CPU).t()}
    spec.op(**column_major)
    assert torch.equal(column_major[scale].t(), expected[scale])


@pytest.mark.parametrize("tokens", [1, 7])
def test_per_token_group_quant_takes_group_32(interpret, tokens: int) -> None:
    spec = REGISTRY["per_token_group_fp8_quant"]
    kwargs = _inputs(spec.name, tokens)
    kwargs.update(group_size=32, output_s=poisoned((tokens, 256 // 32), torch.float32, CPU))
    run_against_reference(spec, kwargs)


def _code_with_every_shipped_config(name: str, kwargs: dict[str, Any]) -> list[str]:
    """The Triton code of the op's one launch for ``kwargs`` under each distinct shipped H200 config."""
    spec = REGISTRY[name]
    path = config_store.config_root() / "nvidia_h200" / f"{name}.json"
    configs = {repr(e.config): e.config for e in config_store.load(path, name, spec.dim_names, None).entries}
    (launch,) = spec.prepare(**kwargs)
    bound = code_generator(launch.kernel).bind(launch.args)
    return [triton_code(bound, launch.args, helion.Config(**config)) for config in configs.values()]


def test_group_32_generates_code_with_every_shipped_config() -> None:
    kwargs = _inputs("per_token_group_fp8_quant", 7, 4096)
    kwargs.update(group_size=32, output_s=poisoned((7, 4096 // 32), torch.float32, CPU))
    for code in _code_with_every_shipped_config("per_token_group_fp8_quant", kwargs):
        assert code.strip()


@pytest.mark.parametrize("name", [n for n, s in REGISTRY.items()
                                  if any(a in s.arg_names for a in ("scale", "global_scale", "input_global_scale",
                                                                    "input_scale", "q_scale"))])
def test_zero_dim_scales_match_the_reference(interpret, name: str) -> None:
    spec = REGISTRY[name]
    hidden = 4096 if spec.family in ("rope", "kv_cache") else 256
    kwargs = _inputs(name, 7, hidden)
    for arg, value in list(kwargs.items()):
        if (isinstance(value, torch.Tensor) and value.dtype == torch.float32 and value.numel() == 1
                and arg not in spec.mutated_args):
            kwargs[arg] = value.reshape(())
    run_against_reference(spec, kwargs)


def test_plans_do_not_mix_up_weight_none_with_a_weight(reference_path) -> None:
    """None and a tensor are different signatures: each call gets its own plan."""
    spec = REGISTRY["rms_norm"]
    dispatch.reset()
    weighted = _inputs("rms_norm")
    plain = {**clone_kwargs(weighted), "weight": None}
    run_against_reference(spec, weighted)
    run_against_reference(spec, plain)
    run_against_reference(spec, clone_kwargs(weighted))


@pytest.mark.parametrize("name", [n for n, s in REGISTRY.items() if s.family != "scaled_mm"])  # (fp8 operands)
def test_float32_activations(interpret, name: str) -> None:
    """fp32 activations, as the engine's ops take them: the kernel equals the reference byte for byte."""
    spec = REGISTRY[name]
    hidden = 4096 if spec.family in ("rope", "kv_cache") else 256
    kwargs = spec.make_inputs({"T": 7, "H": hidden}, torch.float32, CPU)
    if kwargs.get("residual", ...) is None:
        kwargs["residual"] = torch.randn(7, hidden)
    if spec.family == "rms_norm" and "scale_ub" in spec.arg_names:
        # rstd in fp32 may differ from the reference's by an ulp (another summation order), and with nothing
        # rounding y to a narrower dtype, a dynamic scale and the codes near a tie move by one step
        expected = clone_kwargs(kwargs)
        spec.op(**kwargs)
        spec.reference(**expected)
        # the amax moves by an ulp, and amax / fp8_max rounds once more: a scale may move by two
        for name, steps in (("result", 1), ("scale", 2)):
            assert int(ulp_distance(kwargs[name], expected[name]).abs().max()) <= steps, name
        return
    run_against_reference(spec, kwargs)


@pytest.mark.parametrize("mode", ["interpret", "reference_path"])
@pytest.mark.parametrize("four_d", [False, True], ids=["3d", "4d"])
def test_rotary_embedding_with_batched_positions(request, mode: str, four_d: bool) -> None:
    """Positions ``[batch, seq]`` with query and key ``[batch, seq, heads * head_size]`` (or 4-D): the same bytes
    as the flattened call, written in place."""
    request.getfixturevalue(mode)
    spec = REGISTRY["rotary_embedding"]
    flat = spec.make_inputs({"T": 6, "H": 4096}, torch.bfloat16, CPU)
    batched = clone_kwargs(flat)
    batched["positions"] = batched["positions"].view(2, 3)
    for name in ("query", "key"):
        batched[name] = batched[name].view(2, 3, -1, 128) if four_d else batched[name].view(2, 3, -1)
    expected = run_against_reference(spec, flat)
    spec.op(**batched)
    for name in ("query", "key"):
        assert torch.equal(batched[name].reshape(6, -1), expected[name])
    strided = {**clone_kwargs(batched), "query": torch.randn(3, 2, 4096, dtype=torch.bfloat16).transpose(0, 1)}
    with pytest.raises(ValueError, match=r"^query: its leading dims \[2, 3\] must flatten"):
        spec.op(**strided)


@pytest.mark.parametrize("swizzled", [True, False])
def test_scaled_fp4_quant_functional_overload(fp8_allclose_shim, reference_path, swizzled: bool) -> None:
    """The engine's two overloads: ``scaled_fp4_quant(input, input_scale, swizzled) -> (output, output_scale)``
    and ``scaled_fp4_quant.out(..., *, output, output_scale)``: the same bytes, opcheck and fullgraph compile."""
    packet = torch.ops.helion_fusions.scaled_fp4_quant
    x, scale = torch.randn(5, 256, dtype=torch.bfloat16), torch.tensor([100.0])
    output, output_scale = packet(x, scale, swizzled)
    rows, cols = (128, 16) if swizzled else (5, 16)
    assert (output.shape, output.dtype, output_scale.shape, output_scale.dtype) == (
        (5, 128), torch.uint8, (rows, cols), torch.float8_e4m3fn)
    written = (poisoned((5, 128), torch.uint8, CPU), poisoned((rows, cols), torch.float8_e4m3fn, CPU))
    packet.out(x, scale, swizzled, output=written[0], output_scale=written[1])
    assert torch.equal(written[0], output) and torch.equal(written[1].view(torch.uint8), output_scale.view(torch.uint8))
    torch.library.opcheck(packet.default, (x, scale, swizzled))
    compiled = torch.compile(lambda a, b: packet(a, b, swizzled), fullgraph=True)(x, scale)
    assert torch.equal(compiled[0], output)


NVFP4_OPS = [name for name, spec in REGISTRY.items() if is_nvfp4_op(spec)]


def _swizzled_nvfp4_inputs(name: str, tokens: int) -> dict[str, Any]:
    """65 block-scale columns, padded to 68 in the swizzled layout, the rows to a multiple of 128: a
    poisoned scale buffer whose padding only the kernel can zero."""
    spec = REGISTRY[name]
    kwargs = _inputs(name, tokens, 16 * 65)
    kwargs[arg(spec, "block_scale")] = poisoned(quant.swizzled_scale_shape(tokens, 65), torch.float8_e4m3fn, CPU)
    kwargs["is_sf_swizzled_layout"] = True
    return kwargs


@pytest.mark.parametrize("tokens", [1, 7, 130])
@pytest.mark.parametrize("name", NVFP4_OPS)
def test_nvfp4_kernels_zero_the_swizzled_padding(interpret, name: str, tokens: int) -> None:
    run_against_reference(REGISTRY[name], _swizzled_nvfp4_inputs(name, tokens))


@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("name", NVFP4_OPS)
def test_nvfp4_padding_generates_code_with_every_shipped_config(name: str, tokens: int) -> None:
    for code in _code_with_every_shipped_config(name, _swizzled_nvfp4_inputs(name, tokens)):
        assert "tl.store" in code and "if " in code  # the padding rows' loop, behind its one-tile test


STATIC_GROUPS = [  # (group_shape, tokens, hidden): the engine op's 2-D group scales
    ((1, 128), 7, 1024), ((1, 64), 1, 512), ((1, 16), 7, 256), ((128, 128), 256, 512), ((-1, 128), 7, 1024),
    ((4, 256), 12, 1024), ((1, -1), 7, 256), ((-1, 1), 7, 256), ((7, 16), 7, 48)]


def _group_scale(group_shape: tuple[int, int], tokens: int, hidden: int, transposed: bool = False) -> torch.Tensor:
    rows = 1 if group_shape[0] == -1 else tokens // group_shape[0]
    cols = 1 if group_shape[1] == -1 else hidden // group_shape[1]
    scale = 0.005 + 0.02 * torch.rand(rows, cols)  # random per group: a wrong group shows
    return scale.t().contiguous().t() if transposed else scale


@pytest.mark.parametrize("transposed", (False, True), ids=("row_major", "column_major"))
@pytest.mark.parametrize("pass_group_shape", (True, False), ids=("group_shape", "inferred"))
@pytest.mark.parametrize(("group_shape", "tokens", "hidden"), STATIC_GROUPS, ids=str)
def test_static_quant_takes_2d_group_scales(interpret, group_shape, tokens, hidden, pass_group_shape,
                                            transposed) -> None:
    """static_scaled_fp8_quant with a [T / group_m, H / group_n] scale, any strides, ``group_shape`` passed or
    inferred from the scale: the engine op's bytes (x * (1 / scale) per element's group)."""
    spec = REGISTRY["static_scaled_fp8_quant"]
    kwargs = _inputs(spec.name, tokens, hidden)
    kwargs["scale"] = _group_scale(group_shape, tokens, hidden, transposed)
    kwargs["group_shape"] = list(group_shape) if pass_group_shape else None
    expected = run_against_reference(spec, kwargs, max_flip_fraction=0)
    rows, cols = kwargs["scale"].shape
    element_scale = kwargs["scale"].repeat_interleave(tokens // rows, 0).repeat_interleave(hidden // cols, 1)
    by_hand = (kwargs["input"].float() * (1.0 / element_scale)).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(expected["result"].view(torch.uint8), by_hand.view(torch.uint8))


@pytest.mark.parametrize(("group_shape", "tokens", "hidden"), [((1, 128), 7, 1024), ((-1, 128), 7, 1024)], ids=str)
def test_static_quant_takes_1d_group_scales_with_group_shape(interpret, group_shape, tokens, hidden) -> None:
    spec = REGISTRY["static_scaled_fp8_quant"]
    kwargs = _inputs(spec.name, tokens, hidden)
    if group_shape[0] == 1:  # one column of token scales is only 1-D when group_n is the row
        group_shape = (1, -1)
    kwargs.update(scale=_group_scale(group_shape, tokens, hidden).reshape(-1), group_shape=list(group_shape))
    run_against_reference(spec, kwargs, max_flip_fraction=0)


@pytest.mark.parametrize(("scale_shape", "group_shape", "message"), [
    ((7, 8), [1, 64], r"^group_shape: \[1, 64\] does not match the scale's groups \(1, 128\)"),
    ((3, 8), None, r"^scale: expected one element, or \[T / group_m, H / group_n\] dividing the input \[7, 1024\]"),
    ((8,), None, r"^scale: a 1-D scale of 8 elements needs group_shape"),
    ((8,), [2, 128], r"^scale: a 1-D scale must hold one row or one column"),
    ((7, 8), [0, 128], r"^group_shape: expected two ints \(group_m, group_n\), each positive or -1"),
])
def test_static_quant_group_scale_errors(scale_shape, group_shape, message) -> None:
    spec = REGISTRY["static_scaled_fp8_quant"]
    kwargs = {**_inputs(spec.name, 7, 1024), "scale": torch.rand(scale_shape), "group_shape": group_shape}
    with pytest.raises(ValueError, match=message):
        spec.op(**kwargs)


def test_static_group_scales_generate_code_with_every_shipped_config() -> None:
    kwargs = _inputs("static_scaled_fp8_quant", 12, 1024)
    kwargs.update(scale=_group_scale((4, 128), 12, 1024, transposed=True), group_shape=[4, 128])
    for code in _code_with_every_shipped_config("static_scaled_fp8_quant", kwargs):
        assert code.strip()


@pytest.mark.parametrize("scale_shape", ["[T, 1] strided", "[1, H] strided", "2-D column-major", "0-dim"])
def test_static_scales_reach_the_kernel_as_views(scale_shape: str) -> None:
    """A launch plan reads each kernel argument from the call's own tensors: a scale copied while preparing
    the launch would be read again, stale, on every later call. Every tensor the kernel gets lies in an op
    argument's storage (or is the ops' never-read placeholder)."""
    from helion_fusions.ops.silu_mul import _placeholder
    from helion_fusions.runtime.launcher import storage_base

    spec = REGISTRY["static_scaled_fp8_quant"]
    kwargs = _inputs(spec.name, 7, 1024)
    kwargs["scale"] = {"[T, 1] strided": torch.rand(7, 2)[:, :1], "[1, H] strided": torch.rand(1024, 2)[:, :1].t(),
                       "2-D column-major": _group_scale((1, 128), 7, 1024, transposed=True),
                       "0-dim": torch.tensor(0.01)}[scale_shape]
    bases = {storage_base(v) for v in kwargs.values() if isinstance(v, torch.Tensor)} | {
        storage_base(_placeholder(CPU))}
    for launch in spec.prepare(**kwargs):
        for value in launch.args:
            if isinstance(value, torch.Tensor):
                assert storage_base(value) in bases


def _engine_calls() -> dict[str, tuple[str, dict[str, Any]]]:
    """The engine arguments added since the first opcheck runs, as (op, arguments)."""
    static = _inputs("static_scaled_fp8_quant", 12, 1024)
    static.update(scale=_group_scale((4, 128), 12, 1024, transposed=True), group_shape=[4, 128])
    dynamic = {**_inputs("dynamic_scaled_fp8_quant"), "scale": torch.zeros(7, 1)}
    mla = REGISTRY["concat_and_cache_mla"].make_inputs({"T": 7, "H": 256}, torch.bfloat16, CPU)
    mla.update(kv_cache=torch.zeros(mla["kv_cache"].shape[0], 16, 656, dtype=torch.uint8), kv_cache_dtype="fp8_ds_mla")
    return {"rope_inverse": ("rotary_embedding", {**_inputs("rotary_embedding", 7, 512), "inverse": True}),
            "static_group_scale": ("static_scaled_fp8_quant", static),
            "dynamic_token_shaped_scale": ("dynamic_scaled_fp8_quant", dynamic),
            "fp8_ds_mla": ("concat_and_cache_mla", mla)}


@pytest.mark.parametrize("case", list(_engine_calls()))
def test_engine_arguments_pass_opcheck(fp8_allclose_shim, reference_path, case: str) -> None:
    name, kwargs = _engine_calls()[case]
    torch.library.opcheck(REGISTRY[name].op, (), kwargs)
