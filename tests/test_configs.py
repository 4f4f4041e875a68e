"""Shipped configs: each still generates Triton code for the current kernel source (on CPU), and every
tuned device gets a fresh config, its own or, while its own awaits `make autotune --revalidate` on that
GPU, a same-family device's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import helion
import pytest
import torch
from conftest import REPO_ROOT, problem_shape, spec_params

from helion_fusions.ops import all_reduce
from helion_fusions.runtime import config_store, dispatch
from helion_fusions.runtime.device import DeviceIdentity
from helion_fusions.runtime.registry import REGISTRY, OpSpec, shapes
from helion_fusions.tools.testing import binding_shape, bound_launches, code_generator, triton_code

CONFIG_ROOT = REPO_ROOT / "configs"
TUNED_DEVICES = ("nvidia_h200",)
# the fused all_reduce ops' configs are checked in test_all_reduce_codegen.py
SHIPPED = sorted(p for p in CONFIG_ROOT.glob("*/*.json") if p.stem not in all_reduce.TUNED)
NO_CONFIGS = pytest.mark.skip(reason=f"no config files under {CONFIG_ROOT} yet")
# Ops that no device has been tuned for yet (configs only ever come from `make autotune` on a GPU): they run the
# architecture default config everywhere. Tuning one on any device removes it from this list.
UNTUNED_OPS: frozenset[str] = frozenset()
TUNED_OPS = [name for name in REGISTRY if name not in UNTUNED_OPS]


def _file_params() -> list[Any]:
    if not SHIPPED:
        return [pytest.param(None, marks=NO_CONFIGS, id="none")]
    return [pytest.param(path, id=f"{path.parent.name}/{path.stem}") for path in SHIPPED]


def _entry_params() -> list[Any]:
    params = []
    for path in SHIPPED:
        try:
            entries = json.loads(path.read_text())["entries"]
        except (ValueError, KeyError, TypeError):
            entries = []  # the load test reports the file
        params += [pytest.param(path, index, id=f"{path.parent.name}/{path.stem}[{index}]")
                   for index in range(len(entries))]
    return params or [pytest.param(None, 0, marks=NO_CONFIGS, id="none")]


def _assert_generates_code(op: str, shape: dict[str, int], dtype: torch.dtype, config: helion.Config,
                           front_end: bool = True) -> None:
    """Code for ``config``, and with ``front_end`` Triton's front end run on it (testing.triton_code)."""
    for bound, args in bound_launches(op, binding_shape(op, shape), dtype):
        code = triton_code(bound, args, config) if front_end else bound.to_triton_code(config)
        assert isinstance(code, str) and code.strip(), f"{op}: no code for {dict(config)}"


def _op_of(path: Path) -> OpSpec:
    assert path.stem in REGISTRY, f"{path}: no registered op {path.stem!r}"
    return REGISTRY[path.stem]


@pytest.mark.parametrize("path", _file_params())
def test_config_file_loads_and_a_fresh_config_serves_its_device(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _op_of(path)
    loaded = config_store.load(path, spec.name, spec.dim_names, None, spec.config_problem)  # any kernel source
    assert loaded.device == path.parent.name
    assert loaded.family, f"{path}: no architecture family"
    dtypes = {e.dtype for e in loaded.entries}
    assert all(isinstance(getattr(torch, d, None), torch.dtype) for d in dtypes), f"{path}: unknown dtypes {dtypes}"
    marked = [e.shape for e in loaded.entries if e.stale]
    assert not marked, (f"{path}: {len(marked)} entries marked stale by make restamp ({marked[:3]}): run "
                        f"`make autotune ARGS=\"--revalidate --ops {spec.name}\"` on a {loaded.device} GPU")
    if loaded.kernel_hash == dispatch.spec_hash(spec):
        return
    # stale (the kernel changed after it was tuned): the dispatcher must fall back to a fresh file of the
    # same family, never to the architecture default
    identity = DeviceIdentity(loaded.device, loaded.family, torch.float8_e4m3fn)
    monkeypatch.setattr(dispatch, "_warned", set())
    with pytest.warns(UserWarning, match="stale"):
        used = dispatch.resolve_config_file(spec, identity)
    assert used is not None and used.device != loaded.device, (
        f"{path} is stale and no fresh {loaded.family} config replaces it; run `make autotune --revalidate` "
        f"on a {loaded.device} GPU")


@pytest.mark.parametrize(("path", "index"), _entry_params())
def test_config_entry_generates_code(path: Path, index: int) -> None:
    spec = _op_of(path)
    entry = config_store.load(path, spec.name, spec.dim_names, None).entries[index]  # stale files too: they ship
    _assert_generates_code(spec.name, entry.shape, getattr(torch, entry.dtype), helion.Config(**entry.config))


@pytest.mark.parametrize("spec", spec_params())
def test_default_seed_and_search_configs_generate_code(spec: OpSpec) -> None:
    model = {d.name: [d.grid[0]] for d in spec.problem if not d.bucketed}  # the first model dims of the grid
    configs: dict[tuple[Any, ...], tuple[dict[str, int], helion.Config, bool]] = {}
    for shape in shapes(spec.problem, model):
        searched = spec.search_configs(shape)
        # Triton's front end for the default, the seeds and a sample of the search (all of it would take minutes)
        checked = [spec.default_config(shape), *spec.seed_configs(shape), *searched[:2], *searched[-2:]]
        for config, front_end in [*((c, True) for c in checked), *((c, False) for c in searched)]:
            configs.setdefault((binding_shape(spec.name, shape), json.dumps(dict(config), sort_keys=True)),
                               (shape, config, front_end))
    for shape, config, front_end in configs.values():
        _assert_generates_code(spec.name, shape, torch.bfloat16, config, front_end)


def test_untuned_ops_are_exactly_those_without_configs() -> None:
    """An op without a config file on any device must be declared untuned, and a declared one must have none."""
    unknown = sorted(UNTUNED_OPS - set(REGISTRY))
    assert not unknown, f"UNTUNED_OPS names unregistered ops: {unknown}"
    tuned_somewhere = {path.stem for path in SHIPPED}
    undeclared = sorted(name for name in REGISTRY if name not in tuned_somewhere and name not in UNTUNED_OPS)
    assert not undeclared, f"no config file on any device, and not in UNTUNED_OPS: {undeclared}"
    now_tuned = sorted(UNTUNED_OPS & tuned_somewhere)
    assert not now_tuned, f"configs ship for these, so remove them from UNTUNED_OPS: {now_tuned}"


def test_every_op_has_configs_for_every_tuned_device() -> None:
    missing = [f"{device}/{op}.json" for device in TUNED_DEVICES for op in TUNED_OPS
               if not (CONFIG_ROOT / device / f"{op}.json").is_file()]
    assert not missing, f"{len(missing)} config files missing under {CONFIG_ROOT}: {missing}"


def test_an_h100_runs_the_h200_configs_with_one_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """No H100 configs ship: an H100 takes its architecture family's (nvidia_sm90) configs, the H200's, and an
    untuned op the architecture default, each with one warning."""
    h100 = DeviceIdentity("nvidia_h100", "nvidia_sm90", torch.float8_e4m3fn)
    monkeypatch.delenv(config_store.CONFIG_DIR_ENV, raising=False)
    dispatch.reset()
    try:
        for spec in REGISTRY.values():
            with pytest.warns(UserWarning) as caught:
                used = dispatch.resolve_config_file(spec, h100)
            assert len(caught) == 1 and "nvidia_h100" in str(caught[0].message), spec.name
            if spec.name in UNTUNED_OPS:
                assert used is None and "architecture default" in str(caught[0].message), spec.name
                continue
            assert used is not None and used.device == "nvidia_h200", spec.name
            assert "same family (nvidia_sm90) device nvidia_h200" in str(caught[0].message)
    finally:
        dispatch.reset()


def test_the_config_hash_covers_what_the_kernel_inlines() -> None:
    """Helpers the kernels call (their own module's and the quant epilogues) are part of the hash's input."""
    sources = {spec.kernel.fn.__name__: "\n".join(config_store.kernel_sources(spec.kernel.fn))
               for spec in REGISTRY.values()}
    for kernel, helpers in {"rms_norm_kernel": ["def store_quantized", "def load_scale_in", "def div_rn",
                                                "def e2m1_codes", "class Quant"],
                            "silu_mul_kernel": ["def silu", "def store_quantized", "E2M1_MAX = 6.0"],
                            "rope_kernel": ["def rotate", "def cache_store", "def sum_of_squares", "def mul_rn",
                                            "def fp8_quantize_static"]}.items():
        missing = [h for h in helpers if h not in sources[kernel]]
        assert not missing, f"{kernel}: the hash misses {missing}"
    assert "def rms_norm_reference" not in sources["rms_norm_kernel"]  # host code is not compiled into it


def _zero_dim_scales(spec: OpSpec, kwargs: dict[str, Any]) -> list[str]:
    """Make every one-element fp32 input of the call 0-dim, as engines keep static scales; returns their names."""
    names = [name for name, value in kwargs.items()
             if isinstance(value, torch.Tensor) and value.dtype == torch.float32 and value.numel() == 1
             and value.dim() >= 1 and name not in spec.mutated_args]
    for name in names:
        kwargs[name] = kwargs[name].reshape(())
    return names


@pytest.mark.parametrize("spec", spec_params())
def test_zero_dim_scales_generate_code(spec: OpSpec) -> None:
    """A 0-dim scale passes the checks, so the compiled kernel must take it too (interpret mode alone would not
    see a tracing failure)."""
    kwargs = spec.make_inputs(problem_shape(spec, 7, 256 if spec.family not in ("rope", "kv_cache") else 4096),
                              torch.bfloat16, torch.device("cpu"))
    if not _zero_dim_scales(spec, kwargs):
        pytest.skip("no one-element scale among its inputs")
    shape = {d.name: (7 if d.bucketed else d.grid[0]) for d in spec.problem}
    for launch in spec.prepare(**kwargs):
        config = launch.tuned_as.default_config(launch.problem) if launch.tuned_as else spec.default_config(shape)
        code = triton_code(code_generator(launch.kernel).bind(launch.args), launch.args, config)
        assert code.strip()
