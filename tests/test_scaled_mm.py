"""scaled_mm and scaled_mm_static_fp8_quant: the Helion kernel (interpret mode) against the contract, every scale
layout, bad arguments, and code generation for every variant the checks accept."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from helion_fusions.ops import scaled_mm
from helion_fusions.runtime import dispatch
from helion_fusions.tools.testing import clone_kwargs, code_generator, compare_outputs, outputs_ok, poisoned

FP8 = torch.float8_e4m3fn
SCALED_MM, STATIC = scaled_mm.SCALED_MM, scaled_mm.SCALED_MM_STATIC_FP8_QUANT
LAYOUTS = ("tensor", "tensor_0dim", "token", "channel", "token_channel", "token_1d", "block")


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


def _inputs(m: int, n: int, k: int, layout: str, bias: bool = False, static: bool = False) -> dict[str, Any]:
    """Integer-valued fp8 operands: every partial sum is exact in fp32, so any accumulation order gives the
    contract's bytes (real-valued operands may differ by accumulation order: counted on the GPU)."""
    generator = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    a_scales, b_scales = _scales(layout, m, n, k, generator)
    kwargs = {
        "out": poisoned((m, n), FP8 if static else torch.bfloat16, "cpu"),
        "a": torch.randint(-8, 9, (m, k), generator=generator).float().to(FP8),
        "b": torch.randint(-8, 9, (n, k), generator=generator).float().to(FP8).t(),
        "a_scales": a_scales, "b_scales": b_scales,
        "bias": torch.randn(n, generator=generator).to(torch.bfloat16) if bias else None,
    }
    if static:
        kwargs["scale"] = torch.tensor(0.5)
    return kwargs


def _check(spec, kwargs: dict[str, Any]) -> None:
    expected, actual = clone_kwargs(kwargs), clone_kwargs(kwargs)
    spec.reference(**expected)
    with dispatch.interpreting():
        spec.op(**actual)
    results = compare_outputs(["out"], actual, expected)
    assert outputs_ok(results, max_flip_fraction=0), results


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
    kwargs = {**_inputs(7, 48, 96, "token_channel", static=spec is STATIC), **overrides}
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
@pytest.mark.parametrize("static", (False, True))
@pytest.mark.parametrize("m", (1, 7, 64))
def test_every_variant_generates_code_under_its_configs(layout: str, static: bool, m: int) -> None:
    """What only the compiler sees: each variant the checks accept, with the default, seed and a sample of the
    searched configs (TMA and persistent ones among them)."""
    spec = STATIC if static else SCALED_MM
    kwargs = _inputs(m, 256, 384, layout, bias=True, static=static)
    (launch,) = spec.prepare(**kwargs)
    bound = code_generator(launch.kernel).bind(launch.args)
    shape = {"M": m, "N": 4096, "K": 4096}
    searched = spec.search_configs(shape)
    for config in [spec.default_config(shape), *spec.seed_configs(shape), *searched[:3], *searched[-3:]]:
        assert "tl.dot" in bound.to_triton_code(config)


def test_static_output_saturates_at_the_fp8_max() -> None:
    kwargs = {**_inputs(7, 48, 96, "token_channel", static=True), "scale": torch.tensor(1e-6)}
    _check(STATIC, kwargs)
    STATIC.op(**kwargs)
    magnitudes = kwargs["out"].float().abs()
    assert float(magnitudes.max()) == 448.0 and float((magnitudes == 448.0).float().mean()) > 0.9
