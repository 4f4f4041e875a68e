"""Quant epilogue helpers, traced into every family's Helion kernel (the contract is in
:mod:`helion_fusions.quant`).

Each helper is plain PyTorch on tensors, so the same function runs inside a Helion kernel body
(where it is traced into Triton) and in the eager references.
"""

from __future__ import annotations

import enum
from typing import Any

import helion.language as hl
import torch
from helion._compiler.compile_environment import CompileEnvironment
from helion.runtime.ref_mode import is_in_ref_mode_context

FP8_AMAX_FLOOR = 1.0 / 512.0  # the dynamic-scale floor 1 / (fp8_max * 512), applied to the amax
NVFP4_BLOCK = 16
E2M1_MAX = 6.0
_E2M1_MAX_RECIPROCAL = 0.1666666716337204  # fp32(1 / 6), as the engine op multiplies by it
_ONE_BITS = 0x3F800000  # 1.0
_INF_BITS = 0x7F800000  # inf; also the fp32 exponent field

SWIZZLE_ROWS = 128
SWIZZLE_COLS = 4


# the int32 words of the per-tensor amax scratch (see store_quantized's AMAX flavour)
AMAX_WORD, COUNT_WORD, SCALE_WORD = 0, 1, 2
AMAX_SCRATCH_WORDS = 3


class Quant(enum.IntEnum):
    """The quant epilogue a kernel ends with (a constexpr kernel argument)."""

    NONE = 0
    STATIC = 1  # fp8 with a given scale: per tensor, per token or per channel (StaticScale)
    PER_TOKEN = 2  # dynamic fp8, one scale per row
    PER_GROUP = 3  # dynamic fp8, one scale per group of a row
    NVFP4 = 4  # e2m1 codes with fp8 block scales
    PER_TENSOR = 5  # dynamic fp8 with the one scale a previous AMAX launch left in scale_in, copied to scale_out
    AMAX = 6  # no output: the tensor's amax, then its scale (finish_amax), in an int32 scratch (the first of two launches)
    # per-token quantization split across the programs of a row (a decode-sized call: too few rows to fill the GPU)
    GROUP_AMAX = 7  # no output: each group's amax, at most scale_ub, into an fp32 [T, NG] scratch (the first launch)
    PER_TOKEN_OF_GROUPS = 8  # dynamic fp8, one scale per row: the max of the row's GROUP_AMAX values in scale_in


# for kernel bodies, which compare constexprs with ints, not enum members
NVFP4, AMAX = int(Quant.NVFP4), int(Quant.AMAX)


class StaticScale(enum.IntEnum):
    TENSOR = 0
    TOKEN = 1
    CHANNEL = 2
    GROUP = 3  # a 2-D [T / group_m, groups] scale (any strides): rows of group_m tokens by the kernel's groups


def fp8_max_for(dtype: torch.dtype) -> float:
    """The saturation bound engines use for an fp8 dtype (224 on MI300's e4m3fnuz)."""
    if dtype == torch.float8_e4m3fn:
        return 448.0
    if dtype == torch.float8_e4m3fnuz:
        return 224.0
    raise TypeError(f"expected a float8_e4m3fn or float8_e4m3fnuz tensor, got {dtype}")


def _compiling_to_triton() -> bool:
    return CompileEnvironment.has_current() and not is_in_ref_mode_context()


def div_rn(numerator: torch.Tensor, denominator: torch.Tensor | float) -> torch.Tensor:
    """IEEE round-to-nearest fp32 division; ``numerator`` carries the result's shape.

    Triton's ``/`` is ``div.full.f32`` (up to 2 ulp off). A 1-ulp error in a scale or in
    ``y / s`` moves values across fp8/e2m1 rounding ties: measured on an H100 80GB HBM3,
    a static scale of 0.015 flipped 0.8 % of fp8 codes. PyTorch divides exactly, so kernels
    use ``tl.math.div_rn``.
    """
    if not _compiling_to_triton():
        if not isinstance(denominator, torch.Tensor):
            # PyTorch's CUDA kernels turn division by a Python scalar into a multiplication
            # by its reciprocal; dividing by a tensor keeps the IEEE quotient on every device.
            denominator = torch.full((), denominator, dtype=numerator.dtype, device=numerator.device)
        return numerator / denominator
    if isinstance(denominator, torch.Tensor):
        return hl.inline_triton("tl.math.div_rn({0}, {1})", args=(numerator, denominator), output_like=numerator)
    source = f"tl.math.div_rn({{0}}, tl.full([], {float(denominator)!r}, tl.float32))"
    return hl.inline_triton(source, args=(numerator,), output_like=numerator)


def reciprocal_rn(value: torch.Tensor) -> torch.Tensor:
    """IEEE ``1 / value`` in fp32 (see :func:`div_rn`)."""
    if not _compiling_to_triton():
        return 1.0 / value
    return hl.inline_triton("tl.math.div_rn(tl.full([], 1.0, tl.float32), {0})", args=(value,), output_like=value)


def sqrt_rn(value: torch.Tensor) -> torch.Tensor:
    """IEEE round-to-nearest fp32 square root (Triton's ``tl.sqrt`` is approximate)."""
    if not _compiling_to_triton():
        return torch.sqrt(value)
    return hl.inline_triton("tl.sqrt_rn({0})", args=(value,), output_like=value)


def row_rstd(x: torch.Tensor, count: int, epsilon: float) -> torch.Tensor:
    """``1 / sqrt(sum(x^2) / count + eps)`` over the last two dims of fp32 ``x`` (``count`` elements), the
    same bits in any summation order.

    The squares are exact in fp64 and their fp64 sum all but exact, so the fp32 it rounds to does not
    depend on the order the GPU's reduction tree or the CPU sums in; the mean's division, the square
    root and the reciprocal are each rounded once (IEEE), as eager fp32 code computes them.
    """
    wide = x.to(torch.float64)
    sum_sq = torch.sum(torch.sum(wide * wide, dim=-1), dim=-1).to(torch.float32)
    return reciprocal_rn(sqrt_rn(div_rn(sum_sq, count) + epsilon))


def to_fp8(value: torch.Tensor, fp8_max: float, dtype: torch.dtype) -> torch.Tensor:
    """Saturating round-to-nearest-even fp32 -> e4m3 (the clamp makes the cast saturate; NaN stays NaN)."""
    if not _compiling_to_triton():
        return torch.clamp(value, -fp8_max, fp8_max).to(dtype)
    if dtype == torch.float8_e4m3fn and fp8_max == 448.0 and torch.version.hip is None:
        # NVIDIA's conversion (cvt.rn.satfinite.e4m3x2.f32, F2FP.SATFINITE) already saturates
        # at 448, the format's largest finite value, and keeps NaN: the clamp would be a no-op
        return value.to(dtype)
    # one NaN-propagating min and max (FMNMX.NAN on sm_90): torch.clamp lowers to a compare,
    # a NaN test and a select per bound
    source = f"tl.clamp({{0}}, {-float(fp8_max)!r}, {float(fp8_max)!r}, propagate_nan=tl.PropagateNan.ALL)"
    return hl.inline_triton(source, args=(value,), output_like=value).to(dtype)


def fp8_dynamic_scale(
    amax: torch.Tensor, fp8_max: float, amax_floor: float = FP8_AMAX_FLOOR, scale_ub: torch.Tensor | None = None
) -> torch.Tensor:
    """Dequant scale for a block whose absolute maximum is ``amax`` (fp32)."""
    if scale_ub is not None:
        amax = torch.minimum(amax, scale_ub)
    return div_rn(torch.clamp(amax, min=amax_floor), fp8_max)


def ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Round a positive normal fp32 scale up to a power of two, bit-exactly."""
    bits = scale.view(torch.int32)
    exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return (exponent << 23).view(torch.float32)


def fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a * b + c`` in fp32, rounded once (``b`` broadcasts against ``a``). Eager code (the references, and a kernel
    run as PyTorch) adds the exact fp64 product and rounds that sum to fp32: the same value but where rounding to
    fp64 first lands on an fp32 tie (about one sum in 2^29)."""
    if _compiling_to_triton():
        return hl.inline_triton("tl.fma({0}, {1}, {2})", args=(a, b, c), output_like=a)
    return torch.addcmul(c.double(), a.double(), b.double()).float()


def div_by_scale(value: torch.Tensor, scale: torch.Tensor, fp8_max: float, bounded: bool = False) -> torch.Tensor:
    """``value / scale`` rounded once, where the quotient is about to saturate at ``fp8_max``.

    ``tl.math.div_rn`` guards the fast path of every element's division with a range check
    that sends zero numerators (the padding lanes of a row whose length is not a power of
    two, a group of zeros) to an out-of-line subroutine. One correctly rounded reciprocal
    ``r`` per scale, then ``q0 = v * r``, the exact residual ``e = q0 * s - v`` and
    ``q = q0 - e * r`` with two FMAs gives the IEEE quotient (Markstein), the same sequence
    as div_rn's fast path, without the check. Negating the residual, rather than computing
    ``v - q0 * s``, keeps the sign of a zero: ``-0 / s`` gives ``-0 - (+0)``, which is ``-0``.
    Unless the caller knows ``|value / scale|`` stays near ``fp8_max`` (``bounded``: a
    dynamic scale from the amax of the same values), ``v`` is first clamped to
    ``2 * fp8_max * s``: the quotient saturates beyond it anyway, and the products stay
    finite. Eager code divides.
    """
    if not _compiling_to_triton():
        return div_rn(value, scale)
    r = reciprocal_rn(scale)
    v = value
    if not bounded:
        v = hl.inline_triton("tl.clamp({0}, -{1}, {1}, propagate_nan=tl.PropagateNan.ALL)",
                             args=(value, scale * (2.0 * fp8_max)), output_like=value)
    q0 = v * r
    return fma(-fma(q0, scale, -v), r, q0)


def fp8_quantize(value: torch.Tensor, scale: torch.Tensor, fp8_max: float, dtype: torch.dtype,
                 bounded: bool = False) -> torch.Tensor:
    """Per-token / per-group quantization: divide by the dequant scale (see :func:`div_by_scale`)."""
    return to_fp8(div_by_scale(value, scale, fp8_max, bounded), fp8_max, dtype)


def fp8_quantize_static(value: torch.Tensor, scale: torch.Tensor, fp8_max: float, dtype: torch.dtype) -> torch.Tensor:
    """Static per-tensor quantization: multiply by ``1 / scale`` as the engine ops do."""
    return to_fp8(value * reciprocal_rn(scale), fp8_max, dtype)


def nvfp4_block_scale(amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """fp8-e4m3 block scale factor from a block amax (fp32), saturating at 448.

    In the engine op's order: ``global_scale * (amax * (1 / 6))``, the reciprocal rounded on its own.
    """
    return to_fp8(global_scale * (amax * _E2M1_MAX_RECIPROCAL), 448.0, torch.float8_e4m3fn)


def e2m1_codes(value: torch.Tensor) -> torch.Tensor:
    """4-bit e2m1 codes (int32, sign in bit 3) of fp32 values, by one rounding addition.

    ``y = min(|x|, 6)`` (NaN: 0). e2m1 spaces its values 0.5 apart below 2 (codes 0-4), 1 apart
    up to 4 (codes 4-6) and 2 apart up to 6 (codes 6-7): the step is half of ``y``'s
    power of two, ``2 ** max(e, 0)``. Adding ``magic = 2 ** (max(e, 0) + 22)``, whose ulp is
    that step, rounds ``y`` to a whole number of steps, to nearest even, in the fp32 addition
    itself; the sum's bits minus ``magic``'s are that number (0-4), and ``2 * max(e, 0)`` more
    is the code. Ties go to the even code because the step count's parity is the code's. A
    negative input sets the sign bit, also where it rounds to zero; ``-0`` and NaN give 0.
    """
    if _compiling_to_triton():
        # two plain FMNMX: a max or min with one NaN operand gives the other, so NaN -> max(NaN, 0) = 0
        source = f"tl.minimum(tl.maximum(tl.abs({{0}}), 0.0), {E2M1_MAX!r})"
        y = hl.inline_triton(source, args=(value,), output_like=value)
    else:
        y = torch.where(value != value, 0.0, torch.clamp(torch.abs(value), max=E2M1_MAX))
    power = torch.clamp(y.view(torch.int32) & _INF_BITS, min=_ONE_BITS)  # 2 ** max(e, 0), as bits
    magic = power + (22 << 23)
    steps = (y + magic.view(torch.float32)).view(torch.int32) - magic
    code = steps + (power >> 22) - (_ONE_BITS >> 22)
    return code + (value < 0).to(torch.int32) * 8


def nvfp4_quantize(value: torch.Tensor, block_sf: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """e2m1 codes of ``value`` ([T, blocks, 16]) given the blocks' fp8 scale factors [T, blocks].

    The multiplier is the engine op's ``1 / (sf * (1 / global_scale))``, each reciprocal rounded on
    its own. A zero scale factor zeroes its block through a zero multiplier, chosen once per block:
    the block's values are finite then (an infinite one would have saturated the factor at 448), so
    they scale to +-0, which e2m1 encodes as 0.
    """
    sf = block_sf.to(torch.float32)
    inv = torch.where(sf == 0.0, 0.0, reciprocal_rn(sf * reciprocal_rn(global_scale)))
    return e2m1_codes(value * inv.unsqueeze(-1))


def e2m1_words(codes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A block's 16 codes (the last two dims, ``[2, 8]``; ``positions`` is ``arange(8)``) as two int32 words.

    Code ``k`` of a half block goes to bits ``4k .. 4k + 3`` of its word (disjoint nibbles, so the
    sum is their bitwise or): on a little-endian GPU the words' bytes are :func:`pack_e2m1`'s, even
    element in the low nibble. Kernels store them through an int32 ``[T, NG, 2]`` view of the
    packed output, whose unit inner stride lets the compiler store a block per instruction; a
    uint8 ``[.., 8]`` view (inner stride 8, a run-time value) was stored one byte per instruction,
    and one int64 word per block cost 64-bit shifts and a shared-memory shuffle to join the halves.
    """
    return torch.sum(codes << (positions * 4), dim=-1, dtype=torch.int32)


def pack_e2m1(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Two codes per byte, the even element in the low nibble."""
    return (lo | (hi << 4)).to(torch.uint8)


def swizzled_scale_offset(row: torch.Tensor, col: torch.Tensor, num_cols: int) -> torch.Tensor:
    """Byte offset of block scale (row, col) in the 128x4 swizzled layout of NVIDIA's block-scaled GEMMs."""
    col_tiles = (num_cols + SWIZZLE_COLS - 1) // SWIZZLE_COLS
    return (
        ((row // 128) * col_tiles + col // 4) * 512
        + (row % 32) * 16
        + ((row // 32) % 4) * 4
        + col % 4
    )


def swizzled_scale_shape(rows: int, num_cols: int) -> tuple[int, int]:
    """Padded (rows, cols) of a swizzled block-scale buffer."""
    return (
        (rows + SWIZZLE_ROWS - 1) // SWIZZLE_ROWS * SWIZZLE_ROWS,
        (num_cols + SWIZZLE_COLS - 1) // SWIZZLE_COLS * SWIZZLE_COLS,
    )


def load_scale_in(scale_in: torch.Tensor, tile_t: Any, tile_g: Any, QUANT: int,
                  STATIC_LAYOUT: int = StaticScale.TENSOR, group_m: Any = 1) -> torch.Tensor:
    """What :func:`store_quantized` reads besides ``y`` (see ``scale_in`` there), loaded up front.

    A ``GROUP`` static scale is ``[T / group_m, NG]``: row ``t // group_m``, the tile's groups.

    A kernel body calls this next to its main loads, before any arithmetic, so the round trip to
    memory overlaps theirs instead of following the row reduction or the activation.
    """
    if QUANT == Quant.STATIC and STATIC_LAYOUT == StaticScale.TOKEN:
        return hl.load(scale_in, [tile_t]).reshape(-1, 1, 1)
    if QUANT == Quant.STATIC and STATIC_LAYOUT == StaticScale.CHANNEL:
        return hl.load(scale_in, [slice(None) if tile_g is None else tile_g, slice(None)]).unsqueeze(0)
    if QUANT == Quant.STATIC and STATIC_LAYOUT == StaticScale.GROUP:
        return hl.load(scale_in, [tile_t.index // group_m, tile_g]).unsqueeze(-1)
    if QUANT == Quant.PER_TOKEN_OF_GROUPS:  # every group amax of the tile's rows
        return hl.load(scale_in, [tile_t, slice(None)])
    return hl.load(scale_in, [0])


def store_quantized(
    y: torch.Tensor,
    out: torch.Tensor,
    scale_out: torch.Tensor,
    scale_value: torch.Tensor,
    amax_floor: float,
    tile_t: Any,
    tile_g: Any,
    T: int,
    NG: int,
    G: int,
    QUANT: int,
    HAS_SCALE_UB: bool,
    UE8M0: bool,
    SWIZZLED: bool,
    FP8_MAX: float,
) -> Any:
    """The epilogue every family's kernel ends with: quantize ``y`` and store it (in a Helion kernel body).

    ``y`` is ``[tile_t, groups, G]`` in the activation dtype: rows ``tile_t`` of an output
    viewed as ``[T, NG, G]``, and either all ``NG`` groups (``tile_g`` None) or the groups
    ``tile_g``. The per-token flavour needs whole rows (``NG == 1``, or all groups); the
    per-token flavour split in two launches (``GROUP_AMAX``, then ``PER_TOKEN_OF_GROUPS``) does
    not. ``out`` is ``[T, NG, G]`` (fp8 or the activation dtype), or for nvfp4 the packed
    bytes viewed as int32 ``[T, NG, 2]``, two words per block (see :func:`e2m1_words`).
    ``scale_out``: ``[T]`` per-token, ``[T, NG]`` per-group (any strides) and for the group amaxes, flat uint8 block
    scales (nvfp4; a swizzled layout's padding is zeroed too, see :func:`zero_swizzled_rows`),
    ``[1]`` per-tensor, and for the amax the int32 scratch words ``AMAX_WORD``, ``COUNT_WORD``
    (zero between calls: the last tile to arrive resets them) and ``SCALE_WORD`` (the scale it
    leaves for the per-tensor launch). ``scale_value`` is :func:`load_scale_in` of ``scale_in``:
    the static scale (``[1]``, ``[T]``, ``[NG, G]`` or ``[T / group_m, NG]``), ``scale_ub``, the nvfp4 global scale,
    the per-tensor scale, or the tile's rows of the group amaxes (``[tile_t, NG]``).
    """
    groups = slice(None) if tile_g is None else tile_g
    yf = y.to(torch.float32)
    # Helper code is traced, not parsed like a kernel body: loads are spelled hl.load, and
    # views unsqueeze/squeeze (Helion lowers no slicing of device values).
    if QUANT == Quant.NONE:
        out[tile_t, groups, :] = y
    elif QUANT == Quant.STATIC:
        out[tile_t, groups, :] = fp8_quantize_static(yf, scale_value, FP8_MAX, out.dtype)
    elif QUANT == Quant.AMAX:
        # scale_out is the int32 scratch (AMAX_WORD ...); returns whether this tile arrived last
        amax = torch.amax(torch.amax(torch.amax(torch.abs(yf), dim=-1), dim=-1), dim=0)
        tiles = tile_t.count if tile_g is None else tile_t.count * tile_g.count
        # a non-negative fp32's bits order like the value (a NaN's above inf's), so an int max reduces them
        hl.atomic_max(scale_out, [AMAX_WORD], amax.view(torch.int32), sem="release")
        # acq_rel: this tile's max is visible to whoever sees its arrival, and the last sees every max
        return hl.atomic_add(scale_out, [COUNT_WORD], 1, sem="acq_rel") == tiles - 1
    elif QUANT == Quant.PER_TENSOR:
        out[tile_t, groups, :] = fp8_quantize(yf, scale_value, FP8_MAX, out.dtype, bounded=True)
        first_row = tile_t.index == 0
        hl.store(scale_out, [tile_t.index * 0], first_row.to(torch.float32) * scale_value, extra_mask=first_row)
    elif QUANT == Quant.GROUP_AMAX:
        # min(max_g a_g, ub) == max_g min(a_g, ub): the second launch's max of these is the clamped row amax
        amax = torch.amax(torch.abs(yf), dim=-1)
        if HAS_SCALE_UB:
            amax = torch.minimum(amax, scale_value)
        scale_out[tile_t, groups] = amax
    elif QUANT == Quant.PER_TOKEN or QUANT == Quant.PER_GROUP or QUANT == Quant.PER_TOKEN_OF_GROUPS:
        if QUANT == Quant.PER_TOKEN_OF_GROUPS:  # scale_ub is in the group amaxes already
            s = fp8_dynamic_scale(torch.amax(scale_value, dim=-1, keepdim=True), FP8_MAX, amax_floor)
        else:
            amax = torch.amax(torch.abs(yf), dim=-1)
            if QUANT == Quant.PER_TOKEN:
                amax = torch.amax(amax, dim=-1, keepdim=True)
            s = fp8_dynamic_scale(amax, FP8_MAX, amax_floor, scale_value if HAS_SCALE_UB else None)
        if UE8M0:
            s = ue8m0(s)
        out[tile_t, groups, :] = fp8_quantize(yf, s.unsqueeze(-1), FP8_MAX, out.dtype, bounded=not HAS_SCALE_UB)
        if QUANT == Quant.PER_GROUP:
            scale_out[tile_t, groups] = s
        else:  # every program of a row stores the row's one scale
            scale_out[tile_t] = s.squeeze(-1)
    else:
        sf = nvfp4_block_scale(torch.amax(torch.abs(yf), dim=-1), scale_value)
        codes = nvfp4_quantize(yf, sf, scale_value)
        out[tile_t, groups, :] = e2m1_words(codes.reshape(tile_t.block_size, -1, 2, G // 2), hl.arange(G // 2))
        row = tile_t.index.unsqueeze(1)
        col = (hl.arange(NG) if tile_g is None else tile_g.index).unsqueeze(0)
        offset = swizzled_scale_offset(row, col, NG) if SWIZZLED else row * NG + col
        hl.store(scale_out, [offset], sf.view(torch.uint8), extra_mask=(row < T) & (col < NG))
        if SWIZZLED and NG % SWIZZLE_COLS:  # the padding columns of these rows read as zero scales
            pad = NG + hl.arange(SWIZZLE_COLS).unsqueeze(0)
            offset = swizzled_scale_offset(row, pad, NG)
            hl.store(scale_out, [offset], (offset * 0).to(torch.uint8),
                     extra_mask=(row < T) & (pad < swizzled_scale_shape(1, NG)[1]))


def finish_amax(scratch: torch.Tensor, amax_floor: float, FP8_MAX: float) -> None:
    """The last tile of an amax launch (see :func:`store_quantized`): the scale from the amax of every
    tile into ``SCALE_WORD``, and the amax and arrival count back to zero for the next call."""
    total = hl.atomic_xchg(scratch, [AMAX_WORD], 0, sem="acquire")
    hl.atomic_xchg(scratch, [COUNT_WORD], 0)
    hl.store(scratch, [SCALE_WORD], fp8_dynamic_scale(total.view(torch.float32), FP8_MAX, amax_floor).view(torch.int32))


def zero_swizzled_rows(scale_words: torch.Tensor, tile_c: Any, T: int, NG: int) -> None:
    """Zero column tiles ``tile_c`` (4 columns, one int32 word per row) of the rows that pad ``T`` to a
    multiple of 128 in a swizzled block-scale buffer viewed as int32: block-scaled GEMMs read whole
    128-row tiles. One tile of a kernel calls this in a loop over the column tiles; :func:`store_quantized`
    zeroes the padding columns of the real rows."""
    row = (T + hl.arange(SWIZZLE_ROWS)).unsqueeze(1)
    # a tile's first column starts its word
    word = swizzled_scale_offset(row, tile_c.index.unsqueeze(0) * SWIZZLE_COLS, NG) // SWIZZLE_COLS
    hl.store(scale_words, [word], word * 0, extra_mask=row < swizzled_scale_shape(T, NG)[0])
