"""Helpers shared by the tests, the autotuner's accuracy check and timing, ``make bench`` and ``make sass``."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import inspect
import statistics
import tempfile
import unittest.mock
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import helion
import torch
import torch.distributed as dist
from helion.runtime.ref_mode import RefMode

from helion_fusions.ops.common import poison_, poisoned  # noqa: F401  (the tests' and bench's buffers)
from helion_fusions.runtime.launcher import captured_launch  # noqa: F401
from helion_fusions.runtime.registry import REGISTRY, own_launches

L2_FLUSH_BYTES = 256 * 1024 * 1024
SLEEP_CYCLES = 1_000_000  # about 0.5 ms at H100/H200 clocks
MAX_SLEEP_CYCLES = 16 * SLEEP_CYCLES
GRAPH_ROUNDS = 11  # replays of each graph in Timer.graph_each
COLLECTIVE_ROUNDS = 15  # replays of a collective's graph in replay_us


@functools.cache
def code_generator(kernel: helion.Kernel) -> helion.Kernel:
    """The same Helion source with reference mode off, so it emits Triton code (also on a CPU).

    A kernel created while HELION_INTERPRET=1 was set runs eagerly and has no code generator.
    """
    if kernel.settings.ref_mode == RefMode.OFF:
        return kernel
    return helion.Kernel(kernel.fn, settings=dataclasses.replace(kernel.settings, ref_mode=RefMode.OFF),
                         configs=kernel.configs)


def binding_shape(op: str, shape: dict[str, int]) -> tuple[tuple[str, int], ...]:
    """A small shape that binds like ``shape`` (its code is the same): a token count of 1 (Helion specializes
    size 1) stays 1, others 7; an op with kernels of its own for some token buckets binds at the smallest count
    of the shape's bucket."""
    spec = REGISTRY[op]

    def tokens(value: int) -> int:
        if value == 1:
            return 1
        if not spec.extra_kernels:
            return 7
        dim = spec.problem[spec.dim_names.index("T")]
        below = [g for g in dim.grid if g < dim.bucket(value)]
        return below[-1] + 1 if below else value
    return tuple((name, value if name != "T" else tokens(value)) for name, value in shape.items())


@functools.lru_cache(maxsize=4)  # a GEMM's inputs at M = 8192 take a GB: keep a few shapes' inputs alive, not all
def bound_launches(op: str, shape: tuple[tuple[str, int], ...], dtype: torch.dtype) -> list[tuple[Any, tuple[Any, ...]]]:
    """The op's own launches bound to CPU inputs of ``shape`` (see :func:`binding_shape`), with their arguments
    (binding takes a second or two, so once per shape). Another op's launch takes that op's configs."""
    spec = REGISTRY[op]
    launches = spec.prepare(**spec.make_inputs(dict(shape), dtype, torch.device("cpu")))
    return [(code_generator(launch.kernel).bind(launch.args), launch.args) for launch in own_launches(launches)]


# Triton signature types of the tensors a generated kernel takes
TRITON_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.float64: "*fp64",
                torch.int8: "*i8", torch.int16: "*i16", torch.int32: "*i32", torch.int64: "*i64", torch.uint8: "*u8",
                torch.bool: "*i1", torch.float8_e4m3fn: "*fp8e4nv", torch.float8_e4m3fnuz: "*fp8e4b8",
                torch.float8_e5m2: "*fp8e5"}
FRONT_END_TARGET = ("cuda", 90, 32)  # Hopper: the front end's checks hardly depend on the target
FRONT_END_SMS = 132  # what a persistent kernel's host code asks of a CPU device


def triton_code(bound: Any, args: Sequence[Any], config: helion.Config) -> str:
    """The Triton code of ``bound`` (a kernel of :func:`code_generator` bound to ``args``) under ``config``, run
    through Triton's front end (the Python AST to Triton IR, on a CPU): a ``tl.arange`` over a runtime size, a
    type error or a non-constexpr shape fail here as they would when a GPU compiles the kernel, which code
    generation and interpret mode do not show. The host function runs with a launcher that only records."""
    code = bound.to_triton_code(config)
    with tempfile.TemporaryDirectory() as folder:  # Triton reads a JIT function's source back from its file
        path = Path(folder) / "generated_kernel.py"
        path.write_text(code)
        spec = importlib.util.spec_from_file_location("helion_fusions_generated_kernel", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        with unittest.mock.patch.object(helion.runtime, "get_num_sm", lambda *_, **__: FRONT_END_SMS):  # persistent
            captured = captured_launch(getattr(module, bound.kernel.fn.__name__), args)
        assert captured is not None, "the generated host function did not make exactly one launch"
        kernel, _, kernel_args, _ = captured
        _front_end(kernel, kernel_args)
    return code


def _front_end(fn: Any, values: Sequence[Any]) -> None:
    from triton._C.libtriton import ir
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    target = GPUTarget(*FRONT_END_TARGET)
    backend = make_backend(target)
    options = backend.parse_options({})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    source = ast_source(fn, values)
    lead = (target,) if "target" in inspect.signature(source.make_ir).parameters else ()
    source.make_ir(*lead, options, backend.get_codegen_implementation(options), backend.get_module_map(), context)


def ast_source(kernel: Any, args: Sequence[Any]) -> Any:
    """Triton's specialization of these argument values: 16-byte aligned pointers and ints, 1 as a constant."""
    import triton

    signature, constants, attributes = {}, {}, {}
    for index, (param, value) in enumerate(zip(kernel.params, args, strict=True)):
        if param.is_constexpr:
            signature[param.name], constants[(index,)] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = TRITON_TYPES[value.dtype]
            attributes[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[param.name], constants[(index,)] = "constexpr", 1
            else:
                signature[param.name] = "i64" if abs(value) >= 2**31 else "i32"
                if value % 16 == 0:
                    attributes[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {param.name} of type {type(value).__name__}")
    return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attributes)


def machine_code(kernel: helion.Kernel, args: Sequence[Any], config: helion.Config,
                 target: tuple[Any, ...] = FRONT_END_TARGET, num_sm: int = FRONT_END_SMS) -> Any:
    """``kernel`` bound to ``args`` (CPU tensors) under ``config``, compiled by Triton on the CPU for ``target``
    (backend, arch, warp size) as that GPU would compile it: Triton's compiled kernel, whose ``asm`` holds the
    PTX and cubin (or AMDGCN and hsaco), and whose ``src`` is the Triton kernel. ``num_sm`` stands in for the
    GPU's multiprocessors, which a persistent config's host code asks for."""
    import triton
    from triton.backends.compiler import GPUTarget

    with unittest.mock.patch.object(helion.runtime, "get_num_sm", lambda *_, **__: num_sm):
        launch = captured_launch(code_generator(kernel).bind(args).compile_config(config), args)
    assert launch is not None, "the generated host function did not make exactly one launch"
    jit, _, jit_args, options = launch
    return triton.compile(ast_source(jit, jit_args), target=GPUTarget(*target),
                          options={k: options[k] for k in ("num_warps", "num_stages") if k in options})


def clone_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A copy of an op call's arguments with every tensor cloned (outputs and in-place inputs included)."""
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _ordered(bits: torch.Tensor, width: int) -> torch.Tensor:
    """Map sign-magnitude float bit patterns to integers ordered like the floats."""
    sign = bits >> (width - 1) & 1
    magnitude = bits & ((1 << (width - 1)) - 1)
    return torch.where(sign == 1, -magnitude, magnitude)


def ulp_distance(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Element-wise distance in representable steps (int64). Packed uint8 is read as two e2m1 nibbles."""
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        raise ValueError(f"cannot compare {actual.dtype}{list(actual.shape)} with {expected.dtype}{list(expected.shape)}")
    width = actual.element_size() * 8
    int_dtype = {8: torch.uint8, 16: torch.int16, 32: torch.int32}[width]
    a = actual.detach().contiguous().view(int_dtype).to(torch.int64) & ((1 << width) - 1)
    b = expected.detach().contiguous().view(int_dtype).to(actual.device).to(torch.int64) & ((1 << width) - 1)
    if actual.dtype == torch.uint8:  # two e2m1 codes per byte
        return torch.maximum(
            (_ordered(a & 0xF, 4) - _ordered(b & 0xF, 4)).abs(), (_ordered(a >> 4, 4) - _ordered(b >> 4, 4)).abs()
        )
    return (_ordered(a, width) - _ordered(b, width)).abs()


def tie_steps(dtype: torch.dtype) -> int:
    """How far apart a rounding tie may leave two results, in representable steps.

    Quantized codes and fp32 scales: one step. 16-bit outputs: a one-step tie in the
    normalized value is multiplied by the weight (|w| may exceed 1) and rounded again,
    so it can show as up to four steps.
    """
    return 4 if dtype in (torch.bfloat16, torch.float16) else 1


@dataclasses.dataclass(frozen=True)
class Comparison:
    elements: int
    flips: int  # elements at most tie_steps apart: the documented rounding tie
    worse: int  # elements further apart

    def ok(self, max_flip_fraction: float) -> bool:
        return self.worse == 0 and self.flips <= max_flip_fraction * self.elements

    def __str__(self) -> str:
        return f"{self.flips} rounding-tie flips and {self.worse} larger mismatches in {self.elements} elements"


def compare(actual: torch.Tensor, expected: torch.Tensor, activation_dtype: torch.dtype | None = None) -> Comparison:
    """Count rounding-tie flips and real mismatches.

    With ``activation_dtype``, an fp32 tensor is read as dynamic scales: a scale follows its
    group's amax, and a rounding tie on that element moves it by up to ``tie_steps`` steps of
    the activation dtype, so such a relative difference counts as a tie flip.
    """
    if activation_dtype is not None and actual.dtype == torch.float32:
        actual, expected = actual.detach(), expected.detach().to(actual.device)
        differ = actual.view(torch.int32) != expected.view(torch.int32)
        relative = (actual - expected).abs() / expected.abs().clamp_min(torch.finfo(torch.float32).tiny)
        tie = differ & (relative <= tie_steps(activation_dtype) * torch.finfo(activation_dtype).eps)
        return Comparison(actual.numel(), int(tie.sum()), int((differ & ~tie).sum()))
    distance = ulp_distance(actual, expected)
    steps = tie_steps(actual.dtype)
    return Comparison(distance.numel(), int(((distance > 0) & (distance <= steps)).sum()), int((distance > steps).sum()))


def compare_outputs(
    mutated: list[str], actual: dict[str, Any], expected: dict[str, Any]
) -> dict[str, Comparison]:
    """Compare every mutated tensor argument of an op call (nvfp4 block scales as fp8 codes)."""
    activation = actual["input"].dtype if isinstance(actual.get("input"), torch.Tensor) else None
    results = {}
    for name in mutated:
        if not isinstance(actual.get(name), torch.Tensor):
            continue
        a, e = actual[name], expected[name]
        if name.endswith("scale") and a.dtype != torch.float32:  # nvfp4 block scales, in any byte container
            a = a.contiguous().view(torch.uint8).view(torch.float8_e4m3fn)
            e = e.contiguous().view(torch.uint8).view(torch.float8_e4m3fn)
        results[name] = compare(a, e, activation)
    return results


def outputs_ok(results: dict[str, Comparison], max_flip_fraction: float = 1e-4) -> bool:
    """No real mismatch, and tie flips within the budget of the op's largest output (shared by its scales)."""
    budget = max_flip_fraction * max(r.elements for r in results.values())
    return all(r.worse == 0 for r in results.values()) and sum(r.flips for r in results.values()) <= budget


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, name: str, max_flip_fraction: float = 1e-4) -> Comparison:
    """Byte equality, except at most ``max_flip_fraction`` of elements a rounding tie apart (see tie_steps)."""
    result = compare(actual, expected)
    if not result.ok(max_flip_fraction):
        raise AssertionError(f"{name}: {result} (allowed: {max_flip_fraction:g} of elements one step apart)")
    return result


class Timer:
    """CUDA-event timing with an L2 flush before every timed call; medians in microseconds."""

    def __init__(self, reps: int) -> None:
        self.reps = reps
        self.flush_buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")

    def eager(self, fn: Callable[[], Any]) -> float:
        """Median GPU time of ``fn``, each call after an L2 flush and a GPU-side sleep (see :meth:`eager_each`)."""
        return self.eager_each([fn])[0]

    def eager_each(self, fns: Sequence[Callable[[], Any]]) -> list[float]:
        """Median GPU time of each of ``fns``, each call after an L2 flush and a GPU-side sleep.

        The calls alternate (one of each per round), so that clock and thermal drift over the
        run affects every callable alike: what two versions of the same work are compared by.
        The sleep keeps the GPU busy while the host enqueues a call, so the events time the GPU
        work alone (host overhead is reported separately, and CUDA-graph timings show the
        launch-free cost). A call whose sleep had already ended when the host finished
        enqueueing it may include host time: it is not counted, and the sleep doubles (a slow
        or busy host), up to ``MAX_SLEEP_CYCLES``.
        """
        for fn in fns:
            for _ in range(3):
                fn()
        torch.cuda.synchronize()
        cycles = SLEEP_CYCLES
        timed: list[list[Any]] = [[] for _ in fns]
        late: list[list[Any]] = [[] for _ in fns]
        while min(map(len, timed)) < self.reps and max(map(len, late)) < 3 * self.reps:
            for fn, good, bad in zip(fns, timed, late):
                if len(good) >= self.reps:
                    continue
                slept = torch.cuda.Event()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                self.flush_buffer.zero_()
                torch.cuda._sleep(cycles)
                slept.record()
                start.record()
                fn()
                end.record()
                if slept.query():  # the GPU may have waited for the host inside the timed span
                    bad.append((start, end))
                    cycles = min(2 * cycles, MAX_SLEEP_CYCLES)
                else:
                    good.append((start, end))
        torch.cuda.synchronize()
        if not all(timed):
            warnings.warn(f"the host enqueued every call more slowly than a {MAX_SLEEP_CYCLES}-cycle GPU sleep: "
                          "these times include host time", stacklevel=2)
        return [1000.0 * statistics.median(s.elapsed_time(e) for s, e in good or bad) for good, bad in zip(timed, late)]

    def graph(self, fn: Callable[[], Any]) -> float:
        """Replay time of ``fn`` captured in a CUDA graph, each call after an L2 flush (see :meth:`graph_each`)."""
        return self.graph_each([fn])[0]

    def graph_each(self, fns: Sequence[Callable[[], Any]]) -> list[float]:
        """Replay time of each of ``fns`` captured in a CUDA graph, each call after an L2 flush.

        A graph per callable (flush+fn, repeated ``reps`` times) and one of the flush alone are
        captured; the per-call time is the difference of their fastest replay times. The graphs
        are replayed alternately, so that drift affects them alike; the fastest of ``GRAPH_ROUNDS``
        replays, since work from other processes (the bench's compiling workers) only adds time,
        and one slowed replay of the flush-only graph would hide a short kernel's whole time.
        """
        for fn in fns:
            fn()
        torch.cuda.synchronize()
        stream = torch.cuda.Stream()
        graphs = []
        for fn in [*fns, None]:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
                for _ in range(self.reps):
                    self.flush_buffer.zero_()
                    if fn is not None:
                        fn()
            graphs.append(graph)
        # warm replays bring the clocks up after host-side work (compiles) left the GPU idle
        for _ in range(3):
            for graph in graphs:
                graph.replay()
        samples: list[list[float]] = [[] for _ in graphs]
        for _ in range(GRAPH_ROUNDS):
            for graph, bucket in zip(graphs, samples):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                graph.replay()
                end.record()
                torch.cuda.synchronize()
                bucket.append(start.elapsed_time(end))
        *with_fns, flush_only = map(min, samples)
        return [max(0.0, 1000.0 * (t - flush_only) / self.reps) for t in with_fns]


# --- collectives (make bench-tp, make autotune-tp): a process per GPU --------------------------------

def rank_input(shape: dict[str, int], dtype: torch.dtype, device: torch.device, rank: int) -> torch.Tensor:
    """Rank ``rank``'s partial input ``[T, H]``: random, different on every rank."""
    generator = torch.Generator().manual_seed(1000 * rank + 7 * shape["T"] + shape["H"])
    return (torch.randn(shape["T"], shape["H"], generator=generator) * (1 + rank)).to(dtype=dtype, device=device)


def graph_of(step: Callable[[], None], reps: int) -> torch.cuda.CUDAGraph:
    """``reps`` calls of ``step`` captured in a CUDA graph (run ``step`` once first, on every rank)."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            step()
    return graph


def replay_us(graph: torch.cuda.CUDAGraph, reps: int) -> float:
    """Median replay time per call of a graph of ``reps`` calls, the ranks starting each replay together.

    Collective: every rank of the default group replays its graph."""
    samples = []
    for _ in range(COLLECTIVE_ROUNDS):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(1000.0 * start.elapsed_time(end) / reps)
    return statistics.median(samples)
