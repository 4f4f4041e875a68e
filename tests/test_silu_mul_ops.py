"""What is particular to the silu_mul family and the standalone quant ops (kernels run eagerly on CPU).

The generic tests (every op against its reference, layouts, strides, errors) cover these ops
too; here: static scale layouts, the one- and two-launch paths of dynamic per-tensor quant,
and the silu reference against PyTorch's own silu.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from conftest import FP8_DTYPES, is_poison, run_against_reference, widen, with_fp8_result

import helion_fusions
from helion_fusions import quant
from helion_fusions.ops.silu_mul import silu_and_mul_reference
from helion_fusions.runtime.registry import REGISTRY, own_launches
from helion_fusions.tools.testing import code_generator, compare, poisoned

pytestmark = pytest.mark.usefixtures("interpret")

STATIC = REGISTRY["static_scaled_fp8_quant"]
DYNAMIC = REGISTRY["dynamic_scaled_fp8_quant"]
PER_TOKEN_OPS = [REGISTRY[name] for name in ("silu_and_mul_dynamic_per_token_quant",
                                             "dynamic_per_token_scaled_fp8_quant")]
CPU = torch.device("cpu")


def _static_scale(layout: str, tokens: int, hidden: int, one_dim: bool) -> tuple[torch.Tensor, list[int] | None]:
    """A scale (random, positive) for ``layout``, 1-D with group_shape or 2-D without."""
    count = {"token": tokens, "channel": hidden}[layout]
    scale = 0.005 + 0.02 * torch.rand(count)
    if one_dim:
        return scale, [1, -1] if layout == "token" else [-1, 1]
    return scale.reshape((tokens, 1) if layout == "token" else (1, hidden)), None


@pytest.mark.parametrize("layout", ("token", "channel"))
@pytest.mark.parametrize("one_dim", (False, True), ids=("2d_scale", "1d_scale_with_group_shape"))
@pytest.mark.parametrize(("tokens", "hidden"), [(1, 17), (7, 1025), (300, 384), (2, 5137)])
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=str)
def test_static_quant_per_token_and_per_channel(layout: str, one_dim: bool, tokens: int, hidden: int, fp8) -> None:
    kwargs = with_fp8_result(STATIC, STATIC.make_inputs({"T": tokens, "H": hidden}, torch.float16, torch.device("cpu")), fp8)
    kwargs["scale"], kwargs["group_shape"] = _static_scale(layout, tokens, hidden, one_dim)
    run_against_reference(STATIC, kwargs)


def test_static_quant_per_channel_scales_each_column() -> None:
    """A per-channel scale of 2x on one column halves that column's codes (the reference is not the only judge)."""
    kwargs = STATIC.make_inputs({"T": 4, "H": 256}, torch.bfloat16, torch.device("cpu"))
    kwargs["input"] = torch.full((4, 256), 1.0, dtype=torch.bfloat16)
    scale = torch.full((1, 256), 1.0 / 64)
    scale[0, 3] = 1.0 / 32
    STATIC.op(**{**kwargs, "scale": scale})
    values = kwargs["result"].float()
    assert bool((values[:, 3] == 32).all()) and bool((values[:, 4] == 64).all())


@pytest.mark.parametrize("tokens", (0, 1, 2, 7, 300))
@pytest.mark.parametrize("hidden", (17, 1024, 5137))
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=str)
def test_dynamic_per_tensor_quant_one_or_two_launches(tokens: int, hidden: int, fp8) -> None:
    """Two launches (the amax, then the quant); one row is per-token quant: one launch."""
    kwargs = with_fp8_result(DYNAMIC, DYNAMIC.make_inputs({"T": tokens, "H": hidden}, torch.bfloat16, torch.device("cpu")), fp8)
    launches = 0 if tokens == 0 else 1 if tokens == 1 else 2
    assert helion_fusions.launch_count(DYNAMIC, kwargs) == launches
    expected = run_against_reference(DYNAMIC, kwargs)
    amax = float(kwargs["input"].float().abs().max()) if tokens else 0.0
    floor = quant.FP8_AMAX_FLOOR / quant.fp8_max_for(fp8)
    assert float(expected["scale"]) == pytest.approx(max(amax / quant.fp8_max_for(fp8), floor), rel=1e-6)


def test_dynamic_per_tensor_amax_launch_keeps_the_input_in_l2() -> None:
    """The amax launch loads the input evict_last (the quantize launch reads it again; on an H200, T = 1024 took
    0.89-0.94x the time with the hint); the quantize launch and the other ops' kernels leave it to the config."""
    def loads(spec, tokens: int = 300) -> list[list[str]]:
        launches = own_launches(spec.prepare(**spec.make_inputs({"T": tokens, "H": 1024}, torch.bfloat16, CPU)))
        codes = [code_generator(launch.kernel).bind(launch.args).to_triton_code(spec.default_config(launch.problem))
                 for launch in launches]
        return [[line for line in code.splitlines() if "tl.load(x +" in line] for code in codes]

    amax, quantize = loads(DYNAMIC)
    assert amax and all("evict_last" in line for line in amax)
    assert quantize and not any("eviction_policy" in line for line in quantize)
    for spec in (STATIC, REGISTRY["silu_and_mul"], REGISTRY["scaled_fp4_quant"]):
        assert not any("eviction_policy" in line for code in loads(spec) for line in code), spec.name


def test_dynamic_per_tensor_scale_comes_from_every_row() -> None:
    """The amax launch sees all tiles: a large value in the last row sets the scale of the first."""
    kwargs = DYNAMIC.make_inputs({"T": 300, "H": 512}, torch.bfloat16, torch.device("cpu"))
    kwargs["input"][-1, -1] = 1000.0
    DYNAMIC.op(**kwargs)
    assert float(kwargs["scale"]) == pytest.approx(1000.0 / 448.0)
    assert float(kwargs["result"][-1, -1].float()) == 448.0


@pytest.mark.parametrize("tokens", (1, 7))
@pytest.mark.parametrize("shape", ("[T, 1]", "[T, 1] strided", "0-dim"))
def test_dynamic_per_tensor_quant_writes_the_first_element_of_any_scale(tokens: int, shape: str) -> None:
    """As the engine op: a scale tensor of any shape ([T, 1] too) takes the per-tensor scale in its first
    element; the others keep what they held."""
    kwargs = DYNAMIC.make_inputs({"T": tokens, "H": 1025}, torch.bfloat16, torch.device("cpu"))
    scale = {"[T, 1]": poisoned((tokens, 1), torch.float32, CPU), "0-dim": poisoned((), torch.float32, CPU),
             "[T, 1] strided": poisoned((tokens, 2), torch.float32, CPU)[:, 1:]}[shape]
    kwargs["scale"] = scale
    expected = run_against_reference(DYNAMIC, kwargs)
    first = scale.reshape(-1)[0]
    assert float(first) == float(expected["scale"].reshape(-1)[0])
    assert float(first) == pytest.approx(float(kwargs["input"].float().abs().max()) / 448.0, rel=1e-6)
    assert scale.numel() == 1 or is_poison(scale.reshape(-1)[1:])


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_silu_reference_is_the_eager_composite(dtype: torch.dtype) -> None:
    """Against ``F.silu(gate.float()).to(dtype) * up``: PyTorch's CPU silu uses its own vectorized exp,
    so a rare rounding tie may go the other way; on a GPU both are the same expf (see test_gpu)."""
    input = torch.randn(512, 2 * 1024).to(dtype)
    ours = silu_and_mul_reference(input)
    gate, up = input.float()[:, :1024], input[:, 1024:]
    composite = torch.nn.functional.silu(gate).to(dtype) * up
    result = compare(ours, composite)
    assert result.ok(1e-4), result


@pytest.mark.parametrize(("scale_ue8m0", "group"), list(itertools.product((False, True), (64, 128))))
def test_group_quant_eps_floors_the_amax(scale_ue8m0: bool, group: int) -> None:
    """``eps`` is the engine op's floor on the group amax: an all-zero group gets scale eps / fp8_max."""
    spec = REGISTRY["per_token_group_fp8_quant"]
    kwargs: dict[str, Any] = spec.make_inputs({"T": 3, "H": 512}, torch.bfloat16, torch.device("cpu"))
    kwargs["input"][1, :group] = 0.0
    kwargs.update(group_size=group, eps=1e-6, scale_ue8m0=scale_ue8m0,
                  output_s=poisoned((3, 512 // group), torch.float32, "cpu"))
    expected = run_against_reference(spec, kwargs)
    floor = torch.tensor([1e-6]) / torch.tensor(448.0)
    if scale_ue8m0:
        floor = quant.ue8m0(floor)
    assert float(expected["output_s"][1, 0]) == float(floor)


@pytest.mark.parametrize("spec", PER_TOKEN_OPS, ids=lambda spec: spec.name)
@pytest.mark.parametrize(("tokens", "hidden", "split"),
                         [(1, 12288, True), (7, 12416, True), (16, 12288, True), (1, 8192, False), (3, 12296, False),
                          (17, 12288, False)])
@pytest.mark.parametrize("with_ub", (False, True), ids=("no_ub", "scale_ub"))
def test_per_token_quant_splits_wide_gated_decode_rows_over_programs(spec, tokens: int, hidden: int, split: bool,
                                                                     with_ub: bool) -> None:
    """Up to SPLIT_ROW_TOKENS gated rows at least SPLIT_ROW_MIN_HIDDEN wide, a multiple of 128, are split over
    programs: the group amaxes, then the quant with their max (an ungated row is one program's). Same bytes as
    a row per program, scale_ub clamping included (a bound below most rows' amax, so it decides most scales)."""
    launches = 2 if split and spec is REGISTRY["silu_and_mul_dynamic_per_token_quant"] else 1
    kwargs = spec.make_inputs({"T": tokens, "H": hidden}, torch.bfloat16, CPU)
    kwargs["input"][0, 5] = 30.0  # one row's amax far above the others' (and above scale_ub)
    if kwargs["input"].shape[1] == 2 * hidden:  # [gate | up]: its up too
        kwargs["input"][0, hidden + 5] = 1.0
    if with_ub:
        kwargs["scale_ub"] = torch.tensor([2.5])
    assert helion_fusions.launch_count(spec, kwargs) == launches
    expected = run_against_reference(spec, kwargs)
    if with_ub:
        assert float(expected["scale"].max()) == pytest.approx(2.5 / 448.0)


@pytest.mark.parametrize(("tokens", "hidden", "walked"),
                         [(128, 11008, False), (129, 11008, True), (129, 10837, True), (1500, 10836, False),
                          (1500, 11136, True)])
@pytest.mark.parametrize("with_ub", (False, True), ids=("no_ub", "scale_ub"))
def test_per_token_quant_walks_wide_gated_rows_from_the_1024_token_bucket(tokens: int, hidden: int, walked: bool,
                                                                     with_ub: bool) -> None:
    """From the 1024-token bucket on, gated rows ROWS_MIN_HIDDEN wide or wider run silu_mul_rows_kernel (the
    activation stashed group tile by group tile, then quantized by the row's amax): same bytes as a row per
    program, scale_ub included. The choice follows the bucket, so the bucket's config fits the kernel it runs."""
    spec = PER_TOKEN_OPS[0]
    kwargs = spec.make_inputs({"T": tokens, "H": hidden}, torch.bfloat16, CPU)
    kwargs["input"][3, 5], kwargs["input"][3, hidden + 5] = 30.0, 1.0  # a row amax of 30, above scale_ub
    if with_ub:
        kwargs["scale_ub"] = torch.tensor(2.5)  # 0-dim, as engines keep it
    (launch,) = spec.prepare(**kwargs)
    assert (launch.kernel.fn.__name__ == "silu_mul_rows_kernel") is walked
    assert launch.kernel in spec.extra_kernels or not walked
    expected = run_against_reference(spec, kwargs)
    assert float(expected["scale"][3]) == pytest.approx((2.5 if with_ub else 30.0) / 448.0)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=str)
def test_walked_rows_take_every_dtype_and_row_strides(dtype: torch.dtype, fp8: torch.dtype) -> None:
    """The row walk on strided rows (input and result wider than the row), each activation dtype, both fp8s;
    the result's bytes past its rows stay poisoned."""
    spec, tokens, hidden = PER_TOKEN_OPS[0], 200, 11008
    kwargs = with_fp8_result(spec, spec.make_inputs({"T": tokens, "H": hidden}, dtype, CPU), fp8)
    kwargs["input"], _ = widen(kwargs["input"], 64, output=False)
    kwargs["result"], result = widen(kwargs["result"], 32, output=True)
    (launch,) = spec.prepare(**kwargs)
    assert launch.kernel in spec.extra_kernels
    run_against_reference(spec, kwargs)
    assert is_poison(result[:, hidden:])
