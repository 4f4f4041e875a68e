"""Scaled fp8 GEMMs: ``scaled_mm`` (vLLM's ``cutlass_scaled_mm``) and its fused epilogues, from one kernel.

Contract (NUMERICS.md, "GEMM epilogues"): ``acc = sum_k f32(a) * f32(b)`` (the accumulation order is the
kernel's), ``y = a_scales * (b_scales * acc) (+ f32(bias))``, rounded to ``out``'s dtype:

* ``a`` fp8 ``[M, K]`` row-major; ``b`` fp8 ``[K, N]`` column-major (the transpose of the engine's
  row-major ``[N, K]`` weight); K and N multiples of 16;
* ``a_scales``: one element (0-dim too) or one per token (``[M, 1]`` or ``[M]``); ``b_scales``: one
  element or one per column of ``b`` (``[N]``, ``[1, N]`` or ``[N, 1]``); both fp32 and contiguous;
* block-scaled (DeepSeek-style block fp8): ``a_scales [M, ceil(K / 128)]`` and ``b_scales
  [ceil(N / 128), ceil(K / 128)]``, any strides. Each 128-deep slice's product is added with its scales by
  one fused multiply-add, ``acc = fma(a[:, s] @ b[s, :], a_s * b_s, acc)``, as the engine's block-fp8 GEMM
  (CUTLASS's blockwise scale promotion) accumulates;
* ``bias`` ``[N]`` (one per column of ``b``) in the dtype ``y`` is rounded to.

The fp8 epilogues write what the unfused path leaves: ``y`` rounded to bf16 (the GEMM's output), then

* ``scaled_mm_static_fp8_quant``: the static per-tensor ``scale``, ``fp8(clamp(y * (1 / scale)))``;
* ``scaled_mm_per_group_fp8_quant``: ``per_token_group_fp8_quant`` of ``y`` with ``group_size`` 128 (N a
  multiple of it) and its ``eps`` as the amax floor: ``s = max(amax, eps) / fp8_max`` per 128 columns of a
  row (``scale_ue8m0``: rounded up to a power of two), ``q = fp8(clamp(y / s))``. ``scales`` is fp32
  ``[M, N / 128]``; ``is_scale_transposed`` asks for a column-major one (given as that view, TMA-aligned
  strides too, or as a row-major ``[N / 128, M]`` tensor). From ``SPLIT_MAX_M`` rows on a group lies inside
  one N tile and the product's epilogue quantizes it; below, ``per_token_group_fp8_quant`` quantizes the bf16
  product after it (:func:`quantized_after`).

gate_up (``scaled_mm_silu_mul_*``): ``b`` is ``[K, 2 I]``, gate columns ``0 .. I - 1`` and up columns
``I .. 2 I - 1`` (per-channel scales and bias ``[2 I]``, block scales ``[2 I / 128, ...]``, I a multiple of 128);
``out`` is ``[M, I]``. ``g`` and ``u`` are ``y``'s two halves rounded to bf16, then ``round(silu(f32 g)) * u`` in bf16
(``silu_and_mul``'s rule), then the static or per-group fp8 rule (eps 1 / 512: ``silu_and_mul_per_block_quant``'s).

Split-K: up to ``SPLIT_MAX_M`` rows a program per output tile leaves most SMs idle, so the K depth is split
(:func:`split_count`): one launch writes each slice's fp32 sum of products into a scratch ``[S, .., M, N]``,
a second adds the slices pairwise (one reduction: ``(s0 + s1) + (s2 + s3)``) and runs the epilogue: the same
products added in another order (block scales: the scaled slices). The scratch is written whole before it is
read; batch-invariant mode never splits. The scratch buffers are shared by every call on a device
(:func:`ops.common.scratch`): calls on two streams must not overlap.

``scaled_mm_per_token_fp8_quant`` (and gate_up's): ``dynamic_per_token_scaled_fp8_quant`` of ``y``:
``s = max(min(amax, scale_ub), 1 / 512) / fp8_max`` per row, ``q = fp8(clamp(y / s))``, ``scales``
fp32 ``[M, 1]``. A row's scale needs the amax over every N tile of the row, so the product's launch stores
``y`` rounded to bf16 into a scratch and takes an atomic max of each row's amax into a zeroed per-row word,
and a second launch of the same tiles quantizes each row by it (and zeroes the words again). Against the
unfused path it saves the quant op's row reduction and, for gate_up, the ``[M, 2 I]`` intermediate; the bf16
round trip of ``y`` stays (one program covering a row's every column would leave most SMs idle, and computing
the product twice doubles it).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import helion
import torch

from helion_fusions import quant
from helion_fusions.kernels.scaled_mm import SCALE_BLOCK, Phase, scaled_mm_kernel
from helion_fusions.ops.common import poisoned, scratch
from helion_fusions.ops.silu_mul import PER_TOKEN_GROUP_FP8_QUANT, silu_and_mul_reference
from helion_fusions.quant import Quant
from helion_fusions.runtime.checks import (FP8_DTYPES, check_group_scale, check_group_size, check_positive_float,
                                           check_scalar_scale, check_scale_ub, check_tensor, group_scale_view)
from helion_fusions.runtime import dispatch
from helion_fusions.runtime.device import fp8_dtype
from helion_fusions.runtime.library import register
from helion_fusions.runtime.registry import Dim, KernelLaunch, OpSpec, Shape

M_GRID = (1, 16, 64, 128, 512, 2048, 8192)
LAYERS = {  # (N, K) of each fp8 linear layer
    "llama3_8b": ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)),
    "llama3_70b_tp2": ((5120, 8192), (4096, 8192), (28672, 8192), (8192, 14336)),
    "deepseek_v3_block": ((2112, 7168), (24576, 1536), (7168, 2048)),
}
GATE_UP = {  # (I, K) of each model's gate_up projection, for the gate_up + silu-and-mul ops
    "llama3_8b": ((14336, 4096),),
    "llama3_70b_tp2": ((14336, 8192),),
    "deepseek_v3_block": ((2048, 7168),),
}
TUNED_MODELS = {"llama3_8b": 1, "llama3_70b_tp2": 1, "deepseek_v3_block": 128}  # tuned layers, their BLOCK (below)
OUT_DTYPES = (torch.bfloat16, torch.float16)
ROUND_DTYPE = torch.bfloat16  # the unfused path's GEMM output, which the activation and the quant flavours read
GROUP_SIZES = (128,)  # per-group output quant: a group lies inside one N tile
DEFAULT_EPS = 1e-10  # the per-group amax floor, per_token_group_fp8_quant's eps as engines pass it
SPLIT_MAX_M = 128  # split-K for at most this many rows (see split_count)
SPLIT_MAX = 8
SPLIT_SCRATCH_SHARE = 4  # the partial sums' round trip moves at most a quarter of the weight's bytes
SPLIT_MIN_STEPS = 4
SPLIT_MIN_TILE = 32  # the narrowest N tile of the search
ROW_WORDS_MIN_ROWS = 1 << 16  # the per-token row amax scratch's rows at least (512 KiB)
# The problem key's BLOCK dim: 128 for block scales, 1 for one scale over K (per tensor or row; what a shape naming
# only N and K takes). Exact: block-scaled configs are tuned apart (a slice's dot is a second fp32 tile beside the
# sum: on an H200 the row-scale configs' 128 x 256 tiles ran DeepSeek-V3's layers at 110-200 TFLOP/s).
BLOCK_DIM = Dim("BLOCK", (1, SCALE_BLOCK), exact=True, default=1)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_operands(a: Any, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    a = check_tensor("a", a, dtypes=FP8_DTYPES)
    if a.dim() != 2 or (a.size(1) > 1 and a.stride(1) != 1):
        raise ValueError(f"a: expected a row-major [M, K] tensor, got shape {list(a.shape)} strides {list(a.stride())}")
    b = check_tensor("b", b, dtypes=(a.dtype,), device=a.device)
    if b.dim() != 2 or b.size(0) != a.size(1) or (b.size(0) > 1 and b.stride(0) != 1):
        raise ValueError(f"b: expected a column-major [K, N] tensor with K = {a.size(1)} (the transpose of a row-major "
                         f"[N, K] weight), got shape {list(b.shape)} strides {list(b.stride())}")
    for name, dim, size in (("a", "K", a.size(1)), ("b", "N", b.size(1))):
        if size % 16 or size == 0:
            raise ValueError(f"{name}: {dim} = {size} must be a positive multiple of 16")
    return a, b


def _block_scaled(a_scales: torch.Tensor, b_scales: torch.Tensor, m: int, n: int, k: int) -> bool:
    """Whether the scales are block-scaled: ``[M, K / 128]`` and ``[N / 128, K / 128]`` (not both one element)."""
    blocks = _cdiv(k, SCALE_BLOCK)
    return (tuple(a_scales.shape) == (m, blocks) and tuple(b_scales.shape) == (_cdiv(n, SCALE_BLOCK), blocks)
            and a_scales.numel() * b_scales.numel() > 1)


def _check_scales(a_scales: Any, b_scales: Any, m: int, n: int, k: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The scales as the kernel reads them, and whether they are block scales."""
    a_scales = check_tensor("a_scales", a_scales, dtypes=(torch.float32,), device=device)
    b_scales = check_tensor("b_scales", b_scales, dtypes=(torch.float32,), device=device)
    if _block_scaled(a_scales, b_scales, m, n, k):
        return a_scales, b_scales, True
    a_block, b_block = (m, _cdiv(k, SCALE_BLOCK)), (_cdiv(n, SCALE_BLOCK), _cdiv(k, SCALE_BLOCK))
    for name, scales, count, what in (("a_scales", a_scales, m, "M"), ("b_scales", b_scales, n, "N")):
        if scales.numel() not in (1, count) or sum(size > 1 for size in scales.shape) > 1:
            raise ValueError(f"{name}: expected one element, {what} = {count} elements (one per row of the product) "
                             f"or, block-scaled, a_scales {list(a_block)} with b_scales {list(b_block)}; got shape "
                             f"{list(scales.shape)}")
        if not scales.is_contiguous():
            raise ValueError(f"{name}: expected a contiguous tensor, got strides {list(scales.stride())}")
    # A one-element scale is read as a row of equal scales (a stride-0 view): the configs are tuned on the
    # row-scale kernel, and on an H200 the per-tensor variant ran the same config up to 1.4x slower (its bf16
    # tile was stored straight from the MMA layout, without the row-scale kernel's coalescing layout change).
    return a_scales.view(-1).expand(m), b_scales.view(-1).expand(n), False


@functools.cache
def _placeholder(device: torch.device) -> torch.Tensor:
    """Stands in for the tensor arguments a variant never reads."""
    return torch.zeros(1, dtype=torch.float32, device=device)


def _check_weight(b: torch.Tensor, gated: bool) -> int:
    """The output width: N, or I for a gate_up weight ``[K, 2 I]``."""
    if not gated:
        return b.size(1)
    if b.size(1) % 32:
        raise ValueError(f"b: a gate_up weight is [K, 2 * I] ([gate | up] columns) with I a multiple of 16, got "
                         f"{b.size(1)} columns")
    return b.size(1) // 2


def _prepare(out: Any, a: Any, b: Any, a_scales: Any, b_scales: Any, bias: Any, *, flavour: Quant = Quant.NONE,
             gated: bool = False, scale: Any = None, scales: Any = None, group_size: Any = None,
             eps: Any = DEFAULT_EPS, is_scale_transposed: Any = False, scale_ue8m0: Any = False,
             scale_ub: Any = None) -> tuple[KernelLaunch, ...]:
    a, b = _check_operands(a, b)
    (m, k), n_b = a.shape, b.size(1)
    n = _check_weight(b, gated)
    quantized = flavour is not Quant.NONE
    out = check_tensor("out", out, dtypes=(fp8_dtype(a.device),) if quantized else OUT_DTYPES, shape=(m, n),
                       device=a.device)
    if n > 1 and out.stride(1) != 1:
        raise ValueError(f"out: expected a row-major [M, N] tensor, got strides {list(out.stride())}")
    a_s, b_s, block = _check_scales(a_scales, b_scales, m, n_b, k, a.device)
    if block and gated and n % SCALE_BLOCK:
        raise ValueError(f"b: a block-scaled gate_up weight [K, 2 * I] needs I a multiple of {SCALE_BLOCK} (the up "
                         f"half starts a block of b_scales), got I = {n}")
    rounded = ROUND_DTYPE if quantized or gated else out.dtype
    if bias is not None:
        check_tensor("bias", bias, dtypes=(rounded,), shape=(n_b,), device=a.device, contiguous=True)
    group = _group_of(flavour)
    scale_out = scale_in = _placeholder(a.device)  # where the flavour reads none
    scale_out = scale_out.expand(m, 1)  # with M rows, as the kernel checks
    amax_floor = DEFAULT_EPS
    if flavour is Quant.STATIC:
        scale_in = check_scalar_scale("scale", scale, a.device).reshape(1)
    elif flavour is Quant.PER_GROUP:
        group = check_group_size("group_size", group_size, n, GROUP_SIZES)
        scale_out = check_group_scale("scales", scales, m, n // group, a.device, bool(is_scale_transposed))
        amax_floor = check_positive_float("eps", eps)
    elif flavour is Quant.PER_TOKEN:
        scale_out = check_tensor("scales", scales, dtypes=(torch.float32,), shape=(m, 1), device=a.device,
                                 contiguous=True).view(-1)
        if check_scale_ub("scale_ub", scale_ub, a.device):
            scale_in = scale_ub.reshape(1)
        amax_floor = quant.FP8_AMAX_FLOOR
    if m == 0:
        return ()
    after = quantized_after(flavour, m)
    quant_group, group = group, 1 if after else group  # quantized after: the product alone, tiles of any width
    halves = 2 if gated else 1
    shape = (halves, n // group, group)
    splits = split_count(m, n, k, a.device)
    operands = (a, b.view(k, *shape), a_s, b_s if block else b_s.view(shape),
                _placeholder(a.device) if bias is None else bias.view(shape))
    fp8_max = quant.fp8_max_for(out.dtype) if quantized else 448.0

    row_words = _placeholder(a.device).view(torch.int32).view(1, 1).expand(m, 2)

    def launch(phase: Phase, epilogue: Quant, y: torch.Tensor, y_scales: torch.Tensor, y_scale_in: torch.Tensor,
               partials: torch.Tensor, chunk: int = k, grid_split: int = 1) -> KernelLaunch:
        flags = (block, bias is not None, gated, int(epilogue), scale_ub is not None, bool(scale_ue8m0))
        return KernelLaunch(scaled_mm_kernel, (*operands, y.view(m, n // group, group), y_scales, y_scale_in,
                                               row_words, partials, chunk, grid_split, amax_floor, *flags, rounded,
                                               fp8_max, int(phase)),
                            (a.dtype, y.dtype, rounded, n, k, group, *flags, int(phase)),
                            {"M": m, "N": n, "K": k, "BLOCK": SCALE_BLOCK if block else 1}, a.device, out.dtype)

    # the product's launches end in the flavour's epilogue; per token, in the rounded result and its row amaxes
    y, y_scales, epilogue = out, scale_out, flavour
    if flavour is Quant.PER_TOKEN:  # written whole by the product's launches before the last reads them
        y = scratch("scaled_mm.rounded", (m, n), ROUND_DTYPE, a.device)
        # zero between calls (the quantize launch zeroes what it read); made large enough up front that a CUDA
        # graph capture, which cannot zero a new one, rarely needs a new one
        row_words = scratch("scaled_mm.row_words", (max(m, ROW_WORDS_MIN_ROWS), 2), torch.int32, a.device,
                            zeroed=True)[:m]
        epilogue = Quant.GROUP_AMAX
    elif after:
        y, y_scales, epilogue = scratch("scaled_mm.rounded", (m, n), ROUND_DTYPE, a.device), _placeholder(
            a.device).expand(m, 1), Quant.NONE
    if splits == 1:
        launches = [launch(Phase.WHOLE, epilogue, y, y_scales, scale_in,
                           _placeholder(a.device).view(1, 1, 1, 1, 1).expand(1, halves, m, *shape[1:]))]
    else:
        partials = scratch("scaled_mm.partials", (splits, halves, m, *shape[1:]), torch.float32, a.device)
        launches = [launch(Phase.PARTIAL, epilogue, y, y_scales, scale_in, partials, k // splits, splits),
                    launch(Phase.REDUCE, epilogue, y, y_scales, scale_in, partials)]
    if flavour is Quant.PER_TOKEN:
        launches.append(launch(Phase.QUANTIZE, Quant.PER_TOKEN_OF_GROUPS, out, scale_out,
                               row_words.view(torch.float32)[:, :1], y.view(1, 1, m, n // group, group)))
    elif after:
        launches += PER_TOKEN_GROUP_FP8_QUANT.launches(
            input=y, output_q=out, output_s=scale_out, group_size=quant_group, eps=amax_floor, fp8_min=-fp8_max,
            fp8_max=fp8_max, scale_ue8m0=bool(scale_ue8m0))
    return tuple(launches)


def quantized_after(flavour: Quant, m: int) -> bool:
    """Whether a per-group fp8 output is quantized by ``per_token_group_fp8_quant`` after the product (rounded to
    bf16 in a scratch) rather than in the product's epilogue: up to ``SPLIT_MAX_M`` rows, where the product streams
    the weight. The epilogue's tiles are whole 128-column groups, too few programs there. On an H200 the fused op
    took 17.6 us at M = 1 against 10.2 for ``scaled_mm`` (N = K = 4096); gate_up with block scales (I = 2048)
    75-84 us at M = 64-128, and 23-29 quantized after. The choice follows M's config bucket, as the meaning of a
    config's second block size does (columns here, groups in the fused epilogue)."""
    return flavour is Quant.PER_GROUP and m <= SPLIT_MAX_M


def split_count(m: int, n: int, k: int, device: torch.device) -> int:
    """How many K slices (split-K) a product of ``m`` rows and ``n`` output columns (gate_up: ``I``) takes: 1 (no
    split) from ``SPLIT_MAX_M`` rows on, so a product quantizing 128-column groups (:func:`quantized_after`) never.

    Below, the narrowest N tiles the search tries (32 columns) give one row tile's programs, too few to stream
    the weight from every SM: the K depth is split in two, four or eight (each slice at least
    ``SPLIT_MIN_STEPS`` 128-deep steps, ``K`` a multiple of 128) until twice the SM count is reached.
    Each slice's fp32 sums are written and read back, 8 bytes an output element against the fp8 weight's
    ``K`` bytes a column: the slices are capped where that round trip would pass 1 / ``SPLIT_SCRATCH_SHARE``
    of the weight's bytes: at K = 4096 up to 8 slices for 16 rows, 2 for 64 and none for 128; at K = 14336
    4 for 64 rows and 2 for 128 (on an H200, N = 4096, K = 14336: 28-30 us split against 35 unsplit)."""
    if m > SPLIT_MAX_M or k % SCALE_BLOCK or dispatch.batch_invariant():  # a row's sum order would follow M
        return 1
    programs = n // SPLIT_MIN_TILE
    target = 2 * _sm_count(device)
    most_slices = min(SPLIT_MAX, k // (8 * SPLIT_SCRATCH_SHARE * m))
    steps, splits = k // SCALE_BLOCK, 1
    while (programs * splits < target and 2 * splits <= most_slices and steps % (2 * splits) == 0
           and steps // (2 * splits) >= SPLIT_MIN_STEPS):
        splits *= 2
    return splits


@functools.cache
def _shared_memory_bytes() -> int:
    """The shared memory a program may take on this process's GPU (a CPU counts as an H100/H200's 227 KiB)."""
    if not torch.cuda.is_available():
        return 232_448
    return torch.cuda.get_device_properties(torch.cuda.current_device()).shared_memory_per_block_optin


@functools.cache
def _sm_count(device: torch.device) -> int:
    """The device's multiprocessors (a CPU, which runs the kernel interpreted, counts as an H100/H200's 132)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _product(a: torch.Tensor, b: torch.Tensor, a_scales: torch.Tensor, b_scales: torch.Tensor) -> torch.Tensor:
    """``a_scales * (b_scales * (a @ b))`` in fp32; block-scaled, each slice's product and scales added by an FMA."""
    (m, k), n = a.shape, b.size(1)
    if _block_scaled(a_scales, b_scales, m, n, k):
        acc = torch.zeros(m, n, dtype=torch.float32, device=a.device)
        columns = b_scales.repeat_interleave(SCALE_BLOCK, 0)[:n]  # [N, K / 128]
        for index, start in enumerate(range(0, k, SCALE_BLOCK)):
            part = a[:, start:start + SCALE_BLOCK].float() @ b[start:start + SCALE_BLOCK].float()
            acc = quant.fma(part, a_scales[:, index, None] * columns[None, :, index], acc)
        return acc
    return a_scales.reshape(-1, 1) * (b_scales.reshape(1, -1) * (a.float() @ b.float()))


def _activation(a: torch.Tensor, b: torch.Tensor, a_scales: torch.Tensor, b_scales: torch.Tensor,
                bias: torch.Tensor | None, dtype: torch.dtype, gated: bool) -> torch.Tensor:
    """What the unfused path hands to its quant op: the GEMM's output in ``dtype``, then, gated, ``silu_and_mul``."""
    y = _product(a, b, a_scales, b_scales)
    if bias is not None:
        y = y + bias.float()
    y = y.to(dtype)
    return silu_and_mul_reference(y) if gated else y


def _reference(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, a_scales: torch.Tensor, b_scales: torch.Tensor,
               bias: torch.Tensor | None = None, *, flavour: Quant = Quant.NONE, gated: bool = False,
               scale: torch.Tensor | None = None, scales: torch.Tensor | None = None, group_size: int = 0,
               eps: float = DEFAULT_EPS, is_scale_transposed: bool = False, scale_ue8m0: bool = False,
               scale_ub: torch.Tensor | None = None) -> None:
    y = _activation(a, b, a_scales, b_scales, bias, ROUND_DTYPE if flavour is not Quant.NONE else out.dtype, gated)
    if flavour is Quant.NONE:
        out.copy_(y)
    elif flavour is Quant.STATIC:
        quant.quantize_static_reference(y, scale, out)
    elif flavour is Quant.PER_TOKEN:  # as dynamic_per_token_scaled_fp8_quant quantizes the bf16 output
        quant.quantize_per_group_reference(y, out, scales, y.shape[1], scale_ub)
    else:  # as per_token_group_fp8_quant quantizes the bf16 output (its eps is the amax floor)
        scales = group_scale_view(scales, y.shape[0], y.shape[1] // group_size, is_scale_transposed)
        quant.quantize_per_group_reference(y, out, scales, group_size, None, scale_ue8m0, eps)


def _op(function, **bound):
    """``function`` (the host glue or the reference) with the op's flavour bound; the runtime passes the schema's
    arguments by name."""
    def call(**kwargs: Any) -> Any:
        return function(**kwargs, **bound)
    return call


def _inputs(flavour: Quant, gated: bool):
    def make(shape: Shape, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
        """Random fp8 operands with per-token and per-channel scales (the engines' dynamic fp8 GEMM), or with
        block scales where ``shape["BLOCK"]`` is 128.

        The operands are integers in [-8, 8] (drawn as int8): every partial sum is exact in fp32 (K <= 2^18), so any
        accumulation order gives the contract's bytes and the tests compare them exactly. Block scales are
        powers of two within a factor of 4 of each other: each slice's scaled sum (at most 2^13 in magnitude)
        and their total (at most 2^7 slices: K up to 16384) then fit fp32's 24 bits, exact in any order too."""
        m, n, k = shape["M"], shape["N"], shape["K"]
        n_b = 2 * n if gated else n
        generator = torch.Generator(device="cpu").manual_seed(m * 7919 + n * 31 + k)
        fp8 = fp8_dtype(device)

        def operand(rows: int) -> torch.Tensor:
            return torch.randint(-8, 9, (rows, k), generator=generator, dtype=torch.int8).to(fp8).to(device)

        kwargs = {
            "a": operand(m),
            "b": operand(n_b).t(),
            "a_scales": (0.5 + torch.rand(m, 1, generator=generator)).to(device) / 16,
            "b_scales": (0.5 + torch.rand(n_b, generator=generator)).to(device) / (4 * k ** 0.5),
            "bias": None,
        }
        if shape.get("BLOCK", 1) == SCALE_BLOCK:
            blocks, exponent = _cdiv(k, SCALE_BLOCK), round(math.log2(4 * k ** 0.5))
            kwargs.update(
                a_scales=(2.0 ** -(4 + torch.randint(0, 2, (m, blocks), generator=generator))).to(device),
                b_scales=(2.0 ** -(exponent + torch.randint(0, 2, (_cdiv(n_b, SCALE_BLOCK), blocks),
                                                            generator=generator))).to(device))
        if flavour is Quant.STATIC:
            kwargs["scale"] = torch.tensor(0.05, device=device)
        elif flavour is Quant.PER_GROUP:
            group = GROUP_SIZES[0]
            kwargs.update(scales=poisoned((m, n // group), torch.float32, device), group_size=group)
        elif flavour is Quant.PER_TOKEN:
            kwargs["scales"] = poisoned((m, 1), torch.float32, device)
        out_dtype = fp8 if flavour is not Quant.NONE else (dtype if dtype in OUT_DTYPES else torch.bfloat16)
        return {"out": poisoned((m, n), out_dtype, device), **kwargs}
    return make


def _group_of(flavour: Quant) -> int:
    """The output columns a flavour's kernel tiles as one unit (the second block size counts these): the quant
    group of a per-group output, else 1 (a row's per-token amax is an atomic max over tiles of any width)."""
    return GROUP_SIZES[0] if flavour is Quant.PER_GROUP else 1


def _tile(rows: int, columns: int, group: int, **settings: Any) -> helion.Config:
    return helion.Config(block_sizes=[rows, columns // group], **settings)


def _tuning(flavour: Quant, gated: bool):
    def fp32_tiles(shape: Shape) -> int:
        """The fp32 tiles a program holds: the sum (gate_up: two), each with its block-scaled slice's dot beside it."""
        return (2 if gated else 1) * (2 if shape.get("BLOCK", 1) == SCALE_BLOCK else 1)

    def max_tile(shape: Shape) -> int:
        """Each fp32 tile past one halves the largest tile (on an H200 block-scaled gate_up's tiles of 64 x 128 and
        128 x 128 outputs spilled 96-136 bytes a thread, and 128 x 128 took 1.7-1.9x the time)."""
        return 128 * 256 // fp32_tiles(shape)

    def warps(rows: int, columns: int, shape: Shape) -> int:
        """4 warps up to 64 x 128 outputs (four fp32 tiles: 64 x 64), else 8."""
        return 4 if rows * columns * max(1, fp32_tiles(shape) // 2) <= 64 * 128 else 8

    def max_columns(shape: Shape) -> int:  # a block-scaled tile's columns share one b scale (a 128-column block)
        return SCALE_BLOCK if shape.get("BLOCK", 1) == SCALE_BLOCK else 256

    def config_problem(config: dict[str, Any], shape: Shape) -> str | None:
        """What a stored config must not do on its shape: cover more columns than ``max_columns``."""
        columns = config.get("block_sizes", [0, 0])[1] * group_of(shape)
        if columns > max_columns(shape):
            return (f"block_sizes[1] covers {columns} columns; a block-scaled (BLOCK = {SCALE_BLOCK}) tile takes at "
                    f"most {SCALE_BLOCK}, one block of b's scales")
        return None

    def group_of(shape: Shape) -> int:
        """The columns the second block size counts for this shape's product (see :func:`quantized_after`)."""
        return 1 if quantized_after(flavour, shape["M"]) else _group_of(flavour)

    def fits(config: helion.Config, group: int) -> bool:
        """Whether the tile's pipelined fp8 operands (``num_stages`` K steps of ``a`` and of each ``b`` half) fit
        in shared memory: on an H200 the tuner compiled candidates of up to 294,912 bytes against 232,448, each
        failing only when loaded (86 when the family was last tuned)."""
        rows, groups = config.config["block_sizes"]
        halves = 2 if gated else 1
        return config.config["num_stages"] * SCALE_BLOCK * (rows + halves * groups * group) <= _shared_memory_bytes()

    def default_config(shape: Shape) -> helion.Config:
        """M tiles of 16-128 rows (as many as ``max_tile`` leaves) by 128 columns, 3 stages: a 128-deep fp8 tile fits
        Hopper's wgmma."""
        rows = min(16 if shape["M"] <= 16 else 64 if shape["M"] <= 64 else 128, max_tile(shape) // 128)
        return _tile(rows, 128, group_of(shape), num_warps=warps(rows, 128, shape), num_stages=3)

    def seed_configs(shape: Shape) -> list[helion.Config]:
        group, seeds = group_of(shape), [default_config(shape)]
        if shape["M"] > 64:
            seeds += [_tile(r, c, group, num_warps=w, num_stages=s)
                      for r, c, w, s in ((128, 256, 8, 3), (64, 256, 4, 4))
                      if r * c <= max_tile(shape) and c <= max_columns(shape)]
        return [seed for seed in seeds if fits(seed, group)]

    def search_configs(shape: Shape) -> list[helion.Config]:
        """M tiles as tall as the bucket (16 or 64 rows; 64 and 128 from M = 128) by N tiles of whole quant groups
        (block scales from M = 512: 64 or 128 columns); plain, TMA, from M = 2048 grouped 8 M tiles deep along N,
        persistent (not for a one-scale weight stream, M <= 128); 3 and 5 stages to M = 128, then 3 and 4 (5 at 512),
        and 2 for one-scale gate_up, where 64 x 128 tiles over 4 warps fit two programs an SM (80 KiB of shared
        memory, 240 registers a thread): one's silu epilogue beside the other's K loop. Why: gemm_search.md."""
        m, group, block = shape["M"], group_of(shape), shape.get("BLOCK", 1) == SCALE_BLOCK
        rows = (16,) if m <= 16 else (64,) if m <= 64 else (64, 128)
        columns = (32, 64) if m <= 16 else (32, 64, 128) if m <= 128 else (64, 128) if block else (128, 256)
        stages = (3, 5) if m <= 128 else (3,) if m < 512 else (3, 4, 5) if m == 512 else (3, 4)
        stages = (2, *stages) if gated and not block and m >= 512 else stages
        tiles = [_tile(r, c, group, num_warps=warps(r, c, shape), num_stages=s)
                 for r in rows for c in columns for s in stages
                 if c % group == 0 and r * c <= max_tile(shape) and c <= max_columns(shape)]
        variants = [{}, {"indexing": "tensor_descriptor"}]
        variants += [{**variant, "l2_groupings": [8]} for variant in variants] if m >= 2048 else []
        if m > SPLIT_MAX_M or block:
            variants.append({"pid_type": "persistent_interleaved"})
        return [helion.Config(**tile.config, **variant) for tile in tiles if fits(tile, group) for variant in variants]

    return default_config, seed_configs, search_configs, config_problem


def _declare(name: str, schema: str, flavour: Quant = Quant.NONE, gated: bool = False) -> OpSpec:
    default_config, seed_configs, search_configs, config_problem = _tuning(flavour, gated)
    models = tuple({"N": n, "K": k, "BLOCK": block} for model, block in TUNED_MODELS.items()
                   for n, k in (GATE_UP if gated else LAYERS)[model] if n % _group_of(flavour) == 0)
    return register(OpSpec(
        name=name, schema=schema, family="scaled_mm", kernel=scaled_mm_kernel,
        prepare=_op(_prepare, flavour=flavour, gated=gated), reference=_op(_reference, flavour=flavour, gated=gated),
        make_inputs=_inputs(flavour, gated),
        problem=(Dim("M", M_GRID, bucketed=True), Dim("N", tuple(sorted({s["N"] for s in models}))),
                 Dim("K", tuple(sorted({s["K"] for s in models}))), BLOCK_DIM),
        models=models,
        default_config=default_config, seed_configs=seed_configs, search_configs=search_configs,
        config_problem=config_problem, cold_operands=True,
    ))


_OPERANDS = "Tensor! out, Tensor a, Tensor b, Tensor a_scales, Tensor b_scales"
_STATIC = f"({_OPERANDS}, Tensor scale, Tensor? bias=None) -> ()"
_PER_GROUP = (f"({_OPERANDS}, Tensor! scales, int group_size, Tensor? bias=None, float eps=1e-10, "
              "bool is_scale_transposed=False, bool scale_ue8m0=False) -> ()")
_PER_TOKEN = f"({_OPERANDS}, Tensor! scales, Tensor? bias=None, Tensor? scale_ub=None) -> ()"

SCALED_MM = _declare("scaled_mm", f"({_OPERANDS}, Tensor? bias=None) -> ()")
SCALED_MM_STATIC_FP8_QUANT = _declare("scaled_mm_static_fp8_quant", _STATIC, Quant.STATIC)
SCALED_MM_PER_GROUP_FP8_QUANT = _declare("scaled_mm_per_group_fp8_quant", _PER_GROUP, Quant.PER_GROUP)
SCALED_MM_PER_TOKEN_FP8_QUANT = _declare("scaled_mm_per_token_fp8_quant", _PER_TOKEN, Quant.PER_TOKEN)
SCALED_MM_SILU_MUL_STATIC_FP8_QUANT = _declare("scaled_mm_silu_mul_static_fp8_quant", _STATIC, Quant.STATIC,
                                               gated=True)
SCALED_MM_SILU_MUL_PER_GROUP_FP8_QUANT = _declare("scaled_mm_silu_mul_per_group_fp8_quant", _PER_GROUP,
                                                  Quant.PER_GROUP, gated=True)
SCALED_MM_SILU_MUL_PER_TOKEN_FP8_QUANT = _declare("scaled_mm_silu_mul_per_token_fp8_quant", _PER_TOKEN,
                                                  Quant.PER_TOKEN, gated=True)
