"""The tracked training run as the MLflow UI shows it: the logged model's metrics and the preview PNGs.

A real in-process ``train_tracked`` (tiny preset, 2 epochs, held-out scan with
ground truth) on a temporary sqlite store; the logged model is read back with
``MlflowClient.get_logged_model``.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from ptycho_ml.config import TrainingConfig
from ptycho_ml.data.scan import centres_box
from ptycho_ml.inference.outputs import preview_panels, write_previews
from ptycho_ml.lifecycle.tracking import train_tracked


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, tiny_npz, tiny_test_npz):
    from mlflow.tracking._tracking_service import utils as tracking_utils

    old_uri = tracking_utils._tracking_uri
    root = tmp_path_factory.mktemp("tracking")
    config = TrainingConfig.from_dict({"data": str(tiny_npz), "test_data": str(tiny_test_npz),
                                       "output_dir": str(root / "out"), "model": {"preset": "tiny", "N": 32},
                                       "epochs": 2, "batch_size": 16, "quiet": True, "threads": 1,
                                       "preview_every_n_epochs": 1})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # MLflow writes nothing into the repository
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        uri = f"sqlite:///{root}/mlflow.db"
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        try:
            result, info, run_id = train_tracked(config, register_as=None)
            yield {"result": result, "info": info, "run_id": run_id, "client": MlflowClient(uri), "root": root}
        finally:
            mlflow.set_tracking_uri(old_uri)


def test_logged_model_carries_the_final_losses_and_every_held_out_figure(tracked):
    client, result = tracked["client"], tracked["result"]
    history = result.history
    assert len(history) == 2
    # The bundle holds the best validation weights; in this seeded run that is the last epoch.
    assert min(history, key=lambda h: h["val_loss"]) is history[-1], history
    linked = {}
    for metric in client.get_logged_model(tracked["info"].model_id).metrics:
        linked.setdefault(metric.key, []).append(metric)
    last = history[-1]
    for key in ("train_loss", "val_loss"):
        assert [m.value for m in linked[key]] == [pytest.approx(last[key], rel=1e-6)], (key, linked[key], history)
        assert linked[key][0].value != pytest.approx(history[0][key], rel=1e-9)  # not epoch 0's
    assert {m.value for m in linked["epoch"]} == {1.0}
    # linked at the step Lightning logged the last epoch at, the step the run records the model at
    (logged_at,) = {m.step for m in client.get_metric_history(tracked["run_id"], "val_loss") if m.value == linked["val_loss"][0].value}
    assert linked["val_loss"][0].step == logged_at > 0
    outputs = client.get_run(tracked["run_id"]).outputs.model_outputs
    assert [(o.model_id, o.step) for o in outputs] == [(tracked["info"].model_id, logged_at)]
    tests = {k: v for k, v in result.metrics.items() if k.startswith("test_")}
    assert len(tests) > 8 and {"test_network_amplitude_ssim", "test_refined_phase_ssim"} <= set(tests)
    for key, value in tests.items():
        if np.isfinite(value):
            assert [m.value for m in linked[key]] == [pytest.approx(value)], key
        else:  # on the run only: MLflow would show a NaN linked to the model as 0
            assert key not in linked and np.isnan(client.get_run(tracked["run_id"]).data.metrics[key]), key
    assert "lr" not in linked  # epoch 0's learning rate is no figure of the model


def _png_width(path) -> int:
    import matplotlib.image

    return matplotlib.image.imread(path).shape[1]


def test_training_previews_show_reconstruction_truth_and_error_side_by_side(tracked, tmp_path):
    client, run_id = tracked["client"], tracked["run_id"]
    names = {a.path for d in ("reconstruction/network", "previews/epoch_001")
             for a in client.list_artifacts(run_id, d)}
    assert {"reconstruction/network/amplitude.png", "reconstruction/network/phase.png",
            "previews/epoch_001/phase.png"} <= names, names
    logged = client.download_artifacts(run_id, "reconstruction/network/phase.png", str(tmp_path))
    scan, obj = tracked["result"].test_scan, tracked["result"].test_reconstruction.network_obj
    region = centres_box(scan.positions_px, scan.obj_shape)  # the crop the logged previews have
    (alone,) = [p for p in write_previews(tmp_path / "alone", obj, region=region) if p.name == "phase.png"]
    # three panels of the single panel's width (each with its colour bar)
    assert _png_width(logged) == pytest.approx(3 * _png_width(alone), rel=0.05)


def test_preview_panels_align_the_global_phase_before_the_error():
    rng = np.random.default_rng(3)
    truth = (0.5 + rng.random((24, 20))) * np.exp(1j * rng.uniform(-1, 1, (24, 20)))
    shifted = (truth * np.exp(1j * 0.7)).astype(np.complex64)  # only a global phase off: no error
    panels = preview_panels(shifted, truth)
    assert [p[0] for p in panels["phase"]] == ["reconstruction phase", "ground truth phase", "error phase"]
    assert np.abs(panels["phase"][2][1]).max() < 1e-5 and np.abs(panels["amplitude"][2][1]).max() < 1e-5
    damaged = shifted.copy()
    damaged[3, 4] *= 1.5
    error = preview_panels(damaged, truth)["amplitude"][2][1]
    assert error[3, 4] == pytest.approx(0.5 * abs(truth[3, 4]), rel=1e-5) and np.count_nonzero(np.abs(error) > 1e-5) == 1
    assert len(preview_panels(shifted)["phase"]) == 1


def test_previews_refuse_a_truth_of_another_shape(tmp_path):
    from ptycho_ml.errors import PtychoInputError

    with pytest.raises(PtychoInputError, match=r"ground truth: found shape \(4, 4\), expected the object's \(8, 8\)"):
        write_previews(tmp_path, np.ones((8, 8), np.complex64), truth=np.ones((4, 4), np.complex64))
    assert not list(tmp_path.iterdir())
