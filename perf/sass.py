"""``python -m perf.sass`` (``make sass``): what a kernel compiles to, on a machine without a GPU.

For each op (all by default) and shape (each model-dim value of the op's grid at T = 4096 unless
``--shape`` says otherwise) it binds the op's Helion kernel to CPU inputs, generates the Triton
code of a config (the one shipped for ``--device``, else the architecture default),
compiles it for ``--arch`` (sm_90 by default) with Triton's own compiler and ptxas, and
reports the registers, stack and spill bytes, the SASS instruction count per thread and
its mix, the count up to the first ``EXIT`` (the straight path most programs run: slow paths
and one program's extra work come after it), and the out-of-line calls (``CALL``: the slow
paths of IEEE division, for one).
The SASS goes to ``--out``. Static counts are a proxy, not a timing: on a memory-bound
kernel they matter once the issue rate, not the bandwidth, sets the time.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import helion
import torch
import triton
from rich.progress import track
from tabulate import tabulate

import helion_fusions.ops  # noqa: F401  (registers the ops)
from helion_fusions.runtime import config_store, dispatch
from helion_fusions.runtime.device import DeviceIdentity
from helion_fusions.runtime.registry import OpSpec, Shape, own_launches, shape_text
from helion_fusions.tools.cli import add_grid_arguments, selected_grid
from helion_fusions.tools.testing import machine_code

LARGE = {"T": 4096, "M": 2048}
_INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclasses.dataclass
class Report:
    op: str
    shape: str
    registers: int
    stack_bytes: int
    local_bytes: int
    instructions: int
    to_exit: int
    calls: int
    mix: list[tuple[str, int]]


def _cuobjdump(*args: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return subprocess.run([str(tool), *args], check=True, capture_output=True, text=True).stdout


def compile_report(spec: OpSpec, shape: Shape, dtype: torch.dtype, config: helion.Config, arch: int,
                   out: Path, num_sm: int = 132) -> Report:
    """Compile the op's last launch of its own kernel for this shape and config to SASS, and summarize it.

    A persistent config's host code asks for the GPU's multiprocessor count, which CPU tensors
    do not have: ``num_sm`` stands in (132 on an H100 SXM and an H200)."""
    launch = own_launches(spec.prepare(**spec.make_inputs(shape, dtype, torch.device("cpu"))))[-1]
    compiled = machine_code(launch.kernel, launch.args, config, ("cuda", arch, 32), num_sm)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{spec.name}_{'_'.join(f'{k}{v}' for k, v in shape.items())}_sm{arch}"
    stem.with_suffix(".cubin").write_bytes(compiled.asm["cubin"])
    sass = _cuobjdump("-sass", str(stem.with_suffix(".cubin")))
    stem.with_suffix(".sass").write_text(sass)
    resources = _RESOURCES.search(_cuobjdump("--dump-resource-usage", str(stem.with_suffix(".cubin"))))
    if resources is None:
        raise RuntimeError(f"{spec.name}: cuobjdump reported no resource usage for {stem}.cubin")
    opcodes = [m.group(1) for m in map(_INSTRUCTION.match, sass.splitlines()) if m and m.group(1) != "NOP"]
    mix = collections.Counter(opcode.split(".")[0] for opcode in opcodes)
    to_exit = next((i for i, opcode in enumerate(opcodes) if opcode.startswith("EXIT")), len(opcodes))
    return Report(op=spec.name, shape=shape_text(shape), registers=int(resources[1]),
                  stack_bytes=int(resources[2]), local_bytes=int(resources[4]), instructions=len(opcodes),
                  to_exit=to_exit, calls=mix["CALL"], mix=mix.most_common(6))


def shipped_config(spec: OpSpec, device: str, family: str, dtype: torch.dtype, shape: Shape,
                   stale_ok: bool = False) -> tuple[helion.Config, str]:
    """The config a GPU called ``device`` would run for this shape (fallback chain included), and its source.

    ``stale_ok`` takes the device's file even when it was tuned for another kernel source, so an edit
    can be compared with the same configs before they are tuned again."""
    if stale_ok:
        path = config_store.config_root() / device / f"{spec.name}.json"
        file = config_store.load(path, spec.name, spec.dim_names, None, spec.config_problem)
    else:
        file = dispatch.resolve_config_file(spec, DeviceIdentity(device, family, torch.float8_e4m3fn))
    if file is None:
        return spec.default_config(shape), "architecture default"
    entry = file.pick(dtype, dict(shape), spec.problem, dispatch.batch_invariant())
    return helion.Config(**entry.config), f"{file.path.parent.name} {shape_text(entry.shape)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_grid_arguments(parser)
    parser.add_argument("--device", default="nvidia_h200", help="whose shipped configs to compile (configs/<device>)")
    parser.add_argument("--family", default="nvidia_sm90", help="the device's architecture family (fallback chain)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability to compile for, e.g. 90")
    parser.add_argument("--num-sm", type=int, default=132, help="multiprocessor count persistent configs assume")
    parser.add_argument("--stale-ok", action="store_true",
                        help="compile the device's configs even if they were tuned for another kernel source")
    parser.add_argument("--out", type=Path, default=Path("build") / "sass")
    args = parser.parse_args(argv)
    grid = selected_grid(parser, args)
    if args.shape is None:  # one large shape per model dims: T = 4096 (M = 2048 for a GEMM)
        grid = [(spec, [s for s in op_shapes if all(s.get(dim, value) == value for dim, value in LARGE.items())])
                for spec, op_shapes in grid]
    dtype = getattr(torch, args.dtype)
    shapes = [(spec, shape) for spec, op_shapes in grid for shape in op_shapes]
    rows = []
    for spec, shape in track(shapes, description="compiling", transient=True):
        config, source = shipped_config(spec, args.device, args.family, dtype, shape, args.stale_ok)
        report = compile_report(spec, shape, dtype, config, args.arch, args.out, args.num_sm)
        rows.append([report.op, report.shape, source, report.registers, report.stack_bytes, report.local_bytes,
                     report.instructions, report.to_exit, report.calls, " ".join(f"{op}:{count}" for op, count in report.mix)])
    print(tabulate(rows, headers=["op", "shape", "config", "regs", "stack", "local", "instructions", "to EXIT", "calls",
                                  "most frequent"], tablefmt="github"))
    print(f"SASS in {args.out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
