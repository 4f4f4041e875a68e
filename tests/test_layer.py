"""``python -m perf.layer`` on a CPU: the layer with our ops agrees with the plain-torch layer, and the
results writer produces the columns the GPU run reports."""

from __future__ import annotations

import csv
import dataclasses

import pytest
import torch

from perf import decoder, layer

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU smoke mode of perf.layer")

CPU = torch.device("cpu")
REQUIRED = ["model", "quant", "T", "graphs", "compile_us", "ours_us", "speedup", "ours_host_us", "device", "torch",
            "helion", "triton", "repro"]


def test_cli_smoke_mode_passes(capsys) -> None:
    assert layer.main([]) == 0
    printed = capsys.readouterr().out
    assert "No CUDA device" in printed
    assert printed.count("| ok ") == len(decoder.QUANTS) * len(layer.SMOKE_TOKENS)
    assert "MISMATCH" not in printed


@pytest.mark.parametrize("ours_fn", [decoder.ours_layer, decoder.ours_gemm_layer], ids=["cublas", "our_gemms"])
@pytest.mark.parametrize("flavour", decoder.QUANTS)
def test_versions_agree(flavour: str, ours_fn) -> None:
    weights = decoder.make_layer(decoder.SMOKE_MODEL, flavour, CPU)
    for tokens in layer.SMOKE_TOKENS:
        x, residual, positions = decoder.make_inputs(decoder.SMOKE_MODEL, tokens, CPU)
        assert layer.relative_error(ours_fn, decoder.torch_layer, weights, x, residual,
                                    positions) <= layer.TOLERANCE
        kept = residual.clone()
        assert decoder.torch_layer(weights, x, residual, positions)[1] is not residual
        assert torch.equal(residual, kept)  # plain torch returns a new residual
        out, ours_residual = ours_fn(weights, x, residual, positions)
        assert ours_residual is residual and not torch.equal(residual, kept)  # ours updates it in place
        assert out.shape == x.shape and out.dtype == torch.bfloat16
        assert bool(out.isfinite().all()) and out.float().std() > 0.1


@pytest.mark.parametrize("flavour", decoder.QUANTS)
def test_a_wrong_layer_is_caught(flavour: str) -> None:
    """The tolerance is loose enough for fp8 rounding ties and tight enough for a wrong step (swapped norm weights)."""
    weights = decoder.make_layer(decoder.SMOKE_MODEL, flavour, CPU)
    swapped = dataclasses.replace(weights, input_norm=weights.post_norm, post_norm=weights.input_norm)

    def wrong(_: decoder.Layer, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return decoder.ours_layer(swapped, *inputs)

    inputs = decoder.make_inputs(decoder.SMOKE_MODEL, layer.SMOKE_TOKENS[-1], CPU)
    assert layer.relative_error(wrong, decoder.torch_layer, weights, *inputs) > layer.TOLERANCE


def _row(tokens: int, graphs: bool, compile_us: float, ours_us: float) -> dict:
    return {"device": "test_device", "model": "llama3_8b", "quant": "static", "T": tokens, "graphs": graphs,
            "compile_us": compile_us, "ours_us": ours_us, "speedup": compile_us / ours_us, "ours_host_us": 120.0,
            "compile_host_us": 100.0, "rel_err": 0.05, "torch": "2.13.0", "helion": "1.5.0", "triton": "3.6.0",
            "repro": f"python -m perf.layer --models llama3_8b --quant static --tokens {tokens}"}


def test_write_results_columns_and_summary(tmp_path) -> None:
    rows = [_row(16, False, 110.0, 100.0), _row(16, True, 90.0, 100.0), _row(2048, False, 800.0, 1000.0)]
    layer.write_results(rows, "test_device", "Test Device", tmp_path)
    with open(tmp_path / "test_device_layer.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        written = list(reader)
    assert set(REQUIRED) <= set(reader.fieldnames)
    assert [float(r["speedup"]) for r in written] == pytest.approx([1.1, 0.9, 0.8])
    assert written[0]["repro"] == "python -m perf.layer --models llama3_8b --quant static --tokens 16"
    text = (tmp_path / "test_device_layer.md").read_text()
    assert "without CUDA graphs: geomean speedup 0.94x over 2 rows" in text
    assert "with CUDA graphs: geomean speedup 0.90x over 1 rows" in text
    assert "min speedup 0.80x (llama3_8b static T=2048); rows below 1.0: 2" in text
    assert "| model " in text and "ours_host_us" in text and "failed" not in text
    layer.write_results(rows, "test_device", "Test Device", tmp_path, failed=["llama3_8b block T=1: RuntimeError: no"])
    assert "- rows that failed to run: 1 (llama3_8b block T=1: RuntimeError: no)" in (
        tmp_path / "test_device_layer.md").read_text()


def test_cli_rejects_unknown_names() -> None:
    for argv in (["--models", "gpt5"], ["--quant", "nvfp4"], ["--tokens", "0"]):
        with pytest.raises(SystemExit):
            layer.main(argv)


def test_our_gemms_match_the_cublas_version_and_write_their_own_table(tmp_path) -> None:
    """With our GEMM ops (gate_up fused with SiLU-and-mul + quant) the layer gives the cuBLAS version's output:
    the same with per-tensor scales; with row scales ``torch._scaled_mm`` applies the two scales in another order
    (2 of the qkv GEMM's 3584 bf16 outputs a rounding step apart on a CPU), and fp8 codes move downstream."""
    for flavour in decoder.QUANTS:
        weights = decoder.make_layer(decoder.SMOKE_MODEL, flavour, CPU)
        inputs = decoder.make_inputs(decoder.SMOKE_MODEL, layer.SMOKE_TOKENS[-1], CPU)
        error = layer.relative_error(decoder.ours_gemm_layer, decoder.ours_layer, weights, *inputs)
        assert error <= (1e-6 if flavour == "static" else layer.TOLERANCE)
    layer.write_results([_row(16, False, 110.0, 100.0)], "test_device", "Test Device", tmp_path, gemms="ours")
    assert (tmp_path / "test_device_layer_gemm.csv").exists()
    assert "ours (with our GEMM ops) vs torch.compile" in (tmp_path / "test_device_layer_gemm.md").read_text()


@pytest.mark.parametrize("tokens", [1, 7])
def test_block_flavour_scales(tokens: int) -> None:
    """Block flavour: both versions hand the GEMMs per-group scales M-major with 16-byte-aligned columns (cuBLAS's
    block-scaled layout), the same values, and the same fp8 codes."""
    weights = decoder.make_layer(decoder.SMOKE_MODEL, "block", CPU)
    x, residual, _ = decoder.make_inputs(decoder.SMOKE_MODEL, tokens, CPU)
    ours, ours_scale = decoder._ours_quantized(weights, weights.o, "input", x.shape, input=x)
    plain, plain_scale = decoder._quantize(x, weights.o)
    assert ours_scale.shape == plain_scale.shape == (tokens, x.shape[1] // decoder.GROUP)
    assert ours_scale.stride() == plain_scale.stride() == (1, -(-tokens // 4) * 4)
    assert torch.equal(ours_scale, plain_scale) and torch.equal(ours.view(torch.uint8), plain.view(torch.uint8))


@pytest.mark.parametrize("flavour", decoder.QUANTS)
def test_every_version_traces_whole(flavour: str) -> None:
    """Each version of the layer traces as one graph (``fullgraph=True``, as ``perf.layer`` compiles it; AOT eager
    here: the trace and the functionalized in-place ops, without a code generator) and gives its eager bytes."""
    weights = decoder.make_layer(decoder.SMOKE_MODEL, flavour, CPU)
    x, residual, positions = decoder.make_inputs(decoder.SMOKE_MODEL, 7, CPU)
    for version in (decoder.ours_layer, decoder.ours_gemm_layer, decoder.torch_layer):
        traced = torch.compile(version, fullgraph=True, dynamic=False, backend="aot_eager")
        got, expected = traced(weights, x, residual.clone(), positions), version(weights, x, residual.clone(), positions)
        assert all(torch.equal(g, e) for g, e in zip(got, expected)), version.__name__


def test_append_keeps_the_rows_a_run_does_not_measure(tmp_path) -> None:
    """``--append``: an earlier table's rows come back typed as measured; a row measured again replaces its own."""
    earlier = [_row(16, False, 110.0, 100.0), _row(16, True, 90.0, 100.0), _row(2048, False, 800.0, 1000.0)]
    layer.write_results(earlier, "test_device", "Test Device", tmp_path)
    read = layer.read_rows(tmp_path / "test_device_layer.csv")
    assert [(r["T"], r["graphs"], r["speedup"]) for r in read] == [(r["T"], r["graphs"], pytest.approx(r["speedup"]))
                                                                   for r in earlier]
    block = {**_row(1, False, 100.0, 90.0), "quant": "block"}
    merged = layer.merge_rows(read, [_row(16, True, 95.0, 100.0), block])
    assert [(r["quant"], r["T"], r["graphs"], r["compile_us"]) for r in merged] == [
        ("static", 16, False, 110.0), ("static", 16, True, 95.0), ("static", 2048, False, 800.0),
        ("block", 1, False, 100.0)]
