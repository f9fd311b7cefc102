"""The MLflow layer around the CLI's commands: ``ptycho-ml COMMAND --mlflow`` (and the MLproject entry points).

Each tracked command runs inside the MLflow run that ``mlflow run`` created
(``MLFLOW_RUN_ID``) or starts one. Training logs every config field as a
param (prefixed ``cfg.`` so nothing collides with Lightning's hyper-parameter
names), per-epoch ``train_loss``, ``val_loss`` and ``lr`` through Lightning's
own MLflow logger, held-out quality metrics, preview PNGs, a dataset
fingerprint, and the model through the ``ptycho_ml`` flavour, registered as a
new version. Evaluation and reconstruction log their settings, metrics and
outputs; simulation logs the scans it wrote.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from ptycho_ml.config import TrainingConfig
from ptycho_ml.data.scan import ScanData, centres_box
from ptycho_ml.data.storage import is_s3
from ptycho_ml.inference.outputs import write_previews
from ptycho_ml.lifecycle.training import TrainResult, train


def flatten_params(config: dict[str, Any], prefix: str = "cfg.") -> dict[str, str]:
    """Nested config -> flat ``{"cfg.model.gridsize": "1", ...}`` (MLflow params are strings)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


@contextmanager
def tracked_run(params: dict[str, Any] | None = None) -> Iterator[Any]:
    """The active MLflow run (``mlflow run``'s, or a new one), with ``params`` logged; ended on exit."""
    import mlflow

    with mlflow.start_run() as run:
        if params:
            mlflow.log_params({k: str(v) for k, v in params.items()})
        yield run


def log_previews(obj: np.ndarray, scan: ScanData, artifact_dir: str, title: str) -> None:
    """PNG previews of ``obj (H, W) complex64``, cropped to the scanned box, as artifacts of the active run."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        write_previews(tmp, obj, title=title, region=centres_box(scan.positions_px, scan.obj_shape))
        mlflow.log_artifacts(tmp, artifact_dir)


def _run_logger(run_id: str):
    """Lightning's MLflow logger bound to the active run. The run's owner ends it, not Lightning."""
    import mlflow
    from lightning.pytorch.loggers import MLFlowLogger

    class RunLogger(MLFlowLogger):
        def finalize(self, status: str = "success") -> None:  # the run goes on: the model is logged after fit
            pass

    return RunLogger(run_id=run_id, tracking_uri=mlflow.get_tracking_uri())


def train_tracked(config: TrainingConfig, register_as: str | None) -> tuple[TrainResult, Any, str]:
    """:func:`~ptycho_ml.lifecycle.training.train` inside an MLflow run; returns ``(result, model info, run id)``.

    ``register_as``: the registered model name the logged model becomes a new
    version of (empty: log only).
    """
    import mlflow

    from ptycho_ml import flavor

    with tracked_run(flatten_params(config.to_dict())) as run:
        mlflow.set_tag("ptycho_ml.backend", "torch")
        result = train(config, loggers=[_run_logger(run.info.run_id)],
                       preview_sink=lambda epoch, obj, scan: log_previews(obj, scan, f"previews/epoch_{epoch:03d}",
                                                                          f"epoch {epoch}"))
        mlflow.log_params({"dataset.sha256": result.dataset["sha256"], "dataset.shape": json.dumps(result.dataset["shape"]),
                           "dataset.source": result.dataset["source"],
                           "model.n_parameters": str(result.model_summary["n_parameters"])})
        mlflow.log_dict(result.dataset, "dataset.json")
        if result.test_reconstruction is not None:
            log_previews(result.test_reconstruction.network_obj, result.test_scan, "reconstruction/network", "network")
            log_previews(result.test_reconstruction.obj, result.test_scan, "reconstruction/refined", "refined")
        if result.warm_start is not None:
            mlflow.log_dict(asdict(result.warm_start), "warm_start.json")
        info = flavor.log_model(result.bundle_path, name="model", registered_model_name=register_as or None)
        # Logged after the model, linked to it: the run and the logged model's page both show them.
        mlflow.log_metrics({"flops_per_pattern": result.model_summary["flops_per_pattern"],
                            "train_time_s": result.elapsed_s, **result.metrics}, model_id=info.model_id)
        return result, info, run.info.run_id


def log_evaluation(params: dict[str, Any], metrics: dict[str, float]) -> None:
    """Log an evaluation's settings and metrics (also as ``metrics.json``) to a run."""
    import mlflow

    with tracked_run(params):
        mlflow.log_metrics(metrics)
        mlflow.log_dict(metrics, "metrics.json")


def log_reconstruction(params: dict[str, Any], summary: dict[str, Any], out: str) -> None:
    """Log a reconstruction's settings, metrics and (local) output files to a run."""
    import mlflow

    with tracked_run(params):
        mlflow.log_metrics(dict(summary.get("metrics", {})))
        if not is_s3(out):
            mlflow.log_artifacts(out, "reconstruction")


def log_simulated(params: dict[str, Any], paths: list[str]) -> None:
    """Log simulated scans as ``data/`` artifacts of a run."""
    import mlflow

    with tracked_run(params):
        for path in paths:
            mlflow.log_artifact(path, "data")
