"""What the ops modules share: output buffers of the quant flavours and their checks, the engine's static scale
layouts, scratch buffers, and poisoned buffers.

The ops write into tensors they are given (the engine's schemas); the plain Python
functions in :mod:`helion_fusions.functional` allocate those tensors with these helpers,
and the bench and test inputs poison the same buffers.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from helion_fusions import quant
from helion_fusions.quant import Quant, StaticScale
from helion_fusions.runtime.checks import check_group_size, check_like, check_tensor
from helion_fusions.runtime.device import fp8_dtype
from helion_fusions.runtime.registry import Outputs

_POISON_BYTE = 0x7F  # NaN in e4m3fn, a large value in every other dtype


_scratch: dict[tuple[str, torch.device], torch.Tensor] = {}


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
            zeroed: bool = False) -> torch.Tensor:
    """A ``shape`` view of the buffer ``name`` that every call on ``device`` shares, for what an op's launches
    write whole before they read it (split-K sums, a result kept for a second launch), or, ``zeroed``, for
    words that start at zero and that the launches leave at zero (atomic maxima and counts).

    An engine calls an op with thousands of token counts, and a launch plan keeps the tensors its launches
    were given: a buffer of their own per plan would add up to gigabytes. The shared one grows by doubling; a
    plan keeps the buffer it got (an outgrown one lives on with its plans: at most as much again). Calls that
    share a buffer must not overlap in time: one stream, or streams that wait for each other.
    """
    numel = math.prod(shape)
    buffer = _scratch.get((name, device))
    if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
        if zeroed and device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # made inside a capture, its zero fill would only run on replay: the words would start as garbage
            raise RuntimeError(f"helion_fusions: the scratch buffer {name!r} ({numel} elements) was first needed on "
                               f"{device} inside CUDA-graph capture; call helion_fusions.warmup() before capturing "
                               "(up to the largest token count captured)")
        grown = 0 if buffer is None or buffer.dtype != dtype else 2 * buffer.numel()
        buffer = _scratch[(name, device)] = (torch.zeros if zeroed else torch.empty)(max(numel, grown), dtype=dtype,
                                                                                     device=device)
    return buffer[:numel].view(shape)


def poisoned(shape: tuple[int, ...] | list[int], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An output buffer whose every byte is 0x7F, so unwritten elements show."""
    tensor = torch.empty(shape, dtype=dtype, device=device)
    tensor.view(-1).view(torch.uint8).fill_(_POISON_BYTE)  # view(-1): a 0-dim tensor has no byte view
    return tensor


def poison_(tensor: torch.Tensor) -> torch.Tensor:
    """Fill every byte of ``tensor``'s elements with 0x7F in place; any strides (a column-major scale view too)."""
    if tensor.is_contiguous():
        tensor.view(torch.uint8).fill_(_POISON_BYTE)
    else:
        tensor.copy_(poisoned(tuple(tensor.shape), tensor.dtype, tensor.device))
    return tensor


def bench_group(hidden: int) -> int:
    """The group size bench and test inputs use: 128 (the tuned one) where it divides ``hidden``, else 64."""
    return 128 if hidden % 128 == 0 else 64


def group_scales(tokens: int, groups: int, device: torch.device, column_major: bool = False,
                 tma_aligned: bool = False) -> torch.Tensor:
    """fp32 per-group scales ``[T, groups]``: row-major, column-major, or column-major with the column
    stride rounded up to 4 rows (TMA-aligned, as block-scaled GEMMs read them)."""
    if tma_aligned:
        return torch.empty_strided((tokens, groups), (1, max(1, -(-tokens // 4) * 4)), dtype=torch.float32,
                                   device=device)
    if column_major:
        return torch.empty(groups, tokens, dtype=torch.float32, device=device).t()
    return torch.empty(tokens, groups, dtype=torch.float32, device=device)


def quant_outputs(flavour: Quant, call: dict[str, Any], tokens: int, hidden: int,
                  group_sizes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(result, scale)`` of a quant flavour for a call on ``[tokens, hidden]`` activations, uninitialised.

    ``result`` is the activation dtype (no quant), the device's fp8 dtype, or packed e2m1 bytes
    ``[T, H/2]``. ``scale`` is None (no quant, static), ``[1]`` (per tensor), ``[T, 1]`` (per token),
    per-group scales laid out as the call's engine flags ask (``is_scale_transposed``, or
    ``per_token_group_fp8_quant``'s ``dummy_is_scale_transposed`` / ``dummy_is_tma_aligned``; see
    :func:`group_scales`), or nvfp4 block scales as fp8 e4m3, swizzled (rows padded to 128, columns to
    4; ``is_sf_swizzled_layout``) or linear ``[T, H/16]``.
    """
    device = call["input"].device
    if flavour is Quant.NONE:
        return torch.empty(tokens, hidden, dtype=call["input"].dtype, device=device), None
    if flavour is Quant.NVFP4:
        blocks = hidden // quant.NVFP4_BLOCK
        swizzled = bool(call["is_sf_swizzled_layout"])
        rows, cols = quant.swizzled_scale_shape(tokens, blocks) if swizzled else (tokens, blocks)
        return (torch.empty(tokens, hidden // 2, dtype=torch.uint8, device=device),
                torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device=device))
    result = torch.empty(tokens, hidden, dtype=fp8_dtype(device), device=device)
    if flavour is Quant.STATIC:
        return result, None
    if flavour is Quant.PER_TENSOR:
        return result, torch.empty(1, dtype=torch.float32, device=device)
    if flavour is Quant.PER_TOKEN:
        return result, torch.empty(tokens, 1, dtype=torch.float32, device=device)
    group = check_group_size("group_size", call["group_size"], hidden, group_sizes)
    column_major = bool(call.get("is_scale_transposed", call.get("dummy_is_scale_transposed")))
    return result, group_scales(tokens, hidden // group, device, column_major, bool(call.get("dummy_is_tma_aligned")))


def kernel_view(out: torch.Tensor, flavour: Quant, tokens: int, groups: int) -> torch.Tensor:
    """A result as the kernels address it: ``[T, NG, G]``, or for nvfp4 the packed bytes as int32
    ``[T, NG, 2]``, two words per block of 16 (``quant.e2m1_words``; ``check_nvfp4_outputs`` checks the
    alignment that needs)."""
    if flavour is Quant.NVFP4:
        return out.view(torch.int32).unflatten(1, (groups, 2))
    return out.view(tokens, groups, out.shape[1] // groups)


def quant_output_spec(flavour: Quant, names: dict[str, str], check: Callable[[dict[str, Any]], tuple[int, int]],
                      group_sizes: tuple[int, ...]) -> Outputs:
    """The :class:`Outputs` of an op ending in a quant flavour: its ``result``, and its ``scale`` unless the
    flavour has none (no quant, static). ``names`` maps those roles to the op's argument names; ``check``
    validates a call's activation arguments and returns ``(tokens, hidden)``."""
    roles = ("result",) if flavour in (Quant.NONE, Quant.STATIC) else ("result", "scale")

    def allocate(call: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        tokens, hidden = check(call)
        return {names[role]: tensor
                for role, tensor in zip(roles, quant_outputs(flavour, call, tokens, hidden, group_sizes))}
    return Outputs(tuple(names[role] for role in roles), allocate)


def check_nvfp4_outputs(result_name: str, result: object, scale_name: str, scale: object, tokens: int, hidden: int,
                        device: torch.device, swizzled: bool) -> torch.Tensor:
    """Packed e2m1 [T, H/2] and block scales; returns the scales as flat bytes (a swizzled layout's padding,
    which block-scaled GEMMs read, is the kernel's to zero)."""
    if hidden % quant.NVFP4_BLOCK:
        raise ValueError(f"input: nvfp4 needs a hidden size divisible by {quant.NVFP4_BLOCK}, got {hidden}")
    check_like(result_name, result, (tokens, hidden // 2), device, (torch.uint8,))
    # kernels store each block's 8 bytes as two int32 words
    if result.data_ptr() % 4 or result.stride(0) % 4:
        raise ValueError(f"{result_name}: nvfp4 blocks are stored as 4-byte words, so each row must start at a "
                         f"4-byte boundary; got data_ptr % 4 = {result.data_ptr() % 4} and row stride "
                         f"{result.stride(0)}")
    check_tensor(scale_name, scale, dtypes=(torch.uint8, torch.float8_e4m3fn, torch.int32), device=device,
                 contiguous=True)
    cols = hidden // quant.NVFP4_BLOCK
    rows_padded, cols_padded = quant.swizzled_scale_shape(tokens, cols) if swizzled else (tokens, cols)
    if scale.numel() * scale.element_size() != rows_padded * cols_padded:
        layout = "swizzled (rows padded to 128, columns to 4)" if swizzled else "linear"
        raise ValueError(f"{scale_name}: the {layout} layout needs {rows_padded}x{cols_padded} bytes, got shape "
                         f"{list(scale.shape)} of {scale.dtype}")
    if swizzled and scale.data_ptr() % 4:
        raise ValueError(f"{scale_name}: the swizzled layout is written in 4-byte words, so it must start at a 4-byte "
                         f"boundary; got data_ptr % 4 = {scale.data_ptr() % 4}")
    return scale.view(torch.uint8).view(-1)


def static_scale(scale: Any, group_shape: Any, tokens: int, hidden: int,
                  device: torch.device) -> tuple[StaticScale, torch.Tensor, int, int]:
    """(layout, scale as the kernel reads it, group_m, group_n), read as the engine op reads them: one element is
    per tensor; a 2-D ``[T / group_m, H / group_n]`` scale (any strides) gives the groups, which a
    ``group_shape`` (-1: the whole dim) must then match; a 1-D scale needs ``group_shape`` and one scale row or
    column. Per-token ``(1, H)`` and per-channel ``(T, 1)`` groups take their own fast layouts."""
    check_tensor("scale", scale, dtypes=(torch.float32,), device=device)
    if group_shape is not None and (len(group_shape) != 2 or any(
            isinstance(g, bool) or not isinstance(g, int) or not (g == -1 or g > 0) for g in group_shape)):
        raise ValueError(f"group_shape: expected two ints (group_m, group_n), each positive or -1, "
                         f"got {list(group_shape)}")
    wanted = None if group_shape is None else (
        tokens if group_shape[0] == -1 else group_shape[0], hidden if group_shape[1] == -1 else group_shape[1])
    if scale.numel() == 1:
        return StaticScale.TENSOR, scale.reshape(1), max(tokens, 1), hidden
    if scale.dim() == 1:
        if wanted is None:
            raise ValueError(f"scale: a 1-D scale of {scale.numel()} elements needs group_shape")
        if scale.numel() == hidden // wanted[1] and tokens // wanted[0] == 1:
            scale = scale.view(1, -1)  # one row of column groups
        elif scale.numel() == tokens // wanted[0] and hidden // wanted[1] == 1:
            scale = scale.view(-1, 1)  # one column of token groups
        else:
            raise ValueError(f"scale: a 1-D scale must hold one row or one column of group_shape "
                             f"{list(group_shape)} groups of a [{tokens}, {hidden}] input, got {scale.numel()} "
                             "elements")
    if scale.dim() != 2 or tokens % scale.shape[0] or hidden % scale.shape[1]:
        raise ValueError(f"scale: expected one element, or [T / group_m, H / group_n] dividing the input "
                         f"[{tokens}, {hidden}], got shape {list(scale.shape)}")
    group_m, group_n = max(tokens // scale.shape[0], 1), hidden // scale.shape[1]
    if wanted is not None and wanted != (group_m, group_n) and tokens:
        raise ValueError(f"group_shape: {list(group_shape)} does not match the scale's groups "
                         f"({group_m}, {group_n}) of a [{tokens}, {hidden}] input")
    # views, never copies: a launch plan reads the scale's storage again on every call
    if group_n == hidden and group_m == 1:
        return StaticScale.TOKEN, scale.as_strided((tokens,), (scale.stride(0),)), group_m, group_n
    if group_n == 1 and scale.shape[0] == 1:
        return StaticScale.CHANNEL, scale.as_strided((hidden,), (scale.stride(1),)), group_m, group_n
    return StaticScale.GROUP, scale, group_m, group_n
