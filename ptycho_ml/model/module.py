"""LightningModule: network -> physics -> loss, with one shared step for train/val/fine-tune."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from ptycho_ml.physics import losses
from ptycho_ml.physics import forward as physics
from ptycho_ml.config import ModelConfig
from ptycho_ml.model.network import DiffractionToObject


#: Weight of the ground-truth term in the hybrid loss: about equal to the Poisson term (per pixel,
#: deviance/2) on the default simulated data at the start of training, ~10x smaller at the end.
HYBRID_SUPERVISED_WEIGHT = 1000.0


def physics_step(model: DiffractionToObject, amplitude: torch.Tensor, offsets_px: torch.Tensor,
                 loss_kind: str, good_pixels: torch.Tensor | None = None,
                 target_patches: torch.Tensor | None = None,
                 probe: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One PINN step shared by training, validation and on-scan fine-tuning.

    amplitude ``(B, C, N, N)`` float32 measured amplitudes (counts scale),
    offsets_px ``(B, C, 2)`` positions relative to each group's centre,
    probe ``(N, N)``/``(K, N, N)`` for the whole batch or ``(B, 1, N, N)``
    per group (default: the model's own). Returns ``(loss, patches (B, C, N, N)
    complex64)``. With C > 1 the predicted patches are merged in a shared
    canvas and re-extracted (the overlap constraint) before the forward model.
    """
    probe = model.probe if probe is None else probe
    intensity = physics.intensity_of(probe)
    patches = model(amplitude, probe, good_pixels)
    if patches.shape[1] > 1:
        patches = physics.merge_group(patches, offsets_px, intensity)
    if loss_kind in ("supervised", "hybrid"):
        if target_patches is None:
            raise ValueError(f"{loss_kind} loss needs ground-truth patches")
        weight = intensity / intensity.amax(dim=(-2, -1), keepdim=True)
        supervised = ((patches - target_patches).abs().square() * weight).mean()
        if loss_kind == "supervised":
            return supervised, patches
    predicted = physics.far_field_amplitude(probe, patches)
    if loss_kind == "hybrid":  # the physics loss, plus the simulator's ground truth where it exists
        return losses.poisson_nll(predicted, amplitude, good_pixels) + HYBRID_SUPERVISED_WEIGHT * supervised, patches
    return losses.LOSSES[loss_kind](predicted, amplitude, good_pixels), patches


class PtychoLitModule(L.LightningModule):
    """Trains :class:`DiffractionToObject` with the physics loss (Poisson NLL by default).

    Batches are ``(amplitude (B, C, N, N), offsets_px (B, C, 2), probe_index (B,)[, target (B, C, N, N) complex])``.
    ``probes`` ``(S, N, N)`` complex64: one probe per training scan (the
    bank ``probe_index`` points into); None: one scan, whose probe is ``probe``.
    ``probe`` is the model's reference probe (kept in the bundle).
    Hyper-parameters are plain dicts so checkpoints load with ``weights_only=True``.
    """

    def __init__(self, model_config: dict, probe: torch.Tensor, amplitude_scale: float,
                 loss: str = "poisson", learning_rate: float = 2e-3, weight_decay: float = 0.0,
                 lr_schedule: str = "cosine", max_epochs: int = 30, good_pixels: torch.Tensor | None = None,
                 probes: torch.Tensor | None = None):
        super().__init__()
        # "loss_kind", not "loss": under `mlflow run` the run already holds the parameter `loss` as given
        # (e.g. "auto"), and MLflow refuses a second value for a logged parameter.
        self.save_hyperparameters({"model_config": model_config, "loss_kind": loss, "learning_rate": learning_rate,
                                   "weight_decay": weight_decay, "lr_schedule": lr_schedule,
                                   "max_epochs": max_epochs, "amplitude_scale": float(amplitude_scale)})
        self.model = DiffractionToObject(ModelConfig.from_dict(model_config), probe, amplitude_scale)
        if self.model.refiner is not None:  # trained afterwards, over whole windows (model.refiner_training)
            self.model.refiner.requires_grad_(False)
        self.register_buffer("good_pixels", good_pixels if good_pixels is not None else torch.ones(0, dtype=torch.bool))
        bank = probes.to(torch.complex64) if probes is not None else torch.zeros(0, dtype=torch.complex64)
        self.register_buffer("probes", bank)

    def _mask(self) -> torch.Tensor | None:
        return self.good_pixels if self.good_pixels.numel() else None

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        amplitude, offsets, probe_index = batch[0], batch[1], batch[2]
        target = batch[3] if len(batch) > 3 else None
        probe = self.probes[probe_index][:, None] if self.probes.numel() else None  # (B, 1, N, N): each group's own
        loss, _ = physics_step(self.model, amplitude, offsets, self.hparams.loss_kind, self._mask(), target, probe)
        # sync_dist: epoch means are reduced across processes under DDP (a no-op on one).
        self.log(f"{stage}_loss", loss, prog_bar=True, on_epoch=True, on_step=False, batch_size=amplitude.shape[0],
                 sync_dist=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.model.generator.parameters(), lr=self.hparams.learning_rate,
                                weight_decay=self.hparams.weight_decay)
        if self.hparams.lr_schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.hparams.max_epochs),
                                                               eta_min=self.hparams.learning_rate * 0.02)
        elif self.hparams.lr_schedule == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=2)
        else:
            sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
        # "name": Lightning's LearningRateMonitor logs the rate as the metric "lr".
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch", "name": "lr",
                                                   "monitor": "val_loss"}}
