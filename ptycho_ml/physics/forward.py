"""Pure-torch ptychographic forward model (docs/architecture.md, "Conventions"). Knows nothing of training.

Conventions
-----------
* Positions are patch centres in object pixels, columns ``(x, y)`` with
  x = column and y = row. The N×N patch centred at integer (y, x) spans rows
  ``y - N/2 … y + N/2 - 1`` and columns ``x - N/2 … x + N/2 - 1``.
* Sub-pixel positions use bilinear interpolation: exact at integer positions,
  and :func:`insert_patches` is the exact adjoint of :func:`extract_patches`.
* Far field: ``fftshift(fft2(exit_wave, norm="ortho"))``; amplitude is its
  modulus; probe modes add incoherently.
"""

from __future__ import annotations

import math

import torch

# --------------------------------------------------------------------------
# Sub-pixel patch extraction and its adjoint


def _bilinear_indices(
    positions_px: torch.Tensor, N: int, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat indices of each patch's (N+1)×(N+1) window and the bilinear weights.

    positions_px: ``(G, P, 2)`` float, (x, y) patch centres.
    Returns ``flat_idx (G, P, N+1, N+1) int64`` (into a ``height*width`` image),
    ``frac_y (G, P, 1, 1)`` and ``frac_x (G, P, 1, 1)`` in the positions' dtype.
    """
    top_left = positions_px - N / 2  # (G, P, 2) in (x, y)
    origin = torch.floor(top_left)
    frac = top_left - origin
    origin = origin.to(torch.int64)
    offs = torch.arange(N + 1, device=positions_px.device)
    rows = (origin[..., 1, None] + offs).clamp_(0, height - 1)  # (G, P, N+1)
    cols = (origin[..., 0, None] + offs).clamp_(0, width - 1)
    flat_idx = rows[..., :, None] * width + cols[..., None, :]
    return flat_idx, frac[..., 1, None, None], frac[..., 0, None, None]


def _as_real(x: torch.Tensor) -> torch.Tensor:
    """Complex ``(...)`` -> real ``(..., 2)`` view; real tensors get a trailing axis of 1.

    Interpolation runs on real views: complex elementwise arithmetic is several
    times slower on CPUs.
    """
    return torch.view_as_real(x) if x.is_complex() else x.unsqueeze(-1)


def _from_real(x: torch.Tensor, complex_out: bool) -> torch.Tensor:
    return torch.view_as_complex(x.contiguous()) if complex_out else x.squeeze(-1)


def extract_patches(obj: torch.Tensor, positions_px: torch.Tensor, N: int) -> torch.Tensor:
    """Extract N×N patches at sub-pixel positions (bilinear interpolation).

    obj: ``(H, W)`` or ``(G, H, W)`` complex (or real).
    positions_px: ``(P, 2)`` for a single object or ``(G, P, 2)``, float (x, y).
    Returns ``(P, N, N)`` or ``(G, P, N, N)`` in obj's dtype.
    Exact (a plain slice) at integer positions; differentiable w.r.t. obj.
    """
    single = obj.ndim == 2
    if single:
        obj, positions_px = obj[None], positions_px[None]
    G, H, W = obj.shape
    flat_idx, fy, fx = _bilinear_indices(positions_px, N, H, W)
    # One flat index space over all G objects, so a single take() gathers every window.
    flat_idx = flat_idx + (torch.arange(G, device=obj.device) * (H * W)).view(G, 1, 1, 1)
    window = _as_real(torch.take(obj, flat_idx))  # (G, P, N+1, N+1, 2|1)
    fx = fx.to(window.dtype)[..., None]
    fy = fy.to(window.dtype)[..., None]
    # Separable bilinear interpolation: along columns, then rows.
    cols = torch.lerp(window[..., :, :N, :], window[..., :, 1:, :], fx)
    patches = torch.lerp(cols[..., :N, :, :], cols[..., 1:, :, :], fy)
    patches = _from_real(patches, obj.is_complex())
    return patches[0] if single else patches


def insert_patches(patches: torch.Tensor, positions_px: torch.Tensor, obj_shape: tuple[int, int],
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Adjoint of :func:`extract_patches`: scatter-add patches into an object canvas.

    patches: ``(P, N, N)`` or ``(G, P, N, N)``; positions_px ``(P, 2)`` / ``(G, P, 2)``.
    Returns ``(H, W)`` or ``(G, H, W)`` with the patches' dtype. Vectorised
    (one ``index_add_``), no loop over patches. With ``out`` (a contiguous
    canvas of that shape and dtype) the patches are added to it in place:
    no canvas-sized temporary, whatever the object's size.
    """
    single = patches.ndim == 3
    if single:
        patches, positions_px = patches[None], positions_px[None]
    G, P, N, _ = patches.shape
    H, W = obj_shape
    flat_idx, fy, fx = _bilinear_indices(positions_px, N, H, W)
    flat_idx = flat_idx + (torch.arange(G, device=patches.device) * (H * W)).view(G, 1, 1, 1)
    p = _as_real(patches)  # (G, P, N, N, 2|1)
    fx = fx.to(p.dtype)[..., None]
    fy = fy.to(p.dtype)[..., None]
    # Adjoint of the row interpolation, then of the column interpolation:
    # pixel k of a line feeds window pixels k (weight 1-f) and k+1 (weight f).
    q = fy * p
    rows = torch.cat([p - q, q[..., -1:, :, :]], dim=-3)
    rows[..., 1:N, :, :] += q[..., :-1, :, :]
    q = fx * rows
    window = torch.cat([rows - q, q[..., :, -1:, :]], dim=-2)
    window[..., :, 1:N, :] += q[..., :, :-1, :]
    window = _from_real(window, patches.is_complex())
    canvas = window.new_zeros(G * H * W) if out is None else out.view(-1)
    canvas.index_add_(0, flat_idx.reshape(-1), window.reshape(-1))
    out = canvas.reshape(G, H, W)
    return out[0] if single else out


# --------------------------------------------------------------------------
# Illumination and propagation


def intensity_of(probe: torch.Tensor) -> torch.Tensor:
    """``(N, N)`` float32 intensity of a probe ``(N, N)`` or ``(K, N, N)`` (modes summed);
    ``(B, 1, N, N)`` for per-item probes ``(B, 1, N, N)``."""
    intensity = probe.real.square() + probe.imag.square()
    return intensity.sum(0) if intensity.ndim == 3 else intensity


def illuminate(probe: torch.Tensor, obj_patches: torch.Tensor) -> torch.Tensor:
    """Exit waves ``probe * obj_patch``.

    probe: ``(N, N)`` or ``(K, N, N)`` complex (K incoherent modes), or
    ``(B, 1, N, N)``: one single-mode probe per item of ``(B, C, N, N)`` patches
    (training across several scans, each with its own probe).
    obj_patches: ``(..., N, N)`` complex.
    Returns ``(..., N, N)`` for a single-mode or per-item probe, ``(..., K, N, N)`` otherwise.
    """
    if probe.ndim in (2, 4):
        return probe * obj_patches
    return probe * obj_patches.unsqueeze(-3)


def propagate_far_field(exit_wave: torch.Tensor) -> torch.Tensor:
    """Fraunhofer propagation: ``fftshift(fft2(exit_wave, norm="ortho"))`` over the last two axes.

    Unitary, so energy is conserved (Parseval).
    """
    return torch.fft.fftshift(torch.fft.fft2(exit_wave, norm="ortho"), dim=(-2, -1))


def propagate_back(far_field: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`propagate_far_field` (its adjoint, as the operator is unitary)."""
    return torch.fft.ifft2(torch.fft.ifftshift(far_field, dim=(-2, -1)), norm="ortho")


def far_field_amplitude(probe: torch.Tensor, obj_patches: torch.Tensor) -> torch.Tensor:
    """Diffraction amplitude ``|F(probe * obj_patch)|`` (modes summed in intensity).

    obj_patches: ``(..., N, N)`` complex. Returns ``(..., N, N)`` real, >= 0.
    """
    far = propagate_far_field(illuminate(probe, obj_patches))
    intensity = far.real.square() + far.imag.square()
    if probe.ndim == 3:
        intensity = intensity.sum(dim=-3)
    # The small floor keeps the gradient of sqrt finite where the field is exactly zero.
    return torch.sqrt(intensity + 1e-12)


def forward_amplitude(obj: torch.Tensor, probe: torch.Tensor, positions_px: torch.Tensor) -> torch.Tensor:
    """Full forward model from an object to the scan's diffraction amplitudes.

    obj ``(H, W)`` complex, probe ``(N, N)`` or ``(K, N, N)`` complex,
    positions_px ``(P, 2)`` float. Returns ``(P, N, N)`` float amplitudes.
    """
    N = probe.shape[-1]
    return far_field_amplitude(probe, extract_patches(obj, positions_px, N))


def angular_spectrum_propagate(
    field: torch.Tensor, distance_m: float, wavelength_m: float, pixel_size_m: float
) -> torch.Tensor:
    """Propagate a complex field ``(..., N, N)`` by ``distance_m`` (angular spectrum method).

    Evanescent components (spatial frequencies beyond 1/wavelength) are dropped.
    """
    n_rows, n_cols = field.shape[-2:]
    fy = torch.fft.fftfreq(n_rows, d=pixel_size_m, dtype=torch.float64)
    fx = torch.fft.fftfreq(n_cols, d=pixel_size_m, dtype=torch.float64)
    arg = 1.0 - (wavelength_m * fy[:, None]) ** 2 - (wavelength_m * fx[None, :]) ** 2
    propagating = arg > 0
    k = 2 * math.pi / wavelength_m
    # (kz - k): the constant phase exp(i k z) carries no information, so it is left out.
    phase = (k * torch.sqrt(arg.clamp(min=0)) - k) * distance_m
    transfer = torch.where(propagating, torch.polar(torch.ones_like(phase), phase), torch.zeros_like(phase).to(torch.complex128))
    out = torch.fft.ifft2(torch.fft.fft2(field.to(torch.complex128)) * transfer)
    return out.to(field.dtype)


# --------------------------------------------------------------------------
# Overlap operators of a group of C patches (the PINN's overlap constraint)


def group_canvas_size(N: int, offsets_px: torch.Tensor) -> int:
    """Side of a square canvas that holds every patch of every group.

    offsets_px: ``(G, C, 2)`` positions relative to each group's centre.
    """
    span = float(offsets_px.abs().max()) if offsets_px.numel() else 0.0
    return int(N + 2 * math.ceil(span) + 2)


def _canvas_positions(offsets_px: torch.Tensor, canvas: int) -> torch.Tensor:
    return offsets_px + canvas / 2


def place_in_canvas(patches: torch.Tensor, offsets_px: torch.Tensor, canvas: int) -> torch.Tensor:
    """Scatter-add C patches of each group into a shared canvas (adjoint of re-extraction).

    patches ``(G, C, N, N)``, offsets_px ``(G, C, 2)`` relative to the group centre.
    Returns ``(G, canvas, canvas)``.
    """
    return insert_patches(patches, _canvas_positions(offsets_px, canvas), (canvas, canvas))


def extract_from_canvas(canvas_obj: torch.Tensor, offsets_px: torch.Tensor, N: int) -> torch.Tensor:
    """Re-extract the C patches of each group from its canvas ``(G, S, S)`` -> ``(G, C, N, N)``."""
    return extract_patches(canvas_obj, _canvas_positions(offsets_px, canvas_obj.shape[-1]), N)


def merge_group(patches: torch.Tensor, offsets_px: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Overlap constraint: weighted average of a group's patches, then re-extraction.

    patches ``(G, C, N, N)`` complex, offsets_px ``(G, C, 2)``, weight ``(N, N)``
    or ``(G, 1, N, N)`` real >= 0 (e.g. the probe intensity, or each group's own). Where patches overlap the result is
    their weighted mean, so the returned ``(G, C, N, N)`` patches agree with
    each other wherever they overlap. Differentiable.
    """
    G, C, N, _ = patches.shape
    canvas = group_canvas_size(N, offsets_px)
    w = weight.to(patches.real.dtype).expand(G, C, N, N)
    numerator = place_in_canvas(patches * w, offsets_px, canvas)
    denominator = place_in_canvas(w, offsets_px, canvas)
    floor = 1e-3 * weight.amax(dim=(-2, -1)).reshape(-1, 1, 1).to(denominator.dtype)  # each group's own peak
    merged = numerator / torch.maximum(denominator, floor)
    return extract_from_canvas(merged, offsets_px, N)


# --------------------------------------------------------------------------
# Per-pattern physics features for the network


def single_pattern_estimate(amplitude: torch.Tensor, probe: torch.Tensor, iterations: int,
                            good_pixels: torch.Tensor | None = None) -> torch.Tensor:
    """Object patch estimate from each pattern alone: a few error-reduction steps from a flat object.

    amplitude ``(..., N, N)`` measured amplitudes (counts scale); probe
    ``(N, N)`` complex (for a multi-mode probe the first mode is used), or
    ``(B, 1, N, N)`` per item of ``(B, C, N, N)`` amplitudes.
    Each step replaces the far-field modulus by the measurement and updates
    the object by the probe-weighted exit-wave change (ePIE with step 1, on
    one pattern). ``good_pixels (N, N)`` bool: bad detector pixels keep the
    predicted modulus (they measured nothing). Returns ``(..., N, N)`` complex64. It turns the Fourier
    inversion the network would otherwise have to learn into a real-space
    image-to-image correction.
    """
    if probe.ndim == 3:
        probe = probe[0]
    obj = torch.ones(amplitude.shape, dtype=torch.complex64, device=amplitude.device)
    # Each probe's own peak (a per-item probe (B, 1, N, N) is normalised item by item).
    step = probe.conj() / (probe.real.square() + probe.imag.square()).amax(dim=(-2, -1), keepdim=True)
    # Work in the FFT's own (unshifted) detector layout: the measurement is shifted once here instead
    # of the field twice per iteration (same result, bit for bit; a quarter less time).
    amplitude = torch.fft.ifftshift(amplitude, dim=(-2, -1))
    good_pixels = None if good_pixels is None else torch.fft.ifftshift(good_pixels, dim=(-2, -1))
    for _ in range(iterations):
        exit_wave = probe * obj
        far = torch.fft.fft2(exit_wave, norm="ortho")
        replaced = far * (amplitude / far.abs().clamp(min=1e-6))
        far = replaced if good_pixels is None else torch.where(good_pixels, replaced, far)
        obj = obj + step * (torch.fft.ifft2(far, norm="ortho") - exit_wave)
    return obj
