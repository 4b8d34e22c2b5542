"""``crp-toolkit <stage> [hydra overrides]``: runs one stage of the pipeline with Hydra.

The default configs ship inside the package (``crp_toolkit/conf``); a ``conf/`` folder in the
working directory is searched too, so experiment configs there can extend them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import matplotlib
from omegaconf import DictConfig

from crp_toolkit.app.schema import STAGES, register

USAGE = f"usage: crp-toolkit <stage> [key=value ...]   stages: {', '.join(STAGES)}"


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def _run(cfg: DictConfig) -> None:
    from crp_toolkit.app import stages

    stages.run(cfg)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        sys.exit(0 if argv else 2)
    stage, overrides = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"unknown stage {stage!r}. {USAGE}", file=sys.stderr)
        sys.exit(2)
    register()
    search = (
        [f"hydra.searchpath=[file://{Path.cwd() / 'conf'}]"]
        if (Path.cwd() / "conf").is_dir()
        else []
    )
    flags = [a for a in overrides if a.startswith("-")]  # --multirun, --cfg job, ...
    rest = [a for a in overrides if not a.startswith("-")]
    sys.argv = [sys.argv[0], *flags, f"stage={stage}", *search, *rest]
    matplotlib.use("Agg")  # figures render headless; a library import leaves the backend alone
    _run()


if __name__ == "__main__":
    main()
