"""Plain Python functions for every op: they allocate the outputs, call the op and return them.

``helion_fusions.functional.<op>(*inputs)`` takes the op's arguments less the ones it only
writes, allocates those the way the engines do (the device's fp8 dtype, ``[T, 1]`` per-token
scales, per-group scales column-major when ``is_scale_transposed``, nvfp4 block scales
swizzled and zero-padded), calls ``torch.ops.helion_fusions.<op>`` and returns them: one
tensor, or a tuple in schema order. Optional tensors (``scale_ub``, ``residual``, ...) default
to None. Ops that work in place (``fused_add_rms_norm``, RoPE on query and key, cache
writes) return None::

    from helion_fusions import functional as F

    result, scale = F.rms_norm_dynamic_per_token_quant(x, weight, 1e-6)
    out, scales = F.silu_and_mul_per_block_quant(h, group_size=128, is_scale_transposed=True)
"""

from __future__ import annotations

import helion_fusions.ops  # noqa: F401  (importing the families registers their ops)
from helion_fusions.runtime.library import allocating_function
from helion_fusions.runtime.registry import REGISTRY

globals().update({name: allocating_function(spec) for name, spec in REGISTRY.items()})
__all__ = sorted(REGISTRY)
