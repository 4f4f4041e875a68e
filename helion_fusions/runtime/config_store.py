"""Tuned configs as reviewable JSON: ``configs/<device>/<op>.json``.

File format (``SCHEMA_VERSION`` 2)::

    {"schema_version": 2, "op": "...", "device": "nvidia_h200", "family": "nvidia_sm90",
     "kernel_hash": "<sha256 prefix of what Helion compiles into the kernel>",
     "dims": ["T", "H"],
     "versions": {"helion": "...", "triton": "...", "torch": "..."},
     "entries": [{"dtype": "bfloat16", "shape": {"T": 16, "H": 4096},
                  "config": {...Helion config...}, "time_us": 2.1,
                  "seed_time_us": 2.3, "source": "tuned" | "seed" | "revalidated" | "stale"}]}

``dims`` is the op's problem key (:class:`~helion_fusions.runtime.registry.Dim`): a call takes the
entry of the nearest tuned model dims, then of its bucket of the bucketed dims (the token count).
Version 1 files (``"hidden"`` and ``"tokens"`` per entry, the ``{T, H}`` key) are read as ``H`` and
``T``; ``make autotune`` writes version 2. A ``"stale"`` entry (``make restamp``: its config generates other code
under the file's current kernel source) is not picked; ``make autotune ARGS=--revalidate`` times it again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import types
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import helion
import torch

from helion_fusions.runtime.registry import Dim

SCHEMA_VERSION = 2
CONFIG_DIR_ENV = "HELION_FUSIONS_CONFIG_DIR"
STALE = "stale"  # an entry's source once its config generates other code than it was tuned on (make restamp)
_FILE_KEYS = {"schema_version", "op", "device", "family", "kernel_hash", "versions", "entries"}
_ENTRY_KEYS = {2: {"dtype", "shape", "config", "time_us"}, 1: {"dtype", "hidden", "tokens", "config", "time_us"}}
_DTYPES = {"bfloat16", "float16", "float32"}
# helion.Config accepts any keyword; a misspelt key would only fail at compile time
_HELION_CONFIG_KEYS = set(inspect.signature(helion.Config.__init__).parameters) - {"self", "kwargs"}
_PACKAGE = __name__.split(".")[0]


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the entry."""


@dataclasses.dataclass(frozen=True)
class Entry:
    dtype: str
    shape: dict[str, int]
    config: dict[str, Any]
    time_us: float
    seed_time_us: float | None = None
    source: str = "tuned"

    def matches(self, dtype: str, shape: dict[str, int]) -> bool:
        return self.dtype == dtype and self.shape == shape

    @property
    def stale(self) -> bool:
        """Marked by ``make restamp``: tuned for code its config no longer generates."""
        return self.source == STALE


@dataclasses.dataclass(frozen=True)
class ConfigFile:
    path: Path
    op: str
    device: str
    family: str
    kernel_hash: str
    versions: dict[str, str]
    entries: tuple[Entry, ...]

    def exact_matches(self, shape: dict[str, int], problem: Sequence[Dim]) -> list[Entry]:
        """The entries tuned for the call's value of every exact dim (all of them where there is none), stale ones
        left out."""
        return [e for e in self.entries
                if not e.stale and all(e.shape[d.name] == shape[d.name] for d in problem if d.exact)]

    def pick(self, dtype: torch.dtype, shape: dict[str, int], problem: Sequence[Dim],
             batch_invariant: bool) -> Entry | None:
        """The entry for this call: same dtype if tuned, the nearest model dims, then the bucket of each bucketed dim.

        In batch-invariant mode the bucketed dims are ignored: every call takes their largest
        tuned value's config, so a row's reduction layout never depends on the batch. None (the
        default config) where no entry has the call's value of an exact dim, or where a bucketed value
        lies above every tuned one and those stop short of the dim's grid (a partly tuned file).
        """
        dtype_name = str(dtype).removeprefix("torch.")
        candidates = self.exact_matches(shape, problem)
        candidates = [e for e in candidates if e.dtype == dtype_name] or candidates
        if not candidates:
            return None
        for dim in sorted((d for d in problem if not d.exact), key=lambda d: d.bucketed):
            values = sorted({e.shape[dim.name] for e in candidates})
            value = shape[dim.name]
            if not dim.bucketed:
                chosen = min(values, key=lambda v: (abs(math.log(max(v, 1) / max(value, 1))), v))
            elif batch_invariant:
                chosen = values[-1]
            else:
                chosen = next((v for v in values if v >= value), values[-1])
                if chosen < value and chosen < dim.grid[-1]:
                    return None  # tuned below the grid's end only: a small bucket's tile would not fit this one
            candidates = [e for e in candidates if e.shape[dim.name] == chosen]
        return candidates[0]


def _referenced_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _referenced_names(const)
    return names


def kernel_sources(fn: Callable[..., Any]) -> list[str]:
    """What Helion compiles into a kernel: its source, and that of every function, class and constant of
    this package it reaches through names (the quant epilogues and the family's own helpers), once each."""
    sources: list[str] = []
    seen: set[int] = set()

    def visit_value(name: str, value: Any) -> None:
        if isinstance(value, types.FunctionType) and value.__module__.startswith(_PACKAGE):
            visit_function(value)
        elif isinstance(value, type) and value.__module__.startswith(_PACKAGE):
            if id(value) not in seen:
                seen.add(id(value))
                sources.append(inspect.getsource(value))
        elif isinstance(value, (int, float, str, tuple)) and not isinstance(value, bool) and name.isupper():
            sources.append(f"{name} = {value!r}")

    def visit_function(function: types.FunctionType) -> None:
        if id(function) in seen:
            return
        seen.add(id(function))
        sources.append(inspect.getsource(function))
        names = _referenced_names(function.__code__)
        for name in sorted(names):
            value = function.__globals__.get(name)
            if isinstance(value, types.ModuleType) and value.__name__.startswith(_PACKAGE):
                for attribute in sorted(names):  # module.attribute: the attributes it names
                    if hasattr(value, attribute):
                        visit_value(attribute, getattr(value, attribute))
            else:
                visit_value(name, value)

    visit_function(fn)
    return sources


def kernel_hash(*kernels: helion.Kernel) -> str:
    """Hash of :func:`kernel_sources` of each kernel: an edit to one or to anything it inlines changes it."""
    digest = hashlib.sha256()
    for kernel in kernels:
        for source in kernel_sources(kernel.fn):
            digest.update(source.encode())
    return digest.hexdigest()[:16]


def config_root() -> Path:
    """Where configs live: ``$HELION_FUSIONS_CONFIG_DIR``, the installed package data, or the checkout."""
    override = os.environ.get(CONFIG_DIR_ENV)
    if override:
        return Path(override)
    package = Path(__file__).resolve().parents[1]
    installed = package / "configs"  # where a wheel puts the package data
    return installed if installed.is_dir() else package.parent / "configs"


def _require(condition: bool, path: Path, where: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{path}: {where}: {message}")


def _entry(item: Any, version: int, dims: Sequence[str], path: Path, where: str,
           extra_keys: Collection[str] = ()) -> Entry:
    keys = _ENTRY_KEYS[version]
    _require(isinstance(item, dict) and not (keys - item.keys()), path, where,
             f"expected an object with keys {sorted(keys)}")
    shape = item["shape"] if version == 2 else {"T": item["tokens"], "H": item["hidden"]}
    _require(isinstance(shape, dict) and set(shape) == set(dims), path, where,
             f"shape must name the dims {list(dims)}, got {shape!r}")
    _require(all(type(v) is int and v > 0 for v in shape.values()), path, where,
             f"shape values must be positive ints, got {shape!r}")
    _require(isinstance(item["time_us"], (int, float)), path, where, "time_us must be a number")
    _require(isinstance(item["config"], dict), path, where, "config must be an object")
    _require(item["dtype"] in _DTYPES, path, where, f"dtype must be one of {sorted(_DTYPES)}, got {item['dtype']!r}")
    unknown = set(item["config"]) - _HELION_CONFIG_KEYS - set(extra_keys)
    _require(not unknown, path, where, f"unknown Helion config keys {sorted(unknown)}")
    return Entry(dtype=str(item["dtype"]), shape={d: shape[d] for d in dims}, config=item["config"],
                 time_us=float(item["time_us"]), seed_time_us=item.get("seed_time_us"),
                 source=item.get("source", "tuned"))


def load(path: Path, op: str, dims: Sequence[str], expected_hash: str | None,
         config_problem: Callable[[dict[str, Any], dict[str, int]], str | None] | None = None,
         extra_keys: Collection[str] = ()) -> ConfigFile:
    """Read and validate one config file; raises ConfigError naming the file and entry.

    ``dims`` are the op's problem dims; ``config_problem`` its own rule for configs (see
    ``OpSpec.config_problem``); ``extra_keys`` the config keys it reads besides Helion's (its dispatcher's own
    choices, such as a collective's algorithm). ``expected_hash=None`` accepts any kernel source
    (``make autotune --revalidate`` reads stale files).
    """
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path}: not readable JSON ({error})") from None
    _require(isinstance(raw, dict), path, "top level", "expected a JSON object")
    missing = _FILE_KEYS - raw.keys()
    _require(not missing, path, "top level", f"missing keys {sorted(missing)}")
    version = raw["schema_version"]
    _require(type(version) is int and version in _ENTRY_KEYS, path, "schema_version",
             f"expected one of {sorted(_ENTRY_KEYS)}, got {version!r}")
    _require(raw["op"] == op, path, "op", f"expected {op!r}, got {raw['op']!r}")
    _require(version == 2 or set(dims) == {"T", "H"}, path, "schema_version",
             f"version 1 files key entries by T and H; this op's problem key is {list(dims)}")
    _require(version == 1 or raw.get("dims") == list(dims), path, "dims",
             f"expected the op's problem key {list(dims)}, got {raw.get('dims')!r}")
    _require(expected_hash is None or raw["kernel_hash"] == expected_hash, path, "kernel_hash",
             f"stale: tuned for kernel source {raw['kernel_hash']}, the current source is {expected_hash}; "
             "re-run `make autotune` on this device")
    _require(isinstance(raw["entries"], list) and raw["entries"], path, "entries", "expected a non-empty list")
    entries = []
    for index, item in enumerate(raw["entries"]):
        entry = _entry(item, version, dims, path, f"entries[{index}]", extra_keys)
        problem = config_problem(entry.config, entry.shape) if config_problem else None
        _require(problem is None, path, f"entries[{index}]", str(problem))
        entries.append(entry)
    return ConfigFile(path=path, op=op, device=raw["device"], family=raw["family"], kernel_hash=raw["kernel_hash"],
                      versions=dict(raw["versions"]), entries=tuple(entries))


def candidate_paths(op: str, device: str, family: str, root: Path | None = None) -> Iterable[tuple[str, Path]]:
    """The fallback chain's files: the exact device, then other devices of the same family."""
    root = config_root() if root is None else root
    yield "exact device", root / device / f"{op}.json"
    if not root.is_dir():
        return
    for other in sorted(p for p in root.iterdir() if p.is_dir() and p.name != device):
        path = other / f"{op}.json"
        if not path.is_file():
            continue
        try:
            declared = json.loads(path.read_text()).get("family")
        except (OSError, ValueError, AttributeError):
            continue
        if declared == family:
            yield f"same family ({family}) device {other.name}", path


def save(path: Path, op: str, device: str, family: str, hash_: str, dims: Sequence[str], entries: list[Entry],
         versions: dict[str, str] | None = None) -> None:
    """Write a version-2 file (atomically); ``versions`` defaults to the installed helion, triton and torch."""
    from importlib.metadata import version

    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "schema_version": SCHEMA_VERSION,
        "op": op,
        "device": device,
        "family": family,
        "kernel_hash": hash_,
        "dims": list(dims),
        "versions": versions or {name: version(name) for name in ("helion", "triton", "torch")},
        "entries": [dataclasses.asdict(e) for e in sorted(
            entries, key=lambda e: (e.dtype, *(e.shape[d] for d in reversed(dims))))],
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
