"""``make autotune``, ``make bench`` and ``make sass`` run end to end on a CPU (their smoke / correctness modes)."""

from __future__ import annotations

import itertools
import json
import os
import re
import time
import types
from typing import Any

import pytest
import torch

from helion_fusions.runtime import config_store, dispatch
from helion_fusions.tools import autotune
from helion_fusions.runtime.registry import REGISTRY
from perf import bench, sass
from perf.tables import RESULTS, lock_inductor_benchmarks

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU modes of the CLIs")


def test_autotune_smoke_writes_valid_configs(tmp_path) -> None:
    assert autotune.main(["--smoke", "--out", str(tmp_path), "--ops", "rms_norm_static_fp8_quant"]) == 0
    path = tmp_path / "cpu_smoke" / "rms_norm_static_fp8_quant.json"
    spec = REGISTRY["rms_norm_static_fp8_quant"]
    loaded = config_store.load(path, spec.name, spec.dim_names, dispatch.spec_hash(spec))
    assert [e.shape for e in loaded.entries] == [{"T": 1, "H": 256}, {"T": 7, "H": 256}]
    assert all(e.source in ("seed", "tuned") and e.time_us > 0 for e in loaded.entries)
    # a second run resumes: nothing left to tune, the file is unchanged
    before = json.loads(path.read_text())
    assert autotune.main(["--smoke", "--out", str(tmp_path), "--ops", "rms_norm_static_fp8_quant"]) == 0
    assert json.loads(path.read_text()) == before


def _stale_smoke_file(tmp_path, op: str, recorded_us: float, shapes: tuple[str, ...] = ()) -> tuple[object, dict]:
    """A smoke-tuned config file for ``op`` (its ``--shape`` arguments), made stale, with every entry's recorded
    time set."""
    assert autotune.main(["--smoke", "--out", str(tmp_path), "--ops", op, *shapes]) == 0
    path = tmp_path / "cpu_smoke" / f"{op}.json"
    raw = json.loads(path.read_text())
    raw["kernel_hash"] = "0" * 16
    for item in raw["entries"]:
        item["time_us"] = recorded_us
    path.write_text(json.dumps(raw))
    return path, raw


def test_autotune_revalidates_stale_entries(tmp_path) -> None:
    """--revalidate re-checks and re-times each stale entry's own config, and saves it under the current source."""
    op = "dynamic_scaled_fp8_quant"  # two launches for T > 1: both run with the entry's config
    path, raw = _stale_smoke_file(tmp_path, op, recorded_us=1e9)
    assert autotune.main(["--smoke", "--out", str(tmp_path), "--ops", op, "--revalidate"]) == 0
    loaded = config_store.load(path, op, REGISTRY[op].dim_names, dispatch.spec_hash(REGISTRY[op]))
    assert [(e.shape, e.config, e.source) for e in loaded.entries] == [
        (item["shape"], item["config"], "revalidated") for item in raw["entries"]]
    assert all(e.time_us < 1e9 for e in loaded.entries)


def test_autotune_revalidates_only_the_entries_marked_stale(tmp_path, capsys) -> None:
    """In a file of the current source, --revalidate re-times the entries make restamp marked stale and keeps the
    others as they are; a call does not pick a marked entry; a plain run searches its shape again."""
    op = "rms_norm_static_fp8_quant"
    shapes = ("--shape", "T=1/16,H=256")
    path, raw = _stale_smoke_file(tmp_path, op, recorded_us=1e9, shapes=shapes)
    raw["kernel_hash"] = dispatch.spec_hash(REGISTRY[op])
    raw["entries"][0]["source"] = config_store.STALE
    path.write_text(json.dumps(raw))
    spec = REGISTRY[op]
    loaded = config_store.load(path, op, spec.dim_names, dispatch.spec_hash(spec))
    marked = loaded.entries[0]
    assert marked.stale and loaded.pick(torch.bfloat16, dict(marked.shape), spec.problem, False) is not marked
    assert autotune.main(["--smoke", "--out", str(tmp_path), "--ops", op, "--revalidate", *shapes]) == 0
    assert "revalidating the 1 entries" in capsys.readouterr().out
    after = {e.shape["T"]: e for e in config_store.load(path, op, spec.dim_names, dispatch.spec_hash(spec)).entries}
    other = raw["entries"][1]
    assert after.keys() == {marked.shape["T"], other["shape"]["T"]}
    assert after[marked.shape["T"]].source == "revalidated" and after[marked.shape["T"]].time_us < 1e9
    kept = after[other["shape"]["T"]]
    assert kept.source == other.get("source", "tuned") and kept.time_us == 1e9
    raw["entries"][0]["source"] = config_store.STALE  # a plain run (no --revalidate) searches the marked shape
    path.write_text(json.dumps(raw))
    assert autotune.main(["--smoke", "--out", str(tmp_path), "--ops", op, *shapes]) == 0
    searched = {e.shape["T"]: e for e in config_store.load(path, op, spec.dim_names, dispatch.spec_hash(spec)).entries}
    assert not searched[marked.shape["T"]].stale and searched[other["shape"]["T"]].time_us == 1e9


def test_autotune_revalidate_searches_a_shape_that_got_slower(tmp_path, capsys) -> None:
    """An entry that now runs more than REVALIDATE_SLOWDOWN times its recorded time is searched again."""
    op = "rms_norm_static_fp8_quant"
    path, raw = _stale_smoke_file(tmp_path, op, recorded_us=1e-6)
    assert autotune.main(["--smoke", "--out", str(tmp_path), "--ops", op, "--revalidate"]) == 0
    loaded = config_store.load(path, op, REGISTRY[op].dim_names, dispatch.spec_hash(REGISTRY[op]))
    assert [e.shape for e in loaded.entries] == [i["shape"] for i in raw["entries"]]
    assert all(e.source in ("seed", "tuned") and e.seed_time_us is not None for e in loaded.entries)
    assert "searching the shape again" in capsys.readouterr().out


def test_autotune_revalidate_stopped_midway_keeps_the_stale_file_whole(tmp_path, monkeypatch) -> None:
    """A revalidation stopped after some model shapes leaves the stale file as it was, every entry in it."""
    op = "rms_norm_static_fp8_quant"
    shapes = ("--shape", "T=1,H=256", "--shape", "T=1,H=512")
    path, raw = _stale_smoke_file(tmp_path, op, recorded_us=1e9, shapes=shapes)
    tune_shape = autotune.tune_shape

    def stop_at_the_second_model_shape(spec, shape, *args, **kwargs):
        if shape["H"] == 512:
            raise KeyboardInterrupt
        return tune_shape(spec, shape, *args, **kwargs)
    monkeypatch.setattr(autotune, "tune_shape", stop_at_the_second_model_shape)
    with pytest.raises(KeyboardInterrupt):
        autotune.main(["--smoke", "--out", str(tmp_path), "--ops", op, "--revalidate", *shapes])
    assert json.loads(path.read_text()) == raw


def test_autotune_revalidate_stopped_by_the_budget_saves_what_it_revalidated(tmp_path, monkeypatch, capsys) -> None:
    """A revalidation the budget stops after the first model shape saves that shape's entries under the current
    source (the stale entries it did not reach are dropped and named), and reports the rest as not tuned."""
    op = "rms_norm_static_fp8_quant"
    shapes = ("--shape", "T=1,H=256", "--shape", "T=1,H=512")
    path, _ = _stale_smoke_file(tmp_path, op, recorded_us=1e9, shapes=shapes)  # never slower: not searched again
    tune_shape, clock = autotune.tune_shape, {"now": 0.0}

    def tune_then_spend_the_budget(*args, **kwargs):
        clock["now"] = 1e9
        return tune_shape(*args, **kwargs)
    monkeypatch.setattr(autotune, "tune_shape", tune_then_spend_the_budget)
    monkeypatch.setattr(autotune, "time", types.SimpleNamespace(monotonic=lambda: clock["now"],
                                                                 perf_counter=time.perf_counter))
    assert autotune.main(["--smoke", "--out", str(tmp_path), "--ops", op, "--revalidate", *shapes]) == 1
    loaded = config_store.load(path, op, REGISTRY[op].dim_names, dispatch.spec_hash(REGISTRY[op]))
    assert [(e.shape, e.source) for e in loaded.entries] == [({"T": 1, "H": 256}, "revalidated")]
    captured = capsys.readouterr()
    text = " ".join(re.sub(r"\S+\.py:\d+", "", captured.out + captured.err).split())  # rich log: no source column
    assert "budget reached; saving its 1 revalidated entries, the stale ones not reached are dropped" in text
    assert f"not tuned (re-run to resume): {op} H=512" in text


def test_autotune_candidates_add_pipelined_persistent_kernels_at_large_t() -> None:
    spec = REGISTRY["rms_norm_dynamic_per_token_quant"]
    small, seeds = autotune.candidates(spec, {"T": autotune.PIPELINE_MIN_TOKENS // 2, "H": 8192})
    large, large_seeds = autotune.candidates(spec, {"T": autotune.PIPELINE_MIN_TOKENS, "H": 8192})
    assert seeds == large_seeds and not any("pid_type" in c.config for c in small)
    plain = [c for c in large if "pid_type" not in c.config]
    assert [c.config for c in large[len(plain):]] == [autotune.pipelined(c).config for c in plain]
    for config in large[len(plain):]:
        assert config.config["pid_type"] == "persistent_interleaved" and config.config["range_num_stages"] == [2]
        assert config.config["num_sm_multiplier"] * config.config["num_warps"] * 32 == 1024  # half an SM's threads


def test_autotune_candidates_add_the_ops_load_policies_to_the_seeds_at_large_t() -> None:
    """From PIPELINE_MIN_TOKENS, each seed also comes under each of the op's L2 policies, set on the loads of the
    arguments the policy names (checked in the generated code); an op without policies gets none."""
    spec, shape = REGISTRY["fused_add_rms_norm_static_fp8_quant"], {"T": autotune.PIPELINE_MIN_TOKENS, "H": 4096}
    configs, seeds = autotune.candidates(spec, shape)
    small = autotune.candidates(spec, {**shape, "T": autotune.PIPELINE_MIN_TOKENS // 2})[0]
    assert not any("load_eviction_policies" in c.config for c in small + configs[:seeds])
    variants = [c for c in configs if "load_eviction_policies" in c.config and "pid_type" not in c.config]
    assert len(variants) == seeds * len(spec.load_policies)
    launch = spec.prepare(**spec.make_inputs(shape, torch.bfloat16, torch.device("cpu")))[0]
    bound = launch.kernel.bind(launch.args)
    for config, wanted in zip(variants, itertools.cycle(spec.load_policies)):
        policies = {}
        for line in bound.to_triton_code(config).splitlines():
            loaded = re.search(r"tl\.load\((\w+)", line)
            if loaded:
                policy = re.search(r"eviction_policy='evict_(\w+)'", line)
                policies[loaded.group(1)] = policy.group(1) if policy else ""
        assert {name: policies.get(name) for name in ("x", "weight", "residual")} == \
            {"x": wanted.get("x", ""), "weight": "last", "residual": ""}
    gemm = REGISTRY["scaled_mm"]
    assert not any("load_eviction_policies" in c.config
                   for c in autotune.candidates(gemm, {"M": 2048, "N": 4096, "K": 4096, "BLOCK": 1})[0])


def test_autotune_finalists_are_timed_again_in_turns_and_their_median_decides() -> None:
    """A candidate whose first time was lucky loses to one that is faster on every later call."""
    calls: list[str] = []
    later = {"lucky": 10.5, "steady": 10.0}

    def time_us(run):
        calls.append(run())
        return later[calls[-1]]

    first = [(9.0, 0), (10.1, 3), (12.0, 5)]  # index 5 did not reach the finals
    ranked = autotune.final_times(first, {0: lambda: "lucky", 3: lambda: "steady"}, time_us)
    assert ranked == [(10.0, 3), (10.5, 0)]
    assert calls == ["lucky", "steady"] * autotune.FINAL_ROUNDS


def test_autotune_times_like_make_bench(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA graph with L2 warm for small token counts, flushed for a GEMM (its weights are cold in a model),
    the flushed eager timer for large ones; the GEMM's token count is its M."""
    import types

    import triton

    warm_graph, flushed_graph, flushed_eager = 1.0, 2.0, 3.0
    fake = types.SimpleNamespace(graph=lambda fn: flushed_graph, eager=lambda fn: flushed_eager)
    monkeypatch.setattr(autotune, "_timer", lambda: fake)
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", lambda fn, rep, return_mode: warm_graph / 1000.0)
    norm, gemm = REGISTRY["rms_norm"], REGISTRY["scaled_mm"]
    assert [autotune._time_us(None, norm, {"T": t, "H": 4096}) for t in (16, 4096)] == [warm_graph, flushed_eager]
    assert [autotune._time_us(None, gemm, {"M": m, "N": 4096, "K": 4096}) for m in (16, 4096)] == [
        flushed_graph, flushed_eager]


def test_autotune_retune_replaces_only_the_selected_entries(tmp_path) -> None:
    op = "rms_norm_static_fp8_quant"
    assert autotune.main(["--smoke", "--out", str(tmp_path), "--ops", op]) == 0
    path = tmp_path / "cpu_smoke" / f"{op}.json"
    raw = json.loads(path.read_text())
    for item in raw["entries"]:
        item["time_us"] = 1e9  # a retuned entry gets a real time again
    path.write_text(json.dumps(raw))
    assert autotune.main(["--smoke", "--out", str(tmp_path), "--ops", op, "--shape", "T=7,H=256", "--retune"]) == 0
    spec = REGISTRY[op]
    loaded = config_store.load(path, op, spec.dim_names, dispatch.spec_hash(spec)).entries
    entries = {(e.shape["H"], e.shape["T"]): e for e in loaded}
    assert set(entries) == {(256, 1), (256, 7)}
    assert entries[(256, 1)].time_us == 1e9 and entries[(256, 7)].time_us < 1e9


def test_autotune_retune_seeds_with_the_stored_config(tmp_path, monkeypatch) -> None:
    """A retune's first seed is the shape's stored config, so a searched config replaces it only by beating it on
    this GPU (the rule every searched config meets against the seeds): a retune on a noisier machine cannot lose it."""
    op = "rms_norm_static_fp8_quant"
    assert autotune.main(["--smoke", "--out", str(tmp_path), "--ops", op, "--shape", "T=7,H=256"]) == 0
    path = tmp_path / "cpu_smoke" / f"{op}.json"
    configs, num_seeds = autotune.candidates(REGISTRY[op], {"T": 7, "H": 256})
    raw = json.loads(path.read_text())
    stored = raw["entries"][0]["config"] = configs[-1].config  # a searched config, not a seed
    path.write_text(json.dumps(raw))
    seen = []
    tune_shape = autotune.tune_shape

    def record(spec, shape, dtype, device, configs, num_seeds, *args, **kwargs):
        seen.append((configs[0].config, num_seeds))
        return tune_shape(spec, shape, dtype, device, configs, num_seeds, *args, **kwargs)
    monkeypatch.setattr(autotune, "tune_shape", record)
    assert autotune.main(["--smoke", "--out", str(tmp_path), "--ops", op, "--shape", "T=7,H=256", "--retune"]) == 0
    assert seen == [(stored, num_seeds + 1)]


def test_autotune_rejects_unknown_ops(capsys) -> None:
    with pytest.raises(SystemExit):
        autotune.main(["--smoke", "--ops", "rms_norm,not_an_op"])
    assert "--ops: unknown op names ['not_an_op']" in capsys.readouterr().err


@pytest.mark.parametrize(("shape", "message"), [
    ("T=16/abc", "--shape: expected DIM=positive int[/int...] items separated by commas, got 'T=16/abc'"),
    ("T=0", "--shape: expected DIM=positive int"),
    ("T", "--shape: expected DIM=positive int"),
    ("T=16,N=8", "--shape: rms_norm has the dims ['T', 'H'], not ['N']"),
])
def test_autotune_rejects_bad_shapes(capsys, shape: str, message: str) -> None:
    with pytest.raises(SystemExit):
        autotune.main(["--smoke", "--ops", "rms_norm", "--shape", shape])
    assert message in capsys.readouterr().err


def test_shape_selection_takes_the_grid_for_dims_left_out() -> None:
    [(spec, shapes)] = _grid("--ops", "rms_norm", "--shape", "T=1/16", "--shape", "T=16,H=4096")
    hidden = [d for d in spec.problem if d.name == "H"][0].grid
    assert shapes == [{"T": t, "H": h} for h in hidden for t in (1, 16)]
    assert [list(s) for s in shapes] == [["T", "H"]] * len(shapes)  # the problem key's order, as tables print it


def _grid(*argv: str) -> list[tuple[Any, list[dict[str, int]]]]:
    import argparse

    from helion_fusions.tools import cli

    parser = argparse.ArgumentParser()
    cli.add_grid_arguments(parser)
    return cli.selected_grid(parser, parser.parse_args(list(argv)))


def test_a_gemm_grid_is_the_layers_of_a_model() -> None:
    """A GEMM's (N, K) pairs are the layers of the tuned model, not the product of every N with every K; a
    selection naming some model dims takes the layers that have them, one naming all of them that shape."""
    from helion_fusions.ops import scaled_mm

    def pairs(*argv: str) -> list[tuple[str, list[tuple[int, int]]]]:
        return [(spec.name, sorted({(s["N"], s["K"]) for s in shapes})) for spec, shapes in _grid(*argv)]

    ops = "scaled_mm,scaled_mm_silu_mul_static_fp8_quant"
    layers, gate_up = (sorted({pair for model in scaled_mm.TUNED_MODELS for pair in table[model]})
                       for table in (scaled_mm.LAYERS, scaled_mm.GATE_UP))
    assert pairs("--ops", ops) == [("scaled_mm", layers), ("scaled_mm_silu_mul_static_fp8_quant", gate_up)]
    assert pairs("--ops", "scaled_mm", "--shape", "K=14336") == [("scaled_mm", [(4096, 14336), (8192, 14336)])]
    assert pairs("--ops", "scaled_mm", "--shape", "N=5120,K=8192") == [("scaled_mm", [(5120, 8192)])]
    k_grid = REGISTRY["scaled_mm"].problem[2].grid
    assert pairs("--ops", "scaled_mm", "--shape", "N=5120") == [("scaled_mm", [(5120, 8192)])]
    assert pairs("--ops", "scaled_mm", "--shape", "N=3072") == [("scaled_mm", [(3072, k) for k in k_grid])]
    [(_, shapes)] = _grid("--ops", "scaled_mm", "--shape", "M=1/16,N=4096,K=4096")
    assert shapes == [{"M": 1, "N": 4096, "K": 4096, "BLOCK": 1}, {"M": 16, "N": 4096, "K": 4096, "BLOCK": 1}]
    # a layer of no tuned model takes row scales unless block scales are named
    for shape, blocks in (("N=3072,K=8192", {1}), ("N=3072,K=8192,BLOCK=128", {128}), ("N=3072", {1})):
        assert {s["BLOCK"] for _, shapes in _grid("--ops", "scaled_mm", "--shape", shape) for s in shapes} == blocks
    # the block-fp8 model's layers are tuned on block scales
    assert {s["BLOCK"] for _, shapes in _grid("--ops", "scaled_mm", "--shape", "K=7168") for s in shapes} == {128}


def test_autotune_compiles_every_shape_on_its_own_launches() -> None:
    """Each shape's candidates are compiled on that shape: a GEMM of 16 rows splits K (two launches), one of 1 row
    too but specialized, one of 64 rows does not."""
    spec = REGISTRY["scaled_mm_static_fp8_quant"]
    shapes = [{"M": m, "N": 4096, "K": 4096} for m in (1, 16, 64)]
    configs = {repr(shape): autotune.candidates(spec, shape)[0] for shape in shapes}
    jobs = autotune.precompile_jobs([(spec, shape, configs[repr(shape)]) for shape in shapes], "bfloat16")
    for shape in shapes:
        mine = [job for job in jobs if job[1] == shape]
        assert all(name == spec.name and dtype == "bfloat16" and 0 < len(chunk) <= autotune.PRECOMPILE_CHUNK
                   for name, _, dtype, chunk in mine)
        assert [c for job in mine for c in job[3]] == [dict(c.config) for c in configs[repr(shape)]]


def test_autotune_loads_the_code_a_compile_worker_generated(tmp_path) -> None:
    """The tuning process takes a worker's generated module (the same function Helion's compile gives), and
    compiles the kernel itself where the file is gone."""
    from helion_fusions.tools.testing import code_generator

    spec = REGISTRY["scaled_mm_static_fp8_quant"]
    shape = {"M": 16, "N": 256, "K": 1024}
    launch = spec.prepare(**spec.make_inputs(shape, torch.bfloat16, torch.device("cpu")))[0]
    launch = launch._replace(kernel=code_generator(launch.kernel))
    config = spec.search_configs({"M": 16, "N": 4096, "K": 4096})[-1]
    compiled = launch.kernel.bind(launch.args).compile_config(config)
    file = compiled.__code__.co_filename
    assert autotune.compiled_launch(launch, config, file) is compiled
    assert autotune.compiled_launch(launch, config, str(tmp_path / "gone.py")) is compiled
    assert autotune.compiled_launch(launch, config, None) is compiled


def test_autotune_without_gpu_needs_smoke(capsys) -> None:
    with pytest.raises(SystemExit):
        autotune.main(["--ops", "rms_norm"])
    assert "--smoke" in capsys.readouterr().err


def test_bench_prints_a_correctness_table_without_gpu(capsys, monkeypatch) -> None:
    monkeypatch.delenv("HELION_INTERPRET", raising=False)
    assert bench.main(["--ops", "rms_norm_per_block_quant,rms_norm_nvfp4_quant"]) == 0
    assert "HELION_INTERPRET" not in os.environ, "the CPU table must not switch later calls to interpret mode"
    out = capsys.readouterr().out
    assert "No CUDA device" in out
    assert out.count("| ok ") == 4 and "MISMATCH" not in out


def test_bench_workers_return_rows_in_order_and_measure_one_at_a_time() -> None:
    import bench_workers

    jobs = [bench.ShapeJob("rms_norm", {"T": t, "H": 4096}, "bfloat16", 1, 1.0, "cpu_test", None) for t in range(6)]
    rows = list(bench.bench_shapes(jobs, 2, bench_workers.measure))
    assert [r["T"] for r in rows] == list(range(6))
    assert 1 <= len({r["pid"] for r in rows}) <= 2  # how many of the two workers get a job depends on their start
    spans = sorted((r["start"], r["end"]) for r in rows)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    assert [r["T"] for r in bench.bench_shapes(jobs[:2], 1, bench_workers.measure)] == [0, 1]


def test_bench_workers_hold_the_gpu_lock_while_inductor_autotunes(monkeypatch) -> None:
    """A worker's Inductor autotuning (GPU timings of a new kernel's configs) runs under the lock that keeps the rows'
    timings alone on the GPU; the lock is reentrant, as a worker timing its row may meet such a first call."""
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    held = []

    class Lock:
        depth = 0

        def __enter__(self) -> None:
            self.depth += 1

        def __exit__(self, *exc: object) -> None:
            self.depth -= 1

    lock = Lock()
    monkeypatch.setattr(CachingAutotuner, "bench", lambda self, launcher: held.append((launcher, lock.depth)) or 1.5)
    lock_inductor_benchmarks(lock)
    assert CachingAutotuner.bench(object(), "launcher") == 1.5
    with lock:
        CachingAutotuner.bench(object(), "again")
    assert held == [("launcher", 1), ("again", 2)] and lock.depth == 0


def test_bench_summary_reads_rows_without_and_with_the_same_size_copy(tmp_path) -> None:
    """Rows of a run before ``copy_same_us`` existed read as blanks; the T >= 4096 summary counts the rows that have it."""
    import csv

    with open(RESULTS / "nvidia_h200.csv", newline="") as source:
        shipped = list(csv.DictReader(source))
    older = tmp_path / "older.csv"  # the row as a run before the column wrote it
    with open(older, "w", newline="") as target:
        writer = csv.DictWriter(target, [k for k in shipped[-1] if k not in ("copy_same_us", "pct_copy_same")],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerow(shipped[-1])
    rows = [{**bench.read_rows(older)[-1], "T": 4096}]
    assert rows[0]["copy_same_us"] is None and rows[0]["pct_copy_same"] is None
    assert not any("pct_copy_same" in line for line in bench.summary(rows, 4200.0))
    rows.append({**rows[0], "copy_same_us": 50.0, "pct_copy_same": 100 * 50.0 / rows[0]["ours_us"]})
    bench.write_results(rows, 4200.0, "test_device", "Test", tmp_path)
    text = (tmp_path / "test_device.md").read_text()
    assert f"(`pct_copy_same`): mean {rows[1]['pct_copy_same']:.1f}%; rows >= 85%: 0/1" in text
    assert bench.read_rows(tmp_path / "test_device.csv")[1]["copy_same_us"] == 50.0


def test_bench_times_every_version_on_every_buffer_set() -> None:
    """The versions of a row run on the same buffers, each set in turn; a version's time is its mean over them."""
    from perf import tables

    calls = []

    def timing(fns):
        for fn in fns:
            fn()
        return [float(i) for i in range(len(fns))]

    versions = [lambda x: calls.append(("ours", x)), lambda x: calls.append(("compile", x))]
    means, others = tables.on_sets(timing, versions, [{"x": 0}, {"x": 1}, {"x": 2}], [lambda: calls.append("copy")])
    assert calls == [("ours", 0), ("compile", 0), ("ours", 1), ("compile", 1), ("ours", 2), ("compile", 2), "copy"]
    assert means == [2.0, 3.0] and others == [6.0]


def test_bench_merge_keeps_earlier_rows_not_measured_again() -> None:
    """A run cut short (or split by --ops) keeps the earlier rows of every shape it did not measure."""
    def row(op: str, tokens: int, us: float) -> dict:
        return {"op": op, "dtype": "bfloat16", "shape": f"T={tokens},H=4096", "T": tokens, "H": 4096, "ours_us": us}

    earlier = [row("rms_norm", 1, 1.0), row("rms_norm", 16, 1.0), row("silu_and_mul", 1, 1.0)]
    merged = bench.merge_rows(earlier, [row("rms_norm", 16, 2.0)])
    assert [(r["op"], r["T"], r["ours_us"]) for r in merged] == [
        ("rms_norm", 1, 1.0), ("rms_norm", 16, 2.0), ("silu_and_mul", 1, 1.0)]


def test_bench_results_round_trip_and_older_csvs_load(tmp_path) -> None:
    """write_results then read_rows gives the rows back; a CSV from before a column existed still loads."""
    row = {column: 1 for column in bench.COLUMNS}
    row.update(device="cpu_test", op="rotary_embedding", dtype="bfloat16", helion="1.5.0", triton="3.6.0",
               torch="2.13.0", kernel_hash=dispatch.spec_hash(REGISTRY["rotary_embedding"]),
               repro="python -m perf.bench", eager_us=3.0, speedup_vs_compile=1.5, shape="T=1,H=1",
               host_us=9.5, host_kw_us=11.0, launch_us=6.0)
    stale = {**row, "op": "rms_norm", "kernel_hash": "0" * 16, "compile_reused": 0, "host_us": None,
             "host_kw_us": None, "launch_us": None}
    bench.write_results([row, stale], 3000.0, "cpu_test", "CPU test", tmp_path)
    assert bench.read_rows(tmp_path / "cpu_test.csv") == [row, stale]
    text = (tmp_path / "cpu_test.md").read_text()
    assert "## Host time per call" in text and "Largest host_us - launch_us: 3.5 us" in text
    assert "rows measured on an earlier kernel source (or not recorded): 1, of rms_norm" in text
    assert "rows whose torch.compile columns come from an earlier run on this device (`--reuse-baselines`): 1" in text
    older = tmp_path / "older.csv"
    columns = [c for c in bench.COLUMNS if c not in ("launches", "kernel_hash", "compile_reused", "shape", "host_us",
                                                     "host_kw_us", "launch_us")]
    older.write_text(",".join(columns) + "\n" + ",".join("x" if c in ("device", "op") else "1" for c in columns) + "\n")
    (loaded,) = bench.read_rows(older)
    assert loaded["launches"] is None and loaded["kernel_hash"] == "" and not loaded["compile_reused"]
    assert loaded["T"] == 1 and loaded["eager_us"] == 1.0 and loaded["shape"] == "T=1,H=1"
    assert loaded["host_us"] is None


def test_host_times_land_on_the_row_of_their_shape() -> None:
    spec = REGISTRY["rms_norm"]
    at = bench.shape_text(bench.host_shape(spec))
    assert at == "T=16,H=4096"
    rows = [{"op": "rms_norm", "dtype": "bfloat16", "shape": s} for s in ("T=1,H=4096", at)]
    missing = bench.add_host_times(rows, {"rms_norm": {"host_us": 1.0}, "silu_and_mul": {"host_us": 2.0}},
                                   "bfloat16")
    assert missing == ["silu_and_mul"] and "host_us" not in rows[0] and rows[1]["host_us"] == 1.0


def test_sass_compiles_a_shipped_config_for_sm90(tmp_path, capsys) -> None:
    args = ["--ops", "rms_norm_dynamic_per_token_quant", "--shape", "T=7,H=4096", "--out", str(tmp_path)]
    assert sass.main(args) == 0
    table = capsys.readouterr().out
    assert "rms_norm_dynamic_per_token_quant" in table and "nvidia_h200 T=16,H=4096" in table
    text = (tmp_path / "rms_norm_dynamic_per_token_quant_T7_H4096_sm90.sass").read_text()
    assert "EXIT" in text


def test_sass_compiles_the_shapes_asked_for_else_one_large_shape_an_op(monkeypatch, capsys) -> None:
    """``--shape`` replaces the default shape (it was appended to T = 4096, which a GEMM's dims refused); without it
    each op's model dims get one large shape: T = 4096, a GEMM's M = 2048."""
    compiled = []

    def report(spec, shape, *args) -> sass.Report:
        compiled.append((spec.name, dict(shape)))
        return sass.Report(spec.name, str(shape), 1, 0, 0, 1, 1, 0, [])

    monkeypatch.setattr(sass, "compile_report", report)
    assert sass.main(["--ops", "scaled_mm", "--shape", "M=16,N=4096,K=4096"]) == 0
    assert compiled == [("scaled_mm", {"M": 16, "N": 4096, "K": 4096, "BLOCK": 1})]
    compiled.clear()
    assert sass.main(["--ops", "rms_norm,scaled_mm"]) == 0
    assert {(name, shape.get("T", shape.get("M"))) for name, shape in compiled} == {("rms_norm", 4096),
                                                                                   ("scaled_mm", 2048)}
    assert sum(name == "scaled_mm" for name, _ in compiled) == len(REGISTRY["scaled_mm"].models)  # one a layer


def test_sass_compiles_a_pipelined_persistent_config(tmp_path) -> None:
    """Persistent configs ask for the multiprocessor count, which CPU tensors lack; the row loads become cp.async."""
    spec = REGISTRY["rms_norm_dynamic_per_token_quant"]
    shape = {"T": 4096, "H": 4096}
    config = autotune.pipelined(spec.default_config(shape))
    sass.compile_report(spec, shape, torch.bfloat16, config, 90, tmp_path)
    assert "LDGSTS" in (tmp_path / "rms_norm_dynamic_per_token_quant_T4096_H4096_sm90.sass").read_text()


def test_sass_report_counts_instructions_and_calls(tmp_path) -> None:
    spec = REGISTRY["static_scaled_fp8_quant"]
    shape = {"T": 16, "H": 1024}
    report = sass.compile_report(spec, shape, torch.float16, spec.default_config(shape), 90, tmp_path)
    assert report.registers > 0 and report.instructions > 10 and report.local_bytes == 0
    text = (tmp_path / "static_scaled_fp8_quant_T16_H1024_sm90.sass").read_text()
    assert report.calls == text.count("CALL.")
    assert sum(count for _, count in report.mix) <= report.instructions
    # the straight path ends at the first EXIT; the division's out-of-line slow path (the CALLs' target) follows it
    assert 10 < report.to_exit < report.instructions



def test_timer_drops_calls_that_host_time_got_into_and_sleeps_longer(monkeypatch) -> None:
    """CPU stand-ins for the CUDA calls: each timed call is late (its sleep ended before the host had
    enqueued it) or not, as ``late`` says; late calls take 1 ms, the others 2 us."""
    from helion_fusions.tools import testing

    late: list[bool] = []
    sleeps: list[int] = []
    timed: list[Any] = []

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            self.ms = 0.0
            if enable_timing:
                timed.append(self)

        def record(self) -> None:
            pass

        def query(self) -> bool:  # only the event after the sleep is queried
            return late[len(sleeps) - 1]

        def elapsed_time(self, end: Any) -> float:
            return end.ms

    def fn() -> None:
        if sleeps:  # a timed call (not a warm-up): its end event is the newest
            timed[-1].ms = 1.0 if late[len(sleeps) - 1] else 0.002

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "_sleep", sleeps.append)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    timer = object.__new__(testing.Timer)
    timer.reps, timer.flush_buffer = 3, torch.empty(8, dtype=torch.uint8)

    late[:] = [True, False, True, False, False]
    assert timer.eager(fn) == pytest.approx(2.0)  # microseconds: the late calls are not counted
    cycles = testing.SLEEP_CYCLES
    assert sleeps == [cycles, 2 * cycles, 2 * cycles, 4 * cycles, 4 * cycles]

    sleeps.clear()
    late[:] = [True] * 9
    with pytest.warns(UserWarning, match="include host time"):
        assert timer.eager(fn) == pytest.approx(1000.0)
    assert len(sleeps) == 3 * timer.reps and sleeps[-1] == testing.MAX_SLEEP_CYCLES


def test_bench_tp_checks_each_path_on_two_cpu_ranks(capsys: pytest.CaptureFixture[str]) -> None:
    from perf import bench_tp

    assert bench_tp.main(["--ops", "all_reduce_fused_add_rms_norm_static_fp8_quant"]) == 0
    out = capsys.readouterr().out
    assert "2 CPU ranks over gloo" in out and "all_reduce_fused_add_rms_norm_static_fp8_quant" in out


def test_autotune_tp_without_two_gpus_says_what_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    from helion_fusions.tools import autotune_tp

    assert autotune_tp.main(["--ops", "all_reduce_rms_norm"]) == 2
    err = capsys.readouterr().err
    assert "needs at least two CUDA GPUs on this host, found 0" in err, err
    with pytest.raises(SystemExit):
        autotune_tp.main(["--ops", "rms_norm"])  # the all_reduce_ ops only
    assert "--ops: unknown op names ['rms_norm']" in capsys.readouterr().err


def test_bench_gemm_checks_every_variant_on_a_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    from perf import bench_gemm

    assert bench_gemm.main([]) == 0
    out = capsys.readouterr().out
    checked = {variant for model in bench_gemm.LAYERS for variant in bench_gemm.variants(model)}
    assert len(checked) == 21  # seven ops, three scale layouts
    assert "MISMATCH" not in out and out.count("| ok") == len(checked) * len(bench_gemm.CPU_SHAPES)


def test_benches_keep_a_static_compile_per_shape() -> None:
    """torch.compile(dynamic=False) compiles each shape a GEMM bench run measures (every model's layers at every M):
    past dynamo's default of 8 recompiles a function, the later rows' compile column would time eager code."""
    from perf import bench_gemm, tables

    tables.allow_static_compiles()
    rows_per_function = len(bench_gemm.TOKENS) * sum(len(shapes) for shapes in bench_gemm.LAYERS.values())
    assert torch._dynamo.config.cache_size_limit >= rows_per_function


def test_bench_gemm_summary_and_op_filter(capsys: pytest.CaptureFixture[str]) -> None:
    from perf import bench_gemm

    rows = [{"op": "scaled_mm_static_fp8_quant", "scales": "tensor", "M": m, "speedup_vs_unfused": speedup,
             "cublas_fp8_out_us": 10.0, "ours_us": ours} for m, speedup, ours in ((16, 0.5, 20.0), (2048, 2.0, 8.0))]
    rows.append({"op": "scaled_mm", "scales": "row", "M": 1, "speedup_vs_unfused": 0.8, "ours_us": 1.0})
    assert bench_gemm.summary(rows) == [
        "- scaled_mm_static_fp8_quant, tensor scales: 1.00x the unfused path (geomean of 2), min 0.50x, 1 below 1.0; "
        "vs cuBLAS fp8 output at M >= 1024: 1.25-1.25x; vs cuBLAS fp8 output at M <= 128: 0.50-0.50x",
        "- scaled_mm, row scales: 0.80x the unfused path (geomean of 1), min 0.80x, 1 below 1.0"]
    with pytest.raises(SystemExit):
        bench_gemm.main(["--ops", "rms_norm"])
    assert "--ops: unknown ['rms_norm']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_gemm.main(["--models", "llama3_70b_tp2", "--scales", "row,block"])
    assert "--scales: unknown ['block'] for ['llama3_70b_tp2']" in capsys.readouterr().err


def test_bench_gemm_append_merges_rows_into_the_table(tmp_path) -> None:
    """``--append``: a row measured again replaces its earlier one, the others stay with their own versions and repro,
    all in the order a whole run measures; the table reads back as it was written, and names the runs file."""
    from perf import bench_gemm

    def row(op: str, scales: str, m: int, ours: float) -> dict:
        return {"op": op, "model": "llama3_8b", "M": m, "N": 4096, "K": 4096, "scales": scales, "out": "bfloat16",
                "cublas_us": 10.0, "unfused_us": 12.0, "ours_us": ours, "tflops": 2 * m * 4096 * 4096 / ours / 1e6,
                "speedup_vs_unfused": 12.0 / ours}

    retired = {**row("scaled_mm", "row", 1, 9.0), "model": "a_retired_model"}  # sorted last, kept
    earlier = [retired, row("scaled_mm", "row", 16, 9.0), row("scaled_mm", "tensor", 16, 11.0),
               row("scaled_mm_static_fp8_quant", "tensor", 1, 8.0)]
    bench_gemm.write_results(earlier, tmp_path, "gpu", "A GPU")
    written = bench_gemm.read_rows(tmp_path / "gpu_gemm.csv")
    assert [(r["model"][0], r["op"], r["scales"], r["M"]) for r in written] == [
        ("l", "scaled_mm", "tensor", 16), ("l", "scaled_mm", "row", 16),
        ("l", "scaled_mm_static_fp8_quant", "tensor", 1), ("a", "scaled_mm", "row", 1)]
    for r in written:
        r["torch"] = "0.1"  # an earlier run's version: kept
    again = [row("scaled_mm", "tensor", 16, 6.0), row("scaled_mm", "tensor", 1, 5.0)]
    (tmp_path / "gpu_gemm_runs.md").write_text("runs\n")
    text = bench_gemm.write_results(bench_gemm.merge_rows(written, again), tmp_path, "gpu", "A GPU")
    table = bench_gemm.read_rows(tmp_path / "gpu_gemm.csv")
    assert [(r["scales"], r["M"], r["ours_us"]) for r in table if r["op"] == "scaled_mm"] == [
        ("tensor", 1, 5.0), ("tensor", 16, 6.0), ("row", 16, 9.0), ("row", 1, 9.0)]
    kept = {(r["scales"], r["M"]): r for r in table if r["op"] == "scaled_mm" and r["model"] == "llama3_8b"}
    assert kept[("row", 16)]["torch"] == "0.1" and kept[("tensor", 16)]["torch"] != "0.1"
    assert kept[("tensor", 1)]["repro"].endswith("--scales tensor --tokens 1")
    assert "[gpu_gemm_runs.md](gpu_gemm_runs.md)" in text and "### llama3_8b (4 rows)" in text
