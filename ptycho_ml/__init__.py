"""ptycho_ml: physics-informed neural-network ptychographic reconstruction on MLflow.

The public API, importable from the package itself::

    from ptycho_ml import TrainingConfig, train, load_scan, load_model_bundle, reconstruct

Names are resolved on first use, so ``import ptycho_ml`` (and ``ptycho-ml --help``)
stays light: torch, Lightning and MLflow load only when something needs them.
The layers behind these names are described in docs/architecture.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ptycho_ml.version import __version__

# public name -> module that defines it
_API = {
    "train": "ptycho_ml.lifecycle.training",
    "TrainResult": "ptycho_ml.lifecycle.training",
    "reconstruct": "ptycho_ml.inference.reconstruct",
    "ReconstructionResult": "ptycho_ml.inference.reconstruct",
    "run_reconstruction": "ptycho_ml.inference.outputs",
    "evaluate_model": "ptycho_ml.inference.evaluate",
    "load_scan": "ptycho_ml.data.readers",
    "ScanData": "ptycho_ml.data.scan",
    "load_model_bundle": "ptycho_ml.model.bundle_io",
    "save_model_bundle": "ptycho_ml.model.bundle_io",
    "DiffractionToObject": "ptycho_ml.model.network",
    "TrainingConfig": "ptycho_ml.config",
    "InferenceConfig": "ptycho_ml.config",
    "ModelConfig": "ptycho_ml.config",
    "SimulationConfig": "ptycho_ml.config",
    "PtychoInputError": "ptycho_ml.errors",
    # a client of a served model
    "to_json_payload": "ptycho_ml.lifecycle.serving_client",
    "to_parquet_payload": "ptycho_ml.lifecycle.serving_client",
    "decode_predictions": "ptycho_ml.lifecycle.serving_client",
    "reconstruct_remote": "ptycho_ml.lifecycle.serving_client",
}

__all__ = [  # the names of _API
    "__version__", "train", "TrainResult", "reconstruct", "ReconstructionResult", "run_reconstruction",
    "evaluate_model", "load_scan", "ScanData", "load_model_bundle", "save_model_bundle", "DiffractionToObject",
    "TrainingConfig", "InferenceConfig", "ModelConfig", "SimulationConfig", "PtychoInputError",
    "to_json_payload", "to_parquet_payload", "decode_predictions", "reconstruct_remote",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from ptycho_ml.config import InferenceConfig, ModelConfig, SimulationConfig, TrainingConfig
    from ptycho_ml.data.readers import load_scan
    from ptycho_ml.data.scan import ScanData
    from ptycho_ml.errors import PtychoInputError
    from ptycho_ml.inference.evaluate import evaluate_model
    from ptycho_ml.inference.outputs import run_reconstruction
    from ptycho_ml.inference.reconstruct import ReconstructionResult, reconstruct
    from ptycho_ml.lifecycle.serving_client import (decode_predictions, reconstruct_remote, to_json_payload,
                                                    to_parquet_payload)
    from ptycho_ml.lifecycle.training import TrainResult, train
    from ptycho_ml.model.bundle_io import load_model_bundle, save_model_bundle
    from ptycho_ml.model.network import DiffractionToObject


def __getattr__(name: str) -> Any:
    if name in _API:
        value = getattr(importlib.import_module(_API[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ptycho_ml' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
