"""Passive op declarations: what a fusion family tells the runtime about each of its ops.

A family declares each op once, as an :class:`OpSpec`, and hands it to
:func:`helion_fusions.runtime.library.register`. Nothing here knows any op by name, launches
anything or registers anything with torch.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import helion
import torch

NAMESPACE = "helion_fusions"
TOKEN_GRID = (1, 16, 128, 1024, 4096, 16384)

REGISTRY: dict[str, OpSpec] = {}

Shape = Mapping[str, int]  # a problem's named dimensions, e.g. {"T": 16, "H": 4096}


@dataclasses.dataclass(frozen=True)
class Dim:
    """One named dimension of an op's problem key, and how a value finds its tuned config.

    ``bucketed`` dimensions (the token count) take the config of the smallest tuned value at least
    as large (above them all: the largest where it ends the grid, else the default config), and
    compile one kernel per bucket of ``grid``; the others (model dimensions: fixed per model, one
    compile each anyway) take the nearest tuned value on a log scale. ``exact`` dimensions (a
    collective's world size) take only entries tuned for their value, and the default config where
    there are none. ``grid`` is what ``make autotune`` and ``make bench`` measure. ``default`` is the
    value a shape that does not name the dim takes (:func:`~helion_fusions.warmup`'s, and ``--shape``'s
    where no model has it); without one, a warmup shape must name it and ``--shape`` takes its grid.
    """

    name: str
    grid: tuple[int, ...]
    bucketed: bool = False
    exact: bool = False
    default: int | None = None

    def bucket(self, value: int) -> int:
        """The compile bucket of ``value``: its grid bucket (one past the grid above it); a model dim is its own."""
        if not self.bucketed:
            return value
        index = bisect.bisect_left(self.grid, value)
        return self.grid[index] if index < len(self.grid) else self.grid[-1] + 1


def tokens_dim(grid: tuple[int, ...] = TOKEN_GRID) -> Dim:
    """The token count ``T``: bucketed (T == 1 is a bucket of its own, since Helion specializes size 1)."""
    return Dim("T", grid, bucketed=True)


def shapes(problem: Sequence[Dim], overrides: Mapping[str, Sequence[int]] | None = None,
           models: Sequence[Shape] = ()) -> Iterator[dict[str, int]]:
    """Every shape of a problem's grid (``overrides`` replaces a dimension's grid), the bucketed dims fastest.

    The model dims take the product of their grids, or, given ``models`` (their combinations in real models),
    those of the combinations that have the overridden values; overriding every model dim names the product.
    Where no model has the overridden values, a dim with a ``default`` that they do not name takes that alone."""
    overrides = overrides or {}
    model_dims = [d.name for d in problem if not d.bucketed]
    named = [name for name in model_dims if name in overrides]
    combos = [m for m in models if all(m[name] in overrides[name] for name in named)]
    if not combos or len(named) == len(model_dims):
        grids = [tuple(overrides.get(d.name, d.grid if d.default is None else (d.default,))) for d in problem
                 if not d.bucketed]
        combos = [dict(zip(model_dims, values)) for values in itertools.product(*grids)]
    bucketed = [d for d in problem if d.bucketed]
    for combo in combos:
        for values in itertools.product(*(tuple(overrides.get(d.name, d.grid)) for d in bucketed)):
            named_values = {**combo, **dict(zip((d.name for d in bucketed), values))}
            yield {d.name: named_values[d.name] for d in problem}  # in the problem key's order


def shape_text(shape: Shape) -> str:
    """``T=16,H=4096``: the form ``--shape`` takes and tables print."""
    return ",".join(f"{name}={value}" for name, value in shape.items())


@dataclasses.dataclass(frozen=True, eq=False)
class TunedKernel:
    """A kernel tuned under a name of its own outside the registry (a composite op's own kernel): the part of
    an :class:`OpSpec` that the config store and the dispatcher's config lookup read."""

    name: str
    kernel: helion.Kernel
    problem: tuple[Dim, ...]
    default_config: Callable[[Shape], helion.Config]
    config_problem: Callable[[dict[str, Any], Shape], str | None] | None = None
    extra_config_keys: tuple[str, ...] = ()  # config keys the kernel's own dispatch reads besides Helion's

    @property
    def dim_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.problem)


class KernelLaunch(NamedTuple):
    """One kernel launch of an op call, as its host glue lays it out.

    ``key`` holds everything besides the problem's bucketed dims that selects a compiled kernel
    (dtypes, model dims, epilogue flags); ``problem`` the call's value of each problem dim, which
    selects the config. Every tensor in ``args`` is a view of an op argument or a tensor kept for good
    (a cached placeholder or scratch buffer): a repeat call reuses the launch's layout with the new
    arguments' data pointers, so a copy made from an argument would go stale. Kernels write every
    byte an op promises, padding included: no launch is made to zero a buffer first.

    ``tuned_as`` is the op whose configs and compiled kernels a launch takes when that is not the calling
    op: a launch of another op's kernel, made by :meth:`OpSpec.launches` (``problem`` is then that op's).
    """

    kernel: helion.Kernel
    args: tuple[Any, ...]
    key: tuple[Any, ...]
    problem: dict[str, int]
    device: torch.device
    dtype: torch.dtype
    tuned_as: OpSpec | None = None


def own_launches(launches: Sequence[KernelLaunch]) -> list[KernelLaunch]:
    """The launches of the calling op's own kernel: not those of another op it runs (``tuned_as``), which take
    that op's configs."""
    return [launch for launch in launches if launch.tuned_as is None]


class Outputs(NamedTuple):
    """The mutated arguments an op only writes, and how to allocate them from its other arguments.

    ``allocate`` returns a tensor (or None, for an optional output left out) per name; it checks
    the arguments it reads, with the same errors as the op.
    """

    names: tuple[str, ...]
    allocate: Callable[[dict[str, Any]], dict[str, torch.Tensor | None]]


@dataclasses.dataclass(frozen=True, eq=False)
class OpSpec:
    """One fused op: its schema, kernel glue, reference, problem key and tuning/bench grid.

    Compared and hashed by identity (each op is declared once), which keeps the per-call
    caches keyed on it cheap.
    """

    name: str
    schema: str
    family: str
    kernel: helion.Kernel
    # checks the arguments and returns the launches, in order (none for an empty input); no side effects
    prepare: Callable[..., tuple[KernelLaunch, ...]]
    reference: Callable[..., None]
    # the problem key: named dims, how each is bucketed, and the grid tuned and benched
    problem: tuple[Dim, ...]
    make_inputs: Callable[[Shape, torch.dtype, torch.device], dict[str, Any]]
    default_config: Callable[[Shape], helion.Config]
    seed_configs: Callable[[Shape], list[helion.Config]]
    # the autotuner's neighbourhood beyond the seeds
    search_configs: Callable[[Shape], list[helion.Config]]
    read_and_written: tuple[str, ...] = ()
    # for tensors the op touches only in part (a cos/sin row per token, a cache slot per token):
    # how many of their elements it touches
    touched_elements: Callable[[dict[str, Any]], dict[str, int]] | None = None
    # what a stored config must not do for this op on its entry's shape (None when acceptable); checked when
    # configs load, and at the call's model dims when a call takes an entry of another (the nearest tuned width)
    config_problem: Callable[[dict[str, Any], Shape], str | None] | None = None
    # the outputs helion_fusions.functional allocates (None: the op works in place on its arguments)
    outputs: Outputs | None = None
    # the overload name where the engine's mutating op is one (``out``: ``scaled_fp4_quant.out``), and the
    # schema of the engine's functional default overload, which allocates ``outputs`` and returns them
    overload: str = ""
    functional_schema: str | None = None
    # operands the engine's call finds outside L2 (a GEMM's weights): the autotuner then times small token
    # counts with L2 flushed, as make bench does, where it otherwise replays with L2 warm
    cold_operands: bool = False
    # the model dims' combinations that make autotune and make bench tune and measure (the layers of real
    # models: a GEMM's (N, K)); empty: the product of the dims' grids
    models: tuple[Shape, ...] = ()
    # kernels some of the op's shapes launch instead of ``kernel``, under configs from the same file (the
    # configs' source hash covers them too)
    extra_kernels: tuple[helion.Kernel, ...] = ()
    # L2 policies the autotuner tries on the seeds from its large token counts: each maps kernel arguments to the
    # eviction policy of their loads ("first": read once, streamed; "last": read by every program, kept)
    load_policies: tuple[dict[str, str], ...] = ()

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
    def dim_names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.problem)

    def launches(self, **kwargs: Any) -> tuple[KernelLaunch, ...]:
        """This op's launches for ``kwargs`` (checked as a call of it is), for another op that runs them as
        part of its own call: each keeps this op's configs and compiled kernels (``tuned_as``)."""
        return tuple(launch._replace(tuned_as=self) for launch in self.prepare(**kwargs))

    @property
    def qualname(self) -> str:
        return f"{NAMESPACE}::{self.name}" + (f".{self.overload}" if self.overload else "")

    @property
    def arg_names(self) -> list[str]:
        return list(signature(self)[0])

    @property
    def mutated_args(self) -> list[str]:
        return [a.name for a in parse_schema(self).arguments if a.alias_info is not None and a.alias_info.is_write]

    @property
    def op(self) -> Any:
        """``torch.ops.helion_fusions.<name>`` (the overload packet), or the overload ``<name>.<overload>``."""
        packet = getattr(getattr(torch.ops, NAMESPACE), self.name)
        return getattr(packet, self.overload) if self.overload else packet

    @property
    def op_overload(self) -> Any:
        """The op's own overload, as Inductor's generated code calls it."""
        return self.op if self.overload else self.op.default

    @property
    def keyword_only(self) -> tuple[str, ...]:
        return tuple(a.name for a in parse_schema(self).arguments if a.kwarg_only)


def parse_schema(spec: OpSpec) -> Any:
    return torch._C.parse_schema(f"{spec.qualname}{spec.schema}")


@functools.cache
def signature(spec: OpSpec) -> tuple[tuple[str, ...], dict[str, Any]]:
    """The schema's argument names, in order, and the defaults of those that have one."""
    arguments = parse_schema(spec).arguments
    return tuple(a.name for a in arguments), {a.name: a.default_value for a in arguments if a.has_default_value()}


def bind(op: str, names: Sequence[str], defaults: dict[str, Any], args: Sequence[Any],
         kwargs: dict[str, Any]) -> dict[str, Any]:
    """Map positional and keyword arguments onto ``names``, filling ``defaults``."""
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


def normalize_call(spec: OpSpec, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Map a call's positional and keyword arguments onto the schema's names, with defaults."""
    names, defaults = signature(spec)
    return bind(spec.name, names, defaults, args, kwargs)
