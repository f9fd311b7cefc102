"""Bugs found while layering the package (issue 8), each with the test that failed before its fix."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ptycho_ml.cli import main
from ptycho_ml.config import InferenceConfig, ModelConfig
from ptycho_ml.data import ScanData, load_scan
from ptycho_ml.data.ptychodus import npz_to_ptychodus
from ptycho_ml.data.ptychopinn import write_ptychopinn
from ptycho_ml.errors import PtychoInputError
from ptycho_ml.inference.reconstruct import reconstruct
from ptycho_ml.model.bundle import read_bundle, write_bundle
from ptycho_ml.model.bundle_io import load_model_bundle, save_model_bundle
from ptycho_ml.model.network import DiffractionToObject

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def runner():
    return CliRunner()


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory, tiny_scan) -> Path:
    """An untrained tiny model on the tiny scan's probe: enough to run inference paths."""
    model = DiffractionToObject(ModelConfig(preset="tiny", N=32, gridsize=1), torch.from_numpy(tiny_scan.probe),
                                float(np.sqrt(np.mean(tiny_scan.amplitude.astype(np.float64) ** 2))))
    return save_model_bundle(model, tmp_path_factory.mktemp("bundle") / "wts.h5.zip")


# 1. convert --to npz wrote bad_pixels, but the NPZ reader ignored them.

def test_bad_pixels_survive_convert_to_npz_and_mask_the_data(runner, tiny_scan, tmp_path):
    N = tiny_scan.probe.shape[-1]
    bad = np.zeros((N, N), bool)
    bad[3, 5] = bad[N // 2, N // 2 + 1] = True
    scan = ScanData(tiny_scan.amplitude, tiny_scan.probe, tiny_scan.positions_px, tiny_scan.obj.shape,
                    tiny_scan.obj, bad, {}, "tiny")
    npz_to_ptychodus(scan, tmp_path / "pair")
    out = tmp_path / "back.npz"
    result = runner.invoke(main, ["convert", "--input", str(tmp_path / "pair" / "diffraction.h5"), "--to", "npz",
                                  "--out", str(out)])
    assert result.exit_code == 0, result.output
    back = load_scan(out)
    np.testing.assert_array_equal(back.bad_pixels, bad)
    assert not back.good_pixels[3, 5] and back.good_pixels.sum() == N * N - 2


def test_npz_bad_pixels_of_the_wrong_shape_are_a_one_line_error(tiny_scan, tmp_path):
    path = write_ptychopinn(tmp_path / "s.npz", amplitude=tiny_scan.amplitude, probe=tiny_scan.probe,
                            positions_px=tiny_scan.positions_px, bad_pixels=np.zeros((3, 3), bool))
    with pytest.raises(PtychoInputError, match=r"s\.npz: field 'bad_pixels': found shape \(3, 3\), expected \(32, 32\)"):
        load_scan(path)


# 2. train --config FILE: flag defaults overrode the file's values.

def test_config_file_values_win_over_flag_defaults_and_typed_flags_win_over_the_file(runner, tiny_npz, tmp_path):
    cfg = tmp_path / "cfg.json"
    file_out = tmp_path / "from_file"
    cfg.write_text(json.dumps({"seed": 7, "threads": 1, "accelerator": "cpu", "output_dir": str(file_out),
                               "quiet": True, "epochs": 1, "model": {"preset": "tiny", "gridsize": 1}}))
    result = runner.invoke(main, ["train", "--config", str(cfg), "--data", str(tiny_npz)])
    assert result.exit_code == 0, result.output
    training = read_bundle(file_out / "wts.h5.zip").config["training"]
    assert (training["seed"], training["threads"], training["accelerator"], training["quiet"]) == (7, 1, "cpu", True)
    assert (training["model"]["preset"], training["model"]["gridsize"]) == ("tiny", 1)
    assert training["output_dir"] == str(file_out)

    typed_out = tmp_path / "typed"
    result = runner.invoke(main, ["train", "--config", str(cfg), "--data", str(tiny_npz), "--seed", "3",
                                  "--gridsize", "2", "--out", str(typed_out)])
    assert result.exit_code == 0, result.output
    training = read_bundle(typed_out / "wts.h5.zip").config["training"]
    assert (training["seed"], training["model"]["gridsize"], training["model"]["preset"]) == (3, 2, "tiny")
    assert training["threads"] == 1 and not (file_out / "checkpoints" / "last-v1.ckpt").exists()


# 3. Positions spread over ~1e11 px made reconstruct allocate terabytes and die with a traceback.

def test_positions_too_far_apart_are_refused_before_any_allocation(runner, tiny_scan, tiny_bundle, tmp_path):
    positions = tiny_scan.positions_px.copy()
    positions[-1] = (1e11, 16.0)
    path = write_ptychopinn(tmp_path / "far.npz", amplitude=tiny_scan.amplitude, probe=tiny_scan.probe,
                            positions_px=positions)
    out = tmp_path / "recon"
    result = runner.invoke(main, ["reconstruct", "--bundle", str(tiny_bundle), "--data", str(path), "--out", str(out),
                                  "--quiet"])
    line = _one_line_error(result)
    assert "far.npz: field 'xcoords/ycoords'" in line and "object canvas" in line
    assert re.search(r"expected at most \d+ pixels", line) and "PTYCHO_ML_MAX_CANVAS_PIXELS" in line
    assert not out.exists()


def test_the_canvas_limit_is_a_stated_setting(tiny_scan, tiny_bundle, monkeypatch):
    model, _ = load_model_bundle(tiny_bundle)
    scan = ScanData(tiny_scan.amplitude, tiny_scan.probe, tiny_scan.positions_px, tiny_scan.obj.shape)
    monkeypatch.setenv("PTYCHO_ML_MAX_CANVAS_PIXELS", str(scan.obj_shape[0] * scan.obj_shape[1] - 1))
    with pytest.raises(PtychoInputError, match="expected at most"):
        reconstruct(model, scan, InferenceConfig(refine_steps=0, progress=False))
    monkeypatch.setenv("PTYCHO_ML_MAX_CANVAS_PIXELS", "lots")
    with pytest.raises(PtychoInputError, match=r"\$PTYCHO_ML_MAX_CANVAS_PIXELS: found 'lots', expected a positive"):
        reconstruct(model, scan, InferenceConfig(refine_steps=0, progress=False))


# 4. A bundle whose weight was removed or reshaped was refused without naming the weight.

def test_a_bundle_missing_a_weight_of_the_architecture_names_it(tiny_bundle, tmp_path):
    model, _ = load_model_bundle(tiny_bundle)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    gone = "generator.stem.bias"
    del state[gone]
    bad = write_bundle(tmp_path / "bad.wts.h5.zip", models={
        "diffraction_to_obj": state, "autoencoder": {k: v.numpy() for k, v in model.generator.state_dict().items()}},
        probe=model.probe.numpy(), amplitude_scale=float(model.amplitude_scale),
        config={"model": model.cfg.to_dict()})
    with pytest.raises(PtychoInputError, match=rf"model 'diffraction_to_obj': found no weight '{re.escape(gone)}', "
                                               rf"expected '{re.escape(gone)}' of shape \[4\]"):
        load_model_bundle(bad)


def test_a_reshaped_weight_of_the_architecture_is_named(tiny_bundle, tmp_path):
    model, _ = load_model_bundle(tiny_bundle)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    state["generator.stem.bias"] = np.zeros(5, np.float32)
    bad = write_bundle(tmp_path / "bad.wts.h5.zip", models={
        "diffraction_to_obj": state, "autoencoder": {k: v.numpy() for k, v in model.generator.state_dict().items()}},
        probe=model.probe.numpy(), amplitude_scale=float(model.amplitude_scale),
        config={"model": model.cfg.to_dict()})
    with pytest.raises(PtychoInputError, match=r"found weight 'generator\.stem\.bias' of shape \[5\], expected shape \[4\]"):
        load_model_bundle(bad)


# 5. The refinement progress bar counted passes in "pattern/s".

def test_refinement_progress_counts_passes(tiny_scan, tiny_bundle, capsys):
    model, _ = load_model_bundle(tiny_bundle)
    scan = ScanData(tiny_scan.amplitude, tiny_scan.probe, tiny_scan.positions_px, tiny_scan.obj.shape)
    reconstruct(model, scan, InferenceConfig(refine_steps=2, progress=True))
    err = capsys.readouterr().err
    refine = [chunk for chunk in re.split(r"[\r\n]", err) if chunk.startswith("refine")]
    assert refine and all("pattern" not in c for c in refine) and any("pass" in c for c in refine)
    network = [chunk for chunk in re.split(r"[\r\n]", err) if chunk.startswith("reconstruct")]
    assert network and any("pattern" in c for c in network)


# 6. The README quoted a main-job time nobody measured.

def test_readme_quotes_the_measured_main_job_time():
    readme = (ROOT / "README.md").read_text()
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text()
    assert "22 minutes" not in readme
    quoted = re.search(r"`mlflow run \. -P backend=torch` took (\d+) s", readme)
    assert quoted, "README must quote the measured time of the main job"
    assert f"{quoted.group(1)} s" in benchmarks and "mlflow run . -P backend=torch" in benchmarks
