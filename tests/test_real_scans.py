"""Real scans: the file's probe and positions are estimates, refined with the object (issue 10).

Tiny seeded scans from the project's simulator (tests/simdata.py) whose file
probe and positions differ from the truth that simulated them
(:mod:`ptycho_ml.physics.scan_errors`).
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ptycho_ml.cli import main
from ptycho_ml.config import REFINEMENT_FIELDS, InferenceConfig, ModelConfig, ScanErrorConfig
from ptycho_ml.data.object_h5 import read_probe_positions
from ptycho_ml.data.ptychopinn import read_true_probe_positions
from ptycho_ml.data.readers import load_scan
from ptycho_ml.data.scan import ScanData
from ptycho_ml.errors import PtychoInputError
from ptycho_ml.inference.reconstruct import check_compatible, check_refinement, reconstruct
from ptycho_ml.model.bundle_io import save_model_bundle
from ptycho_ml.model.network import DiffractionToObject
from ptycho_ml.physics import simulate
from ptycho_ml.physics.forward import intensity_of
from ptycho_ml.physics.refine import (CLEAR_WIN, CONVERGED_RATIO, FIT_RATIO_LIMIT, MISFIT_STEP_GAIN, MISFIT_STEP_RATIO,
                                     NEAR_NOISE_FRACTION, PHASE_GAIN, deviance_ratio, initial_modes, orthogonalise_modes, refine_auto,
                                     refine_joint, refine_object, still_falling, wide_phase, wide_phase_filter)
from ptycho_ml.physics.scan_errors import simulate_with_errors
from simdata import tiny_config
from test_ptychodus import ptychodus_python, run_oracle  # noqa: F401  (the ptychodus venv fixture and oracle runner)


def _scan(sim: simulate.SimulatedScan) -> ScanData:
    return ScanData(sim.amplitude, sim.probe, sim.positions_px, sim.obj.shape, sim.obj, source="<tiny>")


def _flat(sim) -> torch.Tensor:
    return torch.ones(sim.obj.shape, dtype=torch.complex64)


def _rms_px(error: np.ndarray) -> float:
    """RMS position error (px), a common shift removed (it only moves the object)."""
    error = error - error.mean(0)
    return float(np.sqrt((error**2).sum(1).mean()))


def _probe_error(probe: np.ndarray, truth: np.ndarray) -> float:
    """Relative error of the first mode after aligning the global phase."""
    a, b = probe.reshape(-1, *probe.shape[-2:])[0], truth.reshape(-1, *truth.shape[-2:])[0]
    overlap = np.vdot(a, b)
    return float(np.linalg.norm(a * overlap / abs(overlap) - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def defocused():
    return simulate_with_errors(tiny_config(), ScanErrorConfig(defocus_error=0.5))


@pytest.fixture(scope="module")
def jittered():
    return simulate_with_errors(tiny_config(), ScanErrorConfig(position_noise_px=1.0))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """An untrained tiny model on the tiny scan's probe: enough to run every inference path."""
    sim = simulate.simulate_scan(tiny_config())
    model = DiffractionToObject(ModelConfig(preset="tiny", N=32, gridsize=1), torch.from_numpy(sim.probe),
                                float(np.sqrt(np.mean(sim.amplitude.astype(np.float64) ** 2))))
    return save_model_bundle(model, tmp_path_factory.mktemp("bundle") / "wts.h5.zip")


# ----------------------------------------------------------------------------- simulator


def test_simulate_writes_estimates_and_keeps_the_truth(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["simulate", "--out", str(tmp_path), "--N", "32", "--which", "test",
                                  "--defocus-error", "0.2", "--astigmatism", "0.3", "--missing-mode", "0.2",
                                  "--position-noise-px", "0.5", "--position-drift-px", "1"])
    assert result.exit_code == 0, result.output
    path = tmp_path / "test.npz"
    scan = load_scan(path)
    probe_true, positions_true = read_true_probe_positions(str(path))
    assert probe_true.shape == (2, 32, 32) and scan.probe.shape == (32, 32)
    # same photons, different beam: the file probe is the nominal one
    assert np.isclose(intensity_of(torch.from_numpy(probe_true)).sum().item(), float(np.sum(np.abs(scan.probe) ** 2)), rtol=1e-4)
    assert _probe_error(scan.probe, probe_true) > 0.3
    assert np.isclose(np.sum(np.abs(probe_true[1]) ** 2) / np.sum(np.abs(probe_true) ** 2), 0.2, atol=1e-4)
    error = scan.positions_px - positions_true
    assert 0.4 < _rms_px(error) < 2.0 and np.abs(error.mean(0)).max() < 0.05
    assert scan.metadata["scan_errors"]["missing_mode"] == 0.2
    # without errors the simulator writes exactly what it wrote before: no truth keys
    plain = tmp_path / "plain"
    assert runner.invoke(main, ["simulate", "--out", str(plain), "--N", "32", "--which", "test"]).exit_code == 0
    assert read_true_probe_positions(str(plain / "test.npz")) == (None, None)


# ----------------------------------------------------------------------------- physics


def test_refine_joint_with_nothing_else_is_refine_object(jittered):
    scan = _scan(jittered)
    a = refine_object(_flat(jittered), scan, torch.from_numpy(jittered.probe), 3)
    b = refine_joint(_flat(jittered), scan, torch.from_numpy(jittered.probe), 3)
    assert torch.equal(a.obj, b.obj) and a.loss_history == b.loss_history
    np.testing.assert_array_equal(b.positions_px, jittered.positions_px)
    assert torch.equal(b.probe[0], torch.from_numpy(jittered.probe))


def test_a_known_probe_error_is_reduced_and_the_power_kept(defocused):
    scan = _scan(defocused)
    start = torch.from_numpy(defocused.probe)
    fixed = refine_object(_flat(defocused), scan, start, 40)
    result = refine_joint(_flat(defocused), scan, start, 40, refine_probe=True)
    before = _probe_error(defocused.probe, defocused.probe_true)
    after = _probe_error(result.probe.numpy(), defocused.probe_true)
    assert after < 0.75 * before, (before, after)
    assert result.loss_history[-1] < 0.5 * fixed.loss_history[-1]
    power = float(intensity_of(start).sum())
    assert float(intensity_of(result.probe).sum()) == pytest.approx(power, rel=1e-4)


def test_known_position_offsets_are_recovered(jittered):
    scan = _scan(jittered)
    result = refine_joint(_flat(jittered), scan, torch.from_numpy(jittered.probe), 40, refine_positions=True)
    before = _rms_px(jittered.positions_px - jittered.positions_true_px)
    after = _rms_px(result.positions_px - jittered.positions_true_px)
    assert after < 0.4 * before, (before, after)
    correction = result.positions_px - jittered.positions_px
    assert np.abs(correction.mean(0)).max() < 1e-3  # no common shift
    assert np.linalg.norm(correction, axis=1).max() <= 32 / 8 + 1e-6  # the default bound, N/8


def test_position_corrections_respect_the_bound(jittered):
    scan = _scan(jittered)
    result = refine_joint(_flat(jittered), scan, torch.from_numpy(jittered.probe), 12, refine_positions=True,
                          positions_start=2, max_position_correction_px=0.3)
    correction = result.positions_px - jittered.positions_px
    assert np.linalg.norm(correction, axis=1).max() <= 0.3 + 1e-5
    assert np.linalg.norm(correction, axis=1).max() > 0.1  # it did move


def test_probe_modes_are_orthogonal_and_keep_the_power(defocused):
    scan = _scan(defocused)
    start = torch.from_numpy(defocused.probe)
    result = refine_joint(_flat(defocused), scan, start, 12, refine_probe=True, probe_modes=3)
    modes = result.probe.reshape(3, -1).to(torch.complex128)
    gram = modes.conj() @ modes.T
    off = gram - torch.diag(torch.diagonal(gram))
    assert float(off.abs().max()) < 1e-3 * float(gram.diagonal().real.max())
    powers = gram.diagonal().real
    assert bool((powers[:-1] >= powers[1:]).all())  # strongest first
    assert float(powers.sum()) == pytest.approx(float(intensity_of(start).sum()), rel=1e-4)


def test_probe_support_zeroes_the_probe_outside(defocused):
    scan = _scan(defocused)
    result = refine_joint(_flat(defocused), scan, torch.from_numpy(defocused.probe), 6, refine_probe=True,
                          probe_support_px=10.0)
    yy, xx = np.mgrid[0:32, 0:32] - 16
    outside = xx**2 + yy**2 > 100
    assert float(np.abs(result.probe.numpy()[:, outside]).max()) == 0.0
    assert float(intensity_of(result.probe).sum()) == pytest.approx(float(np.sum(np.abs(defocused.probe) ** 2)), rel=1e-4)


def test_orthogonalising_keeps_the_summed_intensity(rng):
    probe = torch.from_numpy((rng.normal(size=(3, 16, 16)) + 1j * rng.normal(size=(3, 16, 16))).astype(np.complex64))
    ortho = orthogonalise_modes(probe)
    torch.testing.assert_close(intensity_of(ortho), intensity_of(probe), rtol=1e-4, atol=1e-4)
    grown = initial_modes(probe[0], 4)
    assert grown.shape == (4, 16, 16)
    assert float(intensity_of(grown).sum()) == pytest.approx(float(intensity_of(probe[0]).sum()), rel=1e-4)


def test_intensity_scale_follows_the_flux(jittered):
    sim = simulate.simulate_scan(tiny_config())
    flux = np.random.default_rng(0).uniform(0.7, 1.3, len(sim.positions_px)).astype(np.float32)
    scan = ScanData(sim.amplitude * np.sqrt(flux)[:, None, None], sim.probe, sim.positions_px, sim.obj.shape, sim.obj)
    result = refine_joint(_flat(sim), scan, torch.from_numpy(sim.probe), 40, refine_intensity=True)
    expected = flux / flux.mean()
    assert np.corrcoef(result.intensity_scale, expected)[0, 1] > 0.95
    assert result.intensity_scale.mean() == pytest.approx(1.0, abs=1e-4)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make, message", [
    (lambda p: p[:16, :16], r"field 'probe': found shape \(16, 16\), expected \(32, 32\)"),
    (lambda p: np.zeros_like(p), r"field 'probe': found all zeros, expected a probe that carries light"),
    (lambda p: np.where(np.arange(32)[None, :] == 3, np.nan, p).astype(np.complex64),
     r"field 'probe': found NaN or Inf values, expected a finite complex probe"),
])
def test_bad_probes_are_one_line_errors(bundle, make, message):
    from ptycho_ml.model.bundle_io import load_model_bundle

    model = load_model_bundle(bundle)[0]
    sim = simulate.simulate_scan(tiny_config())
    scan = ScanData(sim.amplitude, make(sim.probe), sim.positions_px, sim.obj.shape, sim.obj, source="scan.npz")
    with pytest.raises(PtychoInputError, match=message) as info:
        check_compatible(model, scan)
    assert "\n" not in str(info.value) and str(info.value).startswith("scan.npz: ")


@pytest.mark.parametrize("changes, message", [
    ({"probe_modes": 0, "refine_probe": True}, r"InferenceConfig\.probe_modes: found 0, expected 1\.\.8"),
    ({"probe_modes": 9, "refine_probe": True}, r"InferenceConfig\.probe_modes: found 9, expected 1\.\.8"),
    ({"probe_modes": 2}, r"probe_modes: found 2 without refine_probe"),
])
def test_bad_mode_counts_are_refused(changes, message):
    with pytest.raises(PtychoInputError, match=message):
        InferenceConfig(**changes)


def test_more_modes_than_patterns_is_refused():
    sim = simulate.simulate_scan(tiny_config())
    scan = ScanData(sim.amplitude[:3], sim.probe, sim.positions_px[:3], sim.obj.shape, sim.obj, source="few.npz")
    with pytest.raises(PtychoInputError, match=r"few\.npz: probe_modes: found 4 modes for 3 patterns, expected at most 3"):
        check_refinement(scan, InferenceConfig(refine_probe=True, probe_modes=4))


def test_cli_refuses_zero_modes_in_one_line(bundle, tiny_npz, tmp_path):
    out = tmp_path / "rec"
    result = CliRunner().invoke(main, ["reconstruct", "--bundle", str(bundle), "--data", str(tiny_npz), "--out", str(out),
                                       "--refine-probe", "--probe-modes", "0", "--quiet"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: config: InferenceConfig.probe_modes: found 0, expected 1..8 incoherent modes"]
    assert not out.exists()


# ----------------------------------------------------------------------------- CLI, outputs, pyfunc


def test_cli_refines_probe_and_positions_and_writes_them(bundle, tmp_path):
    sim = simulate_with_errors(tiny_config(), ScanErrorConfig(defocus_error=0.3, position_noise_px=0.5))
    data = simulate.write_simulated(sim, tmp_path / "scan.npz")
    out = tmp_path / "rec"
    result = CliRunner().invoke(main, ["reconstruct", "--bundle", str(bundle), "--data", str(data), "--out", str(out),
                                       "--refine-steps", "12", "--refine-probe", "--refine-positions", "true",
                                       "--refine-intensity", "false", "--probe-modes", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "positions corrected: RMS" in result.output and "probe: 2 mode(s)" in result.output
    probe, positions = read_probe_positions(str(out / "object.h5"))
    assert probe.shape == (2, 32, 32) and positions.shape == (len(sim.positions_px), 2)
    assert np.abs(positions - sim.positions_px).max() > 0.01  # corrected, not copied
    with h5py.File(out / "object.h5", "r") as h5:
        assert "intensity_scale" not in h5  # not refined: not written
    with h5py.File(out / "product.h5", "r") as h5:
        np.testing.assert_array_equal(h5["probe"][()], probe[None])  # [C=1, I=2, N, N]
        pixel = h5["object"].attrs["pixel_width_m"]
        W = h5["object"].shape[-1]
        np.testing.assert_allclose(h5["probe_position_x_m"][()], (positions[:, 0] - (W - 1) / 2) * pixel + h5["object"].attrs["center_x_m"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inference"]["refine_probe"] is True and summary["inference"]["probe_modes"] == 2
    assert summary["probe"]["modes"] == 2 and sum(summary["probe"]["power_fractions"]) == pytest.approx(1.0)
    shift = np.linalg.norm(positions - sim.positions_px, axis=1)
    assert summary["positions"]["max_correction_px"] == pytest.approx(float(shift.max()))
    assert summary["positions"]["rms_correction_px"] == pytest.approx(float(np.sqrt(np.mean(shift**2))))
    assert (out / "probe.png").stat().st_size > 1000


def test_default_reconstruction_writes_the_file_probe_and_positions(bundle, tiny_npz, tmp_path):
    out = tmp_path / "rec"
    result = CliRunner().invoke(main, ["reconstruct", "--bundle", str(bundle), "--data", str(tiny_npz), "--out", str(out),
                                       "--refine-steps", "2", "--refine-auto", "false", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "auto_refinement" not in json.loads((out / "summary.json").read_text())
    scan = load_scan(tiny_npz)
    probe, positions = read_probe_positions(str(out / "object.h5"))
    np.testing.assert_array_equal(probe[0], scan.probe)
    np.testing.assert_array_equal(positions, scan.positions_px)
    assert (out / "probe.png").is_file()


def test_pyfunc_params_switch_the_refinement(bundle, tmp_path):
    import mlflow
    from mlflow.exceptions import MlflowException

    from ptycho_ml import flavor

    path = tmp_path / "model"
    flavor.save_model(str(bundle), str(path))
    pyfunc = mlflow.pyfunc.load_model(str(path))
    params = pyfunc.metadata.get_params_schema().to_dict()
    assert {"refine_probe", "refine_positions", "refine_intensity", "probe_modes"} <= {p["name"] for p in params}
    sim = simulate_with_errors(tiny_config(), ScanErrorConfig(defocus_error=0.3))
    data = {"diffraction": sim.amplitude, "positions": sim.positions_px.astype(np.float32)}
    plain = pyfunc.predict(data, params={"refine_steps": 6})
    joint = pyfunc.predict(data, params={"refine_steps": 6, "refine_probe": True, "probe_modes": 2})
    assert plain["amplitude"].shape == joint["amplitude"].shape
    assert not np.allclose(plain["amplitude"], joint["amplitude"])
    with pytest.raises(MlflowException, match="probe_modes: found 0"):
        pyfunc.predict(data, params={"refine_steps": 2, "refine_probe": True, "probe_modes": 0})


def test_reconstruct_returns_the_refined_probe_and_positions(bundle, jittered):
    from ptycho_ml.model.bundle_io import load_model_bundle

    model = load_model_bundle(bundle)[0]
    result = reconstruct(model, _scan(jittered), InferenceConfig(refine_steps=4, refine_positions=True, progress=False))
    assert result.probe.shape == (1, 32, 32) and result.positions_px.shape == jittered.positions_px.shape
    assert result.intensity_scale is None
    none = reconstruct(model, _scan(jittered), InferenceConfig(refine_steps=0, progress=False))
    assert none.probe is None and none.positions_px is None


def test_evaluate_takes_the_refinement_flags(bundle, tmp_path):
    sim = simulate_with_errors(tiny_config(), ScanErrorConfig(defocus_error=0.5))
    data = simulate.write_simulated(sim, tmp_path / "scan.npz")
    scores = {}
    for label, flags in (("fixed", ["--refine-auto", "false"]), ("probe", ["--refine-probe"]), ("auto", [])):
        out = tmp_path / f"{label}.json"
        result = CliRunner().invoke(main, ["evaluate", "--bundle", str(bundle), "--data", str(data), "--refine-steps", "30",
                                           *flags, "--json", str(out)])
        assert result.exit_code == 0, result.output
        scores[label] = json.loads(out.read_text())
    # the file probe is 50 % off in defocus: refining it gives a better object, by the switch or by default
    assert scores["probe"]["refined_amplitude_ssim"] > scores["fixed"]["refined_amplitude_ssim"] + 0.02
    assert scores["auto"]["refined_amplitude_ssim"] > scores["fixed"]["refined_amplitude_ssim"] + 0.02


@pytest.mark.interop
@pytest.mark.slow
def test_ptychodus_reads_the_refined_probe_and_positions(ptychodus_python, bundle, tmp_path):
    from ptycho_ml.data.ptychodus import write_diffraction

    sim = simulate_with_errors(tiny_config(), ScanErrorConfig(defocus_error=0.3, position_noise_px=0.5))
    data = simulate.write_simulated(sim, tmp_path / "scan.npz")
    out = tmp_path / "rec"
    result = CliRunner().invoke(main, ["reconstruct", "--bundle", str(bundle), "--data", str(data), "--out", str(out),
                                       "--refine-steps", "8", "--refine-probe", "--refine-positions", "--probe-modes", "2",
                                       "--quiet"])
    assert result.exit_code == 0, result.output
    probe, positions = read_probe_positions(str(out / "object.h5"))
    diffraction = write_diffraction(tmp_path / "diffraction.h5", load_scan(data))
    got = run_oracle(ptychodus_python, "read", diffraction, out / "product.h5", tmp_path / "oracle.npz")
    arrays = np.load(tmp_path / "oracle.npz")
    assert (got["probe_num_coherent_modes"], got["probe_num_incoherent_modes"]) == (1, 2)
    np.testing.assert_array_equal(arrays["probe"], probe[None])  # [C=1, I=2, N, N], the refined modes
    np.testing.assert_allclose(arrays["x_px"], positions[:, 0], rtol=0, atol=1e-9)  # the corrected positions
    np.testing.assert_allclose(arrays["y_px"], positions[:, 1], rtol=0, atol=1e-9)
    assert got["num_paired"] == len(sim.positions_px)
    np.testing.assert_allclose(arrays["paired_x_px"], positions[:, 0], rtol=0, atol=1e-9)


@pytest.mark.slow
def test_the_benchmark_smoke_run_scores_each_method(bundle, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "real_scans.py"
    spec = importlib.util.spec_from_file_location("real_scans_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--bundle", str(bundle), "--workdir", str(tmp_path), "--N", "32", "--no-ptychi",
                       "--scans", "pos 1px+drift", "--methods", "object only,default,+positions",
                       "--refine-steps", "20"]) == 0
    result = json.loads((tmp_path / "real_scans_N32.json").read_text())["results"][0]
    rows = result["rows"]
    assert set(rows) == {"object only", "default", "+positions"}
    assert rows["object only"]["position_rms_after_px"] == rows["object only"]["position_rms_before_px"] > 0.5
    assert rows["+positions"]["position_rms_after_px"] < rows["object only"]["position_rms_after_px"]
    assert rows["default"]["auto_refinement"]["chosen"] == "positions"  # the data asked for it
    assert rows["default"]["position_rms_after_px"] < rows["object only"]["position_rms_after_px"]
    assert "| pos 1px+drift | +positions |" in (tmp_path / "real_scans_N32.md").read_text()


# ----------------------------------------------------------------------------- the automatic choice


def test_deviance_ratio_is_one_for_the_truth_and_large_for_a_wrong_probe(defocused, jittered):
    exact = simulate.simulate_scan(tiny_config())
    truth = deviance_ratio(torch.from_numpy(exact.obj), _scan(exact), torch.from_numpy(exact.probe))
    assert 0.9 < truth < 1.1, truth  # the data are explained to the noise
    for sim in (defocused, jittered):  # the file's probe or positions, with the true object
        assert deviance_ratio(torch.from_numpy(sim.obj), _scan(sim), torch.from_numpy(sim.probe)) > 10
        # ... and the true ones explain the data again
        truth = deviance_ratio(torch.from_numpy(sim.obj), _scan(sim), torch.from_numpy(sim.probe_true), sim.positions_true_px)
        assert 0.9 < truth < 1.1, truth


def test_auto_leaves_a_scan_the_object_explains_as_the_object_refinement_alone():
    exact = simulate.simulate_scan(tiny_config())
    scan, probe = _scan(exact), torch.from_numpy(exact.probe)
    result, report = refine_auto(_flat(exact), scan, probe, 80)
    plain = refine_object(_flat(exact), scan, probe, 80)
    assert report.chosen == "object" and list(report.fit_ratios) == ["object"]
    assert report.fit_ratios["object"] <= FIT_RATIO_LIMIT
    assert torch.equal(result.obj, plain.obj)  # bit-identical: nothing else was tried
    np.testing.assert_array_equal(result.positions_px, exact.positions_px)


def test_auto_continues_the_object_of_a_scan_still_converging():
    exact = simulate.simulate_scan(tiny_config())
    scan, probe = _scan(exact), torch.from_numpy(exact.probe)
    # three passes from a flat start leave the fit far from the noise (ratio 72); neither the positions (39)
    # nor the probe (284) explain it: the object alone is still converging (measured: 23 after 3 more)
    result, report = refine_auto(_flat(exact), scan, probe, 3)
    assert report.chosen == "object" and report.object_passes == 2 * 3 and len(result.loss_history) == 6
    assert report.fit_ratios["object (continued)"] < 0.5 * report.fit_ratios["object"]
    assert report.fit_ratios["positions (trial)"] > CLEAR_WIN * report.fit_ratios["object"]
    first = refine_joint(_flat(exact), scan, probe, 3)
    assert torch.equal(result.obj, refine_joint(first.obj, scan, probe, 3).obj)  # 3 passes, then 3 more
    np.testing.assert_array_equal(result.positions_px, exact.positions_px)


def test_auto_continues_an_object_between_the_noise_and_the_limit_without_trials():
    exact = simulate.simulate_scan(tiny_config())
    scan, probe = _scan(exact), torch.from_numpy(exact.probe)
    # 45 passes from a flat start: too little misfit for a wrong probe or positions, not yet the noise
    result, report = refine_auto(_flat(exact), scan, probe, 45)
    assert CONVERGED_RATIO < report.fit_ratios["object"] <= FIT_RATIO_LIMIT, report.fit_ratios
    assert list(report.fit_ratios) == ["object", "object (continued)"]  # no trial of the probe or positions
    assert report.fit_ratios["object (continued)"] < CONVERGED_RATIO
    assert report.chosen == "object" and report.object_passes == 45 + 45 // NEAR_NOISE_FRACTION
    first = refine_joint(_flat(exact), scan, probe, 45)
    assert torch.equal(result.obj, refine_joint(first.obj, scan, probe, 45 // NEAR_NOISE_FRACTION).obj)


def test_auto_continues_a_scan_still_falling_before_any_trial():
    """Above the limit but the fit still falling: the object alone converges further first, and once that
    explains the data no trial of the probe or positions runs (their cost saved)."""
    exact = simulate.simulate_scan(tiny_config(step_px=3.0))  # 169 patterns: two mini-batches, so the fit is measured
    scan, probe = _scan(exact), torch.from_numpy(exact.probe)
    first = refine_joint(_flat(exact), scan, probe, 12, variance_reduction=True)
    assert still_falling(first.sample_fits)  # measured: 5.7 -> 3.1 over the last passes
    assert not still_falling(first.sample_fits[:8])  # too few passes measured to say
    assert not still_falling(refine_joint(_flat(exact), scan, probe, 12).sample_fits)  # nothing measured: NaN
    result, report = refine_auto(_flat(exact), scan, probe, 12, variance_reduction=True)
    assert report.fit_ratios["object"] > FIT_RATIO_LIMIT, report  # measured 3.2: the trials would have run
    assert list(report.fit_ratios) == ["object", "object (continued)"]  # ... and none did
    assert report.fit_ratios["object (continued)"] <= FIT_RATIO_LIMIT
    assert report.chosen == "object" and report.object_passes == 24 and len(result.sample_fits) == 24
    continued = refine_joint(first.obj, scan, probe, 12, variance_reduction=True)
    assert torch.equal(result.obj, continued.obj)  # 12 passes, then 12 more


def test_auto_continues_a_stage_explained_only_in_its_last_passes():
    """Explained to the noise, but variance-reduced for fewer than steps // NEAR_NOISE_FRACTION passes: the
    object still converges there, so it continues for that many passes."""
    exact = simulate.simulate_scan(tiny_config(step_px=3.0))
    scan, probe = _scan(exact), torch.from_numpy(exact.probe)
    first = refine_joint(_flat(exact), scan, probe, 20, variance_reduction=True)
    assert 20 - first.variance_reduced_from < 20 // NEAR_NOISE_FRACTION  # measured: from pass 17
    result, report = refine_auto(_flat(exact), scan, probe, 20, variance_reduction=True)
    assert report.fit_ratios["object"] <= CONVERGED_RATIO, report  # explained: before, the stage stopped here
    assert list(report.fit_ratios) == ["object", "object (continued)"] and report.object_passes == 26
    assert torch.equal(result.obj, refine_joint(first.obj, scan, probe, 6, variance_reduction=True).obj)
    # without the variance reduction nothing says how late the data were explained: the stage stops there
    _, plain = refine_auto(_flat(exact), scan, probe, 20)
    assert plain.fit_ratios["object"] <= CONVERGED_RATIO and list(plain.fit_ratios) == ["object"], plain


@pytest.mark.parametrize("error, chosen", [(ScanErrorConfig(defocus_error=0.5), "probe+positions"),
                                           (ScanErrorConfig(position_noise_px=1.0), "positions")])
def test_auto_still_tries_the_probe_and_positions_when_the_fit_is_level(error, chosen):
    """A wrong probe or wrong positions leave the object's misfit level: no continuation first, the trials run
    and find the error as without the fall rule."""
    sim = simulate_with_errors(tiny_config(step_px=3.0), error)
    scan, probe = _scan(sim), torch.from_numpy(sim.probe)
    assert not still_falling(refine_joint(_flat(sim), scan, probe, 20, variance_reduction=True).sample_fits)
    _, report = refine_auto(_flat(sim), scan, probe, 20, variance_reduction=True)
    assert "object (continued)" not in report.fit_ratios and report.chosen == chosen, report
    assert report.fit_ratios[chosen] < 0.2 * report.fit_ratios["object"]


def test_auto_refines_the_probe_of_a_scan_whose_probe_is_wrong(defocused):
    scan, start = _scan(defocused), torch.from_numpy(defocused.probe)
    result, report = refine_auto(_flat(defocused), scan, start, 40)
    fixed = refine_object(_flat(defocused), scan, start, 40)
    assert report.fit_ratios["object"] > FIT_RATIO_LIMIT and "probe" in report.chosen
    assert report.fit_ratios[report.chosen] < 0.2 * report.fit_ratios["object"]
    assert _probe_error(result.probe.numpy(), defocused.probe_true) < 0.75 * _probe_error(defocused.probe, defocused.probe_true)
    assert float(intensity_of(result.probe).sum()) == pytest.approx(float(intensity_of(start).sum()), rel=1e-4)
    error = {name: float(np.abs(np.abs(r.obj.numpy()) - np.abs(defocused.obj))[20:52, 20:52].mean())
             for name, r in (("auto", result), ("fixed", fixed))}
    assert error["auto"] < error["fixed"], error


def test_auto_corrects_the_positions_of_a_scan_whose_positions_are_wrong(jittered):
    scan = _scan(jittered)
    result, report = refine_auto(_flat(jittered), scan, torch.from_numpy(jittered.probe), 40)
    assert report.chosen == "positions", report
    assert report.fit_ratios["positions"] < FIT_RATIO_LIMIT  # explained once the positions are right
    before = _rms_px(jittered.positions_px - jittered.positions_true_px)
    assert _rms_px(result.positions_px - jittered.positions_true_px) < 0.4 * before
    torch.testing.assert_close(result.probe[0], torch.from_numpy(jittered.probe))  # the probe was right: kept


def test_auto_does_not_judge_data_that_are_not_counts(defocused):
    """Normalised diffraction (not photon counts) has no Poisson yardstick: the object alone, and the reason said."""
    scaled = ScanData(defocused.amplitude * np.float32(0.37), defocused.probe * np.float32(0.37), defocused.positions_px,
                      defocused.obj.shape, defocused.obj, source="<normalised>")
    result, report = refine_auto(_flat(defocused), scaled, torch.from_numpy(scaled.probe), 6)
    assert report.chosen == "object" and report.fit_ratios == {} and "not photon counts" in report.skipped
    assert torch.equal(result.obj, refine_object(_flat(defocused), scaled, torch.from_numpy(scaled.probe), 6).obj)


def test_default_reconstruction_refines_the_probe_the_data_reject(bundle, tmp_path):
    """The CLI default (no switch): a scan with a wrong file probe gets its probe refined, and says so."""
    sim = simulate_with_errors(tiny_config(), ScanErrorConfig(defocus_error=0.5))
    data = simulate.write_simulated(sim, tmp_path / "scan.npz")
    out = tmp_path / "rec"
    result = CliRunner().invoke(main, ["reconstruct", "--bundle", str(bundle), "--data", str(data), "--out", str(out),
                                       "--refine-steps", "40", "--quiet"])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    auto = summary["auto_refinement"]
    assert auto["fit_ratios"]["object"] > auto["limit"] and "probe" in auto["chosen"]
    assert f"refinement: {auto['chosen']} refined too" in result.output
    probe, _ = read_probe_positions(str(out / "object.h5"))
    assert probe.shape == (2, 32, 32)  # the automatic probe refinement learns two modes
    assert _probe_error(probe, sim.probe_true) < _probe_error(sim.probe, sim.probe_true)


def test_every_refinement_setting_has_the_same_name_on_the_cli_the_pyfunc_and_the_mlproject():
    import yaml

    from ptycho_ml.config import REFINEMENT_FIELDS
    from ptycho_ml.flavor import model_signature

    for command in (main.commands["reconstruct"], main.commands["evaluate"], main.commands["batch"]):
        assert set(REFINEMENT_FIELDS) <= {p.name for p in command.params}, command.name
    assert set(REFINEMENT_FIELDS) <= {p.name for p in model_signature(32).params.params}
    mlproject = yaml.safe_load((Path(__file__).resolve().parents[1] / "MLproject").read_text())
    assert set(REFINEMENT_FIELDS) <= set(mlproject["entry_points"]["reconstruct"]["parameters"])
    # ... and the same defaults: the MLproject's are written out (MLflow passes them), the pyfunc's come from the config
    defaults, parameters = InferenceConfig(), mlproject["entry_points"]["reconstruct"]["parameters"]
    for k in REFINEMENT_FIELDS:
        expected = str(getattr(defaults, k)).lower() if isinstance(getattr(defaults, k), bool) else float(getattr(defaults, k))
        written = parameters[k]["default"]
        assert (written if isinstance(expected, str) else float(written)) == expected, k
    assert {p.name: p.default for p in model_signature(32).params.params if p.name in REFINEMENT_FIELDS} == \
        {k: getattr(defaults, k) for k in REFINEMENT_FIELDS}
    for entry in ("evaluate", "reconstruct"):  # the passes, too
        assert float(mlproject["entry_points"][entry]["parameters"]["refine_steps"]["default"]) == defaults.refine_steps


# ----------------------------------------------------------------------------- wide phase


def _wide_phase_scan(nphotons: float, **changes) -> ScanData:
    """The tiny scan's probe and positions (``changes`` to its config) over an object whose phase is one bump
    wider than the probe."""
    sim = simulate.simulate_scan(tiny_config(nphotons=nphotons, **changes))
    H, W = sim.obj.shape
    y, x = np.mgrid[:H, :W]
    phase = 1.5 * np.exp(-((x - W / 2) ** 2 + (y - H / 2) ** 2) / (2 * (W / 4) ** 2))
    obj = (np.abs(sim.obj) * np.exp(1j * phase)).astype(np.complex64)
    amplitude = simulate.simulate_diffraction(obj, sim.probe, sim.positions_px, np.random.default_rng(5))
    return ScanData(amplitude, sim.probe, sim.positions_px, obj.shape, obj, source="<wide phase>")


def _wide_phase_error(obj: torch.Tensor, scan: ScanData, margin_px: int = 24) -> float:
    """RMS phase error (rad) inside ``margin_px`` of the edge, the global offset removed, smoothed over 4 px."""
    from scipy.ndimage import gaussian_filter
    error = np.angle(obj.numpy() * np.conj(scan.obj))[margin_px:-margin_px, margin_px:-margin_px]
    error = np.angle(np.exp(1j * (error - np.angle(np.exp(1j * error).mean()))))
    return float(np.sqrt((gaussian_filter(error, 4) ** 2).mean()))


def test_wide_phase_is_the_smooth_phase_part_of_a_step():
    rng = np.random.default_rng(0)
    obj = torch.from_numpy((rng.uniform(0.5, 1.0, (64, 64)) * np.exp(1j * rng.uniform(-3, 3, (64, 64)))).astype(np.complex64))
    y, x = np.mgrid[:64, :64]
    smooth = torch.from_numpy((0.01 * np.exp(-((x - 32) ** 2 + (y - 32) ** 2) / (2 * 20.0**2))).astype(np.float32))
    fine = torch.from_numpy((0.01 * (-1.0) ** (x + y)).astype(np.float32))
    lowpass = wide_phase_filter((64, 64), 4.0)
    # a smooth phase change passes almost whole; a pixel-scale one and an amplitude change do not
    kept = wide_phase(1j * obj * smooth, obj, lowpass)
    assert float((kept - 1j * obj * smooth).abs().max()) < 0.1 * float((1j * obj * smooth).abs().max())
    assert float(wide_phase(1j * obj * fine, obj, lowpass).abs().max()) < 1e-3 * float((1j * obj * fine).abs().max()) + 1e-7
    assert float(wide_phase(obj * smooth, obj, lowpass).abs().max()) < 1e-5
    assert kept.dtype == torch.complex64 and kept.shape == obj.shape


def test_phase_gain_refines_wide_phase_faster_and_zero_is_the_plain_refinement():
    scan = _wide_phase_scan(1e6)
    probe, flat = torch.from_numpy(scan.probe), torch.ones(scan.obj_shape, dtype=torch.complex64)
    plain = refine_joint(flat, scan, probe, 40)
    gained = refine_joint(flat, scan, probe, 40, phase_gain=PHASE_GAIN)
    assert torch.equal(refine_joint(flat, scan, probe, 40, phase_gain=0.0).obj, plain.obj)
    # measured 0.013 rad plain, 0.0055 with the gain (the wide phase is the slow part of the plain refinement)
    before, after = _wide_phase_error(plain.obj, scan), _wide_phase_error(gained.obj, scan)
    assert after < 0.6 * before, (before, after)
    # the automatic refinement carries it to every object step (here both continue the object for 40 more
    # passes)
    auto, _ = refine_auto(flat, scan, probe, 40, phase_gain=PHASE_GAIN)
    plain_auto, _ = refine_auto(flat, scan, probe, 40)
    assert _wide_phase_error(auto.obj, scan) < 0.8 * _wide_phase_error(plain_auto.obj, scan)


def test_phase_gain_is_validated():
    with pytest.raises(PtychoInputError, match="phase_gain: found -1"):
        InferenceConfig(phase_gain=-1.0)
    with pytest.raises(PtychoInputError, match="phase_gain: found 100"):
        InferenceConfig(phase_gain=100.0)


# ----------------------------------------------------------------------------- variance-reduced passes


def _low_dose_wide_phase_scan() -> ScanData:
    """1e3 photons per pattern, 576 patterns (nine mini-batches of 64), phase one bump wider than the probe."""
    return _wide_phase_scan(1e3, object_size_px=128, step_px=4.0)


def test_variance_reduced_passes_leave_less_noise_in_the_wide_phase_at_low_dose():
    scan = _low_dose_wide_phase_scan()
    probe, flat = torch.from_numpy(scan.probe), torch.ones(scan.obj_shape, dtype=torch.complex64)
    plain = refine_joint(flat, scan, probe, 30, batch_size=64)
    reduced = refine_joint(flat, scan, probe, 30, batch_size=64, variance_reduction=True)
    # they start once the data are explained to their noise, after a few passes from a flat start
    assert plain.variance_reduced_from is None
    assert reduced.variance_reduced_from is not None and 1 <= reduced.variance_reduced_from < 30
    assert deviance_ratio(reduced.obj, scan, probe) <= 1.0
    # measured 0.25 rad plain, 0.125 variance-reduced (the mini-batches' noise, kept by momentum 0.9)
    before, after = _wide_phase_error(plain.obj, scan), _wide_phase_error(reduced.obj, scan)
    assert after < 0.7 * before, (before, after)
    # and the gain, on the variance-reduced passes only, does not bring that noise back
    gained = refine_joint(flat, scan, probe, 30, batch_size=64, variance_reduction=True, phase_gain=PHASE_GAIN)
    assert _wide_phase_error(gained.obj, scan) < 0.7 * before


def test_variance_reduction_only_where_it_applies():
    scan = _low_dose_wide_phase_scan()
    probe, flat = torch.from_numpy(scan.probe), torch.ones(scan.obj_shape, dtype=torch.complex64)
    # more than the object refined: never variance-reduced, and exactly the plain joint refinement
    joint = refine_joint(flat, scan, probe, 6, batch_size=64, refine_positions=True, positions_start=2)
    asked = refine_joint(flat, scan, probe, 6, batch_size=64, refine_positions=True, positions_start=2,
                         variance_reduction=True)
    assert asked.variance_reduced_from is None and torch.equal(asked.obj, joint.obj)
    # diffraction that is not photon counts: the fit cannot say when the noise is reached
    counts = scan.amplitude(np.arange(len(scan))).astype(np.float64) ** 2
    scaled = ScanData(np.sqrt(2.5 * counts + 0.3).astype(np.float32), scan.probe, scan.positions_px,
                      scan.obj_shape, scan.obj, source="<not counts>")
    not_counts = refine_joint(flat, scaled, probe * 2.5**0.5, 10, batch_size=64, variance_reduction=True)
    assert not_counts.variance_reduced_from is None
    assert torch.equal(not_counts.obj, refine_joint(flat, scaled, probe * 2.5**0.5, 10, batch_size=64).obj)
    # one mini-batch: its gradient is the whole scan's already
    assert refine_joint(flat, scan, probe, 10, variance_reduction=True, batch_size=len(scan)).variance_reduced_from is None
    # the automatic refinement reports where its object stage began them
    _, report = refine_auto(flat, scan, probe, 10, variance_reduction=True)
    assert report.variance_reduced_from is not None
    assert report.to_dict()["variance_reduced_from"] == report.variance_reduced_from


def test_deviance_ratio_on_a_sample_of_patterns_is_the_ratio_of_those_patterns():
    scan = _low_dose_wide_phase_scan()
    probe, truth = torch.from_numpy(scan.probe), torch.from_numpy(scan.obj)
    every = np.arange(len(scan))
    assert deviance_ratio(truth, scan, probe, patterns=every) == deviance_ratio(truth, scan, probe)
    sample = every[::9]
    sub = ScanData(scan.amplitude(sample), scan.probe, scan.positions_px[sample], scan.obj_shape, scan.obj, source="<sub>")
    assert deviance_ratio(truth, scan, probe, patterns=sample) == pytest.approx(deviance_ratio(truth, sub, probe), rel=1e-9)


def test_the_default_pipeline_reduces_the_variance_and_gains_the_wide_phase():
    cfg = InferenceConfig()
    assert cfg.variance_reduction and cfg.phase_gain == PHASE_GAIN
    assert "variance_reduction" in REFINEMENT_FIELDS


# ----------------------------------------------------------------------------- larger steps far from the fit


def test_larger_steps_while_the_misfit_is_far_above_the_noise_converge_in_fewer_passes():
    exact = simulate.simulate_scan(tiny_config())
    scan, probe, flat = _scan(exact), torch.from_numpy(exact.probe), _flat(exact)
    plain = refine_joint(flat, scan, probe, 10)
    larger = refine_joint(flat, scan, probe, 10, misfit_step_gain=MISFIT_STEP_GAIN)
    # measured: the fit after 10 passes from a flat start, 22 plain, 5.2 with the larger steps
    assert deviance_ratio(larger.obj, scan, probe) < 0.5 * deviance_ratio(plain.obj, scan, probe)
    # ... and the object is nearer the truth, not merely fitted
    inside = (slice(16, -16), slice(16, -16))
    error = lambda obj: float(np.sqrt(np.mean(np.abs(obj.numpy()[inside] - exact.obj[inside]) ** 2)))
    assert error(larger.obj) < 0.9 * error(plain.obj), (error(larger.obj), error(plain.obj))
    # a gain of 1 is the plain refinement, bit for bit
    assert torch.equal(refine_joint(flat, scan, probe, 10, misfit_step_gain=1.0).obj, plain.obj)


def test_larger_steps_only_where_the_misfit_says_so():
    exact = simulate.simulate_scan(tiny_config())
    scan, probe, flat = _scan(exact), torch.from_numpy(exact.probe), _flat(exact)
    # a start already explained to the noise (the truth: ratio about 1) never takes them: bit for bit plain
    truth = torch.from_numpy(exact.obj)
    assert deviance_ratio(truth, scan, probe) <= MISFIT_STEP_RATIO
    assert torch.equal(refine_joint(truth, scan, probe, 5, misfit_step_gain=MISFIT_STEP_GAIN).obj,
                       refine_joint(truth, scan, probe, 5).obj)
    # more than the object refined: the plain joint refinement
    joint = refine_joint(flat, scan, probe, 6, refine_positions=True, positions_start=2)
    asked = refine_joint(flat, scan, probe, 6, refine_positions=True, positions_start=2, misfit_step_gain=MISFIT_STEP_GAIN)
    assert torch.equal(asked.obj, joint.obj)
    # diffraction that is not photon counts: the misfit cannot be judged against the noise
    counts = exact.amplitude.astype(np.float64) ** 2
    scaled = ScanData(np.sqrt(2.5 * counts + 0.3).astype(np.float32), exact.probe, exact.positions_px,
                      exact.obj.shape, exact.obj, source="<not counts>")
    assert torch.equal(refine_joint(flat, scaled, probe * 2.5**0.5, 6, misfit_step_gain=MISFIT_STEP_GAIN).obj,
                       refine_joint(flat, scaled, probe * 2.5**0.5, 6).obj)


def test_misfit_step_gain_is_validated_and_on_by_default(bundle, tiny_npz, tmp_path):
    assert InferenceConfig().misfit_step_gain == MISFIT_STEP_GAIN and "misfit_step_gain" in REFINEMENT_FIELDS
    with pytest.raises(PtychoInputError, match="misfit_step_gain: found 100"):
        InferenceConfig(misfit_step_gain=100.0)
    out = tmp_path / "rec"
    result = CliRunner().invoke(main, ["reconstruct", "--bundle", str(bundle), "--data", str(tiny_npz), "--out", str(out),
                                       "--misfit-step-gain", "0.5", "--quiet"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: config: InferenceConfig.misfit_step_gain: found 0.5, expected 1..8 (1 = none; 3 measured, docs/benchmarks.md)"]
    assert not out.exists()
