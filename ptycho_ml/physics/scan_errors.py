"""Scans whose file probe and positions are estimates: the truth simulates, the nominal values are written.

A measured scan comes with a probe that is a model of the optics and
positions read from encoders; the beam was partly coherent and the stage
drifted. :func:`simulate_with_errors` reproduces this: the diffraction is
simulated with a true probe (extra defocus, astigmatism, a second incoherent
mode) at true positions (noise and a slow drift), while the file keeps the
nominal probe and positions the reconstruction starts from. The truth is kept
beside them (``probeTrue``, ``xcoordsTrue``, ``ycoordsTrue``,
:mod:`ptycho_ml.data.ptychopinn`) for metrics.
"""

from __future__ import annotations

import math

import numpy as np

from ptycho_ml.config import ScanErrorConfig, SimulationConfig
from ptycho_ml.physics import simulate as sim
from ptycho_ml.units import wavelength_m


def aberrate_probe(probe: np.ndarray, extra_defocus_x_m: float, extra_defocus_y_m: float,
                   energy_eV: float, pixel_size_m: float) -> np.ndarray:
    """Propagate ``probe (N, N)`` by different distances along x and y (paraxial): defocus and astigmatism.

    Transfer ``exp(-i π λ (Δz_x f_x² + Δz_y f_y²))``; Parseval keeps the power. Returns ``(N, N) complex128``.
    """
    N = probe.shape[-1]
    f = np.fft.fftfreq(N, d=pixel_size_m)  # cycles per metre
    lam = wavelength_m(energy_eV)
    transfer = np.exp(-1j * math.pi * lam * (extra_defocus_x_m * f[None, :] ** 2 + extra_defocus_y_m * f[:, None] ** 2))
    return np.fft.ifft2(np.fft.fft2(np.asarray(probe, np.complex128)) * transfer)


def second_mode(probe: np.ndarray) -> np.ndarray:
    """A second incoherent mode ``(N, N) complex128``: the probe times a diagonal ramp, orthogonal to it, same power."""
    N = probe.shape[-1]
    yy, xx = np.mgrid[0:N, 0:N] - N / 2
    mode = probe * (xx + yy) / (N / 4)
    mode = mode - np.vdot(probe, mode) / np.vdot(probe, probe) * probe  # Gram-Schmidt against the first mode
    return mode * math.sqrt(float(np.sum(np.abs(probe) ** 2)) / float(np.sum(np.abs(mode) ** 2)))


def true_probe(nominal: np.ndarray, sim_cfg: SimulationConfig, errors: ScanErrorConfig) -> np.ndarray:
    """The beam that really lit the sample: ``(K, N, N) complex64`` (K = 2 with a missing mode), same total power."""
    d = sim_cfg.defocus_m
    dz = errors.defocus_error * d
    primary = aberrate_probe(nominal, dz + errors.astigmatism * d, dz - errors.astigmatism * d,
                             sim_cfg.energy_eV, sim_cfg.pixel_size_m)
    modes = [primary]
    if errors.missing_mode > 0:
        modes = [math.sqrt(1 - errors.missing_mode) * primary, math.sqrt(errors.missing_mode) * second_mode(primary)]
    return np.stack(modes).astype(np.complex64)


def file_positions(true_px: np.ndarray, errors: ScanErrorConfig, N: int, obj_shape: tuple[int, int],
                   rng: np.random.Generator) -> np.ndarray:
    """Positions ``(M, 2) float64`` as an encoder would report them: truth + noise + a linear drift in scan order.

    The error is made zero-mean: a shift of every position moves the whole
    object, which no reconstruction can tell from the truth. Positions stay
    where a patch fits in the object (clipped).
    """
    M = len(true_px)
    error = rng.normal(0.0, errors.position_noise_px, (M, 2))
    angle = rng.uniform(0, 2 * math.pi)
    ramp = np.linspace(0.0, 1.0, M)[:, None] * np.array([[math.cos(angle), math.sin(angle)]])
    error = error + errors.position_drift_px * ramp
    error -= error.mean(axis=0)
    H, W = obj_shape
    out = true_px + error
    out[:, 0] = np.clip(out[:, 0], N / 2, W - N / 2 - 1)
    out[:, 1] = np.clip(out[:, 1], N / 2, H - N / 2 - 1)
    return out


def simulate_with_errors(sim_cfg: SimulationConfig, errors: ScanErrorConfig) -> sim.SimulatedScan:
    """Simulate ``sim_cfg`` with the true probe and positions; the file gets the nominal ones (seeded by both seeds).

    With no error at all this is :func:`~ptycho_ml.physics.simulate.simulate_scan` itself.
    """
    if not errors.any():
        return sim.simulate_scan(sim_cfg)
    rng = np.random.default_rng(sim_cfg.seed)
    obj = sim.make_object(sim_cfg, rng)
    nominal = sim.make_probe(sim_cfg)
    positions_true = sim.make_positions(sim_cfg, rng)
    probe = true_probe(nominal, sim_cfg, errors)
    amplitude = sim.simulate_diffraction(obj, probe if len(probe) > 1 else probe[0], positions_true, rng)
    positions = file_positions(positions_true, errors, sim_cfg.N, obj.shape, np.random.default_rng([sim_cfg.seed, errors.seed]))
    metadata = {"generator": "ptycho_ml.physics.scan_errors", "config": sim_cfg.to_dict(), "scan_errors": errors.to_dict(),
                "nphotons": sim_cfg.nphotons, "seed": sim_cfg.seed, "families": list(sim_cfg.object_families)}
    return sim.SimulatedScan(amplitude, nominal, positions, obj, metadata, probe_true=probe, positions_true_px=positions_true)
