"""Atomic file writes (write beside the target, then rename; a failed write leaves nothing behind)
and fixed-timestamp zip entries (the same content gives the same bytes).

Every writer of the package goes through these: NPZ (:mod:`ptycho_ml.data.npz`),
HDF5 (object.h5, ptychodus files) and the ``wts.h5.zip`` bundle.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: The zip timestamp of every entry we write (the zip epoch), so equal data give equal bytes.
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path, durable: bool = False) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    The finished file gets the usual permissions (``0666 & ~umask``), not mkstemp's 0600.
    An existing file at ``path`` is untouched unless the write succeeds.
    ``durable``: fsync the file and its directory, so the rename survives a crash.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    if durable:
        _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    try:  # make the rename durable where the platform allows it
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


@contextmanager
def atomic_h5(path: str | Path) -> Iterator[Any]:
    """An h5py file written beside ``path`` and renamed onto it only when the block succeeds."""
    import h5py

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        yield h5


def zip_entry(name: str) -> zipfile.ZipInfo:
    """An uncompressed zip entry with the fixed timestamp and ``0644`` permissions."""
    info = zipfile.ZipInfo(name, date_time=FIXED_ZIP_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o644 << 16
    return info
