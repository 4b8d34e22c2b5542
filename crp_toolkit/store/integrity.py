"""Integrity of a store's files: digests of written units, and reads that name the damaged
array and chunk file instead of failing with a bare codec error.

Every array of a store is compressed with zstd *with its content checksum*, so a flipped byte
fails to decode; a deleted chunk file would read as the fill value, so each unit of work keeps
a digest of what it wrote (``unit_digest``) beside its progress flag, and the files a unit
must have are listed by ``chunk_file``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

# zstd's content checksum: a damaged chunk fails to decode instead of reading wrong numbers
COMPRESSOR = ZstdCodec(level=0, checksum=True)
DIGEST_BYTES = 32
# written even when all fill value, so that a missing file always means a lost chunk
WRITE_ALL = {"write_empty_chunks": True}


class StoreDamagedError(RuntimeError):
    """A chunk file of the store is missing or cannot be decoded."""


def unit_digest(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """SHA-256 (as 32 uint8) of a unit's arrays by path: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for path in sorted(arrays):
        values = np.ascontiguousarray(arrays[path])
        digest.update(f"{path}|{values.dtype.str}|{values.shape}|".encode())
        digest.update(values.tobytes())
    return np.frombuffer(digest.digest(), dtype=np.uint8)


def chunk_file(array: zarr.Array, index: tuple[int, ...]) -> str:
    """The path of the file holding chunk ``index`` of ``array``, relative to the store root."""
    return f"{array.path}/{array.metadata.encode_chunk_key(index)}"


def unit_file(array: zarr.Array, unit: int) -> str:
    """The file of a unit of work in ``array``: its rows (or its entry) are one zarr chunk,
    ``unit``, along the first axis."""
    return chunk_file(array, (unit,) + (0,) * (array.ndim - 1))


def unit_problems(
    group: zarr.Group,
    root: Path,
    reads: Mapping[str, tuple[zarr.Array, object]],
    unit: int,
    digest: str,
) -> list[str]:
    """What is wrong with finished unit ``unit``, written as ``reads`` (path -> (array, the
    unit's selection in it)) with its digest in row ``unit`` of the array ``digest``: missing
    chunk files, files that fail to decode (zstd checksum), or contents whose digest differs
    from what was written; [] if sound."""
    files = {path: unit_file(array, unit) for path, (array, _) in reads.items()}
    problems = [f"{name}: missing" for name in files.values() if not (root / name).exists()]
    if problems:
        return problems
    values = {}
    for path, (array, selection) in reads.items():
        try:
            values[path] = array[selection]
        except Exception as err:  # a truncated or corrupted chunk file
            problems.append(f"{files[path]}: cannot be read ({type(err).__name__}: {err})")
    if problems:
        return problems
    try:
        stored = group[digest][unit]
    except Exception as err:
        return [f"{digest}: cannot be read ({type(err).__name__}: {err})"]
    if not np.array_equal(stored, unit_digest(values)):
        return ["its contents differ from what was written (digest mismatch)"]
    return []


def damaged_chunks(array: zarr.Array, root: Path) -> list[str]:
    """Every chunk file of ``array`` that is missing or cannot be decoded, with the reason."""
    found = []
    for index in np.ndindex(*array.cdata_shape):
        name = chunk_file(array, index)
        if not (root / name).exists():
            found.append(f"{name}: missing")
            continue
        try:
            array.blocks[index]
        except Exception as err:  # any decoding error: truncated, bad checksum, bad codec
            found.append(f"{name}: {type(err).__name__}: {err}")
    return found


def damaged_error(array: zarr.Array, root: Path, err: Exception) -> StoreDamagedError:
    """The error for a failed read of ``array``: which chunk files are damaged and what to do."""
    bad = damaged_chunks(array, root) or [f"{array.path}: {type(err).__name__}: {err}"]
    return StoreDamagedError(
        f"the store at {root} is damaged: {'; '.join(bad[:5])}"
        f"{f' (and {len(bad) - 5} more)' if len(bad) > 5 else ''}. Run `crp-toolkit verify "
        f"store.path={root}` to list every damaged unit, and `crp-toolkit analyze` with the same "
        "store.path to recompute them"
    )


class CheckedArray:
    """A store array read out of core like a ``zarr.Array`` (slicing, ``vindex``, ``shape``),
    whose failed reads raise :class:`StoreDamagedError` naming the array and chunk file."""

    def __init__(self, array: zarr.Array, root: Path) -> None:
        self.array, self.root = array, Path(root)

    def __getitem__(self, selection):
        return self._read(lambda: self.array[selection])

    @property
    def vindex(self) -> _CheckedVindex:
        return _CheckedVindex(self)

    def _read(self, read):
        try:
            return read()
        except Exception as err:
            raise damaged_error(self.array, self.root, err) from err

    def __len__(self) -> int:
        return self.array.shape[0]

    def __getattr__(self, name: str):
        return getattr(self.array, name)

    def __repr__(self) -> str:
        return f"CheckedArray({self.array.path!r}, shape={self.array.shape}, {self.array.dtype})"


class _CheckedVindex:
    def __init__(self, checked: CheckedArray) -> None:
        self.checked = checked

    def __getitem__(self, selection):
        return self.checked._read(lambda: self.checked.array.vindex[selection])
