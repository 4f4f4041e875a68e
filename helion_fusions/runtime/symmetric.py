"""Symmetric-memory workspaces for collective kernels, set up so that every rank of a group ends in the same state.

A workspace is one symmetric allocation per (group, dtype, token capacity, hidden size), made with
``torch.distributed._symmetric_memory.empty`` and ``rendezvous`` on the group, and kept for the life of the
process (a kernel in flight may read it; CUDA graphs keep its addresses). Setting one up is collective: every
rank of the group must make the same calls in the same order. Each step that can fail on one rank alone
(the allocation, the rendezvous's import of the peers' memory, the signal-pad check) is followed by an
exchange of every rank's outcome, so either every rank has the workspace or every rank gets None and the
same reasons; no rank is left waiting in a collective the others skipped.

Nothing here uses NVLink multicast: kernels read peers' buffers through their mappings and synchronize on
the allocation's signal pads.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

MIN_CAPACITY = 16  # tokens: the smallest workspace, so small decode batches share one
MAX_BYTES = 1 << 28  # per rank and workspace; a larger call is not served by symmetric memory
PAD_SLOT_BYTES = 4  # one uint32 signal slot per (program, rank)
DISABLE_ENV = "HELION_FUSIONS_SYMMETRIC_MEMORY"  # "0": never use symmetric memory (every collective falls back)
# what the processes of a multi-GPU run set before their first collective: NVLink multicast stays off
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(frozen=True)
class Workspace:
    """A rendezvoused symmetric buffer of ``capacity * hidden`` elements and its group's view of it."""

    buffer: torch.Tensor  # flat, at the start of its symmetric allocation
    signal_pads: torch.Tensor  # int64 [W]: each rank's signal pad, as mapped in this process
    rank: int
    world_size: int
    capacity: int
    hidden: int

    def rows(self, tokens: int) -> torch.Tensor:
        """The first ``tokens`` rows, ``[tokens, hidden]``: a view that starts where the allocation does."""
        return self.buffer[: tokens * self.hidden].view(tokens, self.hidden)

    def view(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The start of the buffer as a contiguous ``shape`` whose first dim counts rows of ``hidden`` elements."""
        return self.rows(shape[0]).view(shape)


_workspaces: dict[tuple[Any, ...], Workspace | None] = {}  # None: set up and failed on some rank, for good
_failures: dict[tuple[Any, ...], str] = {}
_lock = threading.Lock()


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1") == "0"


def capacity_for(tokens: int) -> int:
    """The token capacity of the workspace that serves ``tokens``: a power of two, at least MIN_CAPACITY."""
    return max(MIN_CAPACITY, 1 << max(tokens - 1, 0).bit_length())


def fits(tokens: int, hidden: int, dtype: torch.dtype) -> bool:
    """Whether a workspace for ``tokens`` rows of ``hidden`` elements stays within MAX_BYTES."""
    return capacity_for(tokens) * hidden * dtype.itemsize <= MAX_BYTES


def unavailable_reason(group: dist.ProcessGroup, device: torch.device) -> str | None:
    """Why this rank cannot use symmetric memory on ``group`` for tensors on ``device`` (None: it can try)."""
    if disabled():
        return f"{DISABLE_ENV}=0"
    if device.type != "cuda":
        return f"tensors on {device.type}"
    if dist.get_backend(group) != "nccl":
        return f"the group's {dist.get_backend(group)} backend"
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError as error:
        return f"no torch.distributed._symmetric_memory ({error})"
    return None


def all_ranks_ok(group: dist.ProcessGroup, device: torch.device, problem: str | None) -> list[str]:
    """Exchange each rank's outcome of a local step; returns every failed rank's ``rank r: problem`` (empty:
    every rank succeeded). Collective: every rank of ``group`` must call it."""
    flag = torch.tensor([int(problem is None)], dtype=torch.int32, device=device)
    flags = [torch.empty_like(flag) for _ in range(dist.get_world_size(group))]
    dist.all_gather(flags, flag, group=group)
    if all(int(f.item()) for f in flags):
        return []
    problems: list[Any] = [None] * len(flags)
    dist.all_gather_object(problems, problem, group=group)
    return [f"rank {rank}: {p}" for rank, p in enumerate(problems) if p is not None]


def _allocate(group_name: str, elements: int, dtype: torch.dtype, device: torch.device,
              slots: int) -> torch.Tensor:
    from torch.distributed import _symmetric_memory as symm_mem

    if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before torch 2.13, deprecated since
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(group_name)
    from torch._C._distributed_c10d import _SymmetricMemory

    needed = slots * PAD_SLOT_BYTES
    if _SymmetricMemory.signal_pad_size < needed:
        # applies to allocations made from now on (ours); every rank asks for the same size
        _SymmetricMemory.signal_pad_size = needed
    return symm_mem.empty(elements, dtype=dtype, device=device)


def _rendezvous(buffer: torch.Tensor, group_name: str, slots: int) -> tuple[torch.Tensor, int, int]:
    from torch.distributed import _symmetric_memory as symm_mem

    handle = symm_mem.rendezvous(buffer, group_name)
    try:  # the pad of this allocation (a uint32 view of all of it)
        pad_bytes = handle.get_signal_pad(handle.rank).numel() * PAD_SLOT_BYTES
    except TypeError:  # a torch whose get_signal_pad takes more arguments: the size allocations get now
        from torch._C._distributed_c10d import _SymmetricMemory

        pad_bytes = _SymmetricMemory.signal_pad_size
    if pad_bytes < slots * PAD_SLOT_BYTES:
        raise RuntimeError(f"the signal pad has {pad_bytes} bytes; the kernels need {slots * PAD_SLOT_BYTES} "
                           "(set torch.distributed._symmetric_memory.set_signal_pad_size before the first "
                           "symmetric allocation)")
    pads = torch.tensor(list(handle.signal_pad_ptrs), dtype=torch.int64, device=buffer.device)
    return pads, handle.rank, handle.world_size


def workspace(group: dist.ProcessGroup, group_name: str, tokens: int, hidden: int, dtype: torch.dtype,
              device: torch.device, programs: int, role: str = "input") -> Workspace | None:
    """The workspace serving ``tokens`` rows (set up on first use; collective then), or None where some rank
    cannot set it up (:func:`failure` says why, the same on every rank). ``programs``: how many programs
    of a kernel synchronize on its signal pads at once (one slot per program and rank). ``role`` names
    what a kernel keeps there (its input, or a stage of its results for the peers): each role has its own."""
    capacity = capacity_for(tokens)
    key = (group_name, role, dtype, capacity, hidden, device.index)
    if key in _workspaces:
        return _workspaces[key]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"helion_fusions: a symmetric workspace ({capacity} x {hidden} {dtype}) would be set up "
                           "inside a CUDA-graph capture; make the call once before capturing")
    with _lock:
        slots = programs * dist.get_world_size(group)
        problem = None
        buffer = None
        try:
            buffer = _allocate(group_name, capacity * hidden, dtype, device, slots)
        except Exception as error:  # noqa: BLE001 - any local failure is exchanged, then every rank falls back
            problem = f"symmetric allocation failed: {type(error).__name__}: {error}"
        failed = all_ranks_ok(group, device, problem)
        if not failed:
            try:
                pads, rank, world_size = _rendezvous(buffer, group_name, slots)
            except Exception as error:  # noqa: BLE001
                problem = f"rendezvous failed: {type(error).__name__}: {error}"
            failed = all_ranks_ok(group, device, problem)
        if failed:
            _failures[key] = "; ".join(failed)
            _workspaces[key] = None
            return None
        found = _workspaces[key] = Workspace(buffer, pads, rank, world_size, capacity, hidden)
        return found


def failure(group_name: str, tokens: int, hidden: int, dtype: torch.dtype, device: torch.device,
            role: str = "input") -> str | None:
    """Why the workspace serving these rows could not be set up (None: it was, or was never tried)."""
    return _failures.get((group_name, role, dtype, capacity_for(tokens), hidden, device.index))


def known(group_name: str, tokens: int, hidden: int, dtype: torch.dtype, device: torch.device,
          role: str = "input") -> Workspace | None:
    """The workspace serving these rows if it is set up; never sets one up (no collective)."""
    return _workspaces.get((group_name, role, dtype, capacity_for(tokens), hidden, device.index))
