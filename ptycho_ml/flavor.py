"""The ``ptycho_ml`` MLflow flavour, shaped like MLflow's own flavour modules.

The model data is the ``wts.h5.zip`` bundle (:mod:`ptycho_ml.model.bundle`); the
package's own code travels with the model (``code_paths``) so that a fresh
serving environment can import it. ``load_model`` returns the native torch
module; ``_load_pyfunc`` wraps it for ``mlflow.pyfunc`` and ``mlflow models serve``.

Pyfunc input: ``{"diffraction": float32 (B, N, N) amplitude, "positions":
float32 (B, 2) (x, y) patch centres in object pixels}``, as JSON (``inputs``)
or, compactly, as a Parquet DataFrame whose ``diffraction`` column holds each
frame flattened (MLflow reshapes it by the signature). Params: ``output``
(``object`` | ``patches``), ``refine_steps`` (default 0, for latency),
``obj_height``/``obj_width`` (default: just big enough for the positions),
``refine_probe``, ``refine_positions``, ``refine_intensity`` (default false),
``probe_modes`` (default 1), ``probe_support_px`` (default 0),
``refine_auto`` (default true), ``phase_gain`` (default 4), ``variance_reduction`` (default true) and
``misfit_step_gain`` (default 3),
as ``ptycho-ml reconstruct``'s flags.
Output: ``{"amplitude", "phase"}`` arrays of the stitched object ``(H, W)``
or of the patches ``(B, N, N)``, beside them the strings that name the model
(``bundle_sha256``, and ``run_id`` when its ``MLmodel`` records one;
:data:`RESPONSE_PROVENANCE`).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from mlflow import pyfunc
from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.models.utils import _save_example
from mlflow.tracking.artifact_utils import _download_artifact_from_uri
from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _mlflow_conda_env,
    _process_conda_env,
    _process_pip_requirements,
    _PythonEnv,
    _validate_env_arguments,
)
from mlflow.utils.file_utils import write_to
from mlflow.utils.requirements_utils import _get_pinned_requirement
from mlflow.utils.model_utils import (
    _add_code_from_conf_to_system_path,
    _get_flavor_configuration,
    _validate_and_copy_code_paths,
    _validate_and_prepare_target_save_path,
)

FLAVOR_NAME = "ptycho_ml"
BUNDLE_NAME = "wts.h5.zip"
_DATA_SUBPATH = "data"
# Runtime packages the pyfunc path imports (torch first: it is the heavy one).
_RUNTIME_PACKAGES = ("torch", "numpy", "h5py", "scipy", "scikit-image", "tqdm", "lightning")


def get_default_pip_requirements() -> list[str]:
    """Pinned requirements of a served ptycho_ml model (MLflow itself is added by MLflow).

    MLflow's own pinning drops local version labels (``torch==2.13.0``, not ``2.13.0+cpu``).
    """
    return [_get_pinned_requirement(p) for p in _RUNTIME_PACKAGES]


def get_default_conda_env() -> dict:
    return _mlflow_conda_env(additional_pip_deps=get_default_pip_requirements())


#: MLflow's param type of each Python type an :class:`~ptycho_ml.config.InferenceConfig` refinement field has.
_PARAM_TYPES = {bool: "boolean", int: "long", float: "double"}


def model_signature(N: int) -> ModelSignature:
    """Tensor signature: diffraction ``(-1, N, N)`` and positions ``(-1, 2)`` float32, plus params (the
    refinement ones with :class:`~ptycho_ml.config.InferenceConfig`'s defaults, from the one place they are set)."""
    from ptycho_ml.config import REFINEMENT_FIELDS, InferenceConfig

    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, N, N), "diffraction"),
                     TensorSpec(np.dtype(np.float32), (-1, 2), "positions")])
    defaults = InferenceConfig()
    refinement = [ParamSpec(k, _PARAM_TYPES[type(getattr(defaults, k))], getattr(defaults, k)) for k in REFINEMENT_FIELDS]
    params = ParamSchema([ParamSpec("output", "string", "object"), ParamSpec("refine_steps", "long", 0),
                          ParamSpec("obj_height", "long", 0), ParamSpec("obj_width", "long", 0), *refinement])
    return ModelSignature(inputs=inputs, params=params)


def default_input_example(model) -> dict[str, np.ndarray]:
    """A real one-frame example: the diffraction of a uniform object under the model's own probe."""
    import torch

    from ptycho_ml.physics import forward as physics

    N = model.cfg.N
    with torch.no_grad():
        amplitude = physics.far_field_amplitude(model.probe, torch.ones(1, N, N, dtype=torch.complex64))
    return {"diffraction": amplitude.numpy().astype(np.float32), "positions": np.array([[N / 2, N / 2]], np.float32)}


def _package_dir() -> str:
    return str(Path(__file__).resolve().parent)


def save_model(model, path, conda_env=None, code_paths=None, mlflow_model=None, signature=None,
               input_example=None, pip_requirements=None, extra_pip_requirements=None, metadata=None,
               bundle_extra: dict | None = None):
    """Save a ptycho_ml model (a :class:`~ptycho_ml.model.network.DiffractionToObject` or a bundle path) as an MLflow model at ``path``."""
    from ptycho_ml.model.bundle_io import load_model_bundle, save_model_bundle
    from ptycho_ml.model.network import DiffractionToObject

    _validate_env_arguments(conda_env, pip_requirements, extra_pip_requirements)
    path = os.path.abspath(path)
    _validate_and_prepare_target_save_path(path)
    # The package travels with the model so a fresh environment can import it.
    code_dir_subpath = _validate_and_copy_code_paths(list(code_paths or [_package_dir()]), path)
    data_dir = os.path.join(path, _DATA_SUBPATH)
    os.makedirs(data_dir)
    bundle_path = os.path.join(data_dir, BUNDLE_NAME)
    if isinstance(model, DiffractionToObject):
        save_model_bundle(model, bundle_path, extra=bundle_extra)
    else:  # a bundle file: verify it fully before copying
        source = str(model)
        model = load_model_bundle(source)[0]
        shutil.copyfile(source, bundle_path)

    if mlflow_model is None:
        mlflow_model = Model()
    _save_example(mlflow_model, input_example if input_example is not None else default_input_example(model), path)
    mlflow_model.signature = signature or model_signature(model.cfg.N)
    if metadata is not None:
        mlflow_model.metadata = metadata
    from ptycho_ml.version import __version__

    pyfunc.add_to_model(mlflow_model, loader_module="ptycho_ml.flavor", data=_DATA_SUBPATH,
                        code=code_dir_subpath, conda_env=_CONDA_ENV_FILE_NAME, python_env=_PYTHON_ENV_FILE_NAME)
    mlflow_model.add_flavor(FLAVOR_NAME, bundle=f"{_DATA_SUBPATH}/{BUNDLE_NAME}", ptycho_ml_version=__version__,
                            torch_version=_get_pinned_requirement("torch").split("==")[1], backend="torch", code=code_dir_subpath)
    mlflow_model.save(os.path.join(path, MLMODEL_FILE_NAME))

    if conda_env is None:
        default_reqs = get_default_pip_requirements() if pip_requirements is None else None
        conda_env, pip_requirements, pip_constraints = _process_pip_requirements(
            default_reqs, pip_requirements, extra_pip_requirements)
    else:
        conda_env, pip_requirements, pip_constraints = _process_conda_env(conda_env)
    with open(os.path.join(path, _CONDA_ENV_FILE_NAME), "w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if pip_constraints:
        write_to(os.path.join(path, _CONSTRAINTS_FILE_NAME), "\n".join(pip_constraints))
    write_to(os.path.join(path, _REQUIREMENTS_FILE_NAME), "\n".join(pip_requirements))
    _PythonEnv.current().to_yaml(os.path.join(path, _PYTHON_ENV_FILE_NAME))


def log_model(model, name: str = "model", registered_model_name: str | None = None, signature=None,
              input_example=None, conda_env=None, code_paths=None, pip_requirements=None,
              extra_pip_requirements=None, metadata=None, bundle_extra: dict | None = None, **kwargs):
    """Log a ptycho_ml model to the active run (and optionally register it). Returns MLflow's ``ModelInfo``."""
    return Model.log(artifact_path=None, name=name, flavor=sys.modules[__name__],
                     registered_model_name=registered_model_name, model=model, signature=signature,
                     input_example=input_example, conda_env=conda_env, code_paths=code_paths,
                     pip_requirements=pip_requirements, extra_pip_requirements=extra_pip_requirements,
                     metadata=metadata, bundle_extra=bundle_extra, **kwargs)


def _bundle_path(local_model_path: str) -> str:
    conf = _get_flavor_configuration(model_path=local_model_path, flavor_name=FLAVOR_NAME)
    _add_code_from_conf_to_system_path(local_model_path, conf)
    return os.path.join(local_model_path, conf["bundle"])


def local_bundle(model_uri: str, dst_path: str | None = None) -> str:
    """Download an MLflow model (any URI) and return the local path of its ``wts.h5.zip``."""
    local = _download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path)
    return _bundle_path(local)


def load_model(model_uri: str, dst_path: str | None = None):
    """Load the native torch model (:class:`~ptycho_ml.model.network.DiffractionToObject`, eval mode) from any MLflow model URI."""
    from ptycho_ml.model.bundle_io import load_model_bundle

    return load_model_bundle(local_bundle(model_uri, dst_path))[0]


def _load_pyfunc(path: str, model_config: dict | None = None):
    """Called by ``mlflow.pyfunc.load_model``: ``path`` is the model's ``data`` directory.

    What the responses name: the bundle's sha256, and the run the model was
    logged from when the model's ``MLmodel`` (beside ``data``) records one.
    """
    from ptycho_ml.data.storage import file_sha256
    from ptycho_ml.model.bundle_io import load_model_bundle

    bundle = os.path.join(path, BUNDLE_NAME) if os.path.isdir(path) else path
    provenance = {"bundle_sha256": file_sha256(bundle)}
    mlmodel = os.path.join(os.path.dirname(os.path.abspath(path)), MLMODEL_FILE_NAME)
    if os.path.isdir(path) and os.path.isfile(mlmodel):
        provenance["run_id"] = Model.load(mlmodel).run_id  # None for a model saved outside a run: left out
    return PtychoPyfuncModel(load_model_bundle(bundle)[0], provenance)


def _bad_request(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


#: What a response says about the model that answered, under the same names as ``ptycho-ml serve``'s
#: ``X-Ptycho-Model-*`` headers (the provenance keys of :func:`ptycho_ml.lifecycle.registry.load_model_with_provenance`).
RESPONSE_PROVENANCE = ("name", "version", "run_id", "bundle_sha256")


class PtychoPyfuncModel:
    """pyfunc wrapper over :func:`ptycho_ml.inference.reconstruct.reconstruct` (shared with the batch CLI).

    ``provenance``: the known ones of :data:`RESPONSE_PROVENANCE` (others and
    empty values are dropped); every prediction carries them as strings
    beside its arrays.
    """

    def __init__(self, model, provenance: dict[str, Any] | None = None):
        self.model = model
        self.provenance = {k: str(provenance[k]) for k in RESPONSE_PROVENANCE if (provenance or {}).get(k)}

    def get_raw_model(self):
        return self.model

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> dict[str, np.ndarray | str]:
        """``{"amplitude", "phase"}`` float32 arrays and the model's :attr:`provenance` strings."""
        return {**self._arrays(data, params), **self.provenance}

    def _arrays(self, data: Any, params: dict[str, Any] | None) -> dict[str, np.ndarray]:
        from ptycho_ml.config import REFINEMENT_FIELDS, InferenceConfig
        from ptycho_ml.errors import PtychoInputError
        from ptycho_ml.inference.reconstruct import predict_patches, reconstruct

        params = dict(params or {})
        output = params.get("output", "object")
        if output not in ("object", "patches"):
            raise _bad_request(f"params.output: found {output!r}, expected 'object' or 'patches'")
        diffraction, positions = self._validated_arrays(data)
        try:
            if output == "patches":
                import torch

                patches = predict_patches(self.model, torch.from_numpy(diffraction), positions).numpy()
                return {"amplitude": np.abs(patches).astype(np.float32), "phase": np.angle(patches).astype(np.float32)}
            scan = self._scan(diffraction, positions, int(params.get("obj_height") or 0), int(params.get("obj_width") or 0))
            cfg = InferenceConfig.from_dict({"refine_steps": int(params.get("refine_steps") or 0), "progress": False,
                                             **{k: params[k] for k in REFINEMENT_FIELDS if params.get(k) is not None}})
            obj = reconstruct(self.model, scan, cfg).obj
        except PtychoInputError as exc:
            raise _bad_request(str(exc)) from None
        return {"amplitude": np.abs(obj).astype(np.float32), "phase": np.angle(obj).astype(np.float32)}

    def _validated_arrays(self, data: Any) -> tuple[np.ndarray, np.ndarray]:
        N = self.model.cfg.N
        if not isinstance(data, dict) or "diffraction" not in data or "positions" not in data:
            found = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise _bad_request(f"input: found {found}, expected a dict with 'diffraction' ({N}x{N} frames) and 'positions'")
        diffraction, positions = np.asarray(data["diffraction"]), np.asarray(data["positions"])
        if diffraction.dtype != np.float32 or diffraction.ndim != 3 or diffraction.shape[1:] != (N, N):
            raise _bad_request(f"input 'diffraction': found {diffraction.dtype} {diffraction.shape}, expected float32 (B, {N}, {N}) amplitudes")
        if positions.dtype != np.float32 or positions.shape != (len(diffraction), 2):
            raise _bad_request(f"input 'positions': found {positions.dtype} {positions.shape}, expected float32 ({len(diffraction)}, 2) (x, y) in pixels")
        if len(diffraction) == 0:
            raise _bad_request("input 'diffraction': found 0 frames, expected at least one")
        if not (np.isfinite(diffraction).all() and np.isfinite(positions).all()):
            raise _bad_request("input: found NaN or Inf values, expected finite diffraction and positions")
        if (diffraction < 0).any():
            raise _bad_request("input 'diffraction': found negative values, expected amplitudes >= 0 (sqrt of counts)")
        return diffraction, positions

    def _scan(self, diffraction: np.ndarray, positions: np.ndarray, height: int, width: int):
        from ptycho_ml.data.scan import ScanData, check_positions_inside, derive_obj_shape

        N = self.model.cfg.N
        positions = positions.astype(np.float64)
        obj_shape = (height, width) if height and width else derive_obj_shape(positions, N)
        check_positions_inside(positions, N, obj_shape, "request")
        return ScanData(diffraction, self.model.probe.numpy(), positions, obj_shape, source="request")
