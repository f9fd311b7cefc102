"""Files written before the package was layered still work: bundles without weight shapes, and
MLflow models logged by the flat package (their MLmodel names ``ptycho_ml.flavor``, their code/ the old layout)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ptycho_ml.config import InferenceConfig, ModelConfig
from ptycho_ml.data import ScanData
from ptycho_ml.inference.reconstruct import reconstruct
from ptycho_ml.model.bundle_io import load_model_bundle, save_model_bundle
from ptycho_ml.model.network import DiffractionToObject

ROOT = Path(__file__).resolve().parents[1]
#: The last commit of the flat package (before docs/architecture.md's layers).
FLAT_PACKAGE_COMMIT = "9a0a35d"


def _tiny_model(tiny_scan) -> DiffractionToObject:
    torch.manual_seed(0)
    # No learned refinement stages: the flat package predates them, and a model without them is what it reads.
    model = DiffractionToObject(ModelConfig(preset="tiny", N=32, gridsize=1, refiner_stages=0), torch.from_numpy(tiny_scan.probe),
                                float(np.sqrt(np.mean(tiny_scan.amplitude.astype(np.float64) ** 2))))
    with torch.no_grad():  # non-zero heads, so the output depends on every weight
        for p in model.generator.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model.eval()


def test_a_bundle_whose_manifest_has_counts_only_still_loads(tiny_scan, tmp_path):
    """Manifests written before weight shapes were recorded carry only n_arrays/n_values."""
    model = _tiny_model(tiny_scan)
    new = save_model_bundle(model, tmp_path / "new.wts.h5.zip")
    with zipfile.ZipFile(new) as zf:
        manifest, weights = json.loads(zf.read("manifest.json")), zf.read("wts.h5")
    del manifest["shapes"]
    old = tmp_path / "old.wts.h5.zip"
    with zipfile.ZipFile(old, "w") as zf:
        zf.writestr("manifest.json", json.dumps(manifest))
        zf.writestr("wts.h5", weights)
    loaded, _ = load_model_bundle(old)
    amp = torch.rand(2, 1, 32, 32) * 30
    with torch.no_grad():
        assert torch.equal(loaded(amp), model(amp))


def _flat_package(tmp_path: Path) -> Path:
    if subprocess.run(["git", "-C", str(ROOT), "cat-file", "-e", f"{FLAT_PACKAGE_COMMIT}^{{commit}}"],
                      capture_output=True).returncode != 0:
        pytest.skip(f"this checkout has no history back to {FLAT_PACKAGE_COMMIT}")
    old = tmp_path / "flat"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", FLAT_PACKAGE_COMMIT, "ptycho_ml"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    assert (old / "ptycho_ml" / "network.py").is_file()  # the flat layout
    return old


#: Run by the flat package: build the same tiny model as _tiny_model, log it with the old flavour,
#: and read a bundle written by the layered package with the old loader.
OLD_SIDE = """
import sys
import numpy as np, torch
from ptycho_ml import flavor
from ptycho_ml.config import ModelConfig
from ptycho_ml.model_io import load_model_bundle
from ptycho_ml.network import DiffractionToObject
assert flavor.__file__.startswith(sys.argv[1]), flavor.__file__
probe, scale, model_dir, new_bundle = np.load(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
torch.manual_seed(0)
model = DiffractionToObject(ModelConfig(preset="tiny", N=32, gridsize=1), torch.from_numpy(probe), scale)
with torch.no_grad():
    for p in model.generator.parameters():
        p.add_(0.01 * torch.randn_like(p))
flavor.save_model(model.eval(), model_dir)
read_back, _ = load_model_bundle(new_bundle)
amp = torch.from_numpy(np.load(sys.argv[6]))
with torch.no_grad():
    np.save(sys.argv[7], read_back(amp).numpy())
"""


@pytest.mark.slow
def test_a_model_logged_by_the_flat_package_loads_and_predicts_the_same(tiny_scan, tmp_path):
    import mlflow

    from ptycho_ml.lifecycle.registry import load_native_model

    old = _flat_package(tmp_path)
    model = _tiny_model(tiny_scan)
    new_bundle = save_model_bundle(model, tmp_path / "new.wts.h5.zip")
    amp = (torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1)) * 30).numpy()
    np.save(tmp_path / "probe.npy", tiny_scan.probe)
    np.save(tmp_path / "amp.npy", amp)
    model_dir = tmp_path / "logged"
    args = [str(old), str(tmp_path / "probe.npy"), repr(float(model.amplitude_scale)), str(model_dir),
            str(new_bundle), str(tmp_path / "amp.npy"), str(tmp_path / "old_reads_new.npy")]
    env = {**os.environ, "PYTHONPATH": str(old)}
    proc = subprocess.run([sys.executable, "-c", OLD_SIDE, *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (model_dir / "code" / "ptycho_ml" / "network.py").is_file()  # it carries the flat package
    with torch.no_grad():
        expected = model(torch.from_numpy(amp))
    # the flat package reads a bundle the layered one wrote (another process: float32 rounding may differ)
    np.testing.assert_allclose(np.load(tmp_path / "old_reads_new.npy"), expected.numpy(), rtol=1e-5, atol=1e-6)

    native = load_native_model(str(model_dir))  # the layered package reads the old model
    with torch.no_grad():
        assert torch.equal(native(torch.from_numpy(amp)), expected)
    served = mlflow.pyfunc.load_model(str(model_dir))
    frames = tiny_scan.amplitude[:8].astype(np.float32)
    positions = tiny_scan.positions_px[:8].astype(np.float32)
    out = served.predict({"diffraction": frames, "positions": positions})
    scan = ScanData(frames, tiny_scan.probe, positions.astype(np.float64), out["amplitude"].shape)
    reference = reconstruct(model, scan, InferenceConfig(refine_steps=0, progress=False)).obj
    np.testing.assert_allclose(out["amplitude"], np.abs(reference), rtol=1e-5, atol=1e-6)
