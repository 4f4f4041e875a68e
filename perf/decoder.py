"""The fp8 decoder layer that ``python -m perf.layer`` measures, with its weights and inputs.

The layer, as a serving engine runs it (bf16 activations, fp8 e4m3 weights stored ``[N, K]``):
add + RMSNorm + fp8 quant, the qkv GEMM, neox RoPE in the q/k views of its output, causal SDPA over
the T tokens as one sequence (GQA), fp8 quant + o_proj GEMM, add + RMSNorm + fp8 quant, gate_up GEMM,
SiLU-and-mul + fp8 quant, down GEMM. Quant flavours: ``static`` (per-tensor activation and weight
scales), ``dynamic`` (per-token activation scales, per-channel weight scales) and ``block`` (block-fp8
checkpoints: activation scales per group of 128 along K, weight scales per 128 x 128 block; the
activation scales M-major with 16-byte-aligned columns, as cuBLAS's block-scaled GEMM takes them). It is
written twice:

* ``ours``: the norms, RoPE, quants and SiLU-and-mul are ``torch.ops.helion_fusions.*`` calls with the
  engine's keywords, writing in place as the engine's custom ops do (the residual too);
* ``compile``: the same steps as plain functional torch math, the unfused composite an engine has
  without custom ops (the package's eager references where they are that composite);

with identical ``torch._scaled_mm`` and SDPA calls (on a CPU, which has no block-scaled ``_scaled_mm``, the block
flavour's GEMMs are our ``scaled_mm`` op, which runs its reference there). ``ours_gemm_layer``: the ours version's GEMMs are our ``scaled_mm``
ops instead, and gate_up + SiLU-and-mul + the down GEMM's input quant is one ``scaled_mm_silu_mul_*_fp8_quant`` call.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

import helion_fusions.ops  # noqa: F401  (registers the ops)
from helion_fusions import quant
from helion_fusions.ops.rms_norm import rms_norm_reference
from helion_fusions.ops.silu_mul import silu_and_mul_reference
from helion_fusions.runtime.device import fp8_dtype

QUANTS = ("static", "dynamic", "block")
GROUP = 128  # block: the activations' quant group and the weights' scale block
GROUP_EPS = 1 / 512  # block: the amax floor of every per-group quant (the dynamic rule's, see quant.fp8_dynamic_scale)
EPSILON = 1e-5
ROPE_THETA = 500000.0
MAX_POSITIONS = 8192
STATIC_SCALE = 0.02  # every static activation scale: |values| up to about 9 before saturating


@dataclasses.dataclass(frozen=True)
class Model:
    """A decoder layer's dimensions (one tensor-parallel rank's, where the model is split)."""

    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    head_dim: int = 128

    @property
    def qkv_widths(self) -> tuple[int, int, int]:
        return self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim


MODELS = {
    "llama3_8b": Model(hidden=4096, heads=32, kv_heads=8, intermediate=14336),
    "qwen2_5_7b": Model(hidden=3584, heads=28, kv_heads=4, intermediate=18944),
    "llama3_70b_tp4": Model(hidden=8192, heads=16, kv_heads=2, intermediate=7168),
}
SMOKE_MODEL = Model(hidden=256, heads=2, kv_heads=1, intermediate=512)


@dataclasses.dataclass(frozen=True)
class Linear:
    """An fp8 GEMM ``y = (a * a_scale) @ (weight * scale).T`` in bf16, and the static scale of its input."""

    weight: torch.Tensor  # fp8 [N, K], row-major: weight.t() is the column-major operand cuBLAS takes
    scale: torch.Tensor  # fp32: [1] (static), per channel [1, N] (dynamic) or per block [N / 128, K / 128] (block)
    input_scale: torch.Tensor | None  # fp32 [1] (static); None: the input is quantized per token or per group
    block: bool = False

    def __call__(self, a: torch.Tensor, a_scale: torch.Tensor) -> torch.Tensor:
        if not self.block:
            return torch._scaled_mm(a, self.weight.t(), scale_a=a_scale, scale_b=self.scale, out_dtype=torch.bfloat16)
        if a.is_cuda:  # cuBLASLt's 1 x 128 by 128 x 128 recipe: M-major a scales, b's as [K / 128, N / 128]
            return torch._scaled_mm(a, self.weight.t(), scale_a=a_scale, scale_b=self.scale.t(),
                                    out_dtype=torch.bfloat16)
        return _our_gemm(self, a, a_scale)  # a CPU's torch._scaled_mm takes no block scales: the contract's product


@dataclasses.dataclass(frozen=True)
class Layer:
    model: Model
    quant: str  # the flavour: one of QUANTS
    input_norm: torch.Tensor  # bf16 [H]
    post_norm: torch.Tensor
    qkv: Linear
    o: Linear
    gate_up: Linear  # [gate | up] rows
    down: Linear
    cos_sin_cache: torch.Tensor  # fp32 [positions, head_dim]: cos | sin


def make_layer(model: Model, flavour: str, device: torch.device) -> Layer:
    """Random weights, scaled so that every GEMM output is about unit size; a Llama-3 RoPE table."""
    generator = torch.Generator(device=device).manual_seed(0)
    fp8 = fp8_dtype(device)

    def linear(rows: int, cols: int) -> Linear:
        weight = torch.randn(rows, cols, generator=generator, device=device).to(fp8)
        if flavour == "static":
            return Linear(weight, torch.tensor([cols ** -0.5], device=device),
                          torch.tensor([STATIC_SCALE], device=device))
        if flavour == "block":
            blocks = (1.0 + 0.1 * torch.rand(rows // GROUP, cols // GROUP, generator=generator, device=device))
            return Linear(weight, blocks * cols ** -0.5, None, block=True)
        scale = (1.0 + 0.1 * torch.rand(1, rows, generator=generator, device=device)) * cols ** -0.5
        return Linear(weight, scale, None)

    def norm() -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(model.hidden, generator=generator, device=device)).to(torch.bfloat16)

    inv_freq = ROPE_THETA ** -(torch.arange(0, model.head_dim, 2, device=device, dtype=torch.float32) / model.head_dim)
    angles = torch.outer(torch.arange(MAX_POSITIONS, device=device, dtype=torch.float32), inv_freq)
    return Layer(model, flavour, norm(), norm(), linear(sum(model.qkv_widths), model.hidden),
                 linear(model.hidden, model.heads * model.head_dim), linear(2 * model.intermediate, model.hidden),
                 linear(model.hidden, model.intermediate), torch.cat([angles.cos(), angles.sin()], dim=-1))


def make_inputs(model: Model, tokens: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``x`` and ``residual`` [T, H] bf16, and positions 0..T-1 (one sequence, as in prefill)."""
    generator = torch.Generator(device=device).manual_seed(tokens)
    x, residual = (torch.randn(tokens, model.hidden, generator=generator, device=device).to(torch.bfloat16)
                   for _ in range(2))
    return x, residual, torch.arange(tokens, device=device) % MAX_POSITIONS


def _attention(model: Model, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA over the T tokens as one sequence (GQA), back to [T, heads * head_dim]."""
    tokens = q.shape[0]
    q, k, v = [t.unflatten(-1, (-1, model.head_dim)).transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return out.squeeze(0).transpose(0, 1).reshape(tokens, -1)


# --- the layer with our ops ------------------------------------------------------------------

_GROUPED = {"group_size": GROUP, "is_scale_transposed": True}
# the op that makes a GEMM's fp8 input, by where (after a norm, from an activation, after SiLU-and-mul) and
# flavour: its name, its output and scale keywords, and its other arguments
QUANT_OPS = {
    "norm": {"static": ("fused_add_rms_norm_static_fp8_quant", "result", "scale", {}),
             "dynamic": ("rms_norm_dynamic_per_token_quant", "result", "scale", {"scale_ub": None}),
             "block": ("rms_norm_per_block_quant", "result", "scale", {"scale_ub": None, **_GROUPED})},
    "input": {"static": ("static_scaled_fp8_quant", "result", "scale", {}),
              "dynamic": ("dynamic_per_token_scaled_fp8_quant", "result", "scale", {"scale_ub": None}),
              "block": ("per_token_group_fp8_quant", "output_q", "output_s",
                        {"group_size": GROUP, "eps": GROUP_EPS, "scale_ue8m0": False, "dummy_is_scale_transposed": True,
                         "dummy_is_tma_aligned": True})},
    "silu": {"static": ("silu_and_mul_quant", "result", "scale", {}),
             "dynamic": ("silu_and_mul_dynamic_per_token_quant", "result", "scale", {"scale_ub": None}),
             "block": ("silu_and_mul_per_block_quant", "out", "scales", {"scale_ub": None, **_GROUPED})},
}


def group_scales(tokens: int, groups: int, device: torch.device) -> torch.Tensor:
    """Empty per-group scales ``[T, groups]``, M-major with 16-byte-aligned columns (strides ``(1, round_up(T, 4))``):
    the layout cuBLAS's block-scaled GEMM reads (and engines' TMA-aligned scales)."""
    return torch.empty(groups, -(-tokens // 4) * 4, dtype=torch.float32, device=device)[:, :tokens].t()


def _ours_quantized(layer: Layer, linear: Linear, where: str, shape: tuple[int, int],
                    **inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Call our op that makes ``linear``'s fp8 input (``where``: a key of ``QUANT_OPS``): the result and its scale."""
    name, result_key, scale_key, arguments = QUANT_OPS[where][layer.quant]
    result = torch.empty(shape, dtype=linear.weight.dtype, device=linear.weight.device)
    if linear.input_scale is not None:
        scale = linear.input_scale
    elif linear.block:
        scale = group_scales(shape[0], shape[1] // GROUP, result.device)
        if where == "input":  # per_token_group_fp8_quant takes the fp8 range
            fp8_max = quant.fp8_max_for(result.dtype)
            arguments = {**arguments, "fp8_min": -fp8_max, "fp8_max": fp8_max}
    else:
        scale = torch.empty(shape[0], 1, dtype=torch.float32, device=result.device)
    getattr(torch.ops.helion_fusions, name)(**{result_key: result, scale_key: scale}, **arguments, **inputs)
    return result, scale


def _our_gemm(linear: Linear, a: torch.Tensor, a_scale: torch.Tensor) -> torch.Tensor:
    """``linear`` through our ``scaled_mm`` op (the engine's ``cutlass_scaled_mm`` arguments)."""
    out = torch.empty(a.shape[0], linear.weight.shape[0], dtype=torch.bfloat16, device=a.device)
    torch.ops.helion_fusions.scaled_mm(out=out, a=a, b=linear.weight.t(), a_scales=a_scale, b_scales=linear.scale)
    return out


def _our_gate_up(layer: Layer, a: torch.Tensor, a_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up GEMM + SiLU-and-mul + the down GEMM's input quant in one op: the fp8 result and its scale."""
    ops, linear = torch.ops.helion_fusions, layer.gate_up
    result = torch.empty(a.shape[0], layer.model.intermediate, dtype=linear.weight.dtype, device=a.device)
    operands = dict(out=result, a=a, b=linear.weight.t(), a_scales=a_scale, b_scales=linear.scale)
    if layer.down.input_scale is not None:
        ops.scaled_mm_silu_mul_static_fp8_quant(scale=layer.down.input_scale, **operands)
        return result, layer.down.input_scale
    if linear.block:  # eps = 1 / 512: silu_and_mul_per_block_quant's bytes
        scale = group_scales(a.shape[0], layer.model.intermediate // GROUP, a.device)
        ops.scaled_mm_silu_mul_per_group_fp8_quant(scales=scale, eps=GROUP_EPS, **_GROUPED, **operands)
        return result, scale
    scale = torch.empty(a.shape[0], 1, dtype=torch.float32, device=a.device)
    ops.scaled_mm_silu_mul_per_token_fp8_quant(scales=scale, **operands)
    return result, scale


def _ours(layer: Layer, x: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor,
          our_gemms: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ops, model = torch.ops.helion_fusions, layer.model
    gemm = _our_gemm if our_gemms else Linear.__call__
    a, a_scale = _ours_quantized(layer, layer.qkv, "norm", x.shape, input=x, residual=residual,
                                 weight=layer.input_norm, epsilon=EPSILON)
    q, k, v = gemm(layer.qkv, a, a_scale).split(model.qkv_widths, dim=-1)
    ops.rotary_embedding(positions=positions, query=q, key=k, head_size=model.head_dim,
                         cos_sin_cache=layer.cos_sin_cache, is_neox=True)
    attention = _attention(model, q, k, v)
    a, a_scale = _ours_quantized(layer, layer.o, "input", attention.shape, input=attention)
    hidden = gemm(layer.o, a, a_scale)
    a, a_scale = _ours_quantized(layer, layer.gate_up, "norm", hidden.shape, input=hidden, residual=residual,
                                 weight=layer.post_norm, epsilon=EPSILON)
    if our_gemms:
        a, a_scale = _our_gate_up(layer, a, a_scale)
    else:
        a, a_scale = _ours_quantized(layer, layer.down, "silu", (a.shape[0], model.intermediate),
                                     input=layer.gate_up(a, a_scale))
    return gemm(layer.down, a, a_scale), residual


def ours_layer(layer: Layer, x: torch.Tensor, residual: torch.Tensor,
               positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer with ``torch.ops.helion_fusions``; ``residual`` is updated in place. Returns (output, residual)."""
    return _ours(layer, x, residual, positions, our_gemms=False)


def ours_gemm_layer(layer: Layer, x: torch.Tensor, residual: torch.Tensor,
                    positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`ours_layer` with its GEMMs through our ``scaled_mm`` ops, gate_up fused with SiLU-and-mul + quant."""
    return _ours(layer, x, residual, positions, our_gemms=True)


# --- the same layer in plain torch -----------------------------------------------------------

def _add_rms_norm(input: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Add + RMSNorm, out of place: (normalized rows, new residual)."""
    residual = residual.clone()  # the reference writes the sum into its residual argument
    return rms_norm_reference(input, weight, EPSILON, residual), residual


def _quantize(y: torch.Tensor, linear: Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """fp8 quant of ``linear``'s input (the contract of :mod:`helion_fusions.quant`): the result and its scale."""
    fp8 = linear.weight.dtype
    fp8_max = quant.fp8_max_for(fp8)
    y = y.float()
    if linear.input_scale is not None:  # static: multiply by the reciprocal, as the engine ops do
        return (y * (1.0 / linear.input_scale)).clamp(-fp8_max, fp8_max).to(fp8), linear.input_scale
    if linear.block:  # per group of 128, the scales laid out as cuBLAS reads them (see group_scales)
        groups = y.unflatten(-1, (-1, GROUP))
        scale = quant.fp8_dynamic_scale(groups.abs().amax(dim=-1), fp8_max, GROUP_EPS)
        q = (groups / scale.unsqueeze(-1)).clamp(-fp8_max, fp8_max).to(fp8).flatten(1)
        return q, group_scales(*scale.shape, scale.device).copy_(scale)
    scale = quant.fp8_dynamic_scale(y.abs().amax(dim=-1, keepdim=True), fp8_max)
    return (y / scale).clamp(-fp8_max, fp8_max).to(fp8), scale


def _rope(positions: torch.Tensor, heads: torch.Tensor, head_dim: int, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """Neox RoPE of ``heads`` [T, n * head_dim] in fp32, rounded once, out of place."""
    x = heads.unflatten(-1, (-1, head_dim)).float()
    cos, sin = cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)
    a, b = x.chunk(2, dim=-1)
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1).to(heads.dtype).flatten(1)


def torch_layer(layer: Layer, x: torch.Tensor, residual: torch.Tensor,
                positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer in plain functional torch; ``residual`` is left alone. Returns (output, new residual)."""
    model = layer.model
    h, residual = _add_rms_norm(x, residual, layer.input_norm)
    q, k, v = layer.qkv(*_quantize(h, layer.qkv)).split(model.qkv_widths, dim=-1)
    q, k = (_rope(positions, heads, model.head_dim, layer.cos_sin_cache) for heads in (q, k))
    hidden = layer.o(*_quantize(_attention(model, q, k, v), layer.o))
    h, residual = _add_rms_norm(hidden, residual, layer.post_norm)
    gate_up = layer.gate_up(*_quantize(h, layer.gate_up))
    return layer.down(*_quantize(silu_and_mul_reference(gate_up), layer.down)), residual


LayerFn = Callable[[Layer, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
