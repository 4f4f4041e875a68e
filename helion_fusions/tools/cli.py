"""Command-line options shared by ``make autotune`` and ``make bench``: which ops and which problem shapes."""

from __future__ import annotations

import argparse

from helion_fusions.runtime.registry import REGISTRY, OpSpec, shapes

SHAPE_HELP = ("problem shapes by the op's named dims, e.g. T=16,H=4096; a dim may list values (T=1/16/128); "
              "dims left out take the op's grid (a GEMM's N and K: the tuned model's layers that have the values "
              "named); repeatable (default: each op's whole grid)")


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", default="all", help="comma-separated op names (default: all)")
    parser.add_argument("--shape", action="append", default=None, metavar="DIM=V[/V...],...", help=SHAPE_HELP)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])


def parse_shape(parser: argparse.ArgumentParser, text: str) -> dict[str, list[int]]:
    """``T=1/16,H=4096`` -> ``{"T": [1, 16], "H": [4096]}``; exits with a message naming the bad part."""
    parsed: dict[str, list[int]] = {}
    for part in text.split(","):
        name, sep, values = part.partition("=")
        try:
            numbers = [int(v) for v in values.split("/")] if sep else []
        except ValueError:
            numbers = []
        if not name or not numbers or any(v <= 0 for v in numbers):
            parser.error(f"--shape: expected DIM=positive int[/int...] items separated by commas, got {part!r} "
                         f"in {text!r}")
        parsed[name.strip()] = numbers
    return parsed


def selected_grid(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[tuple[OpSpec, list[dict[str, int]]]]:
    """(op, shapes) for each op named by --ops, in the order given."""
    names = list(REGISTRY) if args.ops == "all" else args.ops.split(",")
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        parser.error(f"--ops: unknown op names {unknown}; choose from {sorted(REGISTRY)}")
    selections = [parse_shape(parser, text) for text in args.shape] if args.shape else [{}]
    grid = []
    for name in names:
        spec = REGISTRY[name]
        selected: list[dict[str, int]] = []
        for selection in selections:
            extra = set(selection) - set(spec.dim_names)
            if extra:
                parser.error(f"--shape: {name} has the dims {list(spec.dim_names)}, not {sorted(extra)}")
            selected += [s for s in shapes(spec.problem, selection, spec.models) if s not in selected]
        grid.append((spec, selected))
    return grid
