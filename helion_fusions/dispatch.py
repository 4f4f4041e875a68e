"""The generic dispatcher: device identity, config fallback chain, compile cache, warm-up.

It knows no op by name. For an op call it asks the op's host wrapper for a
:class:`~helion_fusions.registry.KernelLaunch`, picks a config for
(device, op, dtype, hidden size, token bucket), compiles once per bucket and then only
launches. CPU tensors run the op's eager reference, except under ``HELION_INTERPRET=1``
where the Helion kernel itself runs eagerly (the CPU tests use this).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import helion
import torch

from helion_fusions import config_store
from helion_fusions.registry import REGISTRY, TOKEN_GRID, KernelLaunch, OpSpec

_INT32_LIMIT = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class DeviceIdentity:
    """Canonical device name (``nvidia_h100``), its architecture family (``nvidia_sm90``) and fp8 flavour."""

    name: str
    family: str
    fp8_dtype: torch.dtype


_KNOWN_MODELS = ("h100", "h200", "h20", "gh200", "b200", "b300", "gb200", "a100", "l40s", "l4",
                 "mi300x", "mi300a", "mi325x", "mi350x", "mi355x")


def canonical_device_name(raw_name: str, vendor: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``nvidia_h100``; unknown models keep their whole name."""
    tokens = [t for t in raw_name.lower().replace("-", " ").split() if t not in {"nvidia", "amd", "instinct", "tesla"}]
    for token in tokens:
        if token in _KNOWN_MODELS:
            return f"{vendor}_{token}"
    model = "_".join(filter(None, ("".join(ch for ch in t if ch.isalnum()) for t in tokens)))
    return f"{vendor}_{model or 'unknown'}"


@functools.cache
def device_identity(index: int = 0) -> DeviceIdentity:
    props = torch.cuda.get_device_properties(index)
    if torch.version.hip is not None:
        arch = props.gcnArchName.split(":")[0]
        fp8 = torch.float8_e4m3fnuz if arch == "gfx942" else torch.float8_e4m3fn
        return DeviceIdentity(canonical_device_name(props.name, "amd"), f"amd_{arch}", fp8)
    return DeviceIdentity(canonical_device_name(props.name, "nvidia"), f"nvidia_sm{props.major}{props.minor}",
                          torch.float8_e4m3fn)


def fp8_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """The fp8 dtype engines use on ``device``: e4m3fnuz on MI300 (gfx942), e4m3fn elsewhere."""
    device = torch.device("cuda" if device is None else device)
    if device.type != "cuda":
        return torch.float8_e4m3fn
    return device_identity(device.index or 0).fp8_dtype


# --- config resolution -------------------------------------------------------------------

_warned: set[tuple[str, ...]] = set()


def _warn_once(*key: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(key[-1], stacklevel=3)


def resolve_config_file(spec: OpSpec, device: DeviceIdentity) -> config_store.ConfigFile | None:
    """Walk the fallback chain; warns once naming what was used and why. None = architecture default."""
    expected = spec_hash(spec)
    problems = []
    for step, path in config_store.candidate_paths(spec.name, device.name, device.family):
        try:
            loaded = config_store.load(path, spec.name, expected, spec.config_problem)
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
def spec_hash(spec: OpSpec) -> str:
    from helion_fusions.kernels import quant

    return config_store.kernel_hash(spec.kernel, quant)


def choose_config(spec: OpSpec, launch: KernelLaunch, batch_invariant: bool) -> helion.Config:
    file = _config_files(spec, launch.device.index or 0)
    if file is None:
        return spec.default_config(launch.hidden)
    return helion.Config(**file.pick(launch.dtype, launch.hidden, launch.tokens, batch_invariant).config)


@functools.cache
def _config_files(spec: OpSpec, index: int) -> config_store.ConfigFile | None:
    return resolve_config_file(spec, device_identity(index))


# --- compile cache -------------------------------------------------------------------------

_compiled: dict[tuple[Any, ...], Callable[..., Any]] = {}
_compile_lock = threading.Lock()
_batch_invariant = False


def set_batch_invariant(enabled: bool) -> None:
    """One reduction layout for every token count: a row's bytes never depend on the batch."""
    global _batch_invariant
    _batch_invariant = bool(enabled)


def batch_invariant() -> bool:
    return _batch_invariant


def token_bucket(tokens: int) -> int:
    """Token counts share a compiled kernel per bucket; T == 1 is its own (Helion specializes size 1)."""
    index = bisect.bisect_left(TOKEN_GRID, tokens)
    return TOKEN_GRID[index] if index < len(TOKEN_GRID) else TOKEN_GRID[-1] + 1


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


def run(spec: OpSpec, kwargs: dict[str, Any]) -> None:
    for launch in spec.prepare(**kwargs):
        if launch.device.type != "cuda":
            if not _interpret():
                spec.reference(**kwargs)
                return
            interpreted(launch.kernel)(*launch.args)
            continue
        key = (spec.name, launch.key, token_bucket(launch.tokens), _batch_invariant,
               launch.tokens * launch.hidden > _INT32_LIMIT, launch.device.index)
        compiled = _compiled.get(key)
        if compiled is None:
            compiled = _first_call(spec, launch, key)
        elif compiled is not _USE_REFERENCE:
            compiled(*launch.args)
        if compiled is _USE_REFERENCE:
            spec.reference(**kwargs)  # the whole op; a launch before this one only wrote scratch space
            return


_USE_REFERENCE = object()  # cache marker: no kernel builds for this key on this GPU


def _first_call(spec: OpSpec, launch: KernelLaunch, key: tuple[Any, ...]) -> Any:
    """Build (once, under a lock) and make this launch; returns the cache entry (maybe _USE_REFERENCE)."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            f"helion_fusions: {spec.name} would compile a kernel inside CUDA-graph capture "
            f"(hidden={launch.hidden}, tokens={launch.tokens}); call helion_fusions.warmup() before capturing "
            "(warmup(forward=<a dummy forward taking a token count>) covers the flags and layouts it uses)")
    with _compile_lock:
        compiled = _compiled.get(key)
        if compiled is None:
            compiled = _compiled[key] = _build_and_launch(spec, launch)
            return compiled
    if compiled is not _USE_REFERENCE:
        compiled(*launch.args)
    return compiled


def _build_and_launch(spec: OpSpec, launch: KernelLaunch) -> Any:
    """Compile the chosen config and make this launch with it; returns what later calls should run.

    Triton builds the kernel on its first launch, before anything runs, so a config that
    does not work here (one that does not fit this specialization, e.g. group 64 where 128
    was tuned; an unsupported instruction; too little shared memory) leaves the outputs
    untouched. Then the architecture default is tried, then the eager reference (which the
    caller runs), with one warning: the op keeps working, slower, rather than crashing.
    """
    bound = launch.kernel.bind(launch.args)
    chosen, default = choose_config(spec, launch, _batch_invariant), spec.default_config(launch.hidden)
    attempts = [("chosen", chosen)] + ([("architecture default", default)] if dict(default) != dict(chosen) else [])
    failures = []
    for label, config in attempts:
        try:
            compiled = bound.compile_config(config)
            compiled(*launch.args)
        except Exception as error:  # noqa: BLE001 - any build failure takes the fallback path
            first_line = str(error).splitlines()[0][:200] if str(error) else ""
            failures.append(f"{label} config {dict(config)}: {type(error).__name__}: {first_line}")
            continue
        if failures:
            _warn_once(spec.name, repr(launch.key), f"helion_fusions: {spec.name}: the tuned kernel for "
                       f"hidden={launch.hidden}, tokens={launch.tokens} failed to build on this GPU "
                       f"({'; '.join(failures)}); using the architecture default")
        return compiled
    _warn_once(spec.name, repr(launch.key), f"helion_fusions: {spec.name}: no kernel builds on this GPU for "
               f"hidden={launch.hidden}, tokens={launch.tokens} ({'; '.join(failures)}); running the eager reference")
    return _USE_REFERENCE


def launch_count(spec: OpSpec, kwargs: dict[str, Any]) -> int:
    """How many kernel launches a call with these arguments makes (the bench reports it)."""
    return len(spec.prepare(**kwargs))


def compiled_count() -> int:
    return len(_compiled)


def warmup_token_counts(max_tokens: int = TOKEN_GRID[-1]) -> list[int]:
    """One token count in each token bucket up to ``max_tokens``: a call at each builds every bucket."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens: expected a positive int, got {max_tokens!r}")
    return [min(bucket, max_tokens) for bucket in sorted({token_bucket(t) for t in (*TOKEN_GRID, max_tokens)
                                                          if t <= max_tokens})]


def warmup(
    hidden_sizes: Iterable[int] = (),
    dtypes: Iterable[torch.dtype] = (torch.bfloat16,),
    ops: Iterable[str] | None = None,
    max_tokens: int = TOKEN_GRID[-1],
    device: torch.device | str = "cuda",
    forward: Callable[[int], Any] | None = None,
) -> int:
    """Compile every token bucket ahead of CUDA-graph capture; returns the number of compiled kernels.

    A kernel is compiled per op, dtype, hidden size, flags (residual or not, ``scale_ub`` or
    not, group size, ue8m0, scale layout, ...) and token bucket. By default each op runs once
    per bucket on random inputs of its default flags. With ``forward``, ``forward(T)`` runs
    instead, once per bucket (``T`` from :func:`warmup_token_counts`): pass the engine's own
    dummy forward pass, so that exactly the variants it calls are compiled; ``hidden_sizes``,
    ``dtypes`` and ``ops`` are then ignored.
    """
    token_counts = warmup_token_counts(max_tokens)
    if forward is not None:
        if not callable(forward):
            raise TypeError(f"forward: expected a callable taking a token count, got {type(forward).__name__}")
        for tokens in token_counts:
            forward(tokens)
        return compiled_count()
    names = list(REGISTRY) if ops is None else list(ops)
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"ops: unknown op names {unknown}; registered ops are {sorted(REGISTRY)}")
    hidden_sizes = list(hidden_sizes)
    if not hidden_sizes:
        raise ValueError("hidden_sizes: expected at least one hidden size (or pass forward=)")
    device = torch.device(device)
    for name in names:
        spec = REGISTRY[name]
        for hidden in hidden_sizes:
            for dtype in dtypes:
                for tokens in token_counts:
                    spec.op(**spec.make_inputs(tokens, hidden, dtype, device))
    return compiled_count()
