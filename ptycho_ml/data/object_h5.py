"""``object.h5``, the reconstruction file ``ptycho-ml reconstruct`` writes: its one reader and writer.

Datasets: ``object (H, W) complex64``, ``amplitude`` and ``phase``
``(H, W) float32`` (radians), optional ``illumination (H, W) float32``
(summed probe intensity: how well each pixel was seen), and after a
refinement ``probe (K, N, N) complex64`` (the probe modes the object was
refined with: refined ones with ``--refine-probe``), ``positions_px (M, 2)
float64`` (x, y patch centres in object pixels: corrected ones with
``--refine-positions``) and ``intensity_scale (M,) float32``. Root attributes are
JSON-safe values (dicts and lists stored as JSON strings): ``source``,
``model`` (the URI or path given), ``provenance`` (JSON: the resolved
version, its run and the bundle sha256), ``refine_steps``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ptycho_ml.data.atomic import atomic_h5
from ptycho_ml.errors import PtychoInputError, field_error

OBJECT = "object"
AMPLITUDE = "amplitude"
PHASE = "phase"
ILLUMINATION = "illumination"
PROBE = "probe"
POSITIONS = "positions_px"
INTENSITY_SCALE = "intensity_scale"
_ROW_BLOCK = 512  # rows written at a time: no object-sized temporaries


def write_object_h5(path: str | Path, obj: np.ndarray, attrs: dict | None = None,
                    illumination: np.ndarray | None = None, probe: np.ndarray | None = None,
                    positions_px: np.ndarray | None = None, intensity_scale: np.ndarray | None = None) -> Path:
    """Atomically write ``obj (H, W) complex64`` with its amplitude and phase (see the module docstring).

    probe ``(N, N)`` or ``(K, N, N)`` is stored as ``(K, N, N) complex64``."""
    path = Path(path)
    obj = np.asarray(obj, dtype=np.complex64)
    with atomic_h5(path) as h5:
        h5.create_dataset(OBJECT, data=obj)
        amplitude = h5.create_dataset(AMPLITUDE, shape=obj.shape, dtype=np.float32)
        phase = h5.create_dataset(PHASE, shape=obj.shape, dtype=np.float32)
        for start in range(0, obj.shape[0], _ROW_BLOCK):
            rows = obj[start:start + _ROW_BLOCK]
            amplitude[start:start + _ROW_BLOCK] = np.abs(rows)
            phase[start:start + _ROW_BLOCK] = np.angle(rows)
        if illumination is not None:
            h5.create_dataset(ILLUMINATION, data=np.asarray(illumination, dtype=np.float32))
        if probe is not None:
            probe = np.asarray(probe, dtype=np.complex64)
            h5.create_dataset(PROBE, data=probe if probe.ndim == 3 else probe[None])
        if positions_px is not None:
            h5.create_dataset(POSITIONS, data=np.asarray(positions_px, dtype=np.float64))
        if intensity_scale is not None:
            h5.create_dataset(INTENSITY_SCALE, data=np.asarray(intensity_scale, dtype=np.float32))
        for key, value in (attrs or {}).items():
            h5.attrs[key] = json.dumps(value) if isinstance(value, (dict, list)) else value
    return path


def read_object_h5(path: str) -> np.ndarray:
    """The ``object`` dataset ``(H, W) complex64`` of an ``object.h5`` (local or ``s3://``)."""
    import h5py

    from ptycho_ml.data.storage import local_path

    path = local_path(path)
    try:
        with h5py.File(path, "r") as h5:
            if OBJECT not in h5:
                raise field_error(path, OBJECT, f"no such dataset (datasets: {sorted(h5.keys())})", "an object.h5 written by `ptycho-ml reconstruct`")
            return np.asarray(h5[OBJECT][()], dtype=np.complex64)
    except OSError as exc:
        raise PtychoInputError(f"{path}: not a readable HDF5 file ({exc}), expected object.h5 from `ptycho-ml reconstruct`") from None


def read_probe_positions(path: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The refined ``probe (K, N, N) complex64`` and ``positions_px (M, 2) float64`` of an ``object.h5``
    (each None when the file has none: written without refinement)."""
    import h5py

    from ptycho_ml.data.storage import local_path

    path = local_path(path)
    try:
        with h5py.File(path, "r") as h5:
            probe = np.asarray(h5[PROBE][()], dtype=np.complex64) if PROBE in h5 else None
            positions = np.asarray(h5[POSITIONS][()], dtype=np.float64) if POSITIONS in h5 else None
    except OSError as exc:
        raise PtychoInputError(f"{path}: not a readable HDF5 file ({exc}), expected object.h5 from `ptycho-ml reconstruct`") from None
    return probe, positions
