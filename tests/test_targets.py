"""What a GPU without tuned configs runs compiles there: every op's launches under its architecture default config,
through Triton to machine code on a CPU, for an A100 (sm80), Ada (sm89), Hopper (sm90, where the configs are
tuned), Blackwell (sm100) and MI300 (gfx942). Compiling is not running: the bytes are checked on the GPUs the
project is run on (tests/test_gpu.py).

A kernel that fails to build on a GPU takes the op's eager reference there, with a warning (the dispatcher's
fallback): these are the failures that path is for, known and named here.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
from conftest import problem_shape, spec_params

from helion_fusions.runtime.registry import REGISTRY
from helion_fusions.tools.testing import code_generator, machine_code

TARGETS = {"sm80": ("cuda", 80, 32), "sm89": ("cuda", 89, 32), "sm90": ("cuda", 90, 32), "sm100": ("cuda", 100, 32),
           "gfx942": ("hip", "gfx942", 64)}  # (backend, arch, warp size)
BINARY = {"cuda": "cubin", "hip": "hsaco"}


@functools.cache
def _launches(op: str) -> tuple[tuple[Any, tuple[Any, ...], Any, str], ...]:
    """The op's launches (default flags, T = 7) under the default config: (kernel, arguments, config, generated
    code)."""
    spec = REGISTRY[op]
    launches = []
    for launch in spec.prepare(**spec.make_inputs(problem_shape(spec, 7, 4096), torch.bfloat16, torch.device("cpu"))):
        config = (launch.tuned_as or spec).default_config(launch.problem)  # another op's launch: that op's
        code = code_generator(launch.kernel).bind(launch.args).to_triton_code(config)
        launches.append((launch.kernel, launch.args, config, code))
    return tuple(launches)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("spec", spec_params())
def test_default_config_compiles_for(spec, target: str) -> None:
    launches = _launches(spec.name)
    fp8 = any("tl.float8e4nv" in code for *_, code in launches)
    # products rounded with CUDA's mul.rn.f32 (libdevice mul_rn, which Triton's HIP libdevice lacks): RoPE's
    # rotation and the GEMM's scale products
    cuda_only = any("libdevice.mul_rn" in code for *_, code in launches)
    if target == "sm80" and fp8:
        # e4m3 needs sm89 or later: on an A100 the fp8 and nvfp4 ops run their reference
        with pytest.raises(Exception, match="fp8e4nv"):
            _compile(launches, TARGETS[target])
        return
    if TARGETS[target][0] == "hip" and cuda_only:
        with pytest.raises(Exception, match="mul_rn"):
            _compile(launches, TARGETS[target])
        pytest.xfail("mul_rn is CUDA's libdevice: the op's kernel does not build for AMD GPUs yet")
    _compile(launches, TARGETS[target])


def _compile(launches, target: tuple[Any, ...]) -> None:
    for kernel, args, config, _ in launches:
        assert machine_code(kernel, args, config, target).asm[BINARY[target[0]]], (kernel.name, target)
