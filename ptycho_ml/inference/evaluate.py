"""Evaluate against ground truth: a written object.h5, or a model run on a scan (network alone and refined).

:func:`evaluate_model` is the one place a model is scored on a scan with
ground truth; ``ptycho-ml evaluate`` and every training run's held-out
evaluation use it.
"""

from __future__ import annotations

from typing import Any

from ptycho_ml.config import InferenceConfig
from ptycho_ml.data.object_h5 import read_object_h5
from ptycho_ml.data.readers import load_scan
from ptycho_ml.data.scan import ScanData
from ptycho_ml.errors import field_error
from ptycho_ml.inference import metrics as metrics_mod
from ptycho_ml.inference.reconstruct import ReconstructionResult, reconstruct
from ptycho_ml.model.network import DiffractionToObject


def evaluate_model(model: DiffractionToObject, scan: ScanData, refine_steps: int | None = None,
                   progress: bool = False, threads: int = 0) -> tuple[ReconstructionResult, dict[str, float], str]:
    """Reconstruct ``scan`` with ``model`` and score it against the scan's ground truth.

    Returns ``(result, metrics, table)``: ``metrics`` has ``network_*`` keys
    (the network alone) and, when ``refine_steps`` > 0 (default: the
    inference default), ``refined_*`` keys; ``table`` is the printable text.
    """
    if scan.obj is None:
        raise field_error(scan.source, "objectGuess", "missing", "a ground-truth object to evaluate against")
    steps = InferenceConfig().refine_steps if refine_steps is None else refine_steps
    result = reconstruct(model, scan, InferenceConfig(refine_steps=steps, progress=progress, threads=threads))
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
                           refine_steps: int | None = None) -> tuple[str, dict[str, Any]]:
    """Metrics of a reconstruction of scan ``data`` against its ``objectGuess`` ground truth.

    Returns ``(table text, metrics dict)``. With a model, both the network-only
    and the refined reconstruction are scored (keys ``network_*``/``refined_*``).
    """
    scan = load_scan(data)
    if scan.obj is None:
        raise field_error(scan.source, "objectGuess", "missing", "a ground-truth object to evaluate against")
    if not reconstruction:
        _, metrics, table = evaluate_model(model, scan, refine_steps)
        return table, metrics
    obj = read_object_h5(reconstruction)
    if obj.shape != scan.obj.shape:
        raise field_error(reconstruction, "object", f"shape {obj.shape}", f"{scan.obj.shape} like the ground truth in {scan.source}")
    metrics = metrics_mod.evaluate_object(obj, scan.obj, scan.positions_px, scan.N, scan.probe)
    return metrics_mod.format_table(metrics), metrics
