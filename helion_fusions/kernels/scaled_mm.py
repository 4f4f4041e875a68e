"""The scaled fp8 GEMM kernel and its epilogues (see :mod:`helion_fusions.ops.scaled_mm`).

``y = a_scale * (b_scale * (a @ b)) (+ bias)``, accumulated in fp32, as ``cutlass_scaled_mm``'s epilogue
computes it; ``a`` fp8 ``[M, K]`` row-major, ``b`` fp8 ``[K, N]`` column-major (the engine's weight layout),
scales per tensor or per token (``a``) / per channel (``b``). With ``BLOCK_SCALED`` (DeepSeek-style block fp8)
``a_scales`` is ``[M, K / 128]`` and ``b_scales`` ``[N / 128, K / 128]``: each 128-deep slice's product is added
with its scales in one fused multiply-add, ``acc = fma(dot, a_s * b_s, acc)``, as the engine's block-fp8 GEMM on
Hopper (CUTLASS's blockwise scale promotion) accumulates. It is also the cheaper form: one instruction an
element a slice, where a rounded product and an add take two (on an H200, 0.92-0.98x the time from M = 512).

With ``GATED`` the weight holds ``[gate | up]`` columns and the kernel keeps two accumulators per tile (the gate
columns ``n`` and the up columns ``n + N``), then ``y = round(silu(round(gate))) * round(up)``, as the unfused
GEMM + ``silu_and_mul`` computes it. The result, rounded to the unfused GEMM's output dtype, ends in
:func:`helion_fusions.quant.epilogues.store_quantized`: no quant, static fp8, or dynamic per-group fp8.

Dynamic per-token fp8 needs the amax of a whole row, which spans every N tile: the epilogue's launch
(``QUANT`` ``GROUP_AMAX``) stores the rounded result into a scratch ``out`` and takes an atomic max of each of
the tile's rows' amax into the row's word of ``row_words``; a ``QUANTIZE`` launch of the same tiles reads them
back (the scratch through ``partials``, the row amaxes through ``scale_in``, a float view of those words) and
quantizes each row by its amax (``PER_TOKEN_OF_GROUPS`` with one group amax a row). The last of a row tile's
programs to arrive (a count in ``row_words``) zeroes the tile's words for the next call.

The output columns are tiled in groups of ``G`` (the quant group; 1 for the flavours without one), so a
per-group scale is the amax of a group inside one tile: the second block size counts groups. K is walked 128
deep in every variant (the depth of an fp8 tensor-core tile on Hopper, and of a block scale).

What the generated code needs besides the arithmetic (tests/test_scaled_mm.py checks each in the Triton code):

* every tensor a row tile indexes has its row count tied to ``M`` (``torch._check``). Helion gives each input
  dim its own size symbol; one that is 1 when the kernel is bound (one token) but not provably as large as the
  row tile is specialized to 1 and indexed as a broadcast dim: no row index and no mask, so all the tile's
  rows (16 at least, for the dot) stored into row 0, racing with the padding rows' zeros;
* with ``G == 1`` the columns are loaded as ``[.., groups]``, without the unit group dim: a ``[K, N, 1]`` tile
  reshaped for the dot gets no usable shared-memory layout (Triton 3.9 rejects it; the H200's build ran the
  dot 30x slower than cuBLAS);
* the block-scaled accumulation is an explicit fused multiply-add (:func:`quant.epilogues.fma`), not left to the
  compiler's contraction, which Triton's ``TRITON_DEFAULT_FP_FUSION`` can turn off; ``a_s * y`` before a bias is
  rounded on its own (:func:`mul_rn`), as the contract rounds it before the add.
"""

from __future__ import annotations

import enum

import helion
import helion.language as hl
import torch

from helion_fusions.kernels.rope import mul_rn
from helion_fusions.kernels.silu_mul import silu
from helion_fusions.quant.epilogues import _compiling_to_triton, fma, load_scale_in, store_quantized

SCALE_BLOCK = 128  # the block of a block-scaled GEMM's scales along K (and N for b); the K tile of every path


def columns(x: torch.Tensor, prefix: tuple, tile_g, G: int) -> torch.Tensor:
    """``x[*prefix, tile_g, :]`` (the tile's groups of ``G`` columns) as ``[.., groups * G]``; with ``G == 1``
    the unit group dim is indexed away, not loaded and reshaped (see the module doc)."""
    if G == 1:
        return hl.load(x, [*prefix, tile_g, 0])
    return hl.load(x, [*prefix, tile_g, slice(None)]).flatten(-2)


def zeros(tile_m, tile_g, G: int) -> torch.Tensor:
    """An fp32 accumulator ``[tile_m, groups * G]``."""
    if G == 1:
        return hl.zeros([tile_m, tile_g], dtype=torch.float32)
    return hl.zeros([tile_m, tile_g, G], dtype=torch.float32).flatten(1)


def slice_scales(a_s: torch.Tensor, b_scales: torch.Tensor, tile_g, tile_k, G: int, first: int,
                 N: int) -> torch.Tensor:
    """A block-scaled K slice's scales ``a_s * b_s`` for the tile (``a_s`` the rows' ``[tile_m]``; ``first`` the
    weight's first column of this half): ``[tile_m, 1]``, as the tile's columns lie in one 128-column block of
    ``b_scales`` (the ops' ``config_problem``), so one b scale serves them all. Reference mode runs a tile over
    every column: there, each column's b scale (``[tile_m, groups * G]``, the same values)."""
    if _compiling_to_triton():
        return (a_s * hl.load(b_scales, [(tile_g.begin * G + first) // SCALE_BLOCK, tile_k.id])).unsqueeze(1)
    index = (tile_g.index.unsqueeze(1) * G + hl.arange(G).unsqueeze(0)).flatten()
    b_s = hl.load(b_scales, [(index + first) // SCALE_BLOCK, tile_k.id], extra_mask=index < N)
    return a_s.unsqueeze(1) * b_s.unsqueeze(0)


class Phase(enum.IntEnum):
    """What a launch of the kernel computes."""

    WHOLE = 0  # the whole K depth, then the epilogue
    PARTIAL = 1  # split-K: one program per (tile, split) sums its K slice into ``partials``
    REDUCE = 2  # split-K: a program per tile adds the splits' sums, then the epilogue
    QUANTIZE = 3  # per-token fp8: the rounded result back from ``partials``, quantized by its row's amax


def partial_sum(partials: torch.Tensor, half: int, tile_m, tile_g, G: int) -> torch.Tensor:
    """The sum over the splits of ``partials[:, half]``'s tile, ``[tile_m, groups * G]``."""
    if G == 1:
        return hl.load(partials, [slice(None), half, tile_m, tile_g, 0]).sum(0)
    return hl.load(partials, [slice(None), half, tile_m, tile_g, slice(None)]).sum(0).flatten(-2)


def store_partial(partials: torch.Tensor, split, half: int, tile_m, tile_g, G: int, acc: torch.Tensor) -> None:
    """``acc`` (``[tile_m, groups * G]``) into ``partials[split, half]``'s tile."""
    if G == 1:
        hl.store(partials, [split, half, tile_m, tile_g, 0], acc)
    else:
        hl.store(partials, [split, half, tile_m, tile_g, slice(None)], acc.reshape(acc.size(0), -1, G))


@helion.kernel(static_shapes=False, autotune_effort="none")
def scaled_mm_kernel(
    a: torch.Tensor,  # [M, K] fp8
    b: torch.Tensor,  # [K, HALVES, NG, G] fp8, column-major: [gate | up] when GATED (HALVES = 2)
    a_scales: torch.Tensor,  # [M] fp32 (a one-element scale as a stride-0 row), or [M, K / 128] (BLOCK_SCALED)
    b_scales: torch.Tensor,  # [HALVES, NG, G] (likewise), or [HALVES * N / 128, K / 128] (BLOCK_SCALED)
    bias: torch.Tensor,  # [HALVES, NG, G] (HAS_BIAS)
    out: torch.Tensor,  # [M, NG, G]: bf16/fp16, or fp8 (a quant flavour); the per-token scratch (GROUP_AMAX)
    scale_out: torch.Tensor,  # [M, NG] per-group scales or amaxes (any strides), [M] per-token scales, or an
                              # [M, 1] placeholder; see quant.store_quantized
    scale_in: torch.Tensor,  # [1] fp32 dequant scale of a static fp8 out, scale_ub (GROUP_AMAX), or the [M, 1]
                             # row amaxes (QUANTIZE: row_words[:, :1] as fp32)
    row_words: torch.Tensor,  # [M, 2] int32, per token: each row's amax bits, then row i's second word counts the
                              # QUANTIZE programs of row tile i that have read theirs; zero between calls
    partials: torch.Tensor,  # [S, HALVES, M, NG, G] fp32 split-K sums (PARTIAL, REDUCE), [1, 1, M, NG, G]
                             # rounded results (QUANTIZE); a placeholder otherwise
    chunk: int,  # the K depth of a split: K / S, a multiple of 128 (PARTIAL); K otherwise
    grid_split: int,  # S (PARTIAL), 1 otherwise
    amax_floor: float,
    BLOCK_SCALED: hl.constexpr,
    HAS_BIAS: hl.constexpr,
    GATED: hl.constexpr,
    QUANT: hl.constexpr,  # quant.Quant: NONE, STATIC, PER_GROUP; per token GROUP_AMAX, then PER_TOKEN_OF_GROUPS
    HAS_SCALE_UB: hl.constexpr,
    UE8M0: hl.constexpr,
    ROUND_DTYPE: hl.constexpr,  # the unfused GEMM's output dtype, rounded to before the activation and the quant
    FP8_MAX: hl.constexpr,
    PHASE: hl.constexpr,  # Phase: WHOLE, or split-K's PARTIAL then REDUCE; then QUANTIZE (per-token fp8)
) -> None:
    M, K = a.size()
    _, _, NG, G = b.size()
    NG = hl.specialize(NG)
    G = hl.specialize(G)
    N = NG * G
    # the row counts of the tensors the row tile indexes are M's (see the module doc: one token)
    # (their loads may broadcast a one-row dim: the rows past M are never stored)
    torch._check(out.size(0) == M)
    torch._check(scale_out.size(0) == M)
    torch._check(partials.size(2) == M)
    torch._check(row_words.size(0) == M)
    for tile_m, tile_g, tile_s in hl.tile([M, NG, grid_split], block_size=[None, None, 1]):
        scale_value = load_scale_in(scale_in, tile_m, tile_g, QUANT)
        acc = zeros(tile_m, tile_g, G)  # [tile_m, groups * G]
        acc_up = zeros(tile_m, tile_g, G)  # GATED only
        if PHASE == 2:  # Phase.REDUCE (a literal: Helion folds it, not a name of this module): the splits' sums
            acc = partial_sum(partials, 0, tile_m, tile_g, G)
            if GATED:
                acc_up = partial_sum(partials, 1, tile_m, tile_g, G)
        elif PHASE == 3:  # Phase.QUANTIZE: no product
            pass
        else:
            begin = tile_s.begin * chunk
            for tile_k in hl.tile(begin, begin + chunk, block_size=SCALE_BLOCK):
                a_tile = a[tile_m, tile_k]
                gate_tile = columns(b, (tile_k, 0), tile_g, G)
                if BLOCK_SCALED:
                    a_s = a_scales[tile_m, tile_k.id]
                    acc = fma(hl.dot(a_tile, gate_tile), slice_scales(a_s, b_scales, tile_g, tile_k, G, 0, N), acc)
                    if GATED:
                        up_tile = columns(b, (tile_k, 1), tile_g, G)
                        acc_up = fma(hl.dot(a_tile, up_tile), slice_scales(a_s, b_scales, tile_g, tile_k, G, N, N),
                                     acc_up)
                else:
                    acc = hl.dot(a_tile, gate_tile, acc=acc)
                    if GATED:
                        up_tile = columns(b, (tile_k, 1), tile_g, G)
                        acc_up = hl.dot(a_tile, up_tile, acc=acc_up)
        if PHASE == 1:  # Phase.PARTIAL
            store_partial(partials, tile_s.begin, 0, tile_m, tile_g, G, acc)
            if GATED:
                store_partial(partials, tile_s.begin, 1, tile_m, tile_g, G, acc_up)
        elif PHASE == 3:  # Phase.QUANTIZE
            rounded = hl.load(partials, [0, 0, tile_m, tile_g, slice(None)])
            store_quantized(rounded, out, scale_out, scale_value, amax_floor, tile_m, tile_g, M, NG, G, QUANT,
                            HAS_SCALE_UB, UE8M0, False, FP8_MAX)
            # acq_rel: this program read its rows' amaxes before it counts itself, and the row tile's last program
            # sees every count: it zeroes the tile's words for the next call
            arrived_last = hl.atomic_add(row_words, [tile_m.id, 1], 1, sem="acq_rel") == tile_g.count - 1
            if arrived_last:
                row_words[tile_m, 0] = hl.zeros([tile_m], dtype=torch.int32)
                hl.atomic_xchg(row_words, [tile_m.id, 1], 0)
        else:
            y = acc
            y_up = acc_up
            if not BLOCK_SCALED:
                y = columns(b_scales, (0,), tile_g, G).unsqueeze(0) * y
                a_s = a_scales[tile_m].unsqueeze(1)
                y = mul_rn(y, a_s)  # rounded before the bias is added
                if GATED:
                    y_up = mul_rn(columns(b_scales, (1,), tile_g, G).unsqueeze(0) * y_up, a_s)
            if HAS_BIAS:
                y = y + columns(bias, (0,), tile_g, G).unsqueeze(0).to(torch.float32)
                if GATED:
                    y_up = y_up + columns(bias, (1,), tile_g, G).unsqueeze(0).to(torch.float32)
            rounded = y.to(ROUND_DTYPE)
            if GATED:
                rounded = silu(rounded.to(torch.float32)).to(ROUND_DTYPE) * y_up.to(ROUND_DTYPE)
            rounded = rounded.reshape(rounded.size(0), -1, G)
            if QUANT == 7:  # Quant.GROUP_AMAX: the rounded result and its row amaxes, for the QUANTIZE launch
                out[tile_m, tile_g, :] = rounded
                amax = torch.amax(torch.amax(torch.abs(rounded.to(torch.float32)), dim=-1), dim=-1)
                if HAS_SCALE_UB:  # min(max_i a_i, ub) == max_i min(a_i, ub)
                    amax = torch.minimum(amax, scale_value)
                # a non-negative fp32's bits order like the value (a NaN's above inf's): an int max reduces them
                hl.atomic_max(row_words, [tile_m, 0], amax.view(torch.int32), sem="relaxed")
            else:
                store_quantized(rounded, out, scale_out, scale_value, amax_floor, tile_m, tile_g, M, NG, G, QUANT,
                                HAS_SCALE_UB, UE8M0, False, FP8_MAX)
