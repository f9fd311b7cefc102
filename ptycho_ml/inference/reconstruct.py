"""reconstruct(model, scan) -> object. Shared by the batch CLI, the MLflow entry point and the pyfunc model.

Path: every pattern (batched, at its real position) -> one network forward
pass -> vectorised probe-weighted stitching -> optional physics-consistent
refinement on the scan (:mod:`ptycho_ml.physics.refine`) or self-supervised
fine-tuning of the network on the scan. Memory is bounded by the batch.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from ptycho_ml import config as limits
from ptycho_ml.config import InferenceConfig, available_cpu_threads
from ptycho_ml.data.grouping import make_groups, partition_groups
from ptycho_ml.data.scan import ScanData
from ptycho_ml.errors import PtychoInputError
from ptycho_ml.model.network import DiffractionToObject
from ptycho_ml.inference.phase_sync import synchronise_phases
from ptycho_ml.physics.forward import intensity_of
from ptycho_ml.physics.refine import AUTO_PROBE_MODES, refine_auto, refine_joint
from ptycho_ml.physics.stitching import Stitcher


#: Bytes per object pixel a reconstruction holds: stitching numerator and weights, the network's
#: object, the refined object and its momentum (complex64 = 8 bytes, float32 = 4).
CANVAS_BYTES_PER_PIXEL = 8 + 4 + 8 + 8 + 8


@dataclass
class ReconstructionResult:
    """obj ``(H, W) complex64`` (final), network_obj ``(H, W) complex64`` (before refinement)."""

    obj: np.ndarray
    network_obj: np.ndarray
    illumination: np.ndarray
    timings_s: dict[str, float] = field(default_factory=dict)
    loss_history: list[float] = field(default_factory=list)
    n_patterns: int = 0
    #: The probe ``(K, N, N) complex64`` the object was refined with (refined when asked), the
    #: positions ``(M, 2) float64`` (x, y, px; corrected when asked) and the per-pattern
    #: intensity scale ``(M,) float32``; None when there was no refinement.
    probe: np.ndarray | None = None
    positions_px: np.ndarray | None = None
    intensity_scale: np.ndarray | None = None
    #: What the refinement refined beyond the object (``"probe"``, ``"positions"``, ``"intensity"``).
    refined: tuple[str, ...] = ()
    #: The automatic choice (:meth:`~ptycho_ml.physics.refine.AutoRefineReport.to_dict`), when it ran.
    auto_refinement: dict | None = None


def check_compatible(model: DiffractionToObject, scan: ScanData) -> None:
    """Refuse, before anything is allocated, a scan this model cannot reconstruct here.

    The scan's pattern size must be the model's N, and its object canvas
    (set by how far apart the positions are) must fit the stated limit
    :func:`ptycho_ml.config.max_canvas_pixels`.
    """
    if scan.N != model.cfg.N:
        raise PtychoInputError(f"{scan.source}: field '{scan.patterns_field}': found {scan.N}x{scan.N} patterns, expected {model.cfg.N}x{model.cfg.N} for this model")
    check_probe(scan)
    H, W = scan.obj_shape
    limit = limits.max_canvas_pixels()
    if H * W > limit:
        gib = H * W * CANVAS_BYTES_PER_PIXEL / 2**30
        raise PtychoInputError(
            f"{scan.source}: field 'xcoords/ycoords': positions span an object canvas of {H} x {W} = {H * W:.3g} pixels "
            f"(about {gib:.3g} GiB to reconstruct), expected at most {limit} pixels "
            f"(${limits.MAX_CANVAS_PIXELS_ENV} raises the limit); check the positions' units (pixels, not metres or nm)")


def check_probe(scan: ScanData) -> None:
    """Refuse a probe the refinement cannot start from: wrong size, NaN/Inf, or no light at all."""
    probe, N = np.asarray(scan.probe), scan.N
    if probe.ndim not in (2, 3) or probe.shape[-2:] != (N, N) or (probe.ndim == 3 and probe.shape[0] < 1):
        raise PtychoInputError(f"{scan.source}: field 'probe': found shape {probe.shape}, expected ({N}, {N}) or (K, {N}, {N}) "
                               f"matching the {N}x{N} patterns")
    if not np.isfinite(probe).all():
        raise PtychoInputError(f"{scan.source}: field 'probe': found NaN or Inf values, expected a finite complex probe")
    if not np.any(probe):
        raise PtychoInputError(f"{scan.source}: field 'probe': found all zeros, expected a probe that carries light")


def check_refinement(scan: ScanData, cfg: InferenceConfig) -> None:
    """Refuse refinement settings this scan cannot support (before anything is written)."""
    if cfg.refine_steps and cfg.refine_method == "object" and cfg.refine_probe and cfg.probe_modes > len(scan):
        raise PtychoInputError(f"{scan.source}: probe_modes: found {cfg.probe_modes} modes for {len(scan)} patterns, "
                               f"expected at most {len(scan)} (one per pattern measured)")
    if (cfg.refine_probe or cfg.refine_positions or cfg.refine_intensity) and cfg.refine_method != "object":
        raise PtychoInputError(f"refine_method: found '{cfg.refine_method}' with probe/position/intensity refinement, "
                               "expected 'object' (the joint refinement refines the object)")


def _progress(total: int, desc: str, enabled: bool, unit: str):
    """A progress bar counting ``unit`` (patterns through the network, passes of the refinement)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False)


def inference_probe(model: DiffractionToObject, scan: ScanData, sample: int = 512) -> torch.Tensor:
    """The probe to reconstruct ``scan`` with: its own, checked against the counts it measured.

    The training data fix a counts-per-probe-photon ratio
    (``amplitude_scale² N² / Σ|P_train|²``, i.e. the mean object
    transmission). A scan whose probe is on another scale (e.g. normalised
    to max 1 by another program) would give estimates off by that factor, so
    a ratio more than 10x away from training is corrected, with a warning.
    Returns ``(N, N)`` or ``(K, N, N)`` complex64.
    """
    probe = torch.from_numpy(np.asarray(scan.probe, dtype=np.complex64))
    N = scan.N
    idx = np.linspace(0, len(scan) - 1, min(len(scan), sample)).astype(np.int64)
    rms = float(np.sqrt(np.mean(scan.amplitude(idx).astype(np.float64) ** 2)))
    ratio_train = float(model.amplitude_scale) ** 2 * N * N / float(intensity_of(model.probe).sum())
    ratio_scan = rms**2 * N * N / float(intensity_of(probe).sum())
    if not 0.1 <= ratio_scan / ratio_train <= 10:
        factor = (ratio_scan / ratio_train) ** 0.5
        warnings.warn(f"{scan.source}: probe scale does not match the measured counts "
                      f"(counts/probe photons {ratio_scan:.3g} vs {ratio_train:.3g} in training); rescaling the probe by {factor:.3g}",
                      UserWarning, stacklevel=2)
        probe = probe * factor
    return probe


def predict_patches(model: DiffractionToObject, amplitude: torch.Tensor, positions_px: np.ndarray) -> torch.Tensor:
    """One network patch per pattern: amplitude ``(B, N, N)``, positions ``(B, 2)`` -> ``(B, N, N)`` complex64.

    For gridsize > 1 the patterns are grouped with their neighbours (as in
    :func:`network_object`) and each pattern's own patch is returned, in input order.
    """
    groups, owned = partition_groups(np.asarray(positions_px, dtype=np.float64), model.cfg.gridsize)
    C = model.cfg.gridsize**2
    with torch.inference_mode():
        patches = model(amplitude[torch.from_numpy(groups)].view(len(groups), C, *amplitude.shape[1:]))
    out = torch.empty(amplitude.shape, dtype=torch.complex64)
    out[torch.from_numpy(groups[owned])] = patches[torch.from_numpy(owned)]
    return out


def network_patches(model: DiffractionToObject, scan: ScanData, batch_size: int = 256, progress: bool = False,
                    probe: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """Every pattern through the network, batch by batch: yields ``(patches (B, N, N) complex64, indices (B,))``.

    For gridsize > 1 models the scan is covered by groups of near
    neighbours (:func:`~ptycho_ml.data.grouping.partition_groups`), so each
    pattern goes through the network about once; each yielded patch is its
    own pattern's, from the group that owns it.
    """
    C = model.cfg.gridsize**2
    groups, owned = partition_groups(scan.positions_px, model.cfg.gridsize)
    probe = inference_probe(model, scan) if probe is None else probe
    good = None if scan.good_pixels is None else torch.from_numpy(scan.good_pixels)
    group_batch = max(1, batch_size // C)
    with _progress(len(scan), "reconstruct", progress, unit="pattern") as bar, torch.inference_mode():
        for start in range(0, len(groups), group_batch):
            members, keep = groups[start:start + group_batch], owned[start:start + group_batch]
            if C == 1:  # contiguous reads
                amp = torch.from_numpy(scan.amplitude(slice(int(members[0, 0]), int(members[-1, 0]) + 1)))[:, None]
            else:
                amp = torch.from_numpy(scan.amplitude(members.reshape(-1))).view(len(members), C, scan.N, scan.N)
            yield model(amp, probe, good)[torch.from_numpy(keep)], members[keep]
            bar.update(int(keep.sum()))


def phase_sync_fits(scan: ScanData) -> bool:
    """Whether the scan's patches fit in memory at once (:data:`~ptycho_ml.config.REFINE_IN_MEMORY_MAX_VALUES`
    values), as phase synchronisation needs them; larger scans are stitched as they stream."""
    return len(scan) * scan.N * scan.N <= limits.REFINE_IN_MEMORY_MAX_VALUES


def network_object(model: DiffractionToObject, scan: ScanData, batch_size: int = 256,
                   progress: bool = False, probe: torch.Tensor | None = None,
                   phase_sync: bool = False, learned_refinement: bool = True,
                   amplitudes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run every pattern through the network and stitch: returns ``(obj (H, W) complex64, illumination (H, W))``.

    With ``phase_sync`` (and a scan whose patches fit in memory, :func:`phase_sync_fits`)
    each patch's constant phase offset is first aligned with its neighbours'
    (:func:`~ptycho_ml.inference.phase_sync.synchronise_phases`). The model's
    learned refinement (its unrolled stages over the whole scan, if it has
    any) then runs on the stitched object, unless ``learned_refinement`` is
    False (the generator alone, for comparisons). ``amplitudes (M, N, N)``:
    the scan's, when already read (:func:`refinement_amplitudes`).
    """
    check_compatible(model, scan)
    positions = torch.from_numpy(np.asarray(scan.positions_px, dtype=np.float32))
    probe = inference_probe(model, scan) if probe is None else probe
    weight = intensity_of(probe)
    stitcher = Stitcher(scan.obj_shape, weight)
    stream = network_patches(model, scan, batch_size, progress, probe)
    if phase_sync and phase_sync_fits(scan):
        patches = torch.empty(len(scan), scan.N, scan.N, dtype=torch.complex64)
        for batch, indices in stream:
            patches[torch.from_numpy(indices)] = batch
        stitcher.add(synchronise_phases(patches, positions, weight), positions)
    else:
        for batch, indices in stream:
            stitcher.add(batch, positions[torch.from_numpy(indices)])
    obj, illumination = stitcher.result(), stitcher.illumination()
    if learned_refinement and model.refiner is not None:
        if amplitudes is None:
            amplitudes = refinement_amplitudes(scan)
        if amplitudes is None:  # larger than memory: each batch is read when the stage needs it
            amplitudes = lambda idx: torch.from_numpy(scan.amplitude(idx.numpy()))  # noqa: E731
        good = None if scan.good_pixels is None else torch.from_numpy(scan.good_pixels)
        with torch.no_grad():  # not inference_mode: each stage takes its gradient through the forward model
            obj = model.refine_stitched(obj, probe, positions, amplitudes, good)
    return obj, illumination


def finetune_on_scan(model: DiffractionToObject, scan: ScanData, epochs: int, batch_size: int = 32,
                     learning_rate: float = 5e-4, seed: int = 0) -> DiffractionToObject:
    """Self-supervised fine-tuning of a copy of the network on the scan itself (Poisson loss, no ground truth)."""
    from ptycho_ml.model.module import physics_step

    tuned = copy.deepcopy(model).train()
    opt = torch.optim.Adam(tuned.generator.parameters(), lr=learning_rate)
    rng = np.random.default_rng(seed)
    C = model.cfg.gridsize**2
    groups, offsets = make_groups(scan.positions_px, model.cfg.gridsize, seed=seed)
    good = None if scan.good_pixels is None else torch.from_numpy(scan.good_pixels)
    for _ in range(epochs):
        order = rng.permutation(len(scan))
        for start in range(0, len(order), batch_size):
            members = groups[order[start:start + batch_size]]
            amp = torch.from_numpy(scan.amplitude(members.reshape(-1))).view(len(members), C, scan.N, scan.N)
            loss, _ = physics_step(tuned, amp, torch.from_numpy(offsets[order[start:start + batch_size]]), "poisson", good)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return tuned.eval()


def refinement_amplitudes(scan: ScanData) -> torch.Tensor | None:
    """The scan's amplitudes ``(M, N, N) float32``, read once, when at most
    :data:`~ptycho_ml.config.REFINE_IN_MEMORY_MAX_VALUES`; None (refinement reads each batch) above it."""
    if len(scan) * scan.N * scan.N <= limits.REFINE_IN_MEMORY_MAX_VALUES:
        return torch.from_numpy(scan.amplitude(slice(0, len(scan))))
    return None


def reconstruct(model: DiffractionToObject, scan: ScanData, cfg: InferenceConfig | None = None) -> ReconstructionResult:
    """Reconstruct the scan's object: network + stitching, then the configured refinement."""
    cfg = cfg or InferenceConfig()
    check_compatible(model, scan)
    check_refinement(scan, cfg)
    threads = min(cfg.threads, available_cpu_threads()) if cfg.threads else available_cpu_threads()
    torch.set_num_threads(threads)
    model.eval()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    net_model = model
    if cfg.refine_steps and cfg.refine_method == "finetune":
        net_model = finetune_on_scan(model, scan, cfg.finetune_epochs)
        timings["finetune_s"] = time.perf_counter() - t0
    probe = inference_probe(model, scan)
    t1 = time.perf_counter()
    amplitudes = refinement_amplitudes(scan) if cfg.refine_steps or model.refiner is not None else None
    obj, illumination = network_object(net_model, scan, cfg.batch_size, cfg.progress, probe, amplitudes=amplitudes)
    timings["network_s"] = time.perf_counter() - t1
    network_obj = obj.clone() if cfg.refine_steps else obj  # no copy of a large object unless refinement changes it
    history: list[float] = []
    refined = None
    auto_report: dict | None = None
    what: tuple[str, ...] = ()
    if cfg.refine_steps and cfg.refine_method == "object":
        t2 = time.perf_counter()
        auto = cfg.refine_auto and not cfg.explicit_refinement
        with _progress(cfg.refine_steps, "refine", cfg.progress, unit="pass") as bar:
            if auto:
                refined, report = refine_auto(obj, scan, probe, cfg.refine_steps, probe_modes=AUTO_PROBE_MODES,
                                              probe_support_px=cfg.probe_support_px, amplitudes=amplitudes,
                                              phase_gain=cfg.phase_gain, variance_reduction=cfg.variance_reduction,
                                              misfit_step_gain=cfg.misfit_step_gain,
                                              on_step=lambda i, loss: bar.update(1))
                auto_report = report.to_dict()
                what = tuple(report.chosen.split("+")) if report.chosen != "object" else ()
            else:
                refined = refine_joint(obj, scan, probe, cfg.refine_steps, amplitudes=amplitudes,
                                       refine_probe=cfg.refine_probe, refine_positions=cfg.refine_positions,
                                       refine_intensity=cfg.refine_intensity, probe_modes=cfg.probe_modes,
                                       probe_support_px=cfg.probe_support_px, phase_gain=cfg.phase_gain,
                                       variance_reduction=cfg.variance_reduction,
                                       misfit_step_gain=cfg.misfit_step_gain, on_step=lambda i, loss: bar.update(1))
                what = tuple(k for k, on in (("probe", cfg.refine_probe), ("positions", cfg.refine_positions),
                                             ("intensity", cfg.refine_intensity)) if on)
        obj, history = refined.obj, refined.loss_history
        timings["refine_s"] = time.perf_counter() - t2
    timings["total_s"] = time.perf_counter() - t0
    extra = {}
    if refined is not None:
        extra = {"probe": refined.probe.numpy(), "positions_px": refined.positions_px,
                 "intensity_scale": refined.intensity_scale if "intensity" in what else None,
                 "refined": what, "auto_refinement": auto_report}
    return ReconstructionResult(obj.numpy(), network_obj.numpy(), illumination.numpy(), timings, history, len(scan),
                                **extra)
