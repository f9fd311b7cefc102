"""Physical constants and unit conversions shared by every layer (names carry their units)."""

from __future__ import annotations

#: h c / e in metres * eV, from the exact SI constants (as ptychodus uses): λ[m] = HC_EV_M / E[eV].
HC_EV_M = 6.62607015e-34 * 299792458.0 / 1.602176634e-19


def wavelength_m(energy_eV: float) -> float:
    """Photon wavelength in metres: λ = hc / E."""
    return HC_EV_M / energy_eV
