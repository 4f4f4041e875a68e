"""The SiLU-and-mul kernel, which also serves the standalone quant ops (see :mod:`helion_fusions.ops.silu_mul`).

It sees a row as ``[num_groups, group]`` and tiles both tokens and groups, so a decode-sized call
still spreads over many programs.
"""

from __future__ import annotations

import helion
import helion.language as hl
import torch

from helion_fusions.quant.epilogues import (
    AMAX,
    NVFP4,
    Quant,
    SWIZZLE_COLS,
    div_rn,
    finish_amax,
    fp8_dynamic_scale,
    fp8_quantize,
    load_scale_in,
    store_quantized,
    swizzled_scale_shape,
    zero_swizzled_rows,
)

# for the kernel bodies, which pass ints as constexprs. Defined here, not beside quant.epilogues' NVFP4 and AMAX:
# there, ``Quant.PER_TOKEN`` in store_quantized would make the constant part of every kernel's config hash
PER_TOKEN = int(Quant.PER_TOKEN)


def silu(gate: torch.Tensor) -> torch.Tensor:
    """``g / (1 + exp(-g))`` in fp32, as PyTorch's CUDA silu computes it (accurate exp, IEEE division)."""
    return div_rn(gate, 1.0 + torch.exp(-gate))


@helion.kernel(static_shapes=False, autotune_effort="none")
def silu_mul_kernel(
    x: torch.Tensor,  # [T, 2, NG, G] = [gate | up] when GATED, else [T, 1, NG, G]
    out: torch.Tensor,  # [T, NG, G], or int64 [T, NG] for nvfp4 (quant.e2m1_words)
    scale_out: torch.Tensor,  # see quant.store_quantized
    scale_words: torch.Tensor,  # nvfp4, swizzled: scale_out as int32, a row's 4 columns a word (quant.zero_swizzled_rows)
    scale_in: torch.Tensor,  # see quant.store_quantized
    amax_floor: float,
    scale_group_m: int,  # tokens per row of a GROUP static scale (1 otherwise)
    GATED: hl.constexpr,
    QUANT: hl.constexpr,
    HAS_SCALE_UB: hl.constexpr,
    UE8M0: hl.constexpr,
    SWIZZLED: hl.constexpr,
    STATIC_LAYOUT: hl.constexpr,
    FP8_MAX: hl.constexpr,
) -> None:
    T, _, NG, G = x.size()
    NG = hl.specialize(NG)
    G = hl.specialize(G)
    for tile_t, tile_g in hl.tile([T, NG]):
        # every load before any arithmetic, so their memory round trips overlap
        if GATED:
            gate = x[tile_t, 0, tile_g, :]
            up = x[tile_t, 1, tile_g, :]
        elif QUANT == 6:  # Quant.AMAX (a literal: Helion folds it): the quantize launch reads the input again, kept in L2
            y = hl.load(x, [tile_t, 0, tile_g, slice(None)], eviction_policy="evict_last")
        else:
            y = x[tile_t, 0, tile_g, :]
        scale_value = load_scale_in(scale_in, tile_t, tile_g, QUANT, STATIC_LAYOUT, scale_group_m)
        if GATED:
            y = silu(gate.to(torch.float32)).to(x.dtype) * up
        arrived_last = store_quantized(y, out, scale_out, scale_value, amax_floor, tile_t, tile_g, T, NG, G,
                                       QUANT, HAS_SCALE_UB, UE8M0, SWIZZLED, FP8_MAX)
        if QUANT == AMAX:
            if arrived_last:
                finish_amax(scale_out, amax_floor, FP8_MAX)
        if QUANT == NVFP4:  # (nested: the kernel body folds one constexpr test, not an ``and`` of two)
            if SWIZZLED:
                if tile_t.begin + tile_g.begin == 0:  # one tile zeroes the padding rows
                    for tile_c in hl.tile(swizzled_scale_shape(1, NG)[1] // SWIZZLE_COLS, block_size=32):
                        zero_swizzled_rows(scale_words, tile_c, T, NG)


@helion.kernel(static_shapes=False, autotune_effort="none")
def silu_mul_rows_kernel(
    x: torch.Tensor,  # [T, 2, NG, G] = [gate | up]
    stash: torch.Tensor,  # [T, NG, G] in x's dtype: the rounded activation, written by the first pass
    out: torch.Tensor,  # [T, NG, G] fp8
    scale_out: torch.Tensor,  # [T] fp32, one dequant scale a row
    scale_in: torch.Tensor,  # [1] fp32 scale_ub (read when HAS_SCALE_UB)
    amax_floor: float,
    HAS_SCALE_UB: hl.constexpr,
    FP8_MAX: hl.constexpr,
) -> None:
    """Per-token quant of ``silu(gate) * up`` by a walk along each row in two passes.

    The first pass computes the activation once, group tile by group tile, stores it (rounded, as the
    contract rounds it) and takes the row's amax; the second reads it back, mostly from L2, and
    quantizes it. A whole row in one tile computes the activation once too, but its registers leave
    one row in flight a multiprocessor, so the activation's arithmetic does not overlap the memory
    traffic; Helion's looped reduction computes the activation twice.
    """
    T, _, NG, G = x.size()
    NG = hl.specialize(NG)
    G = hl.specialize(G)
    for tile_t in hl.tile(T):
        scale_ub = load_scale_in(scale_in, tile_t, None, PER_TOKEN)
        amax = hl.zeros([tile_t], dtype=torch.float32)
        for tile_g in hl.tile(NG):
            gate = x[tile_t, 0, tile_g, :]
            up = x[tile_t, 1, tile_g, :]
            y = silu(gate.to(torch.float32)).to(x.dtype) * up
            stash[tile_t, tile_g, :] = y
            amax = torch.maximum(amax, torch.amax(torch.amax(torch.abs(y.to(torch.float32)), dim=-1), dim=-1))
        s = fp8_dynamic_scale(amax, FP8_MAX, amax_floor, scale_ub if HAS_SCALE_UB else None)
        scale_out[tile_t] = s
        for tile_g in hl.tile(NG):
            y = stash[tile_t, tile_g, :].to(torch.float32)
            out[tile_t, tile_g, :] = fp8_quantize(y, s[:, None, None], FP8_MAX, out.dtype, bounded=not HAS_SCALE_UB)
