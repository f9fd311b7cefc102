"""NPZ files: deterministic writing (optionally chunked) and memory-mapped reading.

NumPy's ``savez`` stamps the current time into the zip, so equal data give
different bytes. :func:`write_npz` writes uncompressed members with a fixed
timestamp (same data, same bytes), and uncompressed members can be
memory-mapped, which is how large scans stream (:func:`open_npz_member`).
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from ..errors import PtychoInputError

_FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def _zipinfo(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name + ".npy", date_time=_FIXED_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info


def write_npz(path: str | Path, arrays: dict[str, np.ndarray],
              chunked: dict[str, tuple[tuple[int, ...], np.dtype, Callable[[], Iterator[np.ndarray]]]] | None = None) -> Path:
    """Atomically write an uncompressed, byte-reproducible NPZ.

    arrays: name -> array (no object arrays; nothing is pickled).
    chunked: name -> (shape, dtype, make_chunks) for members too large for
    memory; ``make_chunks()`` yields C-ordered pieces along axis 0 that add up
    to ``shape``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", allowZip64=True) as zf:
            for name, array in arrays.items():
                array = np.asarray(array)
                if array.dtype == object:
                    raise ValueError(f"write_npz: member '{name}' is an object array; refusing to pickle")
                with zf.open(_zipinfo(name), "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.ascontiguousarray(array), allow_pickle=False)
            for name, (shape, dtype, make_chunks) in (chunked or {}).items():
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
                with zf.open(_zipinfo(name), "w", force_zip64=True) as fh:
                    np.lib.format.write_array_header_2_0(fh, header)
                    rows = 0
                    for chunk in make_chunks():
                        chunk = np.ascontiguousarray(chunk, dtype=dtype)
                        fh.write(chunk.tobytes())
                        rows += len(chunk)
                    if rows != shape[0]:
                        raise ValueError(f"write_npz: member '{name}' got {rows} rows, expected {shape[0]}")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def open_npz_member(path: str | Path, zf: zipfile.ZipFile, name: str) -> np.ndarray:
    """Return member ``name`` of an open NPZ: memory-mapped when stored uncompressed, else loaded.

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
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
    with zf.open(info) as fh:
        return np.lib.format.read_array(fh, allow_pickle=False)
