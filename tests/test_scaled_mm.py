"""The scaled_mm family: the Helion kernel (interpret mode) against the contract for every epilogue (bf16, static
fp8, per-group and per-token fp8; plain and gate_up + silu-and-mul), every input and output scale layout, the unfused
composites they replace, bad arguments, and code generation for every variant the checks accept."""

from __future__ import annotations

import re
from typing import Any

import helion
import pytest
import torch

from helion_fusions.ops import scaled_mm
from helion_fusions.quant import Quant, epilogues
from helion_fusions.runtime import dispatch
from helion_fusions.runtime.registry import REGISTRY, own_launches
from helion_fusions.tools.testing import (clone_kwargs, code_generator, compare_outputs, machine_code, outputs_ok,
                                          poisoned, triton_code)

FP8 = torch.float8_e4m3fn
SCALED_MM, STATIC = scaled_mm.SCALED_MM, scaled_mm.SCALED_MM_STATIC_FP8_QUANT
GROUP, SILU_STATIC = scaled_mm.SCALED_MM_PER_GROUP_FP8_QUANT, scaled_mm.SCALED_MM_SILU_MUL_STATIC_FP8_QUANT
SILU_GROUP = scaled_mm.SCALED_MM_SILU_MUL_PER_GROUP_FP8_QUANT
TOKEN, SILU_TOKEN = scaled_mm.SCALED_MM_PER_TOKEN_FP8_QUANT, scaled_mm.SCALED_MM_SILU_MUL_PER_TOKEN_FP8_QUANT
GATED = (SILU_STATIC, SILU_GROUP, SILU_TOKEN)
GROUPED = (GROUP, SILU_GROUP)  # a 128-column quant group
ALL_SPECS = (SCALED_MM, STATIC, GROUP, TOKEN, SILU_STATIC, SILU_GROUP, SILU_TOKEN)
# split K at up to 16 rows (per group: the product, then per_token_group_fp8_quant)
SPLITTING = ALL_SPECS
LAYOUTS = ("tensor", "tensor_0dim", "token", "channel", "token_channel", "token_1d", "block")
GROUP_QUANT = REGISTRY["per_token_group_fp8_quant"]  # quantizes a per-group output after a small-M product



def _scales(layout: str, m: int, n: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator) + 0.01

    blocks = -(-k // 128)
    return {
        "tensor": lambda: (rand(1), rand(1)),
        "tensor_0dim": lambda: (rand(1).reshape(()), rand(1).reshape(())),
        "token": lambda: (rand(m, 1), rand(1)),
        "channel": lambda: (rand(1), rand(n, 1)),
        "token_channel": lambda: (rand(m, 1), rand(1, n)),
        "token_1d": lambda: (rand(m), rand(n)),
        "block": lambda: (rand(m, blocks), rand(-(-n // 128), blocks)),
    }[layout]()


def _inputs(m: int, n: int, k: int, layout: str, bias: bool = False, static: bool = False, spec=None,
            scale_layout: str = "row_major") -> dict[str, Any]:
    """Integer-valued fp8 operands: every partial sum is exact in fp32, so any accumulation order gives the
    contract's bytes (real-valued operands may differ by accumulation order: counted on the GPU). ``n`` is the
    output width (a gate_up weight has ``2 n`` columns)."""
    spec = spec or (STATIC if static else SCALED_MM)
    gated = spec in GATED
    n_b = 2 * n if gated else n
    generator = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    a_scales, b_scales = _scales(layout, m, n_b, k, generator)
    quantized = spec is not SCALED_MM
    kwargs = {
        "out": poisoned((m, n), FP8 if quantized else torch.bfloat16, "cpu"),
        "a": torch.randint(-8, 9, (m, k), generator=generator).float().to(FP8),
        "b": torch.randint(-8, 9, (n_b, k), generator=generator).float().to(FP8).t(),
        "a_scales": a_scales, "b_scales": b_scales,
        "bias": torch.randn(n_b, generator=generator).to(torch.bfloat16) if bias else None,
    }
    if spec in (STATIC, SILU_STATIC):
        kwargs["scale"] = torch.tensor(0.5)
    elif spec in (GROUP, SILU_GROUP):
        kwargs.update(scales=_group_scales(m, n // 128, scale_layout), group_size=128,
                      is_scale_transposed=scale_layout != "row_major")
    elif spec in (TOKEN, SILU_TOKEN):
        kwargs["scales"] = poisoned((m, 1), torch.float32, "cpu")
    return kwargs


def _group_scales(m: int, groups: int, layout: str) -> torch.Tensor:
    """Poisoned fp32 ``[M, N / 128]`` scales: row-major, column-major, or TMA-aligned (column stride rounded up
    to 4 rows; the padding rows must stay poisoned)."""
    if layout == "row_major":
        return poisoned((m, groups), torch.float32, "cpu")
    rows = -(-m // 4) * 4 if layout == "tma_aligned" else m
    return poisoned((groups, rows), torch.float32, "cpu")[:, :m].t()


def _check(spec, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The op (the Helion kernel, interpret mode) writes the reference's bytes; returns the op's arguments."""
    expected, actual = clone_kwargs(kwargs), clone_kwargs(kwargs)
    spec.reference(**expected)
    with dispatch.interpreting():
        spec.op(**actual)
    results = compare_outputs([name for name in spec.mutated_args if name in kwargs], actual, expected)
    assert outputs_ok(results, max_flip_fraction=0), results
    return actual


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 128, 128), (7, 48, 96), (33, 256, 384)])
@pytest.mark.parametrize(("bias", "static"), [(False, False), (True, False), (False, True), (True, True)])
def test_matches_the_contract(m: int, n: int, k: int, layout: str, bias: bool, static: bool) -> None:
    _check(STATIC if static else SCALED_MM, _inputs(m, n, k, layout, bias, static))


def test_empty_product_writes_nothing() -> None:
    kwargs = _inputs(0, 48, 96, "token_channel")
    SCALED_MM.op(**kwargs)
    assert kwargs["out"].numel() == 0


def test_block_scaled_slices_are_scaled_before_they_are_added() -> None:
    """Two 128-deep slices with different scales: the contract scales each slice's product, then adds."""
    kwargs = _inputs(2, 128, 256, "block")
    kwargs["a_scales"] = torch.tensor([[1.0, 0.25], [0.5, 2.0]])
    kwargs["b_scales"] = torch.tensor([[1.0, 4.0]])
    _check(SCALED_MM, kwargs)
    expected = clone_kwargs(kwargs)
    SCALED_MM.reference(**expected)
    a, b = kwargs["a"].float(), kwargs["b"].float()
    by_hand = (a[:, :128] @ b[:128]) * torch.tensor([[1.0], [0.5]]) + (a[:, 128:] @ b[128:]) * torch.tensor([[1.0],
                                                                                                              [8.0]])
    assert torch.equal(expected["out"], by_hand.to(torch.bfloat16))


def _raises(error: type[Exception], argument: str, spec=SCALED_MM, **overrides: Any) -> None:
    shape = (7, 256, 128) if spec not in (SCALED_MM, STATIC) else (7, 48, 96)  # N a multiple of 128
    kwargs = {**_inputs(*shape, "token_channel", spec=spec), **overrides}
    with pytest.raises(error, match=rf"^{argument}: "):
        spec.op(**kwargs)


def test_bad_arguments_name_themselves() -> None:
    a = _inputs(7, 48, 96, "token_channel")["a"]
    _raises(TypeError, "a", a=a.float())
    _raises(ValueError, "a", a=torch.zeros(96, 7, dtype=FP8).t())  # column-major a
    _raises(ValueError, "a", a=torch.zeros(7, 88, dtype=FP8), b=torch.zeros(48, 88, dtype=FP8).t())  # K = 88
    _raises(ValueError, "b", b=torch.zeros(96, 48, dtype=FP8))  # row-major [K, N]
    _raises(ValueError, "b", b=torch.zeros(40, 96, dtype=FP8).t(), out=torch.empty(7, 40, dtype=torch.bfloat16))
    _raises(TypeError, "b", b=torch.zeros(48, 96, dtype=torch.float8_e5m2).t())
    _raises(TypeError, "out", out=torch.empty(7, 48, dtype=torch.float32))
    _raises(ValueError, "out", out=torch.empty(8, 48, dtype=torch.bfloat16))
    _raises(ValueError, "a_scales", a_scales=torch.ones(6, 1))
    _raises(ValueError, "b_scales", b_scales=torch.ones(47))
    _raises(ValueError, "b_scales", b_scales=torch.ones(2, 48))
    _raises(ValueError, "a_scales", a_scales=torch.ones(7, 2)[:, :1])  # strided per-token scales
    _raises(TypeError, "a_scales", a_scales=torch.ones(7, 1, dtype=torch.float16))
    _raises(TypeError, "bias", bias=torch.ones(48, dtype=torch.float16))
    _raises(ValueError, "bias", bias=torch.ones(47, dtype=torch.bfloat16))
    _raises(TypeError, "out", STATIC, out=torch.empty(7, 48, dtype=torch.bfloat16))
    _raises(ValueError, "scale", STATIC, scale=torch.ones(2))


@pytest.mark.parametrize("layout", ("tensor_0dim", "token_channel", "block"))
@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("m", (1, 7, 64, 300))
def test_every_variant_generates_code_under_its_configs(layout: str, spec, m: int) -> None:
    """What only the compiler sees: each variant the checks accept, with the default, seed and a sample of the
    searched configs (TMA and persistent ones among them)."""
    kwargs = _inputs(m, 256, 384, layout, bias=True, spec=spec)
    launches = spec.prepare(**kwargs)
    product, *quantize = own_launches(launches)  # per token: then the quantize launch
    assert len(quantize) == (spec in (TOKEN, SILU_TOKEN))
    after = spec in GROUPED and scaled_mm.quantized_after(Quant.PER_GROUP, m)
    assert [launch.tuned_as for launch in launches if launch.tuned_as] == [GROUP_QUANT] * after
    shape = {"M": m, "N": 4096, "K": 4096, "BLOCK": 128 if layout == "block" else 1}
    searched = spec.search_configs(shape)
    for launch in (product, *quantize):
        bound = code_generator(launch.kernel).bind(launch.args)
        for config in [spec.default_config(shape), *spec.seed_configs(shape), *searched[:3], *searched[-3:]]:
            assert ("tl.dot" in triton_code(bound, launch.args, config)) == (launch is product)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("m", (1, 64, 128, 512))
def test_weight_stream_buckets_search_the_narrowest_n_tiles(spec, m: int) -> None:
    """Up to M = 128 the product streams the weight, and the search tries the narrowest N tile the flavour allows
    (32 columns, or one quant group): at M = 128, N = 4096 on an H200 tiles of 128 columns or more gave at most 64
    programs and ran at twice cuBLAS's time."""
    fused = spec in GROUPED and not scaled_mm.quantized_after(Quant.PER_GROUP, m)
    group = scaled_mm.GROUP_SIZES[0] if fused else 1
    narrowest = min(c.config["block_sizes"][1] * group for c in spec.search_configs({"M": m, "N": 4096, "K": 4096}))
    assert narrowest == (max(scaled_mm.SPLIT_MIN_TILE, group) if m <= 128 else 128)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name)
def test_weight_stream_buckets_read_the_weight_once(spec) -> None:
    """Up to 64 rows one M tile covers the bucket, and one-scale weight streams (up to 128 rows) are not tried as
    persistent kernels: of the H200's stored GEMM entries none took a 32-row tile, and persistent ones won 2 of
    the 152 one-scale entries up to 128 rows (block-scaled ones: 15 of 56, still searched); none up to 128 rows
    took 256 columns (perf/results/nvidia_h200_gemm_search.md)."""
    for m in scaled_mm.M_GRID:
        for block in (1, scaled_mm.SCALE_BLOCK):
            searched = spec.search_configs({"M": m, "N": 4096, "K": 4096, "BLOCK": block})
            rows = {c.config["block_sizes"][0] for c in searched}
            # (block-scaled gate_up's tiles hold at most 128 x 64 outputs: 64 rows of a fused 128-column group)
            tall = not (spec is SILU_GROUP and block > 1 and not scaled_mm.quantized_after(Quant.PER_GROUP, m))
            assert rows == ({16} if m <= 16 else {64} if m <= 64 or not tall else {64, 128}), (m, block, rows)
            if m <= scaled_mm.SPLIT_MAX_M:  # and no N tile wider than 128 columns (64 up to 16 rows)
                assert max(c.config["block_sizes"][1] for c in searched) == (64 if m <= 16 else 128), (m, block)
            persistent = any(c.config.get("pid_type") == "persistent_interleaved" for c in searched)
            assert persistent == (m > scaled_mm.SPLIT_MAX_M or block == scaled_mm.SCALE_BLOCK), (m, block)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name)
def test_large_m_buckets_search_stages_and_grouped_programs(spec) -> None:
    """From M = 512 the search tries 3 and 4 stages (and 5 at M = 512), from M = 2048 also programs grouped along
    N, plain and with TMA: on an H200, block-scaled 64 x 128 tiles took 0.89-0.93x the time with 3 stages as with
    the 4 the search held alone, and grouped programs 0.95-0.97x at M = 8192. One-scale gate_up also tries 2
    stages, at which its 64 x 128 tiles fit two programs an SM. The grouped and 2-stage ones generate code."""
    for m in (512, 2048, 8192):
        for block in (1, scaled_mm.SCALE_BLOCK):
            searched = spec.search_configs({"M": m, "N": 4096, "K": 4096, "BLOCK": block})
            two = {2} if spec in GATED and block == 1 else set()
            assert {c.config["num_stages"] for c in searched} == ({3, 4, 5} if m == 512 else {3, 4}) | two, (m, block)
            group = scaled_mm.GROUP_SIZES[0] if spec in GROUPED else 1  # the fused epilogue's tiles count groups
            paired = {"block_sizes": [64, 128 // group], "num_warps": 4, "num_stages": 2}
            assert any(c.config.items() >= paired.items() for c in searched) == bool(two), (m, block)
            grouped = [c for c in searched if c.config.get("l2_groupings")]
            assert {c.config.get("indexing") for c in grouped} == ({None, "tensor_descriptor"} if m >= 2048 else set())
    product = own_launches(spec.prepare(**_inputs(300, 256, 384, "token_channel", spec=spec)))[0]
    bound = code_generator(product.kernel).bind(product.args)
    for block in (1, scaled_mm.SCALE_BLOCK):
        for config in spec.search_configs({"M": 2048, "N": 4096, "K": 4096, "BLOCK": block}):
            if config.config.get("l2_groupings") or config.config["num_stages"] == 2:
                assert "tl.dot" in triton_code(bound, product.args, config)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name)
def test_block_scales_search_64_column_tiles_from_m_512(spec) -> None:
    """From M = 512 block-scaled tiles of 64 columns are searched as well as 128: on an H200 at M = 512, N = 2112,
    K = 7168, 64 x 128 tiles made 136 programs for 132 SMs and 64 x 64 ones took 0.74-0.82x their time (gate_up,
    I = 2048: 0.89-0.94x). One-scale shapes keep 128 and 256 columns. The 64-column configs generate code."""
    fused = spec in GROUPED  # the per-group epilogue's tile is whole 128-column groups
    group = scaled_mm.GROUP_SIZES[0] if fused else 1
    for m in (512, 2048, 8192):
        for block, expected in ((1, {128, 256}), (scaled_mm.SCALE_BLOCK, {128} if fused else {64, 128})):
            searched = spec.search_configs({"M": m, "N": 4096, "K": 4096, "BLOCK": block})
            assert {c.config["block_sizes"][1] * group for c in searched} == expected, (m, block)
    product = own_launches(spec.prepare(**_inputs(512, 256, 384, "block", spec=spec)))[0]
    bound = code_generator(product.kernel).bind(product.args)
    narrow = [c for c in spec.search_configs({"M": 512, "N": 4096, "K": 4096, "BLOCK": 128})
              if c.config["block_sizes"][1] * group == 64]
    assert bool(narrow) != fused
    for config in narrow[:2]:
        assert "tl.dot" in triton_code(bound, product.args, config)


def test_candidates_that_overflow_shared_memory_are_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """gate_up tiles of 64 rows by 256 columns at 4 stages hold 294,912 bytes of operands, more than an H200's
    232,448: the tuner compiled them and they failed only when loaded. A GPU with more shared memory gets them."""
    spec, shape = REGISTRY["scaled_mm_silu_mul_static_fp8_quant"], {"M": 512, "N": 14336, "K": 4096}

    def tiles() -> list[tuple[list[int], int]]:
        return [(c.config["block_sizes"], c.config["num_stages"]) for c in [*spec.seed_configs(shape),
                                                                            *spec.search_configs(shape)]]

    assert ([64, 256], 4) not in tiles() and ([128, 128], 4) in tiles()
    monkeypatch.setattr(scaled_mm, "_shared_memory_bytes", lambda: 300_000)
    assert ([64, 256], 4) in tiles()


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name)
def test_block_scales_take_configs_of_their_own(spec) -> None:
    """A block-scaled call's problem key has BLOCK = 128, so it takes only configs tuned on block scales (or the
    default), and its candidates' tiles hold at most 128 x 128 outputs: each slice's dot is an fp32 tile beside
    the sum (on an H200 the row-scale configs' 128 x 256 tiles ran block scales at 110-200 TFLOP/s); gate_up's,
    two sums and two dots, at most 128 x 64 (128 x 128 spilled and took 1.7-1.9x the time). A tile's
    columns lie in one 128-column block of b's scales: the kernel reads one b scale a tile, and a stored config
    that covers more columns is refused when its file loads (row scales take them)."""
    for layout, block in (("token_channel", 1), ("block", 128)):
        product = own_launches(spec.prepare(**_inputs(300, 256, 384, layout, spec=spec)))[0]
        assert product.problem["BLOCK"] == block
    assert next(d for d in spec.problem if d.name == "BLOCK").exact
    for m in scaled_mm.M_GRID:
        shape = {"M": m, "N": 7168, "K": 2048, "BLOCK": 128}
        group = scaled_mm.GROUP_SIZES[0] if spec in GROUPED and not scaled_mm.quantized_after(
            Quant.PER_GROUP, m) else 1
        tiles = {(c.config["block_sizes"][0], c.config["block_sizes"][1] * group)
                 for c in [spec.default_config(shape), *spec.seed_configs(shape), *spec.search_configs(shape)]}
        largest = 128 * (64 if spec in GATED else 128)
        assert max(rows * columns for rows, columns in tiles) <= largest, (m, sorted(tiles))
        assert max(columns for _, columns in tiles) <= 128, (m, sorted(tiles))
        wide = {"block_sizes": [64, 256 // group], "num_warps": 4, "num_stages": 3}
        assert "at most 128" in spec.config_problem(wide, shape)
        assert spec.config_problem(wide, {**shape, "BLOCK": 1}) is None
        assert all(spec.config_problem(c.config, shape) is None for c in spec.search_configs(shape))


@pytest.mark.parametrize("spec", GATED, ids=lambda s: s.name)
def test_block_scaled_gate_up_takes_whole_blocks_a_half(spec) -> None:
    """A block-scaled gate_up weight's up half starts a block of b's scales: I a multiple of 128 (the engines' block
    fp8 checkpoints shard so); row scales take any I that is a multiple of 16."""
    kwargs = _inputs(7, 176, 256, "block", spec=spec)
    if spec is SILU_GROUP:
        kwargs.update(scales=poisoned((7, 1), torch.float32, "cpu"), group_size=176)
    with pytest.raises(ValueError, match=r"^b: .*I a multiple of 128.*I = 176"):
        spec.op(**kwargs)
    if spec is not SILU_GROUP:  # (per group: I a multiple of the 128-column group anyway)
        _check(spec, _inputs(7, 176, 256, "token_channel", spec=spec))


@pytest.mark.parametrize("spec", (SCALED_MM, SILU_GROUP), ids=lambda s: s.name)
def test_block_scaled_inputs_sum_exactly_in_any_order(spec) -> None:
    """make_inputs' block scales (BLOCK = 128) are powers of two close enough that every order of adding the scaled
    slices gives the same fp32 sum: split K then writes the contract's bytes, as the bench checks on the GPU."""
    kwargs = spec.make_inputs({"M": 16, "N": 256, "K": 2048, "BLOCK": 128}, torch.bfloat16, torch.device("cpu"))
    assert scaled_mm._block_scaled(kwargs["a_scales"], kwargs["b_scales"], 16, kwargs["b"].shape[1], 2048)
    a, b = kwargs["a"].double(), kwargs["b"].double()
    columns = kwargs["b_scales"].double().repeat_interleave(128, 0)[:b.shape[1]]
    slices = [(a[:, s:s + 128] @ b[s:s + 128]) * kwargs["a_scales"].double()[:, i, None] * columns[None, :, i]
              for i, s in enumerate(range(0, 2048, 128))]
    exact = sum(slices)
    assert torch.equal(scaled_mm._product(*(kwargs[n] for n in ("a", "b", "a_scales", "b_scales"))).double(), exact)
    assert torch.equal(sum(part.float() for part in reversed(slices)).double(), exact)


def test_static_output_saturates_at_the_fp8_max() -> None:
    kwargs = {**_inputs(7, 48, 96, "token_channel", static=True), "scale": torch.tensor(1e-6)}
    _check(STATIC, kwargs)
    STATIC.op(**kwargs)
    magnitudes = kwargs["out"].float().abs()
    assert float(magnitudes.max()) == 448.0 and float((magnitudes == 448.0).float().mean()) > 0.9


# --- quantized and gate_up epilogues --------------------------------------------------------------

@pytest.mark.parametrize("layout", ("tensor_0dim", "token_channel", "block"))
@pytest.mark.parametrize(("m", "n", "k"), [(1, 128, 128), (7, 384, 256), (33, 256, 384)])
@pytest.mark.parametrize("bias", (False, True))
@pytest.mark.parametrize("spec", (GROUP, TOKEN, SILU_STATIC, SILU_GROUP, SILU_TOKEN), ids=lambda s: s.name)
def test_epilogues_match_the_contract(spec, m: int, n: int, k: int, layout: str, bias: bool) -> None:
    _check(spec, _inputs(m, n, k, layout, bias, spec=spec))


@pytest.mark.parametrize(("m", "n", "k"), [(1, 48, 96), (7, 80, 256), (33, 208, 384)])
@pytest.mark.parametrize("spec", (TOKEN, SILU_TOKEN), ids=lambda s: s.name)
def test_per_token_takes_any_width(spec, m: int, n: int, k: int) -> None:
    """A row's amax is an atomic max over its tiles, of any width: N (I) need only be a multiple of 16."""
    _check(spec, _inputs(m, n, k, "token_channel", bias=True, spec=spec))


# --- split-K ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("m", "n", "k", "splits"), [
    (1, 4096, 14336, 4),  # Llama-3-8B down_proj at decode: 128 programs of 32 columns, 4 slices of 28 steps
    (16, 6144, 4096, 2),
    (1, 14336, 4096, 1),  # enough programs already
    (64, 4096, 14336, 4),  # a quarter of the weight's bytes allows 7 slices of 64 rows' partial sums
    (128, 4096, 14336, 2),
    (64, 4096, 4096, 2),
    (128, 4096, 4096, 1),  # 2 slices would round-trip half the weight's bytes
    (129, 4096, 14336, 1),  # past SPLIT_MAX_M rows
    (1, 4096, 4096 + 16, 1),  # K not a multiple of 128
    (1, 4096, 640, 1),  # 5 steps: no even split of 4 steps or more
])
def test_split_count(m: int, n: int, k: int, splits: int) -> None:
    assert scaled_mm.split_count(m, n, k, torch.device("cpu")) == splits
    dispatch.set_batch_invariant(True)
    try:  # a row's summation order must not depend on M
        assert scaled_mm.split_count(m, n, k, torch.device("cpu")) == 1
    finally:
        dispatch.set_batch_invariant(False)


@pytest.mark.parametrize("layout", ("tensor_0dim", "token_channel", "block"))
@pytest.mark.parametrize("m", (1, 7, 16))
@pytest.mark.parametrize("spec", SPLITTING, ids=lambda s: s.name)
def test_split_k_matches_the_contract(spec, m: int, layout: str) -> None:
    """K = 1024 at up to 16 rows splits: partial sums per K slice, then a launch adds them and runs the epilogue
    (per token: stores the rounded result and its row amaxes for the quantize launch; per group: the rounded
    result, which ``per_token_group_fp8_quant`` quantizes)."""
    kwargs = _inputs(m, 256, 1024, layout, bias=True, spec=spec)
    partial, reduce, *quantize = spec.prepare(**clone_kwargs(kwargs))
    splits = partial.args[9].size(0)
    assert splits > 1 and partial.args[9] is reduce.args[9] and partial.args[11] == splits
    assert (partial.args[-1], reduce.args[-1]) == (scaled_mm.Phase.PARTIAL, scaled_mm.Phase.REDUCE)
    if spec in GROUPED:
        (after,) = quantize
        assert after.tuned_as is GROUP_QUANT and after.args[0].data_ptr() == \
            reduce.args[5].data_ptr() and reduce.args[5].dtype == torch.bfloat16
    else:
        assert [launch.args[-1] for launch in quantize] == [scaled_mm.Phase.QUANTIZE] * (spec in (TOKEN, SILU_TOKEN))
    _check(spec, kwargs)


@pytest.mark.parametrize("scale_layout", ("row_major", "column_major", "tma_aligned"))
@pytest.mark.parametrize("spec", (GROUP, SILU_GROUP), ids=lambda s: s.name)
def test_group_scales_in_every_layout(spec, scale_layout: str) -> None:
    m, groups = 7, 3
    kwargs = _inputs(m, 128 * groups, 256, "token_channel", spec=spec, scale_layout=scale_layout)
    base = kwargs["scales"]._base  # the whole buffer of a transposed view
    expected = clone_kwargs(kwargs)
    spec.reference(**expected)
    with dispatch.interpreting():
        spec.op(**kwargs)  # into the strided scales themselves (a clone would be dense)
    assert torch.equal(kwargs["scales"], expected["scales"])
    assert torch.equal(kwargs["out"].view(torch.uint8), expected["out"].view(torch.uint8))
    if scale_layout == "tma_aligned":
        assert base[:, m:].view(torch.int32).eq(0x7F7F7F7F).all(), "the TMA padding rows of the scales were written"


@pytest.mark.parametrize("spec", (GROUP, SILU_GROUP), ids=lambda s: s.name)
def test_group_scales_given_transposed_as_engines_allocate_them(spec) -> None:
    """``is_scale_transposed`` with a row-major ``[N / 128, M]`` tensor: written as its ``[M, N / 128]`` view."""
    kwargs = {**_inputs(7, 256, 128, "tensor", spec=spec), "scales": poisoned((2, 7), torch.float32, "cpu"),
              "is_scale_transposed": True}
    _check(spec, kwargs)


@pytest.mark.parametrize("spec", (GROUP, SILU_GROUP), ids=lambda s: s.name)
def test_ue8m0_scales_are_powers_of_two(spec) -> None:
    written = _check(spec, {**_inputs(7, 256, 128, "token_channel", spec=spec), "scale_ue8m0": True})["scales"]
    assert torch.equal(written, torch.exp2(torch.log2(written).round()))


@pytest.mark.parametrize("spec", (TOKEN, SILU_TOKEN), ids=lambda s: s.name)
@pytest.mark.parametrize("m", (1, 7, 16))  # K = 1024: plain per-token splits K up to 16 rows (three launches)
def test_per_token_scale_ub_and_the_floor(spec, m: int) -> None:
    """``scale_ub`` below most rows' amax saturates their largest values at the fp8 max; a zero row takes the
    1 / 512 floor. Each row's scale is the max over all of its N tiles (N = 384: three groups)."""
    kwargs = _inputs(m, 384, 1024, "token_channel", spec=spec)
    if m > 1:
        kwargs["a"][m - 1] = 0
    unbounded = _check(spec, kwargs)["scales"]
    assert m == 1 or unbounded[m - 1, 0] == torch.tensor(1 / 512) / 448
    ub = unbounded[0, 0] * 448 / 2  # half the first row's amax
    written = _check(spec, {**kwargs, "scale_ub": ub.reshape(1)})
    clipped = unbounded > ub / 448
    assert clipped.any() and torch.equal(written["scales"][clipped], (ub / 448).expand(int(clipped.sum())))


@pytest.mark.parametrize("spec", (GROUP, SILU_GROUP), ids=lambda s: s.name)
def test_eps_floors_the_amax_of_a_zero_group(spec) -> None:
    kwargs = {**_inputs(7, 256, 128, "token_channel", spec=spec), "eps": 1e-4}
    kwargs["a"][2] = 0  # row 2 of the product is zero (and silu(0) * up is zero)
    written = _check(spec, kwargs)
    assert torch.equal(written["scales"][2], torch.full((2,), 1e-4) / 448)
    assert not written["out"][2].view(torch.uint8).any()


def test_each_epilogue_equals_the_unfused_composite() -> None:
    """The GEMM (bf16 out) followed by the package's own quant and activation ops gives the fused ops' bytes:
    per_token_group_fp8_quant (eps is its floor), silu_and_mul_quant, silu_and_mul_per_block_quant (whose floor
    is 1/512: eps = 1/512), dynamic_per_token_scaled_fp8_quant and silu_and_mul_dynamic_per_token_quant."""
    for spec, quant_op in ((GROUP, "per_token_group_fp8_quant"), (SILU_STATIC, "silu_and_mul_quant"),
                           (SILU_GROUP, "silu_and_mul_per_block_quant"), (TOKEN, "dynamic_per_token_scaled_fp8_quant"),
                           (SILU_TOKEN, "silu_and_mul_dynamic_per_token_quant")):
        kwargs = _inputs(33, 256, 384, "block", bias=True, spec=spec)
        if spec is SILU_GROUP:
            kwargs["eps"] = 1 / 512
        fused = _check(spec, kwargs)
        gemm = {name: kwargs[name] for name in ("a", "b", "a_scales", "b_scales", "bias")}
        y = torch.empty(33, kwargs["b"].shape[1], dtype=torch.bfloat16)
        SCALED_MM.reference(out=y, **gemm)
        out = poisoned((33, 256), FP8, "cpu")
        scales = poisoned((33, 1 if spec in (TOKEN, SILU_TOKEN) else 2), torch.float32, "cpu")
        unfused = REGISTRY[quant_op].reference
        if spec is GROUP:
            unfused(input=y, output_q=out, output_s=scales, group_size=128, eps=1e-10, fp8_min=-448.0, fp8_max=448.0,
                    scale_ue8m0=False)
        elif spec is SILU_STATIC:
            unfused(result=out, input=y, scale=kwargs["scale"])
        elif spec in (TOKEN, SILU_TOKEN):
            unfused(result=out, input=y, scale=scales, scale_ub=None)
        else:
            unfused(out=out, input=y, scales=scales, group_size=128)
        assert torch.equal(fused["out"].view(torch.uint8), out.view(torch.uint8)), spec.name
        if "scales" in kwargs:
            assert torch.equal(fused["scales"], scales), spec.name


def test_bad_epilogue_arguments_name_themselves() -> None:
    _raises(ValueError, "group_size", GROUP, group_size=64)
    _raises(ValueError, "group_size", GROUP, group_size=128, **_without_scales(_inputs(7, 48, 96, "tensor"), 1))
    _raises(ValueError, "scales", GROUP, scales=torch.empty(7, 3))
    _raises(TypeError, "scales", GROUP, scales=torch.empty(7, 2, dtype=torch.float16))
    _raises(ValueError, "scales", GROUP, scales=torch.empty(2, 7).t(), is_scale_transposed=False)
    _raises(ValueError, "eps", GROUP, eps=0.0)
    _raises(TypeError, "out", GROUP, out=torch.empty(7, 256, dtype=torch.bfloat16))
    _raises(ValueError, "b", SILU_STATIC, b=torch.zeros(48, 96, dtype=FP8).t())  # 48 = 2 * 24: I not a multiple of 16
    _raises(ValueError, "out", SILU_STATIC, out=poisoned((7, 512), FP8, "cpu"))  # [M, 2 I]: the gate_up width
    _raises(ValueError, "bias", SILU_STATIC, bias=torch.ones(256, dtype=torch.bfloat16))  # I, not 2 I
    _raises(ValueError, "b_scales", SILU_GROUP, b_scales=torch.ones(256))  # per channel: 2 I of them
    _raises(ValueError, "scales", TOKEN, scales=torch.empty(7))  # [M, 1], as the engine's per-token quant
    _raises(ValueError, "scales", SILU_TOKEN, scales=torch.empty(7, 2))
    _raises(ValueError, "scales", TOKEN, scales=torch.empty(7, 2)[:, :1])  # strided
    _raises(TypeError, "scales", TOKEN, scales=torch.empty(7, 1, dtype=torch.bfloat16))
    _raises(ValueError, "scale_ub", TOKEN, scale_ub=torch.ones(2))
    _raises(TypeError, "scale_ub", SILU_TOKEN, scale_ub=torch.ones(1, dtype=torch.float16))


def _without_scales(kwargs: dict[str, Any], groups: int) -> dict[str, Any]:
    """A small [7, 48] product's operands, with scales of ``groups`` columns."""
    return {name: kwargs[name] for name in ("a", "b", "a_scales", "b_scales")} | {
        "out": poisoned((7, 48), FP8, "cpu"), "scales": poisoned((7, groups), torch.float32, "cpu")}


# --- what the GPU code needs: interpret mode runs the kernel eagerly and sees none of it ------------

@pytest.mark.parametrize("layout", ("tensor_0dim", "token_channel", "block"))
@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name)
def test_one_token_stores_index_and_mask_the_tile_rows(spec, layout: str) -> None:
    """At M = 1 Helion indexes a one-row dim it cannot tie to the row tile's extent as a broadcast dim: a store
    into it loses the row index and the row mask, and the tile's rows (16 at least, for the dot) all write row 0,
    the padding rows' values among them (on an H200: nearly every output byte wrong). Split-K's partial sums too
    (K = 1024: two launches, the partial sums' stores, then the epilogue's). A per-group output of one token is
    quantized after the product, by another op's kernel (tested with it)."""
    shape = {"M": 1, "N": 4096, "K": 4096}
    halves = 2 if spec in GATED else 1
    for k, launches in ((384, 1), (1024, 2)):
        prepared = own_launches(spec.prepare(**_inputs(1, 256, k, layout, bias=True, spec=spec)))
        assert len(prepared) == launches + (spec in (TOKEN, SILU_TOKEN))  # per token: then the quantize launch
        for launch in prepared:
            bound = code_generator(launch.kernel).bind(launch.args)
            default = spec.default_config(shape)  # and as a persistent kernel, as a block-scaled one is tuned
            for config in (default, helion.Config(**default.config, pid_type="persistent_interleaved")):
                stores = [line.strip() for line in bound.to_triton_code(config).splitlines()
                          if line.strip().startswith(("tl.store(", "tl.atomic_max("))]
                # fp8 values and scales; per token y and the row amaxes' atomic max, then (quantize) fp8 values,
                # scales and the row amaxes' zeroing
                expected = {scaled_mm.Phase.PARTIAL: halves, scaled_mm.Phase.QUANTIZE: 3}
                epilogue = 2 if spec in (TOKEN, SILU_TOKEN) else 1
                assert len(stores) == expected.get(launch.args[-1], epilogue), stores
                for store in stores:  # the row tile is the first block: indices_0, mask_0
                    indexed = re.search(r"\bindices_0\b", store) and re.search(r"\bmask_0\b", store)
                    assert indexed, f"{dict(config)}: {store}"


def _ptx(spec, layout: str, bias: bool, m: int = 2048, k: int = 384, n: int = 512) -> list[str]:
    """The op's own launches at ``M = m``, ``N = n`` under its default config, compiled for sm_90 by Triton on the
    CPU."""
    shape = {"M": m, "N": n, "K": k}
    kwargs = _inputs(shape["M"], shape["N"], shape["K"], layout, bias=bias, spec=spec)
    ptx = []
    for launch in own_launches(spec.prepare(**kwargs)):
        ptx.append(machine_code(launch.kernel, launch.args, spec.default_config(shape)).asm["ptx"])
    return ptx


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name)
def test_every_flavour_compiles_to_a_pipelined_wgmma_loop_for_sm90(spec) -> None:
    """The flavours without a quant group (G = 1) once loaded ``[K, N, 1]`` weight tiles and reshaped them for the
    dot: Triton 3.9 finds no shared-memory layout for them (``Illegal shared layout``), and the H200's build ran
    them 30x slower than cuBLAS. Every flavour's main loop is wgmma fed by asynchronous copies."""
    ptx, *quantize = _ptx(spec, "token_channel", True)
    assert "wgmma.mma_async" in ptx and "cp.async" in ptx
    assert all("mma" not in code for code in quantize)


@pytest.mark.parametrize("layout", ("token_channel", "block"))
@pytest.mark.parametrize("spec", SPLITTING, ids=lambda s: s.name)
def test_split_k_launches_compile_for_sm90(spec, layout: str) -> None:
    """Split-K at M = 16: the partial sums' K loop is fed by asynchronous copies; the reduction (and the per-token
    quantize launch) has no K loop."""
    partial, reduce, *quantize = _ptx(spec, layout, True, m=16, k=1024)
    assert "cp.async" in partial and "mma" in partial and "mma" not in reduce
    assert len(quantize) == (spec in (TOKEN, SILU_TOKEN)) and all("mma" not in code for code in quantize)


@pytest.mark.parametrize("m", (1, 300))
@pytest.mark.parametrize("spec", (TOKEN, SILU_TOKEN), ids=lambda s: s.name)
def test_per_token_at_any_width_compiles_for_sm90(spec, m: int) -> None:
    """N = 48, narrower than any tile (the kernel specializes on N): the product's launches compile to wgmma (at
    M = 1 split-K's partial sums and their reduction), the quantize launch to no mma at all."""
    *product, quantize = _ptx(spec, "token_channel", True, m=m, k=1024, n=48)
    assert len(product) == (2 if m == 1 else 1) and "mma" in product[0] and "mma" not in quantize


def _fmas(ptx: str) -> int:
    return len(re.findall(r"\bfma\.rn\.(?:ftz\.)?f32\b", ptx))


@pytest.mark.parametrize("spec", (SCALED_MM, GROUP), ids=lambda s: s.name)
def test_block_slices_are_fused_multiply_adds_and_a_biased_product_is_rounded(spec) -> None:
    """Block scales: each K step adds ``dot * s`` with explicit fused multiply-adds, one an accumulator element
    (the default config's 128 x 128 tile over 8 warps: 64 a thread), whatever the compiler's contraction setting.
    A bias: ``a_s * y`` rounded on its own before the add, as the contract rounds it (contracted, on an H200 a
    few elements in 10^4 to 10^6 landed on the other side of a rounding tie); the only other multiply-adds are
    the epilogue's own (the per-group quant's division)."""
    own = _fmas(_ptx(spec, "token_channel", False)[0])
    (block,) = _ptx(spec, "block", False)
    assert _fmas(block) - own >= 128 * 128 // 256, (_fmas(block), own)
    (bias,) = _ptx(spec, "token_channel", True)
    assert re.search(r"\bmul\.rn\.(?:ftz\.)?f32\b", bias) and _fmas(bias) == own, (_fmas(bias), own)


def test_block_scaled_slices_round_once() -> None:
    """The contract adds each slice's product and scales in one fused multiply-add, as CUTLASS's blockwise scale
    promotion (the engine's block-fp8 GEMM on Hopper) does: with scales that are not powers of two some sums differ
    from a rounded product then an add. Each equals the exact sum rounded to fp32 (by hand in fp64 here)."""
    generator = torch.Generator().manual_seed(0)
    part, s, acc = (torch.randn(1 << 16, generator=generator) for _ in range(3))
    fused, exact = epilogues.fma(part, s, acc), part.double() * s.double() + acc.double()
    error = (fused.double() - exact).abs()
    for toward in (torch.inf, -torch.inf):  # the nearest fp32
        assert (error <= (torch.nextafter(fused, torch.tensor(toward)).double() - exact).abs()).all()
    assert (fused != acc + part * s).sum() > 100
    a, b = (torch.randint(-8, 9, shape, generator=generator, dtype=torch.int8).to(torch.float8_e4m3fn)
            for shape in ((4, 384), (384, 128)))
    a_scales, b_scales = torch.rand(4, 3, generator=generator) / 16, torch.rand(1, 3, generator=generator) / 256
    by_hand = torch.zeros(4, 128, dtype=torch.float64)
    for i in range(3):
        product = a[:, 128 * i:128 * (i + 1)].double() @ b[128 * i:128 * (i + 1)].double()  # exact
        by_hand = (by_hand + product * (a_scales[:, i:i + 1] * b_scales[:, i]).double()).float().double()
    assert torch.equal(scaled_mm._product(a, b, a_scales, b_scales), by_hand.float())


@pytest.mark.parametrize("layout", ("tensor", "tensor_0dim", "token", "channel", "token_1d"))
def test_per_tensor_scales_run_the_row_scale_kernel(layout: str) -> None:
    """Configs are tuned on the row-scale kernel; on an H200 the per-tensor variant ran the same config up to
    1.4x slower. A one-element scale is read as a stride-0 row of scales: the launch's kernel key (the compile
    variant) is the row-scale one."""
    key = lambda layout: [launch.key for launch in SCALED_MM.prepare(**_inputs(64, 256, 256, layout))]  # noqa: E731
    assert key(layout) == key("token_channel")


def test_scratch_is_shared_by_calls_of_every_size() -> None:
    """An engine calls with thousands of token counts, and a launch plan keeps its launches' tensors: split-K sums
    and the per-token result come from one buffer per device that grows, not a buffer per call size."""
    def buffers(m: int) -> list[int]:
        launches = TOKEN.prepare(**_inputs(m, 256, 1024, "token_channel", spec=TOKEN))
        assert [launch.args[-1] for launch in launches] == [scaled_mm.Phase.PARTIAL, scaled_mm.Phase.REDUCE,
                                                             scaled_mm.Phase.QUANTIZE]
        partials, rounded, words = launches[0].args[9], launches[0].args[5], launches[0].args[8]
        return [tensor.untyped_storage().data_ptr() for tensor in (partials, rounded, words)]

    largest = buffers(16)
    assert all(buffers(m) == largest for m in (1, 7, 15))


@pytest.mark.parametrize("m", (1, 7, 33))
@pytest.mark.parametrize("spec", (TOKEN, SILU_TOKEN), ids=lambda s: s.name)
def test_per_token_row_words_are_zero_again_after_a_call(spec, m: int) -> None:
    """The product's launch takes an atomic max of each row's amax into a shared word that must start at zero; the
    quantize launch's last program of each row tile zeroes its words and its count again, so the next call (a
    smaller row's amax in the same word) gets its own scale."""
    kwargs = _inputs(m, 256, 256, "token_channel", spec=spec)
    (*_, quantize) = spec.prepare(**kwargs)
    words = quantize.args[8]
    assert words.shape == (m, 2) and words.dtype == torch.int32
    for scale in (1.0, 1 / 64):  # the second call's amaxes are smaller: a stale word would win the max
        kwargs["a_scales"] = kwargs["a_scales"] * scale
        _check(spec, kwargs)
        assert not words._base.any(), words._base.nonzero()
