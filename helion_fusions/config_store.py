"""Tuned configs as reviewable JSON: ``configs/<device>/<op>.json``.

File format (``SCHEMA_VERSION`` 1)::

    {"schema_version": 1, "op": "...", "device": "nvidia_h100", "family": "nvidia_sm90",
     "kernel_hash": "<sha256 prefix of the kernel source>",
     "versions": {"helion": "...", "triton": "...", "torch": "..."},
     "entries": [{"dtype": "bfloat16", "hidden": 4096, "tokens": 16,
                  "config": {...Helion config...}, "time_us": 2.1,
                  "seed_time_us": 2.3, "source": "tuned" | "seed"}]}

An entry covers token counts up to ``tokens`` (above the previous entry's) for its
hidden size; other hidden sizes take the nearest tuned one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import helion
import torch

SCHEMA_VERSION = 1
CONFIG_DIR_ENV = "HELION_FUSIONS_CONFIG_DIR"
_FILE_KEYS = {"schema_version", "op", "device", "family", "kernel_hash", "versions", "entries"}
_ENTRY_KEYS = {"dtype", "hidden", "tokens", "config", "time_us"}
_DTYPES = {"bfloat16", "float16"}
# helion.Config accepts any keyword; a misspelt key would only fail at compile time
_HELION_CONFIG_KEYS = set(inspect.signature(helion.Config.__init__).parameters) - {"self", "kwargs"}


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the file and the entry."""


@dataclasses.dataclass(frozen=True)
class Entry:
    dtype: str
    hidden: int
    tokens: int
    config: dict[str, Any]
    time_us: float
    seed_time_us: float | None = None
    source: str = "tuned"


@dataclasses.dataclass(frozen=True)
class ConfigFile:
    path: Path
    op: str
    device: str
    family: str
    kernel_hash: str
    versions: dict[str, str]
    entries: tuple[Entry, ...]

    def pick(self, dtype: torch.dtype, hidden: int, tokens: int, batch_invariant: bool) -> Entry:
        """The entry for this shape: same dtype if tuned, nearest hidden size, then token bucket.

        In batch-invariant mode the token count is ignored: every T uses the largest
        bucket's config, so a row's reduction layout never depends on the batch.
        """
        dtype_name = str(dtype).removeprefix("torch.")
        candidates = [e for e in self.entries if e.dtype == dtype_name] or list(self.entries)
        nearest = min({e.hidden for e in candidates}, key=lambda h: (abs(math.log(h / hidden)), h))
        by_tokens = sorted((e for e in candidates if e.hidden == nearest), key=lambda e: e.tokens)
        if batch_invariant:
            return by_tokens[-1]
        return next((e for e in by_tokens if e.tokens >= tokens), by_tokens[-1])


def kernel_hash(kernel: helion.Kernel, *modules: Any) -> str:
    """Hash of the Helion kernel's source and of the modules it inlines."""
    digest = hashlib.sha256(inspect.getsource(kernel.fn).encode())
    for module in modules:
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:16]


def config_root() -> Path:
    """Where configs live: ``$HELION_FUSIONS_CONFIG_DIR``, the installed package data, or the checkout."""
    override = os.environ.get(CONFIG_DIR_ENV)
    if override:
        return Path(override)
    installed = Path(__file__).resolve().parent / "configs"  # where a wheel puts the package data
    return installed if installed.is_dir() else Path(__file__).resolve().parent.parent / "configs"


def _require(condition: bool, path: Path, where: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{path}: {where}: {message}")


def load(path: Path, op: str, expected_hash: str | None,
         config_problem: Callable[[dict[str, Any]], str | None] | None = None) -> ConfigFile:
    """Read and validate one config file; raises ConfigError naming the file and entry.

    ``config_problem`` is the op's own rule for configs (see ``OpSpec.config_problem``).
    ``expected_hash=None`` accepts any kernel source (``make autotune --revalidate`` reads stale files).
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
    _require(type(raw["schema_version"]) is int and raw["schema_version"] == SCHEMA_VERSION, path, "schema_version",
             f"expected {SCHEMA_VERSION}, got {raw['schema_version']!r}")
    _require(raw["op"] == op, path, "op", f"expected {op!r}, got {raw['op']!r}")
    _require(expected_hash is None or raw["kernel_hash"] == expected_hash, path, "kernel_hash",
             f"stale: tuned for kernel source {raw['kernel_hash']}, the current source is {expected_hash}; "
             "re-run `make autotune` on this device")
    _require(isinstance(raw["entries"], list) and raw["entries"], path, "entries", "expected a non-empty list")
    entries = []
    for index, item in enumerate(raw["entries"]):
        where = f"entries[{index}]"
        _require(isinstance(item, dict) and not (_ENTRY_KEYS - item.keys()), path, where,
                 f"expected an object with keys {sorted(_ENTRY_KEYS)}")
        _require(isinstance(item["hidden"], int) and item["hidden"] > 0, path, where, "hidden must be a positive int")
        _require(isinstance(item["tokens"], int) and item["tokens"] > 0, path, where, "tokens must be a positive int")
        _require(isinstance(item["time_us"], (int, float)), path, where, "time_us must be a number")
        _require(isinstance(item["config"], dict), path, where, "config must be an object")
        _require(item["dtype"] in _DTYPES, path, where, f"dtype must be one of {sorted(_DTYPES)}, got {item['dtype']!r}")
        unknown = set(item["config"]) - _HELION_CONFIG_KEYS
        _require(not unknown, path, where, f"unknown Helion config keys {sorted(unknown)}")
        problem = config_problem(item["config"]) if config_problem else None
        _require(problem is None, path, where, str(problem))
        entries.append(Entry(
            dtype=str(item["dtype"]), hidden=item["hidden"], tokens=item["tokens"], config=item["config"],
            time_us=float(item["time_us"]), seed_time_us=item.get("seed_time_us"), source=item.get("source", "tuned"),
        ))
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


def save(path: Path, op: str, device: str, family: str, hash_: str, entries: list[Entry]) -> None:
    from importlib.metadata import version

    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "schema_version": SCHEMA_VERSION,
        "op": op,
        "device": device,
        "family": family,
        "kernel_hash": hash_,
        "versions": {name: version(name) for name in ("helion", "triton", "torch")},
        "entries": [dataclasses.asdict(e) for e in sorted(entries, key=lambda e: (e.dtype, e.hidden, e.tokens))],
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
