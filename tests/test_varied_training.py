"""Training across several scans, each with its own probe: per-item probes, the probe bank, the data module."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ptycho_ml.config import ModelConfig, SimulationConfig, TrainingConfig
from ptycho_ml.data import load_scan
from ptycho_ml.data.scan import dataset_fingerprint
from ptycho_ml.errors import PtychoInputError
from ptycho_ml.lifecycle.training import train
from ptycho_ml.model.datamodule import ScanDataModule
from ptycho_ml.model.module import physics_step
from ptycho_ml.model.network import DiffractionToObject
from ptycho_ml.physics import forward as physics
from ptycho_ml.physics import simulate
from simdata import tiny_config


@pytest.fixture(scope="module")
def two_probe_scans(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("varied")
    paths = []
    for i, kind in enumerate(("focused", "aberrated")):
        cfg = tiny_config(seed=20 + i, probe_kind=kind, object_families=("dead_leaves", "fractal") if i else ("lines",))
        paths.append(simulate.write_simulated(simulate.simulate_scan(cfg), tmp / f"scan{i}.npz"))
    return paths


def test_aberrated_probes_differ_by_seed_and_keep_the_photon_count():
    a = simulate.make_probe(tiny_config(probe_kind="aberrated", seed=1))
    b = simulate.make_probe(tiny_config(probe_kind="aberrated", seed=2))
    focused = simulate.make_probe(tiny_config(probe_kind="focused", seed=1))
    for p in (a, b):
        assert np.sum(np.abs(p) ** 2) == pytest.approx(tiny_config().nphotons, rel=1e-4)
    assert np.abs(a - b).max() > 0.1 * np.abs(a).max() and np.abs(a - focused).max() > 0.1 * np.abs(a).max()


@pytest.mark.parametrize("family", ["dead_leaves", "fractal"])
def test_procedural_textures_fill_the_range_with_structure(family):
    t = simulate.FAMILIES[family](96, np.random.default_rng(0))
    assert t.shape == (96, 96) and t.min() == 0 and t.max() == 1
    assert np.std(t) > 0.1 and np.abs(np.diff(t, axis=0)).mean() > 0.005  # not flat, not constant


def test_varied_training_configs_vary_probe_family_and_dose():
    configs = simulate.varied_training_configs(N=64, seed=0, n_scans=4)
    assert configs[0].probe_kind == "focused"  # the reference: the default training family
    assert {c.probe_kind for c in configs[1:]} == {"aberrated"}
    assert len({c.nphotons for c in configs}) == 4 and len({c.object_families for c in configs}) >= 3
    assert all(c.N == 64 for c in configs)


def test_per_item_probes_give_what_each_probe_gives_alone():
    cfg = ModelConfig(preset="tiny", N=32, gridsize=2)
    probes = [torch.from_numpy(simulate.make_probe(tiny_config(probe_kind=k, seed=s))) for k, s in
              (("focused", 1), ("aberrated", 2))]
    model = DiffractionToObject(cfg, probes[0], 10.0)
    torch.nn.init.normal_(model.generator.amplitude_head[0].weight, std=0.01)  # a non-trivial network
    amp = torch.rand(2, 4, 32, 32) * 30
    offsets = torch.tensor([[[-3.0, -3.0], [3.0, -3.0], [-3.0, 3.0], [3.0, 3.0]]]).expand(2, 4, 2).contiguous()
    with torch.no_grad():
        bank = torch.stack(probes)[:, None]  # (2, 1, N, N): item b uses probe b
        loss_mixed, patches_mixed = physics_step(model, amp, offsets, "poisson", probe=bank)
        for b in range(2):
            loss_b, patches_b = physics_step(model, amp[b:b + 1], offsets[b:b + 1], "poisson", probe=probes[b])
            assert torch.allclose(patches_mixed[b:b + 1], patches_b, atol=1e-5)
        alone = [physics_step(model, amp[b:b + 1], offsets[b:b + 1], "poisson", probe=probes[b])[0] for b in range(2)]
    assert float(loss_mixed) == pytest.approx(float(sum(alone) / 2), rel=1e-5)


def test_data_module_keeps_scans_apart_and_indexes_their_probes(two_probe_scans):
    scans = [load_scan(p) for p in two_probe_scans]
    config = TrainingConfig.from_dict({"model": {"preset": "tiny", "N": 32}, "batch_size": 8})
    data = ScanDataModule(scans, config, gridsize=2)
    data.setup("fit")
    assert data.probes.shape == (2, 32, 32)
    assert torch.equal(data.probes[1], torch.from_numpy(np.asarray(scans[1].probe, np.complex64)))
    seen = {int(item[2]) for item in data._train}
    assert seen == {0, 1}
    for dataset in data._train.datasets:  # every group lies within one scan
        assert dataset.groups.max() < len(dataset.scan)
    single = ScanDataModule(scans[0], config, gridsize=2)
    assert single.probes is None  # one scan: its own probe (modes and all) is the model's


def test_training_on_two_scans_writes_one_bundle_with_the_reference_probe(tmp_path, two_probe_scans, tiny_test_npz):
    config = TrainingConfig.from_dict({
        "data": ",".join(str(p) for p in two_probe_scans), "test_data": str(tiny_test_npz),
        "output_dir": str(tmp_path / "out"), "model": {"preset": "tiny", "N": 32}, "epochs": 1, "batch_size": 16,
        "quiet": True, "threads": 1})
    result = train(config, evaluate_refine_steps=0)
    reference = torch.from_numpy(np.asarray(load_scan(two_probe_scans[0]).probe, np.complex64))
    assert torch.equal(result.model.probe, reference)
    assert result.dataset["source"] == ",".join(str(p) for p in two_probe_scans)
    assert result.dataset["shape"][0] == sum(len(load_scan(p)) for p in two_probe_scans)
    assert result.dataset["sha256"] != dataset_fingerprint(load_scan(two_probe_scans[0]))["sha256"]


def test_scans_of_different_sizes_are_refused(two_probe_scans, tmp_path):
    other = simulate.write_simulated(simulate.simulate_scan(tiny_config(N=16, object_size_px=48, seed=4)),
                                     tmp_path / "n16.npz")
    config = TrainingConfig.from_dict({"model": {"preset": "tiny", "N": 32}})
    with pytest.raises(PtychoInputError, match="n16.npz: field .*found 16x16 patterns, expected 32x32"):
        ScanDataModule([load_scan(two_probe_scans[0]), load_scan(other)], config, gridsize=2)


def test_a_multi_mode_probe_is_refused_in_a_probe_bank(two_probe_scans):
    from ptycho_ml.model.datamodule import single_mode_probe

    scan = load_scan(two_probe_scans[0])
    scan.probe = np.stack([scan.probe, 0.3 * scan.probe])
    with pytest.raises(PtychoInputError, match="found 2 probe modes, expected one when training on several scans"):
        single_mode_probe(scan)


def test_the_hybrid_loss_is_the_physics_loss_plus_the_weighted_ground_truth_term():
    from ptycho_ml.model.module import HYBRID_SUPERVISED_WEIGHT

    cfg = ModelConfig(preset="tiny", N=32, gridsize=1)
    probe = torch.from_numpy(simulate.make_probe(tiny_config()))
    model = DiffractionToObject(cfg, probe, 10.0)
    amp = torch.rand(3, 1, 32, 32) * 30
    offsets = torch.zeros(3, 1, 2)
    target = torch.polar(torch.rand(3, 1, 32, 32) + 0.5, torch.rand(3, 1, 32, 32))
    with torch.no_grad():
        physics_only, _ = physics_step(model, amp, offsets, "poisson")
        truth_only, _ = physics_step(model, amp, offsets, "supervised", target_patches=target)
        hybrid, _ = physics_step(model, amp, offsets, "hybrid", target_patches=target)
    assert float(hybrid) == pytest.approx(float(physics_only) + HYBRID_SUPERVISED_WEIGHT * float(truth_only), rel=1e-5)
    with pytest.raises(ValueError, match="hybrid loss needs ground-truth patches"):
        physics_step(model, amp, offsets, "hybrid")


def test_hybrid_training_needs_ground_truth_in_every_scan(two_probe_scans, tmp_path):
    from ptycho_ml.data import ScanData

    scan = load_scan(two_probe_scans[0])
    blind = ScanData(scan.patterns, scan.probe, scan.positions_px, scan.obj_shape, None, source="blind.npz")
    config = TrainingConfig.from_dict({"model": {"preset": "tiny", "N": 32}, "loss": "hybrid"})
    data = ScanDataModule([scan, blind], config, gridsize=2)
    with pytest.raises(PtychoInputError, match="blind.npz: field 'objectGuess': missing, expected ground truth for loss='hybrid'"):
        data.setup("fit")


def test_auto_loss_is_hybrid_with_ground_truth_and_physics_without(two_probe_scans):
    from ptycho_ml.data import ScanData
    from ptycho_ml.model.datamodule import resolve_loss

    scan = load_scan(two_probe_scans[0])
    blind = ScanData(scan.patterns, scan.probe, scan.positions_px, scan.obj_shape, None, source="blind.npz")
    assert resolve_loss("auto", [scan]) == "hybrid"
    assert resolve_loss("auto", [scan, blind]) == "poisson"
    assert resolve_loss("poisson", [scan]) == "poisson"
    config = TrainingConfig.from_dict({"model": {"preset": "tiny", "N": 32}})
    assert config.loss == "auto" and ScanDataModule([blind], config, gridsize=2).loss == "poisson"


def test_the_embedded_default_is_the_varied_set_and_the_held_out_scan(tmp_path):
    from ptycho_ml.lifecycle.training import default_data

    train_paths, test_path = default_data(tmp_path, N=16)
    names = [p.rsplit("/", 1)[-1] for p in train_paths.split(",")]
    assert names == ["train_0.npz", "train_1.npz", "train_2.npz", "train_3.npz"]
    assert test_path.endswith("test.npz")
    probes = [np.asarray(load_scan(p).probe) for p in train_paths.split(",")]
    assert all(np.abs(probes[0] - p).max() > 0 for p in probes[1:])  # one probe per scan
