"""MLflow Project entry points (see ``MLproject``): train, simulate, evaluate, reconstruct.

Each runs inside the MLflow run that ``mlflow run`` created (``MLFLOW_RUN_ID``)
or starts one. Training logs every config field as a param (prefixed
``cfg.`` so nothing collides with autologged names), per-epoch losses and the
learning rate, held-out quality metrics, preview PNGs, a dataset fingerprint,
and the model through the ``ptycho_ml`` flavour, registered as a new version.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from ptycho_ml.errors import PtychoInputError

SUPPORTED_BACKENDS = ("torch",)


def check_backend(backend: str) -> None:
    """Fail at once, before any heavy import, on an unsupported backend."""
    if backend not in SUPPORTED_BACKENDS:
        raise PtychoInputError(f"backend: found '{backend}', expected one of the supported backends: {', '.join(SUPPORTED_BACKENDS)}")


def flatten_params(config: dict[str, Any], prefix: str = "cfg.") -> dict[str, str]:
    """Nested config -> flat ``{"cfg.model.gridsize": "1", ...}`` (MLflow params are strings)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flatten_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def _log_previews(obj, scan, artifact_dir: str, title: str) -> None:
    import mlflow

    from ptycho_ml.inference.metrics import centres_box
    from ptycho_ml.inference.outputs import write_previews

    region = centres_box(scan.positions_px, scan.obj_shape)
    with tempfile.TemporaryDirectory() as tmp:
        write_previews(tmp, obj, title=title, region=region)
        mlflow.log_artifacts(tmp, artifact_dir)


def _fail(exc: PtychoInputError) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2)


@click.group()
def cli() -> None:
    """MLflow Project entry points of ptycho_ml."""


@cli.command()
@click.option("--backend", default="torch", show_default=True)
@click.option("--data", default="")
@click.option("--test-data", default="")
@click.option("--epochs", default=10, type=int)
@click.option("--gridsize", default=2, type=int)
@click.option("--preset", default="cpu")
@click.option("--seed", default=0, type=int)
@click.option("--register-as", default="ptychopinn")
@click.option("--time-limit-s", default=0.0, type=float)
@click.option("--output-dir", default="outputs/mlflow_train")
@click.option("--quiet", is_flag=True)
def train(backend, data, test_data, epochs, gridsize, preset, seed, register_as, time_limit_s, output_dir, quiet):
    """Train, log everything to MLflow and register the model."""
    try:
        check_backend(backend)
        _train(data, test_data, epochs, gridsize, preset, seed, register_as, time_limit_s, output_dir, quiet)
    except PtychoInputError as exc:
        _fail(exc)


def _train(data, test_data, epochs, gridsize, preset, seed, register_as, time_limit_s, output_dir, quiet) -> None:
    import mlflow

    from ptycho_ml import flavor
    from ptycho_ml.config import TrainingConfig
    from ptycho_ml.model.training import train as run_train

    config = TrainingConfig.from_dict({"data": data, "test_data": test_data, "epochs": epochs, "seed": seed,
                                       "model": {"preset": preset, "gridsize": gridsize},
                                       "time_limit_s": time_limit_s, "output_dir": output_dir, "quiet": quiet})
    with mlflow.start_run() as run:
        mlflow.log_params(flatten_params(config.to_dict()))
        mlflow.set_tag("ptycho_ml.backend", "torch")
        result = run_train(
            config,
            epoch_sink=lambda m: mlflow.log_metrics({k: v for k, v in m.items() if k != "epoch"}, step=int(m["epoch"])),
            preview_sink=lambda epoch, obj, scan: _log_previews(obj, scan, f"previews/epoch_{epoch:03d}", f"epoch {epoch}"))

        mlflow.log_params({"dataset.sha256": result.dataset["sha256"], "dataset.shape": json.dumps(result.dataset["shape"]),
                           "dataset.source": result.dataset["source"], "amplitude_scale": f"{result.amplitude_scale:.6g}",
                           "model.n_parameters": str(result.model_summary["n_parameters"])})
        mlflow.log_dict(result.dataset, "dataset.json")
        mlflow.log_metrics({"flops_per_pattern": result.model_summary["flops_per_pattern"],
                            "train_time_s": result.elapsed_s, **result.metrics})
        if result.test_reconstruction is not None:
            _log_previews(result.test_reconstruction.network_obj, result.test_scan, "reconstruction/network", "network")
            _log_previews(result.test_reconstruction.obj, result.test_scan, "reconstruction/refined", "refined")
        info = flavor.log_model(result.model, name="model", registered_model_name=register_as or None,
                                bundle_extra={"metrics": result.metrics, "dataset": result.dataset})
        click.echo(f"run {run.info.run_id}: model {info.model_uri}"
                   + (f", registered as {register_as} version {info.registered_model_version}" if register_as else ""))
        for key in sorted(result.metrics):
            click.echo(f"  {key} = {result.metrics[key]:.4f}")


@cli.command()
@click.option("--out", "out_dir", default="outputs/simulated")
@click.option("--n", "N", default=64, type=int)
@click.option("--seed", default=0, type=int)
def simulate(out_dir, N, seed):
    """Simulate the default train/test scans and log them as artifacts."""
    import mlflow

    from ptycho_ml.physics import simulate as sim

    with mlflow.start_run():
        for name, cfg in sim.default_configs(N=N, seed=seed).items():
            path = sim.write_simulated(sim.simulate_scan(cfg), Path(out_dir) / f"{name}.npz")
            mlflow.log_artifact(str(path), "data")
            click.echo(str(path))


@cli.command()
@click.option("--model-uri", required=True)
@click.option("--data", required=True)
@click.option("--refine-steps", default=30, type=int)
def evaluate(model_uri, data, refine_steps):
    """Evaluate a registered/logged model on a scan with ground truth; logs the metrics."""
    import mlflow

    from ptycho_ml.inference.evaluate import evaluate_against_truth
    from ptycho_ml.lifecycle.registry import load_native_model

    try:
        model = load_native_model(model_uri)
        table, metrics = evaluate_against_truth(data, model=model, refine_steps=refine_steps)
    except PtychoInputError as exc:
        _fail(exc)
    with mlflow.start_run():
        mlflow.log_params({"model_uri": model_uri, "data": data, "refine_steps": refine_steps})
        mlflow.log_metrics(metrics)
        mlflow.log_dict(metrics, "metrics.json")
    click.echo(table)


@cli.command()
@click.option("--model-uri", required=True)
@click.option("--data", required=True)
@click.option("--out", "out_dir", default="outputs/reconstruction")
@click.option("--refine-steps", default=30, type=int)
def reconstruct(model_uri, data, out_dir, refine_steps):
    """Reconstruct a scan with a model from the registry; logs the outputs as artifacts."""
    import mlflow

    from ptycho_ml.config import InferenceConfig
    from ptycho_ml.data.readers import load_scan
    from ptycho_ml.inference.job import run_reconstruction
    from ptycho_ml.lifecycle.registry import load_native_model

    try:
        model = load_native_model(model_uri)
        scan = load_scan(data)
        summary = run_reconstruction(model, scan, InferenceConfig(refine_steps=refine_steps, progress=False), out_dir, model_uri)
    except PtychoInputError as exc:
        _fail(exc)
    with mlflow.start_run():
        mlflow.log_params({"model_uri": model_uri, "data": data, "refine_steps": refine_steps})
        mlflow.log_metrics({k: v for k, v in summary.get("metrics", {}).items()})
        if not out_dir.startswith("s3://"):
            mlflow.log_artifacts(out_dir, "reconstruction")
    for line in summary["lines"]:
        click.echo(line)


if __name__ == "__main__":
    cli()
