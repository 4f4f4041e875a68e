"""The fused all_reduce kernel generates Triton code on a CPU, for every call the rms_norm checks accept.

A fake process group (``torch.distributed`` backend "fake") gives ``symm_mem.get_remote_tensors`` a group size
to trace with; the workspace and signal pads are CPU stand-ins, which only their shapes and dtypes matter for.
For every accepted call on 2 ranks, one-shot and two-shot, Triton's front end also runs on the generated code
(the host function's peer tensors stood in by the rank's own), as a GPU's compile would. Nothing runs: the GPU
tests (tests/test_all_reduce_gpu.py) run the kernel.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import helion
import pytest
import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

import all_reduce_workers as workers
from helion_fusions.kernels.all_reduce import all_reduce_rms_norm_kernel
from helion_fusions.ops import all_reduce
from helion_fusions.runtime import config_store
from helion_fusions.runtime import symmetric
from helion_fusions.runtime.registry import REGISTRY, shapes
from helion_fusions.tools.testing import code_generator, triton_code

CPU = torch.device("cpu")
CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(p for p in CONFIG_ROOT.glob("*/*.json") if p.stem in all_reduce.TUNED)
# the op whose kernel variant generates the most code (residual, nvfp4, swizzled scales)
LARGEST = next(b for b in all_reduce.BASES if b.name == "fused_add_rms_norm_nvfp4_quant")


@contextlib.contextmanager
def _fake_group(world: int) -> Iterator[int]:
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield world
    finally:
        dist.destroy_process_group()


@pytest.fixture(params=[2, 4], ids=lambda w: f"W={w}")
def world(request: pytest.FixtureRequest) -> Iterator[int]:
    with _fake_group(request.param) as size:
        yield size


def _code(base, shape: tuple[int, int], dtype: torch.dtype, world: int, copy_in: bool = True,
          config: helion.Config | None = None, front_end: bool = False) -> str:
    kwargs = workers.call_kwargs(base, shape, dtype, 0)
    (launch,) = base.prepare(**kwargs)
    tokens, hidden = shape
    config = config or all_reduce.default_config({"W": world, "T": tokens, "H": hidden})
    space = symmetric.Workspace(torch.empty(symmetric.capacity_for(tokens) * hidden, dtype=dtype),
                                torch.zeros(world, dtype=torch.int64), 0, world, symmetric.capacity_for(tokens), hidden)
    two_shot = all_reduce.algorithm(config) == all_reduce.TWO_SHOT
    staged = tuple(torch.empty(s, dtype=d) for s, d in all_reduce.stage_shapes(launch, world, two_shot))
    args = all_reduce._kernel_args(launch, space, dist.group.WORLD.group_name, copy_in, staged, two_shot)
    bound = code_generator(all_reduce_rms_norm_kernel).bind(args)
    if not front_end:
        return bound.to_triton_code(all_reduce.helion_config(config))
    with mock.patch.object(torch.ops.symm_mem, "get_remote_tensors", lambda tensor, group: [tensor] * world):
        return triton_code(bound, args, all_reduce.helion_config(config))


def _device_code(code: str) -> str:
    """The body of the generated Triton kernel (not the inlined helpers or the host function)."""
    start = code.index("def _helion_all_reduce_rms_norm_kernel(")
    return code[start:code.index("\ndef all_reduce_rms_norm_kernel(", start)]


def test_every_accepted_call_generates_code(world: int) -> None:
    cases = [c for c in workers.cases() if c[1][0] > 0]  # an empty input takes the fallback
    if world > 2:  # the group size changes only the reads: one dtype is enough there
        cases = [c for c in cases if c[2] == torch.bfloat16]
    assert {base.name for base, _, _ in cases} == {b.name for b in all_reduce.BASES}
    for base, shape, dtype in cases:
        code = _code(base, shape, dtype, world, front_end=world == 2)
        body = _device_code(code)
        where = f"{base.name} {shape} {dtype} W={world}"
        # every rank's workspace is read, rank 0 first, and nothing is multicast
        reads = re.findall(r"tl\.load\(peers_item_(\d+) ", body)
        assert reads == [str(r) for r in range(world)], (where, reads)
        assert "multimem" not in code and "multicast" not in code, where
        # persistent: one program per SM, looping over its tiles
        assert "_NUM_SM" in body and "for virtual_pid in tl.range(" in body, where
        # the entry barrier (release + acquire) follows the copy in; the exit barrier precedes every store to out
        syncs = [m.start() for m in re.finditer(r"_symm_mem_sync_cuda\(signal_pads, None, 0, %d, " % world, body)]
        assert len(syncs) == 2, (where, syncs)
        assert "True, True)" in body[syncs[0]:syncs[0] + 80] and "True, False)" in body[syncs[1]:syncs[1] + 80]
        assert body.index("tl.store(workspace") < syncs[0] < body.index("tl.load(peers_item_0")
        out_stores = [m.start() for m in re.finditer(r"tl\.store\(out ", body)]
        assert out_stores and min(out_stores) > syncs[1], where


def test_zero_copy_call_generates_code_without_the_copy(world: int) -> None:
    base = next(b for b in all_reduce.BASES if b.name == "fused_add_rms_norm")
    body = _device_code(_code(base, (7, 256), torch.bfloat16, world, copy_in=False))
    assert "tl.store(workspace" not in body and body.count("_symm_mem_sync_cuda(") == 2


@pytest.mark.parametrize("tokens", [1, 1500, 3000])
def test_config_row_blocks_generate_code(world: int, tokens: int) -> None:
    """Each rows-per-tile choice of default_config (1, 2, 4) at H = 4096, and T = 1."""
    base = next(b for b in all_reduce.BASES if b.name == "rms_norm_dynamic_per_token_quant")
    body = _device_code(_code(base, (tokens, 4096), torch.bfloat16, world))
    assert body.count("_symm_mem_sync_cuda(") == 2


def _binding_tokens(tokens: int) -> int:
    """A token count that binds like ``tokens``: 1 stays 1 (Helion specializes size 1), others 7."""
    return 1 if tokens == 1 else 7


def test_every_candidate_of_the_tuner_generates_code() -> None:
    """Every config ``make autotune-tp`` tries on the grid, for the op with the most code (through Triton's front
    end too); each rows per tile it tries, for every op."""
    with _fake_group(2):
        tried: dict[tuple[object, ...], helion.Config] = {}
        for shape in shapes(all_reduce.PROBLEM):
            for config in all_reduce.candidate_configs(shape):
                key = (_binding_tokens(shape["T"]), shape["H"], json.dumps(dict(config), sort_keys=True))
                tried.setdefault(key, config)
        assert len(tried) >= 20
        for (tokens, hidden, _), config in tried.items():
            body = _device_code(_code(LARGEST, (tokens, hidden), torch.bfloat16, 2, config=config, front_end=True))
            assert body.count("_symm_mem_sync_cuda(") == 2, (tokens, hidden, dict(config))
        rows = {c["block_sizes"][0]: c for (t, h, _), c in tried.items() if (t, h) == (7, 4096)}
        assert sorted(rows) == list(all_reduce.ROWS_PER_TILE)
        for base in all_reduce.BASES:
            for config in rows.values():
                assert _code(base, (7, 4096), torch.bfloat16, 2, config=config), (base.name, dict(config))


def _entry_params() -> list[object]:
    params = [pytest.param(path, index, id=f"{path.parent.name}/{path.stem}[{index}]") for path in SHIPPED
              for index in range(len(json.loads(path.read_text()).get("entries", [])))]
    return params or [pytest.param(None, 0, marks=pytest.mark.skip(reason="no all_reduce_ config files ship yet"),
                                   id="none")]


@pytest.mark.parametrize(("path", "index"), _entry_params())
def test_shipped_config_entry_generates_code(path: Path, index: int) -> None:
    tuned = all_reduce.TUNED[path.stem]
    entry = config_store.load(path, tuned.name, tuned.dim_names, None, tuned.config_problem,
                              tuned.extra_config_keys).entries[index]
    base = REGISTRY[tuned.name.removeprefix(all_reduce.PREFIX)]
    with _fake_group(entry.shape["W"]):
        shape = (_binding_tokens(entry.shape["T"]), entry.shape["H"])
        body = _device_code(_code(base, shape, getattr(torch, entry.dtype), entry.shape["W"],
                                  config=helion.Config(**entry.config)))
    assert body.count("_symm_mem_sync_cuda(") == 2


def _two_shot(rows: int = 2) -> helion.Config:
    return helion.Config(block_sizes=[rows], num_warps=4, pid_type="persistent_blocked",
                         **{all_reduce.ALGORITHM: all_reduce.TWO_SHOT})


def test_every_accepted_call_generates_two_shot_code(world: int) -> None:
    """Each rank reduces every W-th row (all peers' workspaces, rank 0 first), stages its results, and after the
    second barrier gathers every rank's stage (its own too) into its outputs; nothing else is stored to them."""
    cases = [c for c in workers.cases() if c[1][0] > 0 and (world == 2 or c[2] == torch.bfloat16)]
    assert {base.name for base, _, _ in cases} == {b.name for b in all_reduce.BASES}
    for base, shape, dtype in cases:
        # below W tokens only the GPU tests force two-shot, with one row per tile (the default config's)
        code = _code(base, shape, dtype, world, config=_two_shot(1 if shape[0] < world else 2), front_end=world == 2)
        body = _device_code(code)
        where = f"{base.name} {shape} {dtype} W={world}"
        assert "multimem" not in code and "multicast" not in code, where
        assert "virtual_rows" in body and "for virtual_pid in tl.range(" in body, where
        syncs = [m.start() for m in re.finditer(r"_symm_mem_sync_cuda\(signal_pads, None, 0, %d, True, True\)" % world,
                                                body)]
        assert len(syncs) == 2 and body.count("_symm_mem_sync_cuda(") == 2, (where, syncs)
        reads = re.findall(r"tl\.load\(peers_item_(\d+) ", body)
        assert reads == [str(r) for r in range(world)], (where, reads)
        assert syncs[0] < body.index("tl.load(peers_item_0") < syncs[1], where
        assert max(m.start() for m in re.finditer(r"tl\.store\(workspace ", body)) < syncs[0], where
        gathers = re.findall(r"tl\.load\(out_peers_item_(\d+) ", body)
        assert gathers == [str(r) for r in range(world)], (where, gathers)
        assert body.index("tl.load(out_peers_item_0") > syncs[1], where
        for output in ("out", "scale_out", "residual"):
            stores = [m.start() for m in re.finditer(r"tl\.store\(%s " % output, body)]
            assert all(s > syncs[1] for s in stores), (where, output)
        if workers.call_kwargs(base, shape, dtype, 0).get("residual") is not None:
            assert len(re.findall(r"tl\.load\(residual_peers_item_\d+ ", body)) == world, where
        if base.name.endswith(("dynamic_per_token_quant", "per_block_quant", "nvfp4_quant")):
            assert len(re.findall(r"tl\.load\(scale_peers_item_\d+ ", body)) == world, where


@pytest.mark.parametrize("tokens", [1, 3, 3000])
def test_two_shot_row_blocks_generate_code(world: int, tokens: int) -> None:
    base = next(b for b in all_reduce.BASES if b.name == "rms_norm_per_block_quant")
    for rows in all_reduce.ROWS_PER_TILE:
        body = _device_code(_code(base, (tokens, 4096), torch.bfloat16, world, config=_two_shot(rows)))
        assert body.count("_symm_mem_sync_cuda(") == 2, rows


def test_two_shot_stages_hold_a_share_of_the_rows() -> None:
    """The stage buffers have cdiv(T, W) rows; a one-shot call's are one-element stand-ins."""
    base = next(b for b in all_reduce.BASES if b.name == "fused_add_rms_norm_nvfp4_quant")
    (launch,) = base.prepare(**workers.call_kwargs(base, (7, 256), torch.bfloat16, 0))
    assert all_reduce.stage_shapes(launch, 2, True) == (((4, 16, 2), torch.int32), ((64,), torch.uint8),
                                                        ((4, 16, 16), torch.bfloat16))
    assert all_reduce.stage_shapes(launch, 4, False) == (((1,), torch.float32),) * 3
