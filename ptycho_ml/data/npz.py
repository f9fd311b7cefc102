"""NPZ files: deterministic writing (optionally chunked) and on-demand reading of large members.

NumPy's ``savez`` stamps the current time into the zip, so equal data give
different bytes. :func:`write_npz` writes uncompressed members with a fixed
timestamp (same data, same bytes), and uncompressed members can be
read row by row on demand, which is how large scans stream (:func:`open_npz_member`).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ptycho_ml.data.atomic import atomic_path, zip_entry
from ptycho_ml.data.scan import take_rows
from ptycho_ml import config as limits
from ptycho_ml.errors import PtychoInputError



def write_npz(path: str | Path, arrays: dict[str, np.ndarray],
              chunked: dict[str, tuple[tuple[int, ...], np.dtype, Callable[[], Iterator[np.ndarray]]]] | None = None) -> Path:
    """Atomically write an uncompressed, byte-reproducible NPZ.

    arrays: name -> array (no object arrays; nothing is pickled).
    chunked: name -> (shape, dtype, make_chunks) for members too large for
    memory; ``make_chunks()`` yields C-ordered pieces along axis 0 that add up
    to ``shape``.
    """
    path = Path(path)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
        for name, array in arrays.items():
            array = np.asarray(array)
            if array.dtype == object:
                raise ValueError(f"write_npz: member '{name}' is an object array; refusing to pickle")
            with zf.open(zip_entry(name + ".npy"), "w", force_zip64=True) as fh:
                np.lib.format.write_array(fh, np.ascontiguousarray(array), allow_pickle=False)
        for name, (shape, dtype, make_chunks) in (chunked or {}).items():
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
            with zf.open(zip_entry(name + ".npy"), "w", force_zip64=True) as fh:
                np.lib.format.write_array_header_2_0(fh, header)
                rows = 0
                for chunk in make_chunks():
                    chunk = np.ascontiguousarray(chunk, dtype=dtype)
                    fh.write(chunk.tobytes())
                    rows += len(chunk)
                if rows != shape[0]:
                    raise ValueError(f"write_npz: member '{name}' got {rows} rows, expected {shape[0]}")
    return path


class StoredArray:
    """A read-only C-ordered array stored uncompressed in a file, read by rows on demand.

    ``a[i]``, ``a[start:stop]`` and ``a[index_array]`` read just those rows
    with ordinary file reads (consecutive rows in one read), so memory is
    bounded by what is asked for. Unlike a memory map, nothing of the file
    stays mapped into (and counted against) the process.
    """

    def __init__(self, path: str | Path, offset: int, shape: tuple[int, ...], dtype: np.dtype):
        self.path, self.offset = str(path), offset
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        self.ndim, self.size = len(self.shape), int(np.prod(self.shape))
        self._row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def _rows(self, start: int, stop: int, fh) -> np.ndarray:
        out = np.empty((stop - start,) + self.shape[1:], self.dtype)
        fh.seek(self.offset + start * self._row_bytes)
        if fh.readinto(memoryview(out).cast("B")) != out.nbytes:
            raise PtychoInputError(f"{self.path}: file is truncated, expected rows {start}..{stop - 1}")
        return out

    def _sorted_rows(self, unique: np.ndarray, fh) -> np.ndarray:
        """Rows ``unique`` (strictly increasing): one read of the span when dense, else one per run."""
        if unique[-1] - unique[0] + 1 <= 4 * len(unique):
            # Dense enough (e.g. neighbour groups of a raster): one read of the span.
            return self._rows(int(unique[0]), int(unique[-1]) + 1, fh)[unique - unique[0]]
        out = np.empty((len(unique),) + self.shape[1:], self.dtype)
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        for run in np.split(np.arange(len(unique)), breaks):
            out[run[0]:run[-1] + 1] = self._rows(int(unique[run[0]]), int(unique[run[-1]]) + 1, fh)
        return out

    def __getitem__(self, key) -> np.ndarray:
        rest = ()
        if isinstance(key, tuple):
            key, rest = key[0], key[1:]
        with open(self.path, "rb", buffering=0) as fh:
            if isinstance(key, slice):
                start, stop, step = key.indices(len(self))
                out = self._rows(start, max(start, stop), fh)[::step] if step > 0 else self[np.arange(start, stop, step)]
            elif np.ndim(key) == 0:
                index = int(key) + (len(self) if int(key) < 0 else 0)
                if not 0 <= index < len(self):
                    raise IndexError(f"index {key} out of range for {len(self)} rows")
                out = self._rows(index, index + 1, fh)[0]
            else:
                index = np.asarray(key, dtype=np.int64)
                index = np.where(index < 0, index + len(self), index)
                if index.size and (index.min() < 0 or index.max() >= len(self)):
                    raise IndexError(f"row index out of range for {len(self)} rows")
                out = take_rows(lambda rows: self._sorted_rows(rows, fh), index, self.shape[1:], self.dtype)
        if not rest:
            return out
        scalar_key = not isinstance(key, slice) and np.ndim(key) == 0
        return out[rest] if scalar_key else out[(slice(None),) + rest]


def open_npz_member(path: str | Path, zf: zipfile.ZipFile, name: str) -> np.ndarray | StoredArray:
    """Return member ``name`` of an open NPZ.

    Large uncompressed members come back as a :class:`StoredArray` (read in
    batches, never loaded whole); small or compressed ones are loaded.
    Never unpickles (``allow_pickle=False``).
    """
    info = zf.getinfo(name + ".npy")
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as raw:
            raw.seek(info.header_offset)
            local = raw.read(30)
            if local[:4] != b"PK\x03\x04":
                raise PtychoInputError(f"{path}: member '{name}': corrupt zip local header, expected a valid NPZ")
            name_len = int.from_bytes(local[26:28], "little")
            extra_len = int.from_bytes(local[28:30], "little")
            data_start = info.header_offset + 30 + name_len + extra_len
            raw.seek(data_start)
            version = np.lib.format.read_magic(raw)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(raw)
            offset = raw.tell()
        if dtype.hasobject:
            raise PtychoInputError(f"{path}: field '{name}': found an object (pickled) array, expected numeric data")
        if int(np.prod(shape)) == 0:
            return np.zeros(shape, dtype)
        expected_end = offset + int(np.prod(shape)) * dtype.itemsize
        if expected_end > os.path.getsize(path):
            raise PtychoInputError(f"{path}: field '{name}': file is truncated, expected {expected_end} bytes of data")
        if fortran or len(shape) < 2 or int(np.prod(shape)) * dtype.itemsize < limits.NPZ_STREAM_MIN_BYTES:
            return np.array(np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C"))
        return StoredArray(path, offset, shape, dtype)
    with zf.open(info) as fh:
        return np.lib.format.read_array(fh, allow_pickle=False)
