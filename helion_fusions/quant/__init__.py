"""The quant flavours every fusion family ends with: Helion epilogue helpers and their eager references.

Each helper is plain PyTorch on tensors, so the same function runs inside a Helion
kernel body (where it is traced into Triton) and in the eager references.

Contract (the README's numerics section):

* fp8 scales are fp32 *dequant* scales, ``x ~= q * s``.
* dynamic scale: ``s = max(min(amax, scale_ub) / fp8_max, 1 / (fp8_max * 512))``, computed
  as ``max(min(amax, scale_ub), amax_floor) / fp8_max`` with ``amax_floor = 1 / 512`` (the
  same fp32 value: 1/512 is a power of two). ``per_token_group_fp8_quant`` passes its
  ``eps`` as the floor instead, as the engine op does.
* quantize: ``q = fp8(clamp(y / s, -fp8_max, fp8_max))``; static-scale ops multiply by
  ``1 / s`` instead of dividing. Conversion rounds to nearest even and saturates.
  Static scales are per tensor, per token (``[T]``) or per channel (``[H]``).
* dynamic per-tensor: ``s`` from the amax of the whole tensor, then divide like the
  per-token and per-group flavours.
* ue8m0: ``s -> 2 ** ceil(log2(s))``, computed exactly on the fp32 bits.
* nvfp4: per block of 16, ``sf = fp8_e4m3(global_scale * (amax * (1 / 6)))``, then
  ``q = e2m1(x * (1 / (float(sf) * (1 / global_scale))))`` with ``q = 0`` where ``sf == 0``
  (the engine op's order; each reciprocal rounded on its own).
  e2m1 rounds to nearest even and saturates at +-6; the sign bit is set for every
  negative input, so a negative value that rounds to zero encodes as -0 (0x8).
"""

from helion_fusions.quant.epilogues import *  # noqa: F403
from helion_fusions.quant.epilogues import _compiling_to_triton  # noqa: F401
from helion_fusions.quant.reference import *  # noqa: F403
