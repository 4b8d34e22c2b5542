"""``verify``: every unit of a store decoded and checked against the digest it wrote (those of
the dataset pass and those of every learned basis's concept layer), and every derived result
read back (the stored bases among them), so that a deleted, truncated or corrupted file is
found and named, with the stage that recomputes it (``crp-toolkit verify``): ``analyze`` for
the dataset pass's units, ``discover`` (with the basis's settings) for a concept layer's units
and a stored basis, ``mine`` for the other derived results."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import zarr
from tqdm import tqdm

from crp_toolkit.concepts.basis import concept_layer, split_concept_layer
from crp_toolkit.store.concept_layers import concept_layer_names, discover_overrides, unit_states
from crp_toolkit.store.integrity import damaged_chunks
from crp_toolkit.store.results import ROOT
from crp_toolkit.store.zarr_store import Store, check_unit, unit_arrays

BASES = f"{ROOT}/bases/"  # where the stored bases live (``crp_toolkit.store.bases``)


@dataclass(frozen=True)
class Verification:
    """What ``verify`` found: the units not yet done, the damaged units with their problems,
    the damaged chunk files of derived results (recomputed by ``mine``); per concept layer of
    a learned basis, its units not done or damaged, and the damaged files of its stored basis;
    per concept layer to recompute, the ``crp-toolkit discover`` overrides that do it
    (``rerun``; empty when the basis's settings cannot be read)."""

    path: Path
    units: int
    pending: list[int] = field(default_factory=list)
    damaged: dict[int, list[str]] = field(default_factory=dict)
    derived: list[str] = field(default_factory=list)
    concept_layers: dict[str, dict[int, list[str]]] = field(default_factory=dict)
    bases: dict[str, list[str]] = field(default_factory=dict)
    rerun: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not (self.pending or self.damaged or self.derived or self.to_discover)

    @property
    def to_discover(self) -> list[str]:
        """The concept layers whose units or stored basis must be recomputed."""
        return sorted({*self.concept_layers, *self.bases})

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
        lines += self._concept_lines()
        if self.ok:
            lines.append("every unit is done, decodes, and matches its digest")
        return "\n".join(lines)

    def _concept_lines(self) -> list[str]:
        lines = []
        for name in self.to_discover:
            for unit, problems in self.concept_layers.get(name, {}).items():
                lines.append(f"concept layer {name}, unit {unit}: {'; '.join(problems)}")
            lines += [f"basis of {name} damaged: {problem}" for problem in self.bases.get(name, [])]
            settings = " ".join(self.rerun.get(name, [])) or "<the settings that made it>"
            lines.append(
                f"run `crp-toolkit discover store.path={self.path} {settings}` (with the model "
                f"and dataset the store was made with) to recompute {name}: its basis (when "
                "damaged) and exactly these units"
            )
        return lines

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "units": self.units,
            "ok": self.ok,
            "pending": self.pending,
            "damaged": {str(k): v for k, v in self.damaged.items()},
            "derived": self.derived,
            "concept_layers": {
                name: {str(k): v for k, v in units.items()}
                for name, units in self.concept_layers.items()
            },
            "bases": self.bases,
            "rerun": self.rerun,
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


def _derived_problems(store: Store) -> tuple[list[str], dict[str, list[str]]]:
    """The damaged chunk files of derived results: of the stored bases (by concept layer),
    and of the others."""
    if ROOT not in store.group:
        return [], {}
    problems, bases = [], {}
    for _, node in store.group[ROOT].members(max_depth=None):
        if isinstance(node, zarr.Array):
            found = damaged_chunks(node, store.path)
            if found and node.path.startswith(BASES):
                layer, name = node.path[len(BASES) :].rsplit("/", 2)[:2]
                bases.setdefault(concept_layer(layer, name), []).extend(found)
            else:
                problems += found
    return problems, bases


def concept_layer_problems(store: Store) -> dict[str, dict[int, list[str]]]:
    """Per concept layer of the store (finished or not), its units not done or damaged."""
    found = {}
    for name in concept_layer_names(store.group):
        units = unit_states(store.group, store.path, name, store.layout)
        if units:
            found[name] = units
    return found


def rerun_settings(store: Store, names: list[str]) -> dict[str, list[str]]:
    """Per concept layer, the discover overrides that learn its basis again (from the key
    the stored basis keeps in its attributes; none when they cannot be read)."""
    found = {}
    for name in names:
        layer, basis = split_concept_layer(name)
        try:
            key = dict(store.group[f"{BASES}{layer}/{basis}"].attrs)["key"]
            found[name] = discover_overrides(key)
        except Exception:  # its attributes are damaged too: no settings to name
            continue
    return found


def verify(path: str | Path, progress: bool = False) -> Verification:
    """Check every unit of the store at ``path`` (files present, zstd checksums, digests),
    every unit of its concept layers, and every derived result's chunk files."""
    store = Store(path)
    done = store.group["progress/done"][:]
    finished = [int(i) for i in done.nonzero()[0]]
    derived, bases = _derived_problems(store)
    concept_layers = concept_layer_problems(store)
    return Verification(
        store.path,
        len(done),
        pending=[int(i) for i in (~done).nonzero()[0]],
        damaged=damaged_units(store, finished, progress),
        derived=derived,
        concept_layers=concept_layers,
        bases=bases,
        rerun=rerun_settings(store, sorted({*concept_layers, *bases})),
    )
