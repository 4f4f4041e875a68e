"""Op declarations and their registration as ``torch.ops.helion_fusions.*``.

A fusion family declares each op once, as an :class:`OpSpec`; :func:`register` turns it
into a real custom op (schema, CPU and CUDA implementations through the generic
dispatcher, and a fake kernel), so ``torch.compile(fullgraph=True)`` and CUDA graphs see
an ordinary operator. Nothing here knows any op by name.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import helion
import torch

NAMESPACE = "helion_fusions"
TOKEN_GRID = (1, 16, 128, 1024, 4096, 16384)

_LIB = torch.library.Library(NAMESPACE, "DEF")
REGISTRY: dict[str, OpSpec] = {}


class KernelLaunch(NamedTuple):
    """What the host wrapper hands the dispatcher: a Helion kernel and its arguments.

    ``key`` holds everything besides the token count that selects a compiled kernel
    (dtypes, model dims, epilogue flags); ``tokens`` and ``hidden`` select the config.
    A NamedTuple, since one is built on every call.
    """

    kernel: helion.Kernel
    args: tuple[Any, ...]
    key: tuple[Any, ...]
    tokens: int
    hidden: int
    device: torch.device
    dtype: torch.dtype


class Outputs(NamedTuple):
    """The mutated arguments an op only writes, and how to allocate them from its other arguments.

    ``allocate`` returns a tensor (or None, for an optional output left out) per name; it checks
    the arguments it reads, with the same errors as the op.
    """

    names: tuple[str, ...]
    allocate: Callable[[dict[str, Any]], dict[str, torch.Tensor | None]]


@dataclasses.dataclass(frozen=True, eq=False)
class OpSpec:
    """One fused op: its schema, kernel glue, reference and tuning/bench grid.

    Compared and hashed by identity (each op is declared once), which keeps the per-call
    caches keyed on it cheap.
    """

    name: str
    schema: str
    family: str
    kernel: helion.Kernel
    # checks the arguments and returns the launches, in order (none for an empty input)
    prepare: Callable[..., tuple[KernelLaunch, ...]]
    reference: Callable[..., None]
    make_inputs: Callable[[int, int, torch.dtype, torch.device], dict[str, Any]]
    default_config: Callable[[int], helion.Config]
    seed_configs: Callable[[int, int], list[helion.Config]]
    # the autotuner's neighbourhood beyond the seeds, for (hidden, tokens)
    search_configs: Callable[[int, int], list[helion.Config]]
    hidden_sizes: tuple[int, ...]
    token_counts: tuple[int, ...] = TOKEN_GRID
    read_and_written: tuple[str, ...] = ()
    # for tensors the op touches only in part (a cos/sin row per token, a cache slot per token):
    # how many of their elements it touches
    touched_elements: Callable[[dict[str, Any]], dict[str, int]] | None = None
    # what a stored config must not do for this op (None when acceptable); checked when configs load
    config_problem: Callable[[dict[str, Any]], str | None] | None = None
    # the outputs helion_fusions.functional allocates (None: the op works in place on its arguments)
    outputs: Outputs | None = None

    def bytes_moved(self, kwargs: dict[str, Any]) -> int:
        """Bytes the op must move: every tensor argument once (or its touched part), read-and-written ones twice."""
        touched = self.touched_elements(kwargs) if self.touched_elements is not None else {}
        total = 0
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                elements = touched.get(name, value.numel())
                total += elements * value.element_size() * (2 if name in self.read_and_written else 1)
        return total

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}"

    @property
    def arg_names(self) -> list[str]:
        return [a.name for a in _parse(self).arguments]

    @property
    def mutated_args(self) -> list[str]:
        return [a.name for a in _parse(self).arguments if a.alias_info is not None and a.alias_info.is_write]

    @property
    def op(self) -> Any:
        return getattr(getattr(torch.ops, NAMESPACE), self.name)


def _parse(spec: OpSpec) -> Any:
    return torch._C.parse_schema(f"{spec.qualname}{spec.schema}")


@functools.cache
def _signature(spec: OpSpec) -> tuple[tuple[str, ...], dict[str, Any]]:
    arguments = _parse(spec).arguments
    return tuple(a.name for a in arguments), {a.name: a.default_value for a in arguments if a.has_default_value()}


def normalize_call(spec: OpSpec, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Map a call's positional and keyword arguments onto the schema's names, with defaults."""
    names, defaults = _signature(spec)
    return _bind(spec.name, names, defaults, args, kwargs)


def _bind(op: str, names: Sequence[str], defaults: dict[str, Any], args: Sequence[Any],
          kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = dict(zip(names, args))
    if kwargs:
        bound.update(kwargs)
    if len(bound) < len(names):
        for name in names:
            if name not in bound:
                if name not in defaults:
                    raise TypeError(f"{op}: missing required argument {name!r}")
                bound[name] = defaults[name]
    return bound


def allocating_function(spec: OpSpec) -> Callable[..., Any]:
    """A plain Python function for the op: its arguments less the outputs, which it allocates and returns.

    ``f(*inputs)`` allocates ``spec.outputs`` (one tensor returned as is, several as a tuple in
    schema order) and calls ``torch.ops.helion_fusions.<op>``; an op without outputs to allocate
    works in place and returns None. Traceable by ``torch.compile(fullgraph=True)``.
    """
    outputs = spec.outputs.names if spec.outputs is not None else ()
    all_names, all_defaults = _signature(spec)
    names = tuple(n for n in all_names if n not in outputs)
    # optional arguments (``Tensor?``) default to None here, also where the engine's schema has no default
    optional = {a.name: None for a in _parse(spec).arguments if isinstance(a.type, torch._C.OptionalType)}
    defaults = {n: v for n, v in {**optional, **all_defaults}.items() if n in names}

    def function(*args: Any, **kwargs: Any) -> Any:
        if len(args) > len(names):
            raise TypeError(f"{spec.name}: takes {len(names)} arguments ({', '.join(names)}), got {len(args)}")
        unknown = set(kwargs) - set(names)
        if unknown:
            raise TypeError(f"{spec.name}: unexpected arguments {sorted(unknown)}; it takes {', '.join(names)}")
        bound = _bind(spec.name, names, defaults, args, kwargs)
        if spec.outputs is None:
            spec.op(**bound)
            return None
        allocated = spec.outputs.allocate(bound)
        spec.op(**bound, **allocated)
        results = tuple(allocated[n] for n in outputs)
        return results[0] if len(results) == 1 else results

    function.__name__ = function.__qualname__ = spec.name
    function.__doc__ = (f"``torch.ops.helion_fusions.{spec.name}`` with its outputs allocated.\n\n"
                        f"Arguments: {', '.join(names)}. Returns: {', '.join(outputs) or 'None (in place)'}.")
    return function


def register(spec: OpSpec) -> OpSpec:
    """Define ``torch.ops.helion_fusions.<spec.name>`` and route it through the dispatcher."""
    from helion_fusions import dispatch

    if spec.name in REGISTRY:
        raise ValueError(f"op {spec.name!r} is registered twice")
    if not re.fullmatch(r"\(.*\)\s*->\s*\(\)", spec.schema):
        raise ValueError(f"{spec.name}: only mutating ops returning () are supported, got {spec.schema!r}")
    _LIB.define(f"{spec.name}{spec.schema}")

    def implementation(*args: Any, **kwargs: Any) -> None:
        dispatch.run(spec, normalize_call(spec, args, kwargs))

    for key in ("CPU", "CUDA"):
        _LIB.impl(spec.name, implementation, key)
    torch.library.register_fake(spec.qualname, lib=_LIB)(lambda *args, **kwargs: None)
    REGISTRY[spec.name] = spec
    return spec
