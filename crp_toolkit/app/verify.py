"""The ``verify`` stage: every unit of the store, and of its learned bases' concept layers,
decoded and checked against its digest; the stored bases and other derived results read back."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

from crp_toolkit.app.context import Loaded, store_path
from crp_toolkit.store.verify import verify as verify_store


def verify(cfg: DictConfig, out: Path, loaded: Loaded | None = None) -> None:
    """Decode every unit of the store and check it against its digest; name what is damaged
    (``verify.json``), failing when anything is."""
    path = store_path(cfg, out)
    if not (path / "zarr.json").exists():
        raise FileNotFoundError(f"there is no dataset store at {path}: give store.path=...")
    found = verify_store(path, progress=True)
    (out / "verify.json").write_text(json.dumps(found.to_dict(), indent=2))
    print(found.summary())
    if not found.ok:
        raise RuntimeError(f"the store at {path} is not sound; see {out / 'verify.json'}")
