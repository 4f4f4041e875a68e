"""The fused all_reduce ops on two GPUs (NCCL, symmetric memory, NVLink multicast off): every flavour against the
reference, identical bytes on both ranks, T = 1, an odd hidden size, a producer writing into the workspace, and
CUDA-graph replay, each with the one-shot and the two-shot algorithm forced. Skipped without two GPUs.

Run with ``NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 python -m pytest -q
tests/test_all_reduce_gpu.py`` (the ranks set the same variables themselves); ``ALL_REDUCE_GPU_QUICK=1``
runs bf16 and three shapes only.
"""

from __future__ import annotations

import pytest
import torch

import all_reduce_gpu_workers as workers
from all_reduce_workers import rank_input, spawn_ranks
from helion_fusions.ops import all_reduce
from helion_fusions.tools.testing import compare_outputs, outputs_ok

WORLD = 2
JOIN_SECONDS = 1800  # every flavour, shape and dtype compiles its kernel once

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason="needs two CUDA GPUs")]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("all_reduce_gpu")
    return spawn_ranks(workers.run, WORLD, out, JOIN_SECONDS)


def _check(base, expected_kwargs: dict, actual: dict, where: str) -> None:
    comparisons = compare_outputs(list(actual), {**expected_kwargs, **actual}, expected_kwargs)
    assert outputs_ok(comparisons), f"{where}: {comparisons}"


def _same_bytes(ranks_outputs: list[dict], where: str) -> None:
    for name, tensor in ranks_outputs[0].items():
        for other in ranks_outputs[1:]:
            assert torch.equal(workers.as_bytes(tensor), workers.as_bytes(other[name])), f"{where}: {name} differs"


ALGORITHMS = pytest.mark.parametrize("algorithm", [all_reduce.ONE_SHOT, all_reduce.TWO_SHOT])


@ALGORITHMS
def test_every_flavour_takes_the_fused_path_and_matches_the_reference(ranks: list[dict], algorithm: str) -> None:
    ranks = [result[algorithm] for result in ranks]
    cases = workers.cases(workers.SHAPES, workers.DTYPES)
    assert {base.name for base, _, _ in cases} == {b.name for b in all_reduce.BASES}
    assert any(shape == (1, 4096) for _, shape, _ in cases) and any(shape[1] % 2 for _, shape, _ in cases)
    for index, (base, shape, dtype) in enumerate(cases):
        where = f"{base.name} T={shape[0]} H={shape[1]} {dtype}"
        assert all(result["fused"][index] for result in ranks), f"{where}: took the fallback"
        inputs = [rank_input(shape, dtype, rank) for rank in range(WORLD)]
        for rank, result in enumerate(ranks):
            expected = workers.call_kwargs(base, shape, dtype, rank)
            all_reduce.reference(base, expected, inputs)
            _check(base, expected, result["outputs"][index], f"{where} rank {rank}")
        _same_bytes([result["outputs"][index] for result in ranks], where)


@ALGORITHMS
def test_cuda_graph_replays_new_inputs(ranks: list[dict], algorithm: str) -> None:
    ranks = [result[algorithm] for result in ranks]
    base = next(b for b in all_reduce.BASES if b.name == workers.GRAPH_OP)
    shape, dtype = (7, 4096), torch.bfloat16
    for replay in range(2):
        seed = ranks[0]["graph"][replay]["seed"]
        calls = [workers.refreshed(base, shape, dtype, rank, seed) for rank in range(WORLD)]
        inputs = [call["input"] for call in calls]
        for rank, result in enumerate(ranks):
            expected = calls[rank]
            all_reduce.reference(base, expected, inputs)
            _check(base, expected, result["graph"][replay]["outputs"], f"replay {replay} rank {rank}")
        _same_bytes([result["graph"][replay]["outputs"] for result in ranks], f"replay {replay}")


@ALGORITHMS
def test_producer_writes_into_the_workspace(ranks: list[dict], algorithm: str) -> None:
    ranks = [result[algorithm] for result in ranks]
    base = next(b for b in all_reduce.BASES if b.name == workers.ZERO_COPY_OP)
    shape, dtype = (7, 4096), torch.bfloat16
    inputs = [rank_input(shape, dtype, rank) for rank in range(WORLD)]
    for rank, result in enumerate(ranks):
        assert result["zero_copy"]["fused"], f"rank {rank}: the call with its input in the workspace was not fused"
        expected = workers.call_kwargs(base, shape, dtype, rank)
        all_reduce.reference(base, expected, inputs)
        _check(base, expected, result["zero_copy"]["outputs"], f"zero copy rank {rank}")
    _same_bytes([result["zero_copy"]["outputs"] for result in ranks], "zero copy")
