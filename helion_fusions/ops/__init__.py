"""One module per fusion family: op declarations, argument checks and launch glue. Importing registers them."""

from helion_fusions.ops import kv_cache, rms_norm, rope, silu_mul

__all__ = ["kv_cache", "rms_norm", "rope", "silu_mul"]
