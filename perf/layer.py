"""``python -m perf.layer``: one fp8 decoder layer with our ops vs the same layer in plain torch, both compiled.

The layer, its quant flavours and its two versions (``ours``, ``compile``) are :mod:`perf.decoder`'s.
``--gemms ours`` (``ours_gemm_layer``, written to ``<device>_layer_gemm.*``): the ours version's GEMMs are our
``scaled_mm`` ops. Both versions are ``torch.compile(fullgraph=True, dynamic=False)``, compiled per token count T,
and timed on the GPU with L2 flushed before every call (medians; the two versions' calls alternate, so that clock
drift over the run affects both alike): plain calls for every T (``graphs`` False: ``Timer.eager_each``, the GPU
kept busy while the host enqueues, so only GPU time counts) and, for T <= 256, calls captured in a CUDA graph
(``graphs`` True: ``Timer.graph_each``). ``speedup = compile_us / ours_us``.

``ours_host_us`` and ``compile_host_us``: wall-clock time per call of the compiled layer, calls in a
row started on an idle GPU (200 calls in 5 rounds, the median round). Where the layer's GPU work is
the shorter (small T), this is its host-bound time; where it is the longer, the launch queue fills
and this approaches the GPU time.

``rel_err``: relative L2 distance between the two versions' outputs (layer output and residual).
Inductor skips the composite's intermediate bf16 roundings (unless ``emulate_precision_casts``),
which moves some fp8 codes by a step; through four GEMMs that leaves a few percent (0.04-0.065 on an
H200). On a CPU, run eagerly, static gives 0, dynamic and block about 0.06: their norm + quant ops normalize the
fp32 residual sum, as vLLM's kernels do, and the composite its bf16 rounding. The versions agree within
``TOLERANCE``, while a wrong step gives order one.

It writes ``perf/results/<device>_layer.csv`` and ``.md`` (``--append``: merged into the table there, a row
measured again replacing the earlier one); ``--profile`` also writes
``<device>_layer_profile.txt``: each row's GPU kernels in both versions (torch.profiler), the costliest
first. Without a GPU it runs both versions eagerly on a tiny model (our ops run their references on a
CPU) and checks that they agree.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from helion_fusions.runtime.device import device_identity
from helion_fusions.tools.testing import Timer
from perf.bench import GRAPH_MAX_TOKENS
from perf.decoder import (MODELS, QUANTS, SMOKE_MODEL, Layer, LayerFn, make_inputs, make_layer, ours_gemm_layer,
                          ours_layer, torch_layer)
from perf.tables import RESULTS, allow_static_compiles, geomean, read_csv, replace_rows, write_csv

TOKENS = (1, 16, 64, 256, 512, 2048, 8192)
DEFAULT_MODELS = ("llama3_8b", "qwen2_5_7b")
SMOKE_TOKENS = (1, 7)
HOST_CALLS = 200
TOLERANCE = 0.1  # see rel_err in the docstring
COLUMNS = ["device", "model", "quant", "T", "graphs", "compile_us", "ours_us", "speedup", "ours_host_us",
           "compile_host_us", "rel_err", "torch", "helion", "triton", "repro"]


# --- measurement -----------------------------------------------------------------------------

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


def summary(rows: list[dict], failed: Sequence[str] = ()) -> list[str]:
    lines = [f"rows that failed to run: {len(failed)} ({'; '.join(failed)})"] if failed else []
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


def read_rows(path: Path) -> list[dict]:
    """The rows of an earlier run's CSV, typed as :func:`bench_rows` returns them."""
    rows = read_csv(path, COLUMNS, ("device", "model", "quant", "graphs", "torch", "helion", "triton", "repro"), ("T",))
    for row in rows:
        row["graphs"] = row["graphs"] == "True"
    return rows


def merge_rows(earlier: list[dict], rows: list[dict]) -> list[dict]:
    """``rows`` plus the ``earlier`` rows they do not measure again, by model, flavour, T and graphs."""
    def order(row: dict) -> tuple:
        return ([*MODELS, row["model"]].index(row["model"]), [*QUANTS, row["quant"]].index(row["quant"]), row["T"],
                row["graphs"])
    return sorted(replace_rows(earlier, rows, lambda r: (r["model"], r["quant"], r["T"], r["graphs"])), key=order)


def _stem(device_name: str, gemms: str) -> str:
    return f"{device_name}_layer" + "_gemm" * (gemms == "ours")


def write_results(rows: list[dict], device_name: str, device_label: str, out: Path, gemms: str = "cublas",
                  failed: Sequence[str] = ()) -> None:
    """``<device>_layer.csv`` (every column) and ``<device>_layer.md`` (summary and table) in ``out``; with our
    GEMMs (``gemms`` "ours"), ``<device>_layer_gemm.*``. ``failed``: the rows that raised, named in the summary."""
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
                      *[f"- {line}" for line in summary(rows, failed)],
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
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of the existing table that this run does not measure")
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

    identity, label, timer, rows, failed = device_identity(), torch.cuda.get_device_name(), Timer(args.reps), [], []
    stem = _stem(identity.name, args.gemms)
    profile_to = args.out / f"{stem}_profile.txt" if args.profile else None
    earlier = read_rows(args.out / f"{stem}.csv") if args.append and (args.out / f"{stem}.csv").exists() else []
    if profile_to is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        profile_to.write_text("")
    for name in names:
        for flavour in flavours:
            layer = make_layer(MODELS[name], flavour, torch.device("cuda"))
            for tokens in token_counts:
                try:
                    new = bench_rows(name, flavour, layer, tokens, timer, identity.name, profile_to, ours_fn)
                except Exception as error:  # noqa: BLE001 - a call this stack rejects fails its row, not the run
                    reason = str(error).splitlines()[0][:200] if str(error) else ""
                    failed.append(f"{name} {flavour} T={tokens}: {type(error).__name__}: {reason}")
                    print(f"failed: {failed[-1]}", flush=True)
                    continue
                for row in new:
                    rows.append(row)
                    print(f"{_where(row)}: compile {row['compile_us']:.1f} us, ours {row['ours_us']:.1f} us, "
                          f"speedup {row['speedup']:.2f}x, ours_host_us {row['ours_host_us']:.0f}", flush=True)
                if rows:  # a run cut short keeps its rows
                    write_results(merge_rows(earlier, rows), identity.name, label, args.out, args.gemms, failed)
            del layer
            torch.cuda.empty_cache()
    if rows:
        print((args.out / f"{stem}.md").read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
