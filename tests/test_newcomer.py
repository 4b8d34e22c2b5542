"""What a newcomer meets first: a clone without ../shared beside it (tests needing the
FashionMNIST fixture skip, naming it, except under CI), ``import crp_toolkit`` without side
effects (no matplotlib, skimage or zarr loaded, no matplotlib backend chosen), and the
promised names, lazy ones included, with the public modules composites, rules and ops."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

import crp_toolkit as ct

# A cheap test file with one test that reads the fixture and one that does not; the
# subprocess runs only it, never this file, so it cannot start itself again.
FIXTURE_USER = "tests/test_heatmap.py"


def _pytest_without_fixture(shared: Path, ci: bool) -> subprocess.CompletedProcess:
    """pytest on FIXTURE_USER with CRP_TOOLKIT_SHARED naming an empty folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    env["CRP_TOOLKIT_SHARED"] = str(shared)
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", FIXTURE_USER],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_without_the_fixture_its_tests_skip_naming_the_missing_path(tmp_path):
    run = _pytest_without_fixture(tmp_path, ci=False)
    assert run.returncode == 0, run.stdout + run.stderr
    missing = re.escape(f"FashionMNIST fixture missing: {tmp_path / 'data' / 'fashion'}")
    assert re.search(rf"^SKIPPED \[\d+\] \S+: {missing}$", run.stdout, re.M), run.stdout


def test_under_ci_a_missing_fixture_fails_its_tests(tmp_path):
    run = _pytest_without_fixture(tmp_path, ci=True)
    assert run.returncode != 0
    assert "skipped" not in run.stdout
    assert f"FashionMNIST fixture missing: {tmp_path / 'data' / 'fashion'}" in run.stdout


def _fresh_python(code: str) -> str:
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_importing_the_package_loads_no_matplotlib_skimage_or_zarr():
    loaded = _fresh_python(
        "import sys, crp_toolkit\n"
        "print(sorted(m for m in ('matplotlib', 'skimage', 'zarr') if m in sys.modules))"
    )
    assert loaded == "[]"


def test_the_figures_leave_the_users_matplotlib_backend_alone():
    backend = _fresh_python(
        "import matplotlib\n"
        "matplotlib.use('svg')\n"
        "import torch, crp_toolkit as ct, crp_toolkit.atlas\n"
        "ct.heatmap_figure(torch.rand(1, 1, 8, 8))\n"
        "print(matplotlib.get_backend())"
    )
    assert backend == "svg"


def test_every_promised_name_is_there_and_listed():
    from crp_toolkit import composites, rules, store

    heatmap = importlib.import_module("crp_toolkit.atlas.heatmap")  # the module, not the function
    assert ct.store is store and ct.store.open is store.zarr_store.open
    assert ct.heatmap is heatmap.heatmap and ct.save_heatmaps is heatmap.save_heatmaps
    assert ct.composites is composites and ct.rules is rules
    for name in ct.__all__:
        assert getattr(ct, name) is not None and name in dir(ct)
    namespace: dict = {}
    exec("from crp_toolkit import *", namespace)
    assert set(ct.__all__) <= set(namespace)


def _public_names(module) -> set[str]:
    """The public names of a module: its ``__all__``, else what its own source binds at top
    level (not what it imports)."""
    if hasattr(module, "__all__"):
        return set(module.__all__)
    tree = ast.parse(Path(module.__file__).read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_")}


@pytest.mark.parametrize("name", ["composites", "rules", "ops"])
def test_the_public_modules_export_every_public_name_of_the_engine(name):
    public = importlib.import_module(f"crp_toolkit.{name}")
    engine = importlib.import_module(f"crp_toolkit.engine.{name}")
    assert getattr(ct, name) is public
    assert set(public.__all__) == _public_names(engine)
    assert all(getattr(public, n) is getattr(engine, n) for n in public.__all__)
