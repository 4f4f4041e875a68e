"""Argument checks shared by every op's host wrapper.

Errors are ``TypeError`` (wrong dtype or kind) or ``ValueError`` (wrong shape, device,
layout or value), and each message names the offending argument and what was expected.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

FLOAT_ACTIVATIONS = (torch.bfloat16, torch.float16, torch.float32)
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    value: object,
    *,
    dtypes: Sequence[torch.dtype] | None = None,
    shape: Sequence[int] | None = None,
    device: torch.device | None = None,
    last_dim_contiguous: bool = False,
    contiguous: bool = False,
) -> torch.Tensor:
    # on every op call: keep the passing path to plain attribute reads and comparisons
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {_names(dtypes)}, got {str(value.dtype).replace('torch.', '')}")
    if shape is not None and value.shape != shape:
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of input), got {value.device}")
    if last_dim_contiguous and value.stride(-1) != 1 and value.dim() and value.size(-1) > 1:
        raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got strides {list(value.stride())}")
    if contiguous and not value.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor, got strides {list(value.stride())}")
    return value


def check_input_2d(name: str, value: object) -> torch.Tensor:
    tensor = check_tensor(name, value, dtypes=FLOAT_ACTIVATIONS, last_dim_contiguous=True)
    if tensor.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D [num_tokens, hidden_size] tensor, got shape {list(tensor.shape)}")
    if tensor.size(1) == 0:
        raise ValueError(f"{name}: hidden size must be positive, got shape {list(tensor.shape)}")
    return tensor


def check_scalar_scale(name: str, value: object, device: torch.device) -> torch.Tensor:
    tensor = check_tensor(name, value, dtypes=(torch.float32,), device=device)
    if tensor.numel() != 1:
        raise ValueError(f"{name}: expected a one-element float32 tensor, got shape {list(tensor.shape)}")
    return tensor


def check_group_size(name: str, group_size: object, hidden: int, allowed: Sequence[int]) -> int:
    if not isinstance(group_size, int) or group_size not in allowed:
        raise ValueError(f"{name}: expected one of {list(allowed)}, got {group_size!r}")
    if hidden % group_size:
        raise ValueError(f"{name}: {group_size} does not divide the hidden size {hidden}")
    return group_size


def check_positive_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name}: expected a positive float, got {value!r}")
    return float(value)


def check_like(name: str, value: object, shape: Sequence[int], device: torch.device,
               dtypes: Sequence[torch.dtype]) -> torch.Tensor:
    """An output or residual laid out like a row-major activation (last dim contiguous)."""
    return check_tensor(name, value, dtypes=dtypes, shape=shape, device=device, last_dim_contiguous=True)


def check_scale_ub(name: str, value: object, device: torch.device) -> bool:
    """An optional one-element bound on the amax; returns whether one was given."""
    if value is None:
        return False
    check_scalar_scale(name, value, device)
    return True


def group_scale_view(scale: object, tokens: int, groups: int, is_scale_transposed: bool | None) -> object:
    """Transposed per-group scales given as a row-major ``[groups, tokens]`` tensor (as engines allocate them),
    seen as the ``[tokens, groups]`` column-major view the ops write; any other value as it is."""
    if (is_scale_transposed and isinstance(scale, torch.Tensor) and scale.dim() == 2
            and tuple(scale.shape) == (groups, tokens) and (scale.stride(1) == 1 or tokens == 1)):
        return scale.t()
    return scale


def check_group_scale(name: str, scale: object, tokens: int, groups: int, device: torch.device,
                      is_scale_transposed: bool | None) -> torch.Tensor:
    """Per-group fp32 scales [T, H/g] (or, transposed, [H/g, T] row-major: see :func:`group_scale_view`);
    with ``is_scale_transposed`` given, the layout must match. Returns the [T, H/g] view."""
    scale = group_scale_view(scale, tokens, groups, is_scale_transposed)
    check_tensor(name, scale, dtypes=(torch.float32,), shape=(tokens, groups), device=device)
    if is_scale_transposed is not None and tokens > 1 and groups > 1:
        major = scale.stride(0) == 1 if is_scale_transposed else scale.stride(1) == 1
        if not major:
            layout = "column-major (stride(0) == 1)" if is_scale_transposed else "row-major (stride(1) == 1)"
            raise ValueError(f"{name}: is_scale_transposed={is_scale_transposed} expects a {layout} scale tensor, "
                             f"got strides {list(scale.stride())}")
    return scale


def check_fp8_range(output: torch.Tensor, fp8_min: Any, fp8_max: Any) -> float:
    """A symmetric ``[fp8_min, fp8_max]`` range within ``output``'s fp8 dtype; returns ``fp8_max``."""
    fp8_max = check_positive_float("fp8_max", fp8_max)
    if fp8_max > torch.finfo(output.dtype).max:
        raise ValueError(f"fp8_max: {fp8_max} exceeds the largest {output.dtype} value {torch.finfo(output.dtype).max}")
    if isinstance(fp8_min, bool) or not isinstance(fp8_min, (int, float)) or fp8_min != -fp8_max:
        raise ValueError(f"fp8_min: expected -fp8_max ({-fp8_max}), got {fp8_min!r}")
    return fp8_max
