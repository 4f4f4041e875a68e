"""All-reduce + RMSNorm (+ residual) + quant over symmetric memory: every flavour of the rms_norm family (see
:mod:`helion_fusions.ops.all_reduce`), one-shot or two-shot (``TWO_SHOT``), from one Helion kernel.

One-shot:
Each rank's partial input lies in its symmetric ``workspace`` (the kernel copies it there, or a producer
wrote it there). For each tile of rows, every rank's program ``p`` meets the other ranks' programs ``p`` at
a barrier on the signal pads, reads those rows from the W workspaces, sums them in fp32 in rank order
0..W-1 and rounds once to the input dtype; then the rms_norm kernel's row function and quant epilogue.
A second barrier, before anything is stored, holds each rank until every peer has read its rows, so no
rank overwrites a workspace (an in-place output, the next call's input) that a peer still reads.

Synchronization is Helion's ``symm_mem_sync``: system-scope compare-and-swap on 32-bit signal pad slots
(release when sending after memory accesses, acquire when waiting before them), one slot per (program,
rank), reset to zero by the waiter so the pads need no host reset (CUDA-graph safe). Symmetric-memory
kernels are persistent (Helion allows no other program-id layout for them): the grid is one program per
SM and every rank runs the same tiles in each program, so slot ``p`` pairs the same rows on every rank.
No NVLink multicast is used: peers are read through their mapped buffers.

Two-shot: rank ``w`` owns the real rows ``W * v + w``; the tiles run over the ``cdiv(T, W)`` "virtual" rows
``v``, so each tile covers the ``W * rows`` real rows its virtual rows name on every rank. Per tile: each rank
copies those rows of its input into its workspace; barrier; each reads its own rows from the W workspaces,
sums them as above, normalizes (the residual added as rms_norm does) and quantizes into its symmetric stage
buffers (``out_stage``, ``scale_stage``, ``residual_stage``: ``[cdiv(T, W), ...]``, scales row-major);
barrier (release: the stage is visible and the workspace rows are read; acquire: the peers' stages);
then each rank copies every rank's stage rows (its own too) into its ``out``, scales (in their own layout:
strided, transposed, nvfp4 swizzled) and ``residual``. The outputs are written only after the second
barrier, as in the one-shot; a stage is next written after the next call's first barrier, which no peer
passes before it finished this call.
"""

from __future__ import annotations

from typing import Any

import helion
import helion.language as hl
import torch
from helion.runtime.triton.dist_utils import symm_mem_sync

from helion_fusions.kernels.rms_norm import normalize_rows
from helion_fusions.quant.epilogues import (
    NVFP4,
    SWIZZLE_COLS,
    Quant,
    load_scale_in,
    store_quantized,
    swizzled_scale_offset,
    swizzled_scale_shape,
    zero_swizzled_rows,
)


def _peer_rows(rows: torch.Tensor, live: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of ``[T, ...]`` ``tensor`` (0 where not ``live``; a kernel body's helper)."""
    extra = [slice(None)] * (tensor.dim() - 1)
    mask = live.reshape([-1] + [1] * (tensor.dim() - 1))
    return hl.load(tensor, [rows, *extra], extra_mask=mask)


def _store_rows(tensor: torch.Tensor, rows: torch.Tensor, live: torch.Tensor, value: torch.Tensor) -> None:
    extra = [slice(None)] * (tensor.dim() - 1)
    hl.store(tensor, [rows, *extra], value, extra_mask=live.reshape([-1] + [1] * (tensor.dim() - 1)))


def gather_share(tile_t: Any, rows: torch.Tensor, live: torch.Tensor, out_stage: torch.Tensor,
                 scale_stage: torch.Tensor, residual_stage: torch.Tensor, out: torch.Tensor, scale_out: torch.Tensor,
                 residual: torch.Tensor, T: int, NG: int, QUANT: int, HAS_RESIDUAL: bool, SWIZZLED: bool) -> None:
    """Phase 2 of the two-shot: a rank's staged results for the virtual rows ``tile_t`` (its stage, any rank's)
    into this rank's outputs at the real rows ``rows`` (``live``: ``rows < T``), in the outputs' own layouts."""
    _store_rows(out, rows, live, hl.load(out_stage, [tile_t] + [slice(None)] * (out.dim() - 1)))
    if HAS_RESIDUAL:
        _store_rows(residual, rows, live, hl.load(residual_stage, [tile_t, slice(None), slice(None)]))
    if QUANT == int(Quant.PER_TOKEN):
        _store_rows(scale_out, rows, live, hl.load(scale_stage, [tile_t]))
    elif QUANT == int(Quant.PER_GROUP):
        _store_rows(scale_out, rows, live, hl.load(scale_stage, [tile_t, slice(None)]))
    elif QUANT == NVFP4:  # the stage holds the block scales row-major [rows, NG]; padding columns read as zero
        cols = swizzled_scale_shape(1, NG)[1] if SWIZZLED else NG
        col = hl.arange(cols).unsqueeze(0)
        staged = tile_t.index.unsqueeze(1) * NG + col
        sf = hl.load(scale_stage, [staged], extra_mask=(col < NG) & live.unsqueeze(1))
        row = rows.unsqueeze(1)
        offset = swizzled_scale_offset(row, col, NG) if SWIZZLED else row * NG + col
        hl.store(scale_out, [offset], sf, extra_mask=live.unsqueeze(1) & (col < cols))


@helion.kernel(static_shapes=False, autotune_effort="none",
               ignore_warnings=[helion.exc.TensorOperationInWrapper])  # get_remote_tensors: host code, as meant
def all_reduce_rms_norm_kernel(
    x: torch.Tensor,  # [T, NG, G] this rank's partial input (the workspace itself when COPY_IN is off)
    workspace: torch.Tensor,  # [T, NG, G] symmetric, at the start of its allocation
    signal_pads: torch.Tensor,  # int64 [W]: the address of each rank's signal pad, as mapped here
    residual: torch.Tensor,  # as in rms_norm_kernel, and the arguments below
    weight: torch.Tensor,
    out: torch.Tensor,
    scale_out: torch.Tensor,
    scale_words: torch.Tensor,
    scale_in: torch.Tensor,
    out_stage: torch.Tensor,  # two-shot: symmetric, [cdiv(T, W), ...] like out; one-shot: a stand-in, never read
    scale_stage: torch.Tensor,  # two-shot: symmetric, [cdiv(T, W)] per token, [cdiv(T, W), NG] per group or nvfp4
    residual_stage: torch.Tensor,  # two-shot with a residual: symmetric, [cdiv(T, W), NG, G]
    epsilon: float,
    amax_floor: float,
    group_name: hl.ProcessGroupName,
    RANK: hl.constexpr,
    COPY_IN: hl.constexpr,
    TWO_SHOT: hl.constexpr,
    QUANT: hl.constexpr,
    HAS_RESIDUAL: hl.constexpr,
    ROUND_SUM: hl.constexpr,
    HAS_SCALE_UB: hl.constexpr,
    UE8M0: hl.constexpr,
    SWIZZLED: hl.constexpr,
    FP8_MAX: hl.constexpr,
) -> None:
    T, NG, G = x.size()
    NG = hl.specialize(NG)
    G = hl.specialize(G)
    W = hl.specialize(signal_pads.size(0))
    peers = torch.ops.symm_mem.get_remote_tensors(workspace, group_name)
    out_peers = torch.ops.symm_mem.get_remote_tensors(out_stage, group_name)
    scale_peers = torch.ops.symm_mem.get_remote_tensors(scale_stage, group_name)
    residual_peers = torch.ops.symm_mem.get_remote_tensors(residual_stage, group_name)
    # two-shot: tile_t indexes "virtual" rows; virtual row v of rank w is the real row W * v + w
    virtual_rows = (T + W - 1) // W if TWO_SHOT else T
    for tile_t in hl.tile(virtual_rows):
        w = weight[None, :, :]
        scale_value = load_scale_in(scale_in, tile_t, None, QUANT)
        if TWO_SHOT:
            if COPY_IN:  # the tile's real rows, W * v + 0 .. W * v + W - 1
                for share in hl.static_range(W):
                    rows = tile_t.index * W + share
                    _store_rows(workspace, rows, rows < T, _peer_rows(rows, rows < T, x))
            hl.triton_kernel(symm_mem_sync, args=(signal_pads, None, RANK, W, True, True), output_like=None)
            mine = tile_t.index * W + RANK
            live = mine < T
            total = _peer_rows(mine, live, peers[0]).to(torch.float32)
            for rank in hl.static_range(1, W):
                total = total + _peer_rows(mine, live, peers[rank]).to(torch.float32)
            xf = total.to(x.dtype).to(torch.float32)
            if HAS_RESIDUAL:  # normalize_rows' residual step, with the sum staged for the peers
                xf = xf + _peer_rows(mine, live, residual).to(torch.float32)
                summed = xf.to(residual.dtype)
                residual_stage[tile_t, :, :] = summed
                if ROUND_SUM:
                    xf = summed.to(torch.float32)
            y = normalize_rows(xf, residual, w, tile_t, NG * G, epsilon, x.dtype, False, False)
            store_quantized(y, out_stage, scale_stage, scale_value, amax_floor, tile_t, None, virtual_rows, NG, G,
                            QUANT, HAS_SCALE_UB, UE8M0, False, FP8_MAX)
            # release: our stage is visible to the peers, and past this no peer reads these rows of our
            # workspace; acquire: their stages
            hl.triton_kernel(symm_mem_sync, args=(signal_pads, None, RANK, W, True, True), output_like=None)
            for share in hl.static_range(W):
                rows = tile_t.index * W + share
                gather_share(tile_t, rows, rows < T, out_peers[share], scale_peers[share], residual_peers[share],
                             out, scale_out, residual, T, NG, QUANT, HAS_RESIDUAL, SWIZZLED)
        else:
            if COPY_IN:
                workspace[tile_t, :, :] = x[tile_t, :, :]
            # release: this program's copy is visible to the peers; acquire: theirs (or their producers') to us
            hl.triton_kernel(symm_mem_sync, args=(signal_pads, None, RANK, W, True, True), output_like=None)
            # rank 0 first, not 0.0 + rank 0: that would turn a -0.0 sum into +0.0
            total = peers[0][tile_t, :, :].to(torch.float32)
            for rank in hl.static_range(1, W):
                total = total + peers[rank][tile_t, :, :].to(torch.float32)
            xf = total.to(x.dtype).to(torch.float32)
            y = normalize_rows(xf, residual, w, tile_t, NG * G, epsilon, x.dtype, HAS_RESIDUAL, ROUND_SUM)
            # release after the reads: past this barrier no peer reads these rows of our workspace again
            hl.triton_kernel(symm_mem_sync, args=(signal_pads, None, RANK, W, True, False), output_like=None)
            store_quantized(y, out, scale_out, scale_value, amax_floor, tile_t, None, T, NG, G,
                            QUANT, HAS_SCALE_UB, UE8M0, SWIZZLED, FP8_MAX)
        if QUANT == NVFP4:
            if SWIZZLED:
                if tile_t.begin == 0:  # one tile zeroes the padding rows
                    for tile_c in hl.tile(swizzled_scale_shape(1, NG)[1] // SWIZZLE_COLS, block_size=32):
                        zero_swizzled_rows(scale_words, tile_c, T, NG)
