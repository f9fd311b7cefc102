"""train(config) -> TrainResult: a plain function (the CLI and the MLflow entry point call it).

Lightning does the loop (validation every epoch, checkpoints, resume, early
stopping, LR schedule, progress bar). The bundle ``{output_dir}/wts.h5.zip``
is written once, at the end, from the best validation checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ptycho_ml.inference import metrics as metrics_mod
from ptycho_ml.config import InferenceConfig, TrainingConfig
from ptycho_ml.data.grouping import make_groups, split_indices
from ptycho_ml.data.readers import load_scan
from ptycho_ml.data.scan import ScanData
from ptycho_ml.errors import PtychoInputError
from ptycho_ml.model.module import PtychoLitModule
from ptycho_ml.model.bundle_io import save_model_bundle
from ptycho_ml.model.network import DiffractionToObject, count_parameters, flops_per_pattern
from ptycho_ml.inference.reconstruct import ReconstructionResult, reconstruct

IN_MEMORY_LIMIT_VALUES = 256 * 1024 * 1024  # ~1 GiB of float32: larger scans stream from disk


class GroupDataset(Dataset):
    """Items ``(amplitude (C, N, N) float32, offsets_px (C, 2) float32[, target (C, N, N) complex64])``.

    Amplitudes come from an in-memory array when given, else straight from
    the (on-disk NPZ / HDF5) scan, so memory stays bounded by the batch.
    """

    def __init__(self, scan: ScanData, groups: np.ndarray, offsets: np.ndarray,
                 amplitudes: np.ndarray | None, targets: np.ndarray | None = None):
        self.scan, self.groups, self.offsets = scan, groups, offsets
        self.amplitudes, self.targets = amplitudes, targets

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int):
        members = self.groups[i]
        amp = self.amplitudes[members] if self.amplitudes is not None else self.scan.amplitude(members)
        item = (torch.from_numpy(np.ascontiguousarray(amp)), torch.from_numpy(self.offsets[i]))
        if self.targets is not None:
            item = item + (torch.from_numpy(self.targets[members]),)
        return item


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


def dataset_fingerprint(scan: ScanData) -> dict[str, Any]:
    """sha256 of the source file (or of the amplitudes when in memory), shape and source."""
    digest = hashlib.sha256()
    src = Path(scan.source)
    if src.is_file():
        with open(src, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    else:
        for _, block in scan.iter_batches(4096):
            digest.update(block.tobytes())
    return {"sha256": digest.hexdigest(), "shape": [len(scan), scan.N, scan.N], "source": str(scan.source)}


def compute_amplitude_scale(scan: ScanData, max_patterns: int = 4096, seed: int = 0) -> float:
    """RMS measured amplitude over (a seeded sample of) the training patterns.

    The network sees ``amplitude / amplitude_scale``; the scale is persisted in
    the bundle and reused at inference.
    """
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(scan), min(len(scan), max_patterns), replace=False))
    amp = scan.amplitude(idx).astype(np.float64)
    scale = float(np.sqrt(np.mean(amp**2)))
    if not scale > 0:
        raise PtychoInputError(f"{scan.source}: field '{scan.patterns_field}': all-zero diffraction, expected measured photons")
    return scale


def default_data(output_dir: Path, N: int = 64, seed: int = 0) -> tuple[str, str]:
    """Simulate the embedded default (train + held-out test scan) into ``output_dir/data``."""
    from ptycho_ml.physics import simulate

    paths = []
    for name, cfg in simulate.default_configs(N=N, seed=seed).items():
        path = output_dir / "data" / f"{name}.npz"
        if not path.exists():
            simulate.write_simulated(simulate.simulate_scan(cfg), path)
        paths.append(str(path))
    return paths[0], paths[1]


def _accelerator(requested: str) -> str:
    if requested == "gpu" and not torch.cuda.is_available():
        raise PtychoInputError("accelerator: found 'gpu', but no CUDA device is available; expected 'cpu' or 'auto' on this machine")
    return requested


def _epoch_callbacks(history: list, epoch_sink, test_scan: ScanData | None, every: int, preview_sink) -> list:
    """Lightning callbacks: per-epoch metrics (kept in ``history``, passed to ``epoch_sink``)
    and, every ``every`` epochs, a network reconstruction of the held-out scan for ``preview_sink``."""
    import lightning as L

    from ptycho_ml.inference.reconstruct import network_object

    class EpochEnd(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):  # runs after the epoch's validation
            m = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("train_loss", "val_loss")}
            m["lr"] = float(trainer.optimizers[0].param_groups[0]["lr"])
            m["epoch"] = trainer.current_epoch
            history.append(m)
            if epoch_sink is not None:
                epoch_sink(dict(m))
            epoch = trainer.current_epoch + 1
            if preview_sink is not None and test_scan is not None and every > 0 and epoch % every == 0:
                model = pl_module.model
                was_training = model.training
                obj, _ = network_object(model.eval(), test_scan, progress=False)
                model.train(was_training)
                preview_sink(epoch, obj.numpy(), test_scan)

    return [EpochEnd()]


def train(config: TrainingConfig, epoch_sink=None, preview_sink=None,
          evaluate_refine_steps: int | None = None) -> TrainResult:
    """Train a reconstructor and write ``{output_dir}/wts.h5.zip``.

    ``epoch_sink(metrics)`` receives each epoch's ``train_loss``, ``val_loss``,
    ``lr`` and ``epoch``; ``preview_sink(epoch, obj, test_scan)`` receives a
    network reconstruction of the held-out scan every
    ``preview_every_n_epochs`` (the MLflow entry point logs both).
    """
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, TQDMProgressBar

    t_start = time.perf_counter()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    threads = config.resolved_threads()
    torch.set_num_threads(threads)
    if config.quiet:
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")

    data_path, test_path = config.data, config.test_data
    if not data_path:
        data_path, default_test = default_data(output_dir, N=config.model.N, seed=config.seed)
        test_path = test_path or default_test
    scan = load_scan(data_path)
    test_scan = load_scan(test_path) if test_path else None
    if config.max_patterns and config.max_patterns < len(scan):
        keep = np.random.default_rng(config.seed).choice(len(scan), config.max_patterns, replace=False)
        scan = scan.subset(keep)
    model_cfg = config.model.replace(N=scan.N) if config.model.N != scan.N else config.model
    if test_scan is not None and test_scan.N != scan.N:
        raise PtychoInputError(f"{test_scan.source}: field '{test_scan.patterns_field}': found {test_scan.N}x{test_scan.N} patterns, expected {scan.N}x{scan.N} like the training data")

    L.seed_everything(config.seed, workers=True, verbose=False)
    amplitude_scale = compute_amplitude_scale(scan, seed=config.seed)
    groups, offsets = make_groups(scan.positions_px, model_cfg.gridsize, seed=config.seed)
    train_idx, val_idx = split_indices(scan.positions_px, config.val_fraction, config.seed, config.split)
    in_memory = len(scan) * scan.N * scan.N <= IN_MEMORY_LIMIT_VALUES
    amplitudes = scan.amplitude(slice(0, len(scan))) if in_memory else None
    targets = None
    if config.loss == "supervised":
        if scan.obj is None:
            raise PtychoInputError(f"{scan.source}: field 'objectGuess': missing, expected ground truth for loss='supervised'")
        from ptycho_ml.physics.forward import extract_patches

        with torch.no_grad():
            targets = extract_patches(torch.from_numpy(np.asarray(scan.obj)), torch.from_numpy(scan.positions_px.astype(np.float32)), scan.N).numpy()
    if len(val_idx) == 0:
        val_idx = train_idx[: max(1, len(train_idx) // 20)]
    # Validation groups must not borrow training patterns: keep only groups whose members are all in val.
    val_set = set(val_idx.tolist())
    val_groups = [i for i in val_idx if all(m in val_set for m in groups[i])] or list(val_idx)
    train_set = set(train_idx.tolist())
    train_groups = [i for i in train_idx if all(m in train_set for m in groups[i])] or list(train_idx)
    gen = torch.Generator().manual_seed(config.seed)
    train_loader = DataLoader(GroupDataset(scan, groups[train_groups], offsets[train_groups], amplitudes, targets),
                              batch_size=config.batch_size, shuffle=True, generator=gen, num_workers=0, drop_last=len(train_groups) > config.batch_size)
    val_loader = DataLoader(GroupDataset(scan, groups[val_groups], offsets[val_groups], amplitudes, targets),
                            batch_size=max(config.batch_size, 64), shuffle=False, num_workers=0)

    good = None if scan.good_pixels is None else torch.from_numpy(scan.good_pixels)
    module = PtychoLitModule(model_cfg.to_dict(), torch.from_numpy(scan.probe), amplitude_scale, config.loss,
                             config.learning_rate, config.weight_decay, config.lr_schedule, config.epochs, good)
    ckpt_dir = output_dir / "checkpoints"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min", save_last=True)
    history: list[dict[str, float]] = []
    cbs = [checkpoint, EarlyStopping(monitor="val_loss", mode="min", patience=config.early_stopping_patience),
           *_epoch_callbacks(history, epoch_sink, test_scan, config.preview_every_n_epochs, preview_sink)]
    if not config.quiet:
        cbs.append(TQDMProgressBar(refresh_rate=10))
    trainer = L.Trainer(
        max_epochs=config.epochs, accelerator=_accelerator(config.accelerator), devices=config.devices,
        deterministic=True, callbacks=cbs, logger=False, enable_progress_bar=not config.quiet,
        enable_model_summary=not config.quiet, default_root_dir=str(output_dir), log_every_n_steps=10,
        max_time={"seconds": config.time_limit_s} if config.time_limit_s else None, num_sanity_val_steps=0,
    )
    resume = config.resume or None
    if resume and not Path(resume).is_file():
        raise PtychoInputError(f"--resume: found '{resume}', expected an existing checkpoint file (e.g. {ckpt_dir / 'last.ckpt'})")
    try:
        trainer.fit(module, train_loader, val_loader, ckpt_path=resume, weights_only=True)
    except (KeyError, RuntimeError) as exc:
        if resume:
            raise PtychoInputError(f"{resume}: cannot resume from this checkpoint ({str(exc).splitlines()[0]}), expected a checkpoint of the same model and data") from None
        raise

    if trainer.global_rank != 0:  # under DDP only rank 0 evaluates and writes the bundle
        return TrainResult(output_dir / "wts.h5.zip", module.model, history, {}, amplitude_scale, len(train_groups),
                           len(val_groups), time.perf_counter() - t_start, {}, test_scan)
    # Best validation weights (when a checkpoint was written), else the final ones.
    if checkpoint.best_model_path and Path(checkpoint.best_model_path).is_file():
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    model = module.model.cpu().eval()

    fingerprint = dataset_fingerprint(scan)
    summary = {"n_parameters": count_parameters(model.generator),
               "flops_per_pattern": flops_per_pattern(model)}
    result_metrics: dict[str, float] = {}
    test_recon = None
    if test_scan is not None:
        steps = InferenceConfig().refine_steps if evaluate_refine_steps is None else evaluate_refine_steps
        test_recon = reconstruct(model, test_scan, InferenceConfig(refine_steps=steps, progress=not config.quiet, threads=threads))
        if test_scan.obj is not None:
            for label, obj in (("network", test_recon.network_obj), ("refined", test_recon.obj)):
                if label == "refined" and not steps:
                    continue
                m = metrics_mod.evaluate_object(obj, test_scan.obj, test_scan.positions_px, test_scan.N, test_scan.probe)
                result_metrics.update({f"test_{label}_{k}": float(v) for k, v in m.items()})
    val_losses = [h["val_loss"] for h in history if "val_loss" in h]
    extra = {"metrics": result_metrics, "best_val_loss": min(val_losses) if val_losses else None,
             "dataset": fingerprint, "model_summary": summary}
    bundle_path = save_model_bundle(model, output_dir / "wts.h5.zip",
                                    config={"training": config.to_dict()}, extra=extra)
    return TrainResult(bundle_path, model, history, result_metrics, amplitude_scale, len(train_groups),
                       len(val_groups), time.perf_counter() - t_start, fingerprint, test_scan, test_recon, summary)
