"""The ranks of the 2-process all_reduce tests (tests/test_all_reduce.py): importable by spawned processes.

Each rank runs every scenario in order on one gloo group and saves what it saw (outputs, or the error
it raised) to ``<out>/rank<r>.pt``; the test compares the ranks with each other and with the reference.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import os
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from helion_fusions.ops import all_reduce
from helion_fusions.runtime import config_store, dispatch
from helion_fusions.runtime.device import DeviceIdentity
from helion_fusions.runtime.registry import OpSpec

SHAPES = ((0, 256), (1, 256), (7, 256), (7, 17))
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
TIMEOUT = datetime.timedelta(seconds=90)  # a hang fails the test instead of stalling CI
H200 = DeviceIdentity("nvidia_h200", "nvidia_sm90", torch.float8_e4m3fn)


def rank_input(shape: tuple[int, int], dtype: torch.dtype, rank: int) -> torch.Tensor:
    """Rank ``rank``'s partial input: random, different on every rank."""
    generator = torch.Generator().manual_seed(1000 * rank + 7 * shape[0] + shape[1])
    return (torch.randn(shape, generator=generator) * (1 + rank)).to(dtype)


def cases(shapes: tuple[tuple[int, int], ...] = SHAPES,
          dtypes: tuple[torch.dtype, ...] = DTYPES) -> list[tuple[OpSpec, tuple[int, int], torch.dtype]]:
    """Every op with the shapes and dtypes its rms_norm op accepts (a shape it rejects is left out)."""
    found = []
    for base in all_reduce.BASES:
        for shape in shapes:
            for dtype in dtypes:
                try:
                    base.prepare(**base.make_inputs({"T": shape[0], "H": shape[1]}, dtype, torch.device("cpu")))
                except ValueError:
                    continue
                found.append((base, shape, dtype))
    return found


def spawn_ranks(run: Callable[[int, int, str, str], None], world: int, out: Path, join_seconds: float) -> list[dict]:
    """Run ``run(rank, world, init_file, out)`` in a process per rank; return what each rank saved.

    A rank still running after ``join_seconds`` fails the test as a hang; a rank's crash fails it with
    that rank's traceback."""
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=run, args=(rank, world, str(out / "init"), str(out))) for rank in range(world)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(join_seconds)
    hung = [rank for rank, p in enumerate(processes) if p.is_alive()]
    for process in processes:
        process.kill()
    assert not hung, f"ranks {hung} did not finish within {join_seconds} s (a hang)"
    results = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world)]
    for rank, result in enumerate(results):
        assert "crashed" not in result, f"rank {rank}:\n{result['crashed']}"
    return results


def call_kwargs(base: OpSpec, shape: tuple[int, int], dtype: torch.dtype, rank: int) -> dict[str, Any]:
    """The rms_norm op's arguments for this case (outputs poisoned), with rank ``rank``'s partial input."""
    kwargs = base.make_inputs({"T": shape[0], "H": shape[1]}, dtype, torch.device("cpu"))
    kwargs["input"] = rank_input(shape, dtype, rank)
    return kwargs


def save_config(root: Path, name: str, entries: list[tuple[dict[str, int], dict[str, Any]]],
                hash_: str | None = None) -> Path:
    """``name``'s config file for an H200 under ``root``: a bf16 entry per (shape, config); the current kernel's
    hash unless ``hash_``."""
    tuned = all_reduce.TUNED[name]
    path = root / H200.name / f"{name}.json"
    config_store.save(path, name, H200.name, H200.family, hash_ or dispatch.spec_hash(tuned), tuned.dim_names,
                      [config_store.Entry("bfloat16", shape, config, 1.0) for shape, config in entries])
    return path


def on_an_h200(launch: Any) -> Any:
    """``launch`` as if made on GPU 0, so that the fused config lookup reads config files (where
    ``dispatch.device_identity`` says H200)."""
    return launch._replace(device=torch.device("cuda", 0))


def _errors(rank: int, world: str) -> dict[str, str]:
    """Bad calls: each must raise on every rank (never hang), and the group must work afterwards."""
    seen = {}
    base = all_reduce.BASES[0]
    op = all_reduce.OPS[all_reduce.PREFIX + base.name]
    attempts = {
        "shapes differ": lambda: op(**call_kwargs(base, (7 + rank, 256), torch.bfloat16, rank), group_name=world),
        "one rank's bad weight": lambda: op(**{**call_kwargs(base, (7, 256), torch.bfloat16, rank),
                                               "weight": torch.ones(256 + rank, dtype=torch.bfloat16)},
                                            group_name=world),
        "unknown group": lambda: op(**call_kwargs(base, (7, 256), torch.bfloat16, rank), group_name="no-such-group"),
        "group name not a str": lambda: op(**call_kwargs(base, (7, 256), torch.bfloat16, rank), group_name=""),
    }
    for what, attempt in attempts.items():
        try:
            attempt()
            seen[what] = "no error"
        except (ValueError, TypeError) as error:
            seen[what] = f"{type(error).__name__}: {error}"
    return seen


def _compiled(rank: int, world: str) -> dict[str, Any]:
    """The op through torch.compile(fullgraph=True) and opcheck, against the same call made eagerly."""
    base = next(b for b in all_reduce.BASES if b.name == "fused_add_rms_norm_static_fp8_quant")
    op = all_reduce.OPS[all_reduce.PREFIX + base.name]
    eager, compiled = (call_kwargs(base, (7, 256), torch.bfloat16, rank) for _ in range(2))
    op(**eager, group_name=world)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(kwargs: dict[str, Any]) -> None:
        op(**kwargs, group_name=world)

    step(compiled)
    # opcheck on a bf16-only op: its schema check compares outputs with allclose, which has no CPU fp8 kernel
    in_place = next(b for b in all_reduce.BASES if b.name == "fused_add_rms_norm")
    torch.library.opcheck(all_reduce.OPS[all_reduce.PREFIX + in_place.name], (),
                          {**call_kwargs(in_place, (7, 256), torch.bfloat16, rank), "group_name": world})
    return {"equal": all(torch.equal(as_bytes(eager[n]), as_bytes(compiled[n])) for n in base.mutated_args)}


def _decisions(rank: int, world: str) -> dict[str, Any]:
    """The host-side choice of path: what each rank saw (the test compares the ranks)."""
    import warnings

    from helion_fusions.runtime import symmetric

    group = dist.group.WORLD
    seen: dict[str, Any] = {}
    x = torch.zeros(3, 8)
    calls = []

    def offer() -> bool:
        calls.append(1)
        return True
    # one rank cannot: neither sets up the fused path
    seen["one offers"] = all_reduce.agree("decide-a", group, world, x, None, 5, offer if rank == 0 else None)
    seen["one offers: set up"] = len(calls)
    # both can: each sets up once; the agreement is kept, and a repeat call neither exchanges nor sets up again
    seen["both offer"] = all_reduce.agree("decide-b", group, world, x, None, 5, offer)
    seen["both offer again"] = all_reduce.agree("decide-b", group, world, x, None, 5, offer)
    seen["both offer: set up"] = len(calls)
    seen["variants differ"] = ""
    try:
        all_reduce.agree("decide-c", group, world, x, None, 5 + rank, offer)
    except ValueError as error:
        seen["variants differ"] = str(error)
    seen["one step fails"] = symmetric.all_ranks_ok(group, torch.device("cpu"), None if rank == 0 else "broken")
    seen["every step succeeds"] = symmetric.all_ranks_ok(group, torch.device("cpu"), None)
    # gloo and CPU tensors: a workspace cannot be set up, and every rank learns why
    seen["unavailable"] = symmetric.unavailable_reason(group, torch.device("cpu"))
    seen["cpu workspace"] = symmetric.workspace(group, world, 7, 256, torch.bfloat16, torch.device("cpu"), 4)
    seen["cpu workspace failure"] = symmetric.failure(world, 7, 256, torch.bfloat16, torch.device("cpu"))
    try:
        all_reduce.workspace(world, 7, 256, torch.bfloat16)
        seen["public workspace"] = "no error"
    except RuntimeError as error:
        seen["public workspace"] = str(error)
    # optional arguments differ: the kernel variants would, so every rank raises (a shape no rank called
    # before: a rank whose call was agreed before does not exchange again)
    base = next(b for b in all_reduce.BASES if b.name == "rms_norm_dynamic_per_token_quant")
    kwargs = call_kwargs(base, (5, 256), torch.bfloat16, rank)
    kwargs["scale_ub"] = torch.tensor([10.0]) if rank == 1 else None
    try:
        all_reduce.OPS[all_reduce.PREFIX + base.name](**kwargs, group_name=world)
        seen["scale_ub on one rank"] = "no error"
    except ValueError as error:
        seen["scale_ub on one rank"] = str(error)
    # the fallback's one warning names why
    all_reduce._warned.discard(all_reduce.PREFIX + "rms_norm")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = all_reduce.BASES[0]
        all_reduce.OPS[all_reduce.PREFIX + plain.name](**call_kwargs(plain, (7, 256), torch.bfloat16, rank),
                                                       group_name=world)
    seen["warnings"] = [str(w.message) for w in caught]
    seen["configs differ"] = _with_config_file(rank, world, num_warps=4 + 4 * rank)
    seen["configs agree"] = _with_config_file(rank, world, num_warps=8)
    return seen


def _with_config_file(rank: int, world: str, num_warps: int) -> str:
    """A call whose fused config comes from this rank's own config file, as on an H200; returns the error it
    raised on this rank, or "no error"."""
    name = all_reduce.PREFIX + "rms_norm"
    lookup, identity = all_reduce.fused_config, dispatch.device_identity
    with tempfile.TemporaryDirectory(prefix=f"configs-rank{rank}-") as root:
        config = {"block_sizes": [1], "num_warps": num_warps, "pid_type": "persistent_blocked"}
        save_config(Path(root), name, [({"W": 2, "T": 8, "H": 256}, config)])
        os.environ[config_store.CONFIG_DIR_ENV] = root
        dispatch.device_identity = lambda index=0: H200
        all_reduce.fused_config = lambda op, launch, ranks: lookup(op, on_an_h200(launch), ranks)
        dispatch.reset()
        try:
            base = all_reduce.BASES[0]
            all_reduce.OPS[name](**call_kwargs(base, (6, 256), torch.bfloat16, rank), group_name=world)
            return "no error"
        except ValueError as error:
            return str(error)
        finally:
            del os.environ[config_store.CONFIG_DIR_ENV]
            all_reduce.fused_config, dispatch.device_identity = lookup, identity
            dispatch.reset()


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


@contextlib.contextmanager
def saved_result(rank: int, out: str) -> Iterator[dict[str, Any]]:
    """This rank's result, saved to ``<out>/rank<r>.pt`` at the end (with the traceback if the rank crashed,
    which the test reports); then the process group is destroyed."""
    result: dict[str, Any] = {}
    try:
        yield result
    except BaseException:
        result["crashed"] = traceback.format_exc()
        raise
    finally:
        torch.save(result, f"{out}/rank{rank}.pt")
        dist.destroy_process_group()


def run(rank: int, world_size: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=TIMEOUT)
    with saved_result(rank, out) as result:
        world = dist.group.WORLD.group_name
        result["errors"] = _errors(rank, world)
        outputs = []
        for base, shape, dtype in cases():
            kwargs = call_kwargs(base, shape, dtype, rank)
            all_reduce.OPS[all_reduce.PREFIX + base.name](**kwargs, group_name=world)
            outputs.append({name: kwargs[name] for name in base.mutated_args if kwargs.get(name) is not None})
        result["outputs"] = outputs
        result["compiled"] = _compiled(rank, world)
        result["decisions"] = _decisions(rank, world)
