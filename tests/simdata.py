"""Tiny simulated-scan settings shared by the tests."""

from ptycho_ml.config import SimulationConfig


def tiny_config(**changes) -> SimulationConfig:
    """A 32-pixel scan of a 72-pixel object: ~100 patterns, generated in milliseconds."""
    base = dict(N=32, object_size_px=72, step_px=5.0, aperture_radius_px=5.0, defocus_m=150e-6,
                nphotons=1e5, seed=3)
    base.update(changes)
    return SimulationConfig(**base)
