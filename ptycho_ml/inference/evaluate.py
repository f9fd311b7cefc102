"""Evaluate a reconstruction (a written object.h5, or a model run on the scan) against ground truth."""

from __future__ import annotations

from typing import Any

import numpy as np

from ptycho_ml.inference import metrics as metrics_mod
from ptycho_ml.config import InferenceConfig
from ptycho_ml.data.readers import load_scan
from ptycho_ml.errors import PtychoInputError, field_error
from ptycho_ml.model.network import DiffractionToObject


def read_object_h5(path: str) -> np.ndarray:
    """The ``object`` dataset ``(H, W) complex64`` of an ``object.h5`` written by ``reconstruct``."""
    import h5py

    from ptycho_ml.data.storage import local_path

    path = local_path(path)
    try:
        with h5py.File(path, "r") as h5:
            if "object" not in h5:
                raise field_error(path, "object", f"no such dataset (datasets: {sorted(h5.keys())})", "an object.h5 written by `ptycho-ml reconstruct`")
            return np.asarray(h5["object"][()], dtype=np.complex64)
    except OSError as exc:
        raise PtychoInputError(f"{path}: not a readable HDF5 file ({exc}), expected object.h5 from `ptycho-ml reconstruct`") from None


def evaluate_against_truth(data: str, reconstruction: str | None = None, model: DiffractionToObject | None = None,
                           refine_steps: int | None = None) -> tuple[str, dict[str, Any]]:
    """Metrics of a reconstruction of scan ``data`` against its ``objectGuess`` ground truth.

    Returns ``(table text, metrics dict)``. With a model, both the network-only
    and the refined reconstruction are scored (keys ``network_*``/``refined_*``).
    """
    from ptycho_ml.inference.reconstruct import reconstruct

    scan = load_scan(data)
    if scan.obj is None:
        raise field_error(scan.source, "objectGuess", "missing", "a ground-truth object to evaluate against")
    metrics: dict[str, Any] = {}
    lines = []
    if reconstruction:
        obj = read_object_h5(reconstruction)
        if obj.shape != scan.obj.shape:
            raise field_error(reconstruction, "object", f"shape {obj.shape}", f"{scan.obj.shape} like the ground truth in {scan.source}")
        metrics = metrics_mod.evaluate_object(obj, scan.obj, scan.positions_px, scan.N, scan.probe)
        lines.append(metrics_mod.format_table(metrics))
    else:
        steps = InferenceConfig().refine_steps if refine_steps is None else refine_steps
        result = reconstruct(model, scan, InferenceConfig(refine_steps=steps, progress=False))
        for label, obj in (("network", result.network_obj), ("refined", result.obj)):
            if label == "refined" and not steps:
                continue
            m = metrics_mod.evaluate_object(obj, scan.obj, scan.positions_px, scan.N, scan.probe)
            metrics.update({f"{label}_{k}": v for k, v in m.items()})
            lines.append(f"{label} ({result.timings_s.get('network_s', 0) + (result.timings_s.get('refine_s', 0) if label == 'refined' else 0):.2f} s):\n{metrics_mod.format_table(m)}")
    return "\n".join(lines), metrics
