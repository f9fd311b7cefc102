"""The model artifact ``wts.h5.zip``: write, read and inspect (docs/architecture.md, "The model bundle").

A zip whose members are exactly ``manifest.json`` and ``wts.h5``. The HDF5
file (readable with ``h5ls``) holds::

    /diffraction_to_obj/<state-dict key>   one dataset per parameter/buffer
    /autoencoder/<state-dict key>          (keys keep their dots, in order)
    /probe                                 (N, N) or (K, N, N) complex64
    attrs: amplitude_scale (float64 > 0), config_json, extra_json (str),
           format_version (int)

``manifest.json`` records the format, its version, ``backend: "torch"``, the
package version, the sha256 and size of ``wts.h5`` and per-model array counts.

This module uses numpy/h5py/zipfile/json only; it knows nothing of torch or
MLflow. Reading never unpickles: member names are checked (zip-slip, extra
members such as pickles) before anything is read, the checksum is verified,
and weights are read with h5py as plain numeric arrays. Every problem a file
can have is a one-line :class:`PtychoInputError`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import os
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ptycho_ml.version import __version__
from ptycho_ml.data.atomic import atomic_path, zip_entry
from ptycho_ml.errors import PtychoInputError, field_error

FORMAT = "ptycho_ml.wts.h5.zip"
FORMAT_VERSION = 1
BACKEND = "torch"
REQUIRED_MODELS = ("diffraction_to_obj", "autoencoder")
MANIFEST = "manifest.json"
WEIGHTS = "wts.h5"
MEMBERS = (MANIFEST, WEIGHTS)

_NUMERIC_KINDS = "biufc"  # bool, int, uint, float, complex
_PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".bin", ".joblib", ".dill", ".npy", ".npz")
_MAX_MANIFEST_BYTES = 1 << 20
_ONLY = f"only members '{MANIFEST}' and '{WEIGHTS}'"


@dataclass
class Bundle:
    """A loaded ``wts.h5.zip``.

    models: model name -> {state-dict key: array}, dtypes as written.
    probe: (N, N) or (K, N, N) complex64.
    amplitude_scale: float > 0 (multiplies network amplitudes into counts).
    config: JSON-safe dict (model/physics/training config).
    manifest: the parsed ``manifest.json``.
    extra: JSON-safe dict (metrics, training summary); ``{}`` if none.
    """

    models: dict[str, dict[str, np.ndarray]]
    probe: np.ndarray
    amplitude_scale: float
    config: dict
    manifest: dict
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- writing


def write_bundle(path: str | os.PathLike, *, models: Mapping[str, Mapping[str, Any]], probe: Any,
                 amplitude_scale: float, config: Mapping, extra: Mapping | None = None) -> Path:
    """Validate and atomically write a ``wts.h5.zip``; return its path.

    models: name -> {key: numeric array} (bool/int/uint/float/complex, any
    shape); must include every name in :data:`REQUIRED_MODELS`.
    probe: (N, N) or (K, N, N), finite; stored as complex64.
    amplitude_scale: finite float > 0.
    config: dict, strict JSON (no NaN/inf). extra: dict, JSON (NaN allowed for
    diverged metrics). Raises :class:`PtychoInputError` on invalid input; on
    any error no partial file is left and an existing ``path`` is untouched.
    """
    path = Path(path)
    arrays = _check_models(models)
    probe_c64 = _check_probe(probe)
    scale = _check_scale(amplitude_scale)
    config_json = _to_json("config", config, allow_nan=False)
    extra_json = _to_json("extra", {} if extra is None else extra, allow_nan=True)
    h5_bytes = _h5_image(arrays, probe_c64, scale, config_json, extra_json)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backend": BACKEND,
        "package_version": __version__,
        "created_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "members": {WEIGHTS: {"sha256": hashlib.sha256(h5_bytes).hexdigest(), "size": len(h5_bytes)}},
        "models": {name: _counts(state.values()) for name, state in arrays.items()},
        # Per-weight shapes, so a missing or reshaped weight is refused by name. A top-level key:
        # readers that predate it ignore it.
        "shapes": {name: {k: list(a.shape) for k, a in state.items()} for name, state in arrays.items()},
    }
    _atomic_write_zip(path, {MANIFEST: json.dumps(manifest, indent=2).encode("utf-8"), WEIGHTS: h5_bytes})
    return path


def _bad_name(name: object) -> bool:
    return not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\x00" in name


def _check_models(models: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, np.ndarray]]:
    if not isinstance(models, Mapping):
        raise field_error("write_bundle", "models", type(models).__name__, "a dict of model name -> state dict")
    missing = [m for m in REQUIRED_MODELS if m not in models]
    if missing:
        raise field_error("write_bundle", "models", f"models {sorted(map(str, models))} (missing {missing})",
                          f"all of {list(REQUIRED_MODELS)}")
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, state in models.items():
        if _bad_name(name) or name == "probe":
            raise field_error("write_bundle", "models", f"model name {name!r}",
                              "a non-empty name without '/' other than 'probe'")
        if not isinstance(state, Mapping) or not state:
            raise field_error("write_bundle", f"models['{name}']", f"{type(state).__name__} of length "
                              f"{len(state) if isinstance(state, Mapping) else 'n/a'}", "a non-empty dict of arrays")
        out[name] = {}
        for key, value in state.items():
            if _bad_name(key):
                raise field_error("write_bundle", f"models['{name}']", f"array name {key!r}",
                                  "a non-empty name without '/' (dots are fine)")
            array = np.asarray(value)
            if array.dtype.kind not in _NUMERIC_KINDS:
                raise field_error("write_bundle", f"models['{name}']['{key}']", f"dtype {array.dtype}",
                                  "a numeric array (bool/int/uint/float/complex)")
            out[name][key] = array
    return out


def _check_probe(probe: Any) -> np.ndarray:
    array = np.asarray(probe)
    if array.dtype.kind not in "fc":
        raise field_error("write_bundle", "probe", f"dtype {array.dtype}", "a complex (or real) float array")
    if array.ndim not in (2, 3) or array.shape[-1] != array.shape[-2] or array.size == 0:
        raise field_error("write_bundle", "probe", f"shape {array.shape}", "(N, N) or (K, N, N) with N, K > 0")
    if not np.isfinite(array).all():
        raise field_error("write_bundle", "probe", "non-finite values", "finite values")
    return np.ascontiguousarray(array, dtype=np.complex64)


def _check_scale(amplitude_scale: Any) -> float:
    try:
        if isinstance(amplitude_scale, (bool, np.bool_)):
            raise TypeError
        scale = float(amplitude_scale)
    except (TypeError, ValueError):
        raise field_error("write_bundle", "amplitude_scale", repr(amplitude_scale), "a finite float > 0") from None
    if not (math.isfinite(scale) and scale > 0):
        raise field_error("write_bundle", "amplitude_scale", repr(scale), "a finite float > 0")
    return scale


def _to_json(name: str, value: Any, *, allow_nan: bool) -> str:
    if not isinstance(value, Mapping):
        raise field_error("write_bundle", name, type(value).__name__, "a dict")
    try:
        return json.dumps(dict(value), allow_nan=allow_nan)
    except (TypeError, ValueError) as exc:
        raise field_error("write_bundle", name, f"non-JSON content ({exc})",
                          "a JSON-safe dict" + ("" if allow_nan else " (no NaN/inf)")) from None


def _counts(arrays: Any) -> dict[str, int]:
    arrays = list(arrays)
    return {"n_arrays": len(arrays), "n_values": int(sum(int(a.size) for a in arrays))}


def weight_mismatch(expected: Mapping[str, Any], found: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first difference between two ``{weight name: shape}`` maps, as ``(found, expected)`` text, or None.

    Names the weight: a missing one, an extra one, or one whose shape differs.
    """
    for key, shape in expected.items():
        if key not in found:
            return f"no weight '{key}'", f"'{key}' of shape {list(shape)}"
        if list(found[key]) != list(shape):
            return f"weight '{key}' of shape {list(found[key])}", f"shape {list(shape)}"
    for key, shape in found.items():
        if key not in expected:
            return f"an extra weight '{key}' of shape {list(shape)}", "only the listed weights"
    return None


def _h5_image(models: dict[str, dict[str, np.ndarray]], probe: np.ndarray, scale: float,
              config_json: str, extra_json: str) -> bytes:
    """Return the bytes of ``wts.h5``, built in memory (insertion order tracked)."""
    buf = io.BytesIO()
    with h5py.File(buf, "w", track_order=True) as f:
        for name, state in models.items():
            group = f.create_group(name, track_order=True)
            for key, array in state.items():
                group.create_dataset(key, data=array)
        f.create_dataset("probe", data=probe)
        f.attrs["format_version"] = np.int64(FORMAT_VERSION)
        f.attrs["amplitude_scale"] = np.float64(scale)
        f.attrs["config_json"] = config_json
        f.attrs["extra_json"] = extra_json
    return buf.getvalue()


def _atomic_write_zip(path: Path, members: dict[str, bytes]) -> None:
    """Write an uncompressed zip with fixed timestamps beside ``path``, fsync, rename (atomic and durable)."""
    with atomic_path(path, durable=True) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(zip_entry(name), data)


# ----------------------------------------------------------------------------- reading


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Load a ``wts.h5.zip`` after verifying names, manifest and checksum; never unpickles.

    Returns a :class:`Bundle` whose arrays have the dtypes and shapes written.
    Raises :class:`PtychoInputError` (one line, naming the file) for any
    invalid, truncated, tampered or unsafe archive.
    """
    path = Path(path)
    manifest, h5_bytes, _ = _open_archive(path)
    content = _read_h5(path, h5_bytes, manifest, load=True)
    return Bundle(models=content["models"], probe=content["probe"], amplitude_scale=content["amplitude_scale"],
                  config=content["config"], manifest=manifest, extra=content["extra"])


def inspect_bundle(path: str | os.PathLike) -> dict:
    """Summarise a ``wts.h5.zip`` with the same checks as :func:`read_bundle`, without loading weights.

    Returns a JSON-safe dict: ``path``, ``manifest``, ``members`` (name ->
    size in bytes), ``format_version``, ``amplitude_scale``, ``probe``
    (shape, dtype), ``models`` (name -> n_arrays, n_values and per-array
    shape/dtype), ``config`` and ``extra``.
    """
    path = Path(path)
    manifest, h5_bytes, sizes = _open_archive(path)
    content = _read_h5(path, h5_bytes, manifest, load=False)
    return {"path": str(path), "manifest": manifest, "members": sizes, "format_version": FORMAT_VERSION, **content}


def _open_archive(path: Path) -> tuple[dict, bytes, dict[str, int]]:
    """Check the zip's member names, read and check the manifest, read ``wts.h5`` and verify its sha256."""
    if not path.exists():
        raise PtychoInputError(f"{path}: file not found, expected a wts.h5.zip model bundle")
    if not path.is_file():
        raise PtychoInputError(f"{path}: found a directory or special file, expected a wts.h5.zip model bundle")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, EOFError):
        raise _not_a_zip(path) from None
    with zf:
        infos = zf.infolist()
        names = [info.filename for info in infos]
        for name in names:  # zip-slip: before reading anything
            if ".." in name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or "\x00" in name:
                raise PtychoInputError(f"{path}: unsafe member name {name!r} (path traversal or absolute path), "
                                       f"expected {_ONLY}; nothing was read")
        for name in names:
            if name not in MEMBERS:
                kind = " (a pickle)" if name.lower().endswith(_PICKLE_SUFFIXES) else ""
                raise PtychoInputError(f"{path}: unexpected member {name!r}{kind}, expected {_ONLY}; "
                                       "pickles are never loaded")
            if names.count(name) > 1:
                raise PtychoInputError(f"{path}: member {name!r} appears {names.count(name)} times, expected once")
        for name in MEMBERS:
            if name not in names:
                raise PtychoInputError(f"{path}: member '{name}' is missing (found {names}), expected {_ONLY}")
        manifest = _parse_manifest(path, _read_member(path, zf, MANIFEST, _MAX_MANIFEST_BYTES))
        entry = manifest["members"][WEIGHTS]
        h5_bytes = _read_member(path, zf, WEIGHTS, entry["size"])
        sizes = {info.filename: info.file_size for info in infos}
    digest = hashlib.sha256(h5_bytes).hexdigest()
    if digest != entry["sha256"] or len(h5_bytes) != entry["size"]:
        raise PtychoInputError(f"{path}: member '{WEIGHTS}' fails its sha256 checksum: found {digest} "
                               f"({len(h5_bytes)} bytes), expected {entry['sha256']} ({entry['size']} bytes) "
                               "from manifest.json; the file is corrupt or was modified")
    return manifest, h5_bytes, sizes


def _not_a_zip(path: Path) -> PtychoInputError:
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(b"PK\x03\x04"):
        return PtychoInputError(f"{path}: truncated or corrupt zip archive (zip headers but no valid central "
                                f"directory, {path.stat().st_size} bytes), expected a complete wts.h5.zip")
    found = ("an empty file" if not head else "a bare HDF5 file" if head.startswith(b"\x89HDF")
             else f"leading bytes {head!r}")
    return PtychoInputError(f"{path}: not a zip archive: found {found}, expected a wts.h5.zip "
                            f"(zip of {MANIFEST} and {WEIGHTS})")


def _read_member(path: Path, zf: zipfile.ZipFile, name: str, max_size: int) -> bytes:
    info = zf.getinfo(name)
    if info.file_size > max_size:
        raise PtychoInputError(f"{path}: member '{name}' is {info.file_size} bytes, expected at most {max_size}")
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError, RuntimeError, NotImplementedError) as exc:
        raise PtychoInputError(f"{path}: member '{name}' is truncated or corrupt ({exc}), "
                               "expected a complete wts.h5.zip") from None


def _parse_manifest(path: Path, raw: bytes) -> dict:
    """Parse ``manifest.json`` and check format, version, backend, members and models."""
    src = str(path)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PtychoInputError(f"{path}: member '{MANIFEST}' is not valid JSON ({exc}), "
                               "expected a JSON object") from None
    if not isinstance(manifest, dict):
        raise field_error(src, MANIFEST, f"a JSON {type(manifest).__name__}", "a JSON object")
    if manifest.get("format") != FORMAT:
        raise field_error(src, f"{MANIFEST}:format", repr(manifest.get("format")), repr(FORMAT))
    version = manifest.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise field_error(src, f"{MANIFEST}:format_version", repr(version),
                          f"{FORMAT_VERSION} (the only version supported by ptycho_ml {__version__})")
    if manifest.get("backend") != BACKEND:
        raise field_error(src, f"{MANIFEST}:backend", repr(manifest.get("backend")), repr(BACKEND))
    members = manifest.get("members")
    entry = members.get(WEIGHTS) if isinstance(members, dict) else None
    if (not isinstance(members, dict) or set(members) != {WEIGHTS} or not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64
            or type(entry.get("size")) is not int or entry["size"] < 0):
        raise field_error(src, f"{MANIFEST}:members", json.dumps(members)[:200],
                          f'{{"{WEIGHTS}": {{"sha256": <64 hex>, "size": <bytes>}}}}')
    models = manifest.get("models")
    if not isinstance(models, dict) or not all(
            isinstance(c, dict) and type(c.get("n_arrays")) is int and type(c.get("n_values")) is int
            for c in models.values()):
        raise field_error(src, f"{MANIFEST}:models", json.dumps(models)[:200],
                          '{name: {"n_arrays": int, "n_values": int}}')
    if "shapes" in manifest and not (isinstance(manifest["shapes"], dict)
                                     and all(_shapes_ok(v) for v in manifest["shapes"].values())):
        raise field_error(src, f"{MANIFEST}:shapes", json.dumps(manifest["shapes"])[:200],
                          '{model: {weight: [dim, ...]}}')
    return manifest


def _shapes_ok(shapes: Any) -> bool:
    """``{weight name: [dim, ...]}`` (recorded since 0.1.0; older manifests have counts only)."""
    return isinstance(shapes, dict) and all(
        isinstance(v, list) and all(type(d) is int and d >= 0 for d in v) for v in shapes.values())


def _read_h5(path: Path, h5_bytes: bytes, manifest: dict, *, load: bool) -> dict:
    """Walk ``wts.h5``: check attributes, probe and model groups; load arrays or describe them."""
    try:
        f = h5py.File(io.BytesIO(h5_bytes), "r")
    except OSError as exc:
        raise PtychoInputError(f"{path}: member '{WEIGHTS}' is not a readable HDF5 file "
                               f"({' '.join(str(exc).split())}), expected HDF5 written by ptycho_ml") from None
    try:
        with f:
            return _walk_h5(path, f, manifest, load=load)
    except PtychoInputError:
        raise
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise PtychoInputError(f"{path}: member '{WEIGHTS}' is unreadable ({' '.join(str(exc).split())}), "
                               "expected HDF5 written by ptycho_ml") from None


def _walk_h5(path: Path, f: h5py.File, manifest: dict, *, load: bool) -> dict:
    src = str(path)

    def attr(name: str, ok: Any, expected: str) -> Any:
        if name not in f.attrs:
            raise field_error(src, f"{WEIGHTS}:/@{name}", "no such attribute", expected)
        value = f.attrs[name]
        if not ok(value):
            shown = value.item() if isinstance(value, np.generic) else value
            raise field_error(src, f"{WEIGHTS}:/@{name}", f"{shown!r:.80} ({type(value).__name__})", expected)
        return value

    def json_dict(value: Any) -> bool:
        try:
            return isinstance(value, str) and isinstance(json.loads(value), dict)
        except json.JSONDecodeError:
            return False

    attr("format_version", lambda v: isinstance(v, (int, np.integer)) and not isinstance(v, bool)
         and int(v) == FORMAT_VERSION, f"{FORMAT_VERSION}")
    scale = float(attr("amplitude_scale", lambda v: isinstance(v, (float, np.floating))
                       and math.isfinite(v) and v > 0, "a finite float > 0"))
    config = json.loads(attr("config_json", json_dict, "a JSON object string"))
    extra = json.loads(attr("extra_json", json_dict, "a JSON object string"))

    groups: dict[str, h5py.Group] = {}
    probe_ds = None
    for name in f:
        obj = _hard(src, f, name)
        if isinstance(obj, h5py.Group):
            groups[name] = obj
        elif name == "probe":
            probe_ds = obj
        else:
            raise field_error(src, f"{WEIGHTS}:/{name}", "an unexpected root dataset", "model groups and 'probe'")
    for name in REQUIRED_MODELS:
        if name not in groups:
            raise field_error(src, f"{WEIGHTS}:/{name}", f"no such group (groups: {sorted(groups)})",
                              "a group of weight datasets")
    if probe_ds is None:
        raise field_error(src, f"{WEIGHTS}:/probe", "no such dataset", "(N, N) or (K, N, N) complex64")
    shape = probe_ds.shape
    if (probe_ds.dtype != np.complex64 or shape is None or len(shape) not in (2, 3)
            or shape[-1] != shape[-2] or 0 in shape):
        raise field_error(src, f"{WEIGHTS}:/probe", f"{probe_ds.dtype} {shape}", "(N, N) or (K, N, N) complex64")

    models: dict[str, Any] = {}
    for name, group in groups.items():
        datasets = {key: _weight(src, group, name, key) for key in group}
        recorded = manifest["models"].get(name) or {}
        shapes = manifest.get("shapes", {}).get(name)
        mismatch = weight_mismatch(shapes, {k: ds.shape for k, ds in datasets.items()}) if shapes is not None else None
        if mismatch:
            raise field_error(src, f"{WEIGHTS}:/{name}", mismatch[0], f"{mismatch[1]} as listed in {MANIFEST}")
        counts = _counts(ds for ds in datasets.values())
        if {k: recorded.get(k) for k in counts} != counts:
            raise field_error(src, f"{MANIFEST}:models.{name}", json.dumps({k: recorded.get(k) for k in counts}),
                              f"{json.dumps(counts)} as found in {WEIGHTS}")
        if load:
            models[name] = {key: np.asarray(ds[()]) for key, ds in datasets.items()}
        else:
            models[name] = {**counts, "arrays": {k: {"shape": list(ds.shape), "dtype": str(ds.dtype)}
                                                 for k, ds in datasets.items()}}
    if set(manifest["models"]) != set(groups):
        raise field_error(src, f"{MANIFEST}:models", f"models {sorted(manifest['models'])}",
                          f"the groups in {WEIGHTS}: {sorted(groups)}")
    probe = np.asarray(probe_ds[()]) if load else {"shape": list(shape), "dtype": str(probe_ds.dtype)}
    return {"models": models, "probe": probe, "amplitude_scale": scale, "config": config, "extra": extra}


def _hard(src: str, group: h5py.Group, name: str) -> h5py.Group | h5py.Dataset:
    """Return ``group[name]`` if it is a hard link (soft/external links could reach other files)."""
    link = group.get(name, getlink=True)
    if not isinstance(link, h5py.HardLink):
        raise field_error(src, f"{WEIGHTS}:{group.name.rstrip('/')}/{name}", f"a {type(link).__name__}",
                          "a plain dataset or group (no soft or external links)")
    return group[name]


def _weight(src: str, group: h5py.Group, model: str, key: str) -> h5py.Dataset:
    """Return the weight dataset ``/{model}/{key}`` after checking it is plain numeric, in-file data."""
    ds = _hard(src, group, key)
    where = f"{WEIGHTS}:/{model}/{key}"
    if not isinstance(ds, h5py.Dataset):
        raise field_error(src, where, "a nested group", "a weight dataset")
    if ds.dtype.kind not in _NUMERIC_KINDS or ds.dtype.hasobject or ds.dtype.names is not None:
        raise field_error(src, where, f"dtype {ds.dtype}", "a numeric dtype (bool/int/uint/float/complex)")
    if ds.shape is None or ds.is_virtual or ds.external:
        raise field_error(src, where, "a null, virtual or external dataset", "array data stored in the file")
    return ds
