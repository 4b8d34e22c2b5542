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


# Hydra's flags that take a value as the next argument (``--cfg job``, ``-cn my_config``)
VALUE_FLAGS = frozenset(
    ["--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn"]
    + ["--config-dir", "-cd", "--experimental-rerun", "--info", "-i"]
)


def split_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """Hydra's flags (``--multirun``, ``--cfg job``: each with its value) apart from the
    ``key=value`` overrides, so the stage can be put between them."""
    flags, rest, i = [], [], 0
    while i < len(args):
        if not args[i].startswith("-"):
            rest.append(args[i])
        else:
            flags.append(args[i])
            value = i + 1 < len(args) and not args[i + 1].startswith("-")
            if args[i] in VALUE_FLAGS and value and "=" not in args[i + 1]:
                flags.append(args[i + 1])
                i += 1
        i += 1
    return flags, rest


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
    flags, rest = split_flags(overrides)
    sys.argv = [sys.argv[0], *flags, f"stage={stage}", *search, *rest]
    matplotlib.use("Agg")  # figures render headless; a library import leaves the backend alone
    _run()


if __name__ == "__main__":
    main()
