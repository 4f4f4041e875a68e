"""An installed (non-editable) wheel finds the configs shipped inside it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT

# A config file added to the copy that is built, so the wheel ships at least one even before the
# real configs are generated; the installed package must list it like any shipped file.
PROBE = Path("wheel_probe_device") / "rms_norm.json"
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".whl", ".scratch",
                                     ".hypothesis", ".pytest_cache")


def _run(*command: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_installed_wheel_finds_shipped_configs(tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT, source, ignore=NOT_SOURCES)
    (source / "configs" / PROBE).parent.mkdir(parents=True, exist_ok=True)
    (source / "configs" / PROBE).write_text("{}\n")
    shipped = sorted(str(p.relative_to(source / "configs")) for p in (source / "configs").glob("*/*.json"))

    wheels = tmp_path / "wheels"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), ".",
         cwd=source)
    [wheel] = wheels.glob("*.whl")
    site = tmp_path / "site"
    _run(sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel), cwd=tmp_path)

    probe = (
        "import json\n"
        "from helion_fusions.runtime import config_store\n"
        "root = config_store.config_root()\n"
        "print(json.dumps({'root': str(root), 'module': config_store.__file__,\n"
        "                  'files': sorted(str(p.relative_to(root)) for p in root.glob('*/*.json'))}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HELION_FUSIONS_CONFIG_DIR")}
    env["PYTHONPATH"] = str(site)
    found = json.loads(_run(sys.executable, "-c", probe, cwd=tmp_path, env=env).strip().splitlines()[-1])

    assert Path(found["module"]).resolve().is_relative_to(site.resolve()), "imported the checkout, not the wheel"
    root = Path(found["root"])
    assert root.is_absolute() and root.resolve().is_relative_to(site.resolve()), found["root"]
    assert found["files"] == shipped
