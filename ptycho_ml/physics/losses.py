"""Data-fidelity losses on diffraction (docs/architecture.md, "Conventions"). Pure torch."""

from __future__ import annotations

import torch


def poisson_nll(pred_amplitude: torch.Tensor, measured_amplitude: torch.Tensor,
                mask: torch.Tensor | None = None, eps: float = 1e-6, reduction: str = "mean") -> torch.Tensor:
    """Mean Poisson negative log-likelihood of measured counts given predicted counts.

    Both inputs are amplitudes ``(..., N, N)`` on the counts scale
    (amplitude² = photon counts). The count-only term ``log(k!)`` is dropped
    and ``k log k - k`` is added so that a perfect prediction scores 0 and the
    value is the Poisson deviance / 2 per pixel. ``mask (N, N)`` bool marks
    good pixels (bad detector pixels excluded). ``eps`` (counts) keeps the
    log finite where nothing is predicted. ``reduction="sum"`` gives the total
    (what a solver's step sizes are calibrated for) instead of the mean.
    """
    pred_counts = pred_amplitude.square()
    counts = measured_amplitude.square()
    per_pixel = pred_counts - counts * torch.log(pred_counts + eps) + torch.xlogy(counts, counts) - counts
    if reduction == "sum":
        return (per_pixel * mask).sum() if mask is not None else per_pixel.sum()
    return _masked_mean(per_pixel, mask)


def mae_amplitude(pred_amplitude: torch.Tensor, measured_amplitude: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute error between amplitudes ``(..., N, N)``."""
    return _masked_mean((pred_amplitude - measured_amplitude).abs(), mask)


def _masked_mean(per_pixel: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_pixel.mean()
    m = mask.to(per_pixel.dtype)
    return (per_pixel * m).sum() / (m.sum() * (per_pixel.numel() / per_pixel.shape[-1] / per_pixel.shape[-2])).clamp(min=1)


LOSSES = {"poisson": poisson_nll, "mae": mae_amplitude}
