"""Physics-consistent refinement of a stitched object on the measured scan (no ground truth).

Starting from the network's stitched object, K full passes over the scan
minimise the same Poisson NLL through the same forward model. Each step is a
gradient step preconditioned by the scan's illumination (so every pixel moves
at a rate set by how often and how brightly it was seen, as in PIE-family
solvers) with Nesterov momentum. Memory is the object plus one batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from . import physics
from .data.scan import ScanData


@dataclass
class RefineResult:
    obj: torch.Tensor  # (H, W) complex64
    loss_history: list[float] = field(default_factory=list)  # mean Poisson deviance/2 per pixel, per step


def _poisson_sum(pred_amplitude: torch.Tensor, amplitude: torch.Tensor, good: torch.Tensor | None, eps: float) -> torch.Tensor:
    pred_counts = pred_amplitude.square()
    counts = amplitude.square()
    per_pixel = pred_counts - counts * torch.log(pred_counts + eps) + torch.xlogy(counts, counts) - counts
    if good is not None:
        per_pixel = per_pixel * good
    return per_pixel.sum()


def refine_object(obj: torch.Tensor, scan: ScanData, probe: torch.Tensor, steps: int, *,
                  batch_size: int = 512, step_size: float = 0.9, momentum: float = 0.8,
                  regularisation: float = 0.05, eps_counts: float = 0.5,
                  amplitudes: torch.Tensor | None = None,
                  on_step: Callable[[int, float], None] | None = None) -> RefineResult:
    """Refine ``obj (H, W) complex64`` against the scan's diffraction for ``steps`` full passes.

    probe ``(N, N)`` or ``(K, N, N)`` complex64. ``amplitudes`` ``(M, N, N)``
    float32 may be passed when the scan is already in memory (otherwise it
    streams from the scan each pass). Bad detector pixels are excluded.
    """
    obj = obj.detach().to(torch.complex64).clone()
    if steps <= 0:
        return RefineResult(obj)
    N = probe.shape[-1]
    positions = torch.from_numpy(np.asarray(scan.positions_px, dtype=np.float32))
    good = None if scan.good_pixels is None else torch.from_numpy(scan.good_pixels).to(torch.float32)
    intensity = probe.real.square() + probe.imag.square()
    intensity = intensity.sum(0) if intensity.ndim == 3 else intensity
    illumination = physics.insert_patches(intensity.expand(len(positions), N, N), positions, obj.shape)
    # Preconditioner: the inverse illumination, floored so dim edges do not take huge steps.
    precond = 1.0 / (illumination + regularisation * illumination.max())
    n_pixels = len(positions) * N * N
    velocity = torch.zeros_like(obj)
    history: list[float] = []
    for step in range(steps):
        lookahead = (obj + momentum * velocity).requires_grad_(True)
        total = 0.0
        grad = torch.zeros_like(obj)
        for start in range(0, len(positions), batch_size):
            sl = slice(start, start + batch_size)
            amp = amplitudes[sl] if amplitudes is not None else torch.from_numpy(scan.amplitude(sl))
            pred = physics.forward_amplitude(lookahead, probe, positions[sl])
            loss = _poisson_sum(pred, amp, good, eps_counts)
            (g,) = torch.autograd.grad(loss, lookahead)
            grad += g
            total += float(loss.detach())
        # torch's gradient w.r.t. a complex tensor is 2 dL/d(conj z); the Poisson
        # gradient is about twice the amplitude-loss one near the solution, hence /4.
        velocity = momentum * velocity - step_size * precond * grad / 4
        obj = obj + velocity
        history.append(total / n_pixels)
        if on_step is not None:
            on_step(step, history[-1])
    return RefineResult(obj.detach(), history)
