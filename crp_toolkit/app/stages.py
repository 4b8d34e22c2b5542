"""The dispatcher: runs the configured stage (each stage a module of its own, taking the
resolved config and writing into the run's output directory), or all of them in order."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from crp_toolkit.app.analyze import analyze
from crp_toolkit.app.atlas import atlas, probe_set
from crp_toolkit.app.context import claim_output, load
from crp_toolkit.app.discover import check_request, discover
from crp_toolkit.app.evaluate import evaluate
from crp_toolkit.app.explain import explain
from crp_toolkit.app.mine import mine
from crp_toolkit.app.schema import PIPELINE, check_config
from crp_toolkit.app.verify import verify
from crp_toolkit.mining.discovery import has_ground_truth

log = logging.getLogger("crp_toolkit")

RUNNERS = {
    "explain": explain,
    "analyze": analyze,
    "discover": discover,
    "mine": mine,
    "atlas": atlas,
    "evaluate": evaluate,
    "verify": verify,
}


def run(cfg: DictConfig) -> None:
    """Run the configured stage (``run``: every stage of the pipeline, in order)."""
    check_config(cfg)  # every bad value refused before any work
    out = Path(HydraConfig.get().runtime.output_dir)
    claim_output(out)
    if cfg.stage != "run":
        RUNNERS[cfg.stage](cfg, out)
    else:
        loaded = load(cfg)  # model, dataset and analyzer made once for every stage
        if cfg.discover.methods:
            check_request(cfg, loaded)  # a basis the layer cannot hold: refused before work
        probe_set(cfg)  # a probe set that cannot label: refused before work
        for name in PIPELINE:
            if name == "evaluate" and not has_ground_truth(loaded.dataset):
                log.info("evaluate skipped: the dataset has no ground-truth concepts")
                continue
            if name == "discover" and not cfg.discover.methods:
                continue  # no basis configured: the layers' channels only
            log.info("stage %s", name)
            RUNNERS[name](cfg, out, loaded)
    print(f"results in {out}")
