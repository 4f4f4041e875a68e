"""``make autotune`` and ``make bench`` run end to end on a CPU (their smoke / correctness modes)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from helion_fusions import autotune, config_store, dispatch
from helion_fusions.registry import REGISTRY
from perf import bench

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU modes of the CLIs")


def test_autotune_smoke_writes_valid_configs(tmp_path) -> None:
    assert autotune.main(["--smoke", "--out", str(tmp_path), "--ops", "rms_norm_static_fp8_quant"]) == 0
    path = tmp_path / "cpu_smoke" / "rms_norm_static_fp8_quant.json"
    spec = REGISTRY["rms_norm_static_fp8_quant"]
    loaded = config_store.load(path, spec.name, dispatch.spec_hash(spec))
    assert {(e.hidden, e.tokens) for e in loaded.entries} == {(256, 1), (256, 7)}
    assert all(e.source in ("seed", "tuned") and e.time_us > 0 for e in loaded.entries)
    # a second run resumes: nothing left to tune, the file is unchanged
    before = json.loads(path.read_text())
    assert autotune.main(["--smoke", "--out", str(tmp_path), "--ops", "rms_norm_static_fp8_quant"]) == 0
    assert json.loads(path.read_text()) == before


def test_autotune_revalidates_stale_entries(tmp_path) -> None:
    """--revalidate re-checks and re-times each stale entry's own config, and saves it under the current source."""
    op = "dynamic_scaled_fp8_quant"  # two launches for T > 1: both run with the entry's config
    assert autotune.main(["--smoke", "--out", str(tmp_path), "--ops", op]) == 0
    path = tmp_path / "cpu_smoke" / f"{op}.json"
    raw = json.loads(path.read_text())
    raw["kernel_hash"] = "0" * 16
    path.write_text(json.dumps(raw))
    assert autotune.main(["--smoke", "--out", str(tmp_path), "--ops", op, "--revalidate"]) == 0
    loaded = config_store.load(path, op, dispatch.spec_hash(REGISTRY[op]))
    assert [(e.tokens, e.config, e.source) for e in loaded.entries] == [
        (item["tokens"], item["config"], "revalidated") for item in raw["entries"]]


def test_autotune_rejects_unknown_ops(capsys) -> None:
    with pytest.raises(SystemExit):
        autotune.main(["--smoke", "--ops", "rms_norm,not_an_op"])
    assert "--ops: unknown op names ['not_an_op']" in capsys.readouterr().err


def test_autotune_rejects_bad_token_list(capsys) -> None:
    with pytest.raises(SystemExit):
        autotune.main(["--smoke", "--tokens", "16,abc"])
    assert "--tokens: expected comma-separated positive integers" in capsys.readouterr().err


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
