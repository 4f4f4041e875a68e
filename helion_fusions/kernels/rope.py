"""Rotary position embedding (RoPE), from one Helion kernel.

For each token ``t`` at position ``p = positions[t]`` and each head, the first ``rot_dim``
dims of the head rotate in pairs ``(a, b)`` by the angle whose cosine and sine are
``cos_sin_cache[p, :rot_dim/2]`` and ``cos_sin_cache[p, rot_dim/2:]``:
``a' = a*cos - b*sin``, ``b' = b*cos + a*sin``, in fp32, rounded once on store. Neox style
pairs ``(i, i + rot_dim/2)``, GPT-J style ``(2i, 2i+1)``; dims past ``rot_dim`` are left
alone (partial rotary).

The host views every head's rotary part as ``[2, rot_dim/2]`` (``[pair member, i]``):
contiguous halves for neox, a stride-2 view for GPT-J, so one kernel body serves both.

Contract notes (shared NUMERICS.md, RoPE family): the cache may be fp32 or the input
dtype; positions are int64. A compiled kernel may contract ``a*cos - b*sin`` into a fused
multiply-add, which rounds once where the eager reference rounds twice: a value can land
on the other side of a rounding tie of the input dtype, bounded like every tie (1e-4).
"""

from __future__ import annotations

from typing import Any

import helion
import helion.language as hl
import torch

from helion_fusions import checks
from helion_fusions.registry import KernelLaunch, OpSpec, register

HEAD_SIZE = 128
KV_HEADS = 8
HIDDEN_GRID = (32 * HEAD_SIZE, 64 * HEAD_SIZE)  # query width: Llama-3-8B (32 heads), Qwen3-32B (64 heads)
TOKEN_GRID = (1, 16, 128, 1024, 8192)
MAX_POSITIONS = 8192


@helion.kernel(static_shapes=False, autotune_effort="none")
def rope_kernel(
    positions: torch.Tensor,  # [T] int64
    x: torch.Tensor,  # [T, H, 2, rot_dim / 2]: the rotary part of every head, as pairs
    cos_sin: torch.Tensor,  # [max_pos, 2, rot_dim / 2]: cos, then sin
) -> None:
    T, H, _, half = x.size()
    half = hl.specialize(half)
    for tile_t, tile_h in hl.tile([T, H]):
        position = positions[tile_t]
        cos = cos_sin[position, 0, :].to(torch.float32)[:, None, :]
        sin = cos_sin[position, 1, :].to(torch.float32)[:, None, :]
        a = x[tile_t, tile_h, 0, :].to(torch.float32)
        b = x[tile_t, tile_h, 1, :].to(torch.float32)
        x[tile_t, tile_h, 0, :] = (a * cos - b * sin).to(x.dtype)
        x[tile_t, tile_h, 1, :] = (b * cos + a * sin).to(x.dtype)


# --- reference ------------------------------------------------------------------------------

def rotate_reference(positions: torch.Tensor, pairs: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Rotate ``pairs`` ([T, H, 2, rot_dim/2] view) in place, as the eager composite does."""
    half = pairs.shape[-1]
    cos = cos_sin_cache[positions, :half].float()[:, None, :]
    sin = cos_sin_cache[positions, half:].float()[:, None, :]
    a, b = pairs[:, :, 0, :].float(), pairs[:, :, 1, :].float()
    rotated_a, rotated_b = a * cos - b * sin, b * cos + a * sin
    pairs[:, :, 0, :] = rotated_a.to(pairs.dtype)
    pairs[:, :, 1, :] = rotated_b.to(pairs.dtype)


# --- host glue ------------------------------------------------------------------------------

def _heads(name: str, value: Any, tokens: int, head_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[T, H * head_size]`` or ``[T, H, head_size]`` as a ``[T, H, head_size]`` view."""
    checks.check_tensor(name, value, dtypes=(dtype,), device=device, last_dim_contiguous=True)
    if value.dim() == 3 and value.shape[0] == tokens and value.shape[2] == head_size:
        return value
    if value.dim() == 2 and value.shape[0] == tokens and value.shape[1] % head_size == 0:
        return value.view(tokens, value.shape[1] // head_size, head_size)
    raise ValueError(f"{name}: expected [{tokens}, num_heads * {head_size}] or [{tokens}, num_heads, {head_size}], "
                     f"got shape {list(value.shape)}")


def _pairs(heads: torch.Tensor, rot_dim: int, is_neox: bool) -> torch.Tensor:
    """The rotary dims of every head as [T, H, 2, rot_dim/2]: (i, i + rot_dim/2) or (2i, 2i+1) pairs."""
    rotary = heads[..., :rot_dim]
    if is_neox:
        return rotary.unflatten(-1, (2, rot_dim // 2))
    return rotary.unflatten(-1, (rot_dim // 2, 2)).transpose(-1, -2)


def _check_rope(positions: Any, query: Any, key: Any, head_size: Any, cos_sin_cache: Any) -> tuple[Any, ...]:
    checks.check_tensor("query", query, dtypes=checks.FLOAT_ACTIVATIONS, last_dim_contiguous=True)
    if query.dim() not in (2, 3):
        raise ValueError(f"query: expected [num_tokens, num_heads * head_size] or [num_tokens, num_heads, head_size], "
                         f"got shape {list(query.shape)}")
    tokens, device, dtype = query.shape[0], query.device, query.dtype
    checks.check_tensor("positions", positions, dtypes=(torch.int64,), shape=(tokens,), device=device)
    if isinstance(head_size, bool) or not isinstance(head_size, int) or head_size <= 0:
        raise ValueError(f"head_size: expected a positive int, got {head_size!r}")
    q = _heads("query", query, tokens, head_size, dtype, device)
    k = None if key is None else _heads("key", key, tokens, head_size, dtype, device)
    checks.check_tensor("cos_sin_cache", cos_sin_cache, dtypes=(torch.float32, dtype), device=device,
                        contiguous=True)
    if cos_sin_cache.dim() != 2:
        raise ValueError(f"cos_sin_cache: expected [max_position, rot_dim], got shape {list(cos_sin_cache.shape)}")
    rot_dim = cos_sin_cache.shape[1]
    if rot_dim % 2 or not 0 < rot_dim <= head_size:
        raise ValueError(f"cos_sin_cache: rot_dim (its last dim) must be even and at most head_size {head_size}, "
                         f"got {rot_dim}")
    return tokens, rot_dim, q, k


def _prepare_rotary(positions, query, key, head_size, cos_sin_cache, is_neox):
    tokens, rot_dim, q, k = _check_rope(positions, query, key, head_size, cos_sin_cache)
    if tokens == 0:
        return ()
    cos_sin = cos_sin_cache.view(cos_sin_cache.shape[0], 2, rot_dim // 2)
    launches = []
    for heads in (q, k):
        if heads is not None:
            pairs = _pairs(heads, rot_dim, bool(is_neox))
            key_ = (query.dtype, cos_sin_cache.dtype, heads.shape[1], head_size, rot_dim, bool(is_neox))
            launches.append(KernelLaunch(rope_kernel, (positions, pairs, cos_sin), key_, tokens,
                                         heads.shape[1] * head_size, query.device, query.dtype))
    return tuple(launches)


def _reference_rotary(positions, query, key, head_size, cos_sin_cache, is_neox):
    tokens, rot_dim, q, k = _check_rope(positions, query, key, head_size, cos_sin_cache)
    for heads in (q, k):
        if heads is not None:
            rotate_reference(positions, _pairs(heads, rot_dim, bool(is_neox)), cos_sin_cache)


# --- tuning grid, seeds and bench inputs -----------------------------------------------------

def default_config(hidden: int) -> helion.Config:
    return helion.Config(block_sizes=[1, 8], num_warps=4)


def seed_configs(hidden: int, tokens: int) -> list[helion.Config]:
    return [helion.Config(block_sizes=[1, h], num_warps=w) for h in (4, 8) for w in (2, 4)]


def search_configs(hidden: int, tokens: int) -> list[helion.Config]:
    return [helion.Config(block_sizes=[t, 16], num_warps=4) for t in (1, 2) if t <= max(tokens, 1)]


def _inputs(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    generator = torch.Generator(device="cpu").manual_seed(tokens * 7919 + hidden)
    head_size = HEAD_SIZE if hidden % HEAD_SIZE == 0 else hidden
    angles = torch.rand(MAX_POSITIONS, head_size // 2, generator=generator) * 6.3
    return {
        "positions": torch.randint(0, MAX_POSITIONS, (tokens,), generator=generator).to(device),
        "query": torch.randn(tokens, hidden, generator=generator).to(dtype=dtype, device=device),
        "key": torch.randn(tokens, KV_HEADS * head_size, generator=generator).to(dtype=dtype, device=device),
        "head_size": head_size,
        "cos_sin_cache": torch.cat([angles.cos(), angles.sin()], dim=-1).to(device),
        "is_neox": True,
    }


ROTARY_EMBEDDING = register(OpSpec(
    name="rotary_embedding",
    schema="(Tensor positions, Tensor! query, Tensor!? key, int head_size, Tensor cos_sin_cache, bool is_neox) -> ()",
    family="rope", kernel=rope_kernel, prepare=_prepare_rotary, reference=_reference_rotary, make_inputs=_inputs,
    default_config=default_config, seed_configs=seed_configs, search_configs=search_configs,
    hidden_sizes=HIDDEN_GRID, token_counts=TOKEN_GRID, read_and_written=("query", "key"),
))
