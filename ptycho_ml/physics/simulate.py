"""Synthetic ptychography: objects, probes, scans and Poisson-noisy diffraction.

Everything is seeded: the same :class:`~ptycho_ml.config.SimulationConfig`
gives byte-identical NPZ files. The forward model is :mod:`ptycho_ml.physics.forward`
itself, so simulated data and reconstruction share one set of conventions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from ptycho_ml.config import SimulationConfig
from ptycho_ml.data import ptychopinn
from ptycho_ml.data.ptychopinn import write_ptychopinn
from ptycho_ml.errors import PtychoInputError
from ptycho_ml.physics import forward as physics
from ptycho_ml.units import wavelength_m

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


def dead_leaves_map(size: int, rng: np.random.Generator, n_shapes: int | None = None) -> np.ndarray:
    """Dead leaves: overlapping opaque discs, ellipses and polygons of random grey level, with power-law sizes,
    ``(size, size)`` in [0, 1]. Occlusion and a 1/r³ size law give the edges and scale invariance of natural
    images (a procedural stand-in: no photograph is ever training data)."""
    n_shapes = n_shapes or size * size // 10
    out = np.full((size, size), rng.uniform(0, 1))
    r_min, r_max = 1.0, size / 4
    # Inverse-CDF draw from p(r) ~ r^-3 on [r_min, r_max].
    u = rng.uniform(0, 1, n_shapes)
    radii = 1 / np.sqrt(1 / r_min**2 - u * (1 / r_min**2 - 1 / r_max**2))
    for r in radii:
        cx, cy = rng.uniform(-r, size + r, 2)
        angle, aspect, grey, shade = rng.uniform(0, np.pi), rng.uniform(0.3, 1.0), rng.uniform(0, 1), rng.random()
        sides = int(rng.integers(3, 9)) if rng.random() < 0.5 else 0
        # Only the shape's bounding box is touched: small leaves are cheap.
        y0, y1 = max(0, int(cy - r) - 1), min(size, int(cy + r) + 2)
        x0, x1 = max(0, int(cx - r) - 1), min(size, int(cx + r) + 2)
        if y0 >= y1 or x0 >= x1:
            continue
        dy, dx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        dx, dy = dx - cx, dy - cy
        u_, v_ = dx * np.cos(angle) + dy * np.sin(angle), -dx * np.sin(angle) + dy * np.cos(angle)
        if sides:  # regular polygon
            theta = np.arctan2(v_, u_)
            inside = np.hypot(u_, v_) <= r * np.cos(np.pi / sides) / np.cos((theta % (2 * np.pi / sides)) - np.pi / sides)
        else:  # ellipse
            inside = (u_ / r) ** 2 + (v_ / (r * aspect)) ** 2 <= 1
        value = grey + 0.3 * (u_ / r).clip(-1, 1) if shade < 0.3 else grey  # some leaves are shaded
        out[y0:y1, x0:x1] = np.where(inside, value, out[y0:y1, x0:x1])
    return _normalise(ndimage.gaussian_filter(out, rng.uniform(0.4, 1.0)))


def fractal_map(size: int, rng: np.random.Generator, exponent: float | None = None) -> np.ndarray:
    """Power-law (1/f^exponent amplitude spectrum) noise, ``(size, size)`` in [0, 1]: multi-scale texture."""
    exponent = exponent or rng.uniform(0.8, 1.6)
    fy, fx = np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij")
    f = np.hypot(fx, fy)
    f[0, 0] = 1.0
    spectrum = (rng.standard_normal((size, size)) + 1j * rng.standard_normal((size, size))) / f**exponent
    spectrum[0, 0] = 0
    return _normalise(np.fft.ifft2(spectrum).real)


FAMILIES = {"lines": lines_map, "grf": grf_map, "siemens": siemens_map, "dead_leaves": dead_leaves_map,
            "fractal": fractal_map}


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
    * ``aberrated``: ``focused`` with random lens aberrations and sometimes a
      central stop (:func:`aberrated_pupil`, drawn from ``seed``): training probes.
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
        if cfg.probe_kind == "aberrated":
            pupil = pupil * aberrated_pupil(N, cfg.aperture_radius_px, np.random.default_rng(cfg.seed + 7919))
        focus = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(pupil), norm="ortho"))
        probe = physics.angular_spectrum_propagate(
            torch.from_numpy(focus), cfg.defocus_m, wavelength_m(cfg.energy_eV), cfg.pixel_size_m
        ).numpy()
    probe = probe * math.sqrt(cfg.nphotons / float(np.sum(np.abs(probe) ** 2)))
    return probe.astype(np.complex64)


def aberrated_pupil(N: int, radius_px: float, rng: np.random.Generator) -> np.ndarray:
    """``(N, N) complex128`` pupil factor of random lens aberrations, drawn from ``rng``.

    Coma, spherical aberration and trefoil (Zernike terms, up to 1 rad
    at the pupil edge each) and, one time in three, a central stop (an annular
    pupil, as behind a zone plate). No astigmatism: that family is kept for
    evaluation as a probe the model never saw (benchmarks/suite.py).
    """
    fy, fx = (np.mgrid[0:N, 0:N] - N / 2) / radius_px
    rho, theta = np.hypot(fx, fy), np.arctan2(fy, fx)
    coma, spherical, trefoil = rng.uniform(-1.0, 1.0, 3)
    phase = (coma * (3 * rho**3 - 2 * rho) * np.cos(theta - rng.uniform(0, 2 * np.pi))
             + spherical * (6 * rho**4 - 6 * rho**2 + 1)
             + trefoil * rho**3 * np.cos(3 * (theta - rng.uniform(0, 2 * np.pi))))
    stop = (rho >= rng.uniform(0.25, 0.5)) if rng.random() < 1 / 3 else np.ones_like(rho, bool)
    return ndimage.gaussian_filter(stop.astype(np.float64), 0.8) * np.exp(1j * phase)


def load_probe_file(path: str, N: int) -> np.ndarray:
    """Read a probe ``(N, N)`` from ``.npy`` or an NPZ's ``probeGuess`` (first mode if ``(K, N, N)``)."""
    try:
        if path.endswith(".npy"):
            probe = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as f:
                probe = f[ptychopinn.PROBE]
    except (OSError, KeyError, ValueError) as exc:
        raise PtychoInputError(f"{path}: field '{ptychopinn.PROBE}': could not read a probe ({exc}), expected .npy or NPZ with {ptychopinn.PROBE}") from None
    probe = np.asarray(probe)
    while probe.ndim > 2:
        probe = probe[0]
    if probe.shape != (N, N):
        raise PtychoInputError(f"{path}: field '{ptychopinn.PROBE}': found shape {probe.shape}, expected ({N}, {N})")
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
    positions ``(M, 2) float64`` (x, y), ground-truth object ``(S, S) complex64``.

    When the file's probe and positions are estimates (:mod:`ptycho_ml.physics.scan_errors`),
    ``probe_true (K, N, N) complex64`` and ``positions_true_px (M, 2) float64`` hold what simulated the data."""

    amplitude: np.ndarray
    probe: np.ndarray
    positions_px: np.ndarray
    obj: np.ndarray
    metadata: dict
    probe_true: np.ndarray | None = None
    positions_true_px: np.ndarray | None = None


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
    metadata = {"generator": "ptycho_ml.physics.simulate", "config": cfg.to_dict(), "nphotons": cfg.nphotons,
                "seed": cfg.seed, "families": list(cfg.object_families)}
    return SimulatedScan(amplitude, probe, positions, obj, metadata)


def default_configs(N: int = 64, seed: int = 0) -> dict[str, SimulationConfig]:
    """The embedded default: a training scan and a held-out test scan of a different object.

    The training object is a mosaic of all families; the test object uses a
    different seed (so different structures) and a different mosaic.
    """
    scale = N / 64
    # Keep the probe the same fraction of the pattern at any N: the focus spot
    # scales with N at a fixed aperture (in Fourier pixels), the defocus blur
    # with defocus / N, hence defocus * scale².
    base = SimulationConfig()
    train = SimulationConfig(N=N, object_size_px=int(352 * scale), step_px=5.0 * scale, seed=seed,
                             gaussian_sigma_px=7.0 * scale, defocus_m=base.defocus_m * scale**2)
    test = train.replace(object_size_px=int(224 * scale), step_px=6.0 * scale, seed=seed + 1000)
    return {"train": train, "test": test}


def varied_training_configs(N: int = 64, seed: int = 0, n_scans: int = 4) -> list[SimulationConfig]:
    """Training scans that vary what a single scan cannot: probe, object family and dose.

    Scan 0 is the default training family (focused probe, a mosaic of lines,
    random field and Siemens star) and stays the model's reference probe; the
    others each draw an aberrated probe (:func:`aberrated_pupil`) with its own
    aperture and defocus, objects from procedural natural-image-like textures
    (dead leaves, power-law noise) mixed with the default families, and a dose
    from 1e5 to 1e7 photons per pattern. No photograph is used.
    """
    train = default_configs(N=N, seed=seed)["train"]
    rng = np.random.default_rng(seed + 4242)
    size = int(200 * N / 64)
    mosaics = (("dead_leaves",), ("fractal", "dead_leaves"), ("dead_leaves", "lines", "siemens"), ("fractal", "grf"))
    configs = [train.replace(object_size_px=size)]
    for i in range(1, n_scans):
        configs.append(train.replace(
            object_size_px=size, seed=seed + 100 * i, probe_kind="aberrated",
            object_families=mosaics[(i - 1) % len(mosaics)],
            aperture_radius_px=train.aperture_radius_px * rng.uniform(0.8, 1.2),
            defocus_m=train.defocus_m * rng.uniform(0.6, 1.2),
            nphotons=float(10 ** rng.uniform(5, 7)),
            phase_range_rad=rng.uniform(0.5, 3.0), amplitude_min=rng.uniform(0.2, 0.8),
            scan="spiral" if i % 2 else "raster"))
    return configs


def write_simulated(scan: SimulatedScan, path: str | Path) -> Path:
    """Write a scan as PtychoPINN NPZ, with its ground truth (:func:`ptycho_ml.data.ptychopinn.write_ptychopinn`)."""
    return write_ptychopinn(path, amplitude=scan.amplitude, probe=scan.probe, positions_px=scan.positions_px,
                            obj=scan.obj, metadata=scan.metadata, probe_true=scan.probe_true,
                            positions_true_px=scan.positions_true_px)


# --------------------------------------------------------------------------
# Scans larger than memory


def _fft_smooth(field: np.ndarray, sigma_px: float) -> np.ndarray:
    """Periodic Gaussian smoothing by FFT, ``O(S² log S)`` whatever ``sigma_px`` (``(H, W)`` float64)."""
    H, W = field.shape
    ky = np.fft.fftfreq(H)[:, None]
    kx = np.fft.rfftfreq(W)[None, :]
    transfer = np.exp(-2.0 * (math.pi * sigma_px) ** 2 * (ky**2 + kx**2))
    return np.fft.irfft2(np.fft.rfft2(field) * transfer, s=(H, W))


def _stamp_lines(S: int, N: int, rng: np.random.Generator) -> np.ndarray:
    """Short anti-aliased segments drawn in their own bounding boxes: cost ∝ their area, not ``S²`` each."""
    out = np.zeros((S, S))
    n_lines = max(8, int(3 * S * S / (N * N)))
    for _ in range(n_lines):
        x0, y0 = rng.uniform(0, S, 2)
        length, angle = rng.uniform(N / 4, 2 * N), rng.uniform(0, np.pi)
        x1, y1 = x0 + length * math.cos(angle), y0 + length * math.sin(angle)
        width, weight = rng.uniform(0.7, 3.0), rng.uniform(0.3, 1.0)
        r0, r1 = max(0, int(min(y0, y1) - width - 2)), min(S, int(max(y0, y1) + width + 3))
        c0, c1 = max(0, int(min(x0, x1) - width - 2)), min(S, int(max(x0, x1) + width + 3))
        if r1 <= r0 or c1 <= c0:
            continue
        yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float64)
        dx, dy = x1 - x0, y1 - y0
        s = np.clip(((xx - x0) * dx + (yy - y0) * dy) / (dx * dx + dy * dy + 1e-9), 0, 1)
        dist = np.hypot(xx - (x0 + s * dx), yy - (y0 + s * dy))
        np.maximum(out[r0:r1, c0:c1], weight * np.clip(width - dist + 0.5, 0, 1), out=out[r0:r1, c0:c1])
    return _normalise(ndimage.gaussian_filter(out, 0.6))


def _stamp_stars(S: int, N: int, rng: np.random.Generator) -> np.ndarray:
    """Siemens stars of radius N/2..2N scattered over the object, each drawn in its own box."""
    out = np.zeros((S, S))
    n_stars = max(1, int(S * S / (4 * N) ** 2))
    for _ in range(n_stars):
        radius_max = rng.uniform(N / 2, 2 * N)
        cy, cx = rng.uniform(0, S, 2)
        spokes = int(rng.integers(12, 40))
        r0, r1 = max(0, int(cy - radius_max)), min(S, int(cy + radius_max) + 1)
        c0, c1 = max(0, int(cx - radius_max)), min(S, int(cx + radius_max) + 1)
        yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float64)
        theta = np.arctan2(yy - cy, xx - cx) + rng.uniform(0, np.pi)
        radius = np.hypot(yy - cy, xx - cx)
        star = 0.5 + 0.5 * np.tanh(4 * np.sin(spokes * theta))
        rings = (np.floor(radius / rng.uniform(radius_max / 5, radius_max / 2.5)) % 2) * 0.4
        value = np.clip(star * (radius > 2) + rings * (star < 0.5), 0, 1) * (radius <= radius_max)
        np.maximum(out[r0:r1, c0:c1], value, out=out[r0:r1, c0:c1])
    return _normalise(ndimage.gaussian_filter(out, 0.7))


def make_large_object(cfg: SimulationConfig, rng: np.random.Generator) -> np.ndarray:
    """Like :func:`make_object` but in ``O(S² log S)``: ``(S, S) complex64``, amplitude in [amplitude_min, 1].

    Large-sigma filters run by FFT and lines/stars are stamped locally, so a
    several-thousand-pixel object takes seconds, not hours. The mosaic of
    families varies on the scale of a few patterns (``3 N``), not of the object.
    """
    S, N = cfg.object_size_px, cfg.N
    families = list(cfg.object_families)

    def family_map(name: str) -> np.ndarray:
        if name == "lines":
            return _stamp_lines(S, N, rng)
        if name == "siemens":
            return _stamp_stars(S, N, rng)
        return _normalise(_fft_smooth(rng.standard_normal((S, S)), rng.uniform(2.0, 8.0)))

    maps_amp = [family_map(f) for f in families]
    maps_phase = [0.5 * m + 0.5 * family_map(f) for m, f in zip(maps_amp, families)]
    if len(families) == 1:
        weights = [np.ones((S, S))]
    else:
        logits = np.stack([_fft_smooth(rng.standard_normal((S, S)), min(S / 6, 3 * N)) for _ in families])
        logits = 8 * logits / (logits.std() + 1e-12)
        w = np.exp(logits - logits.max(axis=0))
        weights = list(w / w.sum(axis=0))
        del logits, w
    t_amp = _normalise(sum(w * m for w, m in zip(weights, maps_amp)))
    t_phase = _normalise(sum(w * m for w, m in zip(weights, maps_phase)))
    amplitude = 1.0 - (1.0 - cfg.amplitude_min) * t_amp
    phase = cfg.phase_range_rad * (t_phase - 0.5)
    return (amplitude * np.exp(1j * phase)).astype(np.complex64)


def large_scan_geometry(cfg: SimulationConfig, n_patterns: int) -> tuple[int, int]:
    """``(object side S, raster side k)`` for a row-major raster of ``n_patterns`` at ``cfg.step_px``."""
    if n_patterns < 1:
        raise PtychoInputError(f"simulate_large_scan: n_patterns: found {n_patterns}, expected >= 1")
    k = math.ceil(math.sqrt(n_patterns))
    S = math.ceil(cfg.step_px * (k - 1) + cfg.N + 2 * cfg.jitter_px) + 2
    return S, k


def simulate_large_scan(path: str | Path, cfg: SimulationConfig, n_patterns: int, chunk: int = 4096) -> Path:
    """Write a raster scan of exactly ``n_patterns`` as PtychoPINN NPZ, memory bounded by ``chunk`` patterns.

    The object side is chosen so the raster (``ceil(sqrt(n))`` positions a
    side at ``cfg.step_px``, filled row by row) fits with the patch and jitter
    margins; ``cfg.object_size_px`` is ignored. Diffraction is simulated and
    written ``chunk`` patterns at a time (each chunk with its own seeded
    generator, so the file does not depend on anything but ``cfg``,
    ``n_patterns`` and ``chunk``). Keys as :func:`write_simulated`:
    ``diffraction (M, N, N) float32``, ``probeGuess``, ``xcoords``,
    ``ycoords``, ``objectGuess``, ``scan_index``, ``metadata``.
    """
    if chunk < 1:
        raise PtychoInputError(f"simulate_large_scan: chunk: found {chunk}, expected >= 1")
    S, k = large_scan_geometry(cfg, n_patterns)
    cfg = cfg.replace(object_size_px=S)
    rng = np.random.default_rng(cfg.seed)
    obj = make_large_object(cfg, rng)
    probe = make_probe(cfg)
    N = cfg.N
    axis = N / 2 + cfg.jitter_px + cfg.step_px * np.arange(k)
    rows, cols = np.divmod(np.arange(n_patterns), k)
    positions = np.stack([axis[cols], axis[rows]], axis=1)
    positions = np.clip(positions + rng.uniform(-cfg.jitter_px, cfg.jitter_px, positions.shape), N / 2, S - N / 2 - 1)

    def chunks():
        for i, start in enumerate(range(0, n_patterns, chunk)):
            chunk_rng = np.random.default_rng([cfg.seed, 1, i])
            yield simulate_diffraction(obj, probe, positions[start:start + chunk], chunk_rng)

    metadata = {"generator": "ptycho_ml.physics.simulate.simulate_large_scan", "config": cfg.to_dict(),
                "nphotons": cfg.nphotons, "seed": cfg.seed, "families": list(cfg.object_families),
                "n_patterns": n_patterns, "chunk": chunk, "raster_side": k}
    return write_ptychopinn(path, amplitude_chunks=((n_patterns, N, N), chunks), probe=probe, positions_px=positions,
                            obj=obj, metadata=metadata)
