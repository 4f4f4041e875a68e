"""all_reduce + rms_norm ops: the contract's reference, and two gloo ranks spawned on the CPU.

The ranks (tests/all_reduce_workers.py) make every op's call with their own partial inputs, a few bad
calls (each must raise on both ranks, never hang), and a torch.compile(fullgraph=True) + opcheck run.
"""

from __future__ import annotations

import re

import pytest
import torch

import all_reduce_workers as workers
from all_reduce_workers import spawn_ranks
from helion_fusions.ops import all_reduce
from helion_fusions.tools.testing import compare_outputs, outputs_ok

WORLD = 2
JOIN_SECONDS = 300


def test_sum_is_fp32_in_rank_order_rounded_once() -> None:
    """fp32 addition is not associative: the reference adds rank 0, 1, 2 in that order, then rounds once."""
    parts = [torch.tensor([2.0 ** 24], dtype=torch.float32), torch.tensor([1.0]), torch.tensor([1.0])]
    assert all_reduce.ordered_sum(parts).item() == 2.0 ** 24  # (2^24 + 1) + 1 in fp32, each step a tie to even
    assert all_reduce.ordered_sum(parts[::-1]).item() == 2.0 ** 24 + 2
    bf16 = [torch.tensor([1.0], dtype=torch.bfloat16), torch.tensor([2.0 ** -8], dtype=torch.bfloat16),
            torch.tensor([2.0 ** -8], dtype=torch.bfloat16)]
    # in fp32 the two half steps add up to one bf16 step; rounding after each addition (a tie to even) loses both
    assert all_reduce.ordered_sum(bf16).item() == 1.0 + 2.0 ** -7
    hand = sum(p.float() for p in bf16).to(torch.bfloat16)
    assert torch.equal(all_reduce.ordered_sum(bf16), hand)


def test_schemas_take_the_group_after_the_required_arguments() -> None:
    assert all_reduce.with_group("(Tensor! result, Tensor input, float epsilon) -> ()") == (
        "(Tensor! result, Tensor input, float epsilon, str group_name) -> ()")
    assert all_reduce.with_group("(Tensor! result, Tensor input, bool swizzled=True) -> ()") == (
        "(Tensor! result, Tensor input, str group_name, bool swizzled=True) -> ()")
    assert len(all_reduce.OPS) == len(all_reduce.BASES) == 8


def test_group_name_errors_without_distributed() -> None:
    op = all_reduce.OPS["all_reduce_rms_norm"]
    with pytest.raises(TypeError, match="group_name: expected the name of a process group"):
        all_reduce.process_group("all_reduce_rms_norm", 0)
    with pytest.raises(ValueError, match="group_name 'world': torch.distributed is not initialized"):
        op(torch.empty(1, 8), torch.randn(1, 8), None, 1e-6, "world")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Run both ranks once (every scenario) and return what each saw."""
    out = tmp_path_factory.mktemp("all_reduce")
    return spawn_ranks(workers.run, WORLD, out, JOIN_SECONDS)


def test_bad_calls_raise_on_every_rank(ranks: list[dict]) -> None:
    for rank, result in enumerate(ranks):
        errors = result["errors"]
        assert "ValueError" in errors["shapes differ"] and "rank 0: input [7, 256] torch.bfloat16" in errors[
            "shapes differ"] and "rank 1: input [8, 256] torch.bfloat16" in errors["shapes differ"], errors
        # only rank 1's weight is wrong: both ranks raise, with rank 1's own message
        assert "rank 1: ValueError" in errors["one rank's bad weight"] and "weight" in errors[
            "one rank's bad weight"], errors
        assert errors["unknown group"].startswith("ValueError") and "'no-such-group'" in errors["unknown group"]
        assert errors["group name not a str"].startswith("TypeError") and "group_name" in errors[
            "group name not a str"]


def test_every_op_matches_the_reference_with_identical_bytes_on_every_rank(ranks: list[dict]) -> None:
    cases = workers.cases()
    assert len(cases) >= 60 and {base.name for base, _, _ in cases} == {b.name for b in all_reduce.BASES}
    assert all(len(result["outputs"]) == len(cases) for result in ranks)
    for index, (base, shape, dtype) in enumerate(cases):
        where = f"{base.name} T={shape[0]} H={shape[1]} {dtype}"
        inputs = [workers.rank_input(shape, dtype, rank) for rank in range(WORLD)]
        for rank, result in enumerate(ranks):
            expected = workers.call_kwargs(base, shape, dtype, rank)
            all_reduce.reference(base, expected, inputs)
            actual = result["outputs"][index]
            comparisons = compare_outputs(list(actual), {**expected, **actual}, expected)
            assert outputs_ok(comparisons, max_flip_fraction=0), f"{where} rank {rank}: {comparisons}"
        for name, tensor in ranks[0]["outputs"][index].items():
            assert torch.equal(workers.as_bytes(tensor), workers.as_bytes(ranks[1]["outputs"][index][name])), (
                f"{where}: {name} differs between the ranks")


def test_fullgraph_compile_and_opcheck(ranks: list[dict]) -> None:
    assert all(result["compiled"]["equal"] for result in ranks)


def test_the_ranks_choose_one_path(ranks: list[dict]) -> None:
    seen = [result["decisions"] for result in ranks]
    for rank, decisions in enumerate(seen):
        assert decisions["one offers"] is False, rank
        assert decisions["one offers: set up"] == 0, rank  # nobody sets up a path not every rank can take
        assert decisions["both offer"] is True and decisions["both offer again"] is True, rank
        assert decisions["both offer: set up"] == 1, rank  # set up once, at the first agreed call
        assert "call variant 0x5" in decisions["variants differ"] and "call variant 0x6" in decisions[
            "variants differ"], decisions["variants differ"]
        assert decisions["one step fails"] == ["rank 1: broken"] and decisions["every step succeeds"] == []
        assert decisions["unavailable"] == "tensors on cpu"
        assert decisions["cpu workspace"] is None and decisions["cpu workspace failure"], decisions
        assert decisions["public workspace"].startswith("workspace: no symmetric memory here (tensors on cpu)")
        assert "do not make the same valid call" in decisions["scale_ub on one rank"] and "call variant" in decisions[
            "scale_ub on one rank"], decisions["scale_ub on one rank"]
        assert any("no fused kernel for this call (tensors on cpu)" in w for w in decisions["warnings"]), decisions
    # every rank ends in the same state, with the same reasons
    assert seen[0]["cpu workspace failure"] == seen[1]["cpu workspace failure"]
    assert seen[0]["variants differ"] == seen[1]["variants differ"]


def test_ranks_whose_config_files_differ_raise_the_same_error(ranks: list[dict]) -> None:
    """Each rank reads its own config file, as on an H200: different configs are a different call variant."""
    differ = [result["decisions"]["configs differ"] for result in ranks]
    assert differ[0] == differ[1], differ
    assert "do not make the same valid call" in differ[0], differ[0]
    for rank, warps in enumerate((4, 8)):
        assert re.search(rf'rank {rank}: input \[6, 256\] torch.bfloat16, call variant 0x[0-9a-f]+ \(.*kernel config\): '
                         rf'config .*"num_warps": {warps}.* from \S*configs-rank{rank}-\S*/nvidia_h200/'
                         r'all_reduce_rms_norm.json \(W=2,T=8,H=256, bfloat16\)', differ[0]), differ[0]
    assert all(result["decisions"]["configs agree"] == "no error" for result in ranks)
