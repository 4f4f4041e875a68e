"""Rotary position embedding (RoPE): in place, fused with q/k RMSNorm, or with static fp8 output.

For each token ``t`` at position ``p = positions[t]`` and each head, the first ``rot_dim``
dims of the head rotate in pairs ``(a, b)`` by the angle whose cosine and sine are
``cos_sin_cache[p, :rot_dim/2]`` and ``cos_sin_cache[p, rot_dim/2:]``:
``a' = a*cos - b*sin``, ``b' = b*cos + a*sin``, in fp32, rounded once on store. Neox style
pairs ``(i, i + rot_dim/2)``, GPT-J style ``(2i, 2i+1)``; dims past ``rot_dim`` are left
alone (partial rotary).

Contract notes (the README's numerics section, RoPE family): positions are int64. A position with
no row in the cos/sin cache (negative, or past its end) skips the token's rotation (cos 1, sin 0):
nothing is read out of bounds, and the rest of the op (norm, quant, cache write) goes on with the
unrotated values. The rotation's products are rounded on their own (``mul_rn``), as the eager
composite rounds them, so the rotated values match it bit for bit.

The launch glue here (:func:`rope_launch`) also serves the KV-cache ops (:mod:`helion_fusions.ops.kv_cache`).
"""

from __future__ import annotations

from typing import Any

import helion
import torch

from helion_fusions import quant
from helion_fusions.kernels.rope import rope_kernel, sum_of_squares
from helion_fusions.ops.common import poison_
from helion_fusions.quant import div_rn
from helion_fusions.runtime import checks
from helion_fusions.runtime.device import fp8_dtype
from helion_fusions.runtime.launcher import storage_base
from helion_fusions.runtime.library import register
from helion_fusions.runtime.registry import (
    Dim,
    KernelLaunch,
    OpSpec,
    Outputs,
    Shape,
    tokens_dim,
)

HEAD_SIZE = 128
KV_HEADS = 8
HIDDEN_GRID = (32 * HEAD_SIZE, 64 * HEAD_SIZE)  # query width: Llama-3-8B (32 heads), Qwen3-32B (64 heads)
TOKEN_GRID = (1, 16, 128, 1024, 8192)
MAX_POSITIONS = 8192


def rotate_reference(positions: torch.Tensor, pairs: torch.Tensor, cos_sin_cache: torch.Tensor,
                     round_products: bool = False, inverse: bool = False) -> None:
    """Rotate ``pairs`` ([T, H, 2, rot_dim/2] view) in place, as the eager composite does: fp32 products
    and sums, rounded once, or with each product rounded to the input dtype first (``round_products``).

    A token whose position has no row in ``cos_sin_cache`` is not rotated (cos 1, sin 0). ``inverse``
    rotates by the negated angle (sin negated), undoing the rotation.
    """
    in_range = (positions >= 0) & (positions < cos_sin_cache.shape[0])
    positions = torch.where(in_range, positions, 0)
    half, keep = pairs.shape[-1], in_range[:, None, None]
    cos = torch.where(keep, cos_sin_cache[positions, :half].float()[:, None, :], 1.0)
    sin = torch.where(keep, cos_sin_cache[positions, half:].float()[:, None, :], 0.0)
    if inverse:
        sin = -sin
    a, b = pairs[:, :, 0, :].float(), pairs[:, :, 1, :].float()
    ac, bs, bc, as_ = a * cos, b * sin, b * cos, a * sin
    if round_products:
        ac, bs, bc, as_ = (p.to(pairs.dtype).float() for p in (ac, bs, bc, as_))
    rotated_a, rotated_b = ac - bs, bc + as_  # both before either store: a, b may alias pairs
    pairs[:, :, 0, :] = rotated_a.to(pairs.dtype)
    pairs[:, :, 1, :] = rotated_b.to(pairs.dtype)


# --- host glue ------------------------------------------------------------------------------

def heads_view(name: str, value: Any, tokens: int, head_size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[T, H * head_size]`` or ``[T, H, head_size]`` as a ``[T, H, head_size]`` view."""
    checks.check_tensor(name, value, dtypes=(dtype,), device=device, last_dim_contiguous=True)
    if value.dim() == 3 and value.shape[0] == tokens and value.shape[2] == head_size:
        return value
    if value.dim() == 2 and value.shape[0] == tokens and value.shape[1] % head_size == 0:
        return value.view(tokens, value.shape[1] // head_size, head_size)
    raise ValueError(f"{name}: expected [{tokens}, num_heads * {head_size}] or [{tokens}, num_heads, {head_size}], "
                     f"got shape {list(value.shape)}")


def rotary_pairs(heads: torch.Tensor, rot_dim: int, is_neox: bool, offset: int = 0) -> torch.Tensor:
    """The rotary dims of every head (``offset`` on) as [T, H, 2, rot_dim/2]: (i, i + rot_dim/2) or (2i, 2i+1)."""
    # view/transpose, not unflatten: this runs on every call, and unflatten is a Python-level wrapper
    rotary = heads[..., offset:offset + rot_dim]
    *lead, _ = rotary.shape
    if is_neox:
        return rotary.view(*lead, 2, rot_dim // 2)
    return rotary.view(*lead, rot_dim // 2, 2).transpose(-1, -2)


def check_rope(positions: Any, query: Any, key: Any, head_size: Any, cos_sin_cache: Any,
                positions_name: str = "positions") -> tuple[Any, ...]:
    checks.check_tensor("query", query, dtypes=checks.FLOAT_ACTIVATIONS, last_dim_contiguous=True)
    if query.dim() not in (2, 3):
        raise ValueError(f"query: expected [num_tokens, num_heads * head_size] or [num_tokens, num_heads, head_size], "
                         f"got shape {list(query.shape)}")
    tokens, device, dtype = query.shape[0], query.device, query.dtype
    checks.check_tensor(positions_name, positions, dtypes=(torch.int64,), shape=(tokens,), device=device)
    if isinstance(head_size, bool) or not isinstance(head_size, int) or head_size <= 0:
        raise ValueError(f"head_size: expected a positive int, got {head_size!r}")
    q = heads_view("query", query, tokens, head_size, dtype, device)
    k = None if key is None else heads_view("key", key, tokens, head_size, dtype, device)
    checks.check_tensor("cos_sin_cache", cos_sin_cache, dtypes=(torch.float32, dtype), device=device,
                        contiguous=True)
    if cos_sin_cache.dim() != 2:
        raise ValueError(f"cos_sin_cache: expected [max_position, rot_dim], got shape {list(cos_sin_cache.shape)}")
    rot_dim = cos_sin_cache.shape[1]
    if rot_dim % 2 or not 0 < rot_dim <= head_size:
        raise ValueError(f"cos_sin_cache: rot_dim (its last dim) must be even and at most head_size {head_size}, "
                         f"got {rot_dim}")
    return tokens, rot_dim, q, k


def _flat(cache: torch.Tensor) -> torch.Tensor:
    """The elements a cache view spans, as a flat view of its storage (the kernel adds the strides itself)."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(cache.shape, cache.stride()))
    return cache.as_strided((span,), (1,), cache.storage_offset())


def _weight_pairs(weight: torch.Tensor, rot_dim: int, is_neox: bool) -> torch.Tensor:
    """A norm weight's rotary dims as [2, rot_dim/2], paired like the heads."""
    return rotary_pairs(weight.view(1, 1, -1), rot_dim, is_neox)[0, 0]


def rope_launch(positions, q, k, cos_sin_cache, rot_dim, is_neox, cache=None, norm=None, hidden=None,
            query=True, quant=None, rotate=True, offset=0, round_products=False,
            inverse=False) -> tuple[KernelLaunch, ...]:
    """One launch: the key heads (normalized, rotated, written to the cache, as asked), then the query heads."""
    tokens = q.shape[0]
    if tokens == 0:
        return ()
    if k is not None and query and _loops_share_storage(q, k, quant):
        # The kernel's two loops would touch one storage, one of them writing: Helion then orders the loops
        # with a persistent schedule, several times slower. Adjacent heads (q and k split from one qkv)
        # rotate as one set of heads in one loop; otherwise the key heads and the query heads get a launch each.
        hidden = q.shape[1] * q.shape[2] if hidden is None else hidden
        same = dict(rotate=rotate, offset=offset, round_products=round_products, inverse=inverse, hidden=hidden)
        heads = _adjacent_heads(q, k) if quant is None and cache is None and norm is None else None
        if heads is not None:
            return rope_launch(positions, q[:, :1], heads, cos_sin_cache, rot_dim, is_neox, query=False, **same)
        query_quant = None if quant is None else (quant[0], None, quant[2], None, quant[4])
        return (rope_launch(positions, q[:, :1], k, cos_sin_cache, rot_dim, is_neox, cache, norm, query=False,
                            quant=quant, **same)
                + rope_launch(positions, q, None, cos_sin_cache, rot_dim, is_neox, quant=query_quant, **same))
    head_size = q.shape[2]
    has_tail = rot_dim < head_size
    cos_sin = cos_sin_cache.view(cos_sin_cache.shape[0], 2, rot_dim // 2)
    q_pairs = rotary_pairs(q, rot_dim, is_neox, offset)  # a nonzero offset comes only with in-place rope
    k_pairs = q_pairs if k is None else rotary_pairs(k, rot_dim, is_neox, offset)
    spare = q[:]  # stands in for unused [T, H, D] arguments (a view: an argument may not be another's base)
    key_tail = k[:, :, rot_dim:] if has_tail and k is not None else spare
    query_tail = q[:, :, rot_dim:] if has_tail else spare
    if quant is None:
        quant_args = (spare, q_pairs, spare, q_pairs, spare, positions)  # never read without Q_QUANT / K_QUANT
        q_quant = k_quant = False
    else:  # (q_out heads, k_out heads or None, q_scale, k_scale or None, fp8_max)
        q_out, k_out, q_scale, k_scale_out, fp8_max_out = quant
        q_quant, k_quant = True, k_out is not None
        k_out = k_out if k_quant else q_out
        quant_args = (query_tail, rotary_pairs(q_out, rot_dim, is_neox), q_out[:, :, rot_dim:] if has_tail else q_out,
                      rotary_pairs(k_out, rot_dim, is_neox), k_out[:, :, rot_dim:] if has_tail else k_out, q_scale)
    if norm is None:
        norm_args = (positions,) * 4 + (0, 0.0)  # never read without NORM
    else:
        q_weight, k_weight, query_heads, eps = norm
        norm_args = (_weight_pairs(q_weight, rot_dim, is_neox), q_weight[rot_dim:] if has_tail else q_weight,
                     _weight_pairs(k_weight, rot_dim, is_neox), k_weight[rot_dim:] if has_tail else k_weight,
                     query_heads, float(eps))
    quant_fp8_max = 0.0 if quant is None else quant[4]
    if cache is None:
        k_scale = quant[3] if quant is not None and quant[3] is not None else positions
        cache_args = (positions, spare, positions, positions, positions, k_scale, positions, 1, 0,
                      *(0,) * 8)  # never read
        has_cache, fp8_cache, per_head, fp8_max, ds_mla = False, False, False, quant_fp8_max, False
    else:
        # ds_scales: the fp8_ds_mla value cache's storage as fp32 words (its tile scales), else None
        slots, value, key_cache, value_cache, k_scale, v_scale, cache_fp8_max, ds_scales = cache
        num_blocks, block_size = key_cache.shape[:2]
        ds_mla = ds_scales is not None
        cache_args = (slots, value, _flat(key_cache), _flat(value_cache), _flat(ds_scales) if ds_mla else k_scale,
                      k_scale, v_scale, block_size, num_blocks * block_size, *key_cache.stride(),
                      *value_cache.stride())
        # one fp8 flavour per device: a quantized query and an fp8 cache share the bound; the fp8_ds_mla
        # cache keeps its rope dims as they are
        has_cache, fp8_cache, per_head = True, cache_fp8_max > 0 and not ds_mla, k_scale.numel() > 1
        fp8_max = max(cache_fp8_max, quant_fp8_max)
    flags = (rotate, query, k is not None, has_cache, has_tail, is_neox, fp8_cache, per_head, fp8_max, norm is not None,
             q_quant, k_quant, round_products, inverse, ds_mla)
    args = (positions, q_pairs, k_pairs, cos_sin, cache_args[0], key_tail, *quant_args, *norm_args, *cache_args[1:],
            *flags)
    key = (q.dtype, cos_sin_cache.dtype, q.shape[1], k_pairs.shape[1], head_size, rot_dim,
           None if cache is None else (cache[2].dtype, cache[1].shape[2]), *flags)
    hidden = q.shape[1] * head_size if hidden is None else hidden  # the query width picks the config
    return (KernelLaunch(rope_kernel, args, key, {"T": tokens, "H": hidden}, q.device, q.dtype),)


def _shares_storage(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and storage_base(a) == storage_base(b)


def _loops_share_storage(q: torch.Tensor, k: torch.Tensor, quant: tuple[Any, ...] | None) -> bool:
    """Whether the key loop and the query loop touch one storage with at least one of them writing it:
    each loop writes its heads in place, or its fp8 output (``quant``; the key has none in some ops)."""
    q_out, k_out = (None, None) if quant is None else quant[:2]
    q_written = q if q_out is None else q_out
    k_written = k if k_out is None else k_out
    return (any(_shares_storage(k_written, other) for other in (q, q_out))
            or any(_shares_storage(other, q_written) for other in (k, k_out)))


def _adjacent_heads(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """q's and k's heads as one ``[T, HQ + HK, head_size]`` view where k's heads follow q's in memory, else None."""
    follows = k.data_ptr() == q.data_ptr() + q.shape[1] * q.stride(1) * q.element_size()
    # one token's view has no meaningful token stride (a view of a one-row slice takes its own width)
    if not follows or q.stride()[q.shape[0] == 1:] != k.stride()[k.shape[0] == 1:]:
        return None
    return q.as_strided((q.shape[0], q.shape[1] + k.shape[1], q.shape[2]), q.stride())


def _check_offset(rope_dim_offset: Any, rot_dim: int, head_size: int) -> int:
    if isinstance(rope_dim_offset, bool) or not isinstance(rope_dim_offset, int) or not (
            0 <= rope_dim_offset <= head_size - rot_dim):
        raise ValueError(f"rope_dim_offset: expected an int in [0, head_size - rot_dim] = [0, {head_size - rot_dim}], "
                         f"got {rope_dim_offset!r}")
    return rope_dim_offset


def _tokens_view(name: str, value: Any, batch_dims: int) -> Any:
    """``value`` with its first ``batch_dims`` dims as one token dim: a view of it (the op writes through it),
    or a ValueError naming the argument where its strides allow none."""
    if not isinstance(value, torch.Tensor) or batch_dims == 1 or value.dim() < batch_dims:
        return value
    try:
        return value.view(-1, *value.shape[batch_dims:])
    except RuntimeError:
        raise ValueError(f"{name}: its leading dims {list(value.shape[:batch_dims])} must flatten into one token "
                         f"dim without a copy, got strides {list(value.stride())}") from None


def _unbatched(positions: Any, query: Any, key: Any) -> tuple[Any, Any, Any]:
    """Positions ``[batch, seq]`` with query and key ``[batch, seq, ...]``, as ``[batch * seq]`` and ``[batch *
    seq, ...]`` views; ``[num_tokens]`` positions as they are."""
    batch_dims = positions.dim() if isinstance(positions, torch.Tensor) and positions.dim() == 2 else 1
    return (_tokens_view("positions", positions, batch_dims), _tokens_view("query", query, batch_dims),
            _tokens_view("key", key, batch_dims))


def _prepare_rotary(positions, query, key, head_size, cos_sin_cache, is_neox, rope_dim_offset=0, inverse=False):
    positions, query, key = _unbatched(positions, query, key)
    tokens, rot_dim, q, k = check_rope(positions, query, key, head_size, cos_sin_cache)
    offset = _check_offset(rope_dim_offset, rot_dim, head_size)
    return rope_launch(positions, q, k, cos_sin_cache, rot_dim, bool(is_neox), offset=offset, inverse=bool(inverse))


def reference_rotary(positions, query, key, head_size, cos_sin_cache, is_neox, rope_dim_offset=0, inverse=False):
    positions, query, key = _unbatched(positions, query, key)
    tokens, rot_dim, q, k = check_rope(positions, query, key, head_size, cos_sin_cache)
    offset = _check_offset(rope_dim_offset, rot_dim, head_size)
    for heads in (q, k):
        if heads is not None:
            rotate_reference(positions, rotary_pairs(heads, rot_dim, bool(is_neox), offset), cos_sin_cache,
                             inverse=bool(inverse))

def _check_qkv(qkv, num_heads_q, num_heads_k, num_heads_v, head_dim, eps, q_weight, k_weight, cos_sin_cache,
               position_ids):
    checks.check_input_2d("qkv", qkv)
    for name, value in (("num_heads_q", num_heads_q), ("num_heads_k", num_heads_k), ("num_heads_v", num_heads_v),
                        ("head_dim", head_dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "num_heads_v" else 1):
            raise ValueError(f"{name}: expected a positive int, got {value!r}")
    width = (num_heads_q + num_heads_k + num_heads_v) * head_dim
    if qkv.shape[1] != width:
        raise ValueError(f"qkv: expected [num_tokens, (num_heads_q + num_heads_k + num_heads_v) * head_dim] = "
                         f"[{qkv.shape[0]}, {width}], got shape {list(qkv.shape)}")
    checks.check_positive_float("eps", eps)
    for name, weight in (("q_weight", q_weight), ("k_weight", k_weight)):
        checks.check_tensor(name, weight, dtypes=(qkv.dtype, torch.float32), shape=(head_dim,), device=qkv.device,
                            contiguous=True)
    q = qkv[:, :num_heads_q * head_dim]
    k = qkv[:, num_heads_q * head_dim:(num_heads_q + num_heads_k) * head_dim]
    return check_rope(position_ids, q, k, head_dim, cos_sin_cache, positions_name="position_ids")


def _prepare_qk_norm_rope(qkv, num_heads_q, num_heads_k, num_heads_v, head_dim, eps, q_weight, k_weight,
                          cos_sin_cache, is_neox, position_ids, forced_token_heads_per_warp=-1):
    # forced_token_heads_per_warp is a launch hint of the engine's CUDA kernel: the config sets the tiling here
    tokens, rot_dim, q, k = _check_qkv(qkv, num_heads_q, num_heads_k, num_heads_v, head_dim, eps, q_weight,
                                       k_weight, cos_sin_cache, position_ids)
    # q and k are neighbours in qkv: one loop over all their heads (the query loop is switched off),
    # since two loops writing views of one tensor would have to be ordered
    heads = qkv[:, :(num_heads_q + num_heads_k) * head_dim].view(tokens, num_heads_q + num_heads_k, head_dim)
    return rope_launch(position_ids, q[:, :1], heads, cos_sin_cache, rot_dim, bool(is_neox),
                   norm=(q_weight, k_weight, num_heads_q, eps), hidden=num_heads_q * head_dim, query=False)


def _reference_qk_norm_rope(qkv, num_heads_q, num_heads_k, num_heads_v, head_dim, eps, q_weight, k_weight,
                            cos_sin_cache, is_neox, position_ids, forced_token_heads_per_warp=-1):
    tokens, rot_dim, q, k = _check_qkv(qkv, num_heads_q, num_heads_k, num_heads_v, head_dim, eps, q_weight,
                                       k_weight, cos_sin_cache, position_ids)
    for heads, weight in ((q, q_weight), (k, k_weight)):
        x = heads.float()
        sum_sq = sum_of_squares(x).to(torch.float32)  # the kernel sums in pieces: in fp64 the order does not matter
        rstd = torch.rsqrt(div_rn(sum_sq, head_dim) + eps).unsqueeze(-1)
        y = x * rstd * weight.float()  # fp32 throughout: one rounding, after the rotation
        rotate_reference(position_ids, rotary_pairs(y, rot_dim, bool(is_neox)), cos_sin_cache)
        heads.copy_(y.to(heads.dtype))


def check_quant_outputs(query_out, key_out, q_scale, k_scale, q, k):
    fp8 = query_out.dtype if isinstance(query_out, torch.Tensor) else None
    q_out = heads_view("query_out", query_out, q.shape[0], q.shape[2], fp8 if fp8 in checks.FP8_DTYPES
                   else checks.FP8_DTYPES[0], q.device)
    if q_out.shape[1] != q.shape[1]:
        raise ValueError(f"query_out: expected {q.shape[1]} heads like query, got {q_out.shape[1]}")
    checks.check_scalar_scale("q_scale", q_scale, q.device)
    k_out = None
    if k is not None:
        if key_out is None or k_scale is None:
            raise ValueError("key_out: a key needs key_out and k_scale")
        k_out = heads_view("key_out", key_out, q.shape[0], q.shape[2], q_out.dtype, q.device)
        if k_out.shape[1] != k.shape[1]:
            raise ValueError(f"key_out: expected {k.shape[1]} heads like key, got {k_out.shape[1]}")
        checks.check_scalar_scale("k_scale", k_scale, q.device)
    return q_out, k_out, quant.fp8_max_for(q_out.dtype)


def _prepare_rope_quant(positions, query, key, query_out, key_out, head_size, cos_sin_cache, is_neox, q_scale,
                        k_scale=None):
    tokens, rot_dim, q, k = check_rope(positions, query, key, head_size, cos_sin_cache)
    q_out, k_out, fp8_max = check_quant_outputs(query_out, key_out, q_scale, k_scale, q, k)
    return rope_launch(positions, q, k, cos_sin_cache, rot_dim, bool(is_neox),
                   quant=(q_out, k_out, q_scale.reshape(-1), None if k_scale is None else k_scale.reshape(-1),
                          fp8_max))


def reference_rope_quant(positions, query, key, query_out, key_out, head_size, cos_sin_cache, is_neox, q_scale,
                          k_scale=None):
    """The unfused composite: rope (rounded to the input dtype), then static fp8 quant; inputs unchanged."""
    tokens, rot_dim, q, k = check_rope(positions, query, key, head_size, cos_sin_cache)
    q_out, k_out, _ = check_quant_outputs(query_out, key_out, q_scale, k_scale, q, k)
    for heads, out, scale in ((q, q_out, q_scale), (k, k_out, k_scale)):
        if heads is not None:
            rotated = heads.clone()
            rotate_reference(positions, rotary_pairs(rotated, rot_dim, bool(is_neox)), cos_sin_cache)
            quant.quantize_static_reference(rotated.flatten(1), scale, out.flatten(1))

def _blocks(tokens: int, heads: int) -> list[int]:
    """Block sizes of both loops (key heads, then query heads): ``tokens`` rows by ``heads`` heads."""
    return [tokens, heads, tokens, heads]


def default_config(shape: Shape) -> helion.Config:
    return helion.Config(block_sizes=_blocks(1, 8), num_warps=4)


def seed_configs(shape: Shape) -> list[helion.Config]:
    """A token's heads per program (4-8 heads of 128 dims); two tokens a program at prefill sizes."""
    tokens = shape["T"]
    seeds = [helion.Config(block_sizes=_blocks(1, h), num_warps=w) for h in (4, 8) for w in (2, 4)]
    if tokens >= 128:
        seeds.append(helion.Config(block_sizes=_blocks(2, 8), num_warps=4))
    return seeds


def search_configs(shape: Shape) -> list[helion.Config]:
    """Smaller programs for decode (more of them), larger ones for prefill."""
    tokens = shape["T"]
    if tokens <= 16:
        return [helion.Config(block_sizes=_blocks(1, h), num_warps=w) for h, w in ((1, 1), (2, 1), (2, 2), (16, 4))]
    return [helion.Config(block_sizes=_blocks(t, h), num_warps=w)
            for t, h, w in ((1, 16, 4), (2, 16, 8), (4, 8, 8), (1, 32, 8), (4, 16, 8))]


def rope_inputs(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
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


def _touched(kwargs: dict[str, Any]) -> dict[str, int]:
    """Elements the op touches of its tables: one cos/sin row per token, one cache slot per token, and of
    a packed qkv only the query and key heads."""
    tokens = next(kwargs[name].numel() for name in ("positions", "position_ids", "slot_mapping") if name in kwargs)
    touched = {}
    for name, leading in (("cos_sin_cache", 1), ("key_cache", 2), ("value_cache", 2), ("kv_cache", 2)):
        if isinstance(kwargs.get(name), torch.Tensor):
            table = kwargs[name]
            touched[name] = min(table.numel(), tokens * table[(0,) * leading].numel())
    if "qkv" in kwargs:
        touched["qkv"] = tokens * (kwargs["num_heads_q"] + kwargs["num_heads_k"]) * kwargs["head_dim"]
    return touched


def fp8_like(**sources: str) -> Outputs:
    """Outputs shaped like the named inputs, in the device's fp8 dtype (None where the input is None)."""
    def allocate(kwargs: dict[str, Any]) -> dict[str, torch.Tensor | None]:
        allocated: dict[str, torch.Tensor | None] = {}
        for name, source in sources.items():
            value = kwargs[source]
            if value is not None:
                checks.check_tensor(source, value, dtypes=checks.FLOAT_ACTIVATIONS)
            allocated[name] = None if value is None else torch.empty(
                value.shape, dtype=fp8_dtype(value.device), device=value.device)
        return allocated
    return Outputs(tuple(sources), allocate)


def declare(name: str, schema: str, prepare, reference, make_inputs, read_and_written: tuple[str, ...] = (),
            outputs: Outputs | None = None, family: str = "rope") -> OpSpec:
    """Register an op of the RoPE kernel; ``make_inputs(tokens, query_width, dtype, device)`` builds bench inputs."""
    return register(OpSpec(
        name=name, schema=schema, family=family, kernel=rope_kernel, prepare=prepare, reference=reference,
        # H is the query width (heads x head size): it picks the config
        problem=(tokens_dim(TOKEN_GRID), Dim("H", HIDDEN_GRID)),
        make_inputs=lambda shape, dtype, device: make_inputs(shape["T"], shape["H"], dtype, device),
        default_config=default_config, seed_configs=seed_configs, search_configs=search_configs,
        read_and_written=read_and_written, touched_elements=_touched, outputs=outputs,
    ))

ROTARY_EMBEDDING = declare(
    "rotary_embedding",
    "(Tensor positions, Tensor! query, Tensor!? key, int head_size, Tensor cos_sin_cache, bool is_neox, "
    "int rope_dim_offset=0, bool inverse=False) -> ()",
    _prepare_rotary, reference_rotary, rope_inputs, read_and_written=("query", "key"))

def _qkv_inputs(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """Packed [q | k | v] with the grid's query width, 8 kv heads, and random norm weights."""
    base = rope_inputs(tokens, hidden, dtype, device)
    head_size = base["head_size"]
    generator = torch.Generator(device="cpu").manual_seed(tokens + hidden)
    heads_q = hidden // head_size
    qkv = torch.randn(tokens, (heads_q + 2 * KV_HEADS) * head_size, generator=generator)
    weights = [(1.0 + 0.5 * torch.randn(head_size, generator=generator)).to(dtype=dtype, device=device)
               for _ in range(2)]
    return {"qkv": qkv.to(dtype=dtype, device=device), "num_heads_q": heads_q, "num_heads_k": KV_HEADS,
            "num_heads_v": KV_HEADS, "head_dim": head_size, "eps": 1e-6, "q_weight": weights[0],
            "k_weight": weights[1], "cos_sin_cache": base["cos_sin_cache"], "is_neox": True,
            "position_ids": base["positions"]}


FUSED_QK_NORM_ROPE = declare(
    "fused_qk_norm_rope",
    "(Tensor! qkv, int num_heads_q, int num_heads_k, int num_heads_v, int head_dim, float eps, "
    "Tensor q_weight, Tensor k_weight, Tensor cos_sin_cache, bool is_neox, Tensor position_ids, "
    "int forced_token_heads_per_warp=-1) -> ()",
    _prepare_qk_norm_rope, _reference_qk_norm_rope, _qkv_inputs, read_and_written=("qkv",))


_QUANT_OUTPUTS = fp8_like(query_out="query", key_out="key")


def _quant_inputs(tokens: int, hidden: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    kwargs = rope_inputs(tokens, hidden, dtype, device)
    kwargs.update(q_scale=torch.tensor([0.01], device=device), k_scale=torch.tensor([0.02], device=device))
    kwargs.update({name: poison_(tensor) for name, tensor in _QUANT_OUTPUTS.allocate(kwargs).items()})
    return kwargs


ROTARY_EMBEDDING_STATIC_FP8_QUANT = declare(
    "rotary_embedding_static_fp8_quant",
    "(Tensor positions, Tensor query, Tensor? key, Tensor! query_out, Tensor!? key_out, int head_size, "
    "Tensor cos_sin_cache, bool is_neox, Tensor q_scale, Tensor? k_scale=None) -> ()",
    _prepare_rope_quant, reference_rope_quant, _quant_inputs, outputs=_QUANT_OUTPUTS)
