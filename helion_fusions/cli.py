"""Command-line options shared by ``make autotune`` and ``make bench``: which ops and which shapes."""

from __future__ import annotations

import argparse

from helion_fusions.registry import REGISTRY, OpSpec


def add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ops", default="all", help="comma-separated op names (default: all)")
    parser.add_argument("--tokens", default=None, help="comma-separated token counts (default: each op's grid)")
    parser.add_argument("--hidden", default=None, help="comma-separated hidden sizes (default: each op's grid)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])


def _ints(parser: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        parser.error(f"{flag}: expected comma-separated positive integers, got {text!r}")
    if any(v <= 0 for v in values):
        parser.error(f"{flag}: expected positive integers, got {text!r}")
    return values


def selected_grid(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[tuple[OpSpec, list[int], list[int]]]:
    """(op, hidden sizes, token counts) for each op named by --ops, in the order given."""
    names = list(REGISTRY) if args.ops == "all" else args.ops.split(",")
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        parser.error(f"--ops: unknown op names {unknown}; choose from {sorted(REGISTRY)}")
    hidden = _ints(parser, "--hidden", args.hidden) if args.hidden else None
    tokens = _ints(parser, "--tokens", args.tokens) if args.tokens else None
    return [(REGISTRY[n], hidden or list(REGISTRY[n].hidden_sizes), tokens or list(REGISTRY[n].token_counts))
            for n in names]
