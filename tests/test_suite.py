"""benchmarks/suite.py: its evaluation-only objects and probes are valid, and a smoke run measures both starts."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ptycho_ml.config import ModelConfig, SimulationConfig
from ptycho_ml.data import load_scan
from ptycho_ml.errors import PtychoInputError
from ptycho_ml.model.bundle_io import save_model_bundle
from ptycho_ml.model.network import DiffractionToObject
from ptycho_ml.physics import simulate

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["suite"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("obj", ["photo-camera", "photo-astronaut", "photo-coins", "text", "chip", "siemens"])
def test_objects_are_complex_with_the_stated_amplitude_and_phase(suite, obj):
    spec = suite.SuiteScan("x", obj=obj, phase_rad=2.5)
    o = suite.make_suite_object(spec, 96, np.random.default_rng(0))
    assert o.shape == (96, 96) and o.dtype == np.complex64
    assert 0.29 <= np.abs(o).min() and np.abs(o).max() <= 1.0 + 1e-6 and np.abs(o).std() > 0.05
    assert np.ptp(np.angle(o)) <= 2.5 + 1e-5 and np.angle(o).std() > 0.1


@pytest.mark.parametrize("probe", ["training", "astigmatic", "gaussian", "speckle"])
def test_probes_carry_the_dose_and_stay_inside_the_window(suite, probe):
    spec = suite.SuiteScan("x", probe=probe, nphotons=1e5, N=64)
    p = suite.make_suite_probe(spec, simulate.default_configs(N=64)["test"], np.random.default_rng(0))
    assert p.shape == (64, 64) and p.dtype == np.complex64
    assert np.sum(np.abs(p) ** 2) == pytest.approx(1e5, rel=1e-4)
    intensity = np.abs(p) ** 2
    edge = np.concatenate([intensity[:4].ravel(), intensity[-4:].ravel(), intensity[:, :4].ravel(), intensity[:, -4:].ravel()])
    assert edge.sum() < 0.02 * intensity.sum()  # compact: the patch edges see little light


def test_photographs_are_not_a_training_family():
    with pytest.raises(PtychoInputError, match="object_families"):
        SimulationConfig(object_families=("camera",))


def test_a_smoke_run_scores_network_and_flat_starts(suite, tmp_path, tiny_scan):
    model = DiffractionToObject(ModelConfig(preset="tiny", N=32, gridsize=1), torch.from_numpy(tiny_scan.probe), 1.0)
    bundle = save_model_bundle(model, tmp_path / "wts.h5.zip")
    spec = suite.SuiteScan("chip-smoke", obj="chip", N=32, nphotons=1e5)
    path = suite.make_scan(spec, tmp_path / "chip.npz")
    assert load_scan(path).obj is not None
    res = suite.evaluate_scan(model, spec, path, (0, 3), None, tmp_path)
    assert [r["passes"] for r in res["network"]] == [0, 3] == [r["passes"] for r in res["flat"]]
    for start in ("network", "flat"):
        k0, k3 = res[start]
        assert k3["seconds"] > k0["seconds"] and (k3["amplitude_psnr"], k3["phase_psnr"]) != (k0["amplitude_psnr"], k0["phase_psnr"])
        assert all(np.isfinite(v) for row in (k0, k3) for v in row.values())
    # the shipped pipeline (network + 30, automatic choice), scored and timed whole
    assert res["default"]["seconds"] > 0 and np.isfinite(res["default"]["amplitude_ssim"])
    assert res["default"]["auto_refinement"]["chosen"] in ("object", "positions", "probe", "probe+positions")
    assert "default" in suite.table([res])
    suite.plot(res, tmp_path / "chip.png")
    assert (tmp_path / "chip.png").read_bytes()[:4] == b"\x89PNG"
    assert "chip-smoke" in suite.table([res])
    # The goal line compares network + K against flat + K' from the same curves (here K = K' = 3: the same runs).
    same = suite.goals([res], warm_passes=3, flat_passes=3).splitlines()[1]
    expected = "met" if res["network"][1]["amplitude_ssim"] >= res["flat"][1]["amplitude_ssim"] - 0.005 and \
        res["network"][1]["phase_ssim"] >= res["flat"][1]["phase_ssim"] - 0.005 else "missed"
    assert same.startswith("chip-smoke") and f": {expected};" in same
    assert "needs K = 8 and 30" in suite.goals([res])
    assert suite.main(["--bundle", str(bundle), "--scans", "text-weak", "--out", str(tmp_path / "o"), "--no-ptychi",
                       "--passes", "0"]) == 0  # N = 64 scan, N = 32 model: skipped with a message, not a crash
    assert json.loads((tmp_path / "o" / "suite.json").read_text())["results"] == []
