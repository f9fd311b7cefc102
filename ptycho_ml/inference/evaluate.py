"""Evaluate against ground truth: a written object.h5, or a model run on a scan (network alone and refined).

:func:`evaluate_model` is the one place a model is scored on a scan with
ground truth; ``ptycho-ml evaluate`` and every training run's held-out
evaluation use it. :func:`warm_start` measures what the network is worth to
the refinement: how many passes started from the network reach what a flat
start reaches in :data:`FLAT_PASSES`, and how much wall time that saves.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ptycho_ml.config import InferenceConfig
from ptycho_ml.data.object_h5 import read_object_h5
from ptycho_ml.data.readers import load_scan
from ptycho_ml.data.scan import ScanData
from ptycho_ml.errors import field_error
from ptycho_ml.inference import metrics as metrics_mod
from ptycho_ml.inference.reconstruct import (ReconstructionResult, check_compatible, inference_probe, network_object,
                                             reconstruct, refinement_amplitudes)
from ptycho_ml.model.network import DiffractionToObject
from ptycho_ml.physics.refine import refine_joint

#: Passes of a flat-start refinement that define the reference a warm start must reach.
FLAT_PASSES = 30
#: Passes of a network-started refinement tried, in increasing order.
WARM_START_PASSES = (0, 2, 5, 8, 10, 20, 30)
#: SSIM shortfall (amplitude and phase) still counted as reaching the flat-start reference.
WARM_START_TOLERANCE = 0.005


def _require_truth(scan: ScanData, purpose: str) -> None:
    if scan.obj is None:
        raise field_error(scan.source, "objectGuess", "missing", f"a ground-truth object to {purpose}")


def evaluate_model(model: DiffractionToObject, scan: ScanData, refine_steps: int | None = None,
                   progress: bool = False, threads: int = 0,
                   refinement: dict[str, Any] | None = None) -> tuple[ReconstructionResult, dict[str, float], str]:
    """Reconstruct ``scan`` with ``model`` and score it against the scan's ground truth.

    Returns ``(result, metrics, table)``: ``metrics`` has ``network_*`` keys
    (the network alone) and, when ``refine_steps`` > 0 (default: the
    inference default), ``refined_*`` keys; ``table`` is the printable text.
    ``refinement``: more :class:`~ptycho_ml.config.InferenceConfig` fields
    (``refine_probe``, ``refine_positions``, ``refine_intensity``, ``probe_modes``).
    """
    _require_truth(scan, "evaluate against")
    steps = InferenceConfig().refine_steps if refine_steps is None else refine_steps
    result = reconstruct(model, scan, InferenceConfig.from_dict({"refine_steps": steps, "progress": progress,
                                                                 "threads": threads, **(refinement or {})}))
    metrics: dict[str, float] = {}
    lines = []
    network_s = result.timings_s.get("network_s", 0.0)
    for label, obj, seconds in (("network", result.network_obj, network_s),
                                ("refined", result.obj, network_s + result.timings_s.get("refine_s", 0.0))):
        if label == "refined" and not steps:
            continue
        m = metrics_mod.evaluate_object(obj, scan.obj, scan.positions_px, scan.N, scan.probe)
        metrics.update({f"{label}_{k}": float(v) for k, v in m.items()})
        lines.append(f"{label} ({seconds:.2f} s):\n{metrics_mod.format_table(m)}")
    return result, metrics, "\n".join(lines)


def evaluate_against_truth(data: str, reconstruction: str | None = None, model: DiffractionToObject | None = None,
                           refine_steps: int | None = None,
                           refinement: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """Metrics of a reconstruction of scan ``data`` against its ``objectGuess`` ground truth.

    Returns ``(table text, metrics dict)``. With a model, both the network-only
    and the refined reconstruction are scored (keys ``network_*``/``refined_*``).
    """
    scan = load_scan(data)
    _require_truth(scan, "evaluate against")
    if not reconstruction:
        _, metrics, table = evaluate_model(model, scan, refine_steps, refinement=refinement)
        return table, metrics
    obj = read_object_h5(reconstruction)
    if obj.shape != scan.obj.shape:
        raise field_error(reconstruction, "object", f"shape {obj.shape}", f"{scan.obj.shape} like the ground truth in {scan.source}")
    metrics = metrics_mod.evaluate_object(obj, scan.obj, scan.positions_px, scan.N, scan.probe)
    return metrics_mod.format_table(metrics), metrics


@dataclass
class WarmStart:
    """A network start against a flat start, on one scan with ground truth.

    ``curve``: one row per tried pass count K, ``{"passes", "amplitude_ssim",
    "phase_ssim", "seconds"}`` (seconds include the start's own time).
    ``passes_needed``: the fewest K whose SSIMs reach the flat-start
    reference within ``tolerance``; None when no tried K does.
    """

    flat_passes: int
    flat_amplitude_ssim: float
    flat_phase_ssim: float
    flat_s: float
    start_s: float
    tolerance: float
    curve: list[dict[str, float]] = field(default_factory=list)
    passes_needed: int | None = None

    def figures(self) -> dict[str, float]:
        """Flat MLflow-ready metrics: ``flat30_*_ssim``, ``passes_needed`` (NaN if never reached),
        ``passes_saved`` (flat passes minus passes needed, 0 if never reached), ``time_saved_s`` and
        ``time_fraction`` (start + K* passes over flat + 30 passes, K* = passes needed, else the last K)."""
        row = next((r for r in self.curve if r["passes"] == self.passes_needed), self.curve[-1])
        return {f"flat{self.flat_passes}_amplitude_ssim": self.flat_amplitude_ssim,
                f"flat{self.flat_passes}_phase_ssim": self.flat_phase_ssim,
                "passes_needed": math.nan if self.passes_needed is None else float(self.passes_needed),
                "passes_saved": 0.0 if self.passes_needed is None else float(self.flat_passes - self.passes_needed),
                "time_saved_s": self.flat_s - row["seconds"],
                "time_fraction": row["seconds"] / self.flat_s if self.flat_s > 0 else math.nan}


def refine_curve(scan: ScanData, probe: torch.Tensor, start_obj: torch.Tensor, start_s: float,
                 passes: tuple[int, ...], amplitudes: torch.Tensor | None = None,
                 misfit_step_gain: float = 1.0) -> list[dict[str, float]]:
    """Refine ``start_obj (H, W) complex64`` for each K in ``passes`` (each run on its own: the step
    schedule depends on K) and score it against the scan's ground truth. The refinement is the plain object
    refinement, or with ``misfit_step_gain`` (:func:`ptycho_ml.physics.refine.refine_joint`'s) its larger
    steps while the misfit is far above the noise.

    Returns one row per K, in increasing order: ``{"passes", "amplitude_ssim", "phase_ssim",
    "amplitude_psnr", "phase_psnr", "amplitude_frc_px", "phase_frc_px", "seconds"}``; seconds include
    ``start_s``, what the start itself cost.
    """
    _require_truth(scan, "measure the warm start against")
    amplitudes = refinement_amplitudes(scan) if amplitudes is None else amplitudes
    rows = []
    for k in sorted(passes):
        t0 = time.perf_counter()
        obj = refine_joint(start_obj, scan, probe, k, amplitudes=amplitudes, misfit_step_gain=misfit_step_gain).obj
        seconds = start_s + time.perf_counter() - t0
        m = metrics_mod.evaluate_object(obj.numpy(), scan.obj, scan.positions_px, scan.N, scan.probe)
        rows.append({"passes": float(k), **{key: float(m[key]) for key in (
            "amplitude_ssim", "phase_ssim", "amplitude_psnr", "phase_psnr", "amplitude_frc_px", "phase_frc_px")},
            "seconds": seconds})
    return rows


def warm_start_curve(scan: ScanData, probe: torch.Tensor, start_obj: torch.Tensor, start_s: float,
                     flat_passes: int = FLAT_PASSES, passes: tuple[int, ...] = WARM_START_PASSES,
                     tolerance: float = WARM_START_TOLERANCE) -> WarmStart:
    """:func:`refine_curve` of ``start_obj`` against a flat object refined for ``flat_passes``.

    Same seed, probe ``(N, N)``/``(K, N, N)`` complex64 and data for every run,
    timed in this process. ``start_s`` is what the start cost (the network's time).
    """
    _require_truth(scan, "measure the warm start against")
    amplitudes = refinement_amplitudes(scan)  # read once for every run
    flat = torch.ones(scan.obj_shape, dtype=torch.complex64)
    (reference,) = refine_curve(scan, probe, flat, 0.0, (flat_passes,), amplitudes)
    result = WarmStart(flat_passes, reference["amplitude_ssim"], reference["phase_ssim"], reference["seconds"],
                       start_s, tolerance)
    result.curve = refine_curve(scan, probe, start_obj, start_s, passes, amplitudes)
    for row in result.curve:
        if row["amplitude_ssim"] >= result.flat_amplitude_ssim - tolerance and \
                row["phase_ssim"] >= result.flat_phase_ssim - tolerance:
            result.passes_needed = int(row["passes"])
            break
    return result


def warm_start(model: DiffractionToObject, scan: ScanData, flat_passes: int = FLAT_PASSES,
               passes: tuple[int, ...] = WARM_START_PASSES, tolerance: float = WARM_START_TOLERANCE,
               network: ReconstructionResult | None = None) -> WarmStart:
    """:func:`warm_start_curve` started from the model's stitched reconstruction (its time counts).

    ``network``: a reconstruction of this scan by this model already made (e.g. by
    :func:`evaluate_model`); its network object and time are the start, so the network is not run again.
    """
    check_compatible(model, scan)
    probe = inference_probe(model, scan)
    if network is not None:
        start, start_s = torch.from_numpy(network.network_obj), network.timings_s["network_s"]
    else:
        t0 = time.perf_counter()
        start, _ = network_object(model.eval(), scan, probe=probe)
        start_s = time.perf_counter() - t0
    return warm_start_curve(scan, probe, start, start_s, flat_passes, passes, tolerance)


def format_warm_start(ws: WarmStart) -> str:
    """A table: passes, SSIMs and seconds of the network start, against the flat-start reference."""
    lines = [f"flat start + {ws.flat_passes} passes: amplitude {ws.flat_amplitude_ssim:.4f}, "
             f"phase {ws.flat_phase_ssim:.4f} SSIM, {ws.flat_s:.2f} s",
             f"{'network + K':>12} {'amp SSIM':>9} {'phase SSIM':>11} {'seconds':>8}"]
    lines += [f"{int(r['passes']):>12} {r['amplitude_ssim']:>9.4f} {r['phase_ssim']:>11.4f} {r['seconds']:>8.2f}"
              for r in ws.curve]
    f = ws.figures()
    needed = "not within the tried passes" if ws.passes_needed is None else f"{ws.passes_needed}"
    lines.append(f"passes needed to reach flat + {ws.flat_passes} (within {ws.tolerance:g} SSIM): {needed}; "
                 f"passes saved {f['passes_saved']:.0f}; time fraction {f['time_fraction']:.2f}")
    return "\n".join(lines)
