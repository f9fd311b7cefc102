"""The learned refinement (unrolled data-consistency stages over the stitched object): shapes, gradients,
what an untrained one is, training without collapse, tiling, and its round trip through the bundle."""

from __future__ import annotations

import copy
import json
import zipfile

import numpy as np
import pytest
import torch

from ptycho_ml.config import ModelConfig, TrainingConfig
from ptycho_ml.errors import PtychoInputError
from ptycho_ml.inference.reconstruct import network_object
from ptycho_ml.model.bundle import read_bundle, write_bundle
from ptycho_ml.model.bundle_io import load_model_bundle, save_model_bundle
from ptycho_ml.model.network import DiffractionToObject
from ptycho_ml.model.refiner import LearnedRefiner
from ptycho_ml.model.refiner_training import cut_windows, fit_refiner, window_loss
from ptycho_ml.physics import forward as physics
from ptycho_ml.physics.losses import poisson_nll
from ptycho_ml.physics.refine import ILLUMINATION_FLOOR, coverage, object_gradient


@pytest.fixture(scope="module")
def scan(tiny_npz):
    from ptycho_ml.data.readers import load_scan

    return load_scan(tiny_npz)


def _inputs(scan):
    probe = torch.from_numpy(scan.probe)
    positions = torch.from_numpy(scan.positions_px.astype(np.float32))
    amplitudes = torch.from_numpy(scan.amplitude(slice(0, len(scan))))
    return probe, positions, amplitudes


def _nll(obj, scan):
    probe, positions, amplitudes = _inputs(scan)
    return float(poisson_nll(physics.forward_amplitude(obj, probe, positions), amplitudes, eps=0.5, reduction="sum"))


def _model(scan, stages=2):
    cfg = ModelConfig(preset="tiny", N=scan.N, refiner_stages=stages, refiner_width=4)
    return DiffractionToObject(cfg, torch.from_numpy(scan.probe), float(np.sqrt(np.mean(scan.amplitude(slice(0, 16)) ** 2))))


def test_stages_keep_the_object_shape_and_dtype(scan):
    probe, positions, amplitudes = _inputs(scan)
    refiner = LearnedRefiner(3, width=4)
    start = torch.ones(scan.obj_shape, dtype=torch.complex64)
    with torch.no_grad():
        stages = refiner(start, probe, positions, amplitudes, every_stage=True)
    assert len(stages) == 3
    assert all(s.shape == start.shape and s.dtype == torch.complex64 and torch.isfinite(torch.view_as_real(s)).all()
               for s in stages)


def test_an_untrained_refiner_is_plain_preconditioned_gradient_steps(scan):
    """Zero-initialised correction heads: each stage is exactly one illumination-preconditioned Poisson step,
    and each lowers the data misfit of a flat start."""
    probe, positions, amplitudes = _inputs(scan)
    obj = torch.ones(scan.obj_shape, dtype=torch.complex64)
    with torch.no_grad():
        out = LearnedRefiner(2, width=4)(obj, probe, positions, amplitudes, every_stage=True)
    expected = obj
    illumination = coverage(positions, physics.intensity_of(probe), obj.shape)
    misfits = [_nll(obj, scan)]
    for stage in out:
        grad, _ = object_gradient(expected, probe, positions, amplitudes)
        expected = expected - grad / (4 * (illumination + ILLUMINATION_FLOOR * illumination.max()))
        torch.testing.assert_close(stage, expected, rtol=1e-5, atol=1e-6)
        misfits.append(_nll(stage, scan))
    assert misfits[0] > misfits[1] > misfits[2], misfits


def test_the_whole_scan_gradient_does_not_depend_on_the_batching(scan):
    probe, positions, amplitudes = _inputs(scan)
    obj = torch.polar(torch.full(scan.obj_shape, 0.9), torch.full(scan.obj_shape, 0.2))
    whole, nll_whole = object_gradient(obj, probe, positions, amplitudes, batch_size=len(positions))
    batched, nll_batched = object_gradient(obj, probe, positions, lambda idx: amplitudes[idx], batch_size=7)
    torch.testing.assert_close(batched, whole, rtol=1e-4, atol=1e-4 * float(whole.abs().max()))
    assert nll_batched == pytest.approx(nll_whole, rel=1e-5) and nll_whole == pytest.approx(_nll(obj, scan), rel=1e-5)


def test_gradients_reach_every_stage_and_the_step_lengths(scan):
    """Trained end to end: the loss after the last stage is differentiable, through every stage's forward
    model, with respect to each stage's step length and correction head (finite, non-zero)."""
    rng = np.random.default_rng(0)
    model = _model(scan)
    (window,) = cut_windows(model, scan, 1, steps_across=4, rng=rng)
    refiner = LearnedRefiner(2, width=4)
    window_loss(refiner, window).backward()
    assert torch.isfinite(refiner.log_step.grad).all() and (refiner.log_step.grad != 0).all()
    for correction in refiner.corrections:
        grad = correction.head.weight.grad
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_without_ground_truth_the_windows_train_on_the_measurements_alone(scan):
    """Measured data (a Poisson loss): the scan's object may be only a guess, so windows carry no truth and
    the loss is the Poisson NLL after the last stage."""
    model = _model(scan)
    (with_truth,) = cut_windows(model, scan, 1, steps_across=4, rng=np.random.default_rng(2))
    (measured,) = cut_windows(model, scan, 1, steps_across=4, rng=np.random.default_rng(2), use_truth=False)
    assert with_truth.truth is not None and measured.truth is None
    refiner = LearnedRefiner(1, width=4)
    with torch.no_grad():
        physics_only = float(window_loss(refiner, measured))
        hybrid = float(window_loss(refiner, with_truth))
        last = refiner(measured.start, measured.probe, measured.positions_px, measured.amplitudes)
    expected = float(poisson_nll(physics.forward_amplitude(last, measured.probe, measured.positions_px),
                                 measured.amplitudes))
    assert physics_only == pytest.approx(expected, rel=1e-5) and hybrid > physics_only


def test_training_lowers_the_loss_without_collapse(scan):
    """A short training run lowers the windows' loss below the untrained refiner's, and its output still
    follows the object (not a constant) and stays close to the truth where the scan sees it."""
    rng = np.random.default_rng(1)
    model = _model(scan)
    windows = cut_windows(model, scan, 6, steps_across=4, rng=rng)
    untrained = LearnedRefiner(2, width=4)
    with torch.no_grad():
        before = sum(float(window_loss(untrained, w)) for w in windows)
    refiner, history = fit_refiner(model, scan, 2, width=4, iterations=60, windows_per_scan=6, steps_across=4,
                                   learning_rate=3e-3, seed=1)
    assert len(history) == 60 and all(np.isfinite(history))
    with torch.no_grad():
        after = sum(float(window_loss(refiner, w)) for w in windows)
        out = refiner(windows[0].start, windows[0].probe, windows[0].positions_px, windows[0].amplitudes)
    assert after < 0.9 * before, (before, after)
    assert float(out.abs().std()) > 0.05 and float(torch.angle(out).std()) > 0.05


def test_the_data_undo_a_correction_that_makes_the_fit_worse(scan):
    """A correction that wrecks the object (here: heads that add a large constant) is undone outside training:
    the stage keeps its plain step, the later stages are plain steps, and the fit ends better than it began."""
    probe, positions, amplitudes = _inputs(scan)
    refiner = LearnedRefiner(3, width=4)
    plain = LearnedRefiner(3, width=4)
    with torch.no_grad():
        for correction in refiner.corrections:
            correction.head.bias.fill_(3.0)
        start = torch.ones(scan.obj_shape, dtype=torch.complex64)
        report = {}
        guarded = refiner(start, probe, positions, amplitudes, report=report)
        expected = plain(start, probe, positions, amplitudes)
    assert report["corrections_kept"] == 0 and report["nll_end"] < report["nll_start"], report
    torch.testing.assert_close(guarded, expected)
    # in training nothing is undone: the gradient must see what the corrections did
    wrecked = refiner(start, probe, positions, amplitudes)
    assert float((wrecked.detach() - expected).abs().max()) > 1.0


def test_large_objects_are_corrected_tile_by_tile_with_the_untiled_result(scan):
    probe, positions, amplitudes = _inputs(scan)
    torch.manual_seed(0)
    refiner = LearnedRefiner(2, width=4)
    for p in refiner.parameters():
        torch.nn.init.normal_(p, std=0.3)
    start = torch.ones(scan.obj_shape, dtype=torch.complex64)
    with torch.no_grad():
        whole = refiner(start, probe, positions, amplitudes)
        refiner.tile_px = 24  # a 72 x 72 object: 9 tiles
        tiled = refiner(start, probe, positions, amplitudes)
    assert not torch.equal(whole, start)
    torch.testing.assert_close(tiled, whole, rtol=1e-4, atol=1e-5)


def test_network_object_runs_the_stages_and_can_leave_them_out(scan):
    model = _model(scan).eval()
    generator_only, _ = network_object(model, scan, learned_refinement=False)
    staged, _ = network_object(model, scan)
    assert not torch.equal(staged, generator_only)
    assert _nll(staged, scan) < _nll(generator_only, scan)
    without = copy.deepcopy(model)
    without.refiner = None
    torch.testing.assert_close(network_object(without, scan)[0], generator_only)


def test_bundle_round_trip_of_the_refiner(scan, tmp_path):
    """The refiner is saved in diffraction_to_obj and on its own as 'refiner' (as the generator is as
    'autoencoder'), and loads back to the same outputs."""
    model = _model(scan).eval()
    torch.manual_seed(3)
    for p in model.refiner.parameters():
        torch.nn.init.normal_(p, std=0.05)
    path = save_model_bundle(model, tmp_path / "m.wts.h5.zip")
    bundle = read_bundle(path)
    assert {"diffraction_to_obj", "autoencoder", "refiner"} <= set(bundle.models)
    assert set(bundle.models["refiner"]) == set(model.refiner.state_dict())
    loaded, _ = load_model_bundle(path)
    assert loaded.cfg.refiner_stages == 2
    probe, positions, amplitudes = _inputs(scan)
    start = torch.ones(scan.obj_shape, dtype=torch.complex64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.refine_stitched(start, probe, positions, amplitudes),
                                   model.refine_stitched(start, probe, positions, amplitudes))


def test_a_bundle_whose_refiner_group_disagrees_is_refused(scan, tmp_path):
    model = _model(scan)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    refiner = {k: v.numpy().copy() for k, v in model.refiner.state_dict().items()}
    refiner["log_step"] = refiner["log_step"] + 1
    common = dict(probe=model.probe.numpy(), amplitude_scale=float(model.amplitude_scale),
                  config={"model": model.cfg.to_dict()})
    generator = {k: v.numpy() for k, v in model.generator.state_dict().items()}
    bad = write_bundle(tmp_path / "bad.wts.h5.zip", models={"diffraction_to_obj": state, "autoencoder": generator,
                                                            "refiner": refiner}, **common)
    with pytest.raises(PtychoInputError, match=r"model 'refiner': differs from the learned refinement inside "
                                               r"'diffraction_to_obj', expected identical weights"):
        load_model_bundle(bad)
    missing = write_bundle(tmp_path / "missing.wts.h5.zip", models={"diffraction_to_obj": state,
                                                                    "autoencoder": generator}, **common)
    with pytest.raises(PtychoInputError, match=r"model 'refiner': missing, expected identical weights"):
        load_model_bundle(missing)


def test_a_bundle_from_before_the_refiner_loads_without_one(scan, tmp_path):
    """A model config without ``refiner_stages`` (bundles written before the learned refinement) means none."""
    model = _model(scan, stages=0)
    config = model.cfg.to_dict()
    del config["refiner_stages"], config["refiner_width"]
    path = write_bundle(tmp_path / "old.wts.h5.zip", models={
        "diffraction_to_obj": {k: v.numpy() for k, v in model.state_dict().items()},
        "autoencoder": {k: v.numpy() for k, v in model.generator.state_dict().items()}},
        probe=model.probe.numpy(), amplitude_scale=float(model.amplitude_scale), config={"model": config})
    loaded, _ = load_model_bundle(path)
    assert loaded.refiner is None and loaded.cfg.refiner_stages == 0
    with zipfile.ZipFile(path) as z:
        assert "refiner" not in json.loads(z.read("manifest.json"))["models"]
    # and a model without stages is written as before, so that older readers (strict about keys) still load it
    again = save_model_bundle(loaded, tmp_path / "again.wts.h5.zip")
    assert read_bundle(again).config["model"] == config


def test_refiner_settings_are_validated_and_default_to_the_preset():
    assert ModelConfig().refiner_stages == 4 and ModelConfig(preset="tiny").refiner_stages == 1
    assert ModelConfig(refiner_stages=0).refiner_stages == 0
    assert TrainingConfig().refiner_iterations == 600
    with pytest.raises(PtychoInputError, match=r"ModelConfig\.refiner_stages: found 17, expected 0\.\.16"):
        ModelConfig(refiner_stages=17)
    with pytest.raises(PtychoInputError, match=r"ModelConfig\.refiner_width: found 0, expected >= 1"):
        ModelConfig(refiner_width=0)
    with pytest.raises(PtychoInputError, match=r"TrainingConfig\.refiner_iterations: found -1, expected >= 0"):
        TrainingConfig(refiner_iterations=-1)
