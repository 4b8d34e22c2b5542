"""``verify``: every unit of a store decoded and checked against the digest it wrote, and
every derived result read back, so that a deleted, truncated or corrupted file is found and
named (``crp-toolkit verify``; ``crp-toolkit analyze`` recomputes the damaged units)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import zarr
from tqdm import tqdm

from crp_toolkit.store.integrity import damaged_chunks
from crp_toolkit.store.results import ROOT
from crp_toolkit.store.zarr_store import Store, check_unit, unit_arrays


@dataclass(frozen=True)
class Verification:
    """What ``verify`` found: the units not yet done, the damaged units with their problems,
    and the damaged chunk files of derived results (recomputed by ``mine``)."""

    path: Path
    units: int
    pending: list[int] = field(default_factory=list)
    damaged: dict[int, list[str]] = field(default_factory=dict)
    derived: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.pending or self.damaged or self.derived)

    def summary(self) -> str:
        """A few readable lines: what is sound, what is damaged, and what to do."""
        lines = [f"store {self.path}: {self.units} units"]
        if self.pending:
            lines.append(f"{len(self.pending)} units not done yet: {_ids(self.pending)}")
        for unit, problems in self.damaged.items():
            lines.append(f"unit {unit} (rows of chunk {unit}) damaged: {'; '.join(problems)}")
        lines += [f"derived result damaged: {problem}" for problem in self.derived]
        if self.pending or self.damaged:
            lines.append(
                "run `crp-toolkit analyze` with the same store.path to compute exactly these units"
            )
        if self.derived:
            lines.append("run `crp-toolkit mine` again to recompute the derived results")
        if self.ok:
            lines.append("every unit is done, decodes, and matches its digest")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "units": self.units,
            "ok": self.ok,
            "pending": self.pending,
            "damaged": {str(k): v for k, v in self.damaged.items()},
            "derived": self.derived,
        }


def _ids(ids: list[int]) -> str:
    return f"{ids[:20]}{' ...' if len(ids) > 20 else ''}"


def damaged_units(store: Store, units, progress: bool = False) -> dict[int, list[str]]:
    """The problems of each damaged unit among ``units`` (finished ones), read and checked."""
    layout, found = store.layout, {}
    arrays = unit_arrays(store.group, layout)
    for unit in tqdm(units, desc="verify", unit="chunk", disable=not progress, leave=False):
        problems = check_unit(store.group, store.path, layout, unit, arrays)
        if problems:
            found[unit] = problems
    return found


def _derived_problems(store: Store) -> list[str]:
    if ROOT not in store.group:
        return []
    problems = []
    for _, node in store.group[ROOT].members(max_depth=None):
        if isinstance(node, zarr.Array):
            problems += damaged_chunks(node, store.path)
    return problems


def verify(path: str | Path, progress: bool = False) -> Verification:
    """Check every unit of the store at ``path`` (files present, zstd checksums, digests) and
    every derived result's chunk files."""
    store = Store(path)
    done = store.group["progress/done"][:]
    finished = [int(i) for i in done.nonzero()[0]]
    return Verification(
        store.path,
        len(done),
        pending=[int(i) for i in (~done).nonzero()[0]],
        damaged=damaged_units(store, finished, progress),
        derived=_derived_problems(store),
    )
