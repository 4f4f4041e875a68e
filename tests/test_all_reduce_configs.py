"""The fused all_reduce kernel's configs: looked up by ``{W, T, H}`` through the fallback chain of every op, the
default where no file or entry serves, and part of the call variant the ranks agree on.

The lookup runs for GPU calls: the tests make a CPU launch look like one on GPU 0 of an H200
(``all_reduce_workers.on_an_h200``), with config files in a temporary ``HELION_FUSIONS_CONFIG_DIR``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import helion
import pytest
import torch

from all_reduce_workers import H200, call_kwargs, on_an_h200, save_config
from helion_fusions.ops import all_reduce
from helion_fusions.runtime import dispatch
from helion_fusions.runtime.registry import shapes

NAME = all_reduce.PREFIX + "rms_norm_dynamic_per_token_quant"
BASE = next(b for b in all_reduce.BASES if all_reduce.PREFIX + b.name == NAME)


def _config(rows: int, warps: int) -> dict:
    return {"block_sizes": [rows], "num_warps": warps, "pid_type": "persistent_blocked"}


@pytest.fixture
def h200(config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty config root, and GPU 0 an H200."""
    monkeypatch.setattr(dispatch, "device_identity", lambda index=0: H200)
    return config_dir


def _lookup(tokens: int, hidden: int = 4096, world: int = 2) -> tuple[dict, str, list[str]]:
    """The config a GPU call of ``tokens x hidden`` on ``world`` ranks takes, where it comes from, and the warnings."""
    (launch,) = BASE.prepare(**call_kwargs(BASE, (tokens, hidden), torch.bfloat16, 0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config, source = all_reduce.fused_config(NAME, on_an_h200(launch), world)
    return dict(config), source, [str(w.message) for w in caught]


def _default(tokens: int, hidden: int = 4096, world: int = 2) -> dict:
    return dict(all_reduce.default_config({"W": world, "T": tokens, "H": hidden}))


def test_the_entry_of_the_token_bucket_and_the_nearest_hidden_size(h200: Path) -> None:
    path = save_config(h200, NAME, [({"W": 2, "T": t, "H": h}, _config(r, w))
                                    for t, r in ((1, 1), (32, 2), (512, 4)) for h, w in ((4096, 8), (8192, 16))])
    for tokens, hidden, expected in ((1, 4096, _config(1, 8)), (2, 4096, _config(2, 8)), (32, 5000, _config(2, 8)),
                                     (33, 7000, _config(4, 16)), (512, 8192, _config(4, 16))):
        config, source, messages = _lookup(tokens, hidden)
        assert config == expected and messages == [], (tokens, hidden, config, messages)
        assert source.startswith(f"{path} (W=2,T="), source
    # past the largest tuned bucket, short of the grid's end (a partly tuned file): the default, with one warning
    config, source, messages = _lookup(3000)
    assert config == _default(3000) and source == "the architecture default"
    assert len(messages) == 1 and "is partly tuned: a call whose T lies past" in messages[0], messages
    assert _lookup(9999, 8192)[2] == []  # once


def test_past_a_fully_tuned_grid_the_largest_bucket(h200: Path) -> None:
    path = save_config(h200, NAME, [({"W": 2, "T": t, "H": 4096}, _config(r, 8)) for t, r in ((1, 1), (8192, 4))])
    assert _lookup(9999)[:2] == (_config(4, 8), f"{path} (W=2,T=8192,H=4096, bfloat16)")


def test_no_entry_for_this_world_size_means_the_default_with_a_warning(h200: Path) -> None:
    path = save_config(h200, NAME, [({"W": 2, "T": 8, "H": 4096}, _config(2, 16))])
    config, source, messages = _lookup(8, world=4)
    assert config == _default(8, world=4) and source == "the architecture default"
    assert len(messages) == 1 and f"{path} has no entry for W=4" in messages[0], messages
    assert _lookup(8, world=4)[2] == []  # once


@pytest.mark.parametrize("damage", ["stale", "corrupt", "flat", "two programs per SM", "missing"])
def test_an_unusable_file_means_the_default_with_one_warning(h200: Path, damage: str) -> None:
    entry = ({"W": 2, "T": 8, "H": 4096}, _config(2, 16))
    if damage == "stale":
        path = save_config(h200, NAME, [entry], hash_="0" * 16)
    elif damage == "flat":
        path = save_config(h200, NAME, [(entry[0], {**entry[1], "pid_type": "flat"})])
    elif damage == "two programs per SM":
        path = save_config(h200, NAME, [(entry[0], {**entry[1], "num_sm_multiplier": 2})])
    else:
        path = save_config(h200, NAME, [entry])
        if damage == "corrupt":
            path.write_text(path.read_text()[:-20])
        else:
            path.unlink()
    config, source, messages = _lookup(8)
    assert config == _default(8) and source == "the architecture default"
    assert len(messages) == 1 and "using the architecture default config" in messages[0], messages
    expected = {"stale": "stale: tuned for kernel source 0000000000000000", "corrupt": "not readable JSON",
                "flat": "pid_type must be persistent", "two programs per SM": "num_sm_multiplier must be 1",
                "missing": "no usable config for nvidia_h200"}[damage]
    assert expected in messages[0] and (damage == "missing" or str(path) in messages[0]), messages[0]


def test_cpu_calls_take_the_default_without_looking() -> None:
    (launch,) = BASE.prepare(**call_kwargs(BASE, (8, 4096), torch.bfloat16, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config, source = all_reduce.fused_config(NAME, launch, 2)
    assert dict(config) == _default(8) and source == "the architecture default"


def test_the_call_variant_covers_the_config() -> None:
    (launch,) = BASE.prepare(**call_kwargs(BASE, (8, 4096), torch.bfloat16, 0))
    digest = all_reduce.variant(launch, True, all_reduce.default_config({"W": 2, "T": 8, "H": 4096}))
    assert all_reduce.variant(launch, True, all_reduce.default_config({"W": 2, "T": 8, "H": 4096})) == digest
    reordered = all_reduce.helion.Config(pid_type="persistent_blocked", num_warps=8, block_sizes=[1])
    assert all_reduce.variant(launch, True, reordered) == digest
    assert all_reduce.variant(launch, True, all_reduce.helion.Config(**_config(1, 16))) != digest
    assert all_reduce.variant(launch, False, reordered) != digest


def test_candidates_are_persistent_unique_and_start_with_the_default() -> None:
    for shape in shapes(all_reduce.PROBLEM):
        candidates = all_reduce.candidate_configs(shape)
        assert candidates[0] == all_reduce.default_config(shape), shape
        assert len({json.dumps(dict(c), sort_keys=True) for c in candidates}) == len(candidates), shape
        assert all(all_reduce.config_problem(dict(c)) is None for c in candidates), shape
        assert all(c["block_sizes"][0] <= max(shape["T"], 1) for c in candidates[1:]), shape
        assert len(candidates) >= (4 if shape["T"] == 1 else 8), (shape, len(candidates))


def _two_shot(rows: int, warps: int) -> dict:
    return {**_config(rows, warps), all_reduce.ALGORITHM: all_reduce.TWO_SHOT}


def test_the_algorithm_is_part_of_the_entry(h200: Path) -> None:
    save_config(h200, NAME, [({"W": 2, "T": 8, "H": 4096}, _config(2, 8)),
                             ({"W": 2, "T": 2048, "H": 4096}, _two_shot(4, 16))])
    config, _, messages = _lookup(8)
    assert all_reduce.algorithm(all_reduce.helion.Config(**config)) == all_reduce.ONE_SHOT and messages == []
    config, _, _ = _lookup(1500)
    assert config == _two_shot(4, 16)
    assert all_reduce.algorithm(all_reduce.helion.Config(**config)) == all_reduce.TWO_SHOT
    assert all_reduce.ALGORITHM not in dict(all_reduce.helion_config(all_reduce.helion.Config(**config)))


def test_an_unknown_algorithm_means_the_default_with_a_warning(h200: Path) -> None:
    save_config(h200, NAME, [({"W": 2, "T": 8, "H": 4096}, {**_config(2, 16), all_reduce.ALGORITHM: "ring"})])
    config, source, messages = _lookup(8)
    assert config == _default(8) and source == "the architecture default"
    assert len(messages) == 1 and "algorithm must be 'one_shot' or 'two_shot', got 'ring'" in messages[0], messages


def test_the_default_is_one_shot() -> None:
    for shape in shapes(all_reduce.PROBLEM):
        assert all_reduce.algorithm(all_reduce.default_config(shape)) == all_reduce.ONE_SHOT, shape


def test_the_call_variant_covers_the_algorithm() -> None:
    (launch,) = BASE.prepare(**call_kwargs(BASE, (8, 4096), torch.bfloat16, 0))
    one = all_reduce.variant(launch, True, all_reduce.helion.Config(**_config(2, 8)))
    two = all_reduce.variant(launch, True, all_reduce.helion.Config(**_two_shot(2, 8)))
    assert one != two
    explicit = all_reduce.helion.Config(**{**_config(2, 8), all_reduce.ALGORITHM: all_reduce.ONE_SHOT})
    assert all_reduce.algorithm(explicit) == all_reduce.ONE_SHOT


def test_two_shot_candidates_only_where_every_rank_owns_a_row() -> None:
    for world in (2, 4):
        for tokens in (1, 2, 3, 4, 8, 512, 2048):
            shape = {"W": world, "T": tokens, "H": 4096}
            two = [c for c in all_reduce.candidate_configs(shape) if all_reduce.algorithm(c) == all_reduce.TWO_SHOT]
            assert bool(two) == (tokens >= world), shape
            assert all(c["block_sizes"][0] <= -(-tokens // world) for c in two), shape
            assert all(all_reduce.config_problem(dict(c)) is None for c in two), shape
    assert len([c for c in all_reduce.candidate_configs({"W": 2, "T": 2048, "H": 4096})
                if all_reduce.algorithm(c) == all_reduce.TWO_SHOT]) >= 8


def test_fewer_tokens_than_ranks_run_one_shot(monkeypatch: pytest.MonkeyPatch) -> None:
    """A two-shot config that a call with fewer tokens than ranks finds (tuned for more tokens) runs one-shot, with
    its rows and warps: a rank would own no row, and a tile of several rows over one token does not compile."""
    two_shot = {"block_sizes": [8], "num_warps": 8, "pid_type": "persistent_blocked",
                all_reduce.ALGORITHM: all_reduce.TWO_SHOT}
    monkeypatch.setattr(all_reduce, "default_config", lambda shape: helion.Config(**two_shot))
    for tokens, world, expected in ((1, 2, all_reduce.ONE_SHOT), (3, 4, all_reduce.ONE_SHOT),
                                    (2, 2, all_reduce.TWO_SHOT)):
        (launch,) = BASE.prepare(**call_kwargs(BASE, (tokens, 4096), torch.bfloat16, 0))
        config, source = all_reduce.fused_config(NAME, launch, world)
        assert all_reduce.algorithm(config) == expected and config["block_sizes"] == [8], (tokens, world)
        assert source.endswith("one-shot for fewer tokens than ranks") == (expected == all_reduce.ONE_SHOT)


def test_a_forced_algorithm_keeps_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(all_reduce, "_forced_algorithm", all_reduce.TWO_SHOT)
    (launch,) = BASE.prepare(**call_kwargs(BASE, (8, 4096), torch.bfloat16, 0))
    config, source = all_reduce.fused_config(NAME, launch, 2)
    assert dict(config) == {**_default(8), all_reduce.ALGORITHM: all_reduce.TWO_SHOT}
    assert source == "the architecture default, algorithm forced to two_shot"
