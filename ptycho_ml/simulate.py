"""Synthetic ptychography: objects, probes, scans and Poisson-noisy diffraction.

Everything is seeded: the same :class:`~ptycho_ml.config.SimulationConfig`
gives byte-identical NPZ files. The forward model is :mod:`ptycho_ml.physics`
itself, so simulated data and reconstruction share one set of conventions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from . import physics
from .config import SimulationConfig
from .errors import PtychoInputError

# --------------------------------------------------------------------------
# Objects: real maps t in [0, 1] per family, combined into a complex object


def _normalise(t: np.ndarray) -> np.ndarray:
    lo, hi = float(t.min()), float(t.max())
    return (t - lo) / (hi - lo) if hi > lo else np.zeros_like(t)


def lines_map(size: int, rng: np.random.Generator, n_lines: int | None = None) -> np.ndarray:
    """Random anti-aliased line segments of varied width and weight, ``(size, size)`` in [0, 1]."""
    n_lines = n_lines or max(8, size // 6)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    out = np.zeros((size, size))
    for _ in range(n_lines):
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        width = rng.uniform(0.7, 3.0)
        weight = rng.uniform(0.3, 1.0)
        dx, dy = x1 - x0, y1 - y0
        length2 = dx * dx + dy * dy + 1e-9
        s = np.clip(((xx - x0) * dx + (yy - y0) * dy) / length2, 0, 1)
        dist = np.hypot(xx - (x0 + s * dx), yy - (y0 + s * dy))
        out = np.maximum(out, weight * np.clip(width - dist + 0.5, 0, 1))
    return _normalise(ndimage.gaussian_filter(out, 0.6))


def grf_map(size: int, rng: np.random.Generator, correlation_px: float | None = None) -> np.ndarray:
    """Gaussian random field with a Gaussian power spectrum, ``(size, size)`` in [0, 1]."""
    correlation_px = correlation_px or rng.uniform(2.0, 8.0)
    noise = rng.standard_normal((size, size))
    field = ndimage.gaussian_filter(noise, correlation_px, mode="wrap")
    return _normalise(field)


def siemens_map(size: int, rng: np.random.Generator, spokes: int | None = None) -> np.ndarray:
    """Siemens star (radial spokes, with rings) centred at a random point, ``(size, size)`` in [0, 1]."""
    spokes = spokes or int(rng.integers(12, 40))
    cy, cx = rng.uniform(0.3 * size, 0.7 * size, 2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    theta = np.arctan2(yy - cy, xx - cx) + rng.uniform(0, np.pi)
    radius = np.hypot(yy - cy, xx - cx)
    star = 0.5 + 0.5 * np.tanh(4 * np.sin(spokes * theta))
    rings = (np.floor(radius / rng.uniform(size / 10, size / 5)) % 2) * 0.4
    return _normalise(ndimage.gaussian_filter(np.clip(star * (radius > 2) + rings * (star < 0.5), 0, 1), 0.7))


FAMILIES = {"lines": lines_map, "grf": grf_map, "siemens": siemens_map}


def make_object(cfg: SimulationConfig, rng: np.random.Generator) -> np.ndarray:
    """Complex object ``(S, S) complex64`` with amplitude in [amplitude_min, 1].

    The object is a mosaic: each family fills a random soft-edged region, so
    one scan carries the variety of several. Amplitude and phase share
    structure (as for a real specimen's thickness) but also have independent
    parts, so a model cannot learn one from the other.
    """
    S = cfg.object_size_px
    families = list(cfg.object_families)
    maps_amp = [FAMILIES[f](S, rng) for f in families]
    maps_phase = [0.5 * m + 0.5 * FAMILIES[f](S, rng) for m, f in zip(maps_amp, families)]
    if len(families) == 1:
        weights = [np.ones((S, S))]
    else:
        # Soft partition of unity: a softmax over smooth random fields.
        logits = np.stack([ndimage.gaussian_filter(rng.standard_normal((S, S)), S / 6, mode="wrap") for _ in families])
        logits = 8 * logits / (logits.std() + 1e-12)
        w = np.exp(logits - logits.max(axis=0))
        weights = list(w / w.sum(axis=0))
    t_amp = _normalise(sum(w * m for w, m in zip(weights, maps_amp)))
    t_phase = _normalise(sum(w * m for w, m in zip(weights, maps_phase)))
    amplitude = 1.0 - (1.0 - cfg.amplitude_min) * t_amp
    phase = cfg.phase_range_rad * (t_phase - 0.5)
    return (amplitude * np.exp(1j * phase)).astype(np.complex64)


# --------------------------------------------------------------------------
# Probes


def make_probe(cfg: SimulationConfig) -> np.ndarray:
    """Probe ``(N, N) complex64`` scaled so that ``sum |probe|² = nphotons``.

    * ``focused``: a circular aperture (radius ``aperture_radius_px`` in
      Fourier pixels) focused to the sample plane, then propagated by
      ``defocus_m`` with the angular-spectrum method.
    * ``gaussian``: a Gaussian of ``gaussian_sigma_px`` with a weak curvature.
    * ``file``: the first probe found in an NPZ (``probeGuess``) or ``.npy``.
    """
    N = cfg.N
    if cfg.probe_kind == "file":
        probe = load_probe_file(cfg.probe_file, N)
    elif cfg.probe_kind == "gaussian":
        yy, xx = np.mgrid[0:N, 0:N] - N / 2
        r2 = (xx**2 + yy**2) / cfg.gaussian_sigma_px**2
        probe = np.exp(-r2 / 2) * np.exp(1j * 0.3 * r2)
    else:
        fy, fx = np.mgrid[0:N, 0:N] - N / 2
        # A slightly soft aperture edge keeps the probe's far tails from wrapping round the array.
        pupil = ndimage.gaussian_filter((np.hypot(fx, fy) <= cfg.aperture_radius_px).astype(np.float64), 0.8).astype(np.complex128)
        focus = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(pupil), norm="ortho"))
        probe = physics.angular_spectrum_propagate(
            torch.from_numpy(focus), cfg.defocus_m, physics.wavelength_m(cfg.energy_eV), cfg.pixel_size_m
        ).numpy()
    probe = probe * math.sqrt(cfg.nphotons / float(np.sum(np.abs(probe) ** 2)))
    return probe.astype(np.complex64)


def load_probe_file(path: str, N: int) -> np.ndarray:
    """Read a probe ``(N, N)`` from ``.npy`` or an NPZ's ``probeGuess`` (first mode if ``(K, N, N)``)."""
    try:
        if path.endswith(".npy"):
            probe = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as f:
                probe = f["probeGuess"]
    except (OSError, KeyError, ValueError) as exc:
        raise PtychoInputError(f"{path}: field 'probeGuess': could not read a probe ({exc}), expected .npy or NPZ with probeGuess") from None
    probe = np.asarray(probe)
    while probe.ndim > 2:
        probe = probe[0]
    if probe.shape != (N, N):
        raise PtychoInputError(f"{path}: field 'probeGuess': found shape {probe.shape}, expected ({N}, {N})")
    return probe.astype(np.complex128)


# --------------------------------------------------------------------------
# Scans


def make_positions(cfg: SimulationConfig, rng: np.random.Generator) -> np.ndarray:
    """Scan positions ``(M, 2) float64`` (x, y) in object pixels, all patches inside the object."""
    S, N = cfg.object_size_px, cfg.N
    lo, hi = N / 2 + cfg.jitter_px, S - N / 2 - 1 - cfg.jitter_px
    if hi <= lo:
        raise PtychoInputError(f"config: SimulationConfig.object_size_px: found {S}, too small for N={N} with jitter")
    if cfg.scan == "raster":
        axis = np.arange(lo, hi + 1e-9, cfg.step_px)
        yy, xx = np.meshgrid(axis, axis, indexing="ij")
        pos = np.stack([xx.ravel(), yy.ravel()], axis=1)
    else:
        # Fermat spiral: r = c sqrt(n), theta = n * golden angle; c set for the mean step.
        centre = (lo + hi) / 2
        radius_max = (hi - lo) / 2 * math.sqrt(2)
        c = cfg.step_px / math.sqrt(math.pi) * 1.0
        n_max = int((radius_max / c) ** 2) + 1
        n = np.arange(n_max)
        r, theta = c * np.sqrt(n), n * math.pi * (3 - math.sqrt(5))
        pos = np.stack([centre + r * np.cos(theta), centre + r * np.sin(theta)], axis=1)
        pos = pos[(pos >= lo).all(axis=1) & (pos <= hi).all(axis=1)]
    pos = pos + rng.uniform(-cfg.jitter_px, cfg.jitter_px, pos.shape)
    return np.clip(pos, N / 2, S - N / 2 - 1)


# --------------------------------------------------------------------------
# The whole scan


@dataclass
class SimulatedScan:
    """A simulated scan: amplitudes ``(M, N, N) float32``, probe ``(N, N) complex64``,
    positions ``(M, 2) float64`` (x, y), ground-truth object ``(S, S) complex64``."""

    amplitude: np.ndarray
    probe: np.ndarray
    positions_px: np.ndarray
    obj: np.ndarray
    metadata: dict


def simulate_diffraction(obj: np.ndarray, probe: np.ndarray, positions_px: np.ndarray,
                         rng: np.random.Generator | None, batch: int = 512) -> np.ndarray:
    """Amplitude ``sqrt(Poisson(|F(probe*patch)|²))`` ``(M, N, N) float32``; noise-free if rng is None."""
    out = np.empty((len(positions_px), probe.shape[-1], probe.shape[-1]), np.float32)
    obj_t, probe_t = torch.from_numpy(obj), torch.from_numpy(probe)
    with torch.no_grad():
        for start in range(0, len(positions_px), batch):
            pos = torch.from_numpy(positions_px[start:start + batch])
            amp = physics.forward_amplitude(obj_t, probe_t, pos).double().numpy()
            intensity = amp**2
            counts = rng.poisson(intensity) if rng is not None else intensity
            out[start:start + batch] = np.sqrt(counts).astype(np.float32)
    return out


def simulate_scan(cfg: SimulationConfig) -> SimulatedScan:
    """Simulate one scan from a config (seeded)."""
    rng = np.random.default_rng(cfg.seed)
    obj = make_object(cfg, rng)
    probe = make_probe(cfg)
    positions = make_positions(cfg, rng)
    amplitude = simulate_diffraction(obj, probe, positions, rng)
    metadata = {"generator": "ptycho_ml.simulate", "config": cfg.to_dict(), "nphotons": cfg.nphotons,
                "seed": cfg.seed, "families": list(cfg.object_families)}
    return SimulatedScan(amplitude, probe, positions, obj, metadata)


def default_configs(N: int = 64, seed: int = 0) -> dict[str, SimulationConfig]:
    """The embedded default: a training scan and a held-out test scan of a different object.

    The training object is a mosaic of all families; the test object uses a
    different seed (so different structures) and a different mosaic.
    """
    scale = N / 64
    train = SimulationConfig(N=N, object_size_px=int(352 * scale), step_px=5.0 * scale, seed=seed,
                             gaussian_sigma_px=7.0 * scale)
    test = train.replace(object_size_px=int(224 * scale), step_px=6.0 * scale, seed=seed + 1000)
    return {"train": train, "test": test}


def write_simulated(scan: SimulatedScan, path: str | Path) -> Path:
    """Write a scan as PtychoPINN NPZ (with ground truth) via :mod:`ptycho_ml.data.npz`."""
    from .data.npz import write_npz  # local: data imports nothing from simulate

    return write_npz(path, {
        "diffraction": scan.amplitude,
        "probeGuess": scan.probe,
        "xcoords": scan.positions_px[:, 0],
        "ycoords": scan.positions_px[:, 1],
        "objectGuess": scan.obj,
        "scan_index": np.zeros(len(scan.positions_px), np.int64),
        "metadata": np.array(json.dumps(scan.metadata, sort_keys=True)),
    })
