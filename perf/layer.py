"""``python -m perf.layer``: one fp8 decoder layer with our ops vs the same layer in plain torch, both compiled.

The layer, as a serving engine runs it (bf16 activations, fp8 e4m3 weights stored ``[N, K]``):
add + RMSNorm + fp8 quant, the qkv GEMM, neox RoPE in the q/k views of its output, causal SDPA over
the T tokens as one sequence (GQA), fp8 quant + o_proj GEMM, add + RMSNorm + fp8 quant, gate_up GEMM,
SiLU-and-mul + fp8 quant, down GEMM. Quant flavours: ``static`` (per-tensor activation and weight
scales) and ``dynamic`` (per-token activation scales, per-channel weight scales). It is written twice:

* ``ours``: the norms, RoPE, quants and SiLU-and-mul are ``torch.ops.helion_fusions.*`` calls with the
  engine's keywords, writing in place as the engine's custom ops do (the residual too);
* ``compile``: the same steps as plain functional torch math, the unfused composite an engine has
  without custom ops (the package's eager references where they are that composite);

with identical ``torch._scaled_mm`` and SDPA calls. ``--gemms ours`` (``ours_gemm_layer``, written to
``<device>_layer_gemm.*``): the ours version's GEMMs are our ``scaled_mm`` ops instead, and gate_up + SiLU-and-mul +
the down GEMM's input quant is one ``scaled_mm_silu_mul_*_fp8_quant`` call. Both are ``torch.compile(fullgraph=True,
dynamic=False)``, compiled per token count T, and timed on the GPU with L2 flushed before every
call (medians; the two versions' calls alternate, so that clock drift over the run affects both alike):
plain calls for every T (``graphs`` False: ``Timer.eager_each``, the GPU kept busy while
the host enqueues, so only GPU time counts) and, for T <= 256, calls captured in a CUDA graph
(``graphs`` True: ``Timer.graph_each``). ``speedup = compile_us / ours_us``.

``ours_host_us`` and ``compile_host_us``: wall-clock time per call of the compiled layer, calls in a
row started on an idle GPU (200 calls in 5 rounds, the median round). Where the layer's GPU work is
the shorter (small T), this is its host-bound time; where it is the longer, the launch queue fills
and this approaches the GPU time.

``rel_err``: relative L2 distance between the two versions' outputs (layer output and residual).
Inductor skips the composite's intermediate bf16 roundings (unless ``emulate_precision_casts``),
which moves some fp8 codes by a step; through four GEMMs that leaves a few percent (0.04-0.065 on an
H200; 0 on a CPU with the roundings emulated), so the versions agree within ``TOLERANCE``, while a
wrong step gives order one.

It writes ``perf/results/<device>_layer.csv`` and ``.md``; ``--profile`` also writes
``<device>_layer_profile.txt``: each row's GPU kernels in both versions (torch.profiler), the costliest
first. Without a GPU it runs both versions eagerly on a tiny model (our ops run their references on a
CPU) and checks that they agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import statistics
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate

import helion_fusions.ops  # noqa: F401  (registers the ops)
from helion_fusions import quant
from helion_fusions.ops.rms_norm import rms_norm_reference
from helion_fusions.ops.silu_mul import silu_and_mul_reference
from helion_fusions.runtime.device import device_identity, fp8_dtype
from helion_fusions.tools.testing import Timer
from perf.bench import GRAPH_MAX_TOKENS
from perf.tables import RESULTS, allow_static_compiles, geomean, write_csv

TOKENS = (1, 16, 64, 256, 512, 2048, 8192)
QUANTS = ("static", "dynamic")
EPSILON = 1e-5
ROPE_THETA = 500000.0
MAX_POSITIONS = 8192
STATIC_SCALE = 0.02  # every static activation scale: |values| up to about 9 before saturating
HOST_CALLS = 200
TOLERANCE = 0.1  # see rel_err in the docstring
COLUMNS = ["device", "model", "quant", "T", "graphs", "compile_us", "ours_us", "speedup", "ours_host_us",
           "compile_host_us", "rel_err", "torch", "helion", "triton", "repro"]


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
DEFAULT_MODELS = ("llama3_8b", "qwen2_5_7b")
SMOKE_MODEL = Model(hidden=256, heads=2, kv_heads=1, intermediate=512)
SMOKE_TOKENS = (1, 7)


@dataclasses.dataclass(frozen=True)
class Linear:
    """An fp8 GEMM ``y = (a * a_scale) @ (weight * scale).T`` in bf16, and the static scale of its input."""

    weight: torch.Tensor  # fp8 [N, K], row-major: weight.t() is the column-major operand cuBLAS takes
    scale: torch.Tensor  # fp32: [1] (static) or per channel [1, N] (dynamic)
    input_scale: torch.Tensor | None  # fp32 [1] (static); None: the input is quantized per token

    def __call__(self, a: torch.Tensor, a_scale: torch.Tensor) -> torch.Tensor:
        return torch._scaled_mm(a, self.weight.t(), scale_a=a_scale, scale_b=self.scale, out_dtype=torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Layer:
    model: Model
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
        scale = (1.0 + 0.1 * torch.rand(1, rows, generator=generator, device=device)) * cols ** -0.5
        return Linear(weight, scale, None)

    def norm() -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(model.hidden, generator=generator, device=device)).to(torch.bfloat16)

    inv_freq = ROPE_THETA ** -(torch.arange(0, model.head_dim, 2, device=device, dtype=torch.float32) / model.head_dim)
    angles = torch.outer(torch.arange(MAX_POSITIONS, device=device, dtype=torch.float32), inv_freq)
    return Layer(model, norm(), norm(), linear(sum(model.qkv_widths), model.hidden),
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

def _ours_quantized(linear: Linear, shape: tuple[int, int], static: Any, dynamic: Any,
                    **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Call our static or per-token quant op that makes ``linear``'s fp8 input: the result and its scale."""
    result = torch.empty(shape, dtype=linear.weight.dtype, device=linear.weight.device)
    if linear.input_scale is not None:
        static(result=result, scale=linear.input_scale, **kwargs)
        return result, linear.input_scale
    scale = torch.empty(shape[0], 1, dtype=torch.float32, device=result.device)
    dynamic(result=result, scale=scale, scale_ub=None, **kwargs)
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
    scale = torch.empty(a.shape[0], 1, dtype=torch.float32, device=a.device)
    ops.scaled_mm_silu_mul_per_token_fp8_quant(scales=scale, **operands)
    return result, scale


def _ours(layer: Layer, x: torch.Tensor, residual: torch.Tensor, positions: torch.Tensor,
          our_gemms: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ops, model = torch.ops.helion_fusions, layer.model
    gemm = _our_gemm if our_gemms else Linear.__call__
    a, a_scale = _ours_quantized(layer.qkv, x.shape, ops.fused_add_rms_norm_static_fp8_quant,
                                 ops.rms_norm_dynamic_per_token_quant, input=x, residual=residual,
                                 weight=layer.input_norm, epsilon=EPSILON)
    q, k, v = gemm(layer.qkv, a, a_scale).split(model.qkv_widths, dim=-1)
    ops.rotary_embedding(positions=positions, query=q, key=k, head_size=model.head_dim,
                         cos_sin_cache=layer.cos_sin_cache, is_neox=True)
    attention = _attention(model, q, k, v)
    a, a_scale = _ours_quantized(layer.o, attention.shape, ops.static_scaled_fp8_quant,
                                 ops.dynamic_per_token_scaled_fp8_quant, input=attention)
    hidden = gemm(layer.o, a, a_scale)
    a, a_scale = _ours_quantized(layer.gate_up, hidden.shape, ops.fused_add_rms_norm_static_fp8_quant,
                                 ops.rms_norm_dynamic_per_token_quant, input=hidden, residual=residual,
                                 weight=layer.post_norm, epsilon=EPSILON)
    if our_gemms:
        a, a_scale = _our_gate_up(layer, a, a_scale)
    else:
        a, a_scale = _ours_quantized(layer.down, (a.shape[0], model.intermediate), ops.silu_and_mul_quant,
                                     ops.silu_and_mul_dynamic_per_token_quant, input=layer.gate_up(a, a_scale))
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


# --- measurement -----------------------------------------------------------------------------

LayerFn = Callable[[Layer, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def relative_error(ours: LayerFn, reference: LayerFn, layer: Layer, x: torch.Tensor, residual: torch.Tensor,
                   positions: torch.Tensor) -> float:
    """Largest relative L2 distance between the two versions' outputs (layer output, residual) on the same inputs."""
    actual = ours(layer, x, residual.clone(), positions)
    expected = reference(layer, x, residual.clone(), positions)
    return max(((a.float() - e.float()).norm() / e.float().norm()).item() for a, e in zip(actual, expected))


@functools.cache
def compiled(fn: LayerFn) -> LayerFn:
    """``torch.compile(fn)``: one static compile per model, flavour and token count."""
    allow_static_compiles()
    return torch.compile(fn, fullgraph=True, dynamic=False)


def host_us(fn: Callable[[], Any], calls: int = HOST_CALLS, rounds: int = 5) -> float:
    """Wall-clock microseconds per call of ``fn``: ``rounds`` rounds of calls in a row, each started on an idle
    GPU, ``calls`` in all; the median round, so that a burst of other work on the host shows in one round only."""
    samples = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls // rounds):
            fn()
        samples.append(1e6 * (time.perf_counter() - start) / (calls // rounds))
    torch.cuda.synchronize()
    return statistics.median(samples)


def kernel_profile(calls: dict[str, Callable[[], Any]], title: str, rows: int = 12) -> str:
    """Each version's GPU kernels over 5 calls (torch.profiler), the costliest ``rows`` first, per call."""
    from torch.profiler import ProfilerActivity, profile

    parts = []
    for side, call in calls.items():
        call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                call()
            torch.cuda.synchronize()
        kernels = sorted(((e.key, e.device_time_total / 5, e.count // 5) for e in prof.key_averages()
                          if e.device_time_total > 0), key=lambda k: -k[1])
        total = sum(k[1] for k in kernels)
        parts.append(f"## {title}: {side}, {total:.1f} us of kernels per call\n" + tabulate(
            [[f"{t:.1f}", n, key[:110]] for key, t, n in kernels[:rows]], headers=["us/call", "launches", "kernel"]))
    return "\n\n".join(parts) + "\n\n"


def bench_rows(name: str, flavour: str, layer: Layer, tokens: int, timer: Timer, device_name: str,
               profile_to: Path | None = None, ours_fn: LayerFn = ours_layer) -> list[dict]:
    """The rows of one token count: without CUDA graphs, and with them for T <= GRAPH_MAX_TOKENS.

    ``profile_to``: append both versions' kernel profile (:func:`kernel_profile`) to that file. ``ours_fn``:
    :func:`ours_layer` or :func:`ours_gemm_layer`."""
    ours, reference = compiled(ours_fn), compiled(torch_layer)
    x, residual, positions = make_inputs(layer.model, tokens, torch.device("cuda"))
    error = relative_error(ours, reference, layer, x, residual, positions)  # compiles both
    calls = {"ours": lambda: ours(layer, x, residual, positions),  # updates residual in place, call after call
             "compile": lambda: reference(layer, x, residual, positions)}
    host = {f"{side}_host_us": host_us(call) for side, call in calls.items()}
    if profile_to is not None:
        with open(profile_to, "a") as handle:
            handle.write(kernel_profile(calls, f"{name} {flavour} T={tokens}"))
    rows = []
    for graphs in (False, True) if tokens <= GRAPH_MAX_TOKENS else (False,):
        times = (timer.graph_each if graphs else timer.eager_each)(list(calls.values()))  # alternating calls
        row = {"device": device_name, "model": name, "quant": flavour, "T": tokens, "graphs": graphs,
               **{f"{side}_us": t for side, t in zip(calls, times)}, **host, "rel_err": error}
        row["speedup"] = row["compile_us"] / row["ours_us"]
        row.update({package: version(package) for package in ("torch", "helion", "triton")})
        row["repro"] = (f"python -m perf.layer --models {name} --quant {flavour} --tokens {tokens}"
                        + " --gemms ours" * (ours_fn is ours_gemm_layer))
        rows.append(row)
    return rows


# --- results ---------------------------------------------------------------------------------

def _where(row: dict) -> str:
    return f"{row['model']} {row['quant']} T={row['T']}{' graphs' if row['graphs'] else ''}"


def summary(rows: list[dict]) -> list[str]:
    lines = []
    for graphs in (False, True):
        mine = [r for r in rows if r["graphs"] == graphs]
        if mine:
            lines.append(f"{'with' if graphs else 'without'} CUDA graphs: geomean speedup "
                         f"{geomean([r['speedup'] for r in mine]):.2f}x over {len(mine)} rows")
    worst = min(rows, key=lambda r: r["speedup"])
    below = [r for r in rows if r["speedup"] < 1.0]
    lines.append(f"min speedup {worst['speedup']:.2f}x ({_where(worst)}); rows below 1.0: {len(below)}"
                 + (f" ({', '.join(map(_where, below))})" if below else ""))
    lines.append(f"host time per call outside graphs: ours {min(r['ours_host_us'] for r in rows):.0f}-"
                 f"{max(r['ours_host_us'] for r in rows):.0f} us, torch.compile "
                 f"{min(r['compile_host_us'] for r in rows):.0f}-{max(r['compile_host_us'] for r in rows):.0f} us")
    apart = [r for r in rows if not r["rel_err"] <= TOLERANCE]
    lines.append(f"max rel_err between the versions' outputs {max(r['rel_err'] for r in rows):.2g}; "
                 f"rows above {TOLERANCE}: {len(apart)}" + (f" ({', '.join(map(_where, apart))})" if apart else ""))
    return lines


def _stem(device_name: str, gemms: str) -> str:
    return f"{device_name}_layer" + "_gemm" * (gemms == "ours")


def write_results(rows: list[dict], device_name: str, device_label: str, out: Path, gemms: str = "cublas") -> None:
    """``<device>_layer.csv`` (every column) and ``<device>_layer.md`` (summary and table) in ``out``; with our
    GEMMs (``gemms`` "ours"), ``<device>_layer_gemm.*``."""
    stem = _stem(device_name, gemms)
    write_csv(out / f"{stem}.csv", COLUMNS, rows)
    shown = ["model", "quant", "T", "graphs", "compile_us", "ours_us", "speedup", "ours_host_us", "compile_host_us",
             "rel_err"]
    formats = ("", "", "", "", ".1f", ".1f", ".2f", ".0f", ".0f", ".3f")
    table = tabulate([[r[c] for c in shown] for r in rows], headers=shown, floatfmt=formats, tablefmt="github")
    title = "ours (with our GEMM ops)" if gemms == "ours" else "ours"
    text = "\n".join([f"# Decoder layer: {title} vs torch.compile, {device_label} ({device_name})", "",
                      (f"torch {rows[0]['torch']}, helion {rows[0]['helion']}, triton {rows[0]['triton']}; "
                       "times in us, medians with L2 flushed; `speedup = compile_us / ours_us`; written by "
                       f"`python -m perf.layer{' --gemms ours' * (gemms == 'ours')}`."), "",
                      *[f"- {line}" for line in summary(rows)],
                      "", "## All rows", "", table, ""])
    (out / f"{stem}.md").write_text(text)


def cpu_smoke(flavours: list[str], ours_fn: LayerFn = ours_layer) -> int:
    """No GPU: both versions run eagerly on a tiny model (our ops run their references) and must agree."""
    rows, failures, cpu = [], 0, torch.device("cpu")
    for flavour in flavours:
        layer = make_layer(SMOKE_MODEL, flavour, cpu)
        for tokens in SMOKE_TOKENS:
            error = relative_error(ours_fn, torch_layer, layer, *make_inputs(SMOKE_MODEL, tokens, cpu))
            ok = error <= TOLERANCE  # False for NaN too
            failures += not ok
            rows.append([flavour, tokens, error, "ok" if ok else "MISMATCH"])
    print(f"No CUDA device: the layer with our ops against plain torch, eagerly, on {SMOKE_MODEL}")
    print(tabulate(rows, headers=["quant", "T", "rel_err", "status"], floatfmt=".3g", tablefmt="github"))
    return 1 if failures else 0


def _choices(parser: argparse.ArgumentParser, option: str, text: str, allowed: Any) -> list[str]:
    chosen = text.split(",")
    unknown = [c for c in chosen if c not in allowed]
    if unknown:
        parser.error(f"{option}: unknown {unknown}; choose from {list(allowed)}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"comma-separated, of {list(MODELS)}")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated token counts")
    parser.add_argument("--quant", default=",".join(QUANTS), help=f"comma-separated, of {list(QUANTS)}")
    parser.add_argument("--reps", type=int, default=30, help="timed calls per measurement")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--profile", action="store_true", help="also write each row's kernels, both versions")
    parser.add_argument("--gemms", choices=("cublas", "ours"), default="cublas",
                        help="ours: the ours version's GEMMs are our scaled_mm ops, gate_up fused with SiLU-and-mul "
                             "+ quant (-> <device>_layer_gemm.*); cublas: torch._scaled_mm, as in the compile version")
    args = parser.parse_args(argv)
    names = _choices(parser, "--models", args.models, MODELS)
    flavours = _choices(parser, "--quant", args.quant, QUANTS)
    try:
        token_counts = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        token_counts = []
    if not token_counts or min(token_counts) < 1:
        parser.error(f"--tokens: expected comma-separated positive ints, got {args.tokens!r}")
    ours_fn = ours_gemm_layer if args.gemms == "ours" else ours_layer
    if not torch.cuda.is_available():
        return cpu_smoke(flavours, ours_fn)

    identity, label, timer, rows = device_identity(), torch.cuda.get_device_name(), Timer(args.reps), []
    stem = _stem(identity.name, args.gemms)
    profile_to = args.out / f"{stem}_profile.txt" if args.profile else None
    if profile_to is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        profile_to.write_text("")
    for name in names:
        for flavour in flavours:
            layer = make_layer(MODELS[name], flavour, torch.device("cuda"))
            for tokens in token_counts:
                for row in bench_rows(name, flavour, layer, tokens, timer, identity.name, profile_to, ours_fn):
                    rows.append(row)
                    print(f"{_where(row)}: compile {row['compile_us']:.1f} us, ours {row['ours_us']:.1f} us, "
                          f"speedup {row['speedup']:.2f}x, ours_host_us {row['ours_host_us']:.0f}", flush=True)
                write_results(rows, identity.name, label, args.out, args.gemms)  # a run cut short keeps its rows
            del layer
            torch.cuda.empty_cache()
    print((args.out / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
