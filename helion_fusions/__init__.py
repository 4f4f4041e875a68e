"""Fused LLM-inference kernels written once in Helion, tuned per GPU, exposed as ``torch.ops.helion_fusions``."""

from helion_fusions.dispatch import fp8_dtype, launch_count, set_batch_invariant, warmup, warmup_token_counts
from helion_fusions.kernels import rms_norm as _rms_norm  # noqa: F401  (registers the ops)
from helion_fusions.kernels import rope as _rope  # noqa: F401  (registers the ops)
from helion_fusions.kernels import silu_mul as _silu_mul  # noqa: F401  (registers the ops)
from helion_fusions.registry import REGISTRY

__all__ = ["REGISTRY", "fp8_dtype", "launch_count", "set_batch_invariant", "warmup", "warmup_token_counts"]
