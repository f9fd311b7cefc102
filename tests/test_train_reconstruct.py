"""Training, the bundle round trip, stitched reconstruction and refinement, on tiny seeded scans."""

import numpy as np
import pytest
import torch

from ptycho_ml.inference import metrics
from ptycho_ml.physics import forward as physics
from ptycho_ml.config import InferenceConfig, ModelConfig, TrainingConfig
from ptycho_ml.data import load_scan
from ptycho_ml.data.scan import ScanData
from ptycho_ml.errors import PtychoInputError
from ptycho_ml.model.bundle_io import load_model_bundle, save_model_bundle
from ptycho_ml.model.network import DiffractionToObject
from ptycho_ml.inference.reconstruct import network_object, reconstruct
from ptycho_ml.physics.refine import refine_object
from ptycho_ml.lifecycle.training import train


def _config(tmp_path, data, test=None, **changes):
    base = {"data": str(data), "test_data": str(test or ""), "output_dir": str(tmp_path / "out"),
            "model": {"preset": "tiny", "N": 32}, "epochs": 2, "batch_size": 16, "quiet": True, "threads": 1}
    base.update(changes)
    return TrainingConfig.from_dict(base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_npz, tiny_test_npz):
    tmp = tmp_path_factory.mktemp("train")
    return train(_config(tmp, tiny_npz, tiny_test_npz), evaluate_refine_steps=5)


def test_training_writes_one_bundle_with_scale_and_metrics(trained):
    assert trained.bundle_path.name == "wts.h5.zip" and trained.bundle_path.is_file()
    assert len(trained.history) == 2 and all("val_loss" in h and "lr" in h for h in trained.history)
    model, info = load_model_bundle(trained.bundle_path)
    assert float(model.amplitude_scale) == pytest.approx(trained.amplitude_scale)
    assert info["config"]["training"]["epochs"] == 2
    assert {"test_network_amplitude_ssim", "test_refined_phase_ssim"} <= set(trained.metrics)
    assert info["extra"]["dataset"]["sha256"] == trained.dataset["sha256"]


def test_training_trains_the_learned_refinement_after_the_generator_and_bundles_it(trained):
    """The tiny preset has one unrolled stage; it is trained (its correction head moved off zero) over
    ``refiner_iterations`` windows, its curve is in the bundle, and it is saved on its own as 'refiner'."""
    from ptycho_ml.model.bundle import read_bundle

    refiner = trained.model.refiner
    assert refiner is not None and refiner.stages == 1
    assert float(refiner.corrections[0].head.weight.abs().sum()) > 0
    bundle = read_bundle(trained.bundle_path)
    assert set(bundle.models["refiner"]) == set(refiner.state_dict())
    curve = bundle.extra["refiner_loss"]
    assert len(curve) == TrainingConfig().refiner_iterations // 10 and all(np.isfinite(curve))
    assert bundle.config["model"]["refiner_stages"] == 1


def test_reloaded_model_gives_bit_identical_outputs(trained, tmp_path):
    amp = torch.rand(3, trained.model.cfg.gridsize**2, 32, 32) * 20
    with torch.no_grad():
        before = trained.model(amp)
    path = save_model_bundle(trained.model, tmp_path / "copy.wts.h5.zip")
    model, _ = load_model_bundle(path)
    with torch.no_grad():
        after = model(amp)
    assert torch.equal(before, after)


def test_training_is_reproducible_with_the_same_seed(tmp_path, tiny_npz):
    runs = [train(_config(tmp_path / str(i), tiny_npz, epochs=1)).model.state_dict() for i in range(2)]
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    other = train(_config(tmp_path / "other", tiny_npz, epochs=1, seed=5)).model.state_dict()
    assert any(not torch.equal(runs[0][k], other[k]) for k in runs[0] if k.startswith("generator."))


def test_resume_continues_from_the_checkpoint(tmp_path, tiny_npz):
    first = train(_config(tmp_path, tiny_npz, epochs=1))
    last = tmp_path / "out" / "checkpoints" / "last.ckpt"
    assert last.is_file() and len(first.history) == 1
    resumed = train(_config(tmp_path, tiny_npz, epochs=3, resume=str(last)))
    assert [h["epoch"] for h in resumed.history] == [1, 2]


def test_resume_from_a_missing_checkpoint_is_a_clear_error(tmp_path, tiny_npz):
    with pytest.raises(PtychoInputError, match="--resume: found .* expected an existing checkpoint"):
        train(_config(tmp_path, tiny_npz, resume=str(tmp_path / "nope.ckpt")))


@pytest.mark.parametrize("gridsize", [1, 2])
def test_both_gridsizes_train_and_reconstruct_every_pattern_once(tmp_path, tiny_npz, gridsize):
    result = train(_config(tmp_path, tiny_npz, epochs=1, model={"preset": "tiny", "N": 32, "gridsize": gridsize}))
    assert result.model.cfg.gridsize == gridsize
    scan = load_scan(tiny_npz)
    obj, illumination = network_object(result.model, scan, batch_size=9)
    assert obj.shape == scan.obj_shape and torch.isfinite(obj).all()
    expected = physics.insert_patches((torch.from_numpy(scan.probe).abs() ** 2).expand(len(scan), 32, 32),
                                      torch.from_numpy(scan.positions_px.astype(np.float32)), scan.obj_shape)
    assert torch.allclose(illumination, expected, rtol=1e-4)


def test_supervised_baseline_trains(tmp_path, tiny_npz):
    result = train(_config(tmp_path, tiny_npz, epochs=1, loss="supervised"))
    assert np.isfinite(result.history[-1]["train_loss"])


def test_gpu_request_without_a_gpu_is_a_clear_error(tmp_path, tiny_npz):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(PtychoInputError, match="accelerator: found 'gpu'"):
        train(_config(tmp_path, tiny_npz, accelerator="gpu"))


def test_reconstruction_uses_every_pattern_and_is_independent_of_the_batch(trained, tiny_test_npz):
    scan = load_scan(tiny_test_npz)
    small, illum = network_object(trained.model, scan, batch_size=7)
    large, _ = network_object(trained.model, scan, batch_size=1000)
    assert torch.allclose(small, large, atol=1e-5)
    # Every pattern contributes: the illumination equals the stitched probe intensity of all positions.
    weight = physics.insert_patches(
        (torch.from_numpy(scan.probe).abs() ** 2).expand(len(scan), 32, 32),
        torch.from_numpy(scan.positions_px.astype(np.float32)), scan.obj_shape)
    assert torch.allclose(illum, weight, rtol=1e-4)


def test_refinement_lowers_the_data_loss_and_improves_the_object(trained, tiny_test_npz):
    scan = load_scan(tiny_test_npz)
    start, _ = network_object(trained.model, scan)
    result = refine_object(start, scan, torch.from_numpy(scan.probe), 15)
    assert result.loss_history[-1] < 0.5 * result.loss_history[0]
    before = metrics.evaluate_object(start.numpy(), scan.obj, scan.positions_px, scan.N, scan.probe)
    after = metrics.evaluate_object(result.obj.numpy(), scan.obj, scan.positions_px, scan.N, scan.probe)
    assert after["amplitude_ssim"] > before["amplitude_ssim"]


def test_refinement_recovers_a_known_object_from_noise_free_data():
    from ptycho_ml.physics import simulate
    from simdata import tiny_config

    cfg = tiny_config(nphotons=1e6)
    rng = np.random.default_rng(0)
    obj, probe, pos = simulate.make_object(cfg, rng), simulate.make_probe(cfg), simulate.make_positions(cfg, rng)
    amp = simulate.simulate_diffraction(obj, probe, pos, rng=None)
    scan = ScanData(amp, probe, pos, obj.shape, obj)
    result = refine_object(torch.ones(obj.shape, dtype=torch.complex64), scan, torch.from_numpy(probe), 150)
    m = metrics.evaluate_object(result.obj.numpy(), obj, pos, cfg.N, probe)
    assert m["amplitude_ssim"] > 0.95 and m["phase_ssim"] > 0.9


def test_finetune_variant_runs_and_keeps_the_original_model(trained, tiny_test_npz):
    scan = load_scan(tiny_test_npz)
    before = {k: v.clone() for k, v in trained.model.state_dict().items()}
    result = reconstruct(trained.model, scan, InferenceConfig(refine_steps=1, refine_method="finetune",
                                                              finetune_epochs=1, progress=False))
    assert result.obj.shape == scan.obj_shape and "finetune_s" in result.timings_s
    assert all(torch.equal(before[k], v) for k, v in trained.model.state_dict().items())


def test_wrong_pattern_size_is_a_clear_error(trained, tmp_path):
    from ptycho_ml.physics import simulate
    from simdata import tiny_config

    path = simulate.write_simulated(simulate.simulate_scan(tiny_config(N=16, object_size_px=40)), tmp_path / "n16.npz")
    with pytest.raises(PtychoInputError, match=r"found 16x16 patterns, expected 32x32 for this model"):
        reconstruct(trained.model, load_scan(path), InferenceConfig(progress=False))


def test_probe_on_another_scale_is_rescaled_with_a_warning(trained, tiny_test_npz):
    scan = load_scan(tiny_test_npz)
    scaled = ScanData(scan.patterns, scan.probe / np.abs(scan.probe).max(), scan.positions_px, scan.obj_shape, scan.obj)
    with pytest.warns(UserWarning, match="probe scale does not match"):
        a = reconstruct(trained.model, scaled, InferenceConfig(refine_steps=0, progress=False)).obj
    b = reconstruct(trained.model, scan, InferenceConfig(refine_steps=0, progress=False)).obj
    # The rescaled probe's scale is estimated from the counts (exact up to the object's mean transmission), and
    # the model's learned stages fit the object's amplitude to the data through it: close, not identical.
    # Unrescaled, the probe here is off by a factor of ~10 in amplitude.
    assert np.abs(np.abs(a) - np.abs(b)).mean() < 0.1


def test_untrained_generator_returns_the_physics_estimate():
    cfg = ModelConfig(preset="tiny", N=32, gridsize=1)
    probe = torch.ones(32, 32, dtype=torch.complex64)
    model = DiffractionToObject(cfg, probe, 1.0)
    amp = physics.far_field_amplitude(probe, torch.ones(2, 1, 32, 32, dtype=torch.complex64))
    with torch.no_grad():
        out = model(amp)
    assert torch.allclose(out, physics.single_pattern_estimate(amp, probe, cfg.input_iterations), atol=1e-4)


def test_learning_curve_and_preview_hook_see_each_epoch(tmp_path, tiny_npz, tiny_test_npz):
    """Without a tracking logger the loop writes Lightning's CSV learning curve (losses and the LR monitor's lr)."""
    import csv

    previews = []
    result = train(_config(tmp_path, tiny_npz, tiny_test_npz, epochs=2, preview_every_n_epochs=1),
                   preview_sink=lambda e, obj, scan: previews.append((e, obj.shape, scan.source)),
                   evaluate_refine_steps=0)
    assert [h["epoch"] for h in result.history] == [0, 1]
    assert all({"train_loss", "val_loss", "lr"} <= set(h) for h in result.history)
    (curve,) = (tmp_path / "out" / "logs").rglob("metrics.csv")
    rows = list(csv.DictReader(curve.open()))
    val = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    lr = [float(r["lr"]) for r in rows if r.get("lr")]
    assert val == pytest.approx([h["val_loss"] for h in result.history], rel=1e-5)
    assert lr[0] == pytest.approx(result.history[0]["lr"]) and len(lr) == 2
    assert [p[0] for p in previews] == [1, 2] and previews[0][1] == result.test_scan.obj_shape