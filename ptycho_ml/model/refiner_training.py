"""Training the learned refinement (:class:`~ptycho_ml.model.refiner.LearnedRefiner`) over whole (sub-)scans.

The generator is trained first, on groups of patterns. The refiner then
trains on windows of the training scans, each a small scan in its own right
(every pattern whose centre lies in a square of a few scan steps, the object
cropped to what they see): the frozen generator's stitched object is the
start, the S stages run through the forward model over every pattern of the
window, and the loss is the same as the generator's: the Poisson NLL of the
window's measurements and, where the scans carry their ground truth
(simulated data), the object error weighted by the illumination (hybrid).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree

from ptycho_ml.data.grouping import partition_groups
from ptycho_ml.data.scan import ScanData
from ptycho_ml.model.module import HYBRID_SUPERVISED_WEIGHT
from ptycho_ml.model.network import DiffractionToObject
from ptycho_ml.model.refiner import LearnedRefiner
from ptycho_ml.physics import forward as physics
from ptycho_ml.physics.losses import poisson_nll
from ptycho_ml.physics.stitching import Stitcher

#: Weight of each earlier stage's object error, relative to the last stage's (deep supervision).
EARLY_STAGE_WEIGHT = 0.3


@dataclass
class Window:
    """One training window: a small scan cut from a training scan, with the generator's start."""

    start: torch.Tensor  # (h, w) complex64: the generator's stitched object
    truth: torch.Tensor | None  # (h, w) complex64, or None (measured data)
    amplitudes: torch.Tensor  # (m, N, N) float32
    positions_px: torch.Tensor  # (m, 2) float32, in the window's canvas
    probe: torch.Tensor  # (N, N) or (K, N, N) complex64
    lit: torch.Tensor  # (h, w) float32: the illumination over the window, max 1 (weights the object error)


def cut_windows(model: DiffractionToObject, scan: ScanData, count: int, steps_across: int,
                rng: np.random.Generator, use_truth: bool = True) -> list[Window]:
    """``count`` random windows of ``scan``, each about ``steps_across`` scan steps a side.

    The scan's own probe drives the generator and the physics (as in
    training with several scans). Windows are cropped to the patterns'
    footprint plus one pixel. ``use_truth``: the scan's object is its
    ground truth (simulated data, a hybrid or supervised loss); otherwise
    it is ignored (it may be only an initial guess).
    """
    N = scan.N
    positions = np.asarray(scan.positions_px, dtype=np.float64)
    spacing = np.median(cKDTree(positions).query(positions, k=2)[0][:, 1])  # a typical step between neighbours
    half = steps_across * max(float(spacing), 1.0) / 2
    probe = torch.from_numpy(np.asarray(scan.probe, dtype=np.complex64))
    weight = physics.intensity_of(probe)
    truth_all = None if scan.obj is None or not use_truth else np.asarray(scan.obj)
    good = None if scan.good_pixels is None else torch.from_numpy(scan.good_pixels)
    C = model.cfg.gridsize**2
    windows = []
    for centre in rng.choice(len(positions), size=count, replace=len(positions) < count):
        inside = np.flatnonzero(np.abs(positions - positions[centre]).max(axis=1) <= half)
        if len(inside) < C:
            continue
        pos = positions[inside]
        x0, y0 = (np.floor(pos.min(0) - N / 2) - 1).astype(int).clip(min=0)
        x1, y1 = np.ceil(pos.max(0) + N / 2 + 2).astype(int)
        x1, y1 = min(x1, scan.obj_shape[1]), min(y1, scan.obj_shape[0])
        local = torch.from_numpy((pos - [x0, y0]).astype(np.float32))
        amp = torch.from_numpy(scan.amplitude(inside))
        groups, owned = partition_groups(pos, model.cfg.gridsize)
        with torch.no_grad():
            patches = model(amp[torch.from_numpy(groups)].view(len(groups), C, N, N), probe, good)
        stitcher = Stitcher((y1 - y0, x1 - x0), weight)
        stitcher.add(patches[torch.from_numpy(owned)], local[torch.from_numpy(groups[owned])])
        truth = None if truth_all is None else torch.from_numpy(truth_all[y0:y1, x0:x1].astype(np.complex64))
        lit = stitcher.illumination()  # the probe intensity summed over the window's positions
        windows.append(Window(stitcher.result(), truth, amp, local, probe, lit / lit.max()))
    return windows


def window_loss(refiner: LearnedRefiner, window: Window, good_pixels: torch.Tensor | None = None) -> torch.Tensor:
    """Hybrid loss of the refiner on one window: last stage's Poisson NLL (mean) + weighted object errors."""
    outputs = refiner(window.start, window.probe, window.positions_px, window.amplitudes, good_pixels,
                      every_stage=True)
    pred = physics.forward_amplitude(outputs[-1], window.probe, window.positions_px)
    loss = poisson_nll(pred, window.amplitudes, good_pixels)
    if window.truth is not None:
        lit = window.lit
        errors = [((obj - window.truth).abs().square() * lit).sum() / lit.sum() for obj in outputs]
        supervised = errors[-1] + EARLY_STAGE_WEIGHT * sum(errors[:-1])
        loss = loss + HYBRID_SUPERVISED_WEIGHT * supervised
    return loss


def fit_refiner(model: DiffractionToObject, scans: ScanData | Sequence[ScanData], stages: int, width: int = 16, *,
                iterations: int, windows_per_scan: int = 48, steps_across: int = 6,
                learning_rate: float = 1e-3, seed: int = 0, progress: bool = False, use_truth: bool = True,
                on_iteration=None) -> tuple[LearnedRefiner, list[float]]:
    """Train a :class:`LearnedRefiner` of ``stages`` stages behind the (frozen) generator of ``model``.

    Returns ``(refiner in eval mode, loss per iteration)``. ``on_iteration(i, loss)`` is called after each
    step; ``progress`` shows a progress bar. ``use_truth``: train against the scans' ground truth too
    (as the generator's hybrid loss does); False: the Poisson NLL alone.
    """
    from tqdm.auto import tqdm

    scans = [scans] if isinstance(scans, ScanData) else list(scans)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model.eval()
    windows = [w for scan in scans for w in cut_windows(model, scan, windows_per_scan, steps_across, rng, use_truth)]
    refiner = LearnedRefiner(stages, width)
    if not stages or not windows:
        return refiner.eval(), []
    optimiser = torch.optim.Adam(refiner.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=iterations, eta_min=learning_rate * 0.05)
    history = []
    good = None if scans[0].good_pixels is None else torch.from_numpy(scans[0].good_pixels)
    refiner.train()
    for i in tqdm(range(iterations), desc="learned refinement", unit="window", disable=not progress, leave=False):
        window = windows[int(rng.integers(len(windows)))]
        loss = window_loss(refiner, window, good)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(refiner.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        history.append(float(loss.detach()))
        if on_iteration is not None:
            on_iteration(i, history[-1])
    return refiner.eval(), history
