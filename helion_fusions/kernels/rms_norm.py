"""The RMSNorm kernel: every flavour of the rms_norm family (see :mod:`helion_fusions.ops.rms_norm`).

The kernel sees the row as ``[num_groups, group]`` (``group = H`` when there are no groups), so
per-group scales are a reduction over the last dim, and the variance a reduction over both.
"""

from __future__ import annotations

from typing import Any

import helion
import helion.language as hl
import torch

from helion_fusions.quant.epilogues import (
    NVFP4,
    SWIZZLE_COLS,
    row_rstd,
    load_scale_in,
    store_quantized,
    swizzled_scale_shape,
    zero_swizzled_rows,
)


def normalize_rows(xf: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, tile_t: Any, count: int,
                   epsilon: float, dtype: torch.dtype, HAS_RESIDUAL: bool, ROUND_SUM: bool) -> torch.Tensor:
    """The rows ``tile_t`` normalized, in ``dtype`` (a Helion kernel body's helper; every kernel of the family
    calls it with its fp32 rows ``xf`` ``[tile_t, NG, G]``, ``count = NG * G``).

    With ``HAS_RESIDUAL``, ``residual <- round(xf + residual)`` first, and the rows normalized are that
    rounded sum (``ROUND_SUM``) or the fp32 one. Then ``round(xf * rstd) * w``, both products rounded to
    ``dtype``.
    """
    if HAS_RESIDUAL:
        xf = xf + hl.load(residual, [tile_t, slice(None), slice(None)]).to(torch.float32)
        total = xf.to(residual.dtype)
        residual[tile_t, :, :] = total
        if ROUND_SUM:
            xf = total.to(torch.float32)
    rstd = row_rstd(xf, count, epsilon)
    return (xf * rstd.unsqueeze(-1).unsqueeze(-1)).to(dtype) * w


@helion.kernel(static_shapes=False, autotune_effort="none")
def rms_norm_kernel(
    x: torch.Tensor,  # [T, NG, G]
    residual: torch.Tensor,  # [T, NG, G], read and written when HAS_RESIDUAL
    weight: torch.Tensor,  # [NG, G]
    out: torch.Tensor,  # [T, NG, G], or int64 [T, NG] for nvfp4 (quant.e2m1_words)
    scale_out: torch.Tensor,  # see quant.store_quantized
    scale_words: torch.Tensor,  # nvfp4, swizzled: scale_out as int32, a row's 4 columns a word (quant.zero_swizzled_rows)
    scale_in: torch.Tensor,  # see quant.store_quantized
    epsilon: float,
    amax_floor: float,
    QUANT: hl.constexpr,
    HAS_RESIDUAL: hl.constexpr,
    ROUND_SUM: hl.constexpr,  # normalize the sum rounded to the residual's dtype (else the fp32 sum)
    HAS_SCALE_UB: hl.constexpr,
    UE8M0: hl.constexpr,
    SWIZZLED: hl.constexpr,
    FP8_MAX: hl.constexpr,
) -> None:
    T, NG, G = x.size()
    NG = hl.specialize(NG)
    G = hl.specialize(G)
    for tile_t in hl.tile(T):
        xf = x[tile_t, :, :].to(torch.float32)
        # the weight and the epilogue's scale are loaded with the row, so their round trips overlap
        # the row's instead of following the reduction
        w = weight[None, :, :]
        scale_value = load_scale_in(scale_in, tile_t, None, QUANT)
        y = normalize_rows(xf, residual, w, tile_t, NG * G, epsilon, x.dtype, HAS_RESIDUAL, ROUND_SUM)
        store_quantized(y, out, scale_out, scale_value, amax_floor, tile_t, None, T, NG, G,
                        QUANT, HAS_SCALE_UB, UE8M0, SWIZZLED, FP8_MAX)
        if QUANT == NVFP4:  # (nested: the kernel body folds one constexpr test, not an ``and`` of two)
            if SWIZZLED:
                if tile_t.begin == 0:  # one tile zeroes the padding rows
                    for tile_c in hl.tile(swizzled_scale_shape(1, NG)[1] // SWIZZLE_COLS, block_size=32):
                        zero_swizzled_rows(scale_words, tile_c, T, NG)
