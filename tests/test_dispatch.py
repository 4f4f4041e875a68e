"""The dispatcher: token buckets, device names, the config store, the fallback chain, threads, batch invariance."""

from __future__ import annotations

import dataclasses

import json
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import (arg, assert_outputs_match, clone_kwargs, is_nvfp4_op, problem_shape, run_against_reference,
                      spec_params)

import helion_fusions
from helion_fusions.runtime import config_store, dispatch
from helion_fusions.runtime.config_store import ConfigError, Entry
from helion_fusions.runtime.device import DeviceIdentity, canonical_device_name
from helion_fusions.runtime.registry import REGISTRY, KernelLaunch, OpSpec
from helion_fusions.tools.testing import poisoned

SPEC = REGISTRY["rms_norm_static_fp8_quant"]
LAST_T = next(d for d in SPEC.problem if d.bucketed).grid[-1]  # the token grid's end
H100 = DeviceIdentity("nvidia_h100", "nvidia_sm90", torch.float8_e4m3fn)
CONFIG = {"block_sizes": [1], "num_warps": 4, "reduction_loops": [None]}


# --- token buckets and device names -----------------------------------------------------------------

@pytest.mark.parametrize(("tokens", "bucket"), [
    (0, 1), (1, 1), (2, 16), (16, 16), (17, 128), (128, 128), (129, 1024), (1024, 1024), (1025, 4096),
    (4096, 4096), (4097, 16384), (16384, 16384), (16385, 16385), (10**6, 16385),
])
def test_token_bucket(tokens: int, bucket: int) -> None:
    assert dispatch.token_bucket(tokens) == bucket


@pytest.mark.parametrize(("raw", "vendor", "name"), [
    ("NVIDIA H100 80GB HBM3", "nvidia", "nvidia_h100"),
    ("NVIDIA H100 PCIe", "nvidia", "nvidia_h100"),
    ("NVIDIA H200", "nvidia", "nvidia_h200"),
    ("NVIDIA B200", "nvidia", "nvidia_b200"),
    ("NVIDIA A100-SXM4-80GB", "nvidia", "nvidia_a100"),
    ("NVIDIA GH200 480GB", "nvidia", "nvidia_gh200"),
    ("AMD Instinct MI300X", "amd", "amd_mi300x"),
])
def test_canonical_device_name(raw: str, vendor: str, name: str) -> None:
    assert canonical_device_name(raw, vendor) == name


def test_unknown_device_name_is_stable() -> None:
    raw = "NVIDIA RTX 6000 Ada Generation"
    name = canonical_device_name(raw, "nvidia")
    assert name.startswith("nvidia_")
    assert name == canonical_device_name(raw, "nvidia")
    assert name.replace("_", "").isalnum() and name == name.lower()


# --- config files ---------------------------------------------------------------------------------

def _entry(dtype: str = "bfloat16", hidden: int = 4096, tokens: int = 16, num_warps: int = 4) -> Entry:
    return Entry(dtype=dtype, shape={"T": tokens, "H": hidden}, config={**CONFIG, "num_warps": num_warps},
                 time_us=2.0)


def _save(path: Path, entries: list[Entry] | None = None, op: str = SPEC.name, device: str = "nvidia_h100",
          family: str = "nvidia_sm90", hash_: str | None = None) -> Path:
    config_store.save(path, op, device, family, dispatch.spec_hash(SPEC) if hash_ is None else hash_,
                      SPEC.dim_names, entries or [_entry()])
    return path


def _load(path: Path) -> config_store.ConfigFile:
    return config_store.load(path, SPEC.name, SPEC.dim_names, dispatch.spec_hash(SPEC))


def test_save_then_load(tmp_path: Path) -> None:
    entries = [_entry(tokens=1), _entry(tokens=16, num_warps=8), _entry("float16", 2048, 4096)]
    path = _save(tmp_path / "nvidia_h100" / f"{SPEC.name}.json", entries)
    loaded = _load(path)
    assert (loaded.op, loaded.device, loaded.family, loaded.path) == (SPEC.name, "nvidia_h100", "nvidia_sm90", path)
    assert sorted(loaded.entries, key=repr) == sorted(entries, key=repr)
    assert set(loaded.versions) == {"helion", "triton", "torch"}
    raw = json.loads(path.read_text())
    assert raw["schema_version"] == config_store.SCHEMA_VERSION
    assert raw["kernel_hash"] == dispatch.spec_hash(SPEC)


def _picker(tmp_path: Path, entries: list[Entry]) -> Callable[..., Entry]:
    loaded = _load(_save(tmp_path / "x" / f"{SPEC.name}.json", entries))

    def pick(dtype: torch.dtype = torch.bfloat16, hidden: int = 4096, tokens: int = 1, invariant: bool = False):
        return loaded.pick(dtype, {"T": tokens, "H": hidden}, SPEC.problem, invariant)

    return pick


def test_pick_by_dtype(tmp_path: Path) -> None:
    pick = _picker(tmp_path, [_entry("bfloat16", num_warps=4), _entry("float16", num_warps=8)])
    assert pick(torch.bfloat16).config["num_warps"] == 4
    assert pick(torch.float16).config["num_warps"] == 8
    # A dtype nobody tuned still gets a config (from the tuned ones) rather than failing.
    assert pick(torch.float32).config["num_warps"] in (4, 8)


def test_pick_nearest_hidden(tmp_path: Path) -> None:
    pick = _picker(tmp_path, [_entry(hidden=h, num_warps=w) for h, w in ((2048, 1), (4096, 2), (8192, 4))])
    assert [pick(hidden=h).shape["H"] for h in (17, 2048, 3000, 4096, 5000, 6000, 8192, 65536)] == [
        2048, 2048, 4096, 4096, 4096, 8192, 8192, 8192]


def test_an_entry_of_the_nearest_width_that_does_not_suit_the_calls_takes_the_default(tmp_path, monkeypatch) -> None:
    """H = 8192's 4 rows by 16 warps hold 64 row elements a thread; at H = 14336 they would hold 128 (spilled):
    that call takes the architecture default, with one warning naming the entry and the limit."""
    wide = Entry(dtype="bfloat16", shape={"T": 16384, "H": 8192}, config={"block_sizes": [4], "num_warps": 16},
                 time_us=100.0)
    loaded = _load(_save(tmp_path / "x" / f"{SPEC.name}.json", [wide]))
    monkeypatch.setattr(dispatch, "_config_files", lambda spec, index: loaded)
    monkeypatch.setattr(dispatch, "_warned", set())
    config, source = dispatch.tuned_config(SPEC, {"T": 16384, "H": 8192}, torch.bfloat16, 0, False)
    assert dict(config) == wide.config and str(loaded.path) in source
    with pytest.warns(UserWarning, match=r"T=16384,H=8192 .* does not suit H=14336 .*128 row elements a thread"):
        config, source = dispatch.tuned_config(SPEC, {"T": 16384, "H": 14336}, torch.bfloat16, 0, False)
    assert dict(config) == dict(SPEC.default_config({"T": 16384, "H": 14336})) and source == "the architecture default"
    assert dict(config) == {"block_sizes": [1], "num_warps": 8}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per width
        dispatch.tuned_config(SPEC, {"T": 4096, "H": 14336}, torch.bfloat16, 0, False)


def test_pick_token_bucket(tmp_path: Path) -> None:
    pick = _picker(tmp_path, [_entry(tokens=t, num_warps=w) for t, w in ((1, 1), (16, 2), (128, 4), (LAST_T, 8))])
    assert [pick(tokens=t).shape["T"] for t in (1, 2, 16, 17, 128, 129, LAST_T, 10**6)] == [
        1, 16, 16, 128, 128, LAST_T, LAST_T, LAST_T]


def test_pick_past_a_partly_tuned_range_takes_the_default(tmp_path: Path) -> None:
    """Tuned only for small token counts: a larger count gets the default config (None), not the small tile."""
    pick = _picker(tmp_path, [_entry(tokens=t) for t in (1, 16)])
    assert [getattr(pick(tokens=t), "shape", {}).get("T") for t in (1, 16, 17, 4096)] == [1, 16, None, None]


def test_pick_batch_invariant_uses_the_largest_bucket(tmp_path: Path) -> None:
    pick = _picker(tmp_path, [_entry(tokens=t) for t in (1, 16, 128, 4096)])
    assert {pick(tokens=t, invariant=True).shape["T"] for t in (1, 7, 300, 4096, 10**5)} == {4096}


# --- config errors --------------------------------------------------------------------------------

def _corrupt(tmp_path: Path, edit: Callable[[dict], Any]) -> Path:
    path = _save(tmp_path / "nvidia_h100" / f"{SPEC.name}.json",
                 [_entry(tokens=1), _entry(tokens=16), _entry(tokens=128)])
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))
    return path


def _assert_config_error(path: Path, *fragments: str, expected_hash: str | None = None) -> None:
    with pytest.raises(ConfigError) as caught:
        config_store.load(path, SPEC.name, SPEC.dim_names,
                          dispatch.spec_hash(SPEC) if expected_hash is None else expected_hash)
    message = str(caught.value)
    for fragment in (str(path), *fragments):
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_missing_file(tmp_path: Path) -> None:
    _assert_config_error(tmp_path / "nvidia_h100" / "nope.json", "no such config file")


def test_corrupt_json(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"schema_version": 2, "op": ')
    _assert_config_error(path, "JSON")


def test_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[]")
    _assert_config_error(path, "top level")


def test_stale_kernel_hash(tmp_path: Path) -> None:
    path = _save(tmp_path / "nvidia_h100" / f"{SPEC.name}.json", hash_="0123456789abcdef")
    _assert_config_error(path, "kernel_hash", "stale", "0123456789abcdef", dispatch.spec_hash(SPEC))


def _set(key: str, value: Any) -> Callable[[dict], None]:
    return lambda raw: raw.__setitem__(key, value)


def _set_entry(index: int, key: str, value: Any) -> Callable[[dict], None]:
    return lambda raw: raw["entries"][index].__setitem__(key, value)


def _drop_entry_key(index: int, key: str) -> Callable[[dict], None]:
    return lambda raw: raw["entries"][index].pop(key)


@pytest.mark.parametrize(("edit", "fragments"), [
    pytest.param(_set("schema_version", 3), ["schema_version"], id="schema_version"),
    pytest.param(_set("dims", ["T", "N"]), ["dims", "['T', 'N']"], id="other_problem_key"),
    pytest.param(_set("op", "rms_norm"), ["op", "'rms_norm'"], id="wrong_op"),
    pytest.param(lambda raw: raw.pop("family"), ["top level", "family"], id="missing_top_level_key"),
    pytest.param(_set("entries", []), ["entries"], id="no_entries"),
    pytest.param(_drop_entry_key(0, "config"), ["entries[0]"], id="entry_missing_config"),
    pytest.param(_drop_entry_key(2, "shape"), ["entries[2]"], id="entry_missing_shape"),
    pytest.param(_set_entry(1, "shape", {"T": 16, "H": 0}), ["entries[1]", "positive ints"], id="entry_hidden_zero"),
    pytest.param(_set_entry(1, "shape", {"T": "16", "H": 4096}), ["entries[1]", "positive ints"],
                 id="entry_tokens_not_int"),
    pytest.param(_set_entry(1, "shape", {"T": 16}), ["entries[1]", "['T', 'H']"], id="entry_missing_dim"),
    pytest.param(_set_entry(0, "config", [1, 2]), ["entries[0]", "config"], id="entry_config_not_object"),
    pytest.param(_set_entry(0, "time_us", "fast"), ["entries[0]", "time_us"], id="entry_time_not_a_number"),
    pytest.param(_set_entry(1, "config", {**CONFIG, "num_wraps": 4}), ["entries[1]", "num_wraps"],
                 id="entry_unknown_helion_config_key"),
])
def test_bad_file(tmp_path: Path, edit: Callable[[dict], Any], fragments: list[str]) -> None:
    _assert_config_error(_corrupt(tmp_path, edit), *fragments)


# --- fallback chain -------------------------------------------------------------------------------

def _resolve(device: DeviceIdentity = H100) -> tuple[config_store.ConfigFile | None, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resolved = dispatch.resolve_config_file(SPEC, device)
    return resolved, [str(w.message) for w in caught]


def _device_file(root: Path, device: str) -> Path:
    return root / device / f"{SPEC.name}.json"


def test_exact_device_file_is_used_silently(config_dir: Path) -> None:
    _save(_device_file(config_dir, "nvidia_h100"))
    _save(_device_file(config_dir, "nvidia_h200"), device="nvidia_h200")
    resolved, messages = _resolve()
    assert resolved is not None and resolved.device == "nvidia_h100"
    assert resolved.path == _device_file(config_dir, "nvidia_h100")
    assert messages == []


def test_same_family_device_with_a_warning(config_dir: Path) -> None:
    other = _save(_device_file(config_dir, "nvidia_h200"), device="nvidia_h200")
    resolved, messages = _resolve()
    assert resolved is not None and resolved.path == other
    assert len(messages) == 1
    assert "nvidia_h200" in messages[0] and str(other) in messages[0] and "nvidia_h100" in messages[0]


def test_corrupt_exact_file_falls_back_to_the_family_and_names_it(config_dir: Path) -> None:
    broken = _device_file(config_dir, "nvidia_h100")
    broken.parent.mkdir()
    broken.write_text("{ not json")
    other = _save(_device_file(config_dir, "nvidia_h200"), device="nvidia_h200")
    resolved, messages = _resolve()
    assert resolved is not None and resolved.path == other
    assert len(messages) == 1 and str(broken) in messages[0] and str(other) in messages[0]


def test_stale_exact_file_falls_back_to_the_family(config_dir: Path) -> None:
    stale = _save(_device_file(config_dir, "nvidia_h100"), hash_="0" * 16)
    other = _save(_device_file(config_dir, "nvidia_h200"), device="nvidia_h200")
    resolved, messages = _resolve()
    assert resolved is not None and resolved.path == other
    assert len(messages) == 1 and str(stale) in messages[0] and "stale" in messages[0]


def test_nothing_usable_means_the_architecture_default(config_dir: Path) -> None:
    resolved, messages = _resolve()
    assert resolved is None
    assert len(messages) == 1 and "architecture default" in messages[0] and "nvidia_h100" in messages[0]


def test_other_families_are_ignored(config_dir: Path) -> None:
    _save(_device_file(config_dir, "nvidia_b200"), device="nvidia_b200", family="nvidia_sm100")
    _save(_device_file(config_dir, "amd_mi300x"), device="amd_mi300x", family="amd_gfx942")
    resolved, messages = _resolve()
    assert resolved is None
    assert len(messages) == 1 and "architecture default" in messages[0]


def test_other_ops_files_are_ignored(config_dir: Path) -> None:
    config_store.save(config_dir / "nvidia_h100" / "rms_norm.json", "rms_norm", "nvidia_h100", "nvidia_sm90",
                      dispatch.spec_hash(REGISTRY["rms_norm"]), SPEC.dim_names, [_entry()])
    resolved, _ = _resolve()
    assert resolved is None


def test_fallback_warns_once(config_dir: Path) -> None:
    _, first = _resolve()
    _, second = _resolve()
    assert len(first) == 1 and second == []


def test_choose_config_follows_the_chain(config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "device_identity", lambda index=0: H100)
    (launch,) = SPEC.prepare(**SPEC.make_inputs({"T": 7, "H": 4096}, torch.bfloat16, torch.device("cpu")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert dispatch.choose_config(SPEC, launch, False) == SPEC.default_config({"T": 7, "H": 4096})
    dispatch.reset()
    _save(_device_file(config_dir, "nvidia_h100"), [_entry(tokens=1, num_warps=2), _entry(tokens=16, num_warps=16)])
    assert dispatch.choose_config(SPEC, launch, False)["num_warps"] == 16
    assert dispatch.choose_config(SPEC, launch, True)["num_warps"] == 16


def test_spec_hash_is_stable_and_per_kernel_source() -> None:
    assert dispatch.spec_hash(SPEC) == dispatch.spec_hash(REGISTRY["rms_norm"])  # one kernel for the family
    assert len(dispatch.spec_hash(SPEC)) == 16 and int(dispatch.spec_hash(SPEC), 16) >= 0


# --- concurrency and batch invariance -------------------------------------------------------------

@pytest.mark.parametrize("spec", spec_params(["rms_norm_static_fp8_quant", "rms_norm_per_block_quant",
                                              "fused_add_rms_norm_nvfp4_quant"]))
def test_concurrent_calls(interpret, spec: OpSpec) -> None:
    """8 threads call the op at once, each on its own shapes; every result equals the reference."""
    threads = 8
    cases = [spec.make_inputs({"T": tokens, "H": 1024}, torch.bfloat16, torch.device("cpu"))
             for tokens in (1, 3, 7, 16, 33, 64, 129, 300)]
    expected = [clone_kwargs(kwargs) for kwargs in cases]
    for kwargs in expected:
        spec.reference(**kwargs)
    start = threading.Barrier(threads)

    def call(index: int) -> None:
        start.wait()
        for _ in range(3):
            kwargs = clone_kwargs(cases[index])  # in-place ops (residual) need fresh inputs per call
            spec.op(**kwargs)
            assert_outputs_match(spec, kwargs, expected[index])

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(call, range(threads)))  # re-raises a thread's failure


# every op whose outputs are per-row tensors: not dynamic per-tensor quant (its scale is the whole batch's),
# nor the KV-cache writes (a cache is indexed by slot, not by row; their rotated rows are checked via rope)
ROW_OPS = [name for name, spec in REGISTRY.items()
           if name != "dynamic_scaled_fp8_quant" and not any("cache" in arg for arg in spec.mutated_args)]


def _row(kwargs: dict[str, Any], row: int, tokens: int) -> dict[str, Any]:
    """The same call for one row alone: every [tokens, ...] tensor cut down to that row (a copy)."""
    return {name: value[row:row + 1].clone() if isinstance(value, torch.Tensor) and value.dim() >= 1
            and value.size(0) == tokens else value for name, value in kwargs.items()}


@pytest.mark.parametrize("spec", spec_params(ROW_OPS))
def test_batch_invariance(interpret, batch_invariant, spec: OpSpec) -> None:
    tokens, hidden = 300, 4096
    kwargs = spec.make_inputs(problem_shape(spec, tokens, hidden), torch.bfloat16, torch.device("cpu"))
    if kwargs.get("residual", ...) is None:
        kwargs["residual"] = torch.randn(tokens, hidden, dtype=torch.bfloat16)
    if is_nvfp4_op(spec):  # linear block scales: one row of scales per token
        kwargs[arg(spec, "block_scale")] = poisoned((tokens, hidden // 16), torch.uint8, "cpu")
        kwargs["is_sf_swizzled_layout"] = False
    rows = {row: _row(kwargs, row, tokens) for row in (0, 1, 150, 299)}
    spec.op(**kwargs)
    for row, alone in rows.items():
        spec.op(**alone)
        for name in spec.mutated_args:
            if isinstance(alone.get(name), torch.Tensor):
                batched = kwargs[name][row:row + 1]
                assert torch.equal(alone[name].view(torch.uint8), batched.contiguous().view(torch.uint8)), (
                    f"{name}: row {row} alone differs from row {row} of a {tokens}-token batch")


# --- op-specific config rules ---------------------------------------------------------------------------

def test_looped_row_reduction_is_rejected_for_the_rms_norm_family(tmp_path: Path) -> None:
    """A hand-edited reduction loop would make the in-place residual update normalize the wrong values."""
    path = _corrupt(tmp_path, _set_entry(1, "config", {**CONFIG, "reduction_loops": [1024]}))
    config_store.load(path, SPEC.name, SPEC.dim_names, dispatch.spec_hash(SPEC))  # the generic checks accept it
    with pytest.raises(ConfigError) as caught:
        config_store.load(path, SPEC.name, SPEC.dim_names, dispatch.spec_hash(SPEC), SPEC.config_problem)
    message = str(caught.value)
    assert str(path) in message and "entries[1]" in message and "reduction_loops must be None" in message


def test_looped_config_falls_back_with_a_warning(config_dir: Path) -> None:
    exact = _device_file(config_dir, "nvidia_h100")
    _save(exact, [dataclasses.replace(_entry(tokens=1), config={**CONFIG, "reduction_loops": [512]})])
    resolved, messages = _resolve()
    assert resolved is None
    assert len(messages) == 1 and "architecture default" in messages[0] and "reduction_loops" in messages[0]


# --- warm-up ------------------------------------------------------------------------------------------

def test_warmup_rejects_unknown_ops() -> None:
    with pytest.raises(ValueError, match=r"ops: unknown op names \['not_an_op'\]"):
        helion_fusions.warmup(hidden_sizes=[256], ops=["rms_norm", "not_an_op"], device="cpu")


def test_warmup_runs_each_op_at_every_token_variant(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int, int, torch.dtype]] = []

    def record(spec: OpSpec, args: tuple[Any, ...]) -> None:
        kwargs = dict(zip(spec.arg_names, args))
        calls.append((spec.name, *kwargs["input"].shape, kwargs["input"].dtype))

    monkeypatch.setattr(dispatch, "_new_plan", record)
    helion_fusions.warmup(hidden_sizes=[256, 512], dtypes=[torch.float16], ops=["rms_norm_static_fp8_quant"],
                          max_tokens=100, device="cpu")
    # buckets 1, <=16 and <=128 (the last up to max_tokens), each with and without T divisible by 16
    assert calls == [("rms_norm_static_fp8_quant", t, h, torch.float16) for h in (256, 512)
                     for t in (1, 15, 16, 96, 100)]


def test_warmup_takes_shapes_of_model_dims(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, int]] = []
    monkeypatch.setattr(dispatch, "_new_plan", lambda spec, args: seen.append(tuple(args[1].shape)))
    helion_fusions.warmup(shapes=[{"H": 384}], ops=["rms_norm"], max_tokens=2, device="cpu")
    assert seen == [(1, 384), (2, 384)]
    with pytest.raises(ValueError, match=r"shapes: rms_norm needs the model dims \['H'\]"):
        helion_fusions.warmup(shapes=[{"N": 384}], ops=["rms_norm"], device="cpu")


def test_warmup_of_a_gemm_shape_takes_row_scales_unless_it_names_block_scales(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, tuple[int, ...]]] = []
    monkeypatch.setattr(dispatch, "_new_plan", lambda spec, args: seen.append((spec.name, tuple(args[3].shape))))
    helion_fusions.warmup(shapes=[{"N": 384, "K": 384}], max_tokens=1, device="cpu")  # every op of N and K
    gemms = sorted(name for name, spec in REGISTRY.items() if "BLOCK" in spec.dim_names)
    assert gemms and sorted(name for name, _ in seen) == gemms
    assert {a_scales for _, a_scales in seen} <= {(), (1,), (1, 1)}  # per tensor or per token, not [M, K / 128]
    seen.clear()
    helion_fusions.warmup(shapes=[{"N": 384, "K": 384, "BLOCK": 128}], ops=["scaled_mm"], max_tokens=1, device="cpu")
    assert seen == [("scaled_mm", (1, 3))]


def test_warmup_token_counts_cover_every_bucket_and_divisibility() -> None:
    assert helion_fusions.warmup_token_counts(100) == [1, 15, 16, 96, 100]
    assert helion_fusions.warmup_token_counts(1) == [1]
    assert helion_fusions.warmup_token_counts(20000) == [1, 15, 16, 127, 128, 1023, 1024, 4095, 4096, 16383, 16384,
                                                         19999, 20000]
    counts = helion_fusions.warmup_token_counts(5000)
    variants = {(dispatch.token_bucket(t), t % 16 == 0) for t in counts}
    assert variants == {(dispatch.token_bucket(t), t % 16 == 0) for t in range(1, 5001)}


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "16"])
def test_warmup_token_counts_rejects_bad_max_tokens(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_tokens: expected a positive int"):
        helion_fusions.warmup_token_counts(bad)


def test_warmup_with_forward_runs_it_at_every_token_variant() -> None:
    seen: list[int] = []
    assert helion_fusions.warmup(forward=seen.append, max_tokens=300) == dispatch.compiled_count()
    assert seen == [1, 15, 16, 63, 64, 127, 128, 288, 300]  # 63, 64: the GEMM ops bucket M at 64 too


def test_warmup_argument_errors() -> None:
    with pytest.raises(TypeError, match="forward: expected a callable"):
        helion_fusions.warmup(forward=16)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shapes: expected at least one shape of model dims"):
        helion_fusions.warmup(ops=["rms_norm"], device="cpu")


# --- launch plans ----------------------------------------------------------------------------------

def _counting_prepare(monkeypatch: pytest.MonkeyPatch, spec: OpSpec) -> list[int]:
    """Count the host glue's runs (argument checks and kernel views) for ``spec``'s calls."""
    runs: list[int] = []
    prepare = spec.prepare

    def counted(**kwargs: Any) -> Any:
        runs.append(1)
        return prepare(**kwargs)

    monkeypatch.setattr(dispatch, "_new_plan", _with_prepare(dispatch._new_plan, spec, counted))
    return runs


def _with_prepare(new_plan: Callable[..., Any], spec: OpSpec, prepare: Callable[..., Any]) -> Callable[..., Any]:
    def patched(called: OpSpec, args: tuple[Any, ...]) -> Any:
        return new_plan(dataclasses.replace(called, prepare=prepare) if called is spec else called, args)
    return patched


def test_a_repeat_call_skips_the_checks_and_a_new_signature_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = REGISTRY["rms_norm_static_fp8_quant"]
    runs = _counting_prepare(monkeypatch, spec)
    dispatch.reset()
    kwargs = spec.make_inputs({"T": 5, "H": 256}, torch.bfloat16, torch.device("cpu"))
    for _ in range(3):  # the same signature, new data each time: still the reference's bytes
        kwargs["input"].normal_()
        run_against_reference(spec, kwargs)
    assert len(runs) == 1
    spec.op(**{**kwargs, "input": kwargs["input"][:4], "result": kwargs["result"][:4]})  # another shape
    assert len(runs) == 2
    strided = torch.randn(5, 512, dtype=torch.bfloat16)[:, :256]  # another stride
    spec.op(**{**kwargs, "input": strided})
    assert len(runs) == 3
    spec.op(**{**kwargs, "epsilon": 1e-5})  # another non-tensor value
    assert len(runs) == 4
    spec.op(**kwargs)
    assert len(runs) == 4


def test_a_bad_argument_is_checked_on_every_call(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = REGISTRY["rms_norm_static_fp8_quant"]
    runs = _counting_prepare(monkeypatch, spec)
    dispatch.reset()
    kwargs = spec.make_inputs({"T": 5, "H": 256}, torch.bfloat16, torch.device("cpu"))
    bad = {**kwargs, "scale": torch.ones(2)}
    for attempt in range(1, 3):
        with pytest.raises(ValueError, match="scale: expected a one-element float32 tensor"):
            spec.op(**bad)
        assert len(runs) == attempt


def test_keyword_calls_bind_in_schema_order(reference_path) -> None:
    spec = REGISTRY["rms_norm_static_fp8_quant"]
    kwargs = spec.make_inputs({"T": 5, "H": 256}, torch.bfloat16, torch.device("cpu"))
    expected = clone_kwargs(kwargs)
    spec.reference(**expected)
    dispatch.implementation(spec)(**dict(reversed(list(kwargs.items()))))
    assert_outputs_match(spec, kwargs, expected)


def test_the_signature_tells_aliasing_and_alignment_apart() -> None:
    buffer = torch.zeros(64)
    a, b = buffer[:16], buffer[16:32]
    other = torch.zeros(16)
    assert dispatch.call_signature((a, b)) != dispatch.call_signature((a, other))  # b aliases a; other does not
    assert dispatch.call_signature((a, buffer[16:32])) == dispatch.call_signature((a, b))
    assert dispatch.call_signature((buffer[1:17],)) != dispatch.call_signature((a,))  # 4-byte vs 16-byte aligned
    assert dispatch.call_signature(([1, 2],)) == dispatch.call_signature(((1, 2),))


# --- a kernel that does not build on this GPU ---------------------------------------------------------

class _FakeCompiledKernel:
    """Stands in for Triton's compiled kernel: ``run`` is the launcher, called with the grid and arguments."""

    def __init__(self, warps: int, launched: list[int]) -> None:
        self.function, self.packed_metadata = object(), object()
        self.run = lambda *args: launched.append(warps)


class _FakeJit:
    """Stands in for a Triton JIT function whose build fails for some warp counts."""

    arg_names: tuple[str, ...] = ()

    def __init__(self, failing: set[int], launched: list[int]) -> None:
        self.failing, self.launched = failing, launched

    def run(self, *args: Any, grid: Any, warmup: bool, num_warps: int, **options: Any) -> _FakeCompiledKernel:
        if num_warps in self.failing:
            raise RuntimeError(f"PTX assembly failed for num_warps={num_warps}")
        return _FakeCompiledKernel(num_warps, self.launched)


class _FakeBound:
    """Stands in for a bound Helion kernel: its compiled host function hands the fake JIT to the launcher."""

    def __init__(self, jit: _FakeJit) -> None:
        self.jit = jit

    def compile_config(self, config: Any) -> Callable[..., None]:
        warps = dict(config)["num_warps"]

        def host(*args: Any, _launcher: Callable[..., Any]) -> None:
            _launcher(self.jit, (1,), num_warps=warps, num_stages=1)
        return host


def _fake_gpu_op(monkeypatch: pytest.MonkeyPatch, failing: set[int]) -> tuple[OpSpec, list[int], list[str]]:
    """An op whose launches look like CUDA launches; the tuned config uses 16 warps, the default 8."""
    launched: list[int] = []
    references: list[str] = []
    bound = _FakeBound(_FakeJit(failing, launched))
    kernel = type("FakeKernel", (), {"bind": lambda self, args: bound})()

    def prepare(**kwargs: Any) -> Any:
        return (KernelLaunch(kernel, (), ("fake",), {"T": 16, "H": kwargs["input"].shape[1]},
                             torch.device("cuda"), torch.bfloat16),)

    spec = dataclasses.replace(SPEC, name="fake_" + "_".join(map(str, sorted(failing))), prepare=prepare,
                               reference=lambda **kwargs: references.append("reference"),
                               default_config=lambda shape: dict(num_warps=8))
    monkeypatch.setattr(dispatch, "choose_config", lambda spec, launch, invariant: dict(num_warps=16))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda index: 0, raising=False)
    return spec, launched, references


def _calls(spec: OpSpec, hidden: int, count: int) -> list[str]:
    run = dispatch.implementation(spec)
    args = (torch.empty(1, hidden), torch.empty(1, hidden), torch.empty(hidden), torch.ones(1), 1e-6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(count):
            run(*args)
    return [str(w.message) for w in caught]


def test_tuned_kernel_that_fails_to_build_falls_back_to_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    spec, launched, references = _fake_gpu_op(monkeypatch, failing={16})
    messages = _calls(spec, 4096, 3)
    assert launched == [8, 8, 8] and references == []
    assert len(messages) == 1 and "failed to build on this GPU" in messages[0] and "PTX assembly" in messages[0]


def test_no_kernel_builds_then_the_reference_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    spec, launched, references = _fake_gpu_op(monkeypatch, failing={16, 8})
    messages = _calls(spec, 2048, 3)
    assert launched == [] and references == ["reference"] * 3
    assert len(messages) == 1 and "running the eager reference" in messages[0]


def test_arguments_sharing_storage_bind_their_own_kernel() -> None:
    """Helion compiles loops that touch one storage differently (ordered), and its bind cache cannot tell: the
    storage pattern is in the compile key, and each pattern binds its own kernel object."""
    spec = REGISTRY["rotary_embedding"]
    qkv = torch.randn(7, 6 * 128, dtype=torch.bfloat16)
    kwargs = spec.make_inputs({"T": 7, "H": 512}, torch.bfloat16, torch.device("cpu"))
    apart = spec.prepare(**{**kwargs, "query": qkv[:, :512].contiguous(), "key": qkv[:, 512:640].contiguous()})[0]
    split = spec.prepare(**{**kwargs, "query": qkv[:, 512:], "key": qkv[:, :128]})  # k before q: a launch each
    patterns = {dispatch.storage_pattern(launch.args) for launch in (apart, *split)}
    assert len(patterns) == 2  # q and k apart; one of them standing in for the other in each split launch
    assert len({dispatch.compile_key(spec, launch) for launch in (apart, *split)}) == 3
    kernels = [dispatch.kernel_for(spec.kernel, pattern) for pattern in sorted(patterns)]
    assert kernels[0] is not kernels[1] and all(k.fn is spec.kernel.fn for k in kernels)
    assert dispatch.kernel_for(spec.kernel, sorted(patterns)[0]) is kernels[0]
