"""The ptycho-ml command line: help, version, one-line errors, and simulate -> train -> reconstruct -> evaluate."""

import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from ptycho_ml import __version__
from ptycho_ml.cli import main

COMMANDS = ["simulate", "train", "reconstruct", "evaluate", "inspect", "promote", "models", "convert"]


@pytest.fixture
def runner():
    return CliRunner()


def test_version(runner):
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(runner, command):
    result = runner.invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_simulate_writes_train_and_test(runner, tmp_path):
    result = runner.invoke(main, ["simulate", "--out", str(tmp_path), "--N", "32", "--seed", "1"])
    assert result.exit_code == 0, result.output
    for name in ("train", "test"):
        with np.load(tmp_path / f"{name}.npz") as f:
            assert f["diffraction"].shape[1:] == (32, 32) and "objectGuess" in f


def test_bad_input_is_one_line_with_exit_2_and_debug_shows_the_traceback(runner, tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_text("not a scan")
    result = runner.invoke(main, ["evaluate", "--reconstruction", str(bad), "--data", str(bad)])
    assert result.exit_code == 2
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "bad.npz" in lines[0]
    debug = runner.invoke(main, ["--debug", "evaluate", "--reconstruction", str(bad), "--data", str(bad)])
    assert debug.exit_code != 0 and debug.exception is not None


def test_reconstruct_without_a_model_is_a_clear_error(runner, tiny_npz, tmp_path):
    result = runner.invoke(main, ["reconstruct", "--data", str(tiny_npz), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "no model given" in result.output
    assert not (tmp_path / "o").exists()


def test_unknown_config_key_is_rejected(runner, tmp_path, tiny_npz):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"epoch": 3}))
    result = runner.invoke(main, ["train", "--data", str(tiny_npz), "--config", str(cfg)])
    assert result.exit_code == 2 and "unknown key(s) ['epoch']" in result.output


def test_end_to_end_train_reconstruct_evaluate(runner, tmp_path, tiny_npz, tiny_test_npz):
    out = tmp_path / "train"
    result = runner.invoke(main, ["train", "--data", str(tiny_npz), "--test-data", str(tiny_test_npz), "--out", str(out),
                                  "--preset", "tiny", "--epochs", "1", "--threads", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    bundle = out / "wts.h5.zip"
    assert bundle.is_file() and "held-out scan" in result.output

    recon = tmp_path / "recon"
    result = runner.invoke(main, ["reconstruct", "--bundle", str(bundle), "--data", str(tiny_test_npz),
                                  "--out", str(recon), "--refine-steps", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    for name in ("object.h5", "amplitude.png", "phase.png", "product.h5", "summary.json"):
        assert (recon / name).is_file(), name
    with h5py.File(recon / "object.h5") as h5:
        obj = h5["object"][()]
        assert obj.dtype == np.complex64 and np.allclose(np.abs(obj), h5["amplitude"][()])
    assert (recon / "amplitude.png").read_bytes()[:4] == b"\x89PNG"

    metrics_json = tmp_path / "metrics.json"
    result = runner.invoke(main, ["evaluate", "--reconstruction", str(recon / "object.h5"), "--data", str(tiny_test_npz),
                                  "--json", str(metrics_json)])
    assert result.exit_code == 0, result.output
    assert "amplitude" in result.output and "SSIM" in result.output
    metrics = json.loads(metrics_json.read_text())
    assert -1 <= metrics["amplitude_ssim"] <= 1 and metrics["amplitude_psnr"] > 0

    result = runner.invoke(main, ["evaluate", "--bundle", str(bundle), "--data", str(tiny_test_npz), "--refine-steps", "2"])
    assert result.exit_code == 0 and "network" in result.output and "refined" in result.output

    result = runner.invoke(main, ["inspect", str(bundle)])
    assert result.exit_code == 0 and '"diffraction_to_obj"' in result.output


def test_convert_both_ways_and_refuse_to_overwrite(runner, tmp_path, tiny_npz):
    out = tmp_path / "ptychodus"
    result = runner.invoke(main, ["convert", "--input", str(tiny_npz), "--to", "ptychodus", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "diffraction.h5").is_file() and (out / "product.h5").is_file()
    before = (out / "product.h5").read_bytes()
    again = runner.invoke(main, ["convert", "--input", str(tiny_npz), "--to", "ptychodus", "--out", str(out)])
    assert again.exit_code == 2 and "nothing was overwritten" in again.output
    assert (out / "product.h5").read_bytes() == before
    back = tmp_path / "back.npz"
    result = runner.invoke(main, ["convert", "--input", str(out / "diffraction.h5"), "--to", "npz", "--out", str(back)])
    assert result.exit_code == 0, result.output
    with np.load(back) as f, np.load(tiny_npz) as g:
        assert np.allclose(f["diffraction"], g["diffraction"], atol=0.5)
        assert np.allclose(f["xcoords"], g["xcoords"], atol=1e-6)


def test_other_backends_are_rejected_before_any_work(runner, tmp_path):
    out = tmp_path / "never"
    result = runner.invoke(main, ["train", "--mlflow", "--backend", "tensorflow", "--out", str(out)])
    assert result.exit_code == 2
    assert "backend: found 'tensorflow', expected one of the supported backends: torch" in result.output
    assert not out.exists()


def test_mlproject_entry_points_run_the_cli_commands_with_the_same_flag_names():
    """Each MLproject entry point calls `python -m ptycho_ml.cli COMMAND --mlflow`; every {param} is a flag of it."""
    import re
    from pathlib import Path

    import yaml

    project = yaml.safe_load((Path(__file__).resolve().parents[1] / "MLproject").read_text())
    commands = {"main": "train", "simulate": "simulate", "evaluate": "evaluate", "reconstruct": "reconstruct"}
    assert set(project["entry_points"]) == set(commands)
    for entry, spec in project["entry_points"].items():
        command = " ".join(spec["command"].split())
        assert command.startswith(f"python -m ptycho_ml.cli {commands[entry]} --mlflow"), command
        flags = {p.opts[0] for p in main.commands[commands[entry]].params if p.opts[0].startswith("--")}
        for flag, param in re.findall(r"(--[\w-]+) \{(\w+)\}", command):
            assert flag in flags, (entry, flag)
            assert flag.lstrip("-").replace("-", "_") == param or flag == "--N" and param == "N", (entry, flag, param)
        assert set(re.findall(r"\{(\w+)\}", command)) == set(spec["parameters"]), entry


def test_config_params_are_flattened_with_a_prefix():
    from ptycho_ml.config import TrainingConfig
    from ptycho_ml.lifecycle.tracking import flatten_params

    params = flatten_params(TrainingConfig().to_dict())
    assert params["cfg.model.gridsize"] == "2" and params["cfg.epochs"] == "10"
    assert all(k.startswith("cfg.") for k in params)
