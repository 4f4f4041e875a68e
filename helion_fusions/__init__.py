"""Fused LLM-inference kernels written once in Helion, tuned per GPU, exposed as ``torch.ops.helion_fusions``."""

from helion_fusions import functional
from helion_fusions.runtime.device import fp8_dtype
from helion_fusions.runtime.dispatch import (
           launch_count,
           set_batch_invariant,
           warmup,
           warmup_token_counts,
)
from helion_fusions.runtime.registry import REGISTRY

__all__ = ["REGISTRY", "fp8_dtype", "functional", "launch_count", "set_batch_invariant", "warmup",
           "warmup_token_counts"]
