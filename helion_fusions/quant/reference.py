"""Eager references of each quant flavour: the executable contract (see :mod:`helion_fusions.quant`)."""

from __future__ import annotations

import torch

from helion_fusions.quant.epilogues import (
    FP8_AMAX_FLOOR,
    NVFP4_BLOCK,
    fp8_dynamic_scale,
    fp8_max_for,
    fp8_quantize,
    fp8_quantize_static,
    nvfp4_block_scale,
    nvfp4_quantize,
    pack_e2m1,
    swizzled_scale_offset,
    ue8m0,
)


def quantize_static_reference(y: torch.Tensor, scale: torch.Tensor, result: torch.Tensor) -> None:
    """Static fp8 quantization of ``y`` [T, H]; ``scale`` broadcasts against it (one element, [T, 1] or [1, H])."""
    fp8_max = fp8_max_for(result.dtype)
    scale = scale.float().reshape(()) if scale.numel() == 1 else scale.float()
    result.copy_(fp8_quantize_static(y.float(), scale, fp8_max, result.dtype))


def quantize_per_group_reference(
    y: torch.Tensor,
    result: torch.Tensor,
    scale: torch.Tensor,
    group_size: int,
    scale_ub: torch.Tensor | None = None,
    use_ue8m0: bool = False,
    amax_floor: float = FP8_AMAX_FLOOR,
    fp8_max: float | None = None,
) -> None:
    """Per-group (``group_size`` = hidden gives per-token) dynamic fp8 quantization of ``y`` [T, H]."""
    fp8_max = fp8_max_for(result.dtype) if fp8_max is None else fp8_max
    groups = y.float().reshape(y.shape[0], y.shape[1] // group_size, group_size)
    ub = None if scale_ub is None else scale_ub.float().reshape(())
    s = fp8_dynamic_scale(torch.amax(torch.abs(groups), dim=-1), fp8_max, amax_floor, ub)
    if use_ue8m0:
        s = ue8m0(s)
    result.copy_(fp8_quantize(groups, s[..., None], fp8_max, result.dtype).reshape(y.shape))
    scale.copy_(s.reshape(scale.shape))


def quantize_per_tensor_reference(y: torch.Tensor, result: torch.Tensor, scale: torch.Tensor) -> None:
    """Dynamic per-tensor fp8 quantization: one scale from the amax of all of ``y``."""
    fp8_max = fp8_max_for(result.dtype)
    yf = y.float()
    amax = torch.amax(torch.abs(yf)) if yf.numel() else yf.new_zeros(())  # empty: the floor scale
    s = fp8_dynamic_scale(amax, fp8_max)
    result.copy_(fp8_quantize(yf, s, fp8_max, result.dtype))
    scale.copy_(s.reshape(scale.shape))


def quantize_nvfp4_reference(
    y: torch.Tensor, result: torch.Tensor, result_scale: torch.Tensor, global_scale: torch.Tensor, swizzled: bool
) -> None:
    rows, hidden = y.shape
    blocks = y.float().reshape(rows, hidden // NVFP4_BLOCK, NVFP4_BLOCK)
    gs = global_scale.float().reshape(())
    sf = nvfp4_block_scale(torch.amax(torch.abs(blocks), dim=-1), gs)
    codes = nvfp4_quantize(blocks, sf, gs).reshape(rows, hidden // 2, 2)
    result.view(torch.uint8).copy_(pack_e2m1(codes[..., 0], codes[..., 1]))
    flat = result_scale.view(torch.uint8).reshape(-1)
    num_cols = hidden // NVFP4_BLOCK
    if swizzled:
        flat.zero_()
        r = torch.arange(rows, device=y.device)[:, None]
        k = torch.arange(num_cols, device=y.device)[None, :]
        flat[swizzled_scale_offset(r, k, num_cols).reshape(-1)] = sf.view(torch.uint8).reshape(-1)
    else:
        flat.copy_(sf.view(torch.uint8).reshape(-1))
