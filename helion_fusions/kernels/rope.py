"""Rotary position embedding (RoPE), and RoPE fused with the paged KV-cache write, from one Helion kernel.

For each token ``t`` at position ``p = positions[t]`` and each head, the first ``rot_dim``
dims of the head rotate in pairs ``(a, b)`` by the angle whose cosine and sine are
``cos_sin_cache[p, :rot_dim/2]`` and ``cos_sin_cache[p, rot_dim/2:]``:
``a' = a*cos - b*sin``, ``b' = b*cos + a*sin``, in fp32, rounded once on store. Neox style
pairs ``(i, i + rot_dim/2)``, GPT-J style ``(2i, 2i+1)``; dims past ``rot_dim`` are left
alone (partial rotary).

The host views every head's rotary part as ``[2, rot_dim/2]`` (``[pair member, i]``):
contiguous halves for neox, a stride-2 view for GPT-J, so one kernel body serves both.
One launch covers the key heads, then the query heads (two loops of one kernel). With a
cache, each key row (rotated) and value row also goes to its slot, with
``reshape_and_cache_flash`` semantics: ``[num_blocks, block_size, heads, head_size]``
caches addressed through their strides (HND storage works), a negative slot skips the
token (as does a slot past the cache: never an out-of-bounds write), and an fp8 cache
stores ``fp8(clamp(x / scale))`` with a per-tensor or per-head scale.

Contract notes (shared NUMERICS.md, RoPE family): the cache may be fp32 or the input
dtype; positions are int64. A position with no row in the cos/sin cache (negative, or past
its end) skips the token's rotation (cos 1, sin 0): nothing is read out of bounds, and the
rest of the op (norm, quant, cache write) goes on with the unrotated values. The rotation's
products are rounded on their own (``mul_rn``), as the eager composite rounds them, so the
rotated values match it bit for bit.
"""

from __future__ import annotations

import functools
from typing import Any

import helion
import helion.language as hl
import torch

from helion_fusions import checks
from helion_fusions.dispatch import fp8_dtype
from helion_fusions.kernels import quant
from helion_fusions.kernels.quant import div_rn, fp8_quantize, fp8_quantize_static
from helion_fusions.registry import KernelLaunch, OpSpec, Outputs, register

HEAD_SIZE = 128
KV_HEADS = 8
HIDDEN_GRID = (32 * HEAD_SIZE, 64 * HEAD_SIZE)  # query width: Llama-3-8B (32 heads), Qwen3-32B (64 heads)
TOKEN_GRID = (1, 16, 128, 1024, 8192)
MAX_POSITIONS = 8192


@helion.kernel(static_shapes=False, autotune_effort="none")
def rope_kernel(
    positions: torch.Tensor,  # [T] int64
    q: torch.Tensor,  # [T, HQ, 2, rot_dim / 2]: the rotary part of every query head, as pairs
    k: torch.Tensor,  # [T, HK, 2, rot_dim / 2] likewise for the key heads (q again when there is no key)
    cos_sin: torch.Tensor,  # [max_pos, 2, rot_dim / 2]: cos, then sin
    slots: torch.Tensor,  # [T] int64 cache slots (CACHE); a negative slot skips the token
    key_tail: torch.Tensor,  # [T, HK, head_size - rot_dim]: the key dims that do not rotate (TAIL)
    query_tail: torch.Tensor,  # [T, HQ, head_size - rot_dim] (TAIL and Q_QUANT)
    q_out: torch.Tensor,  # [T, HQ, 2, rot_dim / 2] fp8 (Q_QUANT): rotated q, quantized with q_scale
    q_out_tail: torch.Tensor,  # [T, HQ, head_size - rot_dim] fp8 (TAIL and Q_QUANT)
    k_out: torch.Tensor,  # likewise for k (K_QUANT), with k_scale
    k_out_tail: torch.Tensor,
    q_scale: torch.Tensor,  # [1] fp32 (Q_QUANT)
    q_weight: torch.Tensor,  # [2, rot_dim / 2]: the query norm weight's rotary dims, paired like the heads (NORM)
    q_weight_tail: torch.Tensor,  # [head_size - rot_dim] (TAIL and NORM)
    k_weight: torch.Tensor,
    k_weight_tail: torch.Tensor,
    query_heads: int,  # NORM: heads below this index of k are query heads (q_weight), the rest key heads
    eps: float,
    value: torch.Tensor,  # [T, HK, head_size_v] (CACHE)
    key_cache: torch.Tensor,  # the key cache's storage, flat (CACHE), addressed through ks0..ks3
    value_cache: torch.Tensor,  # the value cache's storage, flat, addressed through vs0..vs3
    k_scale: torch.Tensor,  # [1] or [HK] fp32 dequant scales of an fp8 cache
    v_scale: torch.Tensor,
    block_size: int,
    num_slots: int,
    ks0: int, ks1: int, ks2: int, ks3: int,  # key cache strides: block, slot in block, head, dim
    vs0: int, vs1: int, vs2: int, vs3: int,
    ROTATE: hl.constexpr,  # False: k's rows go to the cache as they are (MLA's plain concat_and_cache)
    HAS_QUERY: hl.constexpr,  # False when k holds every head to rotate (one head of q stands in)
    HAS_KEY: hl.constexpr,
    CACHE: hl.constexpr,
    TAIL: hl.constexpr,
    NEOX: hl.constexpr,
    FP8_CACHE: hl.constexpr,
    PER_HEAD_SCALE: hl.constexpr,
    FP8_MAX: hl.constexpr,
    NORM: hl.constexpr,
    Q_QUANT: hl.constexpr,
    K_QUANT: hl.constexpr,
) -> None:
    T = q.size(0)
    # head counts are model constants (one compile each anyway); specialized, a single head
    # is a size-1 dim in every tensor alike (symbolic in one and 1 in another, stores would drop its index)
    HQ, HK = hl.specialize(q.size(1)), hl.specialize(k.size(1))
    half = q.size(3)
    half = hl.specialize(half)
    tail = hl.specialize(key_tail.size(2))
    head_v = hl.specialize(value.size(2))
    width = 2 * half + tail if TAIL else 2 * half  # head_size, for the norm's mean
    for tile_t, tile_h in hl.tile([T, HK]):
        if HAS_KEY:
            norm = (key_tail, q_weight, q_weight_tail, k_weight, k_weight_tail, query_heads, eps, TAIL, width)
            quantized = (k_out, k_out_tail, key_tail, k_scale, TAIL, FP8_MAX)
            if ROTATE:
                a, b = rotate(positions, k, cos_sin, tile_t, tile_h, norm if NORM else None,
                              quantized if K_QUANT else None)
            else:
                a, b = k[tile_t, tile_h, 0, :], k[tile_t, tile_h, 1, :]
            if CACHE:
                slot = slots[tile_t]
                valid = (slot >= 0) & (slot < num_slots)  # negative: skipped; past the cache: skipped
                slot = torch.where(valid, slot, 0)
                k_row = (slot // block_size) * ks0 + (slot % block_size) * ks1
                v_row = (slot // block_size) * vs0 + (slot % block_size) * vs1
                i = hl.arange(half)
                first = i if NEOX else 2 * i
                second = i + half if NEOX else 2 * i + 1
                k_base = k_row[:, None, None] + tile_h.index[None, :, None] * ks2
                mask = valid[:, None, None]
                if PER_HEAD_SCALE:
                    ksc = k_scale[tile_h][None, :, None]
                    vsc = v_scale[tile_h][None, :, None]
                else:
                    ksc = k_scale[0]
                    vsc = v_scale[0]
                cache_store(key_cache, k_base + first[None, None, :] * ks3, a, mask, ksc, FP8_CACHE, FP8_MAX)
                cache_store(key_cache, k_base + second[None, None, :] * ks3, b, mask, ksc, FP8_CACHE, FP8_MAX)
                if TAIL:
                    rest = key_tail[tile_t, tile_h, :]  # normalized in place already, under NORM
                    dims = 2 * half + hl.arange(tail)
                    cache_store(key_cache, k_base + dims[None, None, :] * ks3, rest, mask, ksc, FP8_CACHE, FP8_MAX)
                v_base = v_row[:, None, None] + tile_h.index[None, :, None] * vs2
                v_offsets = v_base + hl.arange(head_v)[None, None, :] * vs3
                cache_store(value_cache, v_offsets, value[tile_t, tile_h, :], mask, vsc, FP8_CACHE, FP8_MAX)
    for tile_t, tile_h in hl.tile([T, HQ]):
        if HAS_QUERY:
            quantized = (q_out, q_out_tail, query_tail, q_scale, TAIL, FP8_MAX)
            rotate(positions, q, cos_sin, tile_t, tile_h, None, quantized if Q_QUANT else None)


def rotate(positions: torch.Tensor, x: torch.Tensor, cos_sin: torch.Tensor, tile_t: Any, tile_h: Any,
           norm: tuple[Any, ...] | None, quantized: tuple[Any, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate rows ``tile_t`` of heads ``tile_h`` of ``x`` in place (a kernel helper); returns the rotated pairs.

    A row whose position has no cos/sin row is not rotated (cos 1, sin 0): nothing is read out of bounds.

    ``norm`` = (tail, query weight pairs and tail, key weight pairs and tail, query_heads, eps, TAIL,
    head_size): RMS-normalize each head first, in fp32 with the rotation (one rounding), the dims that
    do not rotate included; heads below ``query_heads`` take the query weight.
    ``quantized`` = (out pairs, out tail, input tail, scale, TAIL, fp8_max): leave ``x`` alone and write
    the rotated values (rounded to the input dtype, as the unfused rope leaves them) as static fp8, the
    dims that do not rotate too.
    """
    position = hl.load(positions, [tile_t])
    in_range = (position >= 0) & (position < cos_sin.size(0))
    position = torch.where(in_range, position, 0)
    cos = torch.where(in_range.unsqueeze(1), hl.load(cos_sin, [position, 0, slice(None)]).to(torch.float32), 1.0)
    sin = torch.where(in_range.unsqueeze(1), hl.load(cos_sin, [position, 1, slice(None)]).to(torch.float32), 0.0)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    a = hl.load(x, [tile_t, tile_h, 0, slice(None)]).to(torch.float32)
    b = hl.load(x, [tile_t, tile_h, 1, slice(None)]).to(torch.float32)
    if norm is not None:
        tail, q_weight, q_weight_tail, k_weight, k_weight_tail, query_heads, eps, has_tail, width = norm
        is_query = (tile_h.index < query_heads).unsqueeze(-1)  # [heads, 1]
        sum_sq = sum_of_squares(a) + sum_of_squares(b)
        if has_tail:
            rest = hl.load(tail, [tile_t, tile_h, slice(None)]).to(torch.float32)
            sum_sq = sum_sq + sum_of_squares(rest)
        sum_sq = sum_sq.to(torch.float32)
        rstd = torch.rsqrt(div_rn(sum_sq, width) + eps).unsqueeze(-1)
        for pair, column in ((0, a), (1, b)):
            weight = torch.where(is_query, hl.load(q_weight, [pair, slice(None)]).to(torch.float32),
                                 hl.load(k_weight, [pair, slice(None)]).to(torch.float32))
            if pair == 0:
                a = column * rstd * weight
            else:
                b = column * rstd * weight
        if has_tail:
            weight = torch.where(is_query, hl.load(q_weight_tail, [slice(None)]).to(torch.float32),
                                 hl.load(k_weight_tail, [slice(None)]).to(torch.float32))
            rest = rest * rstd * weight
            hl.store(tail, [tile_t, tile_h, slice(None)], rest.to(tail.dtype))
    rotated_a = (mul_rn(a, cos) - mul_rn(b, sin)).to(x.dtype)
    rotated_b = (mul_rn(b, cos) + mul_rn(a, sin)).to(x.dtype)
    if quantized is None:
        hl.store(x, [tile_t, tile_h, 0, slice(None)], rotated_a)
        hl.store(x, [tile_t, tile_h, 1, slice(None)], rotated_b)
        return rotated_a, rotated_b
    out, out_tail, in_tail, scale, has_tail, fp8_max = quantized
    scale_value = hl.load(scale, [0])
    for pair, value in ((0, rotated_a), (1, rotated_b)):
        hl.store(out, [tile_t, tile_h, pair, slice(None)],
                 fp8_quantize_static(value.to(torch.float32), scale_value, fp8_max, out.dtype))
    if has_tail:
        rest = hl.load(in_tail, [tile_t, tile_h, slice(None)]).to(torch.float32)
        hl.store(out_tail, [tile_t, tile_h, slice(None)],
                 fp8_quantize_static(rest, scale_value, fp8_max, out_tail.dtype))
    return rotated_a, rotated_b


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x**2`` over the last dim in fp64 (kernel and reference alike).

    fp32 squares are exact in fp64 and a head's sum is all but exact, so the fp32 it rounds to
    does not depend on the order of the sum: the GPU's reduction tree, the kernel's and the CPU's
    agree. An fp32 sum in another order moves rstd by an ulp, which a cancelling rotation turns
    into a larger difference.
    """
    wide = x.to(torch.float64)
    return torch.sum(wide * wide, dim=-1)


def mul_rn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """An fp32 product rounded on its own (``x`` carries the result's shape).

    The compiler would otherwise contract ``a*cos - b*sin`` into a fused multiply-add, which
    rounds once where the eager composite rounds the products first: the result could land on
    the other side of a rounding tie of the input dtype.
    """
    if not quant._compiling_to_triton():  # noqa: SLF001 (shared with the quant helpers)
        return x * y
    return hl.inline_triton("libdevice.mul_rn({0}, {1})", args=(x, y), output_like=x)


def cache_store(cache: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                scale: torch.Tensor, FP8_CACHE: bool, FP8_MAX: float) -> None:
    """Store ``values`` at flat ``offsets`` of a cache where ``mask`` holds: a copy, or ``fp8(clamp(x / scale))``."""
    if FP8_CACHE:
        values = fp8_quantize(values.to(torch.float32), scale, FP8_MAX, cache.dtype)
    hl.store(cache, [offsets], values.to(cache.dtype), extra_mask=mask)


# --- reference ------------------------------------------------------------------------------

def rotate_reference(positions: torch.Tensor, pairs: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Rotate ``pairs`` ([T, H, 2, rot_dim/2] view) in place, as the eager composite does.

    A token whose position has no row in ``cos_sin_cache`` is not rotated (cos 1, sin 0).
    """
    in_range = (positions >= 0) & (positions < cos_sin_cache.shape[0])
    positions = torch.where(in_range, positions, 0)
    half, keep = pairs.shape[-1], in_range[:, None, None]
    cos = torch.where(keep, cos_sin_cache[positions, :half].float()[:, None, :], 1.0)
    sin = torch.where(keep, cos_sin_cache[positions, half:].float()[:, None, :], 0.0)
    a, b = pairs[:, :, 0, :].float(), pairs[:, :, 1, :].float()
    rotated_a, rotated_b = a * cos - b * sin, b * cos + a * sin  # both before either store: a, b may alias pairs
    pairs[:, :, 0, :] = rotated_a.to(pairs.dtype)
    pairs[:, :, 1, :] = rotated_b.to(pairs.dtype)


# --- host glue ------------------------------------------------------------------------------

def _heads(name: str, value: Any, tokens: int, head_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[T, H * head_size]`` or ``[T, H, head_size]`` as a ``[T, H, head_size]`` view."""
    checks.check_tensor(name, value, dtypes=(dtype,), device=device, last_dim_contiguous=True)
    if value.dim() == 3 and value.shape[0] == tokens and value.shape[2] == head_size:
        return value
    if value.dim() == 2 and value.shape[0] == tokens and value.shape[1] % head_size == 0:
        return value.view(tokens, value.shape[1] // head_size, head_size)
    raise ValueError(f"{name}: expected [{tokens}, num_heads * {head_size}] or [{tokens}, num_heads, {head_size}], "
                     f"got shape {list(value.shape)}")


def _pairs(heads: torch.Tensor, rot_dim: int, is_neox: bool, offset: int = 0) -> torch.Tensor:
    """The rotary dims of every head (``offset`` on) as [T, H, 2, rot_dim/2]: (i, i + rot_dim/2) or (2i, 2i+1)."""
    # view/transpose, not unflatten: this runs on every call, and unflatten is a Python-level wrapper
    rotary = heads[..., offset:offset + rot_dim]
    *lead, _ = rotary.shape
    if is_neox:
        return rotary.view(*lead, 2, rot_dim // 2)
    return rotary.view(*lead, rot_dim // 2, 2).transpose(-1, -2)


def _check_rope(positions: Any, query: Any, key: Any, head_size: Any, cos_sin_cache: Any,
                positions_name: str = "positions") -> tuple[Any, ...]:
    checks.check_tensor("query", query, dtypes=checks.FLOAT_ACTIVATIONS, last_dim_contiguous=True)
    if query.dim() not in (2, 3):
        raise ValueError(f"query: expected [num_tokens, num_heads * head_size] or [num_tokens, num_heads, head_size], "
                         f"got shape {list(query.shape)}")
    tokens, device, dtype = query.shape[0], query.device, query.dtype
    checks.check_tensor(positions_name, positions, dtypes=(torch.int64,), shape=(tokens,), device=device)
    if isinstance(head_size, bool) or not isinstance(head_size, int) or head_size <= 0:
        raise ValueError(f"head_size: expected a positive int, got {head_size!r}")
    q = _heads("query", query, tokens, head_size, dtype, device)
    k = None if key is None else _heads("key", key, tokens, head_size, dtype, device)
    checks.check_tensor("cos_sin_cache", cos_sin_cache, dtypes=(torch.float32, dtype), device=device,
                        contiguous=True)
    if cos_sin_cache.dim() != 2:
        raise ValueError(f"cos_sin_cache: expected [max_position, rot_dim], got shape {list(cos_sin_cache.shape)}")
    rot_dim = cos_sin_cache.shape[1]
    if rot_dim % 2 or not 0 < rot_dim <= head_size:
        raise ValueError(f"cos_sin_cache: rot_dim (its last dim) must be even and at most head_size {head_size}, "
                         f"got {rot_dim}")
    return tokens, rot_dim, q, k


def _flat(cache: torch.Tensor) -> torch.Tensor:
    """The elements a cache view spans, as a flat view of its storage (the kernel adds the strides itself)."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(cache.shape, cache.stride()))
    return cache.as_strided((span,), (1,), cache.storage_offset())


def _weight_pairs(weight: torch.Tensor, rot_dim: int, is_neox: bool) -> torch.Tensor:
    """A norm weight's rotary dims as [2, rot_dim/2], paired like the heads."""
    return _pairs(weight.view(1, 1, -1), rot_dim, is_neox)[0, 0]


def _launch(positions, q, k, cos_sin_cache, rot_dim, is_neox, cache=None, norm=None, hidden=None,
            query=True, quant=None, rotate=True, offset=0) -> tuple[KernelLaunch, ...]:
    """One launch: the key heads (normalized, rotated, written to the cache, as asked), then the query heads."""
    tokens = q.shape[0]
    if tokens == 0:
        return ()
    head_size = q.shape[2]
    has_tail = rot_dim < head_size
    cos_sin = cos_sin_cache.view(cos_sin_cache.shape[0], 2, rot_dim // 2)
    q_pairs = _pairs(q, rot_dim, is_neox, offset)  # a nonzero offset comes only with in-place rope
    k_pairs = q_pairs if k is None else _pairs(k, rot_dim, is_neox, offset)
    spare = q[:]  # stands in for unused [T, H, D] arguments (a view: an argument may not be another's base)
    key_tail = k[:, :, rot_dim:] if has_tail and k is not None else spare
    query_tail = q[:, :, rot_dim:] if has_tail else spare
    if quant is None:
        quant_args = (spare, q_pairs, spare, q_pairs, spare, positions)  # never read without Q_QUANT / K_QUANT
        q_quant = k_quant = False
    else:  # (q_out heads, k_out heads or None, q_scale, k_scale or None, fp8_max)
        q_out, k_out, q_scale, k_scale_out, fp8_max_out = quant
        q_quant, k_quant = True, k_out is not None
        k_out = k_out if k_quant else q_out
        quant_args = (query_tail, _pairs(q_out, rot_dim, is_neox), q_out[:, :, rot_dim:] if has_tail else q_out,
                      _pairs(k_out, rot_dim, is_neox), k_out[:, :, rot_dim:] if has_tail else k_out, q_scale)
    if norm is None:
        norm_args = (positions,) * 4 + (0, 0.0)  # never read without NORM
    else:
        q_weight, k_weight, query_heads, eps = norm
        norm_args = (_weight_pairs(q_weight, rot_dim, is_neox), q_weight[rot_dim:] if has_tail else q_weight,
                     _weight_pairs(k_weight, rot_dim, is_neox), k_weight[rot_dim:] if has_tail else k_weight,
                     query_heads, float(eps))
    quant_fp8_max = 0.0 if quant is None else quant[4]
    if cache is None:
        k_scale = quant[3] if quant is not None and quant[3] is not None else positions
        cache_args = (positions, spare, positions, positions, k_scale, positions, 1, 0, *(0,) * 8)  # never read
        has_cache, fp8_cache, per_head, fp8_max = False, False, False, quant_fp8_max
    else:
        slots, value, key_cache, value_cache, k_scale, v_scale, cache_fp8_max = cache
        num_blocks, block_size = key_cache.shape[:2]
        cache_args = (slots, value, _flat(key_cache), _flat(value_cache), k_scale, v_scale, block_size,
                      num_blocks * block_size, *key_cache.stride(), *value_cache.stride())
        # one fp8 flavour per device: a quantized query and an fp8 cache share the bound
        has_cache, fp8_cache, per_head = True, cache_fp8_max > 0, k_scale.numel() > 1
        fp8_max = max(cache_fp8_max, quant_fp8_max)
    flags = (rotate, query, k is not None, has_cache, has_tail, is_neox, fp8_cache, per_head, fp8_max, norm is not None,
             q_quant, k_quant)
    args = (positions, q_pairs, k_pairs, cos_sin, cache_args[0], key_tail, *quant_args, *norm_args, *cache_args[1:],
            *flags)
    key = (q.dtype, cos_sin_cache.dtype, q.shape[1], k_pairs.shape[1], head_size, rot_dim,
           None if cache is None else (cache[2].dtype, cache[1].shape[2]), *flags)
    hidden = q.shape[1] * head_size if hidden is None else hidden  # the query width picks the config
    return (KernelLaunch(rope_kernel, args, key, tokens, hidden, q.device, q.dtype),)


def _check_offset(rope_dim_offset: Any, rot_dim: int, head_size: int) -> int:
    if isinstance(rope_dim_offset, bool) or not isinstance(rope_dim_offset, int) or not (
            0 <= rope_dim_offset <= head_size - rot_dim):
        raise ValueError(f"rope_dim_offset: expected an int in [0, head_size - rot_dim] = [0, {head_size - rot_dim}], "
                         f"got {rope_dim_offset!r}")
    return rope_dim_offset


def _prepare_rotary(positions, query, key, head_size, cos_sin_cache, is_neox, rope_dim_offset=0):
    tokens, rot_dim, q, k = _check_rope(positions, query, key, head_size, cos_sin_cache)
    offset = _check_offset(rope_dim_offset, rot_dim, head_size)
    return _launch(positions, q, k, cos_sin_cache, rot_dim, bool(is_neox), offset=offset)


def _reference_rotary(positions, query, key, head_size, cos_sin_cache, is_neox, rope_dim_offset=0):
    tokens, rot_dim, q, k = _check_rope(positions, query, key, head_size, cos_sin_cache)
    offset = _check_offset(rope_dim_offset, rot_dim, head_size)
    for heads in (q, k):
        if heads is not None:
            rotate_reference(positions, _pairs(heads, rot_dim, bool(is_neox), offset), cos_sin_cache)


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
    v = _heads("value", value, tokens, value_head_size or k.shape[2], k.dtype, k.device)
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
    tokens, rot_dim, q, k = _check_rope(positions, query, key, head_size, cos_sin_cache)
    v, key_cache, value_cache, fp8_max = _check_kv(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                                                   k_scale, v_scale, k, tokens)
    cache = (slot_mapping, v, key_cache, value_cache, k_scale.reshape(-1), v_scale.reshape(-1), fp8_max)
    return _launch(positions, q, k, cos_sin_cache, rot_dim, bool(is_neox), cache)


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
        values = fp8_quantize(values.float(), scale, fp8_max, cache.dtype)
    values = values.to(cache.dtype)
    first = torch.argmax(keep.to(torch.int32)).reshape(1)  # the first kept row, or 0 when none is
    any_kept = keep.any()
    slots = torch.where(keep, slot_mapping, torch.where(any_kept, slot_mapping.index_select(0, first), 0))
    values = torch.where(keep[:, None, None], values,
                         torch.where(any_kept, values.index_select(0, first), cache[0, 0]))
    cache[slots // block_size, slots % block_size] = values


def _reference_rope_cache(positions, query, key, value, key_cache, value_cache, slot_mapping, head_size,
                          cos_sin_cache, is_neox, kv_cache_dtype, k_scale, v_scale):
    tokens, rot_dim, q, k = _check_rope(positions, query, key, head_size, cos_sin_cache)
    v, key_cache, value_cache, fp8_max = _check_kv(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                                                   k_scale, v_scale, k, tokens)
    _reference_rotary(positions, query, key, head_size, cos_sin_cache, is_neox)
    write_cache_reference(k, key_cache, slot_mapping, k_scale, fp8_max)
    write_cache_reference(v, value_cache, slot_mapping, v_scale, fp8_max)


def _check_qkv(qkv, num_heads_q, num_heads_k, num_heads_v, head_dim, eps, q_weight, k_weight, cos_sin_cache,
               position_ids):
    checks.check_input_2d("qkv", qkv)
    for name, value in (("num_heads_q", num_heads_q), ("num_heads_k", num_heads_k), ("num_heads_v", num_heads_v),
                        ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "num_heads_v" else 1):
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    width = (num_heads_q + num_heads_k + num_heads_v) * head_dim
    if qkv.shape[1] != width:
        raise ValueError(f"qkv: expected [num_tokens, (num_heads_q + num_heads_k + num_heads_v) * head_dim] = "
                         f"[{qkv.shape[0]}, {width}], got shape {list(qkv.shape)}")
    checks.check_positive_float("eps", eps)
    for name, weight in (("q_weight", q_weight), ("k_weight", k_weight)):
        checks.check_tensor(name, weight, dtypes=(qkv.dtype, torch.float32), shape=(head_dim,), device=qkv.device,
                            contiguous=True)
    q = qkv[:, :num_heads_q * head_dim]
    k = qkv[:, num_heads_q * head_dim:(num_heads_q + num_heads_k) * head_dim]
    return _check_rope(position_ids, q, k, head_dim, cos_sin_cache, positions_name="position_ids")


def _prepare_qk_norm_rope(qkv, num_heads_q, num_heads_k, num_heads_v, head_dim, eps, q_weight, k_weight,
                          cos_sin_cache, is_neox, position_ids):
    tokens, rot_dim, q, k = _check_qkv(qkv, num_heads_q, num_heads_k, num_heads_v, head_dim, eps, q_weight,
                                       k_weight, cos_sin_cache, position_ids)
    # q and k are neighbours in qkv: one loop over all their heads (the query loop is switched off),
    # since two loops writing views of one tensor would have to be ordered
    heads = qkv[:, :(num_heads_q + num_heads_k) * head_dim].view(tokens, num_heads_q + num_heads_k, head_dim)
    return _launch(position_ids, q[:, :1], heads, cos_sin_cache, rot_dim, bool(is_neox),
                   norm=(q_weight, k_weight, num_heads_q, eps), hidden=num_heads_q * head_dim, query=False)


def _reference_qk_norm_rope(qkv, num_heads_q, num_heads_k, num_heads_v, head_dim, eps, q_weight, k_weight,
                            cos_sin_cache, is_neox, position_ids):
    tokens, rot_dim, q, k = _check_qkv(qkv, num_heads_q, num_heads_k, num_heads_v, head_dim, eps, q_weight,
                                       k_weight, cos_sin_cache, position_ids)
    for heads, weight in ((q, q_weight), (k, k_weight)):
        x = heads.float()
        sum_sq = sum_of_squares(x).to(torch.float32)  # the kernel sums in pieces: in fp64 the order does not matter
        rstd = torch.rsqrt(div_rn(sum_sq, head_dim) + eps).unsqueeze(-1)
        y = x * rstd * weight.float()  # fp32 throughout: one rounding, after the rotation
        rotate_reference(position_ids, _pairs(y, rot_dim, bool(is_neox)), cos_sin_cache)
        heads.copy_(y.to(heads.dtype))


def _check_quant_outputs(query_out, key_out, q_scale, k_scale, q, k):
    fp8 = query_out.dtype if isinstance(query_out, torch.Tensor) else None
    q_out = _heads("query_out", query_out, q.shape[0], q.shape[2], fp8 if fp8 in checks.FP8_DTYPES
                   else checks.FP8_DTYPES[0], q.device)
    if q_out.shape[1] != q.shape[1]:
        raise ValueError(f"query_out: expected {q.shape[1]} heads like query, got {q_out.shape[1]}")
    checks.check_scalar_scale("q_scale", q_scale, q.device)
    k_out = None
    if k is not None:
        if key_out is None or k_scale is None:
            raise ValueError("key_out: a key needs key_out and k_scale")
        k_out = _heads("key_out", key_out, q.shape[0], q.shape[2], q_out.dtype, q.device)
        if k_out.shape[1] != k.shape[1]:
            raise ValueError(f"key_out: expected {k.shape[1]} heads like key, got {k_out.shape[1]}")
        checks.check_scalar_scale("k_scale", k_scale, q.device)
    return q_out, k_out, quant.fp8_max_for(q_out.dtype)


def _prepare_rope_quant(positions, query, key, query_out, key_out, head_size, cos_sin_cache, is_neox, q_scale,
                        k_scale=None):
    tokens, rot_dim, q, k = _check_rope(positions, query, key, head_size, cos_sin_cache)
    q_out, k_out, fp8_max = _check_quant_outputs(query_out, key_out, q_scale, k_scale, q, k)
    return _launch(positions, q, k, cos_sin_cache, rot_dim, bool(is_neox),
                   quant=(q_out, k_out, q_scale, k_scale, fp8_max))


def _reference_rope_quant(positions, query, key, query_out, key_out, head_size, cos_sin_cache, is_neox, q_scale,
                          k_scale=None):
    """The unfused composite: rope (rounded to the input dtype), then static fp8 quant; inputs unchanged."""
    tokens, rot_dim, q, k = _check_rope(positions, query, key, head_size, cos_sin_cache)
    q_out, k_out, _ = _check_quant_outputs(query_out, key_out, q_scale, k_scale, q, k)
    for heads, out, scale in ((q, q_out, q_scale), (k, k_out, k_scale)):
        if heads is not None:
            rotated = heads.clone()
            rotate_reference(positions, _pairs(rotated, rot_dim, bool(is_neox)), cos_sin_cache)
            quant.quantize_static_reference(rotated.flatten(1), scale, out.flatten(1))


def _prepare_rope_quant_cache(positions, query, query_out, key, value, key_cache, value_cache, slot_mapping,
                              head_size, cos_sin_cache, is_neox, kv_cache_dtype, q_scale, k_scale, v_scale):
    tokens, rot_dim, q, k = _check_rope(positions, query, key, head_size, cos_sin_cache)
    q_out, _, q_fp8_max = _check_quant_outputs(query_out, None, q_scale, None, q, None)
    v, key_cache, value_cache, fp8_max = _check_kv(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                                                   k_scale, v_scale, k, tokens)
    cache = (slot_mapping, v, key_cache, value_cache, k_scale.reshape(-1), v_scale.reshape(-1), fp8_max)
    return _launch(positions, q, k, cos_sin_cache, rot_dim, bool(is_neox), cache,
                   quant=(q_out, None, q_scale, None, q_fp8_max))


def _reference_rope_quant_cache(positions, query, query_out, key, value, key_cache, value_cache, slot_mapping,
                                head_size, cos_sin_cache, is_neox, kv_cache_dtype, q_scale, k_scale, v_scale):
    """The unfused composite: rope + static fp8 quant of the query, then rope + cache write of the key."""
    _reference_rope_quant(positions, query, None, query_out, None, head_size, cos_sin_cache, is_neox, q_scale)
    tokens, rot_dim, q, k = _check_rope(positions, query, key, head_size, cos_sin_cache)
    v, key_cache, value_cache, fp8_max = _check_kv(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype,
                                                   k_scale, v_scale, k, tokens)
    rotate_reference(positions, _pairs(k, rot_dim, bool(is_neox)), cos_sin_cache)
    write_cache_reference(k, key_cache, slot_mapping, k_scale, fp8_max)
    write_cache_reference(v, value_cache, slot_mapping, v_scale, fp8_max)


def _check_mla(positions, q_pe, k_pe, kv_c, kv_cache, slot_mapping, cos_sin_cache, kv_cache_dtype, scale,
               positions_name="positions"):
    """MLA: q_pe [T, H, pe] (or [T, H * pe]), k_pe [T, pe], kv_c [T, rank], kv_cache [blocks, block, rank + pe]."""
    checks.check_tensor("k_pe", k_pe, dtypes=checks.FLOAT_ACTIVATIONS, last_dim_contiguous=True)
    pe_dim = k_pe.shape[-1]
    tokens, rot_dim, q, k = _check_rope(positions, q_pe, k_pe, pe_dim, cos_sin_cache, positions_name)
    if k.shape[1] != 1:
        raise ValueError(f"k_pe: expected [{tokens}, {pe_dim}] (one shared head), got shape {list(k_pe.shape)}")
    checks.check_input_2d("kv_c", kv_c)
    checks.check_tensor("kv_c", kv_c, dtypes=(q.dtype,), device=q.device)
    if kv_c.shape[0] != tokens:
        raise ValueError(f"kv_c: expected [{tokens}, kv_lora_rank], got shape {list(kv_c.shape)}")
    rank = kv_c.shape[1]
    if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 3 or kv_cache.shape[2] != rank + pe_dim:
        shape = list(kv_cache.shape) if isinstance(kv_cache, torch.Tensor) else type(kv_cache).__name__
        raise ValueError(f"kv_cache: expected [num_blocks, block_size, {rank} + {pe_dim}], got {shape}")
    v, pe_cache, c_cache, fp8_max = _check_kv(k_pe, kv_c.view(tokens, 1, rank), kv_cache[..., rank:].unsqueeze(2),
                                              kv_cache[..., :rank].unsqueeze(2), slot_mapping, kv_cache_dtype, scale,
                                              scale, k, tokens, value_head_size=rank)
    return tokens, rot_dim, q, k, v, pe_cache, c_cache, fp8_max


def _prepare_mla_rope(positions, q_pe, k_pe, kv_c, kv_cache, slot_mapping, cos_sin_cache, is_neox, kv_cache_dtype,
                      scale):
    tokens, rot_dim, q, k, v, pe_cache, c_cache, fp8_max = _check_mla(
        positions, q_pe, k_pe, kv_c, kv_cache, slot_mapping, cos_sin_cache, kv_cache_dtype, scale)
    cache = (slot_mapping, v, pe_cache, c_cache, scale.reshape(-1), scale.reshape(-1), fp8_max)
    return _launch(positions, q, k, cos_sin_cache, rot_dim, bool(is_neox), cache)


def _reference_mla_rope(positions, q_pe, k_pe, kv_c, kv_cache, slot_mapping, cos_sin_cache, is_neox, kv_cache_dtype,
                        scale):
    tokens, rot_dim, q, k, v, pe_cache, c_cache, fp8_max = _check_mla(
        positions, q_pe, k_pe, kv_c, kv_cache, slot_mapping, cos_sin_cache, kv_cache_dtype, scale)
    for heads in (q, k):
        rotate_reference(positions, _pairs(heads, rot_dim, bool(is_neox)), cos_sin_cache)
    write_cache_reference(k, pe_cache, slot_mapping, scale, fp8_max)
    write_cache_reference(v, c_cache, slot_mapping, scale, fp8_max)


def _prepare_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale):
    """vLLM's ``concat_and_cache_mla``: the rope-fused path with the rotation switched off."""
    # slot_mapping stands in for positions, and a cached identity table for cos/sin: nothing reads them
    tokens, rot_dim, q, k, v, pe_cache, c_cache, fp8_max = _check_mla(
        slot_mapping, k_pe, k_pe, kv_c, kv_cache, slot_mapping, _no_rotation(k_pe), kv_cache_dtype, scale,
        positions_name="slot_mapping")
    cache = (slot_mapping, v, pe_cache, c_cache, scale.reshape(-1), scale.reshape(-1), fp8_max)
    return _launch(slot_mapping, k[:, :1], k, _no_rotation(k_pe), rot_dim, True, cache, query=False, rotate=False)


def _no_rotation(k_pe: Any) -> torch.Tensor:
    """A one-row cos/sin table of k_pe's width on its device, made once (the checks want one)."""
    if not isinstance(k_pe, torch.Tensor) or k_pe.dim() == 0:
        return torch.ones(1, 2)
    return _identity_table(2 * max(k_pe.shape[-1] // 2, 1), k_pe.device)


@functools.cache
def _identity_table(width: int, device: torch.device) -> torch.Tensor:
    return torch.cat([torch.ones(1, width // 2), torch.zeros(1, width // 2)], dim=-1).to(device)


def _reference_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale):
    tokens, rot_dim, q, k, v, pe_cache, c_cache, fp8_max = _check_mla(
        slot_mapping, k_pe, k_pe, kv_c, kv_cache, slot_mapping, _no_rotation(k_pe), kv_cache_dtype, scale,
        positions_name="slot_mapping")
    write_cache_reference(k, pe_cache, slot_mapping, scale, fp8_max)
    write_cache_reference(v, c_cache, slot_mapping, scale, fp8_max)


# --- tuning grid, seeds and bench inputs -----------------------------------------------------

def _blocks(tokens: int, heads: int) -> list[int]:
    """Block sizes of both loops (key heads, then query heads): ``tokens`` rows by ``heads`` heads."""
    return [tokens, heads, tokens, heads]


def default_config(hidden: int) -> helion.Config:
    return helion.Config(block_sizes=_blocks(1, 8), num_warps=4)


def seed_configs(hidden: int, tokens: int) -> list[helion.Config]:
    """A token's heads per program (4-8 heads of 128 dims); two tokens a program at prefill sizes."""
    seeds = [helion.Config(block_sizes=_blocks(1, h), num_warps=w) for h in (4, 8) for w in (2, 4)]
    if tokens >= 128:
        seeds.append(helion.Config(block_sizes=_blocks(2, 8), num_warps=4))
    return seeds


def search_configs(hidden: int, tokens: int) -> list[helion.Config]:
    """Smaller programs for decode (more of them), larger ones for prefill."""
    if tokens <= 16:
        return [helion.Config(block_sizes=_blocks(1, h), num_warps=w) for h, w in ((1, 1), (2, 1), (2, 2), (16, 4))]
    return [helion.Config(block_sizes=_blocks(t, h), num_warps=w)
            for t, h, w in ((1, 16, 4), (2, 16, 8), (4, 8, 8), (1, 32, 8), (4, 16, 8))]


def _inputs(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    generator = torch.Generator(device="cpu").manual_seed(tokens * 7919 + hidden)
    head_size = HEAD_SIZE if hidden % HEAD_SIZE == 0 else hidden
    angles = torch.rand(MAX_POSITIONS, head_size // 2, generator=generator) * 6.3
    return {
        "positions": torch.randint(0, MAX_POSITIONS, (tokens,), generator=generator).to(device),
        "query": torch.randn(tokens, hidden, generator=generator).to(dtype=dtype, device=device),
        "key": torch.randn(tokens, KV_HEADS * head_size, generator=generator).to(dtype=dtype, device=device),
        "head_size": head_size,
        "cos_sin_cache": torch.cat([angles.cos(), angles.sin()], dim=-1).to(device),
        "is_neox": True,
    }


def _touched(kwargs: dict[str, Any]) -> dict[str, int]:
    """Elements the op touches of its tables: one cos/sin row per token, one cache slot per token, and of
    a packed qkv only the query and key heads."""
    tokens = next(kwargs[name].numel() for name in ("positions", "position_ids", "slot_mapping") if name in kwargs)
    touched = {}
    for name, leading in (("cos_sin_cache", 1), ("key_cache", 2), ("value_cache", 2), ("kv_cache", 2)):
        if isinstance(kwargs.get(name), torch.Tensor):
            table = kwargs[name]
            touched[name] = min(table.numel(), tokens * table[(0,) * leading].numel())
    if "qkv" in kwargs:
        touched["qkv"] = tokens * (kwargs["num_heads_q"] + kwargs["num_heads_k"]) * kwargs["head_dim"]
    return touched


def _fp8_like(**sources: str) -> Outputs:
    """Outputs shaped like the named inputs, in the device's fp8 dtype (None where the input is None)."""
    def allocate(kwargs: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        allocated: dict[str, torch.Tensor | None] = {}
        for name, source in sources.items():
            value = kwargs[source]
            if value is not None:
                checks.check_tensor(source, value, dtypes=checks.FLOAT_ACTIVATIONS)
            allocated[name] = None if value is None else torch.empty(
                value.shape, dtype=fp8_dtype(value.device), device=value.device)
        return allocated
    return Outputs(tuple(sources), allocate)


def _declare(name: str, schema: str, prepare, reference, make_inputs, read_and_written: tuple[str, ...] = (),
             outputs: Outputs | None = None) -> OpSpec:
    return register(OpSpec(
        name=name, schema=schema, family="rope", kernel=rope_kernel, prepare=prepare, reference=reference,
        make_inputs=make_inputs, default_config=default_config, seed_configs=seed_configs,
        search_configs=search_configs, hidden_sizes=HIDDEN_GRID, token_counts=TOKEN_GRID,
        read_and_written=read_and_written, touched_elements=_touched, outputs=outputs,
    ))


BLOCK_SIZE = 16


def _cache_inputs(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """Rope inputs plus a poisoned paged cache of block size 16 with room for every token, slots shuffled."""
    from helion_fusions.testing import poisoned

    kwargs = _inputs(tokens, hidden, dtype, device)
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


ROTARY_EMBEDDING = _declare(
    "rotary_embedding",
    "(Tensor positions, Tensor! query, Tensor!? key, int head_size, Tensor cos_sin_cache, bool is_neox, "
    "int rope_dim_offset=0) -> ()",
    _prepare_rotary, _reference_rotary, _inputs, read_and_written=("query", "key"))

ROTARY_EMBEDDING_AND_CACHE = _declare(
    "rotary_embedding_and_cache",
    "(Tensor positions, Tensor! query, Tensor! key, Tensor value, Tensor! key_cache, Tensor! value_cache, "
    "Tensor slot_mapping, int head_size, Tensor cos_sin_cache, bool is_neox, str kv_cache_dtype, "
    "Tensor k_scale, Tensor v_scale) -> ()",
    _prepare_rope_cache, _reference_rope_cache, _cache_inputs, read_and_written=("query", "key"))


def _qkv_inputs(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """Packed [q | k | v] with the grid's query width, 8 kv heads, and random norm weights."""
    base = _inputs(tokens, hidden, dtype, device)
    head_size = base["head_size"]
    generator = torch.Generator(device="cpu").manual_seed(tokens + hidden)
    heads_q = hidden // head_size
    qkv = torch.randn(tokens, (heads_q + 2 * KV_HEADS) * head_size, generator=generator)
    weights = [(1.0 + 0.5 * torch.randn(head_size, generator=generator)).to(dtype=dtype, device=device)
               for _ in range(2)]
    return {"qkv": qkv.to(dtype=dtype, device=device), "num_heads_q": heads_q, "num_heads_k": KV_HEADS,
            "num_heads_v": KV_HEADS, "head_dim": head_size, "eps": 1e-6, "q_weight": weights[0],
            "k_weight": weights[1], "cos_sin_cache": base["cos_sin_cache"], "is_neox": True,
            "position_ids": base["positions"]}


FUSED_QK_NORM_ROPE = _declare(
    "fused_qk_norm_rope",
    "(Tensor! qkv, int num_heads_q, int num_heads_k, int num_heads_v, int head_dim, float eps, "
    "Tensor q_weight, Tensor k_weight, Tensor cos_sin_cache, bool is_neox, Tensor position_ids) -> ()",
    _prepare_qk_norm_rope, _reference_qk_norm_rope, _qkv_inputs, read_and_written=("qkv",))


_QUANT_OUTPUTS = _fp8_like(query_out="query", key_out="key")


def _quant_inputs(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    from helion_fusions.testing import poison_

    kwargs = _inputs(tokens, hidden, dtype, device)
    kwargs.update(q_scale=torch.tensor([0.01], device=device), k_scale=torch.tensor([0.02], device=device))
    kwargs.update({name: poison_(tensor) for name, tensor in _QUANT_OUTPUTS.allocate(kwargs).items()})
    return kwargs


ROTARY_EMBEDDING_STATIC_FP8_QUANT = _declare(
    "rotary_embedding_static_fp8_quant",
    "(Tensor positions, Tensor query, Tensor? key, Tensor! query_out, Tensor!? key_out, int head_size, "
    "Tensor cos_sin_cache, bool is_neox, Tensor q_scale, Tensor? k_scale=None) -> ()",
    _prepare_rope_quant, _reference_rope_quant, _quant_inputs, outputs=_QUANT_OUTPUTS)

_QUANT_CACHE_OUTPUTS = _fp8_like(query_out="query")


def _quant_cache_inputs(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """A quantized query and an fp8 cache (stored as uint8, as engines allocate it), per-tensor scales."""
    from helion_fusions.testing import poison_, poisoned

    kwargs = _cache_inputs(tokens, hidden, dtype, device)
    kwargs.update(key_cache=poisoned(tuple(kwargs["key_cache"].shape), torch.uint8, device),
                  value_cache=poisoned(tuple(kwargs["value_cache"].shape), torch.uint8, device),
                  kv_cache_dtype="fp8", q_scale=torch.tensor([0.01], device=device))
    kwargs.update({name: poison_(tensor) for name, tensor in _QUANT_CACHE_OUTPUTS.allocate(kwargs).items()})
    return kwargs


ROTARY_EMBEDDING_FP8_QUANT_AND_CACHE = _declare(
    "rotary_embedding_fp8_quant_and_cache",
    "(Tensor positions, Tensor query, Tensor! query_out, Tensor! key, Tensor value, Tensor! key_cache, "
    "Tensor! value_cache, Tensor slot_mapping, int head_size, Tensor cos_sin_cache, bool is_neox, "
    "str kv_cache_dtype, Tensor q_scale, Tensor k_scale, Tensor v_scale) -> ()",
    _prepare_rope_quant_cache, _reference_rope_quant_cache, _quant_cache_inputs, read_and_written=("key",),
    outputs=_QUANT_CACHE_OUTPUTS)


MLA_KV_LORA_RANK = 512
MLA_PE_DIM = 64


def _mla_inputs(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """DeepSeek-style MLA shapes: ``hidden // 64`` query heads (at least one) of rope dim 64, kv_lora_rank 512,
    block size 16."""
    from helion_fusions.testing import poisoned

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


CONCAT_AND_CACHE_MLA_ROPE = _declare(
    "concat_and_cache_mla_rope",
    "(Tensor positions, Tensor! q_pe, Tensor! k_pe, Tensor kv_c, Tensor! kv_cache, Tensor slot_mapping, "
    "Tensor cos_sin_cache, bool is_neox, str kv_cache_dtype, Tensor scale) -> ()",
    _prepare_mla_rope, _reference_mla_rope, _mla_inputs, read_and_written=("q_pe", "k_pe"))


def _plain_mla_inputs(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    kwargs = _mla_inputs(tokens, hidden, dtype, device)
    return {name: kwargs[name] for name in ("kv_c", "k_pe", "kv_cache", "slot_mapping", "kv_cache_dtype", "scale")}


CONCAT_AND_CACHE_MLA = _declare(
    "concat_and_cache_mla",
    "(Tensor kv_c, Tensor k_pe, Tensor! kv_cache, Tensor slot_mapping, str kv_cache_dtype, Tensor scale) -> ()",
    _prepare_mla, _reference_mla, _plain_mla_inputs)
