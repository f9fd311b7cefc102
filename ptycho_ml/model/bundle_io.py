"""Torch model <-> ``wts.h5.zip`` bundle (the bundle itself knows nothing of torch or MLflow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ptycho_ml.model.bundle import read_bundle, weight_mismatch, write_bundle
from ptycho_ml.config import ModelConfig
from ptycho_ml.errors import PtychoInputError
from ptycho_ml.model.network import DiffractionToObject


def _to_numpy(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def save_model_bundle(model: DiffractionToObject, path: str | Path, config: dict[str, Any] | None = None,
                      extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` as a ``wts.h5.zip`` bundle (atomic).

    ``config`` is stored next to the model config under its own keys
    (e.g. ``training``); ``extra`` holds summaries such as metrics.
    """
    model_config = model.cfg.to_dict()
    if not model_config["refiner_stages"]:  # written as before the learned refinement: older readers still load it
        del model_config["refiner_stages"], model_config["refiner_width"]
    full_config = {"model": model_config, **(config or {})}
    models = {"diffraction_to_obj": _to_numpy(model.state_dict()), "autoencoder": _to_numpy(model.generator.state_dict())}
    if model.refiner is not None:  # the learned refinement on its own too, as the generator is ("autoencoder")
        models["refiner"] = _to_numpy(model.refiner.state_dict())
    return write_bundle(
        path,
        models=models,
        probe=model.probe.detach().cpu().numpy(),
        amplitude_scale=float(model.amplitude_scale),
        config=full_config,
        extra=extra or {},
    )


def load_model_bundle(path: str | Path) -> tuple[DiffractionToObject, dict[str, Any]]:
    """Rebuild the inference model from a bundle, loading weights strictly.

    Returns ``(model in eval mode, {"config": ..., "extra": ..., "manifest": ...})``.
    The ``autoencoder`` group must equal the generator inside
    ``diffraction_to_obj``; a bundle where they disagree is rejected.
    """
    from ptycho_ml.data.storage import local_path

    path = local_path(str(path))
    bundle = read_bundle(path)
    if "model" not in bundle.config:
        raise PtychoInputError(f"{path}: field 'config_json.model': missing, expected the model configuration")
    # A model config without refiner_stages was written before the learned refinement existed: it has none.
    cfg = ModelConfig.from_dict({"refiner_stages": 0, **bundle.config["model"]})
    model = DiffractionToObject(cfg, torch.from_numpy(bundle.probe), bundle.amplitude_scale)
    state = {k: torch.from_numpy(np.array(v)) for k, v in bundle.models["diffraction_to_obj"].items()}
    mismatch = weight_mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()},
                               {k: tuple(v.shape) for k, v in state.items()})
    if mismatch:  # name the weight (torch's own message would not)
        raise PtychoInputError(f"{path}: model 'diffraction_to_obj': found {mismatch[0]}, expected {mismatch[1]} "
                               "for the architecture its model config describes")
    model.load_state_dict(state, strict=True)
    parts = {"autoencoder": ("the generator", model.generator),
             "refiner": ("the learned refinement", model.refiner)}
    for name, (what, part) in parts.items():
        stored = bundle.models.get(name)
        if part is None and stored is None:
            continue
        own = {} if part is None else part.state_dict()
        if stored is None or set(stored) != set(own) or any(not np.array_equal(stored[k], own[k].numpy()) for k in own):
            raise PtychoInputError(f"{path}: model '{name}': "
                                   + ("missing" if stored is None else f"differs from {what} inside 'diffraction_to_obj'")
                                   + ", expected identical weights")
    model.eval()
    return model, {"config": bundle.config, "extra": bundle.extra, "manifest": bundle.manifest}
