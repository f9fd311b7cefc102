"""``load_scan(path)``: open any scan a user brings, by what the file is, and return :class:`ScanData`.

Dispatch on the file's magic bytes: an NPZ or an HDF5 file with the
PtychoPINN keys (:mod:`ptycho_ml.data.ptychopinn`), or a ptychodus 1.7.0
``diffraction.h5`` + ``product.h5`` pair (:mod:`ptycho_ml.data.ptychodus`).
Local paths and ``s3://`` URIs alike (:mod:`ptycho_ml.data.storage`).
"""

from __future__ import annotations

from pathlib import Path

from ptycho_ml.data.ptychopinn import IntensityWarning, read_ptychopinn_hdf5, read_ptychopinn_npz
from ptycho_ml.data.scan import ScanData
from ptycho_ml.errors import PtychoInputError

__all__ = ["IntensityWarning", "load_scan", "sniff_format"]

ZIP_MAGIC = b"PK\x03\x04"
HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


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
        return read_ptychopinn_npz(path)
    import h5py

    try:
        with h5py.File(path, "r") as h5:
            is_ptychodus = "patterns" in h5
    except OSError as exc:
        raise PtychoInputError(f"{path}: unreadable HDF5 file ({exc}), expected a valid (not truncated) HDF5 scan") from None
    if is_ptychodus:
        from ptycho_ml.data.ptychodus import load_ptychodus_pair

        return load_ptychodus_pair(path, local_path(str(product)) if product else None)
    return read_ptychopinn_hdf5(path)


