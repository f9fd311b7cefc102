"""Physics-consistent refinement of a stitched object on the measured scan (no ground truth).

Starting from the network's stitched object, K passes over the scan minimise
the same Poisson NLL through the same forward model. Each pass visits the
patterns in random mini-batches (seeded); every mini-batch takes a gradient
step preconditioned by that batch's illumination (each pixel moves at a rate
set by how brightly it was just seen, as in PIE-family solvers) with Nesterov
momentum, which carries the slowly converging low spatial frequencies
(notably the phase) much faster than plain steps. Memory is the object plus
one batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ptycho_ml.physics import forward as physics
from ptycho_ml.physics.losses import poisson_nll
from ptycho_ml.data.scan import ScanData



@dataclass
class RefineResult:
    obj: torch.Tensor  # (H, W) complex64
    loss_history: list[float] = field(default_factory=list)  # mean Poisson deviance/2 per pixel, per step


def refine_object(obj: torch.Tensor, scan: ScanData, probe: torch.Tensor, steps: int, *,
                  batch_size: int = 128, step_size: float = 0.4, momentum: float = 0.9,
                  regularisation: float = 0.05, eps_counts: float = 0.5, seed: int = 0,
                  amplitudes: torch.Tensor | None = None,
                  on_step: Callable[[int, float], None] | None = None) -> RefineResult:
    """Refine ``obj (H, W) complex64`` against the scan's diffraction for ``steps`` passes (epochs).

    probe ``(N, N)`` or ``(K, N, N)`` complex64. ``amplitudes`` ``(M, N, N)``
    float32 may be passed when the scan is already in memory (otherwise each
    mini-batch is read from the scan). Bad detector pixels are excluded.
    ``loss_history`` holds the mean Poisson deviance/2 per pixel of each pass.
    """
    obj = obj.detach().to(torch.complex64).clone()
    if steps <= 0:
        return RefineResult(obj)
    N = probe.shape[-1]
    positions = torch.from_numpy(np.asarray(scan.positions_px, dtype=np.float32))
    good = None if scan.good_pixels is None else torch.from_numpy(scan.good_pixels).to(torch.float32)
    intensity = physics.intensity_of(probe)
    M = len(positions)
    generator = torch.Generator().manual_seed(seed)
    velocity = torch.zeros_like(obj)
    history: list[float] = []
    for step in range(steps):
        # Full steps for most passes, then a linear decay over the last quarter: the
        # mini-batch noise is averaged out instead of left in the object.
        tail = max(1, steps // 4)
        rate = step_size * min(1.0, 0.2 + 0.8 * (steps - 1 - step) / tail)
        total = 0.0
        for batch in torch.randperm(M, generator=generator).split(batch_size):
            batch = batch.sort().values  # increasing indices: cheap reads from HDF5/NPZ
            amp = amplitudes[batch] if amplitudes is not None else torch.from_numpy(scan.amplitude(batch.numpy()))
            lookahead = (obj + momentum * velocity).requires_grad_(True)
            pred = physics.forward_amplitude(lookahead, probe, positions[batch])
            loss = poisson_nll(pred, amp, good, eps_counts, reduction="sum")
            (grad,) = torch.autograd.grad(loss, lookahead)
            illumination = physics.insert_patches(intensity.expand(len(batch), N, N), positions[batch], obj.shape)
            # Preconditioner: the inverse illumination, floored so dim edges do not take huge steps.
            # torch's complex gradient is 2 dL/d(conj z), and the Poisson gradient is about twice
            # the amplitude-loss one near the solution, hence /4.
            velocity = momentum * velocity - rate * grad / (4 * (illumination + regularisation * illumination.max()))
            obj = (obj + velocity).detach()
            total += float(loss.detach())
        history.append(total / (M * N * N))
        if on_step is not None:
            on_step(step, history[-1])
    return RefineResult(obj, history)
