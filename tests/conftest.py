"""Shared fixtures and helpers for the helion_fusions tests."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch

import helion_fusions
from helion_fusions.runtime import dispatch
from helion_fusions import quant
from helion_fusions.runtime.registry import REGISTRY, OpSpec
from helion_fusions.tools.testing import clone_kwargs, compare_outputs, outputs_ok, poisoned

REPO_ROOT = Path(__file__).resolve().parents[1]
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)
POISON_BYTE = 0x7F


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def seeded() -> None:
    """Every test draws the same random data whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU calls run the Helion kernel itself (eagerly, Helion's reference mode) instead of the op's reference."""
    monkeypatch.setenv("HELION_INTERPRET", "1")


@pytest.fixture
def reference_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU calls run the op's eager reference, as they do outside the tests."""
    monkeypatch.delenv("HELION_INTERPRET", raising=False)


@pytest.fixture
def batch_invariant() -> Iterable[None]:
    previous = dispatch.batch_invariant()
    helion_fusions.set_batch_invariant(True)
    yield
    helion_fusions.set_batch_invariant(previous)


def _clear_config_caches() -> None:
    dispatch.reset()


@pytest.fixture
def config_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterable[Path]:
    """An empty config root in place of the shipped configs, with the dispatcher's caches cleared around the test."""
    root = tmp_path / "configs"
    root.mkdir()
    monkeypatch.setenv("HELION_FUSIONS_CONFIG_DIR", str(root))
    _clear_config_caches()
    yield root
    _clear_config_caches()


@pytest.fixture
def fp8_allclose_shim(monkeypatch: pytest.MonkeyPatch) -> None:
    """opcheck's schema check compares tensors with torch.allclose, which has no CPU kernel for fp8.

    Compare fp8 tensors bit for bit instead (stricter than allclose), so the check still runs on them.
    """
    allclose = torch.allclose

    def fp8_aware_allclose(a: torch.Tensor, b: torch.Tensor, *args: Any, **kwargs: Any) -> bool:
        if a.dtype in FP8_DTYPES:
            return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        return allclose(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "allclose", fp8_aware_allclose)


# --- helpers -----------------------------------------------------------------------------------

def spec_params(names: Iterable[str] | None = None) -> list[Any]:
    """pytest params over registered ops, with the op name as the id."""
    chosen = REGISTRY if names is None else names
    return [pytest.param(REGISTRY[name], id=name) for name in chosen]


SMALL_DIMS = {"K": 128}  # a GEMM's depth in the generic tests' small shapes


def problem_shape(spec: OpSpec, tokens: int, hidden: int) -> dict[str, int]:
    """A shape of the op's problem key for the generic tests: the token dim (a GEMM's M) takes ``tokens``, the
    model dims ``hidden`` (H, a GEMM's N), but for those in ``SMALL_DIMS``."""
    return {d.name: tokens if d.bucketed else SMALL_DIMS.get(d.name, hidden) for d in spec.problem}


@functools.cache
def _sample_inputs(spec: OpSpec) -> dict[str, Any]:
    return spec.make_inputs(problem_shape(spec, 1, 256), torch.bfloat16, torch.device("cpu"))


_ROLES = {
    "result": ("result", "out", "output", "output_q"),
    "scale": ("scale", "scales", "output_s"),
    "block_scale": ("result_scale", "result_block_scale", "output_scale"),
    "global_scale": ("global_scale", "input_global_scale", "input_scale"),
}


def arg(spec: OpSpec, role: str) -> str | None:
    """The op's name for an argument role ("result", "scale", "block_scale", "global_scale"), as its schema spells it."""
    return next((name for name in _ROLES[role] if name in spec.arg_names), None)


def is_fp8_op(spec: OpSpec) -> bool:
    """The op writes an fp8 result."""
    result = _sample_inputs(spec).get(arg(spec, "result") or "")
    return result is not None and result.dtype in FP8_DTYPES


def is_nvfp4_op(spec: OpSpec) -> bool:
    return arg(spec, "block_scale") is not None


def written(spec: OpSpec, kwargs: dict[str, Any]) -> list[str]:
    """The op's mutated arguments that this call passes a tensor for."""
    return [name for name in spec.mutated_args if isinstance(kwargs.get(name), torch.Tensor)]


def assert_outputs_match(
    spec: OpSpec, actual: dict[str, Any], expected: dict[str, Any], max_flip_fraction: float = 1e-4
) -> None:
    """Every mutated output equal bit for bit, up to the contract's bounded rounding-tie flips."""
    names = written(spec, actual)
    assert names, f"{spec.name}: the call mutates nothing"
    results = compare_outputs(names, actual, expected)
    if not outputs_ok(results, max_flip_fraction):
        detail = "; ".join(f"{name}: {result}" for name, result in results.items())
        raise AssertionError(f"{spec.name}: {detail} (allowed: {max_flip_fraction:g} of the largest output's elements)")


def run_against_reference(spec: OpSpec, kwargs: dict[str, Any], max_flip_fraction: float = 1e-4) -> dict[str, Any]:
    """Call the op on ``kwargs`` and the reference on a copy; returns the reference's copy."""
    expected = clone_kwargs(kwargs)
    spec.op(**kwargs)  # first, so its argument checks run before the reference sees the arguments
    spec.reference(**expected)
    assert_outputs_match(spec, kwargs, expected, max_flip_fraction)
    return expected


def with_fp8_result(spec: OpSpec, kwargs: dict[str, Any], dtype: torch.dtype) -> dict[str, Any]:
    """Swap the fp8 result buffer for a poisoned one of the other fp8 flavour (and its fp8_max, where passed)."""
    name = arg(spec, "result")
    result = kwargs[name]
    kwargs[name] = poisoned(tuple(result.shape), dtype, result.device)
    if "fp8_max" in kwargs:
        kwargs.update(fp8_max=quant.fp8_max_for(dtype), fp8_min=-quant.fp8_max_for(dtype))
    return kwargs


def widen(tensor: torch.Tensor, extra: int, output: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``tensor``'s values in the leading columns of a wider CPU buffer (poisoned for an output); returns (view,
    buffer)."""
    rows, cols = tensor.shape
    if output:
        base = poisoned((rows, cols + extra), tensor.dtype, "cpu")
    else:
        base = torch.randn(rows, cols + extra).to(tensor.dtype)
    base[:, :cols] = tensor
    return base[:, :cols], base


def is_poison(tensor: torch.Tensor) -> bool:
    return bool((tensor.contiguous().view(torch.uint8) == POISON_BYTE).all())


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple
