"""Device identity: a canonical name (``nvidia_h200``), its architecture family (``nvidia_sm90``) and fp8 flavour."""

from __future__ import annotations

import dataclasses
import functools

import torch


@dataclasses.dataclass(frozen=True)
class DeviceIdentity:
    """Canonical device name (``nvidia_h200``), its architecture family (``nvidia_sm90``) and fp8 flavour."""

    name: str
    family: str
    fp8_dtype: torch.dtype


_KNOWN_MODELS = ("h100", "h200", "h20", "gh200", "b200", "b300", "gb200", "a100", "l40s", "l4",
                 "mi300x", "mi300a", "mi325x", "mi350x", "mi355x")


def canonical_device_name(raw_name: str, vendor: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``nvidia_h100``; unknown models keep their whole name."""
    tokens = [t for t in raw_name.lower().replace("-", " ").split() if t not in {"nvidia", "amd", "instinct", "tesla"}]
    for token in tokens:
        if token in _KNOWN_MODELS:
            return f"{vendor}_{token}"
    model = "_".join(filter(None, ("".join(ch for ch in t if ch.isalnum()) for t in tokens)))
    return f"{vendor}_{model or 'unknown'}"


@functools.cache
def device_identity(index: int = 0) -> DeviceIdentity:
    props = torch.cuda.get_device_properties(index)
    if torch.version.hip is not None:
        arch = props.gcnArchName.split(":")[0]
        fp8 = torch.float8_e4m3fnuz if arch == "gfx942" else torch.float8_e4m3fn
        return DeviceIdentity(canonical_device_name(props.name, "amd"), f"amd_{arch}", fp8)
    return DeviceIdentity(canonical_device_name(props.name, "nvidia"), f"nvidia_sm{props.major}{props.minor}",
                          torch.float8_e4m3fn)


def fp8_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The fp8 dtype engines use on ``device``: e4m3fnuz on MI300 (gfx942), e4m3fn elsewhere."""
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        return torch.float8_e4m3fn
    return device_identity(device.index or 0).fp8_dtype
