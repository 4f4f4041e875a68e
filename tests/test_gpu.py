"""The compiled kernels on a CUDA GPU against the reference on the same GPU; CUDA graphs; torch.compile."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import pytest
import torch
from conftest import (
    POISON_BYTE,
    arg,
    assert_outputs_match,
    clone_kwargs,
    is_nvfp4_op,
    is_poison,
    problem_shape,
    round_up,
    run_against_reference,
    written,
)
from helion.runtime.ref_mode import RefMode

import helion_fusions
from helion_fusions.runtime import dispatch
from helion_fusions import quant
from helion_fusions.kernels.scaled_mm import Phase
from helion_fusions.ops import scaled_mm
from helion_fusions.runtime.registry import REGISTRY, OpSpec, own_launches
from helion_fusions.tools.testing import poisoned

# a kernel that does not build falls back to its eager reference with a warning: here that is a failure, since
# the reference's bytes would pass every check below
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.filterwarnings("error:helion_fusions.*no kernel builds")]

CUDA = torch.device("cuda")
TOKENS = (1, 7, 300, 4096)
GROUP_OPS = [spec for spec in REGISTRY.values() if "group_size" in spec.arg_names
             and spec.family != "scaled_mm"]  # (GEMMs: test_scaled_mm_group_scale_layouts)
# the rms_norm flavours whose fp32 outputs are not rounded to a narrower dtype: output -> ulps allowed
FP32_ULP_OPS = {
    "rms_norm": {"result": 4},
    "fused_add_rms_norm": {"input": 4, "residual": 0},
    "rms_norm_dynamic_per_token_quant": {"result": 1, "scale": 4},
    "rms_norm_per_block_quant": {"result": 1, "scale": 4},
}


def _hidden_sizes(spec: OpSpec) -> tuple[int, ...]:
    """4096, 5120 and one size that is not a power of two, legal for the op."""
    # a per-group GEMM takes N in groups of 128; the per-token ones (any multiple of 16; N = 48-208 in
    # test_scaled_mm) keep the same sizes here
    if "group_size" in spec.arg_names or ("scales" in spec.arg_names and "N" in spec.dim_names):
        return (4096, 5120, 128 * 9)
    if is_nvfp4_op(spec) or "N" in spec.dim_names:  # (a GEMM's N: a multiple of 16)
        return (4096, 5120, 16 * 65)
    return (4096, 5120, 1025)


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels() -> Iterable[None]:
    """GPU calls run the compiled kernels, even when the session was started with HELION_INTERPRET=1."""
    patch = pytest.MonkeyPatch()
    patch.delenv("HELION_INTERPRET", raising=False)
    kernels = {id(k): k for spec in REGISTRY.values() for k in (spec.kernel, *spec.extra_kernels)}.values()
    interpreted = [kernel for kernel in kernels if kernel.settings.ref_mode != RefMode.OFF]
    for kernel in interpreted:
        kernel.settings.ref_mode = RefMode.OFF
        kernel.reset()
    yield
    for kernel in interpreted:
        kernel.settings.ref_mode = RefMode.EAGER
        kernel.reset()
    patch.undo()


def _inputs(spec: OpSpec, tokens: int, hidden: int, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    return spec.make_inputs(problem_shape(spec, tokens, hidden), dtype, CUDA)


def _cases() -> list[Any]:
    cases = []
    for spec in REGISTRY.values():
        for tokens, hidden in itertools.product(TOKENS, _hidden_sizes(spec)):
            cases.append(pytest.param(spec, tokens, hidden, torch.bfloat16, id=f"{spec.name}-{tokens}-{hidden}-bf16"))
        for tokens in (7, 4096):
            cases.append(pytest.param(spec, tokens, 4096, torch.float16, id=f"{spec.name}-{tokens}-4096-fp16"))
        if spec.name not in FP32_ULP_OPS:  # those: test_float32_rms_norm_within_ulps
            cases.append(pytest.param(spec, 300, 4096, torch.float32, id=f"{spec.name}-300-4096-fp32"))
    return cases


@pytest.mark.parametrize(("spec", "tokens", "hidden", "dtype"), _cases())
def test_compiled_matches_reference(spec: OpSpec, tokens: int, hidden: int, dtype: torch.dtype) -> None:
    kwargs = _inputs(spec, tokens, hidden, dtype)
    if kwargs.get("residual", ...) is None:
        kwargs["residual"] = torch.randn(tokens, hidden, dtype=dtype, device=CUDA)
    run_against_reference(spec, kwargs)


@pytest.mark.parametrize("layout", ["row_major", "transposed", "tma_aligned"])
@pytest.mark.parametrize("group", [64, 128])
@pytest.mark.parametrize("tokens", [1, 7, 300, 4096])
@pytest.mark.parametrize("spec", GROUP_OPS, ids=lambda s: s.name)
def test_per_block_scale_layouts(spec: OpSpec, layout: str, group: int, tokens: int) -> None:
    hidden = 4096
    groups = hidden // group
    kwargs = _inputs(spec, tokens, hidden)
    if layout == "row_major":
        base = poisoned((tokens, groups), torch.float32, CUDA)
        scale = base
    elif layout == "transposed":
        base = poisoned((groups, tokens), torch.float32, CUDA)
        scale = base.t()
    else:
        base = poisoned((groups, round_up(tokens, 4)), torch.float32, CUDA)
        scale = base[:, :tokens].t()
    kwargs.update({arg(spec, "scale"): scale, "group_size": group})
    if "is_scale_transposed" in spec.arg_names:
        kwargs["is_scale_transposed"] = layout != "row_major"
    run_against_reference(spec, kwargs)
    if layout == "tma_aligned":
        assert is_poison(base[:, tokens:]), "the TMA padding columns of the scale buffer were written"


@pytest.mark.parametrize("swizzled", [True, False], ids=["swizzled", "linear"])
@pytest.mark.parametrize("tokens", [1, 130, 4096])
@pytest.mark.parametrize("spec", [s for s in REGISTRY.values() if is_nvfp4_op(s)], ids=lambda s: s.name)
def test_nvfp4_layouts(spec: OpSpec, tokens: int, swizzled: bool) -> None:
    hidden = 16 * 65  # 65 scale columns: the swizzled layout pads them to 68
    kwargs = _inputs(spec, tokens, hidden)
    kwargs["is_sf_swizzled_layout"] = swizzled
    name = arg(spec, "block_scale")
    if not swizzled:
        kwargs[name] = poisoned((tokens, hidden // 16), torch.uint8, CUDA)
    run_against_reference(spec, kwargs)
    if swizzled:
        cols = hidden // 16
        used = quant.swizzled_scale_offset(torch.arange(tokens, device=CUDA)[:, None],
                                           torch.arange(cols, device=CUDA)[None, :], cols).reshape(-1)
        padding = torch.ones(kwargs[name].numel(), dtype=torch.bool, device=CUDA)
        padding[used] = False
        assert bool((kwargs[name].reshape(-1)[padding] == 0).all()), "swizzled padding must be zero"


@pytest.mark.parametrize("global_scale", [1.0, 2.0 ** 120, 0.0], ids=["unit", "huge", "zero"])
@pytest.mark.parametrize("spec", [s for s in REGISTRY.values() if is_nvfp4_op(s)], ids=lambda s: s.name)
def test_nvfp4_special_values(spec: OpSpec, global_scale: float) -> None:
    """NaN, +-inf, +-0 and subnormals scattered over the blocks, and global scales whose block multiplier is
    infinite (a huge one: 0 * inf is NaN in the kernel) or zero: the compiled codes and scales equal the
    reference's, and a result row padded to a 4-byte (not 8-byte) multiple is addressed right."""
    tokens, hidden = 300, 16 * 65
    kwargs = _inputs(spec, tokens, hidden)
    generator = torch.Generator(device=CUDA).manual_seed(7)
    values = kwargs["input"].view(-1)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -1e-40],
                            device=CUDA).to(values.dtype)
    where = torch.randint(0, values.numel(), (values.numel() // 50,), device=CUDA, generator=generator)
    values[where] = specials[torch.randint(0, len(specials), where.shape, device=CUDA, generator=generator)]
    # blocks of zeros and tiny values: with a global scale of 2 ** 120 their amax of about 1e-38 gives an
    # infinite multiplier (scaled_fp4_quant), and a zero times it is NaN in the kernel
    tiny = torch.tensor([0.0, -0.0, 1e-38, -1e-38, 5e-39, 1e-40], device=CUDA).to(values.dtype)
    corner = kwargs["input"][:10, :64]
    corner.copy_(tiny[torch.randint(0, len(tiny), corner.shape, device=CUDA, generator=generator)])
    kwargs[arg(spec, "global_scale")] = torch.tensor([global_scale], device=CUDA)
    name = arg(spec, "result")
    base = poisoned((tokens, hidden // 2 + 4), torch.uint8, CUDA)
    kwargs[name] = base[:, :hidden // 2]
    run_against_reference(spec, kwargs, max_flip_fraction=0.0)
    assert is_poison(base[:, hidden // 2:]), "the padding bytes of the result rows were written"


@pytest.mark.parametrize("spec", [s for s in REGISTRY.values() if "input" in s.arg_names], ids=lambda s: s.name)
def test_strided_input(spec: OpSpec) -> None:
    tokens, hidden = 300, 4096
    kwargs = _inputs(spec, tokens, hidden)
    width = kwargs["input"].shape[1]
    wide = torch.randn(tokens, width + 64, device=CUDA).to(kwargs["input"].dtype)
    wide[:, :width] = kwargs["input"]
    kwargs["input"] = wide[:, :width]
    run_against_reference(spec, kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_silu_and_mul_equals_the_eager_composite_exactly(dtype: torch.dtype) -> None:
    """On a GPU the op equals ``F.silu(gate.float()).to(dtype) * up`` byte for byte (the same expf)."""
    spec = REGISTRY["silu_and_mul"]
    kwargs = _inputs(spec, 4096, 14336, dtype)
    spec.op(**kwargs)
    gate, up = kwargs["input"].float()[:, :14336], kwargs["input"][:, 14336:]
    composite = torch.nn.functional.silu(gate).to(dtype) * up
    assert torch.equal(kwargs["result"].view(torch.int16), composite.view(torch.int16))


# --- CUDA graphs ------------------------------------------------------------------------------------

def _refill(spec: OpSpec, kwargs: dict[str, Any], seed: int) -> None:
    """New activations in place, and outputs poisoned again, keeping every buffer's address."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for name in ("input", "residual"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor):
            value.copy_(torch.randn(value.shape, generator=generator))
    for name in written(spec, kwargs):
        if name not in ("input", "residual"):
            kwargs[name].view(torch.uint8).fill_(POISON_BYTE)


@pytest.mark.parametrize("spec", list(REGISTRY.values()), ids=lambda s: s.name)
def test_cuda_graph_replay_after_warmup(spec: OpSpec) -> None:
    model_dims = {d.name: size for d, size in zip(spec.problem, problem_shape(spec, 1, 4096).values()) if not d.bucketed}
    helion_fusions.warmup(shapes=[model_dims], ops=[spec.name], max_tokens=16)
    compiled = dispatch.compiled_count()
    kwargs = _inputs(spec, 7, 4096)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        spec.op(**kwargs)
    assert dispatch.compiled_count() == compiled, "capture compiled a kernel"
    for seed in (1, 2):
        _refill(spec, kwargs, seed)
        eager = clone_kwargs(kwargs)
        spec.op(**eager)
        graph.replay()
        torch.cuda.synchronize()
        assert_outputs_match(spec, kwargs, eager, max_flip_fraction=0)


def test_warmup_with_forward_covers_the_variants_it_calls() -> None:
    """The default warm-up builds residual=None, scale_ub=None; an engine's forward with both is built too."""
    spec = REGISTRY["rms_norm_dynamic_per_token_quant"]
    hidden = 2560  # a hidden size no other test compiles

    def variant(tokens: int) -> dict[str, Any]:
        kwargs = _inputs(spec, tokens, hidden)
        kwargs.update(residual=torch.randn(tokens, hidden, dtype=torch.bfloat16, device=CUDA),
                      scale_ub=torch.tensor([2.0], device=CUDA))
        return kwargs

    helion_fusions.warmup(forward=lambda tokens: spec.op(**variant(tokens)), max_tokens=16)
    compiled = dispatch.compiled_count()
    kwargs = variant(7)
    eager = clone_kwargs(kwargs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        spec.op(**kwargs)
    assert dispatch.compiled_count() == compiled, "capture compiled a kernel"
    graph.replay()
    spec.op(**eager)
    torch.cuda.synchronize()
    assert_outputs_match(spec, kwargs, eager, max_flip_fraction=0)


@pytest.mark.parametrize("spec", [s for s in REGISTRY.values() if s.outputs is not None], ids=lambda s: s.name)
def test_functional_equals_the_op_and_captures(spec: OpSpec) -> None:
    """helion_fusions.functional allocates on the GPU, equals the op on preallocated outputs, and can be captured."""
    kwargs = _inputs(spec, 7, 4096)
    expected = clone_kwargs(kwargs)
    spec.op(**expected)

    def fresh_inputs() -> dict[str, Any]:  # in-place arguments (residual, key, caches) as make_inputs left them
        return {name: value for name, value in clone_kwargs(kwargs).items() if name not in spec.outputs.names}

    inputs = fresh_inputs()
    function = getattr(helion_fusions.functional, spec.name)
    returned = function(**inputs)
    returned = returned if isinstance(returned, tuple) else (returned,)
    assert_outputs_match(spec, {**inputs, **dict(zip(spec.outputs.names, returned))}, expected, max_flip_fraction=0)
    compiled = dispatch.compiled_count()
    graph = torch.cuda.CUDAGraph()
    captured_inputs = fresh_inputs()
    with torch.cuda.graph(graph):
        captured = function(**captured_inputs)
    assert dispatch.compiled_count() == compiled, "capture compiled a kernel"
    graph.replay()
    torch.cuda.synchronize()
    captured = captured if isinstance(captured, tuple) else (captured,)
    assert_outputs_match(spec, {**captured_inputs, **dict(zip(spec.outputs.names, captured))}, expected,
                         max_flip_fraction=0)


def test_capture_without_warmup_raises() -> None:
    spec = REGISTRY["rms_norm_static_fp8_quant"]
    kwargs = _inputs(spec, 3, 2304)  # a hidden size no other test compiles
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="warmup"):
        with torch.cuda.graph(graph):
            spec.op(**kwargs)
    torch.cuda.synchronize()


# --- torch.compile --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", list(REGISTRY.values()), ids=lambda s: s.name)
def test_compile_fullgraph(spec: OpSpec) -> None:
    torch._dynamo.reset()
    op = spec.op
    kwargs = _inputs(spec, 7, 4096)
    outputs = written(spec, kwargs)

    def call(**arguments: Any) -> list[torch.Tensor]:
        op(**arguments)
        return [arguments[name] for name in outputs]

    eager = clone_kwargs(kwargs)
    call(**eager)
    torch.compile(call, fullgraph=True)(**kwargs)
    assert_outputs_match(spec, kwargs, eager, max_flip_fraction=0)


# --- RoPE family: skipped tokens ------------------------------------------------------------------

ROPE_OPS = [spec for spec in REGISTRY.values() if spec.family in ("rope", "kv_cache")]


@pytest.mark.parametrize("spec", ROPE_OPS, ids=lambda s: s.name)
def test_rope_skips_bad_positions_and_slots(spec: OpSpec) -> None:
    """Positions outside the cos/sin table and slots that are negative or past the cache, on the GPU: the
    kernel agrees with the reference byte for byte, and cache slots no kept token maps to keep their poison."""
    tokens = 300
    kwargs = _inputs(spec, tokens, 4096)
    generator = torch.Generator().manual_seed(5)
    bad = torch.rand(tokens, generator=generator) < 0.2
    for name in ("positions", "position_ids"):
        if name in kwargs:
            table_rows = kwargs["cos_sin_cache"].shape[0]
            kwargs[name][bad.to(CUDA)] = torch.tensor([-1, table_rows, 2**40], device=CUDA).repeat(tokens)[
                :int(bad.sum())]
    slots = kwargs.get("slot_mapping")
    if slots is not None:
        cache = kwargs["key_cache" if "key_cache" in kwargs else "kv_cache"]
        capacity = cache.shape[0] * cache.shape[1]
        skipped = torch.rand(tokens, generator=generator) < 0.2
        slots[skipped.to(CUDA)] = torch.tensor([-1, capacity], device=CUDA).repeat(tokens)[:int(skipped.sum())]
    run_against_reference(spec, kwargs, max_flip_fraction=0)
    if slots is not None:
        kept = set(int(s) for s in slots.tolist() if s >= 0)
        for name in ("key_cache", "value_cache", "kv_cache"):
            if name in kwargs:
                rows = kwargs[name].flatten(0, 1)
                untouched = [s for s in range(rows.shape[0]) if s not in kept]
                assert is_poison(rows[untouched]), f"{name}: a slot no kept token maps to was written"


# --- launch plans: repeat calls and compiles after warm-up ---------------------------------------------

@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("spec", list(REGISTRY.values()), ids=lambda s: s.name)
def test_repeat_calls_through_the_plan_match_the_reference(spec: OpSpec, tokens: int) -> None:
    """The first call lays out the plan; later calls of the same signature on new buffers (new data
    pointers, outputs poisoned again) launch through it, and still equal the reference byte for byte."""
    for _ in range(3):
        kwargs = _inputs(spec, tokens, 4096)
        if kwargs.get("residual", ...) is None:
            kwargs["residual"] = torch.randn(tokens, 4096, dtype=torch.bfloat16, device=CUDA)
        run_against_reference(spec, kwargs)


@pytest.fixture
def triton_compiles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the Triton kernels compiled while the test runs."""
    import triton.runtime.jit as jit

    if not hasattr(jit.JITFunction, "_do_compile"):
        pytest.skip("this Triton has no JITFunction._do_compile to count compiles with")
    compiles: list[str] = []
    do_compile = jit.JITFunction._do_compile

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        compiles.append(self.__name__)
        return do_compile(self, *args, **kwargs)

    monkeypatch.setattr(jit.JITFunction, "_do_compile", counted)
    return compiles


@pytest.mark.parametrize("spec", [REGISTRY[n] for n in ("rms_norm", "silu_and_mul_quant", "per_token_group_fp8_quant",
                                                        "scaled_fp4_quant", "rotary_embedding",
                                                        "dynamic_scaled_fp8_quant")], ids=lambda s: s.name)
def test_nothing_compiles_after_warmup_across_a_token_sweep(spec: OpSpec, triton_compiles: list[str]) -> None:
    """warmup() builds every bucket and every divisibility variant of the token count: a sweep of T
    afterwards (24, 1000 and every other count up to 300) compiles nothing, in Helion or in Triton."""
    helion_fusions.warmup(hidden_sizes=[4096], ops=[spec.name], max_tokens=1024)
    compiled, compiles = dispatch.compiled_count(), len(triton_compiles)
    for tokens in [*range(1, 301), 1000, 1024]:
        spec.op(**_inputs(spec, tokens, 4096))
    torch.cuda.synchronize()
    assert dispatch.compiled_count() == compiled, "a call compiled a Helion kernel after warmup"
    assert triton_compiles[compiles:] == [], "a call compiled a Triton variant after warmup"


@pytest.mark.parametrize("spec", list(REGISTRY.values()), ids=lambda s: s.name)
def test_zero_dim_scales(spec: OpSpec) -> None:
    """Engines keep a static scale as a 0-dim tensor: the compiled kernel takes it and matches the reference."""
    kwargs = _inputs(spec, 7, 4096)
    names = [name for name, value in kwargs.items()
             if isinstance(value, torch.Tensor) and value.dtype == torch.float32 and value.numel() == 1
             and value.dim() >= 1 and name not in spec.mutated_args]
    if "scale_ub" in spec.arg_names:
        kwargs["scale_ub"] = torch.tensor([3.0], device=CUDA)
        names.append("scale_ub")
    if not names:
        pytest.skip("no one-element scale among its inputs")
    for name in names:
        kwargs[name] = kwargs[name].reshape(())
    run_against_reference(spec, kwargs)


# --- engine arguments: weight=None, transposed scales as [groups, tokens], group size 32 -------------------

@pytest.mark.parametrize("tokens", [1, 300])
@pytest.mark.parametrize("name", ["rms_norm", "fused_add_rms_norm"])
def test_weight_none(name: str, tokens: int) -> None:
    run_against_reference(REGISTRY[name], {**_inputs(REGISTRY[name], tokens, 4096), "weight": None})


@pytest.mark.parametrize("tokens", [1, 300])
@pytest.mark.parametrize("name", ["silu_and_mul_per_block_quant", "rms_norm_per_block_quant"])
def test_transposed_scales_allocated_groups_by_tokens(name: str, tokens: int) -> None:
    spec = REGISTRY[name]
    kwargs = {**_inputs(spec, tokens, 4096), "group_size": 128, "is_scale_transposed": True}
    kwargs["scales" if "scales" in spec.arg_names else "scale"] = poisoned((4096 // 128, tokens), torch.float32, CUDA)
    run_against_reference(spec, kwargs)


@pytest.mark.parametrize("tokens", [1, 7, 4096])
def test_per_token_group_quant_group_32(tokens: int) -> None:
    spec = REGISTRY["per_token_group_fp8_quant"]
    kwargs = {**_inputs(spec, tokens, 4096), "group_size": 32,
              "output_s": poisoned((tokens, 4096 // 32), torch.float32, CUDA)}
    run_against_reference(spec, kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(("tokens", "hidden"), [(300, 11008), (1500, 10837), (4096, 14336)])
@pytest.mark.parametrize("with_ub", (False, True), ids=("no_ub", "scale_ub"))
def test_per_token_row_walk_on_strided_rows(tokens: int, hidden: int, dtype: torch.dtype, with_ub: bool) -> None:
    """Gated per-token quant of wide rows from T > 128 (silu_mul_rows_kernel), rows strided wider than 2 * H."""
    spec = REGISTRY["silu_and_mul_dynamic_per_token_quant"]
    kwargs = _inputs(spec, tokens, hidden, dtype)
    padded = torch.randn(tokens, 2 * hidden + 64, dtype=dtype, device=CUDA)
    padded[:, :2 * hidden] = kwargs["input"]
    kwargs["input"] = padded[:, :2 * hidden]
    if with_ub:
        kwargs["scale_ub"] = torch.tensor(2.5, device=CUDA)  # 0-dim
    (launch,) = spec.prepare(**kwargs)
    assert launch.kernel in spec.extra_kernels
    run_against_reference(spec, kwargs)


@pytest.mark.parametrize("spec", [REGISTRY[name] for name in FP32_ULP_OPS], ids=lambda s: s.name)
def test_float32_rms_norm_within_ulps(spec: OpSpec) -> None:
    """fp32 activations: the kernel's rsqrt (an approximation) and summation order move rstd by an ulp or two,
    and nothing rounds y to a narrower dtype, so fp32 outputs move by a few ulps, fp8 codes near a tie by one
    step and dynamic scales by a few ulps (bounds in FP32_ULP_OPS)."""
    from helion_fusions.tools.testing import ulp_distance

    kwargs = _inputs(spec, 300, 4096, torch.float32)
    if "residual" in spec.arg_names:
        kwargs["residual"] = torch.randn(300, 4096, device=CUDA)
    expected = clone_kwargs(kwargs)
    spec.op(**kwargs)
    spec.reference(**expected)
    for name, steps in FP32_ULP_OPS[spec.name].items():
        assert int(ulp_distance(kwargs[name], expected[name]).abs().max()) <= steps, name


# --- engine arguments added after the first GPU runs (each also has a CPU test) --------------------------------

PAIRED = [(REGISTRY[name], names) for name, names in (
    ("rotary_embedding", ("query", "key")), ("rotary_embedding_and_cache", ("query", "key")),
    ("rotary_embedding_static_fp8_quant", ("query", "key")), ("concat_and_cache_mla_rope", ("q_pe", "k_pe")))]


@pytest.mark.parametrize("layout", ["ab", "ba", "a_b"])
@pytest.mark.parametrize("tokens", [1, 7, 2048])
@pytest.mark.parametrize(("spec", "names"), PAIRED, ids=lambda p: getattr(p, "name", ""))
def test_query_and_key_views_of_one_tensor(spec: OpSpec, names: tuple[str, str], tokens: int, layout: str) -> None:
    from test_rope_ops import _packed

    kwargs = _inputs(spec, tokens, 4096)
    _packed(kwargs, names, layout)
    run_against_reference(spec, kwargs, max_flip_fraction=0)


@pytest.mark.parametrize("tokens", [1, 7, 2048])
def test_rope_inverse(tokens: int) -> None:
    spec = REGISTRY["rotary_embedding"]
    run_against_reference(spec, {**_inputs(spec, tokens, 4096), "inverse": True}, max_flip_fraction=0)


@pytest.mark.parametrize(("group_shape", "tokens", "hidden"), [
    ((1, 128), 7, 4096), ((1, 16), 300, 1024), ((128, 128), 256, 4096), ((-1, 128), 4096, 4096), ((4, 256), 300, 4096)],
    ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["row_major", "column_major"])
def test_static_quant_group_scales(group_shape: tuple[int, int], tokens: int, hidden: int, transposed: bool) -> None:
    from test_compat import _group_scale

    spec = REGISTRY["static_scaled_fp8_quant"]
    kwargs = {**_inputs(spec, tokens, hidden), "group_shape": list(group_shape),
              "scale": _group_scale(group_shape, tokens, hidden, transposed).to(CUDA)}
    run_against_reference(spec, kwargs, max_flip_fraction=0)


@pytest.mark.parametrize("tokens", [1, 7, 4096])
def test_dynamic_per_tensor_quant_with_a_token_shaped_scale(tokens: int) -> None:
    spec = REGISTRY["dynamic_scaled_fp8_quant"]
    kwargs = {**_inputs(spec, tokens, 4096), "scale": poisoned((tokens, 1), torch.float32, CUDA)}
    run_against_reference(spec, kwargs)
    assert tokens == 1 or is_poison(kwargs["scale"][1:])


@pytest.mark.parametrize("tokens", [1, 7, 300])
@pytest.mark.parametrize("spec", [REGISTRY["concat_and_cache_mla"], REGISTRY["concat_and_cache_mla_rope"]],
                         ids=lambda s: s.name)
def test_ds_mla_cache(spec: OpSpec, tokens: int) -> None:
    kwargs = _inputs(spec, tokens, 256)
    blocks = kwargs["kv_cache"].shape[0]
    kwargs.update(kv_cache=poisoned((blocks, 16, 656), torch.uint8, CUDA), kv_cache_dtype="fp8_ds_mla")
    kwargs["slot_mapping"][0] = -1
    for launch in spec.prepare(**clone_kwargs(kwargs)):  # the compiled kernel, not the eager fallback
        assert dispatch.compiled_kernel(spec, launch) is not dispatch._USE_REFERENCE
    run_against_reference(spec, kwargs, max_flip_fraction=0)
    rows, kept = kwargs["kv_cache"].flatten(0, 1), kwargs["slot_mapping"][1:]
    untouched = torch.ones(rows.shape[0], dtype=torch.bool, device=CUDA)
    untouched[kept] = False
    assert is_poison(rows[untouched])


# --- scaled_mm ------------------------------------------------------------------------------------

SCALED_MM_OPS = ("scaled_mm", "scaled_mm_static_fp8_quant", "scaled_mm_per_group_fp8_quant",
                 "scaled_mm_per_token_fp8_quant", "scaled_mm_silu_mul_static_fp8_quant",
                 "scaled_mm_silu_mul_per_group_fp8_quant", "scaled_mm_silu_mul_per_token_fp8_quant")


@pytest.mark.parametrize("op", SCALED_MM_OPS)
@pytest.mark.parametrize("layout", ("tensor_0dim", "token_channel", "block", "bias"))
@pytest.mark.parametrize("m", (1, 7, 300, 4096))
def test_scaled_mm_matches_the_contract(m: int, layout: str, op: str) -> None:
    """Integer-valued fp8 operands (make_inputs): every sum is exact, so the kernel's bytes equal the contract's."""
    spec = REGISTRY[op]
    n, k = 4096 + 128 * 3, 4096  # N (I for gate_up) not a multiple of the larger tiles
    kwargs = spec.make_inputs({"M": m, "N": n, "K": k}, torch.bfloat16, CUDA)
    n_b = kwargs["b"].shape[1]  # 2 I for gate_up
    generator = torch.Generator(device="cpu").manual_seed(m)
    if layout == "tensor_0dim":
        kwargs.update(a_scales=torch.tensor(0.01, device=CUDA), b_scales=torch.tensor(0.002, device=CUDA))
    elif layout == "block":
        kwargs.update(a_scales=(torch.rand(m, k // 128, generator=generator) / 16).to(CUDA),
                      b_scales=(torch.rand(-(-n_b // 128), k // 128, generator=generator) / 256).to(CUDA))
    elif layout == "bias":
        kwargs["bias"] = torch.randn(n_b, generator=generator).to(device=CUDA, dtype=torch.bfloat16)
    _check_scaled_mm(spec, kwargs, layout)


def _check_scaled_mm(spec: OpSpec, kwargs: dict[str, Any], layout: str, flips: float = 1e-4) -> None:
    # block scales make the slices' sums inexact: split-K (two launches) adds them in another order than the
    # contract's sequence, which may move a result across a rounding tie
    launches = spec.prepare(**clone_kwargs(kwargs))
    split = layout == "block" and any(launch.args[-1] == Phase.PARTIAL for launch in launches)
    if split and spec.name == "scaled_mm":
        _check_reordered_sums(spec, kwargs)
    else:
        run_against_reference(spec, kwargs, max_flip_fraction=flips if split else 0)


def _check_reordered_sums(spec: OpSpec, kwargs: dict[str, Any]) -> None:
    """Split K's order of adding the block-scaled slices' sums is not the contract's sequence: where they nearly
    cancel, a bf16 result moves by more than a rounding tie (on an H200, 1 of 448,000 at K = 14336; one tie flip in
    M = 1's 4,480 outputs is already over a 1e-4 budget). So each output must lie within the reordering's error
    bound of the contract's: a bf16 step of the result, plus 2^-23 a slice of the slices' summed magnitudes; and
    nearly all bytes equal."""
    expected = clone_kwargs(kwargs)
    spec.op(**kwargs)
    spec.reference(**expected)
    magnitude = scaled_mm._product(kwargs["a"].float().abs(), kwargs["b"].float().abs(), kwargs["a_scales"],
                                   kwargs["b_scales"])
    out, ref = kwargs["out"].float(), expected["out"].float()
    largest = torch.maximum(out.abs(), ref.abs())
    step = torch.exp2(torch.floor(torch.log2(largest.clamp(min=2.0 ** -126))) - 7)  # bf16's step at the larger
    slices = kwargs["a"].shape[1] // 128
    excess = (out - ref).abs() - (step + slices * 2.0 ** -23 * magnitude)
    assert excess.max() <= 0, f"{spec.name}: an output off by more than reordering explains: {excess.max():g}"
    assert (out != ref).float().mean() < 1e-3, f"{spec.name}: {(out != ref).sum()} of {out.numel()} outputs differ"


@pytest.mark.parametrize("op", ("scaled_mm", "scaled_mm_static_fp8_quant", "scaled_mm_per_group_fp8_quant"))
@pytest.mark.parametrize("layout", ("token_channel", "block"))
@pytest.mark.parametrize("m", (40, 100))
def test_scaled_mm_splits_a_deep_k_up_to_128_rows(m: int, layout: str, op: str) -> None:
    """K = 14336 at 40 and 100 rows (the M = 64 and 128 buckets) splits K in two launches (per group: then
    per_token_group_fp8_quant's launch)."""
    spec = REGISTRY[op]
    kwargs = spec.make_inputs({"M": m, "N": 4096 + 128 * 3, "K": 14336}, torch.bfloat16, CUDA)
    if layout == "block":
        generator = torch.Generator(device="cpu").manual_seed(m)
        kwargs.update(a_scales=(torch.rand(m, 14336 // 128, generator=generator) / 16).to(CUDA),
                      b_scales=(torch.rand(-(-kwargs["b"].shape[1] // 128), 14336 // 128,
                                           generator=generator) / 256).to(CUDA))
    launches = spec.prepare(**clone_kwargs(kwargs))
    assert [launch.args[-1] for launch in own_launches(launches)] == [Phase.PARTIAL, Phase.REDUCE]
    if layout == "block" and "group" in op:
        # a bf16 tie flipped by the slices' order moves its group's amax, so the whole group's fp8 bytes: not
        # bounded by a flip count (on an H200 one of the M = 100 calls failed one)
        return
    # 112 scaled slices (against 32 at K = 4096): 72 of 448,000 bf16 outputs flipped on an H200
    _check_scaled_mm(spec, kwargs, layout, flips=5e-4)


@pytest.mark.parametrize("op", ("scaled_mm", "scaled_mm_silu_mul_static_fp8_quant", "scaled_mm_per_token_fp8_quant"))
def test_scaled_mm_split_k_bytes_repeat_across_calls_and_graph_replays(op: str) -> None:
    """Split-K's scratch sums and the per-token row words are shared by every call and must be written whole (or
    left at zero) for the next: a word not reset or a sum read before it is written shows as bytes that change
    from one call (or CUDA graph replay) to the next."""
    spec = REGISTRY[op]
    kwargs = spec.make_inputs({"M": 16, "N": 4096 + 128 * 3, "K": 4096}, torch.bfloat16, CUDA)
    assert Phase.PARTIAL in [launch.args[-1] for launch in own_launches(spec.prepare(**clone_kwargs(kwargs)))]
    run_against_reference(spec, clone_kwargs(kwargs), max_flip_fraction=0)
    outputs = [name for name in spec.mutated_args if isinstance(kwargs.get(name), torch.Tensor)]
    first = clone_kwargs(kwargs)
    spec.op(**first)
    for _ in range(20):
        again = clone_kwargs(kwargs)
        spec.op(**again)
        assert all(torch.equal(again[n].view(torch.uint8), first[n].view(torch.uint8)) for n in outputs)
    captured = clone_kwargs(kwargs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        spec.op(**captured)
    for _ in range(20):
        for name in outputs:
            captured[name].view(torch.uint8).fill_(0x7F)
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(captured[n].view(torch.uint8), first[n].view(torch.uint8)) for n in outputs)


@pytest.mark.parametrize("m", (1, 7, 300))
@pytest.mark.parametrize("op", ("scaled_mm_per_token_fp8_quant", "scaled_mm_silu_mul_per_token_fp8_quant"))
def test_scaled_mm_per_token_scale_ub_and_zero_rows(op: str, m: int) -> None:
    """A scale_ub below most rows' amax (their values saturate), and a zero row (the 1 / 512 floor)."""
    spec = REGISTRY[op]
    kwargs = spec.make_inputs({"M": m, "N": 4096 + 128 * 3, "K": 4096}, torch.bfloat16, CUDA)
    kwargs["a"][m // 2] = 0
    reference = clone_kwargs(kwargs)
    spec.reference(**reference)
    kwargs["scale_ub"] = reference["scales"].median().reshape(1)
    run_against_reference(spec, kwargs, max_flip_fraction=0)


@pytest.mark.parametrize("m", (1, 7, 300, 4096))
@pytest.mark.parametrize("op", ("scaled_mm_per_token_fp8_quant", "scaled_mm_silu_mul_per_token_fp8_quant"))
def test_scaled_mm_per_token_row_words_are_zero_after_each_call(op: str, m: int) -> None:
    """The row amaxes are atomic maxima into shared words that the quantize launch zeroes again: each call's
    amaxes smaller than the last's, a word left over would set the scale."""
    spec = REGISTRY[op]
    kwargs = spec.make_inputs({"M": m, "N": 4096 + 128 * 3, "K": 4096}, torch.bfloat16, CUDA)
    for _ in range(3):
        kwargs["a_scales"] = kwargs["a_scales"] / 16
        kwargs["out"] = poisoned(tuple(kwargs["out"].shape), kwargs["out"].dtype, CUDA)
        run_against_reference(spec, kwargs, max_flip_fraction=0)
        words = spec.prepare(**clone_kwargs(kwargs))[-1].args[8]
        assert not words._base.any()


@pytest.mark.parametrize("scale_layout", ("row_major", "transposed", "tma_aligned"))
@pytest.mark.parametrize("ue8m0", (False, True))
@pytest.mark.parametrize("m", (1, 300))
@pytest.mark.parametrize("op", ("scaled_mm_per_group_fp8_quant", "scaled_mm_silu_mul_per_group_fp8_quant"))
def test_scaled_mm_group_scale_layouts(op: str, m: int, ue8m0: bool, scale_layout: str) -> None:
    spec = REGISTRY[op]
    n, groups = 4096, 32
    kwargs = spec.make_inputs({"M": m, "N": n, "K": 4096}, torch.bfloat16, CUDA)
    if scale_layout == "row_major":
        base = scale = poisoned((m, groups), torch.float32, CUDA)
    else:
        base = poisoned((groups, round_up(m, 4) if scale_layout == "tma_aligned" else m), torch.float32, CUDA)
        scale = base[:, :m].t()
    kwargs.update(scales=scale, is_scale_transposed=scale_layout != "row_major", scale_ue8m0=ue8m0)
    run_against_reference(spec, kwargs, max_flip_fraction=0)
    if scale_layout == "tma_aligned":
        assert is_poison(base[:, m:]), "the TMA padding columns of the scale buffer were written"
