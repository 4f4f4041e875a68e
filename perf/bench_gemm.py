"""``python -m perf.bench_gemm``: the scaled fp8 GEMM ops against cuBLAS, the unfused path and torch.compile.

For each op, scale layout and shape ``(M, N, K)`` (the linear layers of Llama-3-8B, Llama-3-70B at TP=2,
and DeepSeek-V3-style block fp8 with K = 7168), in one run:

* ``cublas_us``: ``torch._scaled_mm`` with bf16 output (cuBLASLt; for the gate_up ops the whole ``[K, 2 I]``
  weight);
* ``cublas_fp8_out_us`` (per-tensor scales, static fp8 output): ``torch._scaled_mm`` writing fp8 itself, its
  ``1 / out_scale`` folded into ``scale_a``: the one-call speed of light (cuBLAS rejects row-wise scales
  with fp8 output on this stack: no such baseline there);
* ``unfused_us``: the best unfused path: cuBLAS, then our quant op (``static_scaled_fp8_quant``,
  ``per_token_group_fp8_quant``, ``dynamic_per_token_scaled_fp8_quant``) or our activation + quant op
  (``silu_and_mul_quant``, ``silu_and_mul_per_block_quant``, ``silu_and_mul_dynamic_per_token_quant``);
* ``compile_us``: ``torch.compile`` of the same composite (``torch._scaled_mm`` + the package's reference math);
* ``ours_us``: ``torch.ops.helion_fusions.<op>``.

Times are medians with L2 flushed: in CUDA graphs for M <= 512, else plain calls (``Timer``), the versions
alternating. ``tflops = 2 M N K / ours_us`` (``N`` = ``2 I`` for gate_up); ``pct_cublas_peak`` compares it with
the best cuBLAS fp8 TFLOP/s of the table; ``speedup_vs_unfused = unfused_us / ours_us``. Writes
``perf/results/<device>_gemm.csv`` and ``.md`` (``--append``: merged into the table there, a row measured again
replacing its earlier one). Without a GPU it checks each variant's Helion kernel (interpret mode) against the
contract.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable

import torch
from tabulate import tabulate

from helion_fusions import quant
from helion_fusions.ops import scaled_mm
from helion_fusions.ops.silu_mul import silu_and_mul_reference
from helion_fusions.runtime import dispatch
from helion_fusions.runtime.device import device_identity
from helion_fusions.runtime.registry import REGISTRY
from helion_fusions.tools.testing import Timer, clone_kwargs, compare_outputs, outputs_ok
from perf.tables import RESULTS, allow_static_compiles, geomean, read_csv, replace_rows, write_csv

TOKENS = scaled_mm.M_GRID
LAYERS, GATE_UP = scaled_mm.LAYERS, scaled_mm.GATE_UP
GATED_OPS = ("scaled_mm_silu_mul_static_fp8_quant", "scaled_mm_silu_mul_per_group_fp8_quant",
             "scaled_mm_silu_mul_per_token_fp8_quant")
MAX_DIFFERENT = 1e-4  # the share of outputs that may differ from the contract (see measure)
GRAPH_MAX_M = 512
_TEXT_COLUMNS = ("device", "op", "model", "scales", "out", "torch", "helion", "repro")
COLUMNS = ["device", "op", "model", "M", "N", "K", "scales", "out", "cublas_us", "cublas_fp8_out_us", "unfused_us",
           "compile_us", "ours_us", "tflops", "pct_cublas_peak", "speedup_vs_unfused", "torch", "helion", "repro"]
CPU_SHAPES = ((1, 256, 256), (7, 384, 512))  # N a multiple of the per-group ops' 128


def variants(model: str) -> list[tuple[str, str]]:
    """(op, scale layout) pairs benched for a model's layers: block scales for the block-fp8 model."""
    layouts = ("block",) if model.endswith("block") else ("tensor", "row")
    return [(op, layout) for layout in layouts for op in ("scaled_mm", "scaled_mm_static_fp8_quant",
                                                          "scaled_mm_per_group_fp8_quant",
                                                          "scaled_mm_per_token_fp8_quant", *GATED_OPS)]


def layer_shapes(op: str, model: str) -> tuple[tuple[int, int], ...]:
    """(N, K) of the layers an op is benched on: the gate_up ops' N is the projection's I; a per-group op's N is a
    multiple of its group, 128."""
    shapes = GATE_UP[model] if op in GATED_OPS else LAYERS[model]
    return tuple((n, k) for n, k in shapes if "group_size" not in REGISTRY[op].arg_names or n % 128 == 0)


def flops(op: str, shape: dict[str, int]) -> float:
    return 2 * shape["M"] * shape["N"] * shape["K"] * (2 if op in GATED_OPS else 1)


def inputs(op: str, shape: dict[str, int], layout: str, device: torch.device) -> dict[str, Any]:
    """The op's make_inputs in the layout's scales: row-wise, block (exact in any order, see make_inputs), or one
    element each."""
    kwargs = REGISTRY[op].make_inputs({**shape, "BLOCK": 128 if layout == "block" else 1}, torch.bfloat16, device)
    if layout == "tensor":
        kwargs.update(a_scales=torch.tensor(1 / 16, device=device),
                      b_scales=torch.tensor(1 / (4 * shape["K"] ** 0.5), device=device))
    return kwargs


def _baselines(op: str, kwargs: dict[str, Any], layout: str) -> dict[str, Callable[[], Any] | None]:
    """The cuBLAS calls and the unfused composite for these arguments (None where cuBLAS has no such call)."""
    a, b, a_s, b_s = kwargs["a"], kwargs["b"], kwargs["a_scales"], kwargs["b_scales"]
    if layout == "block":  # cuBLASLt's 1x128 by 128x128 recipe: M-major a scales, b's as [K / 128, N / 128]
        scale_a, scale_b = a_s.t().contiguous().t(), b_s.t()
    elif layout == "row":
        scale_a, scale_b = a_s.reshape(-1, 1), b_s.reshape(1, -1)
    else:
        scale_a, scale_b = a_s.reshape(()), b_s.reshape(())

    def cublas() -> torch.Tensor:
        return torch._scaled_mm(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16, bias=kwargs["bias"])

    calls: dict[str, Callable[[], Any] | None] = {"cublas": cublas}
    if op == "scaled_mm":
        calls["unfused"] = cublas
        calls["compile"] = torch.compile(cublas, dynamic=False)
        calls["cublas_fp8_out"] = None
        return calls
    out = kwargs["out"]
    fp8_max = quant.fp8_max_for(out.dtype)
    helion_ops = torch.ops.helion_fusions
    if op.endswith("static_fp8_quant"):
        scale = kwargs["scale"]
        if op in GATED_OPS:
            def unfused() -> None:
                helion_ops.silu_and_mul_quant(result=out, input=cublas(), scale=scale)
        else:
            def unfused() -> None:
                helion_ops.static_scaled_fp8_quant(result=out, input=cublas(), scale=scale)

        def composite() -> None:
            y = cublas()
            quant.quantize_static_reference(silu_and_mul_reference(y) if op in GATED_OPS else y, scale, out)

        calls["cublas_fp8_out"] = (lambda: torch._scaled_mm(a, b, scale_a=scale_a / scale, scale_b=scale_b,
                                                            out_dtype=out.dtype)) if layout == "tensor" and \
            op not in GATED_OPS else None
    elif op.endswith("per_token_fp8_quant"):
        scales = kwargs["scales"]
        if op in GATED_OPS:
            def unfused() -> None:
                helion_ops.silu_and_mul_dynamic_per_token_quant(result=out, input=cublas(), scale=scales,
                                                                scale_ub=None)
        else:
            def unfused() -> None:
                helion_ops.dynamic_per_token_scaled_fp8_quant(result=out, input=cublas(), scale=scales,
                                                              scale_ub=None)

        def composite() -> None:
            y = cublas()
            y = silu_and_mul_reference(y) if op in GATED_OPS else y
            quant.quantize_per_group_reference(y, out, scales, y.shape[1])

        calls["cublas_fp8_out"] = None
    else:  # per-group fp8 output
        scales, eps = kwargs["scales"], kwargs.get("eps", scaled_mm.DEFAULT_EPS)
        if op in GATED_OPS:
            def unfused() -> None:
                helion_ops.silu_and_mul_per_block_quant(out=out, input=cublas(), scales=scales, group_size=128)
        else:
            def unfused() -> None:
                helion_ops.per_token_group_fp8_quant(input=cublas(), output_q=out, output_s=scales, group_size=128,
                                                     eps=eps, fp8_min=-fp8_max, fp8_max=fp8_max, scale_ue8m0=False,
                                                     dummy_is_scale_transposed=False, dummy_is_tma_aligned=False)

        def composite() -> None:
            y = cublas()
            quant.quantize_per_group_reference(silu_and_mul_reference(y) if op in GATED_OPS else y, out, scales, 128,
                                               None, False, eps)

        calls["cublas_fp8_out"] = None
    calls.update(unfused=unfused, compile=torch.compile(composite, dynamic=False))
    return calls


def working_baselines(op: str, kwargs: dict[str, Any], layout: str, where: str,
                      names: tuple[str, ...] | None = None) -> dict[str, Callable[[], Any]]:
    """The baselines (those in ``names``, default all) that run here, each called once, cuBLAS's first. cuBLAS
    may lack a call (fp8 output with row scales, block scales on some builds): its columns stay empty (all of
    them without the bf16 GEMM, which every other baseline calls). Any other failure is raised."""
    calls: dict[str, Callable[[], Any]] = {}
    for name, call in _baselines(op, kwargs, layout).items():  # "cublas" first
        if call is None or (names is not None and name not in names):
            continue
        try:
            call()
        except (RuntimeError, ValueError, NotImplementedError) as error:
            if not name.startswith("cublas"):
                raise
            print(f"{where}: no {name} baseline: {str(error).splitlines()[0][:120]}")
            if name == "cublas":
                return {}
            continue
        calls[name] = call
    return calls


def measure(op: str, model: str, layout: str, shape: dict[str, int], timer: Timer) -> dict[str, Any]:
    spec = REGISTRY[op]
    kwargs = inputs(op, shape, layout, torch.device("cuda"))
    expected, ours = clone_kwargs(kwargs), clone_kwargs(kwargs)
    spec.reference(**expected)
    spec.op(**ours)
    results = compare_outputs([name for name in spec.mutated_args if name in kwargs], ours, expected)
    # integer-valued operands (and power-of-two block scales) make every sum exact in fp32, but Hopper's fp8
    # tensor cores accumulate inside an MMA with fewer bits: at M = 8192, N = 8192, K = 14336 on an H200 one
    # of 67 million outputs landed a rounding step away, and where such a step moved a group's or a row's
    # amax, its scale and its quantized values moved with it (a per-token row: 709 of them). Such differences
    # are printed; a run stops where more than MAX_DIFFERENT of the outputs differ (the GPU tests' flip budget)
    different = sum(result.flips + result.worse for result in results.values())
    if different > MAX_DIFFERENT * max(result.elements for result in results.values()):
        raise AssertionError(f"{op} {layout} {shape}: ours differs from the contract: {results}")
    if different:
        print(f"{op} {layout} {shape}: outputs that differ from the contract: {results}")
    row: dict[str, Any] = {"op": op, "model": model, **shape, "scales": layout, "out": str(kwargs["out"].dtype)[6:]}
    calls = working_baselines(op, clone_kwargs(kwargs), layout, f"{op} {layout} {shape}")
    calls["ours"] = lambda: spec.op(**ours)
    measure_each = timer.graph_each if shape["M"] <= GRAPH_MAX_M else timer.eager_each
    row.update({f"{name}_us": t for name, t in zip(calls, measure_each(list(calls.values())))})
    row["tflops"] = flops(op, shape) / row["ours_us"] / 1e6
    if row.get("unfused_us"):
        row["speedup_vs_unfused"] = row["unfused_us"] / row["ours_us"]
    return row


def summary(rows: list[dict]) -> list[str]:
    """The headline figures per op and scale layout: speedup over the unfused path (geomean, min, rows below
    1.0), and with per-tensor scales and static fp8 output, ours against cuBLAS's one-call fp8 output."""
    lines = []
    for op, layout in dict.fromkeys((r["op"], r["scales"]) for r in rows):
        group = [r for r in rows if (r["op"], r["scales"]) == (op, layout) and r.get("speedup_vs_unfused")]
        if not group:
            continue
        speedups = [r["speedup_vs_unfused"] for r in group]
        line = (f"- {op}, {layout} scales: {geomean(speedups):.2f}x the unfused path (geomean of {len(group)}), "
                f"min {min(speedups):.2f}x, {sum(s < 1.0 for s in speedups)} below 1.0")
        one_call = [(r["M"], r["cublas_fp8_out_us"] / r["ours_us"]) for r in group if r.get("cublas_fp8_out_us")]
        for what, picked in (("M >= 1024", [x for m, x in one_call if m >= 1024]),
                             ("M <= 128", [x for m, x in one_call if m <= 128])):
            if picked:
                line += f"; vs cuBLAS fp8 output at {what}: {min(picked):.2f}-{max(picked):.2f}x"
        lines.append(line)
    return lines


def row_order(row: dict) -> tuple:
    """Where a row sits in the table: model, op, scale layout, layer, M (the order a whole run measures in); an
    earlier table's row of a model, op or layer this bench no longer runs goes after those it does."""
    def position(values: list, value: Any) -> int:
        return values.index(value) if value in values else len(values)

    pairs = variants(row["model"])
    ops, layouts = list(dict.fromkeys(op for op, _ in pairs)), list(dict.fromkeys(layout for _, layout in pairs))
    layers = list(layer_shapes(row["op"], row["model"])) if row["model"] in LAYERS and row["op"] in ops else []
    return (position(list(LAYERS), row["model"]), position(ops, row["op"]), position(layouts, row["scales"]),
            position(layers, (row["N"], row["K"])), row["M"])


def read_rows(path: Path) -> list[dict]:
    """The rows of an earlier table's CSV, typed as :func:`measure` returns them."""
    return read_csv(path, COLUMNS, _TEXT_COLUMNS, ("M", "N", "K"))


def merge_rows(earlier: list[dict], rows: list[dict]) -> list[dict]:
    """``rows`` plus the ``earlier`` rows of (op, model, scales, shape) they do not measure again."""
    return replace_rows(earlier, rows, lambda r: (r["op"], r["model"], r["scales"], r["M"], r["N"], r["K"]))


def write_results(rows: list[dict], out: Path, device: str, label: str) -> str:
    """``<device>_gemm.csv`` and ``.md`` in ``out``: per model, each op and layout's summary, then every row. Rows of
    this run get their versions and repro command; earlier rows (``--append``) keep theirs. ``<device>_gemm_runs.md``
    beside them, where it exists, tells the runs the rows come from (written by hand)."""
    rows = sorted(rows, key=row_order)
    rates = [flops(r["op"], r) / r[c] / 1e6 for r in rows for c in ("cublas_us", "cublas_fp8_out_us") if r.get(c)]
    peak = max(rates, default=None)  # none where only block scales ran: cuBLAS takes none of them
    for row in rows:
        row["pct_cublas_peak"] = peak and 100 * row["tflops"] / peak
        if not row.get("repro"):
            row.update(device=device, torch=version("torch"), helion=version("helion"),
                       repro=f"python -m perf.bench_gemm --models {row['model']} --ops {row['op']} "
                             f"--scales {row['scales']} --tokens {row['M']}")
    write_csv(out / f"{device}_gemm.csv", COLUMNS, rows)
    runs = out / f"{device}_gemm_runs.md"
    lines = [f"# Scaled fp8 GEMMs: ours vs cuBLAS and the unfused path, {label} ({device})", "",
             f"torch {'/'.join(sorted({r['torch'] for r in rows}))}, "
             f"helion {'/'.join(sorted({r['helion'] for r in rows}))}; us, medians, L2 flushed; best cuBLAS "
             f"{'(none run)' if peak is None else f'{peak:.0f}'} TFLOP/s (`pct_cublas_peak` is taken against it); "
             "written by `python -m perf.bench_gemm`.", ""]
    if runs.exists():
        lines += [f"The rows come from several runs, each row from the last that measured it (its command is the CSV's "
                  f"`repro`): [{runs.name}]({runs.name}) tells them.", ""]
    for model in dict.fromkeys(r["model"] for r in rows):
        group = [r for r in rows if r["model"] == model]
        lines += [f"### {model} ({len(group)} rows)", "", *summary(group), ""]
    shown = COLUMNS[1:16]
    lines += [tabulate([[r.get(c) for c in shown] for r in rows], headers=shown, floatfmt=".1f", tablefmt="github"), ""]
    text = "\n".join(lines)
    (out / f"{device}_gemm.md").write_text(text)
    return text


def cpu_check() -> int:
    """No GPU: every op and scale layout's Helion kernel (interpret mode) against the contract, on small shapes, and
    its unfused baseline (torch._scaled_mm, then our quant op) runs."""
    rows, failures = [], 0
    for op, layout in {v for model in LAYERS for v in variants(model)}:
        spec = REGISTRY[op]
        for m, n, k in CPU_SHAPES:
            kwargs = inputs(op, {"M": m, "N": n, "K": k}, layout, torch.device("cpu"))
            expected, ours = clone_kwargs(kwargs), clone_kwargs(kwargs)
            spec.reference(**expected)
            with dispatch.interpreting():
                spec.op(**ours)
            results = compare_outputs([name for name in spec.mutated_args if name in kwargs], ours, expected)
            ok = outputs_ok(results, max_flip_fraction=0)
            failures += not ok
            working_baselines(op, clone_kwargs(kwargs), layout, f"{op} {layout}", ("cublas", "unfused"))
            rows.append([op, layout, f"M={m},N={n},K={k}", "; ".join(f"{name}: {r}" for name, r in results.items()),
                         "ok" if ok else "MISMATCH"])
    print("No CUDA device: the GEMM kernel (interpret mode) against the contract")
    print(tabulate(sorted(rows, key=str), headers=["op", "scales", "shape", "comparison", "status"], tablefmt="github"))
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(LAYERS), help=f"comma-separated, of {list(LAYERS)}")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma-separated M values")
    parser.add_argument("--ops", default=None, help="comma-separated, of the scaled_mm ops (default: all)")
    parser.add_argument("--scales", default=None,
                        help="comma-separated scale layouts, of tensor, row, block (default: each model's)")
    parser.add_argument("--reps", type=int, default=20, help="timed calls per measurement")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--append", action="store_true",
                        help="merge into the table in --out: a row measured again replaces its earlier one")
    args = parser.parse_args(argv)
    models = args.models.split(",")
    unknown = [m for m in models if m not in LAYERS]
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {list(LAYERS)}")
    every_op = [op for op, _ in variants(models[0])]
    ops = args.ops.split(",") if args.ops else every_op
    unknown = [op for op in ops if op not in every_op]
    if unknown:
        parser.error(f"--ops: unknown {unknown}; choose from {list(dict.fromkeys(every_op))}")
    layouts = {layout for model in models for _, layout in variants(model)}
    scales = args.scales.split(",") if args.scales else sorted(layouts)
    unknown = [layout for layout in scales if layout not in layouts]
    if unknown:
        parser.error(f"--scales: unknown {unknown} for {models}; choose from {sorted(layouts)}")
    if not torch.cuda.is_available():
        return cpu_check()
    from rich.progress import track

    allow_static_compiles()
    timer = Timer(args.reps)
    tokens = [int(m) for m in args.tokens.split(",")]
    jobs = [(op, model, layout, {"M": m, "N": n, "K": k}) for model in models for op, layout in variants(model)
            if op in ops and layout in scales for n, k in layer_shapes(op, model) for m in tokens]
    device, label = device_identity().name, torch.cuda.get_device_name()
    existing = args.out / f"{device}_gemm.csv"
    earlier = read_rows(existing) if args.append and existing.exists() else []
    rows, text = [], "no shapes selected"
    for job in track(jobs, description="benchmarking"):
        rows.append(measure(*job, timer))
        # after every row: a stopped run keeps what it measured
        text = write_results(merge_rows(earlier, rows), args.out, device, label)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
