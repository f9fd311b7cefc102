"""fit(config, scan) -> FitResult: the Lightning training loop of a reconstructor, and nothing around it.

Lightning does the loop: validation every epoch, checkpoints (best and
last), resume, early stopping, the LR schedule (:class:`LearningRateMonitor`
logs it), the progress bar. The caller passes Lightning loggers (MLflow's,
for a tracked run; a CSV learning curve in ``output_dir/logs`` otherwise)
and any extra callbacks. Data handling is :class:`~ptycho_ml.model.datamodule.ScanDataModule`;
evaluation and the bundle are the caller's (see :mod:`ptycho_ml.lifecycle.training`).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch

from ptycho_ml.config import TrainingConfig
from ptycho_ml.data.scan import ScanData
from ptycho_ml.errors import PtychoInputError
from ptycho_ml.model.datamodule import ScanDataModule
from ptycho_ml.model.module import PtychoLitModule
from ptycho_ml.model.network import DiffractionToObject


@dataclass
class FitResult:
    """The trained model (best validation weights, CPU, eval mode) and what the loop measured.

    ``history``: one dict per epoch with ``epoch``, ``train_loss``, ``val_loss`` and ``lr``.
    ``is_global_zero``: False on the other processes of a multi-process run,
    which must not evaluate, write or log.
    """

    model: DiffractionToObject
    history: list[dict[str, float]]
    amplitude_scale: float
    n_train: int
    n_val: int
    is_global_zero: bool = True

    @property
    def best_val_loss(self) -> float | None:
        losses = [h["val_loss"] for h in self.history if "val_loss" in h]
        return min(losses) if losses else None


def _accelerator(requested: str) -> str:
    if requested == "gpu" and not torch.cuda.is_available():
        raise PtychoInputError("accelerator: found 'gpu', but no CUDA device is available; expected 'cpu' or 'auto' on this machine")
    return requested


class _History(L.Callback):
    """Keeps each epoch's losses and learning rate in ``history`` (after validation).

    A module-level class (ddp_spawn pickles the callbacks into its workers); its
    ``state_dict`` puts the rows into the checkpoints, which is how they reach
    the main process after ddp_spawn (the workers' copy of ``history`` dies with them).
    """

    def __init__(self, history: list[dict[str, float]]):
        self.history, self.lr = history, 0.0

    def on_train_epoch_start(self, trainer, pl_module):  # the rate this epoch trains with, as the LR monitor logs it
        self.lr = float(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_epoch_end(self, trainer, pl_module):  # after the epoch's validation (epoch means reduced over ranks)
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("train_loss", "val_loss")}
        row["lr"] = self.lr
        row["epoch"] = trainer.current_epoch
        self.history.append(row)

    def state_dict(self) -> dict:
        return {"history": [dict(r) for r in self.history]}


def _history_callback(history: list[dict[str, float]]) -> _History:
    return _History(history)


def _history_from_checkpoint(path: Path) -> list[dict[str, float]]:
    states = torch.load(path, map_location="cpu", weights_only=True).get("callbacks", {})
    return next((list(v["history"]) for k, v in states.items() if k.startswith("_History")), [])


def launch_rank(config: TrainingConfig) -> int:
    """This process's global rank as its launcher set it, before any Trainer exists (0 when alone).

    ``RANK`` (torchrun, Lightning's workers), else ``SLURM_PROCID`` under
    ``srun``, else ``NODE_RANK * devices + LOCAL_RANK`` (Lightning's own
    relaunch of the command under ``strategy="ddp"``). The tracking layer uses
    it to start an MLflow run on rank 0 only.
    """
    env = os.environ
    if env.get("RANK", "").isdigit():
        return int(env["RANK"])
    if env.get("SLURM_PROCID", "").isdigit() and env.get("SLURM_NTASKS", "1") != "1":
        return int(env["SLURM_PROCID"])
    return int(env.get("NODE_RANK", "0") or 0) * config.devices + int(env.get("LOCAL_RANK", "0") or 0)


def quiet_lightning() -> None:
    """Silence Lightning's info logs and its warnings that do not apply here (single-process loaders)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def fit(config: TrainingConfig, scan: ScanData | Sequence[ScanData], loggers: list[Any] | None = None,
        callbacks: list[Any] | None = None) -> FitResult:
    """Train a :class:`DiffractionToObject` on ``scan`` (or several scans, each with its own probe) with the physics loss.

    ``config.model.N`` follows the scans' pattern size; the first scan's probe is the model's reference probe. Checkpoints go to
    ``{output_dir}/checkpoints`` (``best.ckpt``, ``last.ckpt``);
    ``config.resume`` continues from one (loaded with ``weights_only=True``).
    """
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, TQDMProgressBar
    from lightning.pytorch.loggers import CSVLogger

    output_dir = Path(config.output_dir)
    L.seed_everything(config.seed, workers=True, verbose=False)
    data = ScanDataModule(scan, config, config.model.gridsize)
    reference = data.scan
    model_cfg = config.model.replace(N=reference.N) if config.model.N != reference.N else config.model
    data.setup("fit")  # the amplitude scale is part of the model
    module = PtychoLitModule(model_cfg.to_dict(), torch.from_numpy(reference.probe), data.amplitude_scale, data.loss,
                             config.learning_rate, config.weight_decay, config.lr_schedule, config.epochs,
                             data.good_pixels, data.probes)
    ckpt_dir = output_dir / "checkpoints"
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min", save_last=True)
    history: list[dict[str, float]] = []
    cbs = [checkpoint, EarlyStopping(monitor="val_loss", mode="min", patience=config.early_stopping_patience),
           LearningRateMonitor(logging_interval="epoch"), _history_callback(history), *(callbacks or [])]
    if not config.quiet:
        cbs.append(TQDMProgressBar(refresh_rate=10))
    trainer = L.Trainer(
        max_epochs=config.epochs, accelerator=_accelerator(config.accelerator), devices=config.devices,
        num_nodes=config.num_nodes, strategy=config.strategy,
        deterministic=True, callbacks=cbs, logger=loggers or [CSVLogger(str(output_dir), name="logs")],
        enable_progress_bar=not config.quiet, enable_model_summary=not config.quiet,
        default_root_dir=str(output_dir), log_every_n_steps=10,
        max_time={"seconds": config.time_limit_s} if config.time_limit_s else None, num_sanity_val_steps=0,
    )
    resume = config.resume or None
    if resume and not Path(resume).is_file():
        raise PtychoInputError(f"--resume: found '{resume}', expected an existing checkpoint file (e.g. {ckpt_dir / 'last.ckpt'})")
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume, weights_only=True)
    except (KeyError, RuntimeError) as exc:
        if resume:
            raise PtychoInputError(f"{resume}: cannot resume from this checkpoint ({str(exc).splitlines()[0]}), expected a checkpoint of the same model and data") from None
        raise
    # Best validation weights (when a checkpoint was written), else the final ones. Under ddp_spawn,
    # Lightning hands the workers' final weights and best_model_path back to this process.
    if checkpoint.best_model_path and Path(checkpoint.best_model_path).is_file():
        state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    if config.strategy == "ddp_spawn" and (ckpt_dir / "last.ckpt").is_file():  # the workers kept the history
        history.extend(_history_from_checkpoint(ckpt_dir / "last.ckpt"))
    return FitResult(module.model.cpu().eval(), history, data.amplitude_scale, data.n_train, data.n_val,
                     trainer.is_global_zero)
