"""The PtychoPINN scan format: one NPZ (or an HDF5 file with the same keys), its key names, reader and writer.

Members (amplitude = sqrt(photon counts), zero frequency at the centre):

- ``diffraction (M, N, N) float32`` amplitude, or legacy ``diff3d``; the
  ptychodus 1.7.0 training-data export stores **intensity** in ``diff3d`` in
  the detector dtype (detected and converted with an :class:`IntensityWarning`);
- ``probeGuess (N, N)`` complex64, or ``(K, N, N)`` incoherent modes (the
  ptychodus export's ``(1, N, N)`` is accepted);
- ``xcoords``, ``ycoords (M,)`` float: patch centres in object pixels (x = column, y = row);
- optional ``objectGuess (H, W)`` complex64 (ground truth or initial guess),
  ``scan_index (M,)`` int64, ``bad_pixels (N, N)`` bool (True where the
  detector pixel is dead: masked in the loss, the network's physics estimate
  and the refinement), ``metadata`` (a JSON string);
- optional truth of a simulated scan whose probe and positions are estimates
  (:mod:`ptycho_ml.physics.scan_errors`): ``probeTrue (K, N, N)`` complex64,
  ``xcoordsTrue``, ``ycoordsTrue (M,)`` float64 (read by :func:`read_true_probe_positions`,
  ignored by reconstruction).

Every reader and writer of the package uses the names below. Every problem a
user can cause raises a one-line :class:`~ptycho_ml.errors.PtychoInputError`
naming the file and the field.
"""

from __future__ import annotations

import json
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ptycho_ml import config as limits
from ptycho_ml.data.npz import StoredArray, open_npz_member, write_npz
from ptycho_ml.data.scan import ScanData, check_positions_inside, check_values, derive_obj_shape
from ptycho_ml.errors import PtychoInputError, field_error

DIFFRACTION = "diffraction"
LEGACY_DIFFRACTION = "diff3d"
PROBE = "probeGuess"
X = "xcoords"
Y = "ycoords"
OBJECT = "objectGuess"
SCAN_INDEX = "scan_index"
BAD_PIXELS = "bad_pixels"
METADATA = "metadata"
PROBE_TRUE = "probeTrue"
X_TRUE = "xcoordsTrue"
Y_TRUE = "ycoordsTrue"
#: Streamed members: the patterns (read batch by batch from an HDF5 file).
PATTERN_KEYS = (DIFFRACTION, LEGACY_DIFFRACTION)


class IntensityWarning(UserWarning):
    """The file held photon counts (intensity) where amplitude was expected; they were converted."""


def write_ptychopinn(path: str | Path, *, probe: np.ndarray, positions_px: np.ndarray,
                     amplitude: np.ndarray | None = None,
                     amplitude_chunks: tuple[tuple[int, int, int], Callable[[], Iterator[np.ndarray]]] | None = None,
                     obj: np.ndarray | None = None, scan_index: np.ndarray | None = None,
                     bad_pixels: np.ndarray | None = None, metadata: dict | None = None,
                     probe_true: np.ndarray | None = None, positions_true_px: np.ndarray | None = None) -> Path:
    """Atomically write a byte-reproducible PtychoPINN NPZ.

    amplitude: ``(M, N, N) float32``; or, for scans larger than memory,
    ``amplitude_chunks = ((M, N, N), make_chunks)`` where ``make_chunks()``
    yields ``(B, N, N)`` float32 pieces in order. probe: ``(N, N)`` or
    ``(K, N, N)`` complex64. positions_px: ``(M, 2)`` float (x, y).
    obj ``(H, W)`` complex64, scan_index ``(M,)`` int64 (default zeros: one
    object), bad_pixels ``(N, N)`` bool and metadata (JSON-safe) are optional;
    so are a simulation's truth ``probe_true (K, N, N)`` complex64 and
    ``positions_true_px (M, 2)`` float64 (when the file's probe and positions are estimates).
    """
    if (amplitude is None) == (amplitude_chunks is None):
        raise ValueError("write_ptychopinn: give exactly one of amplitude and amplitude_chunks")
    positions_px = np.asarray(positions_px, dtype=np.float64)
    M = len(positions_px)
    arrays: dict[str, np.ndarray] = {}
    if amplitude is not None:
        arrays[DIFFRACTION] = np.asarray(amplitude, np.float32)
    arrays.update({PROBE: np.asarray(probe, np.complex64), X: positions_px[:, 0], Y: positions_px[:, 1]})
    if obj is not None:
        arrays[OBJECT] = np.asarray(obj, np.complex64)
    arrays[SCAN_INDEX] = np.zeros(M, np.int64) if scan_index is None else np.asarray(scan_index, np.int64)
    if bad_pixels is not None:
        arrays[BAD_PIXELS] = np.asarray(bad_pixels, bool)
    if metadata is not None:
        arrays[METADATA] = np.array(json.dumps(metadata, sort_keys=True, default=str))
    if probe_true is not None:
        arrays[PROBE_TRUE] = np.asarray(probe_true, np.complex64)
    if positions_true_px is not None:
        true_px = np.asarray(positions_true_px, np.float64)
        arrays[X_TRUE], arrays[Y_TRUE] = true_px[:, 0], true_px[:, 1]
    chunked = None
    if amplitude_chunks is not None:
        shape, make_chunks = amplitude_chunks
        chunked = {DIFFRACTION: (tuple(shape), np.float32, make_chunks)}
    return write_npz(path, arrays, chunked=chunked)


def read_true_probe_positions(path: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """A simulated NPZ's truth: ``probeTrue (K, N, N) complex64`` and ``(M, 2)`` float64 true positions (x, y), each None when absent."""
    with np.load(path, allow_pickle=False) as z:
        probe = np.asarray(z[PROBE_TRUE], np.complex64) if PROBE_TRUE in z.files else None
        positions = (np.stack([z[X_TRUE], z[Y_TRUE]], axis=1).astype(np.float64)
                     if X_TRUE in z.files and Y_TRUE in z.files else None)
    return probe, positions


def read_ptychopinn_npz(path: str) -> ScanData:
    """Read and validate a PtychoPINN (or ptychodus-export) NPZ; large members stay on disk."""
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


def read_ptychopinn_hdf5(path: str) -> ScanData:
    """Read and validate an HDF5 file with the PtychoPINN keys; the patterns stream from it."""
    import h5py

    h5 = h5py.File(path, "r")  # kept open: patterns stream from it; closed with the process
    names = set(h5.keys())

    def get(name: str) -> Any:
        ds = h5[name]
        return ds if name in PATTERN_KEYS else ds[()]
    return _assemble(path, names, get)


def _assemble(path: str, names: set[str], get) -> ScanData:
    """Shared validation for NPZ and HDF5 members (``get(name)`` returns an array-like)."""
    if DIFFRACTION in names:
        pname = DIFFRACTION
    elif LEGACY_DIFFRACTION in names:
        pname = LEGACY_DIFFRACTION
    else:
        raise field_error(path, DIFFRACTION, f"no such key (keys: {sorted(names)})", f"'{DIFFRACTION}' or legacy '{LEGACY_DIFFRACTION}'")
    for key in (PROBE, X, Y):
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

    probe = np.asarray(get(PROBE))
    if probe.ndim == 3 and probe.shape[0] == 1:
        probe = probe[0]  # ptychodus export: (1, N, N)
    if probe.ndim not in (2, 3) or probe.shape[-2:] != (N, N):
        raise field_error(path, PROBE, f"shape {probe.shape}", f"({N}, {N}) matching the {N}x{N} patterns (or (K, {N}, {N}) modes)")
    if not np.isfinite(probe).all():
        raise field_error(path, PROBE, "NaN or Inf values", "a finite complex probe")
    probe = probe.astype(np.complex64)

    coords = []
    for key in (X, Y):
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
    if OBJECT in names:
        obj = get(OBJECT)
        if obj.ndim == 3 and obj.shape[0] == 1:
            obj = np.asarray(obj)[0]
        if not (isinstance(obj, StoredArray) and obj.dtype == np.complex64 and obj.ndim == 2):
            obj = np.asarray(obj, dtype=np.complex64)  # a large complex64 object stays on disk until needed
        if obj.ndim != 2:
            raise field_error(path, OBJECT, f"shape {obj.shape}", "a 2-D (H, W) complex object")
        obj_shape = (int(obj.shape[0]), int(obj.shape[1]))
    else:
        obj_shape = derive_obj_shape(positions, N)
    check_positions_inside(positions, N, obj_shape, path)

    metadata: dict = {}
    if METADATA in names:
        try:
            raw = str(np.asarray(get(METADATA)).reshape(-1)[0])
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
    bad_pixels = _bad_pixels(get(BAD_PIXELS), N, path) if BAD_PIXELS in names else None
    return ScanData(patterns, probe, positions, obj_shape, obj, bad_pixels, metadata, path, is_counts, pname)


def _bad_pixels(value: Any, N: int, path: str) -> np.ndarray | None:
    """The ``bad_pixels (N, N)`` mask as bool (True = dead pixel); None when no pixel is bad."""
    mask = np.asarray(value)
    if mask.shape != (N, N):
        raise field_error(path, BAD_PIXELS, f"shape {mask.shape}", f"({N}, {N}) like the patterns")
    if mask.dtype != bool and not (np.issubdtype(mask.dtype, np.integer) and np.isin(mask, (0, 1)).all()):
        raise field_error(path, BAD_PIXELS, f"dtype {mask.dtype}", "a boolean mask (True where the detector pixel is bad)")
    mask = mask.astype(bool)
    if mask.all():
        raise field_error(path, BAD_PIXELS, "every pixel marked bad", "at least one good detector pixel")
    return mask if mask.any() else None


def _looks_like_counts(patterns: Any, pname: str, path: str) -> bool:
    """Detect intensity input (docs/architecture.md, "Conventions"): an integer dtype, or floats that are all whole numbers > 1."""
    if np.issubdtype(patterns.dtype, np.integer):
        return True
    sample = np.asarray(patterns[: min(len(patterns), 8)], dtype=np.float64)
    finite = sample[np.isfinite(sample)]
    return bool(finite.size and finite.max() > 1 and np.all(finite == np.round(finite)))
