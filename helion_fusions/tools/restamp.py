"""``python -m helion_fusions.tools.restamp --base REV``: keep tuned configs across a source edit that changes no
generated code.

A config file records the hash of what Helion compiles into its op's kernel: the kernel's source and that of
every helper it reaches, docstrings included (``config_store.kernel_hash``). Any edit there makes the file
stale, and a stale file waits for its GPU (``make autotune ARGS=--revalidate``). Many edits change no code that
Helion generates for the flavours an op runs: a docstring, a helper's branch that only other ops take, a renamed
local. For each stale file whose hash is the one the source at ``REV`` (where it was tuned) had, this generates
the Triton code of every entry's config under ``REV``'s source and under the working tree's, on the CPU, each in
a process of its own, and the file is stamped with the current hash. An entry whose code is the same (source-line
comments aside) is kept as it is; one whose code differs (a kernel edit that one flavour's launches see) is marked
``"source": "stale"``: calls no longer pick it, and ``make autotune ARGS=--revalidate`` on its GPU times only those
entries again (a GEMM kernel edit for block scales left 266 of 364 entries' code unchanged). This code runs against
REV's package, which needs ``tools.testing.binding_shape`` and ``bound_launches``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the tree this module belongs to


def _without_source_lines(code: str) -> str:
    """Generated code less Helion's ``# src[file:line]: ...`` comments, which move with any edit above them."""
    return "\n".join(line for line in code.splitlines() if not line.lstrip().startswith("# src["))


def code_digests(requests: dict[str, dict[str, Any]], progress: bool = False) -> dict[str, dict[str, Any]]:
    """For each request (a config file's op and entries): this source's kernel hash for the op, and per entry a
    digest of the code its config generates for each of the op's own launches ("error: ..." where none)."""
    import helion
    import torch

    import helion_fusions.ops  # noqa: F401  (registers the ops)
    from helion_fusions.runtime import dispatch
    from helion_fusions.runtime.registry import REGISTRY
    from helion_fusions.tools.testing import binding_shape, bound_launches

    total = sum(len(request["entries"]) for request in requests.values())
    done = 0
    results = {}
    for key, request in requests.items():
        spec = REGISTRY.get(request["op"])
        if spec is None:
            results[key] = {"hash": None, "digests": ["error: no such op"] * len(request["entries"])}
            continue
        digests = []
        for entry in request["entries"]:
            try:
                digest = hashlib.sha256()
                launches = bound_launches(spec.name, binding_shape(spec.name, entry["shape"]), getattr(torch, entry["dtype"]))
                for kernel, _ in launches:
                    digest.update(_without_source_lines(kernel.to_triton_code(helion.Config(**entry["config"]))).encode())
                digests.append(digest.hexdigest())
            except Exception as error:  # reported as a difference: the file stays stale
                digests.append(f"error: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
            done += 1
            if progress and sys.stderr.isatty():
                print(f"\r  {done}/{total} entries", end="", file=sys.stderr, flush=True)
        results[key] = {"hash": dispatch.spec_hash(spec), "digests": digests}
        if progress and not sys.stderr.isatty():
            print(f"  {done}/{total} entries ({request['op']})", file=sys.stderr, flush=True)
    if progress and sys.stderr.isatty():
        print(file=sys.stderr)
    return results


def digests_in(tree: Path, requests: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """:func:`code_digests` run in a fresh process on the package found in ``tree``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")]))}
    # this module's own code_digests runs against the tree's package: load it under another name
    script = ("import importlib.util, json, sys\n"
              f"spec = importlib.util.spec_from_file_location('restamp_here', {__file__!r})\n"
              "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
              "import helion_fusions\n"
              f"if not helion_fusions.__file__.startswith({str(tree)!r}):\n"
              "    sys.exit(f'imported {helion_fusions.__file__}, not the tree asked for')\n"
              "json.dump(module.code_digests(json.load(sys.stdin), progress=True), sys.stdout)\n")
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(requests), stdout=subprocess.PIPE,
                          text=True, env=env, cwd=tree)
    if done.returncode:
        raise RuntimeError(f"generating code in {tree} failed (exit {done.returncode})")
    return json.loads(done.stdout)


def source_at(rev: str, folder: Path) -> Path:
    """The repository's files at ``rev`` (``git archive``), extracted into ``folder``."""
    archive = subprocess.run(["git", "-C", str(PACKAGE_ROOT), "archive", "--format=tar", rev], capture_output=True)
    if archive.returncode:
        raise ValueError(f"--base: git cannot read revision {rev!r}: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def main(argv: list[str] | None = None) -> int:
    from helion_fusions.runtime import config_store, dispatch
    from helion_fusions.runtime.registry import REGISTRY

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the git revision whose source the stale files were tuned for")
    parser.add_argument("--root", type=Path, default=None, help="config root (default: the package's configs/)")
    parser.add_argument("--device", default="*", help="a device folder under the root (default: all)")
    args = parser.parse_args(argv)

    import helion_fusions.ops  # noqa: F401  (registers the ops)

    root = args.root or config_store.config_root()
    stale: dict[str, config_store.ConfigFile] = {}
    for path in sorted(root.glob(f"{args.device}/*.json")):
        spec = REGISTRY.get(path.stem)
        if spec is None:
            continue
        loaded = config_store.load(path, spec.name, spec.dim_names, None, spec.config_problem)
        if loaded.kernel_hash != dispatch.spec_hash(spec):
            stale[str(path)] = loaded
    if not stale:
        print(f"no stale config files under {root}")
        return 0
    requests = {key: {"op": loaded.op, "entries": [{"shape": e.shape, "dtype": e.dtype, "config": e.config}
                                                  for e in loaded.entries]}
                for key, loaded in stale.items()}
    print(f"{len(stale)} stale files, {sum(len(r['entries']) for r in requests.values())} entries: "
          f"generating their code at {args.base}, then in the working tree", file=sys.stderr)
    with tempfile.TemporaryDirectory() as folder:
        before = digests_in(source_at(args.base, Path(folder)), requests)
    after = digests_in(PACKAGE_ROOT, requests)
    left = 0
    for key, loaded in stale.items():
        path, was, now = Path(key), before[key], after[key]
        if was["hash"] != loaded.kernel_hash:
            print(f"{path}: tuned for kernel source {loaded.kernel_hash}, not {args.base}'s ({was['hash']}); left stale")
            left += 1
            continue
        changed = [a != b or a.startswith("error") for a, b in zip(was["digests"], now["digests"])]
        entries = [dataclasses.replace(e, source=config_store.STALE) if c else e
                   for e, c in zip(loaded.entries, changed)]
        config_store.save(path, loaded.op, loaded.device, loaded.family, now["hash"], REGISTRY[loaded.op].dim_names,
                          entries, versions=loaded.versions)
        marked = [e.shape for e in entries if e.stale]  # changed now, or marked by an earlier restamp
        if marked:
            shown = ", ".join(map(str, marked[:4])) + (f" and {len(marked) - 4} more" if len(marked) > 4 else "")
            print(f"{path}: {sum(changed)} of its {len(entries)} entries generate other code now; {len(marked)} marked "
                  f"stale ({shown}); kernel_hash {loaded.kernel_hash} -> {now['hash']}: run "
                  f"`make autotune ARGS=\"--revalidate --ops {loaded.op}\"` on a {loaded.device} GPU")
            left += 1
            continue
        print(f"{path}: its {len(entries)} entries generate the same code; kernel_hash "
              f"{loaded.kernel_hash} -> {now['hash']}")
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
