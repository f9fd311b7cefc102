"""train(config) -> TrainResult: one training run, from data to a verified ``wts.h5.zip``.

The steps, each owned by its layer: the data (the embedded default is
simulated when none is given, :mod:`ptycho_ml.physics.simulate`), the
Lightning loop (:func:`ptycho_ml.model.training.fit`), the held-out
evaluation (:func:`ptycho_ml.inference.evaluate.evaluate_model`, the same as
``ptycho-ml evaluate``) and the bundle (:mod:`ptycho_ml.model.bundle_io`).
The CLI calls it directly; the MLflow layer (:mod:`ptycho_ml.lifecycle.tracking`)
passes its logger and records the result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from ptycho_ml.config import InferenceConfig, TrainingConfig
from ptycho_ml.data.readers import load_scan
from ptycho_ml.data.scan import ScanData, dataset_fingerprint
from ptycho_ml.errors import PtychoInputError
from ptycho_ml.inference.evaluate import WarmStart, evaluate_model, warm_start
from ptycho_ml.inference.reconstruct import ReconstructionResult, network_object, reconstruct
from ptycho_ml.model.bundle_io import save_model_bundle
from ptycho_ml.model.datamodule import resolve_loss
from ptycho_ml.model.network import DiffractionToObject, count_parameters, flops_per_pattern
from ptycho_ml.model.refiner_training import fit_refiner
from ptycho_ml.model.training import fit, quiet_lightning

#: ``preview_sink(epoch, obj (H, W) complex64, test_scan)``: a network reconstruction of the held-out scan.
PreviewSink = Callable[[int, np.ndarray, ScanData], None]


@dataclass
class TrainResult:
    bundle_path: Path
    model: DiffractionToObject
    history: list[dict[str, float]]
    metrics: dict[str, float]
    amplitude_scale: float
    n_train: int
    n_val: int
    elapsed_s: float
    dataset: dict[str, Any]
    test_scan: ScanData | None = None
    test_reconstruction: ReconstructionResult | None = None
    model_summary: dict[str, float] = field(default_factory=dict)
    is_global_zero: bool = True
    warm_start: WarmStart | None = None  # network start vs flat start on the held-out scan


def default_data(output_dir: Path, N: int = 64, seed: int = 0) -> tuple[str, str]:
    """Simulate the embedded default into ``output_dir/data``: the varied training scans
    (:func:`~ptycho_ml.physics.simulate.varied_training_configs`, ``train_0.npz`` ...) and the held-out
    test scan. Returns ``(comma-separated training paths, test path)``."""
    from ptycho_ml.physics import simulate

    configs = {f"train_{i}": cfg for i, cfg in enumerate(simulate.varied_training_configs(N=N, seed=seed))}
    configs["test"] = simulate.default_configs(N=N, seed=seed)["test"]
    paths = {}
    for name, cfg in configs.items():
        path = output_dir / "data" / f"{name}.npz"
        if not path.exists():
            simulate.write_simulated(simulate.simulate_scan(cfg), path)
        paths[name] = str(path)
    test = paths.pop("test")
    return ",".join(paths.values()), test


def _training_data(config: TrainingConfig) -> tuple[list[ScanData], ScanData | None]:
    """The training scans and the held-out scan, checked against each other.

    ``config.data`` names one scan, or several separated by commas (each with
    its own probe; the first is the reference). ``max_patterns`` caps the
    total, shared equally among the scans (seeded subsets).
    """
    data_path, test_path = config.data, config.test_data
    if not data_path:
        data_path, default_test = default_data(Path(config.output_dir), N=config.model.N, seed=config.seed)
        test_path = test_path or default_test
    scans = [load_scan(p.strip()) for p in data_path.split(",") if p.strip()]
    test_scan = load_scan(test_path) if test_path else None
    if config.max_patterns:
        share = max(1, config.max_patterns // len(scans))
        rng = np.random.default_rng(config.seed)
        scans = [s.subset(np.sort(rng.choice(len(s), share, replace=False))) if share < len(s) else s for s in scans]
    for other in [*scans[1:], test_scan]:
        if other is not None and other.N != scans[0].N:
            raise PtychoInputError(f"{other.source}: field '{other.patterns_field}': found {other.N}x{other.N} patterns, expected {scans[0].N}x{scans[0].N} like the training data")
    return scans, test_scan


class _Previews(L.Callback):
    """Every ``every`` epochs, a network reconstruction of the held-out scan goes to ``sink`` (rank 0 only).

    Module level, with a picklable ``sink``: ddp_spawn pickles the callbacks into its workers.
    """

    def __init__(self, test_scan: ScanData, every: int, sink: PreviewSink):
        self.test_scan, self.every, self.sink = test_scan, every, sink

    def on_train_epoch_end(self, trainer, pl_module):  # runs after the epoch's validation
        epoch = trainer.current_epoch + 1
        if trainer.is_global_zero and epoch % self.every == 0:
            model = pl_module.model
            was_training = model.training
            obj, _ = network_object(model.eval(), self.test_scan, progress=False)
            model.train(was_training)
            self.sink(epoch, obj.numpy(), self.test_scan)


def _preview_callback(test_scan: ScanData, every: int, sink: PreviewSink) -> _Previews:
    return _Previews(test_scan, every, sink)


def held_out_figures(model: DiffractionToObject, test_scan: ScanData, refine_steps: int | None = None,
                     progress: bool = False, threads: int = 0
                     ) -> tuple[ReconstructionResult, dict[str, float], WarmStart | None]:
    """The held-out figures a training run logs: ``(reconstruction, {test_*: value}, warm start)``.

    ``test_network_*`` and ``test_refined_*`` from :func:`evaluate_model`; unless
    ``refine_steps`` is 0, the warm start (``test_passes_saved``, ...) from the same network pass.
    ``ptycho-ml register --metrics-from-data`` scores a bundle with this too.
    """
    recon, scores, _ = evaluate_model(model, test_scan, refine_steps, progress=progress, threads=threads)
    metrics = {f"test_{k}": v for k, v in scores.items()}
    warm = None
    if refine_steps is None or refine_steps > 0:  # what the network saves the refinement
        warm = warm_start(model, test_scan, network=recon)
        metrics.update({f"test_{k}": v for k, v in warm.figures().items()})
    return recon, metrics, warm


#: The learned refinement's learning curve is the mean loss of every this many training windows.
REFINER_CURVE_EVERY = 10


def _refiner_curve(history: list[float]) -> list[float]:
    """The learned refinement's learning curve: the mean loss of every :data:`REFINER_CURVE_EVERY` windows."""
    return [float(np.mean(history[i:i + REFINER_CURVE_EVERY])) for i in range(0, len(history), REFINER_CURVE_EVERY)]


def _log_refiner_curve(loggers: list[Any] | None, curve: list[float]) -> None:
    """:func:`_refiner_curve` as the metric ``refiner_loss``, its step the first window of each mean."""
    for logger in loggers or []:
        for i, loss in enumerate(curve):
            logger.log_metrics({"refiner_loss": loss}, step=i * REFINER_CURVE_EVERY)


def train(config: TrainingConfig, loggers: list[Any] | None = None, preview_sink: PreviewSink | None = None,
          evaluate_refine_steps: int | None = None) -> TrainResult:
    """Train a reconstructor and write ``{output_dir}/wts.h5.zip`` (once, from the best validation weights).

    ``loggers``: Lightning loggers for the per-epoch ``train_loss``,
    ``val_loss`` and ``lr`` (default: a CSV learning curve in
    ``{output_dir}/logs``). ``preview_sink`` receives a network
    reconstruction of the held-out scan every ``preview_every_n_epochs``.
    The held-out scan is then scored, network alone and refined
    (``test_network_*``, ``test_refined_*``), the warm start is measured
    (``test_passes_needed``, ``test_passes_saved``, ``test_time_saved_s``,
    ``test_time_fraction`` against ``test_flat30_*``; skipped when
    ``evaluate_refine_steps`` is 0), and the figures go into the bundle.
    """
    t_start = time.perf_counter()
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    threads = config.resolved_threads()
    torch.set_num_threads(threads)
    if config.quiet:
        quiet_lightning()
    scans, test_scan = _training_data(config)
    config = config.replace(loss=resolve_loss(config.loss, scans))  # the bundle records the loss actually used
    callbacks = []
    if preview_sink is not None and test_scan is not None and config.preview_every_n_epochs > 0:
        callbacks.append(_preview_callback(test_scan, config.preview_every_n_epochs, preview_sink))
    fitted = fit(config, scans, loggers, callbacks)
    if not fitted.is_global_zero:  # under DDP only rank 0 evaluates and writes the bundle
        return TrainResult(Path(config.output_dir) / "wts.h5.zip", fitted.model, fitted.history, {},
                           fitted.amplitude_scale, fitted.n_train, fitted.n_val, time.perf_counter() - t_start, {},
                           test_scan, is_global_zero=False)
    model = fitted.model
    refiner_history: list[float] = []
    refiner_curve: list[float] = []
    if model.refiner is not None and config.refiner_iterations:
        # The learned refinement, behind the trained generator, over windows of the training scans.
        model.refiner, refiner_history = fit_refiner(model, scans, model.cfg.refiner_stages, model.cfg.refiner_width,
                                                     iterations=config.refiner_iterations, seed=config.seed,
                                                     progress=not config.quiet,
                                                     use_truth=config.loss in ("hybrid", "supervised"))
        refiner_curve = _refiner_curve(refiner_history)
        _log_refiner_curve(loggers, refiner_curve)
    fingerprint = dataset_fingerprint(scans)
    summary = {"n_parameters": count_parameters(model.generator), "flops_per_pattern": flops_per_pattern(model)}
    if model.refiner is not None:
        summary["refiner_parameters"] = count_parameters(model.refiner)
        summary["refiner_final_loss"] = float(np.mean(refiner_history[-20:])) if refiner_history else float("nan")
    result_metrics: dict[str, float] = {}
    test_recon = None
    warm = None
    if test_scan is not None and test_scan.obj is not None:
        test_recon, result_metrics, warm = held_out_figures(model, test_scan, evaluate_refine_steps,
                                                            progress=not config.quiet, threads=threads)
    elif test_scan is not None:  # no ground truth: reconstruct for the previews only
        steps = InferenceConfig().refine_steps if evaluate_refine_steps is None else evaluate_refine_steps
        test_recon = reconstruct(model, test_scan, InferenceConfig(refine_steps=steps, progress=not config.quiet,
                                                                   threads=threads))
    extra = {"metrics": result_metrics, "best_val_loss": fitted.best_val_loss, "dataset": fingerprint,
             "model_summary": summary}
    if warm is not None:
        extra["warm_start"] = asdict(warm)
    if refiner_curve:  # the learning curve, as logged
        extra["refiner_loss"] = refiner_curve
    bundle_path = save_model_bundle(model, Path(config.output_dir) / "wts.h5.zip",
                                    config={"training": config.to_dict()}, extra=extra)
    return TrainResult(bundle_path, model, fitted.history, result_metrics, fitted.amplitude_scale, fitted.n_train,
                       fitted.n_val, time.perf_counter() - t_start, fingerprint, test_scan, test_recon, summary,
                       warm_start=warm)
