"""ptychodus 1.7.0 interop: read a ``diffraction.h5`` + ``product.h5`` pair, write both.

Layout (docs/formats.md; checked against ptychodus 1.7.0 ``ptychodus.api.io``):

- ``diffraction.h5``: ``patterns (M, H, W)`` counts in any dtype, with attributes
  ``detector_pixel_width_m`` / ``detector_pixel_height_m``; ``indexes (M,)``;
  ``bad_pixels (H, W)`` bool (ptychodus requires it, so it is always written).
- ``product.h5``: root attributes (``detector_object_distance_m``,
  ``photon_energy_eV`` or legacy ``probe_energy_eV``, ``name``, ``comments``,
  ``probe_photon_count``, ``exposure_time_s``, ...); ``probe_position_indexes``,
  ``probe_position_x_m``, ``probe_position_y_m`` (float64 metres);
  ``probe [C, I, H, W]`` complex, where ``C`` is the *coherent* axis (orthogonal
  probe relaxation modes, mixed per position by ``opr_weights``) and ``I`` the
  *incoherent* (mixed-state) modes; ptychodus's position-independent probe is
  ``probe[0]``, which is our ``(K, N, N)`` probe; ``object [L, H, W]`` (layers)
  with ``center_x_m``, ``center_y_m``, ``pixel_width_m``, ``pixel_height_m``;
  ``object_layer_spacing_m (L-1,)``; ``loss_epochs``, ``loss_values``.

Positions: ``x_px = (x_m - center_x_m) / pixel_width_m + (W - 1) / 2`` (the same
for y with the height), ptychodus's ``ObjectGeometry.map_coordinates_probe_to_object``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ptycho_ml.data.atomic import atomic_h5
from ptycho_ml import config as limits
from ptycho_ml.errors import PtychoInputError, field_error
from ptycho_ml.units import wavelength_m
from ptycho_ml.data.ptychopinn import write_ptychopinn
from ptycho_ml.data.scan import ScanData, check_positions_inside, take_rows

PRODUCT_FILE = "product.h5"
DIFFRACTION_FILE = "diffraction.h5"

#: Geometry used when a scan carries none (an NPZ without simulator metadata).
DEFAULT_GEOMETRY: dict[str, float] = {
    "object_pixel_width_m": 20e-9,
    "object_pixel_height_m": 20e-9,
    "object_center_x_m": 0.0,
    "object_center_y_m": 0.0,
    "detector_object_distance_m": 2.0,
    "photon_energy_eV": 8800.0,
    "probe_photon_count": 0.0,
    "exposure_time_s": 0.0,
}
_REQUIRED_GEOMETRY = ("object_pixel_width_m", "object_pixel_height_m", "detector_object_distance_m", "photon_energy_eV")
_DETECTOR_KEYS = ("detector_pixel_width_m", "detector_pixel_height_m")


class PtychodusWarning(UserWarning):
    """Something in a ptychodus file was dropped or simplified on load (unmatched indexes, OPR modes, layers)."""


# --------------------------------------------------------------------------- reading


class _Rows:
    """Lazy row selection of an h5py dataset, ``(m, H, W)``: reads only the rows asked for."""

    def __init__(self, dataset: Any, rows: np.ndarray) -> None:
        self._dataset, self._rows = dataset, rows
        self.shape = (len(rows),) + tuple(dataset.shape[1:])
        self.dtype = dataset.dtype
        self.ndim = len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        rows = np.atleast_1d(self._rows[key])
        if len(rows) == 0:
            return np.empty((0,) + self.shape[1:], self.dtype)
        if rows[-1] - rows[0] + 1 == len(rows) and np.all(np.diff(rows) == 1):
            block = self._dataset[int(rows[0]):int(rows[-1]) + 1]
        else:
            block = take_rows(lambda sorted_rows: self._dataset[sorted_rows], rows, self.shape[1:], self.dtype)
        return block[0] if np.ndim(self._rows[key]) == 0 else block

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def _attr(h5: Any, names: Sequence[str], source: str, label: str = "", default: Any = None) -> Any:
    """Attribute ``names[0]`` (or a legacy alias) of ``h5``; ``label`` prefixes the field name in errors."""
    for name in names:
        if name in h5.attrs:
            value = h5.attrs[name]
            return value.decode() if isinstance(value, bytes) else value
    if default is not None:
        return default
    legacy = f" (or legacy '{label}{names[1]}')" if len(names) > 1 else ""
    raise field_error(source, f"{label}{names[0]}", "no such attribute", f"the attribute '{label}{names[0]}'{legacy}")


def _dataset(h5: Any, name: str, source: str, expected: str) -> Any:
    import h5py

    item = h5.get(name)
    if not isinstance(item, h5py.Dataset):
        found = "no such dataset" if item is None else f"a {type(item).__name__}"
        raise field_error(source, name, f"{found} (keys: {sorted(h5.keys())})", expected)
    return item


def _float(value: Any, source: str, name: str) -> float:
    try:
        out = float(np.asarray(value).reshape(-1)[0])
    except (TypeError, ValueError, IndexError):
        raise field_error(source, name, f"{value!r}", "a number") from None
    if not math.isfinite(out):
        raise field_error(source, name, f"{out}", "a finite number")
    return out


def _open_h5(path: str, what: str) -> Any:
    import h5py

    if not Path(path).is_file():
        raise PtychoInputError(f"{path}: file not found, expected the ptychodus {what}")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise PtychoInputError(f"{path}: unreadable HDF5 file ({exc}), expected the ptychodus {what}") from None


def load_ptychodus_pair(diffraction_path: str, product_path: str | None = None) -> ScanData:
    """Load a ptychodus 1.7.0 ``diffraction.h5`` + ``product.h5`` pair as :class:`ScanData`.

    diffraction_path: ``diffraction.h5`` (``patterns (M, N, N)`` counts, any real dtype).
    product_path: the ``product.h5``; None means ``product.h5`` in the same directory.

    Returns a scan whose ``patterns`` stay in the open HDF5 file (counts,
    ``patterns_are_counts=True``; amplitudes are computed per batch), patterns
    paired with positions by scan index in pattern-file order (patterns without
    a position are dropped with a :class:`PtychodusWarning`; duplicate position
    indexes are averaged, as ptychodus does), ``probe`` = ``probe[0]`` as
    ``(N, N)`` or ``(K, N, N)`` complex64, ``obj`` = object layer 0 ``(H, W)``
    complex64, positions ``(M, 2)`` float64 object pixels, and the geometry in
    ``metadata["ptychodus"]`` (see :func:`geometry_from_scan`).
    """
    diffraction_path = str(diffraction_path)
    if product_path is None:
        product_path = str(Path(diffraction_path).with_name(PRODUCT_FILE))
        if not Path(product_path).is_file():
            raise PtychoInputError(
                f"{diffraction_path}: no {PRODUCT_FILE} beside it (looked for {product_path}), expected the "
                f"ptychodus product.h5 with positions, probe and object next to diffraction.h5 (or pass it explicitly)")
    product_path = str(product_path)

    h5d = _open_h5(diffraction_path, "diffraction.h5")  # kept open: patterns stream from it
    try:
        return _load_pair(h5d, diffraction_path, product_path)
    except BaseException:
        h5d.close()
        raise


def _load_pair(h5d: Any, diffraction_path: str, product_path: str) -> ScanData:
    patterns = _dataset(h5d, "patterns", diffraction_path, "a (M, H, W) dataset of counts")
    if patterns.ndim != 3 or patterns.shape[0] == 0:
        raise field_error(diffraction_path, "patterns", f"shape {patterns.shape}", "(M, H, W) with M >= 1")
    if not (np.issubdtype(patterns.dtype, np.integer) or np.issubdtype(patterns.dtype, np.floating)):
        raise field_error(diffraction_path, "patterns", f"dtype {patterns.dtype}", "a real numeric dtype (counts)")
    M, H_det, W_det = patterns.shape
    pattern_indexes = np.asarray(_dataset(h5d, "indexes", diffraction_path, f"({M},) scan indexes")[()]).reshape(-1)
    if len(pattern_indexes) != M or not np.issubdtype(pattern_indexes.dtype, np.integer):
        raise field_error(diffraction_path, "indexes", f"{len(pattern_indexes)} values of dtype {pattern_indexes.dtype}",
                          f"{M} integer scan indexes (one per pattern)")
    bad_pixels = None
    if "bad_pixels" in h5d:
        bad_pixels = np.asarray(h5d["bad_pixels"][()]).astype(bool)
        if bad_pixels.shape != (H_det, W_det):
            raise field_error(diffraction_path, "bad_pixels", f"shape {bad_pixels.shape}",
                              f"({H_det}, {W_det}) like the patterns")
        bad_pixels = bad_pixels if bad_pixels.any() else None
    det_px = {k: (_float(patterns.attrs[k], diffraction_path, k) if k in patterns.attrs else None) for k in _DETECTOR_KEYS}

    with _open_h5(product_path, "product.h5") as h5p:
        src = product_path
        meta: dict[str, Any] = {
            "detector_object_distance_m": _float(_attr(h5p, ["detector_object_distance_m"], src), src,
                                                 "detector_object_distance_m"),
            "photon_energy_eV": _float(_attr(h5p, ["photon_energy_eV", "probe_energy_eV"], src), src, "photon_energy_eV"),
            "probe_photon_count": _float(_attr(h5p, ["probe_photon_count"], src, "", 0.0), src, "probe_photon_count"),
            "exposure_time_s": _float(_attr(h5p, ["exposure_time_s"], src, "", 0.0), src, "exposure_time_s"),
            "name": str(_attr(h5p, ["name"], src, "", "Unnamed")),
            "comments": str(_attr(h5p, ["comments"], src, "", "")),
        }
        for key in ("detector_object_distance_m", "photon_energy_eV"):
            if meta[key] <= 0:
                raise field_error(src, key, f"{meta[key]}", "a positive value")
        if not bool(h5p.attrs.get("far_field", True)):
            warnings.warn(f"{src}: product declares far_field=False (near field); ptycho_ml models far-field "
                          "diffraction only", PtychodusWarning, stacklevel=3)

        h5_obj = _dataset(h5p, "object", src, "an (L, H, W) complex object")
        obj_all = np.asarray(h5_obj[()])
        if obj_all.ndim == 2:
            obj_all = obj_all[None]
        if obj_all.ndim != 3 or not np.iscomplexobj(obj_all) or 0 in obj_all.shape:
            raise field_error(src, "object", f"shape {obj_all.shape} dtype {obj_all.dtype}", "a complex (L, H, W) array")
        if obj_all.shape[0] > 1:
            warnings.warn(f"{src}: field 'object' has {obj_all.shape[0]} layers; using layer 0 (multislice is not "
                          "supported)", PtychodusWarning, stacklevel=3)
        obj = obj_all[0].astype(np.complex64)
        if not np.isfinite(obj).all():
            raise field_error(src, "object", "NaN or Inf values", "a finite complex object")
        for key, name in (("object_pixel_width_m", "pixel_width_m"), ("object_pixel_height_m", "pixel_height_m"),
                          ("object_center_x_m", "center_x_m"), ("object_center_y_m", "center_y_m")):
            meta[key] = _float(_attr(h5_obj, [name], src, "object."), src, f"object.{name}")
        for key in ("object_pixel_width_m", "object_pixel_height_m"):
            if meta[key] <= 0:
                raise field_error(src, f"object.{key[7:]}", f"{meta[key]}", "a positive pixel size in metres")

        h5_probe = _dataset(h5p, "probe", src, "a complex [C, I, H, W] probe")
        probe_all = np.asarray(h5_probe[()])
        if not np.iscomplexobj(probe_all) or probe_all.ndim not in (2, 3, 4):
            raise field_error(src, "probe", f"shape {probe_all.shape} dtype {probe_all.dtype}", "a complex [C, I, H, W] array")
        probe_all = probe_all.reshape((1,) * (4 - probe_all.ndim) + probe_all.shape)
        if probe_all.shape[0] > 1:
            warnings.warn(f"{src}: field 'probe' has {probe_all.shape[0]} coherent (OPR) modes; using the "
                          "position-independent mode 0", PtychodusWarning, stacklevel=3)
        probe = probe_all[0].astype(np.complex64)
        probe = probe[0] if probe.shape[0] == 1 else probe
        for axis in ("width", "height"):  # absent: ptychodus takes the object's
            o = meta[f"object_pixel_{axis}_m"]
            p = meta[f"probe_pixel_{axis}_m"] = _float(h5_probe.attrs.get(f"pixel_{axis}_m", o), src, f"probe.pixel_{axis}_m")
            if not math.isclose(p, o, rel_tol=1e-6):
                raise field_error(src, f"probe.pixel_{axis}_m", f"{p:.6g} m", f"the object pixel {axis} {o:.6g} m "
                                  "(resample the probe to the object grid in ptychodus first)")
        if probe.shape[-2:] != (H_det, W_det):
            raise field_error(src, "probe", f"{probe.shape[-2]}x{probe.shape[-1]} pixels",
                              f"the {H_det}x{W_det} pattern size of {diffraction_path}")
        if H_det != W_det:
            raise field_error(diffraction_path, "patterns", f"non-square {H_det}x{W_det} patterns", "square N x N patterns")
        if not np.isfinite(probe).all():
            raise field_error(src, "probe", "NaN or Inf values", "a finite complex probe")

        pos = {}
        for name in ("probe_position_indexes", "probe_position_x_m", "probe_position_y_m"):
            pos[name] = np.asarray(_dataset(h5p, name, src, "a (P,) dataset")[()]).reshape(-1)
        n_pos = len(pos["probe_position_indexes"])
        for name in ("probe_position_x_m", "probe_position_y_m"):
            if len(pos[name]) != n_pos:
                raise field_error(src, name, f"{len(pos[name])} values", f"{n_pos} (one per probe_position_indexes)")
            if not np.isfinite(pos[name].astype(np.float64)).all():
                raise field_error(src, name, "NaN or Inf values", "finite positions in metres")
        if "loss_epochs" in h5p and "loss_values" in h5p:
            meta["loss_epochs"] = np.asarray(h5p["loss_epochs"][()]).reshape(-1).tolist()
            meta["loss_values"] = np.asarray(h5p["loss_values"][()], dtype=np.float64).reshape(-1).tolist()

    # Pair by scan index: duplicate position indexes are averaged (as ptychodus does).
    uniq, inverse = np.unique(pos["probe_position_indexes"].astype(np.int64), return_inverse=True)
    counts = np.bincount(inverse)
    x_m = np.bincount(inverse, weights=pos["probe_position_x_m"].astype(np.float64)) / counts
    y_m = np.bincount(inverse, weights=pos["probe_position_y_m"].astype(np.float64)) / counts
    slot = np.clip(np.searchsorted(uniq, pattern_indexes), 0, max(len(uniq) - 1, 0))
    matched = uniq[slot] == pattern_indexes if len(uniq) else np.zeros(M, bool)
    if not matched.any():
        raise PtychoInputError(
            f"{product_path}: field 'probe_position_indexes': found no index matching the {M} pattern indexes of "
            f"{diffraction_path} (patterns {_span(pattern_indexes)}, positions {_span(uniq)}), expected the same scan indexes")
    if not matched.all():
        warnings.warn(f"{diffraction_path}: {int((~matched).sum())} of {M} patterns have no probe position in "
                      f"{product_path} (e.g. index {int(pattern_indexes[~matched][0])}); dropping them",
                      PtychodusWarning, stacklevel=3)
    rows = np.flatnonzero(matched)
    slot = slot[rows]
    H, W = obj.shape
    positions_px = np.stack([(x_m[slot] - meta["object_center_x_m"]) / meta["object_pixel_width_m"] + (W - 1) / 2,
                             (y_m[slot] - meta["object_center_y_m"]) / meta["object_pixel_height_m"] + (H - 1) / 2], axis=1)
    check_positions_inside(positions_px, H_det, (H, W), product_path)

    meta.update(det_px)
    meta.update(_index_metadata(pattern_indexes[rows]))
    meta["diffraction_file"], meta["product_file"] = diffraction_path, product_path
    scan = ScanData(patterns if len(rows) == M else _Rows(patterns, rows), probe, positions_px, (H, W), obj,
                    bad_pixels, {"ptychodus": meta}, diffraction_path, True, "patterns")
    if len(scan) * H_det * W_det <= limits.EAGER_CHECK_MAX_VALUES:  # small enough: check every value now
        scan.amplitude(slice(None))
    return scan


def _span(values: np.ndarray) -> str:
    return f"[{int(values.min())}, {int(values.max())}]" if len(values) else "[]"


def _index_metadata(indexes: np.ndarray) -> dict[str, Any]:
    """Scan indexes ``(M,)`` as compact JSON: ``index_start``/``index_step`` when arithmetic, else the list."""
    indexes = np.asarray(indexes, dtype=np.int64)
    step = int(indexes[1] - indexes[0]) if len(indexes) > 1 else 1
    if len(indexes) and step != 0 and np.array_equal(indexes, indexes[0] + step * np.arange(len(indexes))):
        return {"index_start": int(indexes[0]), "index_step": step}
    return {"indexes": indexes.tolist()}


def scan_indexes(scan: ScanData) -> np.ndarray:
    """Scan indexes ``(M,) int64`` of ``scan``'s patterns: from ptychodus metadata, else ``arange(M)``."""
    meta = scan.metadata.get("ptychodus", {}) if isinstance(scan.metadata, Mapping) else {}
    M = len(scan)
    if "indexes" in meta and len(meta["indexes"]) == M:
        return np.asarray(meta["indexes"], dtype=np.int64)
    if "index_start" in meta:
        return int(meta["index_start"]) + int(meta.get("index_step", 1)) * np.arange(M, dtype=np.int64)
    return np.arange(M, dtype=np.int64)


# --------------------------------------------------------------------------- geometry


def geometry_from_scan(scan: ScanData) -> dict[str, float]:
    """Geometry for writing ptychodus files from ``scan``.

    Taken from ``metadata["ptychodus"]`` (a scan read from ptychodus files, or an
    NPZ written by :func:`ptychodus_to_npz`) when present; otherwise the
    simulator's ``metadata["config"]`` supplies ``pixel_size_m`` (square object
    pixels) and ``energy_eV``; anything still missing takes the defaults
    (:data:`DEFAULT_GEOMETRY`): object pixel 20 nm x 20 nm, object centre
    (0, 0) m, detector distance 2.0 m, photon energy 8800 eV, probe photon
    count 0 and exposure time 0 s (ptychodus's "unknown").

    Returns the keys of :data:`DEFAULT_GEOMETRY` plus ``detector_pixel_width_m``
    and ``detector_pixel_height_m``; when the scan does not record the detector
    pixel, it follows from the far-field relation
    ``detector_pixel = wavelength * distance / (N * object_pixel)``.
    """
    meta = scan.metadata if isinstance(scan.metadata, Mapping) else {}
    geometry = dict(DEFAULT_GEOMETRY)
    config = meta.get("config") if isinstance(meta.get("config"), Mapping) else {}
    if config.get("pixel_size_m"):
        geometry["object_pixel_width_m"] = geometry["object_pixel_height_m"] = float(config["pixel_size_m"])
    if config.get("energy_eV"):
        geometry["photon_energy_eV"] = float(config["energy_eV"])
    recorded = meta.get("ptychodus") if isinstance(meta.get("ptychodus"), Mapping) else {}
    for key in (*DEFAULT_GEOMETRY, *_DETECTOR_KEYS):
        if recorded.get(key) is not None:
            geometry[key] = float(recorded[key])
    wavelength = wavelength_m(geometry["photon_energy_eV"])
    for axis in ("width", "height"):
        key = f"detector_pixel_{axis}_m"
        if geometry.get(key) is None:
            geometry[key] = wavelength * geometry["detector_object_distance_m"] / (scan.N * geometry[f"object_pixel_{axis}_m"])
    return geometry


# --------------------------------------------------------------------------- writing


def write_product(path: str | Path, *, obj: np.ndarray, probe: np.ndarray, positions_px: np.ndarray,
                  position_indexes: np.ndarray | None, geometry: Mapping[str, float],
                  loss_epochs: Sequence[int] = (), loss_values: Sequence[float] = (),
                  name: str = "ptycho_ml", comments: str = "") -> Path:
    """Atomically write a ptychodus 1.7.0 ``product.h5`` (opens with ``ptychodus.api.io.load_product``).

    obj: ``(H, W)`` complex (stored as ``(1, H, W)`` complex64).
    probe: ``(N, N)`` or ``(K, N, N)`` complex (stored as ``[1, K, N, N]``: one
    coherent mode, K incoherent modes), sampled at the object pixel size.
    positions_px: ``(M, 2)`` float patch centres (x, y) in object pixels, written
    in metres as ``x_m = (x_px - (W - 1) / 2) * pixel_width_m + center_x_m``.
    position_indexes: ``(M,)`` int scan indexes (None: ``0..M-1``).
    geometry: ``object_pixel_width_m``, ``object_pixel_height_m``,
    ``detector_object_distance_m``, ``photon_energy_eV`` (required);
    ``object_center_x_m``, ``object_center_y_m``, ``probe_photon_count``,
    ``exposure_time_s`` (default 0). :func:`geometry_from_scan` builds one.
    loss_epochs, loss_values: ``(E,)`` loss history (both always written).
    """
    path = Path(path)
    obj = np.asarray(obj)
    probe = np.asarray(probe)
    positions_px = np.asarray(positions_px, dtype=np.float64)
    missing = [k for k in _REQUIRED_GEOMETRY if geometry.get(k) is None]
    if missing:
        raise PtychoInputError(f"write_product: geometry: found no {missing}, expected {list(_REQUIRED_GEOMETRY)} "
                               "(use geometry_from_scan)")
    if obj.ndim != 2 or not np.iscomplexobj(obj):
        raise PtychoInputError(f"write_product: obj: found shape {obj.shape} dtype {obj.dtype}, expected (H, W) complex")
    if probe.ndim not in (2, 3) or not np.iscomplexobj(probe):
        raise PtychoInputError(f"write_product: probe: found shape {probe.shape} dtype {probe.dtype}, expected (N, N) or (K, N, N) complex")
    if positions_px.ndim != 2 or positions_px.shape[1] != 2 or not np.isfinite(positions_px).all():
        raise PtychoInputError(f"write_product: positions_px: found shape {positions_px.shape}, expected finite (M, 2) (x, y)")
    M = len(positions_px)
    indexes = np.arange(M, dtype=np.int64) if position_indexes is None else np.asarray(position_indexes, dtype=np.int64).reshape(-1)
    if len(indexes) != M:
        raise PtychoInputError(f"write_product: position_indexes: found {len(indexes)}, expected {M} (one per position)")
    if len(loss_epochs) != len(loss_values):
        raise PtychoInputError(f"write_product: loss_epochs/loss_values: found lengths {len(loss_epochs)} and {len(loss_values)}, expected equal")
    g = {k: float(geometry.get(k) or 0.0) for k in DEFAULT_GEOMETRY}
    H, W = obj.shape
    x_m = (positions_px[:, 0] - (W - 1) / 2) * g["object_pixel_width_m"] + g["object_center_x_m"]  # (M,) float64
    y_m = (positions_px[:, 1] - (H - 1) / 2) * g["object_pixel_height_m"] + g["object_center_y_m"]

    with atomic_h5(path) as h5:
        attrs = {"name": str(name), "comments": str(comments),
                 "detector_object_distance_m": g["detector_object_distance_m"], "photon_energy_eV": g["photon_energy_eV"],
                 "probe_photon_count": g["probe_photon_count"], "exposure_time_s": g["exposure_time_s"],
                 "mass_attenuation_m2_per_kg": 0.0, "tomography_angle_deg": 0.0, "focus_object_distance_m": 0.0,
                 "tilt_angle_deg": 0.0, "far_field": True}
        h5.attrs.update(attrs)
        h5.create_dataset("probe_position_indexes", data=indexes)
        h5.create_dataset("probe_position_x_m", data=x_m)
        h5.create_dataset("probe_position_y_m", data=y_m)
        h5_probe = h5.create_dataset("probe", data=probe.astype(np.complex64).reshape((1, -1) + probe.shape[-2:]))
        h5_probe.attrs["pixel_width_m"] = g["object_pixel_width_m"]
        h5_probe.attrs["pixel_height_m"] = g["object_pixel_height_m"]
        h5_obj = h5.create_dataset("object", data=np.asarray(obj, dtype=np.complex64)[None])
        h5_obj.attrs.update({"center_x_m": g["object_center_x_m"], "center_y_m": g["object_center_y_m"],
                             "pixel_width_m": g["object_pixel_width_m"], "pixel_height_m": g["object_pixel_height_m"]})
        h5.create_dataset("object_layer_spacing_m", data=np.zeros(0, np.float64))
        h5.create_dataset("loss_epochs", data=np.asarray(loss_epochs, dtype=np.int64).reshape(-1))
        h5.create_dataset("loss_values", data=np.asarray(loss_values, dtype=np.float64).reshape(-1))
    return path


def write_diffraction(path: str | Path, scan: ScanData, batch: int = 1024, dtype: Any = np.uint32,
                      compression: str | None = "lzf") -> Path:
    """Atomically write a ptychodus 1.7.0 ``diffraction.h5`` from ``scan``, streamed ``batch`` patterns at a time.

    ``patterns (M, N, N)`` holds counts: the file's own counts when ``scan`` was
    read as integer counts, else ``round(amplitude**2)`` in ``dtype`` (uint32 by
    default; a float dtype stores ``amplitude**2`` unrounded). One pattern per
    HDF5 chunk (random access reads one pattern). Also writes ``indexes (M,)``
    (:func:`scan_indexes`), ``bad_pixels (N, N)`` bool (all False when none) and
    the detector pixel size attributes from :func:`geometry_from_scan`.
    """
    path = Path(path)
    dtype = np.dtype(dtype)
    raw_counts = scan.patterns_are_counts and np.issubdtype(scan.patterns.dtype, np.integer)
    out_dtype = np.dtype(scan.patterns.dtype) if raw_counts else dtype
    M, N = len(scan), scan.N
    geometry = geometry_from_scan(scan)
    with atomic_h5(path) as h5:
        h5.create_dataset("indexes", data=scan_indexes(scan))
        ds = h5.create_dataset("patterns", shape=(M, N, N), dtype=out_dtype, chunks=(1, N, N), compression=compression)
        for key in _DETECTOR_KEYS:
            ds.attrs[key] = geometry[key]
        for start in range(0, M, batch):
            sl = slice(start, min(start + batch, M))
            if raw_counts:
                block = np.asarray(scan.patterns[sl])
            else:
                intensity = np.square(scan.amplitude(sl).astype(np.float64))
                if np.issubdtype(out_dtype, np.integer):
                    intensity = np.round(intensity)
                    if intensity.size and intensity.max() > np.iinfo(out_dtype).max:
                        raise PtychoInputError(f"{scan.source}: field '{scan.patterns_field}': found counts up to "
                                               f"{intensity.max():.3g}, expected at most {np.iinfo(out_dtype).max} for {out_dtype}")
                block = intensity.astype(out_dtype)
            ds[sl] = block
        bad = np.zeros((N, N), bool) if scan.bad_pixels is None else np.asarray(scan.bad_pixels, bool)
        h5.create_dataset("bad_pixels", data=bad)
    return path


def npz_to_ptychodus(scan: ScanData, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``scan`` as ``out_dir/diffraction.h5`` + ``out_dir/product.h5``; returns both paths.

    The product's object is ``scan.obj`` (ones when absent), geometry from
    :func:`geometry_from_scan`, name/comments from a recorded ptychodus product.
    """
    out_dir = Path(out_dir)
    recorded = scan.metadata.get("ptychodus", {}) if isinstance(scan.metadata, Mapping) else {}
    diffraction = write_diffraction(out_dir / DIFFRACTION_FILE, scan)
    obj = scan.obj if scan.obj is not None else np.ones(scan.obj_shape, np.complex64)
    product = write_product(out_dir / PRODUCT_FILE, obj=obj, probe=scan.probe, positions_px=scan.positions_px,
                            position_indexes=scan_indexes(scan), geometry=geometry_from_scan(scan),
                            name=str(recorded.get("name", "ptycho_ml")), comments=str(recorded.get("comments", "")))
    return diffraction, product


def ptychodus_to_npz(scan: ScanData, out_path: str | Path, batch: int = 1024) -> Path:
    """Write ``scan`` as a PtychoPINN NPZ, streamed ``batch`` patterns at a time
    (:func:`ptycho_ml.data.ptychopinn.write_ptychopinn`).

    Keeps the probe (all modes), positions, the object (when the scan has one),
    the bad detector pixels (when any) and the metadata, with the ptychodus
    geometry, so :func:`npz_to_ptychodus` can write it back.
    """
    def chunks() -> Iterator[np.ndarray]:
        for _, amplitude in scan.iter_batches(batch):
            yield amplitude

    return write_ptychopinn(out_path, amplitude_chunks=((len(scan), scan.N, scan.N), chunks), probe=scan.probe,
                            positions_px=scan.positions_px, obj=scan.obj, bad_pixels=scan.bad_pixels,
                            metadata=scan.metadata)
