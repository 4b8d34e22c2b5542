"""The ``atlas`` stage: figures (``figures/``) and the static HTML atlas (``atlas/index.html``)
from a mined store. Mining results are read back from the store (``derived/``); what the mine
stage did not keep (it was not run, or for other concepts) is computed here and kept too."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset
from tqdm import tqdm

import crp_toolkit as ct
from crp_toolkit.app.context import Loaded, class_names, open_study
from crp_toolkit.app.mine import MinedLayer, dataset_relevance, mine_layer
from crp_toolkit.atlas.figures import (
    FigureStyle,
    concept_atlas_figure,
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
    layer_map_figure,
    prototype_figure,
)
from crp_toolkit.atlas.site import (
    ClassEntry,
    ConceptEntry,
    PrototypeEntry,
    SiteContent,
    write_site,
)
from crp_toolkit.atlas.views import ReferenceViews, reference_views
from crp_toolkit.concepts.basis import split_concept_layer
from crp_toolkit.data.loading import gather
from crp_toolkit.mining.ablation import read_ablation
from crp_toolkit.mining.discovery import has_ground_truth
from crp_toolkit.mining.labels import (
    ConceptLabels,
    check_probe_set,
    concept_labels,
    stored_probe_labels,
)
from crp_toolkit.mining.localise import localise_references
from crp_toolkit.mining.references import reference_samples
from crp_toolkit.mining.statistics import (
    top_classes,
    top_concepts,
)
from crp_toolkit.store.bases import layer_concept
from crp_toolkit.store.study import Study
from crp_toolkit.store.tables import Spec

log = logging.getLogger("crp_toolkit")
FIGURE_KEYS = ("width", "dpi", "font_size", "cmap", "palette", "formats")


def atlas(cfg: DictConfig, out: Path, loaded: Loaded | None = None) -> None:
    """Figures of the chosen inputs, of every layer and of its most relevant concepts, and the
    HTML atlas linking them (concept labels from ``atlas.probe`` when given); bars of the
    figures done on stderr. A probe set that cannot label is refused before any figure."""
    probe = probe_set(cfg)
    study = open_study(cfg, out, loaded)
    store, style = study.store, figure_style(cfg)
    graph_layers = checked_graph_layers(cfg, study)
    folder = out / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    names = class_names(study.dataset, store.classes)
    content = SiteContent(title="crp_toolkit concept atlas", concepts=[])
    for layer in store.layers:
        mined = mine_layer(cfg.mining, study, layer, reuse=True, progress=True)
        labels = layer_labels(cfg, study, mined, probe)
        part = layer_pages(
            mined, study, cfg.mining.seed, names, folder, style, labels, graph_layers
        )
        content = SiteContent(
            content.title,
            [*content.concepts, *part.concepts],
            _merge_classes(content.classes, part.classes),
            [*content.prototypes, *part.prototypes],
        )
    input_figures(cfg, study, folder, style)
    log.info("figures in %s", folder)
    if cfg.atlas.html:
        index = write_site(content, out / "atlas")
        log.info("HTML atlas: %s", index)


def probe_set(cfg: DictConfig) -> Dataset | None:
    """The annotated probe set of ``atlas.probe`` (a dataset config), checked: it has named
    masks and at least ``mining.n_refs`` images; None when none is configured."""
    if cfg.atlas.probe is None:
        return None
    probe = instantiate(cfg.atlas.probe)
    check_probe_set(probe)
    if len(probe) < cfg.mining.n_refs:
        raise ValueError(
            f"the probe set atlas.probe has {len(probe)} images, fewer than the "
            f"mining.n_refs={cfg.mining.n_refs} references each concept is labelled by: give "
            "a larger probe set or a smaller mining.n_refs"
        )
    return probe


def checked_graph_layers(cfg: DictConfig, study: Study) -> list[str] | None:
    """``atlas.graph_layers``, refused before any figure when it names a layer the model does
    not have."""
    if cfg.atlas.graph_layers is None:
        return None
    names = study.analyzer.graph.names()
    unknown = [name for name in cfg.atlas.graph_layers if name not in names]
    if unknown:
        raise ValueError(
            f"atlas.graph_layers names layers the model does not have: {unknown}; "
            f"print(analyzer) lists them (here {len(names)}, e.g. {names[:3]})"
        )
    return list(cfg.atlas.graph_layers)


def layer_labels(
    cfg: DictConfig, study: Study, mined: MinedLayer, probe: Dataset | None = None
) -> ConceptLabels | None:
    """Labels of the layer's concepts with references: from the annotated ``probe`` set when
    given (each concept's own RelMax references there, one CRP pass over it; kept in the
    store and reused while the probe set, concepts and references are the same), else from the
    pages' references when the dataset has named masks (else None)."""
    if probe is not None:
        return stored_probe_labels(
            study,
            mined.layer,
            probe,
            OmegaConf.to_yaml(cfg.atlas.probe),
            concepts=mined.concepts,
            n_refs=cfg.mining.n_refs,
            batch_size=cfg.loader.batch_size,
            progress=True,
        )
    if not has_ground_truth(study.dataset):
        return None
    spec = Spec("relevance", cfg.mining.pool, cfg.mining.normalised)
    return concept_labels(
        study, mined.layer, concepts=mined.concepts, n_refs=cfg.mining.n_refs, spec=spec
    )


def figure_style(cfg: DictConfig) -> FigureStyle:
    """The figures' look and formats from the ``atlas`` config group."""
    return FigureStyle(**{k: cfg.atlas[k] for k in FIGURE_KEYS})


def layer_pages(
    mined: MinedLayer,
    study: Study,
    seed: int,
    names: list[str],
    folder: Path,
    style: FigureStyle,
    labels: ConceptLabels | None = None,
    graph_layers: list[str] | None = None,
) -> SiteContent:
    """A layer's figures (map, class importance, prototypes, ablation, concept sheets) and its
    part of the site; with ``labels``, each concept's label on its sheet and entry;
    ``graph_layers``: the layers the sheets' attribution graphs decompose into (None: every
    conv and dense layer)."""
    layer, stats, sim = mined.layer, mined.stats, mined.similarity
    stem = f"{folder / layer}"
    views = reference_views(study, mined.relmax), reference_views(study, mined.actmax)
    thumbs = list(views[0].crops[0])
    chosen = mined.concepts
    fig = layer_map_figure(
        sim.embedding[chosen], thumbs, sim.cluster[chosen], title=layer, style=style
    )
    layer_map = save_figure(fig, f"{stem}_map", style)[0]
    shown = chosen[:12]
    fig = class_importance_figure(
        stats.relevance[:, shown], names, [str(c) for c in shown], title=layer, style=style
    )
    importance = save_figure(fig, f"{stem}_classes", style)[0]
    ablation_page(study, layer, seed, stem, style)
    relevance = dataset_relevance(stats)
    concepts = [
        concept_entry(
            mined,
            views,
            c,
            float(relevance[c]),
            study,
            names,
            folder,
            style,
            labels and labels.of(c),
            graph_layers,
        )
        for c in tqdm(chosen, desc=f"concept sheets {layer}", unit="concept")
    ]
    classes = [
        ClassEntry(
            names[y],
            [
                (layer, int(c), float(stats.relevance[y, c]))
                for c in top_concepts(stats, y, 8)
                if int(c) in chosen
            ],
            [importance, layer_map],
        )
        for y in range(len(names))
    ]
    prototypes = prototype_pages(mined, study, names, folder, style)
    return SiteContent("", concepts, classes, prototypes)


def ablation_page(study: Study, layer: str, seed: int, stem: str, style: FigureStyle) -> None:
    """The layer's ablation curves as a figure, when the mine stage kept them."""
    curves = read_ablation(study, layer, seed)
    if curves is None:
        return
    lines = [
        AblationCurve(o, curves.removed, curves.mean[i]) for i, o in enumerate(curves.orderings)
    ]
    fig = ablation_figure(lines, ylabel="explained logit (relative)", title=layer, style=style)
    save_figure(fig, f"{stem}_ablation", style)


def concept_entry(
    mined: MinedLayer,
    views: tuple[ReferenceViews, ReferenceViews],
    concept: int,
    relevance: float,
    study: Study,
    names: list[str],
    folder: Path,
    style: FigureStyle,
    label: tuple[str, float] | None = None,
    graph_layers: list[str] | None = None,
) -> ConceptEntry:
    """A concept's sheet (RelMax and ActMax crops from ``views``, the classes using it, the
    attribution graph on its best reference, into ``graph_layers``; its label and score when
    given) and its atlas entry."""
    j, layer = mined.column(concept), mined.layer
    used = [
        (names[y], float(mined.stats.usage[concept, y]))
        for y in top_classes(mined.stats, concept, 3)
    ]
    best = int(mined.relmax.samples[0, j])
    x = gather(study.dataset, [best]).images
    target, held = int(mined.relmax.classes[0, j]), layer_concept(study.store, layer)[1]
    graph = ct.attribution_graph(
        study.analyzer,
        x,
        layer,
        concept,
        target=target,
        layers=graph_layers,
        concepts={layer: held},
    )
    relmax, actmax = list(views[0].crops[:, j]), list(views[1].crops[:, j])
    text = f"{label[0]} ({label[1]:.2f})" if label else ""
    title = f"{layer}:{concept}" + (f" - {text}" if text else "")
    sheet = ConceptSheet(title, relmax, actmax, used, graph)
    path = save_figure(
        concept_sheet_figure(sheet, style=style), f"{folder / layer}_{concept}", style
    )
    return ConceptEntry(
        layer,
        concept,
        relevance,
        relmax[0],
        used,
        [path[0]],
        list(views[0].dimmed[:, j]),
        label=text,
    )


def prototype_pages(
    mined: MinedLayer, study: Study, names: list[str], folder: Path, style: FigureStyle
) -> list[PrototypeEntry]:
    """Per class, a figure of its prototypes (nearest samples, mean concept profile), and an
    atlas entry per prototype."""
    protos, layer, entries = mined.prototypes, mined.layer, []
    for y, name in enumerate(tqdm(names, desc=f"prototypes {layer}", unit="class")):
        found = [int(p) for p in np.flatnonzero(protos.weights[y] > 0)]
        if not found:
            continue
        images = {
            p: list(gather(study.dataset, [int(i) for i in protos.nearest[y, p] if i >= 0]).images)
            for p in found
        }
        views = [
            PrototypeView(
                f"{name} #{p} ({protos.weights[y, p]:.0%})", images[p], protos.means[y, p]
            )
            for p in found
        ]
        path = save_figure(
            prototype_figure(views, style=style), f"{folder / layer}_proto_{y}", style
        )
        for p in found:
            profile = protos.means[y, p]
            top = [int(c) for c in np.argsort(-profile)[:5] if int(c) in mined.concepts]
            concepts = [(layer, c, float(profile[c])) for c in top]
            entries.append(
                PrototypeEntry(f"{layer} {name} #{p}", images[p], name, concepts, [path[0]])
            )
    return entries


def input_figures(cfg: DictConfig, study: Study, folder: Path, style: FigureStyle) -> None:
    """For each of ``atlas.inputs``: its glocal explanation and its concept atlas at the first
    layer, with localised references of its top concepts; the same for each learned basis of
    that layer (``glocal_<i>_<basis>``, ``concept_atlas_<i>_<basis>``)."""
    batch = gather(study.dataset, list(cfg.atlas.inputs))
    if not batch.indices:
        return
    store, first = study.store, study.store.layers[0]
    x = batch.images.to(cfg.device)
    expl = ct.analyze(x, study.analyzer)
    layers = [name for name in store.layers if split_concept_layer(name)[0] == first]
    for layer in tqdm(layers, desc="input figures", unit="layer"):
        basis = split_concept_layer(layer)[1]
        suffix = f"_{basis}" if basis else ""
        for i, index, panels, concepts in layer_panels(cfg, study, layer, x, expl, batch):
            title = f"sample {index}" + (f", {layer}" if basis else "")
            fig = glocal_figure(x[i], expl.relevance[i], panels, title=title, style=style)
            save_figure(fig, folder / f"glocal_{index}{suffix}", style)
            names = [p.name for p in panels]
            fig = concept_atlas_figure(
                x[i], concepts.relevance[i], names, [p.references for p in panels], style=style
            )
            save_figure(fig, folder / f"concept_atlas_{index}{suffix}", style)


def layer_panels(cfg: DictConfig, study: Study, layer: str, x, expl, batch):
    """Per input: its position, index, the concept panels of its top concepts of ``layer``
    (channels or a basis) with localised references, and their CRP explanation."""
    model_layer, concept = layer_concept(study.store, layer)
    crp = ct.CRP(study.analyzer, model_layer, ct.TopNFeatures(cfg.atlas.concepts), concept=concept)
    concepts = crp(x, expl.target)
    table = reference_samples(
        study.store,
        layer,
        n_refs=min(cfg.mining.n_refs, 6),
        pool=cfg.mining.pool,
        normalised=cfg.mining.normalised,
    )
    ids = sorted({int(c) for c in concepts.features.flatten()})
    refs = localise_references(study, table, concepts=ids, progress=True)
    shown = reference_views(study, refs).crops
    crops = {c: list(shown[:, j]) for j, c in enumerate(ids)}
    for i, index in enumerate(batch.indices):
        yield i, index, concept_panels(concepts, i, layer, crops), concepts


def _merge_classes(old, new) -> list[ClassEntry]:
    """Class entries of several layers joined by class name."""
    merged = {c.name: c for c in old}
    for c in new:
        if c.name in merged:
            m = merged[c.name]
            c = ClassEntry(c.name, [*m.concepts, *c.concepts], [*m.figures, *c.figures])
        merged[c.name] = c
    return list(merged.values())
