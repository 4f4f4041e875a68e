"""One module per fusion family: op declarations, argument checks and launch glue. Importing registers them."""

from helion_fusions.ops import kv_cache, rms_norm, rope, scaled_mm, silu_mul
from helion_fusions.ops import all_reduce  # after rms_norm, whose ops it wraps

__all__ = ["all_reduce", "kv_cache", "rms_norm", "rope", "scaled_mm", "silu_mul"]
