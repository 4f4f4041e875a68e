"""A compiled kernel's launch, laid out once per call signature, so that a repeat call is one launcher call.

Helion's compiled host function recomputes the kernel's views, sizes and strides on every call, and
Triton's ``JITFunction.run`` binds and specializes every argument again. For a call whose tensors
have the same dtypes, shapes, strides, devices, pointer alignment and aliasing as an earlier one,
all of that is the same: only the data pointers move. :func:`fast_launch` captures the launch
once (Triton argument list, grid, compiled kernel) and records, for each pointer argument, which
op argument it lies in and at what byte offset; a repeat call fills
in the new pointers and calls the compiled kernel's launcher directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

_SCALARS = (int, float, bool, str, type(None))


def storage_base(tensor: torch.Tensor) -> int:
    """The address of the start of ``tensor``'s storage: views of one buffer share it."""
    return tensor.data_ptr() - tensor.storage_offset() * tensor.element_size()


def captured_launch(compiled: Callable[..., Any], args: Sequence[Any]) -> tuple[Any, Any, tuple[Any, ...],
                                                                              dict[str, Any]] | None:
    """Run a compiled Helion function's host code up to its Triton launch, without launching.

    Returns ``(triton_kernel, grid, kernel_args, launch_options)`` (on CPU tensors too), or None
    when the host code does not make exactly one launch.
    """
    captured: list[tuple[Any, Any, tuple[Any, ...], dict[str, Any]]] = []

    def capture(kernel: Any, grid: Any, *kernel_args: Any, **options: Any) -> None:
        captured.append((kernel, grid, kernel_args, options))

    compiled(*args, _launcher=capture)
    return captured[0] if len(captured) == 1 else None


class FastLaunch:
    """One kernel launch with its argument list laid out: ``launch(op_args)``."""

    __slots__ = ("_run", "_function", "_packed", "_grid", "_template", "_pointers", "_device")

    def __init__(self, compiled_kernel: Any, grid: tuple[int, int, int], template: list[Any],
                 pointers: list[tuple[int, int, int]], device: int) -> None:
        self._run = compiled_kernel.run
        self._function = compiled_kernel.function
        self._packed = compiled_kernel.packed_metadata
        self._grid = grid
        self._template = template
        self._pointers = pointers  # (position, op argument, byte offset)
        self._device = device

    def __call__(self, args: Sequence[Any]) -> None:
        values = self._template.copy()
        for position, source, offset in self._pointers:
            values[position] = args[source].data_ptr() + offset
        g0, g1, g2 = self._grid
        # no launch metadata or enter/exit hooks: Triton's launch hooks (profilers) do not see these launches
        self._run(g0, g1, g2, torch._C._cuda_getCurrentRawStream(self._device), self._function, self._packed,
                  None, None, None, *values)


def fast_launch(compiled: Callable[..., Any], launch_args: Sequence[Any], op_args: Sequence[Any],
                device: int) -> FastLaunch | None:
    """Lay out the launch ``compiled(*launch_args)`` makes, for later calls with other data pointers.

    Each tensor the kernel receives must lie in one of ``op_args`` (found by storage, so views of
    views work) or be a tensor kept alive for good (a placeholder, a scratch buffer). None when the launch
    cannot be laid out this way (a tensor descriptor argument, launcher-side state, several
    launches): the caller then runs the compiled host function on every call.
    """
    captured = captured_launch(compiled, launch_args)
    if captured is None:
        return None
    jit, grid, kernel_args, options = captured
    if any(name.startswith("_") and value for name, value in options.items()):
        return None
    if len(kernel_args) != len(getattr(jit, "arg_names", ())):
        return None
    if callable(grid) or not 1 <= len(grid) <= 3:
        return None
    run_options = {name: value for name, value in options.items() if not name.startswith("_")}
    compiled_kernel = jit.run(*kernel_args, grid=grid, warmup=True, **run_options)
    if compiled_kernel is None:
        return None
    sources = [(i, storage_base(a)) for i, a in enumerate(op_args) if isinstance(a, torch.Tensor)]
    template: list[Any] = []
    pointers = []
    for position, value in enumerate(kernel_args):
        template.append(value)
        if isinstance(value, torch.Tensor):
            base = storage_base(value)
            source = next((i for i, b in sources if b == base), None)
            if source is not None:
                pointers.append((position, source, value.data_ptr() - op_args[source].data_ptr()))
                template[position] = 0  # filled in per call; the first call's tensors are not kept alive
        elif not isinstance(value, _SCALARS):
            return None
    grid3 = (tuple(int(g) for g in grid) + (1, 1))[:3]
    return FastLaunch(compiled_kernel, grid3, template, pointers, device)
