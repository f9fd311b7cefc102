"""``ptycho-ml register --bundle``: a bundle trained outside ``mlflow run`` into the registry, gated like any other.

The bundle is logged through the ``ptycho_ml`` flavour in a new MLflow run,
with the held-out figures the policy judges: measured now on a scan with
ground truth (``--metrics-from-data``, the training run's own
:func:`~ptycho_ml.lifecycle.training.held_out_figures`), or else the ones the
bundle recorded when ``ptycho-ml train`` wrote it. The new version then gets
its figures and gate verdicts as tags and description, like a trained one.
"""

from __future__ import annotations

from typing import Any

from ptycho_ml.errors import PtychoInputError
from ptycho_ml.lifecycle.registry import DEFAULT_MODEL_NAME, _check_name, _sha256, annotate_version


def register_bundle(bundle: str, name: str = DEFAULT_MODEL_NAME, metrics_from_data: str | None = None,
                    threads: int = 0) -> dict[str, Any]:
    """Log ``bundle`` (local or ``s3://``) as a ``ptycho_ml`` model, with figures, as a new version of ``name``.

    Returns ``{"name", "version", "run_id", "model_uri", "metrics", "metrics_source", "verdicts"}``.
    """
    import mlflow

    from ptycho_ml import flavor
    from ptycho_ml.data.readers import load_scan
    from ptycho_ml.data.storage import local_path
    from ptycho_ml.lifecycle.tracking import tracked_run
    from ptycho_ml.lifecycle.training import held_out_figures
    from ptycho_ml.model.bundle_io import load_model_bundle

    name = _check_name(name)
    path = local_path(bundle)
    model, contents = load_model_bundle(path)  # verified in full before anything is logged
    extra = contents.get("extra") or {}
    if metrics_from_data:
        scan = load_scan(metrics_from_data)
        if scan.obj is None:
            raise PtychoInputError(f"--metrics-from-data: {metrics_from_data} has no ground truth (objectGuess), "
                                   "expected a held-out scan with one, e.g. the test.npz `ptycho-ml simulate` writes")
        _, metrics, _ = held_out_figures(model, scan, threads=threads)
        source = f"measured on {metrics_from_data}"
    else:
        metrics = {k: float(v) for k, v in (extra.get("metrics") or {}).items()}
        source = "recorded in the bundle by ptycho-ml train" if metrics else "none (the gates will fail)"
    dataset = extra.get("dataset") or {}
    params = {"bundle": bundle, "bundle.sha256": _sha256(path), "metrics_source": source}
    if dataset.get("sha256"):
        params.update({"dataset.sha256": dataset["sha256"], "dataset.source": dataset.get("source", "")})
    with tracked_run(params) as run:
        mlflow.set_tag("ptycho_ml.registered_from", "ptycho-ml register --bundle")
        info = flavor.log_model(path, name="model", registered_model_name=name)
        if metrics:  # linked to the logged model, as a training run's are
            mlflow.log_metrics(metrics, model_id=info.model_id)
        version = str(info.registered_model_version)
    judged = annotate_version(name, version)
    return {"name": name, "version": version, "run_id": run.info.run_id, "model_uri": info.model_uri,
            "metrics": metrics, "metrics_source": source, "verdicts": judged["verdicts"]}
