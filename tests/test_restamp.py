"""``python -m helion_fusions.tools.restamp``: a stale config file tuned at the revision given is stamped with the
current kernel hash; its entries whose generated code differs from that revision's are marked stale."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import REPO_ROOT

from helion_fusions.runtime import dispatch
from helion_fusions.runtime.registry import REGISTRY
from helion_fusions.tools import restamp

SAME, OTHER, BASE_HASH = "rotary_embedding", "concat_and_cache_mla", "0123456789abcdef"
ELSEWHERE = "rotary_embedding_and_cache"  # tuned for a source that is not the base's
MARKED = "rotary_embedding_static_fp8_quant"  # an entry marked stale by an earlier restamp, the same code since


def _stale_copy(root: Path, op: str, kernel_hash: str) -> tuple[Path, str]:
    path = root / "nvidia_h200" / f"{op}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_ROOT / "configs" / "nvidia_h200" / f"{op}.json", path)
    raw = json.loads(path.read_text())
    raw["kernel_hash"] = kernel_hash
    path.write_text(json.dumps(raw, indent=1) + "\n")
    return path, path.read_text()


def test_files_get_the_current_hash_and_entries_whose_code_changed_are_marked(tmp_path, monkeypatch, capsys) -> None:
    root = tmp_path / "configs"
    same, same_text = _stale_copy(root, SAME, BASE_HASH)
    other, other_text = _stale_copy(root, OTHER, BASE_HASH)
    elsewhere, elsewhere_text = _stale_copy(root, ELSEWHERE, "fedcba9876543210")
    marked, _ = _stale_copy(root, MARKED, BASE_HASH)
    raw = json.loads(marked.read_text())
    raw["entries"][0]["source"] = "stale"
    marked.write_text(json.dumps(raw, indent=1) + "\n")
    trees = []

    def digests_in(tree: Path, requests: dict) -> dict:
        trees.append(tree)
        base = tree != restamp.PACKAGE_ROOT
        results = {}
        for key, request in requests.items():
            digests = [f"code {i}" for i in range(len(request["entries"]))]
            if request["op"] == OTHER and not base:
                digests[1] = "other code"
            current = dispatch.spec_hash(REGISTRY[request["op"]])
            results[key] = {"hash": BASE_HASH if base else current, "digests": digests}
        return results

    monkeypatch.setattr(restamp, "digests_in", digests_in)
    monkeypatch.setattr(restamp, "source_at", lambda rev, folder: folder)
    assert restamp.main(["--base", "HEAD~1", "--root", str(root)]) == 1  # three files need a GPU
    assert len(trees) == 2 and trees[1] == restamp.PACKAGE_ROOT

    # the stamped file differs from its stale copy only in the hash line
    stamped = same.read_text().splitlines()
    changed = [(a, b) for a, b in zip(same_text.splitlines(), stamped) if a != b]
    assert changed == [(f' "kernel_hash": "{BASE_HASH}",',
                        f' "kernel_hash": "{dispatch.spec_hash(REGISTRY[SAME])}",')]
    assert len(stamped) == len(same_text.splitlines())
    assert elsewhere.read_text() == elsewhere_text
    # the file with one changed entry: current hash, that entry marked, the others as they were
    stamped_other = json.loads(other.read_text())
    before = json.loads(other_text)
    assert stamped_other["kernel_hash"] == dispatch.spec_hash(REGISTRY[OTHER])
    assert stamped_other["entries"][1] == {**before["entries"][1], "source": "stale"}
    assert [e for i, e in enumerate(stamped_other["entries"]) if i != 1] == [
        e for i, e in enumerate(before["entries"]) if i != 1]
    out = " ".join(capsys.readouterr().out.split())
    assert f"{SAME}.json: its 15 entries generate the same code" in out
    assert f"{OTHER}.json: 1 of its 10 entries generate other code now; 1 marked stale" in out
    # an entry marked before stays marked and the file still needs its GPU, though no code changed this time
    stamped_marked = json.loads(marked.read_text())
    assert stamped_marked["kernel_hash"] == dispatch.spec_hash(REGISTRY[MARKED])
    assert [e.get("source") == "stale" for e in stamped_marked["entries"]] == [
        i == 0 for i in range(len(raw["entries"]))]
    assert f"{MARKED}.json: 0 of its {len(raw['entries'])} entries generate other code now; 1 marked stale" in out
    assert f'run `make autotune ARGS="--revalidate --ops {OTHER}"` on a nvidia_h200 GPU' in out
    assert f"{ELSEWHERE}.json: tuned for kernel source fedcba9876543210, not HEAD~1's ({BASE_HASH}); left stale" in out


def test_nothing_stale_nothing_generated(tmp_path, monkeypatch, capsys) -> None:
    root = tmp_path / "configs"
    shutil.copytree(REPO_ROOT / "configs" / "nvidia_h200", root / "nvidia_h200",
                    ignore=lambda folder, names: [n for n in names if not n.startswith("rms_norm")])
    monkeypatch.setattr(restamp, "digests_in", lambda *_: (_ for _ in ()).throw(AssertionError("generated code")))
    assert restamp.main(["--base", "HEAD", "--root", str(root)]) == 0
    assert "no stale config files" in capsys.readouterr().out


def test_digests_see_a_config_change_not_a_moved_source_line() -> None:
    entries = json.loads((REPO_ROOT / "configs" / "nvidia_h200" / f"{SAME}.json").read_text())["entries"][:2]
    entries.append(dict(entries[0], config={**entries[0]["config"], "num_warps": 1}))
    request = {"file": {"op": SAME, "entries": entries}}
    here = restamp.code_digests(request)["file"]
    assert here["digests"][0] != here["digests"][2] and not any(d.startswith("error") for d in here["digests"])
    # a fresh process on this tree generates the same code
    assert restamp.digests_in(restamp.PACKAGE_ROOT, request) == {"file": here}
    code = "x = 1\n    # src[rope.py:12]: a = b\ny = 2"
    assert restamp._without_source_lines(code) == restamp._without_source_lines(code.replace("12", "40"))
