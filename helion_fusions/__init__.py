"""Fused LLM-inference kernels written once in Helion, tuned per GPU, exposed as ``torch.ops.helion_fusions``."""

from helion_fusions import functional
from helion_fusions.dispatch import fp8_dtype, launch_count, set_batch_invariant, warmup, warmup_token_counts
from helion_fusions.registry import REGISTRY

__all__ = ["REGISTRY", "fp8_dtype", "functional", "launch_count", "set_batch_invariant", "warmup",
           "warmup_token_counts"]
