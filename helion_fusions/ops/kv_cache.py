"""RoPE fused with the paged KV-cache write, and MLA's latent-cache write (with and without RoPE).

Each key row (rotated) and value row also goes to its slot, with ``reshape_and_cache_flash``
semantics: ``[num_blocks, block_size, heads, head_size]`` caches addressed through their strides
(HND storage works), a negative slot skips the token (as does a slot past the cache: never an
out-of-bounds write), and an fp8 cache stores ``fp8(clamp(x / scale))`` with a per-tensor or
per-head scale. The cache may be fp32 or the input dtype. One launch of the RoPE kernel
(:func:`helion_fusions.ops.rope.rope_launch`) does it all. ``concat_and_cache_mla_rope`` rounds
each rotation product to the input dtype before the sum, as the engine's fused MLA kernel computes
in that dtype; the other RoPE ops round the fp32 sum once.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from helion_fusions import quant
from helion_fusions.kernels.rope import FLT_MIN
from helion_fusions.ops.common import poison_, poisoned
from helion_fusions.ops.rope import (
    MAX_POSITIONS,
    check_quant_outputs,
    check_rope,
    declare,
    fp8_like,
    heads_view,
    reference_rope_quant,
    reference_rotary,
    rope_inputs,
    rope_launch,
    rotary_pairs,
    rotate_reference,
)
from helion_fusions.runtime import checks
from helion_fusions.runtime.device import fp8_dtype

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def _check_cache(name: str, cache: Any, heads: torch.Tensor, fp8: bool) -> torch.Tensor:
    """A paged cache [num_blocks, block_size, num_heads, head_size] (any strides); fp8 caches may be uint8."""
    if fp8:
        checks.check_tensor(name, cache, dtypes=(torch.uint8, *checks.FP8_DTYPES), device=heads.device)
    else:
        checks.check_tensor(name, cache, dtypes=(heads.dtype,), device=heads.device)
    if cache.dim() != 4 or tuple(cache.shape[2:]) != tuple(heads.shape[1:]):
        raise ValueError(f"{name}: expected [num_blocks, block_size, {heads.shape[1]}, {heads.shape[2]}], "
                         f"got shape {list(cache.shape)}")
    return cache


def _check_kv(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale, k, tokens,
              value_head_size=None):
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype: expected one of {list(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    fp8 = kv_cache_dtype != "auto"
    v = heads_view("value", value, tokens, value_head_size or k.shape[2], k.dtype, k.device)
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"value: expected {k.shape[1]} heads like key, got {v.shape[1]}")
    _check_cache("key_cache", key_cache, k, fp8)
    _check_cache("value_cache", value_cache, v, fp8)
    if key_cache.shape[:2] != value_cache.shape[:2]:
        raise ValueError(f"value_cache: expected {list(key_cache.shape[:2])} blocks like key_cache, "
                         f"got {list(value_cache.shape[:2])}")
    checks.check_tensor("slot_mapping", slot_mapping, dtypes=(torch.int64,), shape=(tokens,), device=k.device)
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        checks.check_tensor(name, scale, dtypes=(torch.float32,), device=k.device)
        if scale.numel() not in (1, k.shape[1]):
            raise ValueError(f"{name}: expected one element or one per head ({k.shape[1]}), got shape "
                             f"{list(scale.shape)}")
    if fp8:
        dtype = key_cache.dtype if key_cache.dtype in checks.FP8_DTYPES else fp8_dtype(k.device)
        key_cache, value_cache = key_cache.view(dtype), value_cache.view(dtype)
        fp8_max = quant.fp8_max_for(dtype)
    else:
        fp8_max = 0.0
    return v, key_cache, value_cache, fp8_max


def _prepare_rope_cache(positions, query, key, value, key_cache, value_cache, slot_mapping, head_size,
                        cos_sin_cache, is_neox, kv_cache_dtype, k_scale, v_scale):
    tokens, rot_dim, q, k = check_rope(positions, query, key, head_size, cos_sin_cache)
    v, key_cache, value_cache, fp8_max = _check_kv(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                                                   k_scale, v_scale, k, tokens)
    cache = (slot_mapping, v, key_cache, value_cache, k_scale.reshape(-1), v_scale.reshape(-1), fp8_max, None)
    return rope_launch(positions, q, k, cos_sin_cache, rot_dim, bool(is_neox), cache)


def write_cache_reference(rows: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor, scale: torch.Tensor,
                          fp8_max: float) -> None:
    """``reshape_and_cache_flash``: row t goes to slot ``slot_mapping[t]`` (skipped when negative or past the end).

    Written without data-dependent shapes, so it can be captured in a CUDA graph: a skipped row
    repeats the write of the first kept row (or, with none kept, rewrites slot 0 as it is), and the
    duplicate writes carry identical bytes.
    """
    if rows.shape[0] == 0:
        return
    num_blocks, block_size = cache.shape[:2]
    keep = (slot_mapping >= 0) & (slot_mapping < num_blocks * block_size)
    values = rows
    if fp8_max:
        scale = scale.float().reshape(-1)[None, :, None] if scale.numel() > 1 else scale.float().reshape(())
        values = quant.fp8_quantize(values.float(), scale, fp8_max, cache.dtype)
    values = values.to(cache.dtype)
    first = torch.argmax(keep.to(torch.int32)).reshape(1)  # the first kept row, or 0 when none is
    any_kept = keep.any()
    slots = torch.where(keep, slot_mapping, torch.where(any_kept, slot_mapping.index_select(0, first), 0))
    values = torch.where(keep[:, None, None], values,
                         torch.where(any_kept, values.index_select(0, first), cache[0, 0]))
    cache[slots // block_size, slots % block_size] = values


def _reference_rope_cache(positions, query, key, value, key_cache, value_cache, slot_mapping, head_size,
                          cos_sin_cache, is_neox, kv_cache_dtype, k_scale, v_scale):
    tokens, rot_dim, q, k = check_rope(positions, query, key, head_size, cos_sin_cache)
    v, key_cache, value_cache, fp8_max = _check_kv(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                                                   k_scale, v_scale, k, tokens)
    reference_rotary(positions, query, key, head_size, cos_sin_cache, is_neox)
    write_cache_reference(k, key_cache, slot_mapping, k_scale, fp8_max)
    write_cache_reference(v, value_cache, slot_mapping, v_scale, fp8_max)

def _prepare_rope_quant_cache(positions, query, query_out, key, value, key_cache, value_cache, slot_mapping,
                              head_size, cos_sin_cache, is_neox, kv_cache_dtype, q_scale, k_scale, v_scale):
    tokens, rot_dim, q, k = check_rope(positions, query, key, head_size, cos_sin_cache)
    q_out, _, q_fp8_max = check_quant_outputs(query_out, None, q_scale, None, q, None)
    v, key_cache, value_cache, fp8_max = _check_kv(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                                                   k_scale, v_scale, k, tokens)
    cache = (slot_mapping, v, key_cache, value_cache, k_scale.reshape(-1), v_scale.reshape(-1), fp8_max, None)
    return rope_launch(positions, q, k, cos_sin_cache, rot_dim, bool(is_neox), cache,
                   quant=(q_out, None, q_scale.reshape(-1), None, q_fp8_max))


def _reference_rope_quant_cache(positions, query, query_out, key, value, key_cache, value_cache, slot_mapping,
                                head_size, cos_sin_cache, is_neox, kv_cache_dtype, q_scale, k_scale, v_scale):
    """The unfused composite: rope + static fp8 quant of the query, then rope + cache write of the key."""
    reference_rope_quant(positions, query, None, query_out, None, head_size, cos_sin_cache, is_neox, q_scale)
    tokens, rot_dim, q, k = check_rope(positions, query, key, head_size, cos_sin_cache)
    v, key_cache, value_cache, fp8_max = _check_kv(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                                                   k_scale, v_scale, k, tokens)
    rotate_reference(positions, rotary_pairs(k, rot_dim, bool(is_neox)), cos_sin_cache)
    write_cache_reference(k, key_cache, slot_mapping, k_scale, fp8_max)
    write_cache_reference(v, value_cache, slot_mapping, v_scale, fp8_max)

def _check_mla(positions, q_pe, k_pe, kv_c, kv_cache, slot_mapping, cos_sin_cache, kv_cache_dtype, scale,
               positions_name="positions"):
    """MLA: q_pe [T, H, pe] (or [T, H * pe]), k_pe [T, pe], kv_c [T, rank], kv_cache [blocks, block, rank + pe]."""
    checks.check_tensor("k_pe", k_pe, dtypes=checks.FLOAT_ACTIVATIONS, last_dim_contiguous=True)
    pe_dim = k_pe.shape[-1]
    tokens, rot_dim, q, k = check_rope(positions, q_pe, k_pe, pe_dim, cos_sin_cache, positions_name)
    if k.shape[1] != 1:
        raise ValueError(f"k_pe: expected [{tokens}, {pe_dim}] (one shared head), got shape {list(k_pe.shape)}")
    checks.check_input_2d("kv_c", kv_c)
    checks.check_tensor("kv_c", kv_c, dtypes=(q.dtype,), device=q.device)
    if kv_c.shape[0] != tokens:
        raise ValueError(f"kv_c: expected [{tokens}, kv_lora_rank], got shape {list(kv_c.shape)}")
    rank = kv_c.shape[1]
    if kv_cache_dtype == DS_MLA:  # the engine op ignores scale: only checked
        checks.check_tensor("scale", scale, dtypes=(torch.float32,), device=q.device)
        return (tokens, rot_dim, q, k, *_ds_mla_views(kv_c, k, kv_cache, slot_mapping))
    if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 3 or kv_cache.shape[2] != rank + pe_dim:
        shape = list(kv_cache.shape) if isinstance(kv_cache, torch.Tensor) else type(kv_cache).__name__
        raise ValueError(f"kv_cache: expected [num_blocks, block_size, {rank} + {pe_dim}], got {shape}")
    v, pe_cache, c_cache, fp8_max = _check_kv(k_pe, kv_c.view(tokens, 1, rank), kv_cache[..., rank:].unsqueeze(2),
                                              kv_cache[..., :rank].unsqueeze(2), slot_mapping, kv_cache_dtype, scale,
                                              scale, k, tokens, value_head_size=rank)
    return tokens, rot_dim, q, k, v, pe_cache, c_cache, fp8_max, None


DS_MLA = "fp8_ds_mla"
DS_MLA_RANK, DS_MLA_PE_DIM, DS_MLA_TILE = 512, 64, 128
DS_MLA_ROPE_START = DS_MLA_RANK + 4 * (DS_MLA_RANK // DS_MLA_TILE)  # bytes: the fp8 codes, then the fp32 scales
DS_MLA_ENTRY = DS_MLA_ROPE_START + 2 * DS_MLA_PE_DIM  # 656 bytes a token


def _ds_mla_views(kv_c: torch.Tensor, k: torch.Tensor, kv_cache: Any, slot_mapping: Any) -> tuple[Any, ...]:
    """The engine's fp8_ds_mla cache: a uint8 [num_blocks, block_size, 656] entry per token holds kv_c's 512
    values as fp8 in 4 tiles of 128, each tile's fp32 scale (bytes 512-527), then k_pe's 64 values as they are.
    Returns (value tiles, rope view, code view, fp8_max, fp32 word view) for the kernel."""
    tokens, rank, pe_dim = kv_c.shape[0], kv_c.shape[1], k.shape[2]
    if (rank, pe_dim) != (DS_MLA_RANK, DS_MLA_PE_DIM):
        raise ValueError(f"kv_c, k_pe: {DS_MLA} needs kv_lora_rank {DS_MLA_RANK} and a rope dim of "
                         f"{DS_MLA_PE_DIM}, got {rank} and {pe_dim}")
    if kv_c.dtype != torch.bfloat16:
        raise ValueError(f"kv_c: {DS_MLA} takes bfloat16 kv_c and k_pe, got {kv_c.dtype}")
    checks.check_tensor("kv_cache", kv_cache, dtypes=(torch.uint8,), device=kv_c.device)
    if (kv_cache.dim() != 3 or kv_cache.shape[2] != DS_MLA_ENTRY or kv_cache.stride(2) != 1
            or kv_cache.storage_offset() % 4 or any(stride % 4 for stride in kv_cache.stride()[:2])):
        raise ValueError(f"kv_cache: {DS_MLA} expects uint8 [num_blocks, block_size, {DS_MLA_ENTRY}] with 4-byte "
                         f"aligned entries, got shape {list(kv_cache.shape)} and strides {list(kv_cache.stride())}")
    checks.check_tensor("slot_mapping", slot_mapping, dtypes=(torch.int64,), shape=(tokens,), device=kv_c.device)
    fp8 = fp8_dtype(kv_c.device)
    return (kv_c.view(tokens, 1, DS_MLA_RANK // DS_MLA_TILE, DS_MLA_TILE),
            kv_cache.view(torch.bfloat16)[..., DS_MLA_ROPE_START // 2:].unsqueeze(2), kv_cache.view(fp8)[..., :rank].unsqueeze(2),
            quant.fp8_max_for(fp8), kv_cache.view(torch.float32))


def _write_mla_reference(k: torch.Tensor, v: torch.Tensor, pe_cache: torch.Tensor, c_cache: torch.Tensor,
                         slot_mapping: torch.Tensor, scale: torch.Tensor, fp8_max: float,
                         ds_words: torch.Tensor | None) -> None:
    """Each token's k_pe and kv_c to its slot: as two cache rows, or (``ds_words`` given) as one fp8_ds_mla entry,
    each tile's scale ``max(amax / fp8_max, FLT_MIN)`` (a NaN amax gives the floor) and ``fp8(x / scale)``."""
    if ds_words is None:
        write_cache_reference(k, pe_cache, slot_mapping, scale, fp8_max)
        write_cache_reference(v, c_cache, slot_mapping, scale, fp8_max)
        return
    tiles = v.float().flatten(1, 2)  # [T, tiles, 128]
    tile_scale = quant.div_rn(tiles.abs().amax(dim=-1), fp8_max)  # IEEE on every device, as the engine's kernel
    tile_scale = torch.where(tile_scale > FLT_MIN, tile_scale, FLT_MIN)
    codes = quant.fp8_quantize(tiles, tile_scale.unsqueeze(-1), fp8_max, c_cache.dtype)
    entries = torch.cat([codes.flatten(1).view(torch.uint8), tile_scale.view(torch.uint8),
                         k.flatten(1).view(torch.uint8)], dim=1)
    write_cache_reference(entries.unsqueeze(1), ds_words.view(torch.uint8).unsqueeze(2), slot_mapping, scale, 0.0)


def _prepare_mla_rope(positions, q_pe, k_pe, kv_c, kv_cache, slot_mapping, cos_sin_cache, is_neox, kv_cache_dtype,
                      scale):
    tokens, rot_dim, q, k, v, pe_cache, c_cache, fp8_max, ds_words = _check_mla(
        positions, q_pe, k_pe, kv_c, kv_cache, slot_mapping, cos_sin_cache, kv_cache_dtype, scale)
    cache = (slot_mapping, v, pe_cache, c_cache, scale.reshape(-1), scale.reshape(-1), fp8_max, ds_words)
    return rope_launch(positions, q, k, cos_sin_cache, rot_dim, bool(is_neox), cache, round_products=True)


def _reference_mla_rope(positions, q_pe, k_pe, kv_c, kv_cache, slot_mapping, cos_sin_cache, is_neox, kv_cache_dtype,
                        scale):
    tokens, rot_dim, q, k, v, pe_cache, c_cache, fp8_max, ds_words = _check_mla(
        positions, q_pe, k_pe, kv_c, kv_cache, slot_mapping, cos_sin_cache, kv_cache_dtype, scale)
    for heads in (q, k):
        rotate_reference(positions, rotary_pairs(heads, rot_dim, bool(is_neox)), cos_sin_cache, round_products=True)
    _write_mla_reference(k, v, pe_cache, c_cache, slot_mapping, scale, fp8_max, ds_words)


def _prepare_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale):
    """vLLM's ``concat_and_cache_mla``: the rope-fused path with the rotation switched off."""
    # slot_mapping stands in for positions, and a cached identity table for cos/sin: nothing reads them
    tokens, rot_dim, q, k, v, pe_cache, c_cache, fp8_max, ds_words = _check_mla(
        slot_mapping, k_pe, k_pe, kv_c, kv_cache, slot_mapping, _no_rotation(k_pe), kv_cache_dtype, scale,
        positions_name="slot_mapping")
    cache = (slot_mapping, v, pe_cache, c_cache, scale.reshape(-1), scale.reshape(-1), fp8_max, ds_words)
    return rope_launch(slot_mapping, k[:, :1], k, _no_rotation(k_pe), rot_dim, True, cache, query=False, rotate=False)


def _no_rotation(k_pe: Any) -> torch.Tensor:
    """A one-row cos/sin table of k_pe's width on its device, made once (the checks want one)."""
    if not isinstance(k_pe, torch.Tensor) or k_pe.dim() == 0:
        return torch.ones(1, 2)
    return _identity_table(2 * max(k_pe.shape[-1] // 2, 1), k_pe.device)


@functools.cache
def _identity_table(width: int, device: torch.device) -> torch.Tensor:
    return torch.cat([torch.ones(1, width // 2), torch.zeros(1, width // 2)], dim=-1).to(device)


def _reference_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale):
    tokens, rot_dim, q, k, v, pe_cache, c_cache, fp8_max, ds_words = _check_mla(
        slot_mapping, k_pe, k_pe, kv_c, kv_cache, slot_mapping, _no_rotation(k_pe), kv_cache_dtype, scale,
        positions_name="slot_mapping")
    _write_mla_reference(k, v, pe_cache, c_cache, slot_mapping, scale, fp8_max, ds_words)


# --- tuning grid, seeds and bench inputs -----------------------------------------------------

BLOCK_SIZE = 16


def _cache_inputs(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """Rope inputs plus a poisoned paged cache of block size 16 with room for every token, slots shuffled."""
    kwargs = rope_inputs(tokens, hidden, dtype, device)
    head_size, key = kwargs["head_size"], kwargs["key"]
    generator = torch.Generator(device="cpu").manual_seed(tokens + 17)
    num_blocks = max(1, -(-tokens // BLOCK_SIZE)) + 1
    shape = (num_blocks, BLOCK_SIZE, key.shape[1] // head_size, head_size)
    kwargs.update(
        value=torch.randn(key.shape, generator=generator).to(dtype=dtype, device=device),
        key_cache=poisoned(shape, dtype, device), value_cache=poisoned(shape, dtype, device),
        slot_mapping=torch.randperm(num_blocks * BLOCK_SIZE, generator=generator)[:tokens].to(device),
        kv_cache_dtype="auto", k_scale=torch.ones(1, device=device), v_scale=torch.ones(1, device=device))
    return kwargs

ROTARY_EMBEDDING_AND_CACHE = declare(
    "rotary_embedding_and_cache",
    "(Tensor positions, Tensor! query, Tensor! key, Tensor value, Tensor! key_cache, Tensor! value_cache, "
    "Tensor slot_mapping, int head_size, Tensor cos_sin_cache, bool is_neox, str kv_cache_dtype, "
    "Tensor k_scale, Tensor v_scale) -> ()",
    _prepare_rope_cache, _reference_rope_cache, _cache_inputs, read_and_written=("query", "key"), family="kv_cache")

_QUANT_CACHE_OUTPUTS = fp8_like(query_out="query")


def _quant_cache_inputs(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """A quantized query and an fp8 cache (stored as uint8, as engines allocate it), per-tensor scales."""
    kwargs = _cache_inputs(tokens, hidden, dtype, device)
    kwargs.update(key_cache=poisoned(tuple(kwargs["key_cache"].shape), torch.uint8, device),
                  value_cache=poisoned(tuple(kwargs["value_cache"].shape), torch.uint8, device),
                  kv_cache_dtype="fp8", q_scale=torch.tensor([0.01], device=device))
    kwargs.update({name: poison_(tensor) for name, tensor in _QUANT_CACHE_OUTPUTS.allocate(kwargs).items()})
    return kwargs


ROTARY_EMBEDDING_FP8_QUANT_AND_CACHE = declare(
    "rotary_embedding_fp8_quant_and_cache",
    "(Tensor positions, Tensor query, Tensor! query_out, Tensor! key, Tensor value, Tensor! key_cache, "
    "Tensor! value_cache, Tensor slot_mapping, int head_size, Tensor cos_sin_cache, bool is_neox, "
    "str kv_cache_dtype, Tensor q_scale, Tensor k_scale, Tensor v_scale) -> ()",
    _prepare_rope_quant_cache, _reference_rope_quant_cache, _quant_cache_inputs, read_and_written=("key",),
    outputs=_QUANT_CACHE_OUTPUTS, family="kv_cache")

MLA_KV_LORA_RANK = 512
MLA_PE_DIM = 64


def _mla_inputs(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """DeepSeek-style MLA shapes: ``hidden // 64`` query heads (at least one) of rope dim 64, kv_lora_rank 512,
    block size 16."""
    generator = torch.Generator(device="cpu").manual_seed(tokens * 31 + hidden)
    angles = torch.rand(MAX_POSITIONS, MLA_PE_DIM // 2, generator=generator) * 6.3
    num_blocks = max(1, -(-tokens // BLOCK_SIZE)) + 1
    return {
        "positions": torch.randint(0, MAX_POSITIONS, (tokens,), generator=generator).to(device),
        "q_pe": torch.randn(tokens, max(1, hidden // MLA_PE_DIM), MLA_PE_DIM, generator=generator).to(
            dtype=dtype, device=device),
        "k_pe": torch.randn(tokens, MLA_PE_DIM, generator=generator).to(dtype=dtype, device=device),
        "kv_c": torch.randn(tokens, MLA_KV_LORA_RANK, generator=generator).to(dtype=dtype, device=device),
        "kv_cache": poisoned((num_blocks, BLOCK_SIZE, MLA_KV_LORA_RANK + MLA_PE_DIM), dtype, device),
        "slot_mapping": torch.randperm(num_blocks * BLOCK_SIZE, generator=generator)[:tokens].to(device),
        "cos_sin_cache": torch.cat([angles.cos(), angles.sin()], dim=-1).to(device),
        "is_neox": False, "kv_cache_dtype": "auto", "scale": torch.ones(1, device=device),
    }


CONCAT_AND_CACHE_MLA_ROPE = declare(
    "concat_and_cache_mla_rope",
    "(Tensor positions, Tensor! q_pe, Tensor! k_pe, Tensor kv_c, Tensor! kv_cache, Tensor slot_mapping, "
    "Tensor cos_sin_cache, bool is_neox, str kv_cache_dtype, Tensor scale) -> ()",
    _prepare_mla_rope, _reference_mla_rope, _mla_inputs, read_and_written=("q_pe", "k_pe"), family="kv_cache")


def _plain_mla_inputs(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    kwargs = _mla_inputs(tokens, hidden, dtype, device)
    return {name: kwargs[name] for name in ("kv_c", "k_pe", "kv_cache", "slot_mapping", "kv_cache_dtype", "scale")}


CONCAT_AND_CACHE_MLA = declare(
    "concat_and_cache_mla",
    "(Tensor kv_c, Tensor k_pe, Tensor! kv_cache, Tensor slot_mapping, str kv_cache_dtype, Tensor scale) -> ()",
    _prepare_mla, _reference_mla, _plain_mla_inputs, family="kv_cache")
