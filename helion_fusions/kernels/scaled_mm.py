"""The scaled fp8 GEMM kernel (see :mod:`helion_fusions.ops.scaled_mm`).

``out = round(a_scale * (b_scale * (a @ b)) + bias)``, accumulated in fp32, as ``cutlass_scaled_mm``'s
epilogue computes it; ``a`` fp8 ``[M, K]`` row-major, ``b`` fp8 ``[K, N]`` column-major (the engine's
weight layout), scales per tensor or per token (``a``) / per channel (``b``). With ``BLOCK_SCALED``
(DeepSeek-style block fp8) ``a_scales`` is ``[M, K / 128]`` and ``b_scales`` ``[N / 128, K / 128]``: each
128-deep slice of the product is scaled before it is added, ``acc += dot * (a_s * b_s)``, as the engine's
block-fp8 GEMM accumulates. With ``STATIC_OUT`` the rounded result is quantized to fp8 with a per-tensor
scale, as the unfused GEMM + static quant leaves it.

K is walked 128 deep in both paths (the depth of an fp8 tensor-core tile on Hopper, and of a block
scale), so every variant takes configs of the same form: the M and N tile sizes.
"""

from __future__ import annotations

import helion
import helion.language as hl
import torch

from helion_fusions.quant.epilogues import fp8_quantize_static

SCALE_BLOCK = 128  # the block of a block-scaled GEMM's scales along K (and N for b); the K tile of every path


@helion.kernel(static_shapes=False, autotune_effort="none")
def scaled_mm_kernel(
    a: torch.Tensor,  # [M, K] fp8
    b: torch.Tensor,  # [K, N] fp8, column-major
    a_scales: torch.Tensor,  # [M] (A_PER_TOKEN), [M, K / 128] (BLOCK_SCALED) or [1] fp32
    b_scales: torch.Tensor,  # [N] (B_PER_CHANNEL), [N / 128, K / 128] (BLOCK_SCALED) or [1] fp32
    bias: torch.Tensor,  # [N] (HAS_BIAS)
    out: torch.Tensor,  # [M, N]: bf16/fp16, or fp8 (STATIC_OUT)
    out_scale: torch.Tensor,  # [1] fp32 dequant scale of an fp8 out (STATIC_OUT)
    A_PER_TOKEN: hl.constexpr,
    B_PER_CHANNEL: hl.constexpr,
    BLOCK_SCALED: hl.constexpr,
    HAS_BIAS: hl.constexpr,
    STATIC_OUT: hl.constexpr,
    ROUND_DTYPE: hl.constexpr,  # the unfused GEMM's output dtype, rounded to before the quant
    FP8_MAX: hl.constexpr,
) -> None:
    M, K = a.size()
    N = b.size(1)
    for tile_m, tile_n in hl.tile([M, N]):
        acc = hl.zeros([tile_m, tile_n], dtype=torch.float32)
        if BLOCK_SCALED:
            for tile_k in hl.tile(K, block_size=SCALE_BLOCK):
                partial = hl.dot(a[tile_m, tile_k], b[tile_k, tile_n])
                a_s = a_scales[tile_m, tile_k.id]
                b_s = b_scales[tile_n.index // SCALE_BLOCK, tile_k.id]
                acc = acc + partial * (a_s[:, None] * b_s[None, :])
            y = acc
        else:
            for tile_k in hl.tile(K, block_size=SCALE_BLOCK):
                acc = hl.dot(a[tile_m, tile_k], b[tile_k, tile_n], acc=acc)
            if B_PER_CHANNEL:
                y = b_scales[tile_n].unsqueeze(0) * acc
            else:
                y = b_scales[0] * acc
            if A_PER_TOKEN:
                y = a_scales[tile_m].unsqueeze(1) * y
            else:
                y = a_scales[0] * y
        if HAS_BIAS:
            y = y + bias[tile_n].unsqueeze(0).to(torch.float32)
        if STATIC_OUT:
            rounded = y.to(ROUND_DTYPE).to(torch.float32)
            out[tile_m, tile_n] = fp8_quantize_static(rounded, out_scale[0], FP8_MAX, out.dtype)
        else:
            out[tile_m, tile_n] = y.to(out.dtype)
