"""The RoPE kernel: rotation, optionally with q/k norm, static fp8 output and the paged KV-cache write
(see :mod:`helion_fusions.ops.rope` and :mod:`helion_fusions.ops.kv_cache`).

The host views every head's rotary part as ``[2, rot_dim/2]`` (``[pair member, i]``): contiguous
halves for neox, a stride-2 view for GPT-J, so one kernel body serves both. One launch covers the
key heads, then the query heads (two loops of one kernel).
"""

from __future__ import annotations

from typing import Any

import helion
import helion.language as hl
import torch

from helion_fusions.quant.epilogues import (
    _compiling_to_triton,
    div_rn,
    fp8_quantize,
    fp8_quantize_static,
)


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
    value: torch.Tensor,  # [T, HK, head_size_v] (CACHE); [T, HK, tiles, tile] under DS_MLA
    key_cache: torch.Tensor,  # the key cache's storage, flat (CACHE), addressed through ks0..ks3
    value_cache: torch.Tensor,  # the value cache's storage, flat, addressed through vs0..vs3
    scale_cache: torch.Tensor,  # DS_MLA: the value cache's storage as flat fp32 words (its tile scales)
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
    ROUND_PRODUCTS: hl.constexpr,  # round each rotation product to the input dtype (the engine's MLA rope)
    INVERSE: hl.constexpr,  # rotate by the negated angle (sin negated): undoes the rotation
    DS_MLA: hl.constexpr,  # the value cache is fp8_ds_mla: fp8 tiles, each with an fp32 scale after the codes
) -> None:
    T = q.size(0)
    # head counts are model constants (one compile each anyway); specialized, a single head
    # is a size-1 dim in every tensor alike (symbolic in one and 1 in another, stores would drop its index)
    HQ, HK = hl.specialize(q.size(1)), hl.specialize(k.size(1))
    half = q.size(3)
    half = hl.specialize(half)
    tail = hl.specialize(key_tail.size(2))
    head_v = hl.specialize(value.size(2))
    value_last = hl.specialize(value.size(-1))  # DS_MLA: a tile's width, an hl.arange bound (head_v otherwise)
    width = 2 * half + tail if TAIL else 2 * half  # head_size, for the norm's mean
    for tile_t, tile_h in hl.tile([T, HK]):
        if HAS_KEY:
            norm = (key_tail, q_weight, q_weight_tail, k_weight, k_weight_tail, query_heads, eps, TAIL, width)
            quantized = (k_out, k_out_tail, key_tail, k_scale, TAIL, FP8_MAX)
            if ROTATE:
                a, b = rotate(positions, k, cos_sin, tile_t, tile_h, norm if NORM else None,
                              quantized if K_QUANT else None, ROUND_PRODUCTS, INVERSE)
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
                if DS_MLA:
                    ds_mla_store(value_cache, scale_cache, value, v_row, tile_t, tile_h, valid, vs2, value_last,
                                 FP8_MAX)
                else:
                    v_base = v_row[:, None, None] + tile_h.index[None, :, None] * vs2
                    v_offsets = v_base + hl.arange(head_v)[None, None, :] * vs3
                    cache_store(value_cache, v_offsets, value[tile_t, tile_h, :], mask, vsc, FP8_CACHE, FP8_MAX)
    for tile_t, tile_h in hl.tile([T, HQ]):
        if HAS_QUERY:
            quantized = (q_out, q_out_tail, query_tail, q_scale, TAIL, FP8_MAX)
            rotate(positions, q, cos_sin, tile_t, tile_h, None, quantized if Q_QUANT else None, ROUND_PRODUCTS,
                   INVERSE)


def rotate(positions: torch.Tensor, x: torch.Tensor, cos_sin: torch.Tensor, tile_t: Any, tile_h: Any,
           norm: tuple[Any, ...] | None, quantized: tuple[Any, ...] | None = None,
           round_products: bool = False, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate rows ``tile_t`` of heads ``tile_h`` of ``x`` in place (a kernel helper); returns the rotated pairs.

    A row whose position has no cos/sin row is not rotated (cos 1, sin 0): nothing is read out of bounds.

    ``norm`` = (tail, query weight pairs and tail, key weight pairs and tail, query_heads, eps, TAIL,
    head_size): RMS-normalize each head first, in fp32 with the rotation (one rounding), the dims that
    do not rotate included; heads below ``query_heads`` take the query weight.
    ``quantized`` = (out pairs, out tail, input tail, scale, TAIL, fp8_max): leave ``x`` alone and write
    the rotated values (rounded to the input dtype, as the unfused rope leaves them) as static fp8, the
    dims that do not rotate too. ``round_products``: round each product to the input dtype before the
    sum (as scalar arithmetic in the input dtype does), else only the sum. ``inverse``: rotate by the
    negated angle (sin negated, an exact step).
    """
    position = hl.load(positions, [tile_t])
    in_range = (position >= 0) & (position < cos_sin.size(0))
    position = torch.where(in_range, position, 0)
    cos = torch.where(in_range.unsqueeze(1), hl.load(cos_sin, [position, 0, slice(None)]).to(torch.float32), 1.0)
    sin = torch.where(in_range.unsqueeze(1), hl.load(cos_sin, [position, 1, slice(None)]).to(torch.float32), 0.0)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if inverse:
        sin = -sin
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
    ac, bs, bc, as_ = mul_rn(a, cos), mul_rn(b, sin), mul_rn(b, cos), mul_rn(a, sin)
    if round_products:
        ac, bs, bc, as_ = (p.to(x.dtype).to(torch.float32) for p in (ac, bs, bc, as_))
    rotated_a = (ac - bs).to(x.dtype)
    rotated_b = (bc + as_).to(x.dtype)
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
    if not _compiling_to_triton():
        return x * y
    return hl.inline_triton("libdevice.mul_rn({0}, {1})", args=(x, y), output_like=x)


def cache_store(cache: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                scale: torch.Tensor, FP8_CACHE: bool, FP8_MAX: float) -> None:
    """Store ``values`` at flat ``offsets`` of a cache where ``mask`` holds: a copy, or ``fp8(clamp(x / scale))``."""
    if FP8_CACHE:
        values = fp8_quantize(values.to(torch.float32), scale, FP8_MAX, cache.dtype)
    hl.store(cache, [offsets], values.to(cache.dtype), extra_mask=mask)


FLT_MIN = 1.1754943508222875e-38  # the smallest normal fp32: the floor of an fp8_ds_mla tile scale


def ds_mla_store(cache: torch.Tensor, scales: torch.Tensor, value: torch.Tensor, row: torch.Tensor, tile_t: Any,
                 tile_h: Any, valid: torch.Tensor, head_stride: int, width: int, fp8_max: float) -> None:
    """The fp8_ds_mla value write (a kernel helper): each tile of ``value`` [T, H, tiles, tile] is quantized
    with its own fp32 scale ``max(amax / fp8_max, FLT_MIN)`` (an IEEE division; a NaN amax gives the floor),
    its codes stored at byte ``row + head * head_stride + tile index * tile + i`` of ``cache`` (flat fp8),
    and the scales after all the codes, in ``scales`` (the same storage as flat fp32 words)."""
    rows = hl.load(value, [tile_t, tile_h, slice(None), slice(None)]).to(torch.float32)
    tiles = value.size(2)  # (it and ``width``, value.size(3), specialized by the kernel: hl.arange bounds)
    scale = div_rn(torch.amax(torch.abs(rows), dim=-1), fp8_max)
    scale = torch.where(scale > FLT_MIN, scale, FLT_MIN)
    # (a helper is traced: views unsqueeze, since Helion lowers no slicing of device values)
    base = row.unsqueeze(1) + tile_h.index.unsqueeze(0) * head_stride  # bytes, [tokens, heads]
    within = hl.arange(tiles).unsqueeze(1) * width + hl.arange(width).unsqueeze(0)
    codes = base.unsqueeze(-1).unsqueeze(-1) + within.unsqueeze(0).unsqueeze(0)
    mask = valid.unsqueeze(1).unsqueeze(2)
    hl.store(cache, [codes], fp8_quantize(rows, scale.unsqueeze(-1), fp8_max, cache.dtype),
             extra_mask=mask.unsqueeze(3))
    words = base.unsqueeze(-1) // 4 + (tiles * width) // 4 + hl.arange(tiles).unsqueeze(0).unsqueeze(0)
    hl.store(scales, [words], scale, extra_mask=mask)
