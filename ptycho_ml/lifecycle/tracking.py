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
from functools import partial
from dataclasses import asdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from lightning.pytorch.loggers import MLFlowLogger

from ptycho_ml.config import TrainingConfig
from ptycho_ml.data.scan import ScanData, centres_box
from ptycho_ml.data.storage import is_s3
from ptycho_ml.inference.outputs import write_previews
from ptycho_ml.lifecycle.training import TrainResult, train
from ptycho_ml.model.training import launch_rank


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


def log_previews(obj: np.ndarray, scan: ScanData, artifact_dir: str, title: str,
                 run: tuple[str, str] | None = None) -> None:
    """PNG previews of ``obj (H, W) complex64``, cropped to the scanned box, as artifacts of the active run.

    A scan with ground truth gets the reconstruction, the truth and the error side by side.
    ``run``: ``(tracking URI, run id)`` to log to instead, from a process that has no active run (a ddp_spawn worker).
    """
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        truth = scan.obj if scan.obj is not None and scan.obj.shape == obj.shape else None
        write_previews(tmp, obj, title=title, region=centres_box(scan.positions_px, scan.obj_shape), truth=truth)
        if run is None:
            mlflow.log_artifacts(tmp, artifact_dir)
        else:
            mlflow.MlflowClient(tracking_uri=run[0]).log_artifacts(run[1], tmp, artifact_dir)


def _epoch_previews(run: tuple[str, str], epoch: int, obj: np.ndarray, scan: ScanData) -> None:
    """The training run's preview sink (module level and bound by ``partial``: ddp_spawn pickles it)."""
    log_previews(obj, scan, f"previews/epoch_{epoch:03d}", f"epoch {epoch}", run=run)


class _RunLogger(MLFlowLogger):
    """Lightning's MLflow logger bound to the active run. The run's owner ends it, not Lightning."""

    def finalize(self, status: str = "success") -> None:  # the run goes on: the model is logged after fit
        pass


def _run_logger(run_id: str) -> _RunLogger:
    import mlflow

    return _RunLogger(run_id=run_id, tracking_uri=mlflow.get_tracking_uri())


def _model_epoch(history: list[dict[str, float]]) -> dict[str, float] | None:
    """The row of ``history`` whose weights the bundle holds: the first lowest ``val_loss`` (the
    checkpoint keeps a strict improvement only), else the last epoch; None without epochs."""
    scored = [row for row in history if "val_loss" in row]
    if not scored:
        return history[-1] if history else None
    return min(scored, key=lambda row: row["val_loss"])  # min() keeps the first of equal losses


def _logged_step(run_id: str, epoch: int) -> int | None:
    """The step at which Lightning logged ``epoch``'s losses to the run (None: not in this run, e.g. resumed)."""
    import mlflow

    steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "epoch") if int(m.value) == epoch]
    return steps[0] if steps else None


def train_tracked(config: TrainingConfig, register_as: str | None) -> tuple[TrainResult, Any, str]:
    """:func:`~ptycho_ml.lifecycle.training.train` inside an MLflow run; returns ``(result, model info, run id)``.

    ``register_as``: the registered model name the logged model becomes a new
    version of (empty: log only). Under several processes only rank 0 opens
    the run, logs and registers; the others return ``(result, None, None)``
    with ``result.is_global_zero`` False.
    """
    import mlflow

    from ptycho_ml import flavor

    if launch_rank(config) != 0:  # another process of a multi-process run: it trains; rank 0 tracks
        return train(config), None, None
    with tracked_run(flatten_params(config.to_dict())) as run:
        mlflow.set_tag("ptycho_ml.backend", "torch")
        result = train(config, loggers=[_run_logger(run.info.run_id)],
                       preview_sink=partial(_epoch_previews, (mlflow.get_tracking_uri(), run.info.run_id)))
        mlflow.log_params({"dataset.sha256": result.dataset["sha256"], "dataset.shape": json.dumps(result.dataset["shape"]),
                           "dataset.source": result.dataset["source"],
                           "model.n_parameters": str(result.model_summary["n_parameters"])})
        mlflow.log_dict(result.dataset, "dataset.json")
        if result.test_reconstruction is not None:
            log_previews(result.test_reconstruction.network_obj, result.test_scan, "reconstruction/network", "network")
            log_previews(result.test_reconstruction.obj, result.test_scan, "reconstruction/refined", "refined")
        if result.warm_start is not None:
            mlflow.log_dict(asdict(result.warm_start), "warm_start.json")
        # The model is logged at the step of the epoch whose weights it holds: MLflow links the run's metrics
        # at that step (train_loss, val_loss, epoch) to the logged model (the default, step 0, links epoch 0's).
        best = _model_epoch(result.history)
        step = None if best is None else _logged_step(run.info.run_id, int(best["epoch"]))
        info = flavor.log_model(result.bundle_path, name="model", registered_model_name=register_as or None,
                                step=step or 0)
        unlinked = best is not None and step is None
        losses = {k: best[k] for k in ("train_loss", "val_loss") if k in best} if unlinked else {}
        # Logged after the model, linked to it: the run and the logged model's page both show them (a resumed
        # run whose best epoch came before it links that epoch's losses from the checkpoint's history).
        figures = {"flops_per_pattern": result.model_summary["flops_per_pattern"], "train_time_s": result.elapsed_s,
                   **losses, **result.metrics}
        mlflow.log_metrics({k: v for k, v in figures.items() if np.isfinite(v)}, model_id=info.model_id)
        # A NaN (e.g. test_passes_needed: never reached) goes to the run only: MLflow 3.17 shows a linked NaN as 0.
        mlflow.log_metrics({k: v for k, v in figures.items() if not np.isfinite(v)})
        if register_as:  # the version's figures and gate verdicts, as tags and description (registry page)
            from ptycho_ml.lifecycle.registry import annotate_version

            annotate_version(register_as, info.registered_model_version)
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
