"""The quant epilogue helpers against independent definitions, and property tests of kernel vs reference."""

from __future__ import annotations

import itertools
import math
import traceback
from fractions import Fraction

import pytest
import torch
from conftest import FP8_DTYPES, run_against_reference
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helion_fusions import quant
from helion_fusions.runtime.registry import REGISTRY
from helion_fusions.tools.testing import poisoned

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# --- e2m1 -----------------------------------------------------------------------------------------

def _e2m1_brute_force(value: float) -> int:
    """Nearest e2m1 magnitude (ties to the even code), saturating at 6; sign bit for negative inputs."""
    magnitude = min(abs(value), E2M1_VALUES[-1])
    code = min(range(len(E2M1_VALUES)), key=lambda c: (abs(E2M1_VALUES[c] - magnitude), c % 2))
    return code | (8 if value < 0 else 0)


def _e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    magnitude = torch.tensor(E2M1_VALUES)[(codes & 7).long()]
    return torch.where(codes >= 8, -magnitude, magnitude)


def _check_e2m1(values: list[float]) -> None:
    actual = quant.e2m1_codes(torch.tensor(values, dtype=torch.float32)).tolist()
    expected = [_e2m1_brute_force(v) for v in torch.tensor(values, dtype=torch.float32).tolist()]
    mismatches = [(v, a, e) for v, a, e in zip(values, actual, expected, strict=True) if a != e]
    assert not mismatches, f"(value, code, expected code): {mismatches[:10]}"


def test_e2m1_tie_points() -> None:
    ties = [(a + b) / 2 for a, b in itertools.pairwise(E2M1_VALUES)]
    around = [math.nextafter(t, direction) for t in ties for direction in (-math.inf, math.inf)]
    points = ties + around + list(E2M1_VALUES) + [6.5, 7.0, 1e30, math.inf]
    _check_e2m1(points + [-p for p in points])


def test_e2m1_ties_round_to_even() -> None:
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert quant.e2m1_codes(ties).tolist() == [0, 2, 2, 4, 4, 6, 6]


def test_e2m1_dense_grid() -> None:
    _check_e2m1(torch.linspace(-8.0, 8.0, 64001).tolist())


def test_e2m1_negative_zero_result_keeps_the_sign() -> None:
    assert quant.e2m1_codes(torch.tensor([-0.1, -0.25, 0.1, 0.0, -0.0])).tolist() == [8, 8, 0, 0, 0]


def test_e2m1_every_exponent_and_nan() -> None:
    """Random fp32 bit patterns (every exponent, subnormals, infinities, NaNs) against the threshold ladder."""
    bits = torch.randint(-2**31, 2**31, (200000,), dtype=torch.int64, generator=torch.Generator().manual_seed(3))
    values = bits.to(torch.int32).view(torch.float32)
    magnitude = values.abs()
    expected = (values < 0).to(torch.int32) * 8
    for threshold, inclusive in ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False),
                                 (3.5, True), (5.0, False)):  # midpoints; ties go to the even code
        expected += (magnitude >= threshold if inclusive else magnitude > threshold).to(torch.int32)
    assert torch.equal(quant.e2m1_codes(values), expected)
    assert quant.e2m1_codes(torch.tensor([math.nan, -math.nan])).tolist() == [0, 0]


# --- fp8 conversion -------------------------------------------------------------------------------

def _fp8_grid(dtype: torch.dtype) -> torch.Tensor:
    """Every finite non-negative value of ``dtype`` up to the engines' saturation bound, ascending."""
    values = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    values = values[torch.isfinite(values) & (values >= 0) & (values <= quant.fp8_max_for(dtype))]
    return torch.unique(values)


def _to_fp8_brute_force(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Nearest grid value, ties to the even code, saturating at fp8_max."""
    grid = _fp8_grid(dtype).double()
    codes = torch.tensor([int(torch.tensor(float(g)).to(dtype).view(torch.uint8)) for g in grid.tolist()])
    magnitude = values.double().abs().clamp(max=float(grid[-1]))
    distance = (magnitude[:, None] - grid[None, :]).abs()
    nearest = distance.min(dim=1, keepdim=True).values
    tied = distance == nearest
    even = tied & (codes[None, :] % 2 == 0)
    index = torch.where(even.any(dim=1), even.int().argmax(dim=1), tied.int().argmax(dim=1))
    return torch.where(values < 0, -grid[index], grid[index]).float()


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=str)
def test_to_fp8_rounds_to_nearest_even_and_saturates(dtype: torch.dtype) -> None:
    fp8_max = quant.fp8_max_for(dtype)
    grid = _fp8_grid(dtype)
    midpoints = (grid[1:] + grid[:-1]) / 2
    just_off = torch.cat([torch.nextafter(midpoints, torch.tensor(0.0)), torch.nextafter(midpoints, torch.tensor(1e9))])
    generator = torch.Generator().manual_seed(0)
    spread = torch.exp2(torch.empty(4000).uniform_(-14, 10, generator=generator))
    points = torch.cat([grid, midpoints, just_off, spread, torch.tensor([fp8_max * 1.01, 1e6, 3e38])])
    values = torch.cat([points, -points])
    actual = quant.to_fp8(values, fp8_max, dtype).float()
    expected = _to_fp8_brute_force(values, dtype)
    wrong = (actual != expected).nonzero().flatten()
    assert wrong.numel() == 0, [(float(values[i]), float(actual[i]), float(expected[i])) for i in wrong[:10]]


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=str)
def test_to_fp8_equals_torch_cast_after_clamp(dtype: torch.dtype) -> None:
    fp8_max = quant.fp8_max_for(dtype)
    generator = torch.Generator().manual_seed(1)
    values = torch.randn(100_000, generator=generator) * torch.exp2(torch.empty(100_000).uniform_(-16, 10,
                                                                                                   generator=generator))
    expected = torch.clamp(values, -fp8_max, fp8_max).to(dtype)
    assert torch.equal(quant.to_fp8(values, fp8_max, dtype).view(torch.uint8), expected.view(torch.uint8))


def test_fp8_max_per_flavour() -> None:
    assert quant.fp8_max_for(torch.float8_e4m3fn) == 448.0
    assert quant.fp8_max_for(torch.float8_e4m3fnuz) == 224.0
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        quant.fp8_max_for(torch.bfloat16)


# --- scales ---------------------------------------------------------------------------------------

def _ue8m0_reference(value: float) -> float:
    return 2.0 ** math.ceil(math.log2(value))


def test_ue8m0_random_values() -> None:
    generator = torch.Generator().manual_seed(2)
    scales = torch.exp2(torch.empty(20_000).uniform_(-120, 120, generator=generator))
    actual = quant.ue8m0(scales.clone()).tolist()
    assert actual == [_ue8m0_reference(s) for s in scales.tolist()]


def test_ue8m0_powers_of_two_and_neighbours() -> None:
    powers = [2.0**k for k in range(-125, 127)]
    assert quant.ue8m0(torch.tensor(powers)).tolist() == powers
    above = torch.nextafter(torch.tensor(powers), torch.tensor(math.inf))
    below = torch.nextafter(torch.tensor(powers), torch.tensor(0.0))
    assert quant.ue8m0(above).tolist() == [2 * p for p in powers]
    assert quant.ue8m0(below).tolist() == powers


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=str)
def test_fp8_dynamic_scale(dtype: torch.dtype) -> None:
    fp8_max = quant.fp8_max_for(dtype)
    floor = 1.0 / (fp8_max * 512)
    amax = torch.tensor([0.0, 1e-9, fp8_max * floor * 0.5, 1.0, 10.0, 1000.0])
    expected = [floor, floor, floor, 1.0 / fp8_max, 10.0 / fp8_max, 1000.0 / fp8_max]
    assert quant.fp8_dynamic_scale(amax, fp8_max).tolist() == pytest.approx(expected, rel=1e-7)
    bounded = quant.fp8_dynamic_scale(amax, fp8_max, scale_ub=torch.tensor(5.0)).tolist()
    assert bounded == pytest.approx([floor, floor, floor, 1.0 / fp8_max, 5.0 / fp8_max, 5.0 / fp8_max], rel=1e-7)
    # The bound applies to the amax, before the floor.
    assert quant.fp8_dynamic_scale(amax, fp8_max, scale_ub=torch.tensor(0.0)).tolist() == pytest.approx([floor] * 6)


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=str)
def test_amax_floor_gives_the_contract_scale_floor_bit_exactly(dtype: torch.dtype) -> None:
    """``max(amax, 1/512) / fp8_max`` is the contract's ``max(amax / fp8_max, 1 / (fp8_max * 512))``."""
    fp8_max = quant.fp8_max_for(dtype)
    amax = torch.cat([torch.rand(10_000) * 0.01, torch.tensor([0.0, 1.0 / 512])])
    contract = torch.clamp(amax / torch.tensor(fp8_max), min=1.0 / (fp8_max * 512))
    assert torch.equal(quant.fp8_dynamic_scale(amax, fp8_max), contract)


def test_amax_floor_is_the_eps_of_per_token_group_quant() -> None:
    amax = torch.tensor([0.0, 1e-12, 1e-10, 2.0])
    assert quant.fp8_dynamic_scale(amax, 448.0, amax_floor=1e-10).tolist() == pytest.approx(
        [1e-10 / 448, 1e-10 / 448, 1e-10 / 448, 2.0 / 448], rel=1e-7)


# --- swizzled nvfp4 scale layout -------------------------------------------------------------------

@pytest.mark.parametrize(("rows", "cols"), [(1, 1), (7, 3), (32, 4), (128, 4), (129, 5), (300, 17), (256, 8), (33, 65)])
def test_swizzled_offset_is_a_bijection_onto_the_padded_buffer(rows: int, cols: int) -> None:
    padded_rows, padded_cols = quant.swizzled_scale_shape(rows, cols)
    assert padded_rows % 128 == 0 and padded_cols % 4 == 0
    assert padded_rows - rows < 128 and padded_cols - cols < 4
    r = torch.arange(padded_rows)[:, None]
    k = torch.arange(padded_cols)[None, :]
    offsets = quant.swizzled_scale_offset(r, k, cols).reshape(-1)
    assert torch.equal(torch.sort(offsets).values, torch.arange(padded_rows * padded_cols))


@pytest.mark.parametrize(("rows", "hidden"), [(5, 16 * 3), (200, 16 * 9), (129, 1040)])
def test_swizzled_offset_matches_the_documented_formula(rows: int, hidden: int) -> None:
    cols = hidden // 16
    for r in range(rows):
        for k in range(cols):
            tile = (r // 128) * math.ceil(hidden / 64) + k // 4
            documented = tile * 512 + (r % 32) * 16 + ((r // 32) % 4) * 4 + k % 4
            assert int(quant.swizzled_scale_offset(torch.tensor(r), torch.tensor(k), cols)) == documented


# --- nvfp4 reference round trip --------------------------------------------------------------------

def _e2m1_step(magnitude: torch.Tensor) -> torch.Tensor:
    return torch.where(magnitude < 2, 0.5, torch.where(magnitude < 4, 1.0, 2.0))


def _f32(value: torch.Tensor) -> torch.Tensor:
    """An fp64 result of one operation on fp32 values, rounded to fp32: that operation in IEEE fp32."""
    return value.to(torch.float32).to(torch.float64)


def test_nvfp4_scales_and_codes_follow_the_engine_order() -> None:
    """``sf = fp8(gs * (amax * fp32(1/6)))`` and ``q = e2m1(x * (1 / (sf * (1 / gs))))``, each step one fp32
    rounding, computed here in fp64 step by step; the other orders (``amax / 6``, ``1 / (sf / gs)``) give
    other bytes on this data, so the test tells them apart."""
    generator = torch.Generator().manual_seed(5)
    x = (torch.randn(16384, 16, generator=generator) * 3).to(torch.bfloat16).float()
    gs = torch.tensor(3.0)  # 1 / 3 is inexact, so the multiplier's two orders differ in its last bit
    amax = x.abs().amax(dim=-1).double()
    sixth = _f32(torch.tensor(1.0, dtype=torch.float64) / 6)
    sf = _f32(gs.double() * _f32(amax * sixth)).to(torch.float8_e4m3fn)
    assert torch.equal(quant.nvfp4_block_scale(amax.float(), gs).view(torch.uint8), sf.view(torch.uint8))
    sf64 = sf.double()
    inv = torch.where(sf64 == 0, 0.0, _f32(1 / _f32(sf64 * _f32(1 / gs.double()))))
    expected = quant.e2m1_codes(_f32(x.double() * inv[:, None]).float())
    assert torch.equal(quant.nvfp4_quantize(x[None], sf[None], gs)[0], expected)
    # a block scale the orders round apart: 3 * (amax / 6) is just below an fp8 tie, 3 * (amax * fp32(1/6)) on it
    amax = torch.tensor([18.999998092651367])
    engine = _f32(gs.double() * _f32(amax.double() * sixth)).to(torch.float8_e4m3fn)
    assert torch.equal(quant.nvfp4_block_scale(amax, gs).view(torch.uint8), engine.view(torch.uint8))
    other_sf = quant.to_fp8(gs * quant.div_rn(amax, 6.0), 448.0, torch.float8_e4m3fn)
    assert not torch.equal(other_sf.view(torch.uint8), engine.view(torch.uint8))
    other_inv = torch.where(sf64 == 0, 0.0, _f32(1 / _f32(sf64 / gs.double())))
    assert not torch.equal(quant.e2m1_codes(_f32(x.double() * other_inv[:, None]).float()), expected)


def test_nvfp4_reference_dequantizes_within_one_step() -> None:
    rows, hidden = 37, 512
    generator = torch.Generator().manual_seed(3)
    y = (torch.randn(rows, hidden, generator=generator) * 3).to(torch.bfloat16)
    y[3, 16:32] = 0  # an all-zero block: sf == 0 and every code 0
    y[5, 32:48] = torch.linspace(-1e-30, 1e-30, 16)  # nonzero but below the smallest scale: sf == 0, codes 0, no -0
    global_scale = torch.tensor([448.0 * 6.0 / float(y.float().abs().max())])
    result = poisoned((rows, hidden // 2), torch.uint8, "cpu")
    result_scale = poisoned((rows, hidden // 16), torch.uint8, "cpu")
    quant.quantize_nvfp4_reference(y, result, result_scale, global_scale, swizzled=False)

    codes = torch.stack([result & 0xF, result >> 4], dim=-1).reshape(rows, hidden // 16, 16).int()
    sf = result_scale.view(torch.float8_e4m3fn).float()
    block_scale = sf / float(global_scale)
    scaled_input = y.float().reshape(rows, hidden // 16, 16) / torch.where(block_scale == 0, 1, block_scale)[..., None]
    decoded = _e2m1_decode(codes)
    error = (decoded - scaled_input).abs()
    assert bool((error <= _e2m1_step(scaled_input.abs())).all()), float(error.max())
    assert float(sf[3, 1]) == 0 and bool((codes[3, 1] == 0).all())
    assert float(sf[5, 2]) == 0 and bool((codes[5, 2] == 0).all())
    assert float(decoded.abs().max()) == 6.0


# --- property tests: kernel (interpret mode) vs reference --------------------------------------------

# The `interpret` fixture only sets an environment variable, the same for every example.
PROPERTY_SETTINGS = settings(max_examples=15, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.function_scoped_fixture])


def _random_activations(kwargs: dict, seed: int, scale: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name in ("input", "residual"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            value.copy_(torch.randn(value.shape, generator=generator) * scale)


@PROPERTY_SETTINGS
@given(
    tokens=st.integers(0, 40),
    groups=st.integers(1, 6),
    group=st.sampled_from((64, 128)),
    dtype=st.sampled_from((torch.bfloat16, torch.float16)),
    fp8=st.sampled_from(FP8_DTYPES),
    transposed=st.booleans(),
    ue8m0=st.booleans(),
    scale_ub=st.one_of(st.none(), st.floats(0.01, 20.0)),
    seed=st.integers(0, 2**31 - 1),
    magnitude=st.sampled_from((1e-3, 1.0, 300.0)),
)
def test_per_block_property(interpret, tokens, groups, group, dtype, fp8, transposed, ue8m0, scale_ub, seed,
                            magnitude) -> None:
    spec = REGISTRY["rms_norm_per_block_quant"]
    hidden = groups * group
    kwargs = spec.make_inputs({"T": tokens, "H": hidden}, dtype, torch.device("cpu"))
    _random_activations(kwargs, seed, magnitude)
    kwargs["result"] = poisoned((tokens, hidden), fp8, "cpu")
    shape = (groups, tokens) if transposed else (tokens, groups)
    scale = poisoned(shape, torch.float32, "cpu")
    scale = scale.t() if transposed else scale
    kwargs.update(scale=scale, group_size=group, is_scale_transposed=transposed, scale_ue8m0=ue8m0,
                  scale_ub=None if scale_ub is None else torch.tensor([scale_ub]))
    run_against_reference(spec, kwargs)


@PROPERTY_SETTINGS
@given(
    fused=st.booleans(),
    tokens=st.integers(0, 260),
    blocks=st.integers(1, 24),
    dtype=st.sampled_from((torch.bfloat16, torch.float16)),
    swizzled=st.booleans(),
    global_scale=st.floats(1.0, 3000.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_nvfp4_property(interpret, fused, tokens, blocks, dtype, swizzled, global_scale, seed) -> None:
    spec = REGISTRY["fused_add_rms_norm_nvfp4_quant" if fused else "rms_norm_nvfp4_quant"]
    hidden = blocks * 16
    kwargs = spec.make_inputs({"T": tokens, "H": hidden}, dtype, torch.device("cpu"))
    _random_activations(kwargs, seed, 1.0)
    kwargs.update(global_scale=torch.tensor([global_scale]), is_sf_swizzled_layout=swizzled)
    if not swizzled:
        kwargs["result_scale"] = poisoned((tokens, blocks), torch.uint8, "cpu")
    run_against_reference(spec, kwargs)


@PROPERTY_SETTINGS
@given(
    static=st.booleans(),
    tokens=st.integers(0, 40),
    hidden=st.integers(1, 700),
    dtype=st.sampled_from((torch.bfloat16, torch.float16)),
    fp8=st.sampled_from(FP8_DTYPES),
    scale=st.floats(1e-4, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_per_tensor_and_per_token_property(interpret, static, tokens, hidden, dtype, fp8, scale, seed) -> None:
    spec = REGISTRY["fused_add_rms_norm_static_fp8_quant" if static else "rms_norm_dynamic_per_token_quant"]
    kwargs = spec.make_inputs({"T": tokens, "H": hidden}, dtype, torch.device("cpu"))
    _random_activations(kwargs, seed, 1.0)
    kwargs["result"] = poisoned((tokens, hidden), fp8, "cpu")
    if static:
        kwargs["scale"] = torch.tensor([scale])
    else:
        kwargs["scale_ub"] = torch.tensor([scale * 10])
    run_against_reference(spec, kwargs)


# --- the GPU's division by a shared scale ------------------------------------------------------------

def _round_to_f32(value: Fraction) -> float:
    """The fp32 nearest to an exact rational, ties to even."""
    import numpy as np

    guess = np.float32(float(value))
    neighbours = (np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf)))
    return float(min(neighbours, key=lambda c: (abs(Fraction(float(c)) - value), int(np.array(c).view(np.int32)) & 1)))


def test_reciprocal_and_fma_division_equals_ieee_division() -> None:
    """quant.div_by_scale's Triton sequence in exact arithmetic: v clamped to 2 * fp8_max * s, q0 = v * r,
    q = fma(fma(-q0, s, v), r, q0) with the sign of v; its fp32 quotient equals v / s wherever that does
    not saturate, and its fp8 bytes equal those of v / s everywhere."""
    import numpy as np

    generator = torch.Generator().manual_seed(0)
    count = 20000
    v = (torch.randn(count, generator=generator) * torch.exp2(torch.randint(-12, 12, (count,), generator=generator)))
    v = v.to(torch.bfloat16).float()
    v[:50], v[50:100] = 0.0, -0.0
    s = (torch.rand(count, generator=generator) + 0.01) * torch.exp2(torch.randint(-14, 4, (count,), generator=generator))
    s = (s / 448.0).float()
    bound = s * (2 * 448.0)
    clamped = torch.minimum(torch.maximum(v, -bound), bound)
    r = 1.0 / s
    q0 = clamped * r
    quotients = []
    for vi, si, ri, qi in zip(clamped.tolist(), s.tolist(), r.tolist(), q0.tolist(), strict=True):
        remainder = _round_to_f32(Fraction(vi) - Fraction(qi) * Fraction(si))
        quotients.append(_round_to_f32(Fraction(qi) + Fraction(remainder) * Fraction(ri)))
    fast = torch.copysign(torch.tensor(quotients, dtype=torch.float32), v)
    exact = v / s
    unsaturated = exact.abs() <= 448.0
    assert torch.equal(fast.view(torch.int32)[unsaturated], exact.view(torch.int32)[unsaturated])
    to_bytes = lambda x: quant.to_fp8(x, 448.0, torch.float8_e4m3fn).view(torch.uint8)  # noqa: E731
    assert np.count_nonzero((to_bytes(fast) != to_bytes(exact)).numpy()) == 0


class _ScalarDivisions(torch.overrides.TorchFunctionMode):
    """Records each division of a tensor by a Python number that is not a power of two, with its call site."""

    DIVISIONS = frozenset({torch.Tensor.__truediv__, torch.Tensor.__itruediv__, torch.Tensor.div, torch.Tensor.div_,
                           torch.div, torch.true_divide})

    def __init__(self) -> None:
        super().__init__()
        self.sites: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        divisor = args[1] if len(args) > 1 else None
        if (func in self.DIVISIONS and isinstance(divisor, (int, float)) and not isinstance(divisor, bool)
                and divisor != 0 and math.frexp(abs(divisor))[0] != 0.5):
            frame = [f for f in traceback.extract_stack()[:-1] if "helion_fusions" in f.filename][-1]
            self.sites.add(f"{frame.filename.split('helion_fusions/')[-1]}:{frame.lineno}: {frame.line}")
        return func(*args, **(kwargs or {}))


def _reference_calls() -> list:
    """Every non-collective op's sample call, and the fp8_ds_mla cache writes."""
    from test_rope_ops import MLA_OPS, _ds_mla_inputs

    calls = [pytest.param(spec, lambda spec=spec: spec.make_inputs(
        {d.name: 7 if d.bucketed else d.grid[0] for d in spec.problem}, torch.bfloat16, torch.device("cpu")),
        id=name) for name, spec in REGISTRY.items() if spec.family != "all_reduce"]
    return calls + [pytest.param(spec, lambda spec=spec: _ds_mla_inputs(spec, 7), id=f"{spec.name}-fp8_ds_mla")
                    for spec in MLA_OPS]


@pytest.mark.parametrize(("spec", "inputs"), _reference_calls())
def test_references_divide_exactly_on_every_device(spec, inputs) -> None:
    """PyTorch's CUDA kernels divide a tensor by a Python number as a multiplication by its reciprocal, one
    rounding more than the IEEE division the CPU (and the engine's kernels) do: an fp8_ds_mla tile scale
    ``amax / 448`` so computed differed in about 58 % of the tiles, and the GPU tests failed on it. A reference
    divides by a tensor (``quant.div_rn``) or by a power of two."""
    kwargs, divisions = inputs(), _ScalarDivisions()  # the sample's own arithmetic is not the reference's
    with divisions:
        spec.reference(**kwargs)
    assert not divisions.sites, f"{spec.name}: divisions by a Python number: {sorted(divisions.sites)}"
