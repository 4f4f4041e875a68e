"""Registration of declared ops as ``torch.ops.helion_fusions.*``, and their allocating Python functions.

:func:`register` turns an :class:`~helion_fusions.runtime.registry.OpSpec` into a real custom op
(schema, CPU and CUDA implementations through the generic dispatcher, and a fake kernel), so
``torch.compile(fullgraph=True)`` and CUDA graphs see an ordinary operator.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from helion_fusions.runtime import dispatch
from helion_fusions.runtime.registry import (
    NAMESPACE,
    REGISTRY,
    OpSpec,
    bind,
    parse_schema,
    signature,
)

_LIB = torch.library.Library(NAMESPACE, "DEF")


def register(spec: OpSpec) -> OpSpec:
    """Define ``torch.ops.helion_fusions.<spec.name>`` and route it through the dispatcher."""
    if spec.name in REGISTRY:
        raise ValueError(f"op {spec.name!r} is registered twice")
    _define(spec.qualname.split("::")[1], spec.schema, dispatch.implementation(spec))  # with the overload, if any
    if spec.functional_schema is not None:
        # the engine's functional overload: allocate the outputs, call the mutating overload, return them
        # (under fake tensors too, where the mutating overload's fake kernel runs)
        if spec.outputs is None or not spec.overload:
            raise ValueError(f"{spec.name}: a functional overload needs outputs and a named mutating overload")
        _LIB.define(f"{spec.name}{spec.functional_schema}")
        functional = allocating_function(spec)
        for key in ("CPU", "CUDA"):
            _LIB.impl(spec.name, functional, key)
        torch.library.register_fake(f"{NAMESPACE}::{spec.name}", lib=_LIB)(functional)
    REGISTRY[spec.name] = spec
    return spec


def register_composite(name: str, schema: str, implementation: Callable[..., None]) -> Any:
    """Define ``torch.ops.helion_fusions.<name>``, run by ``implementation`` on CPU and CUDA, and return it.

    For ops composed of other ops and collectives, which launch no kernel of their own: no OpSpec,
    so no problem key, configs or tuning."""
    _define(name, schema, implementation)
    return getattr(getattr(torch.ops, NAMESPACE), name)


def _define(name: str, schema: str, implementation: Callable[..., None]) -> None:
    """A mutating op (returning ``()``) with CPU and CUDA implementations and a fake kernel that does nothing."""
    if not re.fullmatch(r"\(.*\)\s*->\s*\(\)", schema):
        raise ValueError(f"{name}: only mutating ops returning () are supported, got {schema!r}")
    _LIB.define(f"{name}{schema}")
    for key in ("CPU", "CUDA"):
        _LIB.impl(name, implementation, key)
    torch.library.register_fake(f"{NAMESPACE}::{name}", lib=_LIB)(lambda *args, **kwargs: None)


def allocating_function(spec: OpSpec) -> Callable[..., Any]:
    """A plain Python function for the op: its arguments less the outputs, which it allocates and returns.

    ``f(*inputs)`` allocates ``spec.outputs`` (one tensor returned as is, several as a tuple in
    schema order) and calls ``torch.ops.helion_fusions.<op>``; an op without outputs to allocate
    works in place and returns None. Traceable by ``torch.compile(fullgraph=True)``.
    """
    outputs = spec.outputs.names if spec.outputs is not None else ()
    all_names, all_defaults = signature(spec)
    names = tuple(n for n in all_names if n not in outputs)
    # optional arguments (``Tensor?``) default to None here, also where the engine's schema has no default
    optional = {a.name: None for a in parse_schema(spec).arguments if isinstance(a.type, torch._C.OptionalType)}
    defaults = {n: v for n, v in {**optional, **all_defaults}.items() if n in names}

    def function(*args: Any, **kwargs: Any) -> Any:
        if len(args) > len(names):
            raise TypeError(f"{spec.name}: takes {len(names)} arguments ({', '.join(names)}), got {len(args)}")
        unknown = set(kwargs) - set(names)
        if unknown:
            raise TypeError(f"{spec.name}: unexpected arguments {sorted(unknown)}; it takes {', '.join(names)}")
        bound = bind(spec.name, names, defaults, args, kwargs)
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
