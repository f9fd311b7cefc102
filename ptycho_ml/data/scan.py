"""The validated scan type every reader returns and every consumer uses."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ptycho_ml.data.storage import file_sha256
from ptycho_ml.errors import PtychoInputError, field_error


@dataclass
class ScanData:
    """One ptychographic scan.

    Attributes
    ----------
    patterns: ``(M, N, N)`` array-like (ndarray, on-disk NPZ member or h5py dataset).
        Diffraction **amplitude** when ``patterns_are_counts`` is False,
        photon counts (converted to amplitude per batch) when True.
    probe: ``(N, N)`` or ``(K, N, N)`` complex64.
    positions_px: ``(M, 2)`` float64 patch centres (x = column, y = row).
    obj_shape: ``(H, W)`` of the object canvas in pixels.
    obj: optional ``(H, W)`` complex64 ground truth or initial guess (an
        ndarray, or for a large NPZ member an on-disk array that
        ``np.asarray`` loads when a metric needs it).
    bad_pixels: optional ``(N, N)`` bool, True where the detector pixel is bad.
    metadata: free-form JSON-safe dict (generator parameters, geometry...).
    source: where it came from (path or URI), for error messages and fingerprints.
    """

    patterns: Any
    probe: np.ndarray
    positions_px: np.ndarray
    obj_shape: tuple[int, int]
    obj: np.ndarray | None = None
    bad_pixels: np.ndarray | None = None
    metadata: dict = field(default_factory=dict)
    source: str = "<memory>"
    patterns_are_counts: bool = False
    patterns_field: str = "diffraction"

    def __len__(self) -> int:
        return int(self.patterns.shape[0])

    @property
    def N(self) -> int:
        return int(self.patterns.shape[-1])

    @property
    def good_pixels(self) -> np.ndarray | None:
        """``(N, N)`` bool mask of usable detector pixels, or None when all are good."""
        return None if self.bad_pixels is None else ~self.bad_pixels

    def amplitude(self, indices: np.ndarray | slice) -> np.ndarray:
        """Diffraction amplitudes of the selected patterns, ``(B, N, N) float32``.

        Reads only those patterns (memory bounded by the batch) and checks them
        for NaN/Inf/negative values, so a bad value in a huge file is still
        reported by name even though the file was never loaded whole.
        """
        if isinstance(indices, slice):
            block = np.asarray(self.patterns[indices])
        else:
            block = take_rows(lambda rows: self.patterns[rows], indices, self.patterns.shape[1:], self.patterns.dtype)
        block = np.array(block, dtype=np.float32)  # a private, writable copy of just this batch
        check_values(block, self.source, self.patterns_field)
        return np.sqrt(block) if self.patterns_are_counts else block

    def iter_batches(self, batch_size: int) -> Iterator[tuple[slice, np.ndarray]]:
        """Yield ``(slice, amplitude (B, N, N) float32)`` in scan order."""
        for start in range(0, len(self), batch_size):
            sl = slice(start, min(start + batch_size, len(self)))
            yield sl, self.amplitude(sl)

    def subset(self, indices: np.ndarray) -> "ScanData":
        """A scan with only the given patterns (loaded into memory)."""
        return ScanData(self.amplitude(np.sort(indices)), self.probe, self.positions_px[np.sort(indices)],
                        self.obj_shape, self.obj, self.bad_pixels, dict(self.metadata), self.source,
                        False, self.patterns_field)


def take_rows(read_sorted: Callable[[np.ndarray], Any], indices: Any, row_shape: tuple[int, ...],
              dtype: Any) -> np.ndarray:
    """``array[indices]`` for indices in any order, with repeats, reading each distinct row once.

    ``read_sorted(rows)`` reads strictly increasing int64 ``rows`` (what h5py
    and on-disk NPZ members need); the block is then expanded to the
    requested order and shape ``indices.shape + row_shape``.
    """
    indices = np.asarray(indices, dtype=np.int64)
    unique, inverse = np.unique(indices, return_inverse=True)
    if not len(unique):
        return np.empty(indices.shape + tuple(row_shape), dtype)
    return np.asarray(read_sorted(unique))[inverse.reshape(indices.shape)]


def check_values(block: np.ndarray, source: str, name: str) -> None:
    """Raise the house-style error for NaN, Inf or negative values in ``block``."""
    if block.size == 0:
        return
    if not np.isfinite(block).all():
        bad = "NaN" if np.isnan(block).any() else "Inf"
        raise field_error(source, name, f"{bad} values", "finite amplitudes")
    if (block < 0).any():
        raise field_error(source, name, f"negative values (min {float(block.min()):.3g})", "amplitudes >= 0")


def derive_obj_shape(positions_px: np.ndarray, N: int) -> tuple[int, int]:
    """Smallest object canvas ``(H, W)`` that holds every patch (plus the interpolation margin)."""
    if len(positions_px) == 0:
        return (N + 2, N + 2)
    max_x, max_y = positions_px.max(axis=0)
    return (int(np.floor(max_y + N / 2)) + 2, int(np.floor(max_x + N / 2)) + 2)


def check_positions_inside(positions_px: np.ndarray, N: int, obj_shape: tuple[int, int], source: str) -> None:
    """Every patch must lie inside the object; name the first offender otherwise."""
    H, W = obj_shape
    top_left = positions_px - N / 2
    frac = (top_left - np.floor(top_left) > 0).astype(np.float64)
    bottom_right = np.floor(top_left) + N - 1 + frac
    outside = (top_left < 0).any(axis=1) | (bottom_right[:, 0] > W - 1) | (bottom_right[:, 1] > H - 1)
    if outside.any():
        i = int(np.argmax(outside))
        x, y = positions_px[i]
        raise PtychoInputError(
            f"{source}: field 'xcoords/ycoords': found {int(outside.sum())} position(s) outside the object "
            f"(first: index {i} at x={x:.2f}, y={y:.2f}), expected patch centres within "
            f"[{N / 2}, {W - N / 2 - 1}] x [{N / 2}, {H - N / 2 - 1}] for a {H}x{W} object and N={N}"
        )


def centres_box(positions_px: np.ndarray, obj_shape: tuple[int, int]) -> tuple[slice, slice]:
    """The box ``(rows, cols)`` spanned by the (rounded) patch centres, which a scan covers fully.

    The preview crop, and the region :func:`ptycho_ml.inference.metrics.scanned_region`
    gives without a probe, without building any object-sized array.
    """
    pos = np.floor(np.asarray(positions_px, dtype=np.float64) + 0.5)
    H, W = (int(s) for s in obj_shape)
    x0, y0 = (max(int(v), 0) for v in pos.min(axis=0))
    x1, y1 = (min(int(v) + 1, lim) for v, lim in zip(pos.max(axis=0), (W, H)))
    return slice(y0, y1), slice(x0, x1)


def dataset_fingerprint(scans: ScanData | Sequence[ScanData]) -> dict[str, Any]:
    """sha256 of the source file (or of the amplitudes when in memory), shape and source.

    For several scans (trained on together): the sha256 of their sha256s in
    order, the total pattern count, and the sources joined by commas.
    """
    scans = [scans] if isinstance(scans, ScanData) else list(scans)
    parts = []
    for scan in scans:
        if Path(scan.source).is_file():
            parts.append(file_sha256(scan.source))
            continue
        digest = hashlib.sha256()
        for _, block in scan.iter_batches(4096):
            digest.update(block.tobytes())
        parts.append(digest.hexdigest())
    sha = parts[0] if len(parts) == 1 else hashlib.sha256("".join(parts).encode()).hexdigest()
    N = scans[0].N
    return {"sha256": sha, "shape": [sum(len(s) for s in scans), N, N], "source": ",".join(str(s.source) for s in scans)}
