"""Our top-level packages must not shadow an installed distribution's modules.

transformers 5.25 made the Hugging Face `kernels` package a hard dependency and
imports it at start-up; a top-level `kernels/` of ours, first on sys.path, was
imported in its place and every transformers import failed (the reason our
kernels live in `pdkernels/`). pip would also let the two wheels overwrite each
other's files in site-packages.
"""
from __future__ import annotations

import importlib.metadata as md
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _our_top_level_packages() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["packages"]["find"]["include"]
    names = {p.rstrip("*").rstrip(".") for p in patterns}
    return {n for n in names if "." not in n and (ROOT / n / "__init__.py").exists()}


def test_no_top_level_package_of_ours_is_also_an_installed_distributions_module():
    ours = _our_top_level_packages()
    assert "engine" in ours and "pdkernels" in ours   # the pattern list was read
    owners = md.packages_distributions()
    clashes = {name: sorted(set(owners[name]) - {"pdcluster"}) for name in ours if name in owners}
    clashes = {name: dists for name, dists in clashes.items() if dists}
    assert not clashes, f"top-level packages shadowed by installed distributions: {clashes}"


def test_transformers_imports_beside_the_repository_root():
    import subprocess
    import sys
    code = "import transformers.integrations.hub_kernels, transformers; print(transformers.__version__)"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
