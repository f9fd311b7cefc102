"""Physics-consistent refinement of a stitched object on the measured scan (no ground truth).

Starting from the network's stitched object, K passes over the scan minimise
the same Poisson NLL through the same forward model. Each pass visits the
patterns in random mini-batches (seeded); every mini-batch takes a gradient
step preconditioned by that batch's illumination (each pixel moves at a rate
set by how brightly it was just seen, as in PIE-family solvers) with Nesterov
momentum, which carries the slowly converging low spatial frequencies
(notably the phase) much faster than plain steps. Memory is the object plus
one batch.

:func:`refine_joint` refines, with the object, what a real scan only
estimates: the probe (K incoherent modes, orthogonalised, its power held at
the start probe's, optional support), the positions (Gauss-Newton shifts
from the object's gradient, bounded per step and in total, started once the
object has settled) and a per-pattern intensity scale (flux). With all of
them off it is :func:`refine_object`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
import math

import numpy as np
import torch

from ptycho_ml.physics import forward as physics
from ptycho_ml.physics.losses import count_term, poisson_deviance, poisson_nll
from ptycho_ml.data.scan import ScanData


#: Floor of the illumination preconditioner, as a fraction of the brightest pixel: dim edges do not take huge steps.
ILLUMINATION_FLOOR = 0.05

#: A measured choice of ``phase_gain``, the extra gain of the object step's phase at scales wider than the
#: probe: the data constrain a smooth phase only through its slope, so its curvature falls as k² and plain
#: steps leave it for last. On plain mini-batch steps it helps at 1e6 photons per pattern and hurts at 1e4
#: (it fits the mini-batches' noise sooner). The default pipeline gives it to the variance-reduced steps only:
#: there it restores the wide phase their lower momentum converges more slowly at 1e5-1e7, and costs
#: 0.01-0.04 phase SSIM at 1e4 (docs/benchmarks.md, "Wide phase", "Variance-reduced passes").
PHASE_GAIN = 4.0

#: The gain's width: phase structure wider than about this Gaussian σ, as a fraction of the probe's N.
PHASE_GAIN_SIGMA_FRACTION = 0.25

#: ``variance_reduction``: the object steps become variance-reduced once the data are explained to their noise
#: (:func:`deviance_ratio` at most this; 1 = the misfit Poisson noise alone would leave).
VARIANCE_REDUCTION_RATIO = 1.0

#: The momentum of the variance-reduced steps: each corrects its mini-batch gradient by one stored a pass ago,
#: and at 0.9 that staleness made them diverge (measured, siemens-1e4 phase after 30 passes: 0.72 at 0.9,
#: 0.86 at 0.7).
VARIANCE_REDUCED_MOMENTUM = 0.7

#: Memory the stored mini-batch gradients may take (one object-sized array per mini-batch); above it the
#: refinement stays plain.
VARIANCE_REDUCTION_MAX_BYTES = 1 << 30

#: Patterns :func:`refine_joint` judges the fit on while it waits to reduce the variance: a sample, so the
#: check costs about one mini-batch's forward pass.
VARIANCE_REDUCTION_SAMPLE = 128

#: A measured choice of ``misfit_step_gain``: the object steps are this many times larger while the data are
#: misfit far above their noise. Far from the fit, the mini-batch gradients agree and the noise that caps the
#: step at low dose is not yet what limits it; the default step, set for the noise, then converges slowly
#: (docs/benchmarks.md, "Larger steps while the misfit is far above the noise": chip-gaussian-1e7 after 30
#: passes from the network's object, fit 9.6 at 1x, 2.2 at 2x and 3x; 3 was level or better than 2 on every
#: suite scan).
MISFIT_STEP_GAIN = 3.0

#: The larger steps stop, for good, once the deviance ratio of the sample (:func:`deviance_ratio`) is at most
#: this: from there on the noise is what the step must respect.
MISFIT_STEP_RATIO = 2.0

#: ... or once the fit no longer falls: below this fraction of what it was two passes before. A misfit the object
#: cannot explain (a wrong probe or wrong positions) stays level from the start, and larger steps there only
#: push the object further into that error (measured, "Real scans": the sample's fit 41-74 on every pass with
#: 1 px position noise; a scan converging falls 5-50 % a pass).
MISFIT_STEP_FALL = 0.9


@dataclass
class RefineResult:
    obj: torch.Tensor  # (H, W) complex64
    loss_history: list[float] = field(default_factory=list)  # mean Poisson deviance/2 per pixel, per step


@dataclass
class JointRefineResult(RefineResult):
    """:class:`RefineResult` plus the refined probe ``(K, N, N) complex64``, positions ``(M, 2) float64``
    (x, y, px) and per-pattern intensity scale ``(M,) float32`` (ones unless refined)."""

    probe: torch.Tensor | None = None
    positions_px: np.ndarray | None = None
    intensity_scale: np.ndarray | None = None
    variance_reduced_from: int | None = None  # the first variance-reduced pass (None: none was)
    #: the sample's deviance ratio before each pass (NaN where no switch measured it): how the fit fell
    sample_fits: list[float] = field(default_factory=list)


def refine_object(obj: torch.Tensor, scan: ScanData, probe: torch.Tensor, steps: int, *,
                  batch_size: int = 128, step_size: float = 0.4, momentum: float = 0.9,
                  regularisation: float = ILLUMINATION_FLOOR, eps_counts: float = 0.5, seed: int = 0,
                  amplitudes: torch.Tensor | None = None,
                  on_step: Callable[[int, float], None] | None = None) -> RefineResult:
    """Refine ``obj (H, W) complex64`` against the scan's diffraction for ``steps`` passes (epochs).

    probe ``(N, N)`` or ``(K, N, N)`` complex64. ``amplitudes`` ``(M, N, N)``
    float32 may be passed when the scan is already in memory (otherwise each
    mini-batch is read from the scan). Bad detector pixels are excluded.
    ``loss_history`` holds the mean Poisson deviance/2 per pixel of each pass.
    The probe and positions stay fixed (:func:`refine_joint` with nothing else refined).
    """
    result = refine_joint(obj, scan, probe, steps, batch_size=batch_size, step_size=step_size, momentum=momentum,
                          regularisation=regularisation, eps_counts=eps_counts, seed=seed, amplitudes=amplitudes,
                          on_step=on_step)
    return RefineResult(result.obj, result.loss_history)


def object_gradient(obj: torch.Tensor, probe: torch.Tensor, positions_px: torch.Tensor,
                    amplitudes: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
                    good_pixels: torch.Tensor | None = None, eps_counts: float = 0.5, batch_size: int = 256,
                    create_graph: bool = False) -> tuple[torch.Tensor, float]:
    """The whole scan's Poisson NLL gradient at ``obj`` and the NLL, batch by batch.

    obj ``(H, W)`` complex64; probe ``(N, N)``/``(K, N, N)``; positions
    ``(M, 2)`` float32; amplitudes ``(M, N, N)`` float32 (counts scale) or a
    function of pattern indices ``(B,)`` returning theirs. Returns
    ``(grad (H, W) complex64, nll)``: torch's ``2 dL/d(conj obj)`` of the
    summed NLL, and the summed NLL (deviance/2). ``create_graph``: the
    gradient is itself differentiable (a learned refinement trained through
    it). The illumination that preconditions it is :func:`coverage`.
    """
    grad = torch.zeros_like(obj)
    total = 0.0
    M = len(positions_px)
    for start in range(0, M, batch_size):
        idx = torch.arange(start, min(start + batch_size, M))
        amp = amplitudes(idx) if callable(amplitudes) else amplitudes[idx]
        point = obj if create_graph else obj.detach().requires_grad_(True)
        with torch.enable_grad():
            point = point if point.requires_grad else point.requires_grad_(True)
            pred = physics.forward_amplitude(point, probe, positions_px[idx])
            loss = poisson_nll(pred, amp, good_pixels, eps_counts, reduction="sum")
            (g,) = torch.autograd.grad(loss, point, create_graph=create_graph)
        grad = grad + g if create_graph else grad.add_(g)  # in place unless the sum itself is differentiated
        total += float(loss.detach())
    return grad, total


def object_nll(obj: torch.Tensor, probe: torch.Tensor, positions_px: torch.Tensor,
               amplitudes: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
               good_pixels: torch.Tensor | None = None, eps_counts: float = 0.5, batch_size: int = 256) -> float:
    """The whole scan's summed Poisson NLL at ``obj`` (as :func:`object_gradient` reports it), forward only."""
    total = 0.0
    M = len(positions_px)
    with torch.no_grad():
        for start in range(0, M, batch_size):
            idx = torch.arange(start, min(start + batch_size, M))
            amp = amplitudes(idx) if callable(amplitudes) else amplitudes[idx]
            pred = physics.forward_amplitude(obj, probe, positions_px[idx])
            total += float(poisson_nll(pred, amp, good_pixels, eps_counts, reduction="sum"))
    return total


# --------------------------------------------------------------------------
# Probe modes


def orthogonalise_modes(probe: torch.Tensor) -> torch.Tensor:
    """Incoherent modes ``(K, N, N)`` complex -> orthogonal modes, strongest first.

    A unitary mix of the modes (eigenvectors of their Gram matrix): the summed
    intensity, hence the forward model and the total power, is unchanged.
    """
    K = probe.shape[0]
    if K == 1:
        return probe
    A = probe.reshape(K, -1).to(torch.complex128)
    gram = A.conj() @ A.T  # (K, K) Hermitian: <mode_i, mode_j>
    power, vectors = torch.linalg.eigh(gram)
    modes = vectors.T @ A  # rows: orthogonal modes, power ascending
    return modes.flip(0).reshape(probe.shape).to(probe.dtype)


def initial_modes(probe: torch.Tensor, modes: int, extra_power: float = 0.05) -> torch.Tensor:
    """``(modes, N, N) complex64`` from a probe ``(N, N)`` or ``(K, N, N)``, total power kept.

    Missing modes start as the first mode times low-order ramps (x, y, xy,
    x² − y², …) with ``extra_power`` of the power each, so that the data can
    grow them; surplus modes are merged away (the strongest are kept).
    """
    probe = probe if probe.ndim == 3 else probe[None]
    probe = probe.to(torch.complex64)
    power = float(physics.intensity_of(probe).sum())
    probe = orthogonalise_modes(probe)[:modes]
    N = probe.shape[-1]
    if probe.shape[0] < modes:
        yy, xx = torch.meshgrid(torch.arange(N) - N / 2, torch.arange(N) - N / 2, indexing="ij")
        xx, yy = xx / (N / 4), yy / (N / 4)
        ramps = [xx, yy, xx * yy, xx**2 - yy**2, xx**2 + yy**2 - 1, xx * (xx**2 + yy**2), yy * (xx**2 + yy**2)]
        first = probe[0]
        extra = []
        for ramp in ramps[:modes - probe.shape[0]]:
            mode = first * ramp
            extra.append(mode * (extra_power * power / float(physics.intensity_of(mode).sum())) ** 0.5)
        probe = orthogonalise_modes(torch.cat([probe, torch.stack(extra)]))
    return probe * (power / float(physics.intensity_of(probe).sum())) ** 0.5


def _support(N: int, radius_px: float) -> torch.Tensor | None:
    """Circular probe support ``(N, N)`` float32 of ``radius_px`` about the centre (None for radius 0)."""
    if radius_px <= 0:
        return None
    yy, xx = torch.meshgrid(torch.arange(N) - N / 2, torch.arange(N) - N / 2, indexing="ij")
    return (xx.square() + yy.square() <= radius_px**2).to(torch.float32)


# --------------------------------------------------------------------------
# Joint refinement


def refine_joint(obj: torch.Tensor, scan: ScanData, probe: torch.Tensor, steps: int, *,
                 refine_probe: bool = False, refine_positions: bool = False, refine_intensity: bool = False,
                 probe_modes: int | None = None, probe_support_px: float = 0.0,
                 probe_start: int | None = None, positions_start: int | None = None,
                 probe_rate: float = 1.0, position_rate: float = 1.0,
                 max_position_step_px: float = 0.5, max_position_correction_px: float | None = None,
                 batch_size: int = 128, step_size: float = 0.4, momentum: float = 0.9,
                 regularisation: float = ILLUMINATION_FLOOR, eps_counts: float = 0.5, seed: int = 0,
                 amplitudes: torch.Tensor | None = None, object_ramp_gauge: bool = True,
                 start_positions_px: np.ndarray | None = None, phase_gain: float = 0.0,
                 variance_reduction: bool = False, misfit_step_gain: float = 1.0,
                 on_step: Callable[[int, float], None] | None = None) -> JointRefineResult:
    """Refine the object and, as asked, the probe, the positions and a per-pattern intensity scale.

    obj ``(H, W) complex64``; probe ``(N, N)`` or ``(K, N, N)`` complex64;
    the scan's positions are the start. Every mini-batch takes one step of
    each refined quantity from the same Poisson likelihood gradient:

    * object: as :func:`refine_object` (illumination-preconditioned, Nesterov);
    * probe (from pass ``probe_start``, default ``steps // 10``): a step
      preconditioned by the batch's summed object intensity (ePIE-like),
      ``probe_rate`` of the Newton step; then the support (radius
      ``probe_support_px``, 0 = none) and the power constraint (Σ|P|² held
      at the start probe's, which :func:`ptycho_ml.inference.reconstruct.inference_probe`
      checked against the measured counts); modes (``probe_modes``, default
      the probe's own) are orthogonalised after every pass;
    * positions (from pass ``positions_start``, default ``steps // 3``, when
      the object has settled): a Gauss-Newton shift per pattern from the
      object's gradient, ``position_rate`` of it, at most
      ``max_position_step_px`` per step; the total correction is bounded by
      ``max_position_correction_px`` (default N/8) and its mean is removed
      (a common shift of all positions only moves the object);
    * intensity scale: the Poisson maximum-likelihood scale of each pattern's
      counts (Σ measured / Σ predicted), mean held at 1.

    Gauges the data do not fix are held: the probe power; the probe's linear
    phase ramp (at the start probe's) and, with ``object_ramp_gauge``, the
    object's (at its value when the probe starts to move; left free it tilts
    the object's phase, docs/benchmarks.md "Real scans").

    ``start_positions_px (M, 2)`` continues from positions an earlier call
    corrected (the bound and the gauge stay relative to the scan's own).

    ``variance_reduction``: once the data are explained to their noise
    (:func:`deviance_ratio` of a sample of patterns at most
    :data:`VARIANCE_REDUCTION_RATIO`, checked before each pass), each
    mini-batch gradient is corrected by the one the same mini-batch gave a
    pass ago plus its share (the batch's illumination over the scan's) of the
    sum of all the stored ones (SAGA): the mini-batches no longer pull the
    object towards their own noise, which, at low dose, plain mini-batch steps
    with momentum leave in the wide phase. The momentum is then
    :data:`VARIANCE_REDUCED_MOMENTUM`, and the mini-batches a fixed partition
    of the scan (visited in a new order each pass; their gradients are first
    taken at the switch, one pass's cost). Until then the refinement is the
    plain one, bit for bit. Only the object alone
    (nothing else refined), photon counts (:func:`counts_like`) and at most
    :data:`VARIANCE_REDUCTION_MAX_BYTES` of stored gradients; otherwise the
    plain steps throughout. ``variance_reduced_from`` in the result says
    from which pass.

    ``phase_gain`` (0 = none; :data:`PHASE_GAIN`) adds that multiple of the
    object step's phase, low-passed to scales wider than the probe
    (:func:`wide_phase`), to the step: wide phase converges in a few passes
    instead of dozens. With ``variance_reduction`` asked, only the
    variance-reduced steps take it (on noisy plain steps it fits the noise
    the mini-batches hold at those scales sooner: worse at low dose); without,
    every object step.

    ``misfit_step_gain`` (1 = none; :data:`MISFIT_STEP_GAIN`) multiplies the
    object step from the third pass on while the data are misfit far above
    their noise (the sample's deviance ratio, checked before each pass,
    above :data:`MISFIT_STEP_RATIO`) and the fit still falls (below
    :data:`MISFIT_STEP_FALL` of its value two passes before: a misfit the
    object cannot explain, a wrong probe or wrong positions, stays level);
    once either fails, the steps are the plain ones for the rest of the
    refinement. Only the object alone and photon counts, as
    ``variance_reduction``; a scan whose start is already near the noise
    (low dose) never takes it.

    With nothing else refined this is the object refinement alone (the same
    arithmetic as before the joint refinement existed).
    """
    obj = obj.detach().to(torch.complex64).clone()
    start_obj = None  # the object when the probe starts to move: its phase ramp is kept (a gauge)
    seen = None  # (H, W) coverage weights of the phase-ramp gauge, made when first needed
    start_probe = probe.detach().to(torch.complex64)
    positions0 = np.asarray(scan.positions_px, dtype=np.float64)
    start_positions = positions0 if start_positions_px is None else np.asarray(start_positions_px, dtype=np.float64)
    M = len(positions0)
    if refine_probe:
        probe = initial_modes(start_probe, probe_modes or (start_probe.shape[0] if start_probe.ndim == 3 else 1))
    else:
        probe = start_probe
    if steps <= 0:
        return JointRefineResult(obj, [], probe if probe.ndim == 3 else probe[None], start_positions.copy(),
                                 np.ones(M, np.float32))
    N = probe.shape[-1]
    positions = torch.from_numpy(start_positions.astype(np.float32))
    good = None if scan.good_pixels is None else torch.from_numpy(scan.good_pixels).to(torch.float32)
    intensity = physics.intensity_of(probe)
    generator = torch.Generator().manual_seed(seed)
    # The low-pass of the wide phase depends only on the canvas: made once, not per mini-batch.
    wide = wide_phase_filter(obj.shape, PHASE_GAIN_SIGMA_FRACTION * N) if phase_gain else None
    velocity = torch.zeros_like(obj)
    history: list[float] = []
    joint = refine_probe or refine_positions or refine_intensity
    # The measured counts' own part of the deviance does not change with the object: made once (in memory), not
    # per mini-batch (it was a tenth of a pass).
    counts_terms = None if amplitudes is None else count_term(amplitudes.square())
    n_batches = -(-M // batch_size)
    # Both switches judge the fit against the Poisson noise: the object alone, photon counts (read once).
    judged = (variance_reduction or misfit_step_gain != 1.0) and not joint and counts_like(scan)
    reduce = (judged and variance_reduction and n_batches > 1
              and n_batches * obj.numel() * obj.element_size() <= VARIANCE_REDUCTION_MAX_BYTES)
    reduced_from = None
    boosted = judged and misfit_step_gain != 1.0
    sample_fits: list[float] = []  # the sample's fit before each pass, while a switch waits on it (else NaN)
    if reduce or boosted:  # what judges the fit
        sample = np.linspace(0, M - 1, min(M, VARIANCE_REDUCTION_SAMPLE)).astype(np.int64)
    probe_start = max(1, steps // 10) if probe_start is None else probe_start
    positions_start = max(1, steps // 3) if positions_start is None else positions_start
    bound_px = N / 8 if max_position_correction_px is None else max_position_correction_px
    target_power = float(intensity.sum())
    support = _support(N, probe_support_px)
    H, W = obj.shape
    lower = torch.tensor([N / 2, N / 2], dtype=torch.float32)
    upper = torch.tensor([W - N / 2 - 1, H - N / 2 - 1], dtype=torch.float32)
    scale = torch.ones(M, dtype=torch.float32)
    for step in range(steps):
        # Full steps for most passes, then a linear decay over the last quarter: the
        # mini-batch noise is averaged out instead of left in the object.
        tail = max(1, steps // 4)
        decay = min(1.0, 0.2 + 0.8 * (steps - 1 - step) / tail)
        rate = step_size * decay
        # The fit of the sample, while a switch waits on it (one forward pass of VARIANCE_REDUCTION_SAMPLE patterns).
        fit = None
        if boosted or (reduce and reduced_from is None and step > 0):
            fit = deviance_ratio(obj, scan, probe, start_positions, amplitudes=amplitudes, patterns=sample, seed=seed)
        sample_fits.append(math.nan if fit is None else fit)
        # The larger steps: from the third pass (the momentum builds up over the first two, so the fall is judged
        # over two passes), while the fit is far above the noise and still falling; once not, never again. (While
        # boosted, every pass's fit was measured.)
        if boosted and step >= 2:
            boosted = MISFIT_STEP_RATIO < fit < MISFIT_STEP_FALL * sample_fits[-3]
        if boosted and step >= 2:
            rate = rate * misfit_step_gain
        total = 0.0
        probe_on = refine_probe and step >= probe_start
        positions_on = refine_positions and step >= positions_start
        scale_on = refine_intensity and step >= probe_start
        if probe_on and start_obj is None:
            start_obj = obj.clone()
        if reduce and reduced_from is None and step > 0 and fit <= VARIANCE_REDUCTION_RATIO:
            reduced_from, momentum = step, VARIANCE_REDUCED_MOMENTUM
            # From now on a fixed partition (each batch's stored gradient is its own; before, the batches
            # are drawn anew each pass, which converged better at high dose), its gradients taken here.
            partition = [b.sort().values for b in torch.randperm(M, generator=generator).split(batch_size)]
            stored = torch.empty((n_batches, *obj.shape), dtype=obj.dtype)
            for i, b in enumerate(partition):
                amp = amplitudes[b] if amplitudes is not None else torch.from_numpy(scan.amplitude(b.numpy()))
                stored[i] = object_gradient(obj, probe, positions[b], amp, good, eps_counts, batch_size=len(b))[0]
            stored_sum = stored.sum(0)
            share_of = coverage(positions, intensity, obj.shape)
            share_of = share_of.clamp(min=1e-12 * float(share_of.max()))
        reduced = reduced_from is not None
        gain = phase_gain if reduced or not variance_reduction else 0.0
        if reduced:
            order = torch.randperm(n_batches, generator=generator).tolist()
            batches = [(i, partition[i]) for i in order]
        else:
            batches = [(None, b.sort().values) for b in torch.randperm(M, generator=generator).split(batch_size)]
        for index, batch in batches:  # increasing indices in each batch: cheap reads from HDF5/NPZ
            amp = amplitudes[batch] if amplitudes is not None else torch.from_numpy(scan.amplitude(batch.numpy()))
            lookahead = (obj + momentum * velocity).requires_grad_(True)
            if not joint:
                pred = physics.forward_amplitude(lookahead, probe, positions[batch])
                loss = poisson_nll(pred, amp, good, eps_counts, reduction="sum",
                                   counts_term=None if counts_terms is None else counts_terms[batch])
                (grad,) = torch.autograd.grad(loss, lookahead)
                illumination = physics.insert_patches(intensity.expand(len(batch), N, N), positions[batch], obj.shape)
                if reduced:
                    change = grad - stored[index]
                    # SAGA: this batch's change since a pass ago, plus its share of the whole scan's
                    grad = change + stored_sum * (illumination / share_of)
                    stored_sum += change
                    stored[index] += change
            else:
                grad, loss, illumination = _joint_batch(
                    lookahead, obj, probe, start_probe, positions, batch, amp, good, eps_counts, scale, probe_on, positions_on,
                    scale_on, probe_rate * decay, position_rate * decay, max_position_step_px, support,
                    target_power, regularisation, None if counts_terms is None else counts_terms[batch])
                probe = probe.detach()
                intensity = physics.intensity_of(probe)
            # Preconditioner: the inverse illumination, floored so dim edges do not take huge steps.
            # torch's complex gradient is 2 dL/d(conj z), and the Poisson gradient is about twice
            # the amplitude-loss one near the solution, hence /4.
            step_obj = -rate * grad / (4 * (illumination + regularisation * illumination.max()))
            if gain:
                step_obj = step_obj + gain * wide_phase(step_obj, lookahead.detach(), wide)
            velocity = momentum * velocity + step_obj
            obj = (obj + velocity).detach()
            total += float(loss.detach())
        if probe_on and probe.ndim == 3:
            probe.copy_(orthogonalise_modes(probe))
        if probe_on and object_ramp_gauge:
            if seen is None:
                seen = coverage(positions, intensity, obj.shape)
            obj = _remove_phase_ramp(obj[None], start_obj[None], seen)[0]
        if positions_on:
            # Gauge: no common shift; bound: each correction within bound_px of the start.
            correction = positions.double() - torch.from_numpy(positions0)
            correction -= correction.mean(0)
            norm = correction.norm(dim=1, keepdim=True).clamp(min=1e-12)
            correction = correction * (bound_px / norm).clamp(max=1.0)
            positions.copy_((torch.from_numpy(positions0) + correction).float())
            torch.maximum(positions, lower, out=positions)
            torch.minimum(positions, upper, out=positions)
        if scale_on:
            scale /= scale.mean()
        history.append(total / (M * N * N))
        if on_step is not None:
            on_step(step, history[-1])
    final_probe = probe if probe.ndim == 3 else probe[None]
    final_positions = positions.double().numpy() if refine_positions else start_positions.copy()  # untouched: exact
    return JointRefineResult(obj, history, final_probe, final_positions, scale.numpy(), reduced_from, sample_fits)


def wide_phase_filter(shape: tuple[int, int], sigma_px: float) -> torch.Tensor:
    """``(H, W) float32`` FFT transfer function of a Gaussian blur of ``sigma_px``: :func:`wide_phase`'s low-pass."""
    H, W = shape
    k2 = torch.fft.fftfreq(H).square()[:, None] + torch.fft.fftfreq(W).square()[None, :]
    return torch.exp(-2 * (np.pi * sigma_px) ** 2 * k2)


def wide_phase(step: torch.Tensor, obj: torch.Tensor, lowpass: torch.Tensor) -> torch.Tensor:
    """The part of an object step ``(H, W) complex64`` that changes the phase of ``obj (H, W)`` at scales
    wider than ``lowpass`` (:func:`wide_phase_filter`) keeps: ``i obj δφ``, with δφ the step's phase change
    ``Im(step conj(obj)) / |obj|²``, low-passed (FFT, periodic: the step is zero outside the scan, so the wrap
    is harmless)."""
    power = obj.real.square() + obj.imag.square()
    dphi = (step * obj.conj()).imag / (power + 1e-3 * power.max())  # floored: dark pixels hold no phase
    return 1j * obj * torch.fft.ifft2(torch.fft.fft2(dphi) * lowpass).real


def _remove_phase_ramp(field: torch.Tensor, start: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Take out of ``field (K, H, W)`` the linear phase ramp its first layer gained over ``start``'s first layer.

    A ramp ``exp(i k·r)`` on the probe and ``exp(-i k·r)`` on the object give
    the same data (the object's ramp is a constant phase per pattern), and a
    ramp on the object alone changes the data only by shifting each pattern a
    small fraction of a pixel: left free, both drift along it while the probe
    is refined and tilt the object's phase. ``weight (H, W)``: where the change
    counts (e.g. the illumination); by default its own magnitude.
    """
    first = field.reshape(-1, *field.shape[-2:])[0]
    ref = start.reshape(-1, *start.shape[-2:])[0]
    change = first * ref.conj()  # (H, W): the phase change, weighted by brightness
    if weight is not None:
        change = change / change.abs().clamp(min=1e-12) * weight
    k_x = torch.angle((change[:, 1:] * change[:, :-1].conj()).sum())
    k_y = torch.angle((change[1:, :] * change[:-1, :].conj()).sum())
    H, W = field.shape[-2:]
    ramp = torch.polar(torch.ones(H, W), -(k_x * (torch.arange(W) - W / 2)[None, :] + k_y * (torch.arange(H) - H / 2)[:, None]))
    return field * ramp


def coverage(positions: torch.Tensor, intensity: torch.Tensor, shape: tuple[int, int], chunk: int = 1024) -> torch.Tensor:
    """``(H, W)`` float32: the probe intensity summed over every position (how well each pixel is seen)."""
    out = torch.zeros(shape, dtype=torch.float32)
    N = intensity.shape[-1]
    for start in range(0, len(positions), chunk):
        pos = positions[start:start + chunk]
        physics.insert_patches(intensity.expand(len(pos), N, N).contiguous(), pos, shape, out=out)
    return out


def _joint_batch(lookahead, obj, probe, start_probe, positions, batch, amp, good, eps_counts, scale, probe_on,
                 positions_on, scale_on, probe_rate, position_rate, max_step_px, support, target_power, regularisation,
                 counts_term=None):
    """One mini-batch of :func:`refine_joint`: returns ``(object gradient, loss, illumination)``.

    Updates ``probe`` (in place), ``positions[batch]`` and ``scale[batch]``. ``counts_term``: the batch's
    :func:`~ptycho_ml.physics.losses.count_term`, when made once for the scan.
    """
    N = probe.shape[-1]
    pos = positions[batch]
    s = scale[batch][:, None, None]
    probe_var = probe.detach().requires_grad_(probe_on)
    patches = physics.extract_patches(lookahead, pos, N)  # (B, N, N)
    unscaled = physics.far_field_amplitude(probe_var, patches)
    if scale_on:  # Poisson ML scale of each pattern: sum of measured / sum of predicted counts
        with torch.no_grad():
            weight = 1.0 if good is None else good
            measured = (amp.square() * weight).sum((-2, -1))
            predicted = (unscaled.square() * weight).sum((-2, -1)).clamp(min=1e-12)
            scale[batch] = (measured / predicted).clamp(0.1, 10.0)
            s = scale[batch][:, None, None]
    pred = unscaled * s.sqrt()
    loss = poisson_nll(pred, amp, good, eps_counts, reduction="sum", counts_term=counts_term)
    inputs = [lookahead] + ([probe_var] if probe_on else []) + ([patches] if positions_on else [])
    grads = torch.autograd.grad(loss, inputs)
    grad = grads[0]
    intensity = physics.intensity_of(probe)
    illumination = physics.insert_patches(intensity * s, pos, obj.shape)
    with torch.no_grad():
        if positions_on:
            g_patch = grads[-1]  # (B, N, N): 2 dL/d(conj patch)
            window = physics.extract_patches(obj, pos, N + 2)  # the patch with a one-pixel border
            d_x = (window[:, 1:-1, 2:] - window[:, 1:-1, :-2]) / 2
            d_y = (window[:, 2:, 1:-1] - window[:, :-2, 1:-1]) / 2
            lit = intensity * s  # (B, N, N)
            shift = []
            for d in (d_x, d_y):
                slope = (g_patch.conj() * d).real.sum((-2, -1))
                curvature = 4 * (lit * (d.real.square() + d.imag.square())).sum((-2, -1))
                shift.append(-slope / (curvature + 1e-3 * float(curvature.max()) + 1e-12))
            delta = position_rate * torch.stack(shift, dim=1)  # (B, 2) (x, y)
            delta = delta * (max_step_px / delta.norm(dim=1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)
            positions[batch] = pos + delta
        if probe_on:
            g_probe = grads[1]  # (K, N, N)
            lit_obj = ((patches.detach().real.square() + patches.detach().imag.square()) * s).sum(0)  # (N, N)
            updated = probe - probe_rate * g_probe / (4 * (lit_obj + regularisation * lit_obj.max()))
            if support is not None:
                updated = updated * support
            updated = _remove_phase_ramp(updated, start_probe)
            updated = updated * (target_power / float(physics.intensity_of(updated).sum())) ** 0.5
            probe.copy_(updated.reshape(probe.shape))
    return grad, loss, illumination


# --------------------------------------------------------------------------
# How well the data are explained, and the automatic choice of what to refine

#: Above this deviance ratio (:func:`deviance_ratio`) the data are not explained by the object alone.
#: Measured: exact scans end their object refinement at 0.58–0.86 (the fit takes up some noise);
#: a 20 % defocus error, a missing mode or 0.5 px position noise at 11–200 (docs/benchmarks.md, "Real scans").
FIT_RATIO_LIMIT = 1.5

#: At most this deviance ratio the data are explained to their noise and :func:`refine_auto`'s object stage is
#: done (unless explained only in its last passes, :data:`NEAR_NOISE_FRACTION`). Between it and
#: :data:`FIT_RATIO_LIMIT` the misfit is too small for a wrong probe or wrong positions but the object has not
#: yet reached the noise: it continues (measured, chip-gaussian-1e7: after 45 passes the fit is 1.42; 15 more
#: passes give 1.33 and amplitude / phase SSIM 0.984 / 0.997, against pty-chi's 0.969 / 0.977).
CONVERGED_RATIO = 1.0

#: :func:`refine_auto`: an object stage that ends near the noise (a deviance ratio between :data:`CONVERGED_RATIO`
#: and the limit, or explained but with fewer than this fraction of its passes variance-reduced) continues for
#: ``steps // NEAR_NOISE_FRACTION`` passes: the object still converges there, which the fit hardly shows
#: (measured, text-gaussian-1e+06 from the network's object: after 45 passes the fit is 0.93, variance-reduced
#: for the last 5, amplitude / phase SSIM 0.862 / 0.931; 15 more passes: 0.878 / 0.940).
NEAR_NOISE_FRACTION = 3

#: :func:`refine_auto`'s trials: the positions explain a misfit when a short trial divides the deviance ratio
#: by more than 1 / CLEAR_WIN (measured after ``steps // 5`` passes: position errors 5.8-8.3x; probe errors
#: 1.1-1.3x, an unconverged exact scan 1.0x), and a probe trial wins unless 1 / CLEAR_WIN times worse than
#: the positions' (probe errors: 0.02-1.06x; the unconverged exact scan 60x).
CLEAR_WIN = 0.5

#: :func:`refine_auto`'s object stage is still converging (the object alone continues before any trial) when the
#: median of the sample's fit (:attr:`JointRefineResult.sample_fits`) over its last :data:`FALL_WINDOW` passes
#: is below this fraction of the median over the :data:`FALL_WINDOW` passes :data:`FALL_SPAN` passes earlier.
#: Measured at the end of 30 passes from the network's object: 0.38-0.69 on the scans still converging above
#: the limit (chip-gaussian-1e7, text-gaussian-1e+07); 0.92-1.04 on every scan with a wrong probe or wrong
#: positions, whose misfit is level (docs/benchmarks.md, "More passes; a scan still converging continues before
#: the trials").
STILL_FALLING = 0.75
FALL_WINDOW = 3
FALL_SPAN = 6


def still_falling(sample_fits: list[float]) -> bool:
    """Whether the fit was still falling at the end of a refinement (:data:`STILL_FALLING`), from its
    per-pass sample fits; False when the last ``FALL_WINDOW + FALL_SPAN`` passes were not all measured."""
    last = np.asarray(sample_fits[-(FALL_WINDOW + FALL_SPAN):], dtype=np.float64)
    if len(last) < FALL_WINDOW + FALL_SPAN or not np.isfinite(last).all():
        return False
    return bool(np.median(last[-FALL_WINDOW:]) < STILL_FALLING * np.median(last[:FALL_WINDOW]))


#: Probe modes :func:`refine_auto` learns when it refines the probe: a second mode costs 1.5x the passes'
#: time and gave the better object on every probe-error scan measured, a missing mode most of all.
AUTO_PROBE_MODES = 2


def counts_like(scan: ScanData, sample: int = 32, tolerance: float = 0.05) -> bool:
    """Whether the scan's diffraction is photon counts (amplitude² within ``tolerance`` of an integer, on
    average over ``sample`` patterns), the only case where Poisson statistics say what a good fit is."""
    idx = np.linspace(0, len(scan) - 1, min(len(scan), sample)).astype(np.int64)
    counts = scan.amplitude(idx).astype(np.float64) ** 2
    return bool(np.mean(np.abs(counts - np.round(counts))) <= tolerance)


def deviance_ratio(obj: torch.Tensor, scan: ScanData, probe: torch.Tensor, positions_px: np.ndarray | None = None,
                   *, amplitudes: torch.Tensor | None = None, patterns: np.ndarray | None = None,
                   eps_counts: float = 0.5, batch_size: int = 256, seed: int = 0) -> float:
    """The scan's Poisson deviance under the model over the deviance expected were the model exact.

    obj ``(H, W)`` and probe ``(N, N)``/``(K, N, N)`` complex64, positions
    ``(M, 2)`` px (default the scan's).
    The expectation is the deviance of counts drawn (seeded) from the
    model's own prediction: about 1 (a little less, as a fit takes up some
    noise) when the model explains the data to the noise, far above 1 when
    something it holds fixed (probe, positions) is wrong. Meaningful for
    photon counts (:func:`counts_like`). Costs one forward pass over the scan,
    or over ``patterns`` (indices ``(P,)`` int64, increasing) when given.
    """
    obj = torch.as_tensor(obj).to(torch.complex64)
    probe = torch.as_tensor(probe).to(torch.complex64)
    positions = torch.from_numpy(np.asarray(scan.positions_px if positions_px is None else positions_px, np.float32))
    good = None if scan.good_pixels is None else torch.from_numpy(scan.good_pixels).to(torch.float64)
    generator = torch.Generator().manual_seed(seed)
    achieved = expected = 0.0

    def total(deviance: torch.Tensor) -> float:
        return float((deviance * good).sum() if good is not None else deviance.sum())

    with torch.no_grad():
        indices = torch.arange(len(positions)) if patterns is None else torch.from_numpy(np.asarray(patterns, np.int64))
        for batch in indices.split(batch_size):
            amp = amplitudes[batch] if amplitudes is not None else torch.from_numpy(scan.amplitude(batch.numpy()))
            rate = physics.forward_amplitude(obj, probe, positions[batch]).double().square()  # predicted counts
            log_rate = torch.log(rate + eps_counts)  # shared by the two deviances
            drawn = torch.poisson(rate, generator=generator)
            achieved += total(poisson_deviance(rate, amp.double().square(), eps_counts, log_rate))
            expected += total(poisson_deviance(rate, drawn, eps_counts, log_rate))
    return achieved / max(expected, 1e-300)


@dataclass
class AutoRefineReport:
    """What :func:`refine_auto` found and chose: the deviance ratio of each stage it ran (in order),
    the stage kept (``object``, ``positions``, ``probe``, ``probe+positions``), or why it did not look."""

    fit_ratios: dict[str, float] = field(default_factory=dict)
    chosen: str = "object"
    skipped: str = ""
    variance_reduced_from: int | None = None  # the object stage's first variance-reduced pass
    object_passes: int = 0  # the passes of the object alone kept (more than asked when the scan still converged)

    def to_dict(self) -> dict:
        return {"fit_ratios": dict(self.fit_ratios), "chosen": self.chosen, "limit": FIT_RATIO_LIMIT,
                "variance_reduced_from": self.variance_reduced_from, "object_passes": self.object_passes,
                **({"skipped": self.skipped} if self.skipped else {})}

    def object_stage(self, result: JointRefineResult) -> JointRefineResult:
        """Record what the kept refinement of the object alone did (its switch, its passes); returns it."""
        self.variance_reduced_from, self.object_passes = result.variance_reduced_from, len(result.loss_history)
        return result


def refine_auto(obj: torch.Tensor, scan: ScanData, probe: torch.Tensor, steps: int, *, probe_modes: int = AUTO_PROBE_MODES,
                limit: float = FIT_RATIO_LIMIT, probe_support_px: float = 0.0, amplitudes: torch.Tensor | None = None,
                seed: int = 0, phase_gain: float = 0.0, variance_reduction: bool = False,
                misfit_step_gain: float = 1.0,
                on_step: Callable[[int, float], None] | None = None) -> tuple[JointRefineResult, AutoRefineReport]:
    """Refine the object; refine the probe or the positions too only if the data say the scan needs it.

    1. ``steps`` passes of the object alone (the fixed-probe refinement). If
       the data are then explained to their noise (:func:`deviance_ratio` ≤
       :data:`CONVERGED_RATIO`), that is the result: a scan with a right probe
       and right positions reconstructs exactly as with the object refinement
       alone. If the ratio is above that but at most ``limit``, the misfit is
       too small for a wrong probe or positions: the object alone continues
       for ``steps // NEAR_NOISE_FRACTION`` more passes, with no trial; so
       does a stage explained to the noise whose variance-reduced passes
       (``variance_reduction``) were fewer than that. If the ratio is
       above ``limit`` but the fit was still falling at the end of the stage
       (:func:`still_falling`; a wrong probe or wrong positions leave it
       level), the object alone first continues for ``steps`` more passes;
       if that brings the ratio to ``limit`` or below, that is the result,
       and otherwise the trials below start from the continued object.
    2. Otherwise a trial of ``steps // 5`` passes refining the positions too,
       continuing from the refined object. If it explains most of the misfit
       (:data:`CLEAR_WIN`), the positions were wrong: it continues to ``steps``
       passes. If not, a trial of the probe (``probe_modes`` modes), restarting
       from ``obj`` (continuing, the object has already absorbed the probe's
       error: measured, phase SSIM 0.59 against 0.90), continues to ``steps``
       passes unless it explains the data far worse than the positions' trial.
       If neither explains the misfit, the scan is still converging (an exact
       scan, slow): the refined object alone continues for ``steps`` more
       passes (a schedule of its own), kept if it explains the data better
       (``chosen`` stays ``object``), unless it already has (at most one
       continuation).
    3. If the probe won and the data are still not explained, the positions
       are refined with it for ``steps // 2`` more passes, kept if they explain
       the data better.

    Scans whose diffraction is not photon counts (:func:`counts_like`) stop
    after step 1 (the ratio needs Poisson statistics). ``obj (H, W)`` is the
    start (the network's object); probe ``(N, N)``/``(K, N, N)``. ``phase_gain``,
    ``variance_reduction`` and ``misfit_step_gain`` are :func:`refine_joint`'s,
    for every stage (the stages that refine more than the object are never
    variance-reduced nor take the larger steps, and with ``variance_reduction``
    they take no ``phase_gain``).
    Returns the kept result and an :class:`AutoRefineReport`.
    """
    common = dict(amplitudes=amplitudes, seed=seed, on_step=on_step, phase_gain=phase_gain,
                  variance_reduction=variance_reduction, misfit_step_gain=misfit_step_gain)
    probe_modes = min(probe_modes, len(scan))  # no more modes than patterns
    report = AutoRefineReport()
    fixed = report.object_stage(refine_joint(obj, scan, probe, steps, **common))
    if steps <= 0:
        return fixed, report
    if not counts_like(scan):
        report.skipped = "the diffraction is not photon counts (amplitude² is not integer)"
        return fixed, report

    def ratio(result: JointRefineResult) -> float:
        return deviance_ratio(result.obj, scan, result.probe, result.positions_px, amplitudes=amplitudes, seed=seed)

    def continued(passes: int) -> JointRefineResult:
        """The object alone, still converging: ``passes`` more, kept if they explain the data better."""
        more = refine_joint(fixed.obj, scan, probe, passes, **common)
        report.fit_ratios["object (continued)"] = ratio(more)
        if report.fit_ratios["object (continued)"] >= report.fit_ratios["object"]:
            return fixed
        more.loss_history[:0] = fixed.loss_history  # one history, and pass numbers, for the whole object stage
        more.sample_fits[:0] = fixed.sample_fits
        if more.variance_reduced_from is not None:
            more.variance_reduced_from += len(fixed.loss_history)
        return report.object_stage(more)

    report.fit_ratios["object"] = ratio(fixed)
    near = max(2, steps // NEAR_NOISE_FRACTION)  # the passes a stage ending near the noise continues for
    late = variance_reduction and fixed.variance_reduced_from is not None and steps - fixed.variance_reduced_from < near
    if report.fit_ratios["object"] <= min(limit, CONVERGED_RATIO) and not late:
        return fixed, report
    if report.fit_ratios["object"] <= limit:
        return continued(near), report
    fit = report.fit_ratios["object"]  # the misfit the trials must explain
    if still_falling(fixed.sample_fits):  # the trials could not judge it yet: converge further first
        fixed = continued(steps)
        fit = min(fit, report.fit_ratios["object (continued)"])
        if fit <= limit:
            return fixed, report
    trial = max(2, steps // 5)
    probe_settings = dict(refine_probe=True, probe_support_px=probe_support_px)
    positions_trial = refine_joint(fixed.obj, scan, probe, trial, refine_positions=True, positions_start=0, **common)
    report.fit_ratios["positions (trial)"] = r_positions = ratio(positions_trial)
    chosen = "positions" if r_positions <= CLEAR_WIN * fit else ""
    if not chosen:  # the positions do not explain the misfit: try the probe
        probe_trial = refine_joint(obj, scan, probe, trial, probe_modes=probe_modes, **probe_settings, **common)
        report.fit_ratios["probe (trial)"] = r_probe = ratio(probe_trial)
        # A restart is judged leniently: after a few passes it is behind the continued object on convergence.
        if r_probe <= r_positions / CLEAR_WIN:
            chosen = "probe"
    if not chosen:  # neither: the object alone is still converging (continued once at most)
        return (fixed if "object (continued)" in report.fit_ratios else continued(steps)), report
    if chosen == "positions":
        best = refine_joint(positions_trial.obj, scan, probe, steps - trial, refine_positions=True, positions_start=0,
                            start_positions_px=positions_trial.positions_px, **common)
        best.loss_history[:0] = fixed.loss_history + positions_trial.loss_history  # one history per path
    else:
        best = refine_joint(probe_trial.obj, scan, probe_trial.probe, steps - trial, probe_start=0, **probe_settings,
                            **common)
        best.loss_history[:0] = probe_trial.loss_history
    report.chosen = chosen
    report.fit_ratios[chosen] = ratio(best)
    if report.chosen == "probe" and report.fit_ratios["probe"] > limit:
        both = refine_joint(best.obj, scan, best.probe, max(2, steps // 2), probe_start=0, refine_positions=True,
                            positions_start=0, **probe_settings, **common)
        report.fit_ratios["probe+positions"] = ratio(both)
        if report.fit_ratios["probe+positions"] < report.fit_ratios["probe"]:
            both.loss_history[:0] = best.loss_history
            best, report.chosen = both, "probe+positions"
    return best, report
