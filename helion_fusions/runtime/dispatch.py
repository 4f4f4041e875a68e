"""The generic dispatcher: config fallback chain, compile cache, launch plans, warm-up.

It knows no op by name. The first call of an op with a new *call signature* (every tensor's
dtype, shape, strides, device, pointer alignment and aliasing, and every other argument's value)
runs the op's host glue (argument checks, kernel views), picks a config for its problem key,
compiles once per (op, kernel key, bucket), and lays the launches out as a plan
(:mod:`helion_fusions.runtime.launcher`). A repeat call computes the signature, finds the plan
and launches: no checks, no views, no Helion host code.

CPU tensors run the op's eager reference, except under ``HELION_INTERPRET=1`` where the Helion
kernel itself runs eagerly (the CPU tests use this). An empty input (no launches) runs the
reference too.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import helion
import torch

from helion_fusions.runtime import config_store
from helion_fusions.runtime.device import DeviceIdentity, device_identity
from helion_fusions.runtime.launcher import (
    FastLaunch,
    captured_launch,
    fast_launch,
    storage_base,
)
from helion_fusions.runtime.registry import (
    REGISTRY,
    TOKEN_GRID,
    KernelLaunch,
    OpSpec,
    TunedKernel,
    bind,
    shape_text,
    signature,
    tokens_dim,
)

_INT32_LIMIT = 2**31 - 1
_MAX_PLANS_PER_OP = 4096  # a bound, not a working set: engines call each op with a few signatures per bucket

# --- config resolution -------------------------------------------------------------------

_warned: set[tuple[str, ...]] = set()


def _warn_once(*key: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(key[-1], stacklevel=3)


def resolve_config_file(spec: OpSpec | TunedKernel, device: DeviceIdentity) -> config_store.ConfigFile | None:
    """Walk the fallback chain; warns once naming what was used and why. None = architecture default."""
    expected = spec_hash(spec)
    problems = []
    for step, path in config_store.candidate_paths(spec.name, device.name, device.family):
        try:
            loaded = config_store.load(path, spec.name, spec.dim_names, expected, spec.config_problem,
                                       getattr(spec, "extra_config_keys", ()))
        except config_store.ConfigError as error:
            if path.exists():
                problems.append(str(error))
            continue
        if step != "exact device":
            _warn_once(spec.name, device.name, f"helion_fusions: {spec.name}: no usable config for {device.name}; "
                       f"using the {step} config {path}" + "".join(f"\n  skipped: {p}" for p in problems))
        elif problems:
            _warn_once(spec.name, device.name, "\n".join(problems))
        return loaded
    _warn_once(spec.name, device.name, f"helion_fusions: {spec.name}: no usable config for {device.name} "
               f"(family {device.family}); using the architecture default config"
               + "".join(f"\n  skipped: {p}" for p in problems))
    return None


@functools.cache
def spec_hash(spec: OpSpec | TunedKernel) -> str:
    return config_store.kernel_hash(spec.kernel, *getattr(spec, "extra_kernels", ()))


def choose_config(spec: OpSpec, launch: KernelLaunch, batch_invariant: bool) -> helion.Config:
    return tuned_config(spec, launch.problem, launch.dtype, launch.device.index or 0, batch_invariant)[0]


def tuned_config(spec: OpSpec | TunedKernel, problem: dict[str, int], dtype: torch.dtype, index: int,
                 batch_invariant: bool) -> tuple[helion.Config, str]:
    """The config for ``problem`` on GPU ``index``, and where it comes from: a config file's entry, or the
    architecture default (no usable file, none of its entries has the call's value of an exact dim, or the call
    lies past a partly tuned file's largest bucket)."""
    file = _config_files(spec, index)
    entry = None if file is None else file.pick(dtype, problem, spec.problem, batch_invariant)
    if entry is not None:
        # an entry of another model dim (the nearest tuned width) must still suit the call's
        widths = {d.name: problem[d.name] for d in spec.problem if not d.bucketed}
        unfit = spec.config_problem(entry.config, {**entry.shape, **widths}) if spec.config_problem else None
        if unfit is None:
            return helion.Config(**entry.config), f"{file.path} ({shape_text(entry.shape)}, {entry.dtype})"
        _warn_once(spec.name, file.path.name, shape_text(widths), f"helion_fusions: {spec.name}: the config tuned "
                   f"for {shape_text(entry.shape)} in {file.path} does not suit {shape_text(widths)} ({unfit}); "
                   "using the architecture default config")
        return spec.default_config(problem), "the architecture default"
    if file is not None:
        if file.exact_matches(problem, spec.problem):  # entries for this call, none of them this far
            bucketed = ", ".join(d.name for d in spec.problem if d.bucketed)
            _warn_once(spec.name, file.path.name, f"helion_fusions: {spec.name}: {file.path} is partly tuned: a call "
                       f"whose {bucketed} lies past the nearest tuned shape's largest bucket takes the architecture "
                       "default config")
        else:
            exact = {d.name: problem[d.name] for d in spec.problem if d.exact}
            _warn_once(spec.name, file.path.name, shape_text(exact), f"helion_fusions: {spec.name}: {file.path} has "
                       f"no entry for {shape_text(exact)}; using the architecture default config")
    return spec.default_config(problem), "the architecture default"


@functools.cache
def _config_files(spec: OpSpec | TunedKernel, index: int) -> config_store.ConfigFile | None:
    return resolve_config_file(spec, device_identity(index))


# --- compile cache -------------------------------------------------------------------------

_compiled: dict[tuple[Any, ...], Any] = {}
_compile_lock = threading.RLock()
_batch_invariant = False
_USE_REFERENCE = object()  # cache marker: no kernel builds for this key on this GPU


def set_batch_invariant(enabled: bool) -> None:
    """One reduction layout for every token count: a row's bytes never depend on the batch."""
    global _batch_invariant
    _batch_invariant = bool(enabled)
    _clear_plans()


def batch_invariant() -> bool:
    return _batch_invariant


def token_bucket(tokens: int) -> int:
    """Token counts share a compiled kernel per bucket; T == 1 is its own (Helion specializes size 1)."""
    return tokens_dim().bucket(tokens)


def _interpret() -> bool:
    return os.environ.get("HELION_INTERPRET") == "1"


@contextlib.contextmanager
def interpreting() -> Iterator[None]:
    """CPU calls run the Helion kernels in reference mode (``HELION_INTERPRET=1``) inside this block."""
    previous = os.environ.get("HELION_INTERPRET")
    os.environ["HELION_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["HELION_INTERPRET"]
        else:
            os.environ["HELION_INTERPRET"] = previous


@functools.cache
def interpreted(kernel: helion.Kernel) -> helion.Kernel:
    """The same Helion source run eagerly by PyTorch (Helion's reference mode), for CPU tensors."""
    from helion.runtime.ref_mode import RefMode

    return helion.kernel(kernel.fn, static_shapes=False, autotune_effort="none", ref_mode=RefMode.EAGER)


def compile_key(spec: OpSpec, launch: KernelLaunch) -> tuple[Any, ...]:
    """What selects a compiled kernel: the op, its kernel key, the bucket of each problem dim, the mode,
    whether an index may pass int32, which arguments share storage, and the device."""
    buckets = tuple(d.bucket(launch.problem[d.name]) for d in spec.problem if d.bucketed)
    large = any(isinstance(a, torch.Tensor) and a.numel() > _INT32_LIMIT for a in launch.args)
    return (spec.name, launch.key, buckets, _batch_invariant, large, storage_pattern(launch.args),
            launch.device.index)


def storage_pattern(args: Sequence[Any]) -> tuple[int, ...]:
    """For each tensor argument, the position of the first argument that shares its storage (its own if none).

    Helion compiles a kernel differently when its loops touch one storage (it orders them), and its own
    bind cache does not tell such calls apart: the pattern goes into the compile key, and each pattern
    binds its own kernel object (:func:`kernel_for`).
    """
    first: dict[int, int] = {}
    return tuple(first.setdefault(storage_base(a), i) for i, a in enumerate(args) if isinstance(a, torch.Tensor))


_kernels: dict[tuple[Any, tuple[int, ...]], Any] = {}


def kernel_for(kernel: Any, pattern: tuple[int, ...]) -> Any:
    """The kernel object to bind for arguments whose storage is shared as ``pattern`` says: the declared
    kernel for the first pattern seen, a copy of it (same source and settings) for each other one. Kept
    across :func:`reset`, as Helion keeps each object's binds."""
    found = _kernels.get((kernel, pattern))
    if found is None:
        first = not any(known is kernel for known, _ in _kernels)
        found = _kernels[(kernel, pattern)] = kernel if first else helion.Kernel(
            kernel.fn, settings=kernel.settings, configs=kernel.configs)
    return found


def compiled_kernel(spec: OpSpec, launch: KernelLaunch) -> Any:
    """The compiled kernel for this launch of ``spec``'s call (built once, under a lock, without launching), or
    ``_USE_REFERENCE``; a launch of another op's kernel takes that op's (``launch.tuned_as``)."""
    spec = launch.tuned_as or spec
    key = compile_key(spec, launch)
    compiled = _compiled.get(key)
    if compiled is not None:
        return compiled
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"helion_fusions: {spec.name} would compile a kernel inside CUDA-graph capture "
            f"({_describe(launch)}); call helion_fusions.warmup() before capturing "
            "(warmup(forward=<a dummy forward taking a token count>) covers the flags and layouts it uses)")
    with _compile_lock:
        compiled = _compiled.get(key)
        if compiled is None:
            compiled = _compiled[key] = _build(spec, launch)
    return compiled


def _describe(launch: KernelLaunch) -> str:
    return ", ".join(f"{name}={value}" for name, value in launch.problem.items())


def build_triton(compiled: Any, args: Sequence[Any]) -> None:
    """Build (and load) the Triton kernel a compiled Helion function launches, without launching it."""
    captured = captured_launch(compiled, args)
    if captured is None:
        return
    jit, grid, kernel_args, options = captured
    built = jit.run(*kernel_args, grid=grid, warmup=True,
                    **{name: value for name, value in options.items() if not name.startswith("_")})
    if built is not None:
        built.run  # noqa: B018 - loading the module raises for a kernel that does not fit this GPU


def _build(spec: OpSpec, launch: KernelLaunch) -> Any:
    """Compile the chosen config and check that it builds here; returns what later calls should run.

    A config that does not work here (one that does not fit this specialization, e.g. group 64
    where 128 was tuned; an unsupported instruction; too little shared memory) fails to build, before
    anything runs. Then the architecture default is tried, then the eager reference (which the
    caller runs), with one warning: the op keeps working, slower, rather than crashing.
    """
    bound = kernel_for(launch.kernel, storage_pattern(launch.args)).bind(launch.args)
    chosen, default = choose_config(spec, launch, _batch_invariant), spec.default_config(launch.problem)
    attempts = [("chosen", chosen)] + ([("architecture default", default)] if dict(default) != dict(chosen) else [])
    failures = []
    for label, config in attempts:
        try:
            compiled = bound.compile_config(config)
            build_triton(compiled, launch.args)
        except Exception as error:  # noqa: BLE001 - any build failure takes the fallback path
            first_line = str(error).splitlines()[0][:200] if str(error) else ""
            failures.append(f"{label} config {dict(config)}: {type(error).__name__}: {first_line}")
            continue
        if failures:
            _warn_once(spec.name, repr(launch.key), f"helion_fusions: {spec.name}: the tuned kernel for "
                       f"{_describe(launch)} failed to build on this GPU ({'; '.join(failures)}); "
                       "using the architecture default")
        return compiled
    _warn_once(spec.name, repr(launch.key), f"helion_fusions: {spec.name}: no kernel builds on this GPU for "
               f"{_describe(launch)} ({'; '.join(failures)}); running the eager reference")
    return _USE_REFERENCE


# --- launch plans ----------------------------------------------------------------------------

Plan = Callable[[tuple[Any, ...]], None]
_plans: dict[OpSpec, dict[tuple[Any, ...], Plan]] = {}


def _clear_plans() -> None:
    for plans in _plans.values():
        plans.clear()


def reset() -> None:
    """Forget configs, compiled kernels, plans and warnings (tests, and a config directory that changed)."""
    with _compile_lock:
        _config_files.cache_clear()
        _compiled.clear()
        _warned.clear()
        _clear_plans()


def call_signature(args: Sequence[Any]) -> tuple[Any, ...]:
    """What a call's checks and kernel layout depend on: per tensor its dtype, shape, strides, device,
    pointer alignment (mod 16: Triton specializes on it) and which earlier argument it aliases at what
    byte distance; every other argument's value."""
    key: list[Any] = []
    bases: dict[int, tuple[int, int]] = {}
    for index, value in enumerate(args):
        if isinstance(value, torch.Tensor):
            pointer = value.data_ptr()
            base = pointer - value.storage_offset() * value.element_size()
            alias = bases.setdefault(base, (index, pointer))
            key.append((value.dtype, value.shape, value.stride(), value.get_device(), pointer & 15,
                        None if alias[0] == index else (alias[0], pointer - alias[1])))
        elif isinstance(value, list):
            key.append(tuple(value))
        else:
            key.append(value)
    return tuple(key)


def implementation(spec: OpSpec) -> Callable[..., None]:
    """The op's CPU and CUDA implementation: a plan lookup on a known call signature, else a new plan."""
    names, defaults = signature(spec)
    plans = _plans.setdefault(spec, {})

    def run(*args: Any, **kwargs: Any) -> None:
        if kwargs and len(args) + len(kwargs) == len(names) and tuple(kwargs) == names[len(args):]:
            args = args + tuple(kwargs.values())  # keyword-only arguments, as the dispatcher passes them
        elif kwargs or len(args) != len(names):
            bound = bind(spec.name, names, defaults, args, kwargs)
            args = tuple(bound[name] for name in names)
        key = call_signature(args)
        plan = plans.get(key)
        if plan is not None:
            plan(args)
            return
        plan = _new_plan(spec, args)  # makes the call
        if plan is not None:
            if len(plans) >= _MAX_PLANS_PER_OP:
                plans.clear()
            plans[key] = plan

    return run


def _new_plan(spec: OpSpec, args: tuple[Any, ...]) -> Plan | None:
    """Check the arguments, make this call, and return the plan for repeat calls (None: do not keep one)."""
    names = signature(spec)[0]
    kwargs = dict(zip(names, args))
    launches = spec.prepare(**kwargs)  # raises on a bad argument: no plan is kept
    if not launches or launches[0].device.type != "cuda":
        if launches and _interpret():
            _run_interpreted(launches)
            return None  # interpret mode is for tests: every call checks and runs the kernel again
        reference = spec.reference
        reference(**kwargs)
        return lambda call_args: reference(**dict(zip(names, call_args)))
    device = launches[0].device.index or 0
    fast: list[FastLaunch] = []
    compiled_all = []
    for launch in launches:
        compiled = compiled_kernel(spec, launch)
        if compiled is _USE_REFERENCE:
            reference = spec.reference
            reference(**kwargs)
            return lambda call_args: reference(**dict(zip(names, call_args)))
        compiled_all.append(compiled)
    for launch, compiled in zip(launches, compiled_all):
        laid_out = fast_launch(compiled, launch.args, args, device)
        if laid_out is None:
            _run_prepared(spec, launches)
            return lambda call_args: _run_prepared(spec, spec.prepare(**dict(zip(names, call_args))))
        fast.append(laid_out)
    plan = _fast_plan(fast)
    plan(args)
    return plan


def _fast_plan(launches: list[FastLaunch]) -> Plan:
    """Run ``launches`` in order on the call's arguments."""
    if len(launches) == 1:
        return launches[0]

    def plan(args: tuple[Any, ...]) -> None:
        for launch in launches:
            launch(args)
    return plan


def _run_prepared(spec: OpSpec, launches: Sequence[KernelLaunch]) -> None:
    """Run launches as laid out by the host glue, through Helion's compiled host functions."""
    for launch in launches:
        compiled = compiled_kernel(spec, launch)
        if compiled is _USE_REFERENCE:
            raise RuntimeError(f"helion_fusions: {spec.name}: no kernel builds for {_describe(launch)}")
        compiled(*launch.args)


def _run_interpreted(launches: Sequence[KernelLaunch]) -> None:
    for launch in launches:
        interpreted(launch.kernel)(*launch.args)


def launch_count(spec: OpSpec, kwargs: dict[str, Any]) -> int:
    """How many kernel launches a call with these arguments makes (the bench reports it)."""
    return len(spec.prepare(**kwargs))


def compiled_count() -> int:
    return len(_compiled)


# --- warm-up -------------------------------------------------------------------------------------

def warmup_token_counts(max_tokens: int = TOKEN_GRID[-1], grid: Sequence[int] = TOKEN_GRID) -> list[int]:
    """Token counts that build every variant of every token bucket of ``grid`` up to ``max_tokens``.

    One count per bucket builds its Helion kernel; Triton then specializes an integer argument (the
    token count) on divisibility by 16, so each bucket gets the largest multiple of 16 it holds and
    one count that is not a multiple of 16 (T = 1 is a bucket, and a specialization, of its own).
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens: expected a positive int, got {max_tokens!r}")
    counts: set[int] = set()
    lower = 1
    for upper in (*grid, max(max_tokens, grid[-1] + 1)):
        top = min(upper, max_tokens)
        if top < lower:
            break
        multiple = top - top % 16
        counts |= {t for t in (multiple, top if top % 16 else top - 1) if lower <= t <= top}
        lower = upper + 1
    return sorted(counts)


def warmup(
    shapes: Iterable[dict[str, int]] | None = None,
    dtypes: Iterable[torch.dtype] = (torch.bfloat16,),
    ops: Iterable[str] | None = None,
    max_tokens: int = TOKEN_GRID[-1],
    device: torch.device | str = "cuda",
    forward: Callable[[int], Any] | None = None,
    hidden_sizes: Iterable[int] = (),
) -> int:
    """Compile every token bucket ahead of CUDA-graph capture; returns the number of compiled kernels.

    A kernel is compiled per op, dtype, model dims, flags (residual or not, ``scale_ub`` or
    not, group size, ue8m0, scale layout, ...) and token bucket, and Triton compiles a variant per
    divisibility of the token count by 16 (:func:`warmup_token_counts`). By default each op runs
    at those token counts on random inputs of its default flags, for each of ``shapes`` (its model
    dims, e.g. ``{"H": 4096}`` or a GEMM's ``{"N": 4096, "K": 4096}``, with ``"BLOCK": 128`` for block
    scales; ``hidden_sizes=[4096]`` is short for the first; without ``ops``, each op whose model dims a
    shape names). With ``forward``,
    ``forward(T)`` runs instead at each of those counts: pass the engine's own dummy forward pass,
    so that exactly the variants it calls are compiled; ``shapes``, ``dtypes`` and ``ops`` are then
    ignored.
    """
    if forward is not None:
        if not callable(forward):
            raise TypeError(f"forward: expected a callable taking a token count, got {type(forward).__name__}")
        grids = {d.grid for spec in REGISTRY.values() for d in spec.problem if d.bucketed}
        for tokens in sorted({t for grid in grids for t in warmup_token_counts(max_tokens, grid)}):
            forward(tokens)
        return compiled_count()
    names = list(REGISTRY) if ops is None else list(ops)  # all ops: those whose model dims the shapes name
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"ops: unknown op names {unknown}; registered ops are {sorted(REGISTRY)}")
    model_shapes = [dict(s) for s in shapes or ()] + [{"H": h} for h in hidden_sizes]
    if not model_shapes:
        raise ValueError("shapes: expected at least one shape of model dims, e.g. [{'H': 4096}] (or pass forward=)")
    device = torch.device(device)
    for name in names:
        spec = REGISTRY[name]
        model_dims = [d for d in spec.problem if not d.bucketed]
        (token_dim,) = [d for d in spec.problem if d.bucketed]
        for shape in model_shapes:
            missing = [d.name for d in model_dims if d.name not in shape and d.default is None]
            if missing and ops is None:
                continue
            if missing:
                raise ValueError(f"shapes: {name} needs the model dims {[d.name for d in model_dims]} "
                                 f"(missing {missing}), got {shape}")
            model = {d.name: shape.get(d.name, d.default) for d in model_dims}
            for dtype in dtypes:
                for tokens in warmup_token_counts(max_tokens, token_dim.grid):
                    spec.op(**spec.make_inputs({**model, token_dim.name: tokens}, dtype, device))
    return compiled_count()
