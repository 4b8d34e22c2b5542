"""The ``discover`` stage: learn concept bases of a layer from the dataset (``discover.methods``,
K directions each) and make each a concept layer of the store (``features.12@nmf16``) beside
the layer's channels, for mine, atlas and evaluate; a summary in ``discover.json``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from crp_toolkit.app.context import Loaded, open_study
from crp_toolkit.concepts.learning import LearnerOptions, check_method
from crp_toolkit.data.loading import first_readable
from crp_toolkit.store.bases import (
    SamplingOptions,
    analyze_basis,
    check_discovery,
    discover_basis,
    list_bases,
)

log = logging.getLogger("crp_toolkit")


def check_request(cfg: DictConfig, loaded: Loaded) -> None:
    """Refuse a basis the layer cannot hold (K over its channels, a layer not analysed)
    before ``run`` starts the pipeline; one sample through the model gives the channels."""
    d, layers = cfg.discover, list(cfg.concepts.layers)
    layer = d.layer or (layers[0] if layers else None)
    if layer not in layers:
        raise ValueError(
            f"discover.layer={layer!r} is not analysed: it must be one of concepts.layers "
            f"({layers})"
        )
    index = loaded.analyzer.graph.index(layer)
    image = first_readable(loaded.dataset)[None].to(cfg.device)
    with torch.no_grad():
        channels = loaded.analyzer.forward(image, keep=[index]).value(index).shape[1]
    for method in d.methods:
        check_method(method, d.n_concepts, channels)


def discover(cfg: DictConfig, out: Path, loaded: Loaded | None = None) -> None:
    """Every configured basis learned, kept in the store and analysed as a concept layer;
    every request is checked before the first is learned."""
    d = cfg.discover
    if not d.methods:
        raise ValueError(
            "discover has no basis to learn: give discover.methods, e.g. "
            "discover.methods=[nmf,pca] (methods: nmf, pca, dictionary, kmeans, sae)"
        )
    study = open_study(cfg, out, loaded, bases=False)  # it recomputes what bases lost
    layer = d.layer or list(study.store.attrs["layers"])[0]  # the first analysed layer
    sampling = SamplingOptions(d.positions, cfg.loader.batch_size, d.images)
    for method in d.methods:  # all refused before any is learned
        check_discovery(study, layer, method, d.n_concepts, d.source, sampling)
    learner = LearnerOptions(topk=d.sae_topk)
    summary = {}
    for method in d.methods:
        basis = discover_basis(
            study,
            layer,
            method,
            d.n_concepts,
            source=d.source,
            seed=d.seed,
            epochs=d.epochs,
            sampling=sampling,
            learner=learner,
        )
        name = analyze_basis(study, basis, batch_size=cfg.loader.batch_size)
        summary[name] = {"positions_seen": basis.provenance["positions_seen"]}
        log.info("basis %s: %d positions", name, basis.provenance["positions_seen"])
    (out / "discover.json").write_text(json.dumps(summary, indent=2))
    log.info("bases in %s: %s", study.store.path, ", ".join(list_bases(study.store)))
