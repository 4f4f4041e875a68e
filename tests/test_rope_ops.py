"""The RoPE family on CPU: the Helion kernel run eagerly (HELION_INTERPRET=1) against the reference."""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest
import torch
import helion
from conftest import is_poison, run_against_reference

from helion_fusions.runtime.registry import REGISTRY
from helion_fusions.tools.testing import code_generator, compare, poisoned, triton_code

pytestmark = pytest.mark.usefixtures("interpret")

ROPE = REGISTRY["rotary_embedding"]


def _inputs(tokens: int, q_heads: int, kv_heads: int | None, head_size: int, rot_dim: int, is_neox: bool,
            dtype: torch.dtype = torch.bfloat16, cache_dtype: torch.dtype = torch.float32,
            three_d: bool = False) -> dict[str, Any]:
    angles = torch.rand(4096, rot_dim // 2) * 6.3
    query = torch.randn(tokens, q_heads, head_size).to(dtype)
    key = None if kv_heads is None else torch.randn(tokens, kv_heads, head_size).to(dtype)
    if not three_d:
        query = query.reshape(tokens, q_heads * head_size)
        key = None if key is None else key.reshape(tokens, kv_heads * head_size)
    return {"positions": torch.randint(0, 4096, (tokens,)), "query": query, "key": key, "head_size": head_size,
            "cos_sin_cache": torch.cat([angles.cos(), angles.sin()], dim=-1).to(cache_dtype), "is_neox": is_neox}


def _cases() -> list[Any]:
    cases = []
    for tokens, (q_heads, kv_heads, head_size, rot_dim), is_neox, dtype in itertools.product(
            (0, 1, 7, 300), ((4, 2, 128, 128), (3, None, 64, 64), (5, 1, 256, 64), (2, 2, 80, 32)), (True, False),
            (torch.bfloat16, torch.float16)):
        cases.append(pytest.param(tokens, q_heads, kv_heads, head_size, rot_dim, is_neox, dtype, id=(
            f"T{tokens}-q{q_heads}-kv{kv_heads}-D{head_size}-rot{rot_dim}-{'neox' if is_neox else 'gptj'}-"
            f"{str(dtype).removeprefix('torch.')}")))
    return cases


@pytest.mark.parametrize(("tokens", "q_heads", "kv_heads", "head_size", "rot_dim", "is_neox", "dtype"), _cases())
def test_matches_reference(tokens, q_heads, kv_heads, head_size, rot_dim, is_neox, dtype) -> None:
    kwargs = _inputs(tokens, q_heads, kv_heads, head_size, rot_dim, is_neox, dtype)
    before = kwargs["query"].clone()
    run_against_reference(ROPE, kwargs, max_flip_fraction=0)
    if rot_dim < head_size:  # partial rotary: the tail of every head is left alone
        tail = kwargs["query"].view(tokens, q_heads, head_size)[..., rot_dim:]
        assert torch.equal(tail, before.view(tokens, q_heads, head_size)[..., rot_dim:])


@pytest.mark.parametrize("cache_dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("three_d", (False, True), ids=("flat_heads", "3d_heads"))
def test_cache_dtype_and_layout(cache_dtype: torch.dtype, three_d: bool) -> None:
    run_against_reference(ROPE, _inputs(33, 4, 2, 128, 128, True, cache_dtype=cache_dtype, three_d=three_d),
                          max_flip_fraction=0)


def _rotate_half_formula(x: torch.Tensor, positions: torch.Tensor, cache: torch.Tensor, is_neox: bool) -> torch.Tensor:
    """The textbook form: x * cos + rotate(x) * sin over the rotary dims (an independent check of the pairing)."""
    rot_dim = cache.shape[1]
    cos, sin = cache[positions].float().chunk(2, dim=-1)
    rotary = x[..., :rot_dim].float()
    if is_neox:
        cos, sin = torch.cat([cos, cos], -1)[:, None], torch.cat([sin, sin], -1)[:, None]
        first, second = rotary.chunk(2, dim=-1)
        turned = torch.cat([-second, first], dim=-1)
    else:
        cos = cos.repeat_interleave(2, -1)[:, None]
        sin = sin.repeat_interleave(2, -1)[:, None]
        turned = torch.stack([-rotary[..., 1::2], rotary[..., 0::2]], dim=-1).flatten(-2)
    out = x.clone()
    out[..., :rot_dim] = (rotary * cos + turned * sin).to(x.dtype)
    return out


@pytest.mark.parametrize("is_neox", (True, False), ids=("neox", "gptj"))
def test_pairs_follow_the_textbook_formula(is_neox: bool) -> None:
    kwargs = _inputs(17, 4, None, 128, 64, is_neox, torch.float16)
    expected = _rotate_half_formula(kwargs["query"].view(17, 4, 128), kwargs["positions"], kwargs["cos_sin_cache"],
                                    is_neox)
    ROPE.op(**kwargs)
    assert torch.equal(kwargs["query"].view(17, 4, 128), expected)


@pytest.mark.parametrize(("overrides", "error", "message"), [
    ({"head_size": 96}, ValueError, "query: expected [5, num_heads * 96]"),
    ({"head_size": 0}, ValueError, "head_size: expected a positive int"),
    ({"positions": torch.zeros(5, dtype=torch.int32)}, TypeError, "positions: expected dtype int64"),
    ({"positions": torch.zeros(4, dtype=torch.int64)}, ValueError, "positions: expected shape [5]"),
    ({"cos_sin_cache": torch.zeros(64, 130)}, ValueError, "cos_sin_cache: rot_dim"),
    ({"cos_sin_cache": torch.zeros(64, 63)}, ValueError, "cos_sin_cache: rot_dim"),
    ({"cos_sin_cache": torch.zeros(64, 128, dtype=torch.float16)}, TypeError, "cos_sin_cache: expected dtype"),
    ({"key": torch.zeros(5, 100, dtype=torch.bfloat16)}, ValueError, "key: expected [5, num_heads * 128]"),
    ({"key": torch.zeros(5, 128, dtype=torch.float16)}, TypeError, "key: expected dtype bfloat16"),
    ({"query": torch.zeros(5, 256, dtype=torch.float64)}, TypeError, "query: expected dtype"),
], ids=["head_size_mismatch", "head_size_zero", "positions_int32", "positions_length", "rot_dim_too_large",
        "rot_dim_odd", "cache_dtype", "key_width", "key_dtype", "query_fp32"])
def test_bad_arguments(overrides: dict[str, Any], error: type[Exception], message: str) -> None:
    kwargs = {**_inputs(5, 2, 1, 128, 128, True), **overrides}
    with pytest.raises(error, match=f"^{re.escape(message)}"):
        ROPE.op(**kwargs)


# --- rope + paged KV-cache write ------------------------------------------------------------------

ROPE_CACHE = REGISTRY["rotary_embedding_and_cache"]


def _cache_inputs(tokens: int, heads: int, head_size: int, rot_dim: int, is_neox: bool, kv_cache_dtype: str,
                  per_head_scale: bool, hnd: bool, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    from helion_fusions.tools.testing import poisoned

    kwargs = _inputs(tokens, 4, heads, head_size, rot_dim, is_neox, dtype)
    num_blocks, block_size = tokens // 16 + 2, 16
    cache_dtype = dtype if kv_cache_dtype == "auto" else torch.uint8

    def cache() -> torch.Tensor:
        if hnd:  # [num_blocks, heads, block_size, head_size] storage, seen as NHD through its strides
            return poisoned((num_blocks, heads, block_size, head_size), cache_dtype, "cpu").transpose(1, 2)
        return poisoned((num_blocks, block_size, heads, head_size), cache_dtype, "cpu")

    slots = torch.randperm(num_blocks * block_size)[:tokens]
    if tokens > 2:
        slots[1] = -1  # skipped
        slots[2] = num_blocks * block_size + 5  # past the cache: skipped, never written out of bounds
    scales = torch.rand(heads) + 0.5 if per_head_scale else torch.tensor([0.75])
    kwargs.update(value=torch.randn(tokens, heads * head_size).to(dtype), key_cache=cache(), value_cache=cache(),
                  slot_mapping=slots, kv_cache_dtype=kv_cache_dtype, k_scale=scales, v_scale=scales * 2)
    return kwargs


def _cache_cases() -> list[Any]:
    return [pytest.param(tokens, rot_dim, is_neox, kv, per_head, hnd, id=(
        f"T{tokens}-rot{rot_dim}-{'neox' if is_neox else 'gptj'}-{kv}-{'per_head' if per_head else 'per_tensor'}-"
        f"{'hnd' if hnd else 'nhd'}"))
        for tokens, rot_dim, is_neox, kv, per_head, hnd in itertools.product(
            (1, 7, 300), (128, 64), (True, False), ("auto", "fp8"), (False, True), (False, True))
        if not (kv == "auto" and per_head)]


@pytest.mark.parametrize(("tokens", "rot_dim", "is_neox", "kv_cache_dtype", "per_head", "hnd"), _cache_cases())
def test_cache_write_matches_reference(tokens, rot_dim, is_neox, kv_cache_dtype, per_head, hnd) -> None:
    kwargs = _cache_inputs(tokens, 2, 128, rot_dim, is_neox, kv_cache_dtype, per_head, hnd)
    expected = run_against_reference(ROPE_CACHE, kwargs, max_flip_fraction=0)
    written = set(int(s) for s in kwargs["slot_mapping"] if 0 <= s < 16 * (tokens // 16 + 2))
    for name in ("key_cache", "value_cache"):
        rows = kwargs[name].flatten(0, 1)  # a copy for HND storage: reading only
        untouched = [slot for slot in range(rows.shape[0]) if slot not in written]
        assert all(bool((rows[slot].contiguous().view(torch.uint8) == 0x7F).all()) for slot in untouched), (
            f"{name}: a slot no token maps to was written")
    assert torch.equal(expected["key"], kwargs["key"])


def test_cache_holds_the_rotated_key() -> None:
    kwargs = _cache_inputs(5, 2, 128, 64, True, "auto", False, False)
    ROPE_CACHE.op(**kwargs)
    slots = kwargs["slot_mapping"]
    kept = (slots >= 0) & (slots < kwargs["key_cache"].shape[0] * 16)
    rows = kwargs["key_cache"].flatten(0, 1)[slots[kept]]
    assert kept.sum() == 3 and torch.equal(rows, kwargs["key"].view(5, 2, 128)[kept])


@pytest.mark.parametrize(("overrides", "error", "message"), [
    ({"kv_cache_dtype": "int8"}, ValueError, "kv_cache_dtype: expected one of"),
    ({"slot_mapping": torch.zeros(7, dtype=torch.int32)}, TypeError, "slot_mapping: expected dtype int64"),
    ({"key_cache": torch.zeros(2, 16, 3, 128, dtype=torch.bfloat16)}, ValueError, "key_cache: expected [num_blocks"),
    ({"value_cache": torch.zeros(3, 16, 2, 128, dtype=torch.bfloat16)}, ValueError, "value_cache: expected [2, 16]"),
    ({"k_scale": torch.ones(3)}, ValueError, "k_scale: expected one element or one per head"),
    ({"value": torch.zeros(7, 3 * 128, dtype=torch.bfloat16)}, ValueError, "value: expected 2 heads"),
], ids=["cache_dtype_name", "slots_int32", "cache_heads", "value_cache_blocks", "scale_count", "value_heads"])
def test_cache_bad_arguments(overrides: dict[str, Any], error: type[Exception], message: str) -> None:
    kwargs = {**_cache_inputs(7, 2, 128, 128, True, "auto", False, False), **overrides}
    with pytest.raises(error, match=f"^{re.escape(message)}"):
        ROPE_CACHE.op(**kwargs)


# --- per-head RMS norm + rope on packed qkv --------------------------------------------------------

QK_NORM = REGISTRY["fused_qk_norm_rope"]


def _qkv_inputs(tokens: int, heads: tuple[int, int, int], head_dim: int, rot_dim: int, is_neox: bool,
                dtype: torch.dtype = torch.bfloat16, weight_dtype: torch.dtype | None = None) -> dict[str, Any]:
    base = _inputs(tokens, 1, None, head_dim, rot_dim, is_neox, dtype)
    weight_dtype = weight_dtype or dtype
    return {"qkv": torch.randn(tokens, sum(heads) * head_dim).to(dtype), "num_heads_q": heads[0],
            "num_heads_k": heads[1], "num_heads_v": heads[2], "head_dim": head_dim, "eps": 1e-6,
            "q_weight": (1 + 0.5 * torch.randn(head_dim)).to(weight_dtype),
            "k_weight": (1 + 0.5 * torch.randn(head_dim)).to(weight_dtype),
            "cos_sin_cache": base["cos_sin_cache"], "is_neox": is_neox, "position_ids": base["positions"]}


def _qk_cases() -> list[Any]:
    return [pytest.param(tokens, heads, head_dim, rot_dim, is_neox, dtype, id=(
        f"T{tokens}-h{'_'.join(map(str, heads))}-D{head_dim}-rot{rot_dim}-{'neox' if is_neox else 'gptj'}-"
        f"{str(dtype).removeprefix('torch.')}"))
        for tokens, (heads, head_dim, rot_dim), is_neox, dtype in itertools.product(
            (0, 1, 7, 300), (((4, 2, 2), 128, 128), ((3, 1, 1), 64, 64), ((2, 2, 2), 256, 256), ((4, 2, 2), 128, 64)),
            (True, False), (torch.bfloat16, torch.float16))]


@pytest.mark.parametrize(("tokens", "heads", "head_dim", "rot_dim", "is_neox", "dtype"), _qk_cases())
def test_qk_norm_rope_matches_reference(tokens, heads, head_dim, rot_dim, is_neox, dtype) -> None:
    kwargs = _qkv_inputs(tokens, heads, head_dim, rot_dim, is_neox, dtype)
    v_before = kwargs["qkv"][:, (heads[0] + heads[1]) * head_dim:].clone()
    # the kernel sums a head's squares in pieces (the rotary halves, the rest): rare rounding ties
    run_against_reference(QK_NORM, kwargs)
    assert torch.equal(kwargs["qkv"][:, (heads[0] + heads[1]) * head_dim:], v_before), "v heads were written"


def test_qk_norm_rope_fp32_weights() -> None:
    run_against_reference(QK_NORM, _qkv_inputs(33, (4, 2, 2), 128, 128, True, weight_dtype=torch.float32))


def test_qk_norm_rope_follows_the_textbook_formula() -> None:
    """Norm in fp32, then the rotate-half formula in fp32, rounded once: the op's bytes, up to rounding ties."""
    kwargs = _qkv_inputs(16, (2, 1, 1), 128, 128, True)
    qkv = kwargs["qkv"].clone()
    QK_NORM.op(**kwargs)
    for index, weight in ((slice(0, 256), kwargs["q_weight"]), (slice(256, 384), kwargs["k_weight"])):
        heads = qkv[:, index].view(16, -1, 128).float()
        normed = heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.float()
        expected = _rotate_half_formula(normed, kwargs["position_ids"], kwargs["cos_sin_cache"], True)
        result = compare(kwargs["qkv"][:, index].view(16, -1, 128), expected.to(torch.bfloat16))
        assert result.ok(1e-3), result


@pytest.mark.parametrize(("overrides", "error", "message"), [
    ({"num_heads_q": 5}, ValueError, "qkv: expected [num_tokens, (num_heads_q + num_heads_k + num_heads_v)"),
    ({"num_heads_k": 0}, ValueError, "num_heads_k: expected a positive int"),
    ({"eps": 0.0}, ValueError, "eps: expected a positive float"),
    ({"q_weight": torch.ones(64, dtype=torch.bfloat16)}, ValueError, "q_weight: expected shape [128]"),
    ({"k_weight": torch.ones(128, dtype=torch.float16)}, TypeError, "k_weight: expected dtype"),
    ({"position_ids": torch.zeros(7, dtype=torch.int32)}, TypeError, "position_ids: expected dtype int64"),
], ids=["width", "no_key_heads", "eps", "q_weight_shape", "k_weight_dtype", "positions_dtype"])
def test_qk_norm_bad_arguments(overrides: dict[str, Any], error: type[Exception], message: str) -> None:
    kwargs = {**_qkv_inputs(7, (4, 2, 2), 128, 128, True), **overrides}
    with pytest.raises(error, match=f"^{re.escape(message)}"):
        QK_NORM.op(**kwargs)


# --- rope + static fp8 quant ------------------------------------------------------------------------

ROPE_QUANT = REGISTRY["rotary_embedding_static_fp8_quant"]


@pytest.mark.parametrize(("tokens", "rot_dim", "is_neox", "with_key", "fp8"), [
    pytest.param(t, r, n, k, f, id=f"T{t}-rot{r}-{'neox' if n else 'gptj'}-{'key' if k else 'no_key'}-{str(f)[6:]}")
    for t, r, n, k, f in itertools.product((1, 7, 300), (128, 64), (True, False), (True, False),
                                           (torch.float8_e4m3fn, torch.float8_e4m3fnuz))])
def test_rope_quant_matches_reference(tokens, rot_dim, is_neox, with_key, fp8) -> None:
    from helion_fusions.tools.testing import poisoned

    kwargs = _inputs(tokens, 4, 2 if with_key else None, 128, rot_dim, is_neox)
    kwargs.update(query_out=poisoned((tokens, 4 * 128), fp8, "cpu"), q_scale=torch.tensor([0.01]),
                  key_out=poisoned((tokens, 2 * 128), fp8, "cpu") if with_key else None,
                  k_scale=torch.tensor([0.03]) if with_key else None)
    before = {name: kwargs[name].clone() for name in ("query", "key") if kwargs[name] is not None}
    run_against_reference(ROPE_QUANT, kwargs, max_flip_fraction=0)
    for name, value in before.items():
        assert torch.equal(kwargs[name], value), f"{name}: the input changed"


def test_rope_quant_needs_key_out_with_a_key() -> None:
    from helion_fusions.tools.testing import poisoned

    kwargs = _inputs(5, 2, 1, 128, 128, True)
    kwargs.update(query_out=poisoned((5, 256), torch.float8_e4m3fn, "cpu"), key_out=None, q_scale=torch.tensor([0.1]),
                  k_scale=None)
    with pytest.raises(ValueError, match="^key_out: a key needs key_out and k_scale"):
        ROPE_QUANT.op(**kwargs)


# --- rope + static fp8 quant of q + KV-cache write of k and v ----------------------------------------

ROPE_QUANT_CACHE = REGISTRY["rotary_embedding_fp8_quant_and_cache"]


@pytest.mark.parametrize(("tokens", "rot_dim", "is_neox", "kv_cache_dtype", "per_head", "hnd"), _cache_cases())
def test_rope_quant_cache_matches_reference(tokens, rot_dim, is_neox, kv_cache_dtype, per_head, hnd) -> None:
    from helion_fusions.tools.testing import poisoned

    kwargs = _cache_inputs(tokens, 2, 128, rot_dim, is_neox, kv_cache_dtype, per_head, hnd)
    kwargs.update(query_out=poisoned((tokens, 4 * 128), torch.float8_e4m3fn, "cpu"), q_scale=torch.tensor([0.02]))
    query = kwargs["query"].clone()
    run_against_reference(ROPE_QUANT_CACHE, kwargs, max_flip_fraction=0)
    assert torch.equal(kwargs["query"], query), "query is an input here: only query_out is written"


# --- MLA: rope on q_pe / k_pe, then [kv_c | k_pe] into the cache ------------------------------------

MLA = REGISTRY["concat_and_cache_mla_rope"]


@pytest.mark.parametrize("tokens", (1, 7, 300))
@pytest.mark.parametrize("kv_cache_dtype", ("auto", "fp8"))
@pytest.mark.parametrize("is_neox", (True, False), ids=("neox", "gptj"))
def test_mla_rope_cache_matches_reference(tokens: int, kv_cache_dtype: str, is_neox: bool) -> None:
    kwargs = MLA.make_inputs({"T": tokens, "H": 1024}, torch.bfloat16, torch.device("cpu"))
    kwargs["is_neox"] = is_neox
    if tokens > 3:
        kwargs["slot_mapping"][3] = -1
    if kv_cache_dtype == "fp8":
        kwargs.update(kv_cache=kwargs["kv_cache"].view(torch.uint8)[..., :576].contiguous(), kv_cache_dtype="fp8",
                      scale=torch.tensor([0.05]))
    expected = run_against_reference(MLA, kwargs, max_flip_fraction=0)
    slots = expected["slot_mapping"]
    kept = slots[slots >= 0]
    rows = kwargs["kv_cache"].flatten(0, 1)
    if kv_cache_dtype == "auto":  # [kv_c | rotated k_pe], token by token
        assert torch.equal(rows[kept], torch.cat([kwargs["kv_c"], kwargs["k_pe"]], -1)[slots >= 0])


def test_mla_cache_width_must_be_rank_plus_pe() -> None:
    kwargs = MLA.make_inputs({"T": 5, "H": 1024}, torch.bfloat16, torch.device("cpu"))
    kwargs["kv_cache"] = torch.zeros(2, 16, 600, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=re.escape("kv_cache: expected [num_blocks, block_size, 512 + 64]")):
        MLA.op(**kwargs)


@pytest.mark.parametrize("tokens", (1, 7, 300))
@pytest.mark.parametrize("kv_cache_dtype", ("auto", "fp8"))
def test_plain_mla_cache_matches_reference(tokens: int, kv_cache_dtype: str) -> None:
    spec = REGISTRY["concat_and_cache_mla"]
    kwargs = spec.make_inputs({"T": tokens, "H": 1024}, torch.float16, torch.device("cpu"))
    if tokens > 3:
        kwargs["slot_mapping"][3] = -1
    if kv_cache_dtype == "fp8":
        kwargs.update(kv_cache=kwargs["kv_cache"].view(torch.uint8)[..., :576].contiguous(), kv_cache_dtype="fp8",
                      scale=torch.tensor([0.05]))
    k_pe = kwargs["k_pe"].clone()
    run_against_reference(spec, kwargs, max_flip_fraction=0)
    assert torch.equal(kwargs["k_pe"], k_pe), "the plain cache write does not rotate"


@pytest.mark.parametrize("is_neox", (True, False), ids=("neox", "gptj"))
@pytest.mark.parametrize("offset", (0, 32, 64))
def test_rope_dim_offset_rotates_the_dims_after_the_offset(is_neox: bool, offset: int) -> None:
    kwargs = _inputs(9, 3, 2, 128, 64, is_neox)
    kwargs["rope_dim_offset"] = offset
    before = kwargs["query"].view(9, 3, 128).clone()
    run_against_reference(ROPE, kwargs, max_flip_fraction=0)
    after = kwargs["query"].view(9, 3, 128)
    outside = torch.ones(128, dtype=torch.bool)
    outside[offset:offset + 64] = False
    assert torch.equal(after[..., outside], before[..., outside]), "dims outside the rotary window changed"
    shifted = before.clone()
    shifted[..., :64] = before[..., offset:offset + 64]
    expected = _rotate_half_formula(shifted, kwargs["positions"], kwargs["cos_sin_cache"], is_neox)[..., :64]
    assert torch.equal(after[..., offset:offset + 64], expected)


@pytest.mark.parametrize("offset", (-1, 65))
def test_rope_dim_offset_out_of_range(offset: Any) -> None:
    kwargs = {**_inputs(3, 2, None, 128, 64, True), "rope_dim_offset": offset}
    with pytest.raises(ValueError, match=r"^rope_dim_offset: expected an int in \[0, head_size - rot_dim\]"):
        ROPE.op(**kwargs)



ROTATING_OPS = [spec for spec in REGISTRY.values()
                if spec.family in ("rope", "kv_cache") and {"positions", "position_ids"} & set(spec.arg_names)]


@pytest.mark.parametrize("spec", ROTATING_OPS, ids=lambda s: s.name)
def test_positions_outside_the_cos_sin_cache_skip_the_rotation(spec) -> None:
    """A position with no cos/sin row (negative, past the end) is not rotated: the op's outputs for that token
    equal those of the same call with an identity rotation, and the other tokens are rotated as usual."""
    kwargs = spec.make_inputs({"T": 6, "H": 256}, torch.bfloat16, torch.device("cpu"))
    name = "positions" if "positions" in kwargs else "position_ids"
    bad = torch.tensor([False, True, False, True, True, False])
    kwargs[name][bad] = torch.tensor([-1, kwargs["cos_sin_cache"].shape[0], 2**40])
    identity = {key: value.clone() if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}
    table = identity["cos_sin_cache"]
    table[:, :table.shape[1] // 2], table[:, table.shape[1] // 2:] = 1.0, 0.0
    run_against_reference(spec, kwargs, max_flip_fraction=0)
    spec.op(**identity)
    slots = kwargs.get("slot_mapping")
    for key in spec.mutated_args:
        if kwargs.get(key) is None:
            continue
        rotated, unrotated = kwargs[key], identity[key]
        if key.endswith("cache"):  # rows by slot
            rotated, unrotated = rotated.flatten(0, 1)[slots], unrotated.flatten(0, 1)[slots]
        assert torch.equal(rotated[bad], unrotated[bad]), key
        if key != "value_cache":  # values are cached as they are
            assert not torch.equal(rotated[~bad], unrotated[~bad]), key


def _packed(kwargs: dict[str, Any], names: tuple[str, ...], layout: str) -> None:
    """Replace the named [T, ...] tensors of ``kwargs`` by views of one packed [T, width] tensor, in ``layout``
    order: "ab" (as named, adjacent), "ba" (reversed) or "a_b" (a head-sized gap between them)."""
    parts = [kwargs[name] for name in names]
    tokens, gap = parts[0].shape[0], parts[0].shape[-1]
    order = list(reversed(range(len(parts)))) if layout == "ba" else list(range(len(parts)))
    widths = [p[0].numel() for p in parts]
    width = sum(widths) + (gap if layout == "a_b" else 0)
    packed = torch.randn(tokens, width, device=parts[0].device).to(parts[0].dtype)
    start = 0
    for index in order:
        view = packed[:, start:start + widths[index]]
        view.copy_(parts[index].reshape(tokens, -1))
        kwargs[names[index]] = view.view(parts[index].shape)
        start += widths[index] + (gap if layout == "a_b" else 0)


PAIRED_HEADS = [(spec, names) for spec in ROTATING_OPS for names in (("query", "key"), ("q_pe", "k_pe"))
                if set(names) <= set(spec.arg_names)]


@pytest.mark.parametrize("layout", ("ab", "ba", "a_b"))
@pytest.mark.parametrize(("spec", "names"), PAIRED_HEADS, ids=lambda p: getattr(p, "name", ""))
def test_query_and_key_views_of_one_tensor(spec, names, layout: str) -> None:
    """q and k as views of one packed qkv (an engine splits its qkv GEMM output): the same bytes as separate
    tensors; and every launch generates code on a CPU. (Helion orders two loops that share a written storage
    with a slow persistent schedule, and refuses to compile them off a GPU: such a kernel shows here as a
    LoopDependencyError.)"""
    kwargs = spec.make_inputs({"T": 7, "H": 512}, torch.bfloat16, torch.device("cpu"))
    _packed(kwargs, names, layout)
    outputs = [n for n in ("query_out", "key_out") if kwargs.get(n) is not None]
    if outputs:
        _packed(kwargs, tuple(outputs), layout)
    run_against_reference(spec, kwargs, max_flip_fraction=0)
    for launch in spec.prepare(**kwargs):
        assert triton_code(code_generator(launch.kernel).bind(launch.args), launch.args,
                           spec.default_config(launch.problem))


@pytest.mark.parametrize("is_neox", (True, False), ids=("neox", "gptj"))
@pytest.mark.parametrize("tokens", (1, 7))
def test_inverse_rotates_by_the_negated_angle(is_neox: bool, tokens: int) -> None:
    """``inverse=True`` (the engine op's trailing argument) negates sin: the reference's bytes, the textbook
    formula with -sin, and rotating back recovers the input to within the rounding of two steps."""
    kwargs = _inputs(tokens, 4, 2, 128, 64, is_neox)
    original = kwargs["query"].clone()
    expected = run_against_reference(ROPE, {**kwargs, "inverse": True}, max_flip_fraction=0)
    negated = kwargs["cos_sin_cache"].clone()
    negated[:, 32:] *= -1
    textbook = _rotate_half_formula(original.view(tokens, 4, 128), kwargs["positions"], negated, is_neox)
    torch.testing.assert_close(expected["query"].view(tokens, 4, 128), textbook, atol=0, rtol=0)
    ROPE.op(**kwargs)  # forward again: back to the input
    torch.testing.assert_close(kwargs["query"], original, atol=0.05, rtol=0.02)


def _ds_mla_inputs(spec, tokens: int) -> dict[str, Any]:
    kwargs = spec.make_inputs({"T": tokens, "H": 256}, torch.bfloat16, torch.device("cpu"))
    blocks = kwargs["kv_cache"].shape[0]
    sizes = torch.rand(tokens, 4).repeat_interleave(128, 1) * 8  # tiles of different sizes
    kwargs["kv_c"] = (kwargs["kv_c"] * sizes).bfloat16()
    kwargs.update(kv_cache=poisoned((blocks, 16, 656), torch.uint8, torch.device("cpu")),
                  kv_cache_dtype="fp8_ds_mla")
    return kwargs


MLA_OPS = [REGISTRY["concat_and_cache_mla"], REGISTRY["concat_and_cache_mla_rope"]]


@pytest.mark.parametrize("tokens", (1, 7, 40))
@pytest.mark.parametrize("spec", MLA_OPS, ids=lambda s: s.name)
def test_ds_mla_cache_entries(spec, tokens: int) -> None:
    """kv_cache_dtype="fp8_ds_mla": per token a 656-byte entry of 4 fp8 tiles of kv_c, the tiles' fp32 scales
    (amax / 448, a true division) and k_pe's 64 bf16 values as they are; other slots keep their poison."""
    kwargs = _ds_mla_inputs(spec, tokens)
    kwargs["slot_mapping"][0] = -1  # skipped
    expected = run_against_reference(spec, kwargs, max_flip_fraction=0)
    cache, slots = kwargs["kv_cache"].flatten(0, 1), kwargs["slot_mapping"]
    for t in range(1, tokens):  # by hand, from the entry's bytes
        entry = cache[slots[t]]
        tiles = kwargs["kv_c"][t].float().view(4, 128)
        scale = tiles.abs().amax(dim=-1) / 448.0
        assert torch.equal(entry[512:528].view(torch.float32), scale)
        codes = (tiles / scale[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert torch.equal(entry[:512], codes.flatten().view(torch.uint8))
        assert torch.equal(entry[528:].view(torch.bfloat16), expected["k_pe"].reshape(tokens, 64)[t])
    untouched = torch.ones(cache.shape[0], dtype=torch.bool)
    untouched[slots[1:]] = False
    assert is_poison(cache[untouched])


@pytest.mark.parametrize(("change", "error", "message"), [
    ({"kv_cache": torch.zeros(3, 16, 576, dtype=torch.uint8)}, ValueError,
     r"^kv_cache: fp8_ds_mla expects uint8 \[num_blocks, block_size, 656\]"),
    ({"kv_cache": torch.zeros(3, 16, 656, dtype=torch.bfloat16)}, TypeError, r"^kv_cache: expected dtype"),
    ({"kv_c": torch.randn(7, 256, dtype=torch.bfloat16)}, ValueError, r"^kv_c, k_pe: fp8_ds_mla needs kv_lora_rank"),
    ({"kv_c": torch.randn(7, 512, dtype=torch.float16), "k_pe": torch.randn(7, 64, dtype=torch.float16)}, ValueError,
     r"^kv_c: fp8_ds_mla takes bfloat16"),
])
def test_ds_mla_bad_arguments(change: dict[str, Any], error: type[Exception], message: str) -> None:
    spec = REGISTRY["concat_and_cache_mla"]
    with pytest.raises(error, match=message):
        spec.op(**{**_ds_mla_inputs(spec, 7), **change})


@pytest.mark.parametrize("spec", MLA_OPS, ids=lambda s: s.name)
def test_ds_mla_generates_code_with_every_shipped_config(spec) -> None:
    from helion_fusions.runtime import config_store

    kwargs = _ds_mla_inputs(spec, 7)
    path = config_store.config_root() / "nvidia_h200" / f"{spec.name}.json"
    configs = {repr(e.config): e.config for e in config_store.load(path, spec.name, spec.dim_names, None).entries}
    (launch,) = spec.prepare(**kwargs)
    bound = code_generator(launch.kernel).bind(launch.args)
    for config in configs.values():
        assert triton_code(bound, launch.args, helion.Config(**config))


@pytest.mark.parametrize("tokens", (1, 7))
def test_query_and_key_split_from_qkv_rotate_in_one_launch(tokens: int) -> None:
    """q and k split from one qkv GEMM output (as an engine passes them) rotate as one set of heads in one
    launch, a single token included (its views' token strides differ: [1, 4 * 128] has its own width)."""
    qkv = torch.randn(tokens, 6 * 128).bfloat16()
    q, k, _ = qkv.split([4 * 128, 128, 128], dim=-1)
    kwargs = {**_inputs(tokens, 4, 1, 128, 128, True), "query": q, "key": k}
    assert len(ROPE.prepare(**kwargs)) == 1
    run_against_reference(ROPE, kwargs, max_flip_fraction=0)
