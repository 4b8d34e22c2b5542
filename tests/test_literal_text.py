"""User strings in figures (class, concept and layer names, titles, labels) are shown as given:
"$" is never read as matplotlib math, neither by the atlas functions nor on the command line."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from conftest import TINY_MINING, cli
from PIL import Image

import crp_toolkit as ct
from crp_toolkit.atlas.figures import (
    FigureStyle,
    concept_atlas_figure,
    concept_figure,
    concept_panels,
    glocal_figure,
    save_figure,
)
from crp_toolkit.atlas.sheets import (
    AblationCurve,
    ConceptSheet,
    PrototypeView,
    ablation_figure,
    class_importance_figure,
    concept_sheet_figure,
    grouped_bars_figure,
    layer_map_figure,
    prototype_figure,
)
from crp_toolkit.concepts.attribution_graph import AttributionGraph, ConceptNode
from crp_toolkit.data.training import load_world_model
from crp_toolkit.data.world import ConceptWorld

# math, unbalanced, a mathtext error, prices, an escaped dollar, TeX without dollars; sorted as
# ImageFolder sorts its class folders, so that folder k holds the concept world's class k
NAMES = ("a$x$", "b$", "c$^$", "d $5 $10", r"e\$f", "f_1^2")
LAYER = "lay$^$er"
STYLE = FigureStyle(formats=("png", "svg"), dpi=50)


@pytest.fixture(scope="module")
def crp():
    """Two concept-world images and CRP of their top 2 concepts of features.12."""
    world = ConceptWorld(n=2, seed=1)
    x = torch.stack([world[i][0] for i in range(2)])
    analyzer = ct.LRP(ct.canonize(load_world_model()), ct.composites.EpsilonPlusFlat())
    return x, ct.analyze(x, ct.CRP(analyzer, "features.12", ct.TopNFeatures(2)))


def svg_texts(path: Path) -> str:
    """The text elements of an SVG file (saved with ``svg.fonttype: none``), one a line."""
    root = ET.parse(path).getroot()
    return "\n".join("".join(t.itertext()) for t in root.iter("{http://www.w3.org/2000/svg}text"))


def saved_texts(fig, stem: Path) -> str:
    """``fig`` saved as PNG (checked decodable) and as SVG keeping text as text; its texts."""
    with plt.rc_context({"svg.fonttype": "none"}):
        png, svg = save_figure(fig, stem, STYLE)
    with Image.open(png) as image:
        image.load()
        assert min(image.size) > 20
    return svg_texts(svg)


def pictures(n: int) -> list[np.ndarray]:
    return list(np.random.default_rng(n).random((n, 8, 8, 3)))


def input_figures(x, expl) -> dict:
    """The figures of inputs, each with the strings it must show as given."""
    titles = [f"{a} -> {b}" for a, b in zip(NAMES, NAMES[2:4])]
    panels = concept_panels(expl, 0, LAYER, {int(c): pictures(2) for c in expl.features[0]})
    shares = [f"{p.name} ({p.share:.0%})" for p in panels]
    names = [f"{NAMES[2]} {j}" for j in range(2)]
    return {
        "heatmap": (ct.heatmap_figure(expl.relevance[:, 0], inputs=x, titles=titles), titles),
        "concepts": (concept_figure(x, expl, LAYER), [f"{LAYER}:{int(expl.features[0, 0])}"]),
        "glocal": (glocal_figure(x[0], expl.relevance[0, 0], panels, title=NAMES[3]), shares),
        "atlas": (concept_atlas_figure(x[0], expl.relevance[0], names, style=STYLE), names),
    }


def sheet_figures() -> dict:
    """The dataset-level figures, each with the strings it must show as given."""
    root, child = ConceptNode(LAYER, 0), ConceptNode("b$y$", 1)
    graph = AttributionGraph(root, 0, {root: 1.0, child: 0.6}, [(root, child, 0.6)])
    classes = list(zip(NAMES, np.linspace(1, -0.5, len(NAMES))))
    sheet = ConceptSheet(f"{LAYER}:0", pictures(4), pictures(4), classes, graph)
    concepts = ["k$1$", "k$2", "k$^$"]
    importance = np.random.default_rng(1).normal(size=(len(NAMES), 3))
    protos = [PrototypeView(f"{name} #0", pictures(2), [3.0, 2.0, 1.0]) for name in NAMES[:2]]
    curve = AblationCurve(NAMES[2], [0, 1, 2], [1.0, 0.5, 0.2])
    bars = {NAMES[3]: {NAMES[0]: np.full(3, 0.5), NAMES[1]: np.full(3, 0.7)}}
    return {
        "sheet": (concept_sheet_figure(sheet, style=STYLE), [sheet.name, *NAMES, "b$y$"]),
        "map": (
            layer_map_figure(np.eye(3, 2), pictures(3), [0, 1, -1], title=LAYER, style=STYLE),
            [LAYER],
        ),
        "classes": (
            class_importance_figure(importance, NAMES, concepts, title=LAYER, style=STYLE),
            [*NAMES, *concepts, LAYER],
        ),
        "prototypes": (
            prototype_figure(protos, concept_names=concepts, top=2, style=STYLE),
            [p.name for p in protos] + concepts[:2],
        ),
        "ablation": (
            ablation_figure([curve], xlabel=NAMES[0], ylabel=NAMES[1], title=LAYER, style=STYLE),
            [NAMES[0], NAMES[1], LAYER, f"{curve.label} (AUC"],
        ),
        "bars": (grouped_bars_figure(NAMES[:3], bars, style=STYLE), NAMES[:4]),
    }


def test_every_atlas_figure_shows_its_strings_as_given(crp, tmp_path):
    made = {**input_figures(*crp), **sheet_figures()}
    for name, (fig, strings) in made.items():
        texts = saved_texts(fig, tmp_path / name)
        missing = [s for s in strings if s not in texts]
        assert not missing, f"{name}: {missing} not shown as given in {texts!r}"


def image_folder(root: Path, per_class: int = 3) -> Path:
    """Concept-world images in class folders named ``NAMES``."""
    world = ConceptWorld(n=len(NAMES) * per_class * 4, seed=5)
    written = dict.fromkeys(range(len(NAMES)), 0)
    for i in range(len(world)):
        sample = world.sample(i)
        if written[sample.label] < per_class:
            folder = root / NAMES[sample.label]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (sample.image.transpose(1, 2, 0) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
            written[sample.label] += 1
    return root


def test_class_names_with_dollars_go_through_explain_and_the_atlas(tmp_path, monkeypatch):
    """explain, analyze, mine and atlas of an ImageFolder whose class names hold "$"."""
    rc = tmp_path / "matplotlibrc"
    rc.write_text("svg.fonttype: none\n")  # SVG text as text, to be read back
    monkeypatch.setenv("MATPLOTLIBRC", str(rc))
    out = tmp_path / "run"
    run = cli(
        "run",
        f"hydra.run.dir={out}",
        "dataset=image_folder",
        f"dataset.root={image_folder(tmp_path / 'data')}",
        "dataset.resize=64",
        "dataset.crop=64",
        "dataset.mean=[0,0,0]",
        "dataset.std=[1,1,1]",
        "explain.indices=[0,3,6,9]",
        "concepts.layers=[features.12]",
        "store.chunk=9",
        *TINY_MINING,
        "atlas.inputs=[6]",
        "atlas.concepts=2",
        "atlas.formats=[svg]",
    )
    assert run.returncode == 0, run.stderr
    assert Image.open(out / "heatmaps.png").size[0] > 100  # titled "c$^$ -> c$^$" among others
    texts = svg_texts(out / "figures" / "features.12_classes.svg")
    assert all(name in texts for name in NAMES), texts
    assert "c$^$ #0" in svg_texts(out / "figures" / "features.12_proto_2.svg")
