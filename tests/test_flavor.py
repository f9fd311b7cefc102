"""The ptycho_ml MLflow flavour: save, load (native and pyfunc), predict equal to the native model."""

import numpy as np
import pytest
import torch
import yaml

from ptycho_ml import flavor
from ptycho_ml.config import InferenceConfig, ModelConfig
from ptycho_ml.data import load_scan
from ptycho_ml.model.network import DiffractionToObject
from ptycho_ml.inference.reconstruct import predict_patches, reconstruct


@pytest.fixture(scope="module", params=[1, 2])
def saved(request, tmp_path_factory, tiny_npz):
    scan = load_scan(tiny_npz)
    torch.manual_seed(request.param)
    model = DiffractionToObject(ModelConfig(preset="tiny", N=32, gridsize=request.param),
                                torch.from_numpy(scan.probe), 10.0).eval()
    with torch.no_grad():  # give the zero-initialised heads real weights, so outputs differ from the physics estimate
        for head in (model.generator.amplitude_head[0], model.generator.phase_head[0]):
            head.weight.normal_(0, 0.05)
    path = tmp_path_factory.mktemp("flavor") / "model"
    flavor.save_model(model, str(path))
    return model, path, scan


def test_mlmodel_lists_both_flavours_signature_and_example(saved):
    _, path, _ = saved
    mlmodel = yaml.safe_load((path / "MLmodel").read_text())
    assert set(mlmodel["flavors"]) == {"ptycho_ml", "python_function"}
    assert mlmodel["flavors"]["ptycho_ml"]["bundle"] == "data/wts.h5.zip"
    assert "diffraction" in mlmodel["signature"]["inputs"] and "refine_steps" in mlmodel["signature"]["params"]
    assert (path / "input_example.json").is_file() and (path / "code" / "ptycho_ml" / "model" / "network.py").is_file()
    requirements = (path / "requirements.txt").read_text().split()
    assert any(r.startswith("torch==") for r in requirements) and not any("+" in r for r in requirements)


def test_native_load_is_bit_identical(saved):
    model, path, _ = saved
    loaded = flavor.load_model(str(path))
    x = torch.rand(2, model.cfg.gridsize**2, 32, 32) * 30
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_pyfunc_predict_equals_the_native_reconstruction(saved):
    import mlflow

    model, path, scan = saved
    pyfunc = mlflow.pyfunc.load_model(str(path))
    diffraction = scan.amplitude(slice(0, len(scan)))
    positions = scan.positions_px.astype(np.float32)
    out = pyfunc.predict({"diffraction": diffraction, "positions": positions}, params={"refine_steps": 2})
    request_scan = type(scan)(diffraction, scan.probe, positions.astype(np.float64), out["amplitude"].shape)
    native = reconstruct(model, request_scan, InferenceConfig(refine_steps=2, progress=False)).obj
    assert np.allclose(out["amplitude"], np.abs(native), atol=1e-5)
    assert np.allclose(out["phase"], np.angle(native), atol=1e-5)

    patches = pyfunc.predict({"diffraction": diffraction, "positions": positions}, params={"output": "patches"})
    expected = predict_patches(model, torch.from_numpy(diffraction), positions).numpy()
    assert patches["amplitude"].shape == diffraction.shape
    assert np.allclose(patches["amplitude"], np.abs(expected), atol=1e-6)


@pytest.mark.parametrize("change, message", [
    (lambda d, p: (d.astype(np.float64), p), "diffraction"),
    (lambda d, p: (d[:, :16, :16].copy(), p), "diffraction"),
    (lambda d, p: (d, p[:-1].copy()), "positions"),
    (lambda d, p: (-d, p), "negative"),
    (lambda d, p: (d, p * 0), "outside the object"),
])
def test_bad_requests_are_clear_errors(saved, change, message):
    import mlflow
    from mlflow.exceptions import MlflowException

    _, path, scan = saved
    pyfunc = mlflow.pyfunc.load_model(str(path))
    d, p = change(scan.amplitude(slice(0, 8)), scan.positions_px[:8].astype(np.float32))
    with pytest.raises(MlflowException, match=message):
        pyfunc.predict({"diffraction": d, "positions": p})


def test_unknown_output_param_is_refused(saved):
    import mlflow
    from mlflow.exceptions import MlflowException

    _, path, scan = saved
    pyfunc = mlflow.pyfunc.load_model(str(path))
    with pytest.raises(MlflowException, match="params.output"):
        pyfunc.predict({"diffraction": scan.amplitude(slice(0, 4)), "positions": scan.positions_px[:4].astype(np.float32)},
                       params={"output": "pictures"})


def test_the_saved_one_frame_input_example_predicts(saved):
    import json

    import mlflow

    _, path, _ = saved
    example = json.loads((path / "input_example.json").read_text())
    inputs = example.get("inputs", example)
    request = {k: np.asarray(v, dtype=np.float32) for k, v in inputs.items()}
    assert request["diffraction"].shape[0] == 1
    out = mlflow.pyfunc.load_model(str(path)).predict(request)
    assert out["amplitude"].ndim == 2 and np.isfinite(out["amplitude"]).all()


def test_predictions_name_the_bundle_sha256_and_the_run_it_was_logged_from(saved, tmp_path, monkeypatch):
    """What plain `mlflow models serve` answers: the pyfunc's output, with the model's names beside the arrays."""
    import hashlib

    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    model, path, scan = saved
    request = {"diffraction": scan.amplitude(slice(0, 4)), "positions": scan.positions_px[:4].astype(np.float32)}
    out = mlflow.pyfunc.load_model(str(path)).predict(request)
    assert out["bundle_sha256"] == hashlib.sha256((path / "data" / "wts.h5.zip").read_bytes()).hexdigest()
    assert "run_id" not in out and "version" not in out  # saved outside a run: nothing known, nothing guessed
    old_uri = tracking_utils._tracking_uri
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        with mlflow.start_run() as run:
            info = flavor.log_model(model, name="model")
        logged = mlflow.pyfunc.load_model(info.model_uri).predict(request)
    finally:
        mlflow.set_tracking_uri(old_uri)
    assert logged["run_id"] == run.info.run_id
    assert len(logged["bundle_sha256"]) == 64 and np.allclose(logged["amplitude"], out["amplitude"], atol=1e-6)
