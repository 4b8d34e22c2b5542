"""Every ```python block of README.md runs, in order, sharing one namespace per ``## ``
section, in a temporary working directory.

The blocks run as written but for one substitution, to keep them fast: 224x224 inputs become
32x32 (VGG16's features then end at 1x1). The test writes the local ``vgg16.pth`` they load
(random weights), and gives every section what the README's prose says a reader has after
``crp-toolkit analyze``: a ``store`` (120 concept-world images, layer features.12), the
``analyzer`` and ``dataset`` it was made from, and the ``description`` it was made with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import ROOT

import crp_toolkit as ct
from crp_toolkit.data.training import load_world_model
from crp_toolkit.data.world import ConceptWorld
from crp_toolkit.store.analysis import analyze_dataset
from crp_toolkit.store.zarr_store import StoreOptions

README = ROOT / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.M | re.S)
HEADING = re.compile(r"^## (.+)$", re.M)
SMALLER = ("224, 224", "32, 32")


@dataclass(frozen=True)
class Block:
    """A python block: its code and the README line it starts on."""

    code: str
    line: int


def python_blocks(text: str) -> dict[str, list[Block]]:
    """The python blocks of each ``## `` section that has some, keyed by its title."""
    headings = [(m.start(), m.group(1)) for m in HEADING.finditer(text)]
    sections: dict[str, list[Block]] = {}
    for m in BLOCK.finditer(text):
        title = next(t for start, t in reversed(headings) if start < m.start())
        line = text.count("\n", 0, m.start(1)) + 1
        sections.setdefault(title, []).append(Block(m.group(1), line))
    return sections


SECTIONS = python_blocks(README.read_text())


def run_block(block: Block, namespace: dict) -> None:
    """Execute a block (made smaller) so that tracebacks name its README lines."""
    code = "\n" * (block.line - 1) + block.code.replace(*SMALLER)
    exec(compile(code, str(README), "exec"), namespace)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A working directory holding the VGG16 weights the quickstart loads."""
    path = tmp_path_factory.mktemp("readme")
    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), path / "vgg16.pth")
    return path


@pytest.fixture(scope="module")
def given(tmp_path_factory) -> dict:
    """A real store of the concept world and what it was made from."""
    dataset = ConceptWorld(n=120, seed=1)
    analyzer = ct.LRP(ct.canonize(load_world_model()), ct.composites.EpsilonPlusFlat())
    description = "the concept world, 120 test images"
    path = tmp_path_factory.mktemp("store") / "world.zarr"
    analyze_dataset(
        analyzer,
        dataset,
        ["features.12"],
        path,
        dataset_description=description,
        progress=False,
        options=StoreOptions(chunk=40),
    )
    store = ct.store.open(path)
    return {"store": store, "analyzer": analyzer, "dataset": dataset, "description": description}


def test_every_python_block_is_found():
    found = sum(len(blocks) for blocks in SECTIONS.values())
    assert found == README.read_text().count("```python") > 0


@pytest.mark.parametrize("section", list(SECTIONS))
def test_the_python_blocks_of_a_section_run(section, workdir, given, monkeypatch):
    monkeypatch.chdir(workdir)
    namespace = dict(given)
    for block in SECTIONS[section]:
        run_block(block, namespace)
