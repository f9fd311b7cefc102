"""Data-fidelity losses on diffraction (docs/architecture.md, "Conventions"). Pure torch."""

from __future__ import annotations

import torch


def poisson_nll(pred_amplitude: torch.Tensor, measured_amplitude: torch.Tensor,
                mask: torch.Tensor | None = None, eps: float = 1e-6, reduction: str = "mean",
                counts_term: torch.Tensor | None = None) -> torch.Tensor:
    """Mean Poisson negative log-likelihood of measured counts given predicted counts.

    Both inputs are amplitudes ``(..., N, N)`` on the counts scale
    (amplitude² = photon counts). The count-only term ``log(k!)`` is dropped
    and ``k log k - k`` is added so that a perfect prediction scores 0 and the
    value is the Poisson deviance / 2 per pixel. ``mask (N, N)`` bool marks
    good pixels (bad detector pixels excluded). ``eps`` (counts) keeps the
    log finite where nothing is predicted. ``reduction="sum"`` gives the total
    (what a solver's step sizes are calibrated for) instead of the mean.
    ``counts_term``: :func:`count_term` of the measured counts, when the
    caller made it once for many calls (it does not depend on the prediction).
    """
    per_pixel = poisson_deviance(pred_amplitude.square(), measured_amplitude.square(), eps, counts_term=counts_term)
    if reduction == "sum":
        return (per_pixel * mask).sum() if mask is not None else per_pixel.sum()
    return _masked_mean(per_pixel, mask)


def count_term(counts: torch.Tensor) -> torch.Tensor:
    """``k log k - k`` of counts ``(..., N, N)``: the part of :func:`poisson_deviance` that does not depend on the
    prediction (it makes an exact prediction score 0). A refinement judging many predictions against the same
    measured counts makes it once."""
    return torch.xlogy(counts, counts) - counts


def poisson_deviance(pred_counts: torch.Tensor, counts: torch.Tensor, eps: float = 1e-6,
                     log_pred: torch.Tensor | None = None, counts_term: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel Poisson deviance / 2 of ``counts`` given ``pred_counts`` (both ``(..., N, N)``, photon counts):
    ``λ - k log(λ + eps) + k log k - k``, 0 where the prediction is exact. ``log_pred``, ``log(pred_counts + eps)``
    when the caller has it already (several count sets judged against one prediction); ``counts_term``,
    :func:`count_term` of ``counts`` when the caller has it already (one count set, many predictions)."""
    log_pred = torch.log(pred_counts + eps) if log_pred is None else log_pred
    return pred_counts - counts * log_pred + (count_term(counts) if counts_term is None else counts_term)


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
