"""Read a scan from a user's file, validate it, and return :class:`ScanData`.

Formats (DESIGN §3): PtychoPINN NPZ (``diffraction`` or legacy ``diff3d``),
the ptychodus 1.7.0 training-data NPZ export (intensity in ``diff3d``, probe
``(1, N, N)``), and an HDF5 file with the same keys (streamable). Every
problem a user can cause raises a one-line
:class:`~ptycho_ml.errors.PtychoInputError` naming the file and the field.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ptycho_ml import config as limits
from ptycho_ml.errors import PtychoInputError, field_error
from ptycho_ml.data.npz import StoredArray, open_npz_member
from ptycho_ml.data.scan import ScanData, check_positions_inside, check_values, derive_obj_shape

ZIP_MAGIC = b"PK\x03\x04"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


class IntensityWarning(UserWarning):
    """The file held photon counts (intensity) where amplitude was expected; they were converted."""


def sniff_format(path: str) -> str:
    """``'npz'`` or ``'hdf5'`` from the file's magic bytes; a clear error otherwise."""
    p = Path(path)
    if not p.exists():
        raise PtychoInputError(f"{path}: file not found, expected an NPZ or HDF5 scan file")
    if p.is_dir():
        raise PtychoInputError(f"{path}: is a directory, expected an NPZ or HDF5 scan file")
    with open(p, "rb") as fh:
        head = fh.read(8)
    if head.startswith(ZIP_MAGIC):
        return "npz"
    if head == HDF5_MAGIC:
        return "hdf5"
    if head.startswith(b"\x93NUMPY"):
        raise PtychoInputError(f"{path}: is a single .npy array, expected an NPZ (or HDF5) scan with diffraction, probeGuess, xcoords, ycoords")
    raise PtychoInputError(f"{path}: not an NPZ or HDF5 file (starts with {head[:4]!r}), expected a PtychoPINN/ptychodus NPZ or HDF5 scan")


def load_scan(path: str | Path, *, product: str | Path | None = None) -> ScanData:
    """Load and validate a scan from NPZ or HDF5 (local path or ``s3://`` URI).

    ``product`` is the ptychodus ``product.h5`` paired with a ptychodus
    ``diffraction.h5``; when omitted, a ``product.h5`` beside it is used.
    """
    from ptycho_ml.data.storage import local_path  # storage imports nothing from data

    path = local_path(str(path))
    kind = sniff_format(path)
    if kind == "npz":
        return _load_npz(path)
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            is_ptychodus = "patterns" in h5
    except OSError as exc:
        raise PtychoInputError(f"{path}: unreadable HDF5 file ({exc}), expected a valid (not truncated) HDF5 scan") from None
    if is_ptychodus:
        from ptycho_ml.data.ptychodus import load_ptychodus_pair

        return load_ptychodus_pair(path, local_path(str(product)) if product else None)
    return _load_hdf5(path)


def _load_npz(path: str) -> ScanData:
    try:
        zf = zipfile.ZipFile(path)
        names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
        bad = zf.testzip() if Path(path).stat().st_size < limits.NPZ_CRC_CHECK_MAX_BYTES else None
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise PtychoInputError(f"{path}: not a readable NPZ ({exc}); the file may be truncated, expected a complete NPZ") from None
    if bad is not None:
        raise PtychoInputError(f"{path}: member '{bad}' is corrupt (CRC mismatch), expected an intact NPZ")
    with zf:
        def get(name: str) -> np.ndarray:
            try:
                return open_npz_member(path, zf, name)
            except (zipfile.BadZipFile, ValueError, EOFError, OSError) as exc:
                if isinstance(exc, PtychoInputError):
                    raise
                raise PtychoInputError(f"{path}: field '{name}': unreadable ({exc}), expected a numeric array (file may be truncated)") from None
        return _assemble(path, names, get)


def _load_hdf5(path: str) -> ScanData:
    import h5py

    h5 = h5py.File(path, "r")  # kept open: patterns stream from it; closed with the process
    names = set(h5.keys())

    def get(name: str) -> Any:
        ds = h5[name]
        return ds if name in ("diffraction", "diff3d") else ds[()]
    return _assemble(path, names, get)


def _assemble(path: str, names: set[str], get) -> ScanData:
    """Shared validation for NPZ and HDF5 members (``get(name)`` returns an array-like)."""
    if "diffraction" in names:
        pname = "diffraction"
    elif "diff3d" in names:
        pname = "diff3d"
    else:
        raise field_error(path, "diffraction", f"no such key (keys: {sorted(names)})", "'diffraction' or legacy 'diff3d'")
    for key in ("probeGuess", "xcoords", "ycoords"):
        if key not in names:
            raise field_error(path, key, f"no such key (keys: {sorted(names)})", f"'{key}' present")
    patterns = get(pname)
    if patterns.ndim != 3:
        raise field_error(path, pname, f"ndim {patterns.ndim} with shape {tuple(patterns.shape)}", "3 dimensions (M, N, N)")
    M, n_rows, n_cols = patterns.shape
    if M == 0:
        raise field_error(path, pname, "an empty array (0 patterns)", "at least one pattern")
    if n_rows != n_cols:
        raise field_error(path, pname, f"non-square patterns {n_rows}x{n_cols}", "square N x N patterns")
    if not (np.issubdtype(patterns.dtype, np.integer) or np.issubdtype(patterns.dtype, np.floating)):
        raise field_error(path, pname, f"dtype {patterns.dtype}", "a real numeric dtype")
    N = n_rows

    probe = np.asarray(get("probeGuess"))
    if probe.ndim == 3 and probe.shape[0] == 1:
        probe = probe[0]  # ptychodus export: (1, N, N)
    if probe.ndim not in (2, 3) or probe.shape[-2:] != (N, N):
        raise field_error(path, "probeGuess", f"shape {probe.shape}", f"({N}, {N}) matching the {N}x{N} patterns (or (K, {N}, {N}) modes)")
    if not np.isfinite(probe).all():
        raise field_error(path, "probeGuess", "NaN or Inf values", "a finite complex probe")
    probe = probe.astype(np.complex64)

    coords = []
    for key in ("xcoords", "ycoords"):
        c = np.asarray(get(key), dtype=np.float64)  # read once
        if c.ndim > 1:
            raise field_error(path, key, f"shape {c.shape}", f"a 1-D array of {M} positions")
        c = c.reshape(-1)
        if len(c) != M:
            raise field_error(path, key, f"{len(c)} positions", f"{M} (one per diffraction pattern)")
        if not np.isfinite(c).all():
            raise field_error(path, key, "NaN or Inf values", "finite positions in pixels")
        coords.append(c)
    positions = np.stack(coords, axis=1)

    obj = None
    if "objectGuess" in names:
        obj = get("objectGuess")
        if obj.ndim == 3 and obj.shape[0] == 1:
            obj = np.asarray(obj)[0]
        if not (isinstance(obj, StoredArray) and obj.dtype == np.complex64 and obj.ndim == 2):
            obj = np.asarray(obj, dtype=np.complex64)  # a large complex64 object stays on disk until needed
        if obj.ndim != 2:
            raise field_error(path, "objectGuess", f"shape {obj.shape}", "a 2-D (H, W) complex object")
        obj_shape = (int(obj.shape[0]), int(obj.shape[1]))
    else:
        obj_shape = derive_obj_shape(positions, N)
    check_positions_inside(positions, N, obj_shape, path)

    metadata: dict = {}
    if "metadata" in names:
        try:
            raw = str(np.asarray(get("metadata")).reshape(-1)[0])
            metadata = json.loads(raw)
        except (ValueError, TypeError, IndexError):
            metadata = {}

    is_counts = _looks_like_counts(patterns, pname, path)
    if is_counts:
        warnings.warn(
            f"{path}: field '{pname}' holds photon counts (intensity, dtype {patterns.dtype}); "
            "converting to amplitude = sqrt(counts)", IntensityWarning, stacklevel=3)
    if patterns.size <= limits.EAGER_CHECK_MAX_VALUES:
        check_values(np.asarray(patterns[:]).astype(np.float32, copy=False), path, pname)
    return ScanData(patterns, probe, positions, obj_shape, obj, None, metadata, path, is_counts, pname)


def _looks_like_counts(patterns: Any, pname: str, path: str) -> bool:
    """Detect intensity input (DESIGN §2): an integer dtype, or floats that are all whole numbers > 1."""
    if np.issubdtype(patterns.dtype, np.integer):
        return True
    sample = np.asarray(patterns[: min(len(patterns), 8)], dtype=np.float64)
    finite = sample[np.isfinite(sample)]
    return bool(finite.size and finite.max() > 1 and np.all(finite == np.round(finite)))
