"""Reconstruction quality metrics with global-phase alignment (docs/architecture.md, "Conventions").

SSIM, PSNR (peak = data range of the reference, not 255), MAE and FRC
resolution, for amplitude and phase separately, on the region covered by the
scan. Phase has a global offset ambiguity, so every phase metric is computed
after aligning the prediction's global phase to the reference.

Conventions
-----------
* Images are ``(H, W)`` numpy arrays; objects are complex (complex64/128),
  amplitude/phase images real (float32/64). Metrics are returned as Python
  floats.
* Positions ``(M, 2)`` float are patch centres in object pixels, columns
  ``(x, y)`` (x = column, y = row); the N×N patch centred at integer (y, x)
  spans rows ``y - N/2 … y + N/2 - 1`` (same as :mod:`ptycho_ml.physics.forward`).
* Identical images give PSNR ``inf`` (MSE = 0); SSIM 1, MAE 0, FRC 2 px.

numpy / scipy / scikit-image only (no torch, no mlflow).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.signal import fftconvolve
from scipy.signal.windows import tukey
from skimage.metrics import structural_similarity

from ptycho_ml.data.scan import centres_box
from ptycho_ml.errors import PtychoInputError

METRIC_KEYS = (
    "amplitude_ssim", "amplitude_psnr", "amplitude_mae", "amplitude_frc_px",
    "phase_ssim", "phase_psnr", "phase_mae", "phase_frc_px",
)


# --------------------------------------------------------------------------
# Input checks


def _check_same_shape(a: np.ndarray, b: np.ndarray, what: str = "pred") -> None:
    """Raise a one-line :class:`PtychoInputError` unless ``a`` and ``b`` are 2-D of one shape."""
    if a.ndim != 2 or a.shape != b.shape:
        raise PtychoInputError(
            f"metrics: {what}: found shape {tuple(a.shape)}, expected {tuple(b.shape)} "
            "(2-D, same shape as the reference)")


def _real_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    """Return ``a, b`` as float64 ``(H, W)`` arrays after shape/dtype checks."""
    a, b = np.asarray(a), np.asarray(b)
    _check_same_shape(a, b)
    if np.iscomplexobj(a) or np.iscomplexobj(b):
        raise PtychoInputError(
            "metrics: images: found complex input, expected real 2-D arrays "
            "(take np.abs or np.angle first)")
    return a.astype(np.float64), b.astype(np.float64)


def _data_range(b: np.ndarray, data_range: float | None) -> float:
    """Peak for SSIM/PSNR: ``b.max() - b.min()`` of the reference unless given.

    A (numerically) constant reference, range <= 1e-6 * max|b| (e.g. the
    amplitude of a pure phase object, with float round-off), uses ``max|b|``
    instead (or 1.0 if that is zero too) so the metric stays finite and
    scale-aware.
    """
    if data_range is not None:
        return float(data_range)
    dr = float(b.max() - b.min())
    peak = float(np.abs(b).max())
    if dr > 1e-6 * peak:
        return dr
    return peak if peak > 0 else 1.0


# --------------------------------------------------------------------------
# Scanned region


def scanned_region(positions_px: np.ndarray, N: int, obj_shape: tuple[int, int],
                   probe: np.ndarray | None = None, threshold: float = 0.1) -> np.ndarray:
    """Boolean mask of the object region covered by the scan.

    positions_px: ``(M, 2)`` float, (x, y) patch centres in object pixels.
    N: patch size in pixels. obj_shape: ``(H, W)``.
    probe: ``(N, N)`` or ``(K, N, N)`` complex (modes add incoherently), or None.
    Returns ``(H, W)`` bool.

    With a probe: the summed probe intensity over all positions (patch origins
    rounded to whole pixels; a bincount of origins convolved with ``|probe|²``)
    is compared with ``threshold * max``. Without a probe: the bounding box of
    the (rounded) patch centres, which a scan covers fully.
    """
    pos = np.asarray(positions_px, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or pos.shape[0] == 0:
        raise PtychoInputError(
            f"metrics: positions_px: found shape {pos.shape}, expected (M, 2) with M >= 1")
    H, W = (int(s) for s in obj_shape)
    N = int(N)
    if probe is None:
        mask = np.zeros((H, W), dtype=bool)
        mask[centres_box(pos, (H, W))] = True
        return mask
    probe = np.asarray(probe)
    if probe.ndim == 2:
        probe = probe[None]
    if probe.ndim != 3 or probe.shape[1:] != (N, N):
        raise PtychoInputError(
            f"metrics: probe: found shape {probe.shape}, expected ({N}, {N}) or (K, {N}, {N})")
    intensity = (np.abs(probe) ** 2).sum(axis=0)  # (N, N) float
    # Patch origins (top-left), padded by N on every side so patches that only
    # partly overlap the object still count.
    origin = np.floor(pos - N / 2 + 0.5).astype(np.int64) + N  # (M, 2) (x, y)
    Hp, Wp = H + 2 * N, W + 2 * N
    ok = (origin[:, 0] >= 0) & (origin[:, 0] < Wp) & (origin[:, 1] >= 0) & (origin[:, 1] < Hp)
    counts = np.bincount(origin[ok, 1] * Wp + origin[ok, 0], minlength=Hp * Wp).reshape(Hp, Wp)
    coverage = fftconvolve(counts.astype(np.float64), intensity)[N:N + H, N:N + W]  # (H, W)
    peak = coverage.max()
    if peak <= 0:
        return np.zeros((H, W), dtype=bool)
    return coverage > threshold * peak


#: Masks with more rows or columns than this are coarsened (a block counts only if all of it is True)
#: before the search, so the box stays inside the mask and the search stays fast for huge objects.
_BOX_SEARCH_MAX_SIDE = 512


def _largest_rectangle(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(r0, r1, c0, c1)`` of the largest all-True axis-aligned rectangle of ``mask (H, W) bool``.

    The classic row-by-row histogram method: ``heights[c]`` counts the True
    pixels ending at the current row in column c, and the largest rectangle
    under that histogram is found with a stack. O(H W).
    """
    H, W = mask.shape
    heights = np.zeros(W + 1, dtype=np.int64)  # a zero sentinel column flushes the stack
    best, box = 0, (0, 1, 0, 1)
    for r in range(H):
        heights[:W] = np.where(mask[r], heights[:W] + 1, 0)
        stack: list[int] = []
        for c in range(W + 1):
            h = int(heights[c])
            while stack and heights[stack[-1]] >= h:
                height = int(heights[stack.pop()])
                left = stack[-1] + 1 if stack else 0
                if height * (c - left) > best:
                    best, box = height * (c - left), (r - height + 1, r + 1, left, c)
            stack.append(c)
    return box


def region_box(mask: np.ndarray) -> tuple[slice, slice]:
    """The largest rectangle ``(rows, cols)`` of slices lying entirely inside ``mask``.

    mask: ``(H, W)`` bool. Exact for masks up to 512 pixels a side; larger
    masks are searched on a coarser grid of whole blocks (a block counts only
    when all of its pixels are True), so the box is still entirely inside the
    mask and at most a block short of the largest on each side. Holes and
    ragged edges (a speckled probe's footprint) cannot shrink the box away, as
    a greedy edge-trimming search could. An all-False mask is an error.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise PtychoInputError(f"metrics: mask: found shape {mask.shape}, expected (H, W)")
    if not mask.any():
        raise PtychoInputError("metrics: mask: found no True pixel, expected a non-empty region")
    block = max(1, int(np.ceil(max(mask.shape) / _BOX_SEARCH_MAX_SIDE)))
    if block > 1:
        H, W = (s // block * block for s in mask.shape)
        coarse = mask[:H, :W].reshape(H // block, block, W // block, block).all(axis=(1, 3))
        if coarse.any():
            r0, r1, c0, c1 = (v * block for v in _largest_rectangle(coarse))
            return slice(r0, r1), slice(c0, c1)
    r0, r1, c0, c1 = _largest_rectangle(mask)
    return slice(r0, r1), slice(c0, c1)


# --------------------------------------------------------------------------
# Phase alignment and scalar metrics


def align_phase(pred: np.ndarray, ref: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Remove the global phase offset of ``pred`` relative to ``ref``.

    pred, ref: ``(H, W)`` complex; mask: ``(H, W)`` bool or None (all pixels).
    Returns ``pred * exp(-i φ)`` with ``φ = angle(Σ_mask pred · conj(ref))``,
    the least-squares optimal constant phase; same shape and dtype as pred.
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    _check_same_shape(pred, ref)
    prod = pred * np.conj(ref)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        _check_same_shape(mask, ref, "mask")
        prod = prod[mask]
    phi = np.angle(prod.sum())
    return (pred * np.exp(-1j * phi)).astype(pred.dtype if np.iscomplexobj(pred) else np.complex128)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float | None = None) -> float:
    """Structural similarity of real ``(H, W)`` images ``a`` (test) and ``b`` (reference).

    data_range defaults to the reference's range ``b.max() - b.min()``. The
    window is 7×7, shrunk (odd) for images smaller than that (min side >= 3).
    """
    a, b = _real_pair(a, b)
    win = min(7, min(a.shape))
    win -= 1 - win % 2
    if win < 3:
        raise PtychoInputError(f"metrics: image: found shape {a.shape}, expected both sides >= 3 for SSIM")
    return float(structural_similarity(a, b, data_range=_data_range(b, data_range), win_size=win))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB of real ``(H, W)`` ``a`` against reference ``b``.

    Peak = data range of the reference (``b.max() - b.min()``), not 255, so the
    value is invariant to a common rescaling. Returns ``inf`` when ``a == b``.
    """
    a, b = _real_pair(a, b)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0:
        return math.inf
    return float(10 * np.log10(_data_range(b, data_range) ** 2 / mse))


def mae(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute error of real ``(H, W)`` ``a`` against ``b``."""
    a, b = _real_pair(a, b)
    return float(np.mean(np.abs(a - b)))


# --------------------------------------------------------------------------
# Fourier ring correlation


def frc(a: np.ndarray, b: np.ndarray, threshold: str | float = "1/7") -> dict:
    """Fourier ring correlation of two real ``(H, W)`` images.

    Each image has its mean removed and is multiplied by a separable Tukey
    window (alpha 0.5) before the FFT. Rings are one frequency step
    ``1/L`` wide, ``L = min(H, W)``, from 0 to Nyquist (0.5 cycles/pixel).
    threshold: ``"1/7"`` (0.143), ``"halfbit"`` (van Heel & Schatz 2005,
    depends on the ring's pixel count) or a float.

    Returns ``{"curve": [float], "freq": [float] (cycles/pixel),
    "threshold": [float], "resolution_px": float}``; the resolution is
    ``1/f`` at the first crossing below the threshold (linearly interpolated
    between the ring above and the ring below), or 2 px (Nyquist) if the
    curve never drops below it.
    """
    a, b = _real_pair(a, b)
    H, W = a.shape
    window = np.outer(tukey(H, 0.5), tukey(W, 0.5))
    Fa = np.fft.fft2((a - a.mean()) * window)
    Fb = np.fft.fft2((b - b.mean()) * window)
    L = min(H, W)
    fy, fx = np.fft.fftfreq(H)[:, None], np.fft.fftfreq(W)[None, :]
    ring = np.rint(np.sqrt(fx ** 2 + fy ** 2) * L).astype(np.int64).ravel()
    nr = L // 2 + 1
    keep = ring < nr
    ring = ring[keep]

    def ring_sum(x):
        return np.bincount(ring, weights=x.ravel()[keep], minlength=nr)

    num = ring_sum(np.real(Fa * np.conj(Fb)))
    pa, pb = ring_sum(np.abs(Fa) ** 2), ring_sum(np.abs(Fb) ** 2)
    den = np.sqrt(pa * pb)
    # a ring empty in both images correlates perfectly (1), in one only not at all (0)
    curve = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where((pa == 0) & (pb == 0), 1.0, 0.0))
    freq = np.arange(nr) / L
    if threshold == "1/7":
        thr = np.full(nr, 1 / 7)
    elif threshold == "halfbit":
        n = np.maximum(np.bincount(ring, minlength=nr), 1)
        thr = (0.2071 + 1.9102 / np.sqrt(n)) / (1.2071 + 0.9102 / np.sqrt(n))
    elif isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        thr = np.full(nr, float(threshold))
    else:
        raise PtychoInputError(
            f"metrics: frc threshold: found {threshold!r}, expected '1/7', 'halfbit' or a number")
    resolution = 2.0
    below = np.flatnonzero(curve[1:] < thr[1:]) + 1
    if below.size:
        k = int(below[0])
        f = freq[k]
        if k > 1:  # interpolate the crossing between ring k-1 (above) and k (below)
            d0, d1 = curve[k - 1] - thr[k - 1], curve[k] - thr[k]
            f = freq[k - 1] + (freq[k] - freq[k - 1]) * d0 / (d0 - d1)
        resolution = float(1.0 / f)
    return {"curve": curve.tolist(), "freq": freq.tolist(), "threshold": thr.tolist(),
            "resolution_px": resolution}


# --------------------------------------------------------------------------
# Object evaluation


def evaluate_object(pred: np.ndarray, truth: np.ndarray, positions_px: np.ndarray | None = None,
                    N: int | None = None, probe: np.ndarray | None = None,
                    mask: np.ndarray | None = None) -> dict:
    """Amplitude and phase metrics of a reconstructed object against the truth.

    pred, truth: ``(H, W)`` complex. positions_px ``(M, 2)`` float (x, y) and
    N select the scanned region (with ``probe`` ``(N, N)``/``(K, N, N)``
    complex, the probe-intensity footprint; see :func:`scanned_region`);
    mask ``(H, W)`` bool restricts it further (both given: their
    intersection); neither: the whole image. Metrics are computed on
    :func:`region_box` of that region.

    Phase: pred's global phase is aligned to truth over the box, its phase is
    taken relative to truth's (difference wrapped to (-π, π]) and the mean
    phase difference is subtracted, so a constant offset never counts.
    Returns floats under the keys in :data:`METRIC_KEYS`.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    _check_same_shape(pred, truth)
    region = np.ones(truth.shape, dtype=bool)
    if positions_px is not None:
        if N is None:
            raise PtychoInputError(
                "metrics: N: found None, expected the patch size when positions_px is given")
        region &= scanned_region(positions_px, N, truth.shape, probe=probe)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        _check_same_shape(mask, truth, "mask")
        region &= mask
    box = region_box(region)
    p, t = align_phase(pred[box], truth[box]), truth[box]
    amp_p, amp_t = np.abs(p), np.abs(t)
    ph_t = np.angle(t)
    dphi = np.angle(p * np.conj(t))  # wrapped phase difference, (h, w)
    ph_p = ph_t + dphi - dphi.mean()
    out = {}
    for name, x, y in (("amplitude", amp_p, amp_t), ("phase", ph_p, ph_t)):
        out[f"{name}_ssim"] = ssim(x, y)
        out[f"{name}_psnr"] = psnr(x, y)
        out[f"{name}_mae"] = mae(x, y)
        out[f"{name}_frc_px"] = frc(x, y)["resolution_px"]
    return out


def format_table(metrics: dict) -> str:
    """Aligned text table of :func:`evaluate_object` output (rows amplitude/phase)."""
    cols = (("SSIM", "ssim", "{:.4f}"), ("PSNR (dB)", "psnr", "{:.2f}"),
            ("MAE", "mae", "{:.4g}"), ("FRC (px)", "frc_px", "{:.2f}"))
    rows = [[""] + [c[0] for c in cols]]
    for name in ("amplitude", "phase"):
        row = [name]
        for _, key, fmt in cols:
            v = metrics.get(f"{name}_{key}")
            row.append("-" if v is None else fmt.format(v))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
        for r in rows)
