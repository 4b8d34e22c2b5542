"""Atlas figures from the concept-world CNN: every figure builds from real explanations and
writes decodable PNG, PDF and SVG files; the concept atlas paints each region in the colour
of its dominant concept; attribution-graph edges are as wide as their share."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch
from PIL import Image

import crp_toolkit as ct
from crp_toolkit.atlas.figures import (
    FigureStyle,
    as_rgb,
    atlas_overlay,
    concept_atlas_figure,
    concept_panels,
    dominant_concepts,
    glocal_figure,
    palette_colours,
    save_figure,
    superpixels,
)
from crp_toolkit.atlas.sheets import (
    AblationCurve,
    ConceptSheet,
    PrototypeView,
    ablation_figure,
    class_importance_figure,
    concept_sheet_figure,
    layer_map_figure,
    prototype_figure,
    tree_layout,
)
from crp_toolkit.data.training import load_world_model
from crp_toolkit.data.world import CLASSES, ConceptWorld

ALL = FigureStyle(formats=("png", "pdf", "svg"), dpi=60)
LAYER = "features.12"


@pytest.fixture(scope="module")
def world():
    """Eight test images, their LRP relevance, CRP of the top 3 concepts of features.12 and
    an attribution graph of the first image's top concept."""
    w = ConceptWorld(n=8, seed=1)
    x = torch.stack([w[i][0] for i in range(8)])
    analyzer = ct.LRP(ct.canonize(load_world_model()), ct.composites.EpsilonPlusFlat())
    crp = ct.analyze(x, ct.CRP(analyzer, LAYER, ct.TopNFeatures(3)))
    graph = ct.attribution_graph(analyzer, x[:1], LAYER, int(crp.features[0, 0]), widths=(2, 2))
    return x, ct.analyze(x, analyzer).relevance, crp, graph


def check_files(paths, stem) -> None:
    """PNG, PDF and SVG files named after ``stem``, each non-empty and decodable."""
    assert [p.name for p in paths] == [f"{stem.name}.{f}" for f in ("png", "pdf", "svg")]
    with Image.open(paths[0]) as png:
        png.load()
        assert png.format == "PNG" and min(png.size) > 50
    pdf = paths[1].read_bytes()
    assert pdf.startswith(b"%PDF") and pdf.rstrip().endswith(b"%%EOF")
    assert ET.parse(paths[2]).getroot().tag.endswith("svg")


def test_style_validates_its_fields():
    assert FigureStyle(formats=["png", "svg"]).formats == ("png", "svg")  # lists from Hydra
    with pytest.raises(ValueError, match="formats"):
        FigureStyle(formats=("png", "bmp"))
    with pytest.raises(ValueError, match="colour map"):
        FigureStyle(cmap="no-such-map")
    with pytest.raises(ValueError, match="positive"):
        FigureStyle(dpi=0)


def test_glocal_figure(world, tmp_path):
    x, relevance, crp, _ = world
    refs = {int(c): list(x[4:8]) for c in crp.features[0]}
    panels = concept_panels(crp, 0, LAYER, refs)
    shares = crp.scores[0, crp.features[0]] / crp.scores[0].abs().sum()
    assert [p.share for p in panels] == pytest.approx(shares.tolist())
    assert [p.name for p in panels] == [f"{LAYER}:{int(c)}" for c in crp.features[0]]
    fig = glocal_figure(x[0], relevance[0], panels, style=ALL)
    assert len(fig.axes) == 2 + 3 * (1 + 4)
    stem = tmp_path / f"glocal_{LAYER}"
    check_files(save_figure(fig, stem, ALL), stem)


def test_dominant_concepts_paint_their_regions():
    image = np.full((20, 20, 3), 0.5)
    segments = np.zeros((20, 20), dtype=int)
    segments[:, 10:] = 1
    segments[15:, :5] = 2  # a corner with no relevance
    maps = np.zeros((3, 20, 20))
    maps[0, :15, :10] = 1.0  # concept 0 owns the left
    maps[1, :, 10:] = 0.5  # concept 1 the right, where concept 2 is weaker
    maps[2, :, 10:] = 0.2
    maps[2, :15, :10] = 0.4
    assert dominant_concepts(segments, maps).tolist() == [0, 1, -1]
    colours = palette_colours(3)
    overlay = atlas_overlay(image, segments, np.array([0, 1, -1]), colours, alpha=0.6)
    assert overlay[5, 3] == pytest.approx(0.4 * 0.5 + 0.6 * colours[0])
    assert overlay[5, 15] == pytest.approx(0.4 * 0.5 + 0.6 * colours[1])
    assert overlay[18, 1] == pytest.approx(image[18, 1])  # unpainted
    fig = concept_atlas_figure(image, maps, ["a", "b", "c"], segments=segments)
    shown = fig.axes[0].images[0].get_array()
    assert np.asarray(shown) == pytest.approx(overlay)
    areas = [ax.get_title() for ax in fig.axes[1:]]  # shares of the 375 painted pixels
    assert areas == ["a (47%)", "b (53%)", "c (0%)"]
    with pytest.raises(ValueError, match="differ in size"):
        dominant_concepts(segments[:10], maps)


def test_concept_atlas_of_a_real_input(world, tmp_path):
    x, _, crp, _ = world
    maps = crp.relevance[0].sum(1).numpy()
    segments = superpixels(x[0])
    assert segments.shape == (64, 64) and segments.max() > 10  # noise does not fuse regions
    dominant = dominant_concepts(segments, maps, min_share=0.0)
    for region in range(segments.max() + 1):  # brute force: the largest summed relevance
        sums = maps[:, segments == region].sum(1)
        assert dominant[region] == (sums.argmax() if sums.max() > 0 else -1)
    names = [f"{LAYER}:{int(c)}" for c in crp.features[0]]
    fig = concept_atlas_figure(x[0], crp.relevance[0], names, [list(x[5:8])] * 3, style=ALL)
    stem = tmp_path / "atlas"
    check_files(save_figure(fig, stem, ALL), stem)


def test_concept_sheet_with_attribution_graph(world, tmp_path):
    x, _, crp, graph = world
    pos = tree_layout(graph)
    assert set(pos) == set(graph.nodes) and pos[graph.root][1] == 0
    assert all(pos[child][1] >= pos[parent][1] - 1 for parent, child, _ in graph.edges)
    classes = [(CLASSES[k], float(v)) for k, v in enumerate(crp.scores[:6, 0])]
    sheet = ConceptSheet(str(graph.root), list(x[:4]), list(x[4:8]), classes, graph)
    fig = concept_sheet_figure(sheet, style=ALL)
    graph_ax = fig.axes[-1]
    widths = [line.get_linewidth() for line in graph_ax.lines]
    assert widths == pytest.approx([max(0.3, 8.0 * abs(f)) for _, _, f in graph.edges])
    stem = tmp_path / "sheet"
    check_files(save_figure(fig, stem, ALL), stem)
    with pytest.raises(ValueError, match="RelMax"):
        concept_sheet_figure(ConceptSheet("empty", []))


def test_layer_map_importance_and_prototypes(world, tmp_path):
    x, _, crp, _ = world
    scores = crp.scores.numpy()  # (8 samples, 64 concepts)
    centred = scores.T - scores.T.mean(0)
    embedding = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T
    clusters = (embedding[:, 0] > np.median(embedding[:, 0])).astype(int)
    clusters[0] = -1
    thumbs = [x[i % 8] for i in range(len(embedding))]
    fig = layer_map_figure(embedding, thumbs, clusters, title=LAYER, style=ALL)
    boxes = [a for a in fig.axes[0].artists if hasattr(a, "offsetbox")]
    assert len(boxes) == len(embedding)
    frame = boxes[1].patch.get_edgecolor()[:3]
    assert frame == pytest.approx(tuple(palette_colours(2)[clusters[1]]))
    check_files(save_figure(fig, tmp_path / "map", ALL), tmp_path / "map")

    top = np.argsort(-scores.sum(0))[:5]
    targets = crp.target.numpy()
    present = sorted(set(targets.tolist()))
    importance = np.stack([scores[targets == k][:, top].mean(0) for k in present])
    fig = class_importance_figure(
        importance, [CLASSES[k] for k in present], [f"{LAYER}:{c}" for c in top], style=ALL
    )
    assert np.asarray(fig.axes[0].images[0].get_array()) == pytest.approx(importance)
    check_files(save_figure(fig, tmp_path / "classes", ALL), tmp_path / "classes")

    protos = [
        PrototypeView(f"p{k}", list(x[targets == k]), scores[targets == k].mean(0))
        for k in present[:2]
    ]
    fig = prototype_figure(protos, style=ALL)
    check_files(save_figure(fig, tmp_path / "protos", ALL), tmp_path / "protos")
    with pytest.raises(ValueError, match="same number"):
        prototype_figure([protos[0], PrototypeView("short", [x[0]], np.ones(3))])


def test_ablation_curves_and_their_auc(tmp_path):
    x = np.linspace(0, 1, 11)
    linear = AblationCurve("random", x, 1 - x, spread=np.full(11, 0.05))
    assert linear.auc == pytest.approx(0.5)
    assert AblationCurve("steps", x * 10, 1 - x).auc == pytest.approx(0.5)  # unit-free
    fast = AblationCurve("relevance", x, np.exp(-5 * x))
    fig = ablation_figure([fast, linear], style=ALL)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == [f"relevance (AUC {fast.auc:.3g})", "random (AUC 0.5)"]
    check_files(save_figure(fig, tmp_path / "ablation", ALL), tmp_path / "ablation")
    with pytest.raises(ValueError, match="increase"):
        AblationCurve("bad", x[::-1], x)
    with pytest.raises(ValueError, match="equal length"):
        AblationCurve("bad", x, x[:5])


def test_images_in_any_layout_become_rgb():
    chw = torch.rand(3, 5, 7)
    assert as_rgb(chw) == pytest.approx(chw.permute(1, 2, 0).numpy())
    assert as_rgb(np.full((5, 7), 255, np.uint8)) == pytest.approx(np.ones((5, 7, 3)))
    with pytest.raises(ValueError, match="an image must be"):
        as_rgb(np.zeros((5, 7, 2)))
