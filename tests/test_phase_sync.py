"""Phase synchronisation of patches before stitching: offsets recovered, amplitudes untouched, stitching helped."""

from __future__ import annotations

import numpy as np
import torch

from ptycho_ml.inference import metrics
from ptycho_ml.inference.phase_sync import neighbour_pairs, synchronise_phases
from ptycho_ml.physics import forward as physics
from ptycho_ml.physics import simulate
from ptycho_ml.physics.stitching import stitch
from simdata import tiny_config


def _true_patches(seed: int = 3):
    scan = simulate.simulate_scan(tiny_config(seed=seed))
    obj = torch.from_numpy(scan.obj.astype(np.complex64))
    positions = torch.from_numpy(scan.positions_px.astype(np.float32))
    probe = torch.from_numpy(scan.probe.astype(np.complex64))
    return scan, physics.extract_patches(obj, positions, probe.shape[-1]), positions, probe


def test_random_offsets_are_removed_up_to_one_global_phase():
    scan, patches, positions, probe = _true_patches()
    offsets = torch.from_numpy(np.random.default_rng(0).uniform(-np.pi, np.pi, len(patches)).astype(np.float32))
    scrambled = patches * torch.polar(torch.ones_like(offsets), offsets)[:, None, None]
    synced = synchronise_phases(scrambled, positions, physics.intensity_of(probe))
    # Each synced patch equals the true one times one common factor.
    ratio = (synced * patches.conj()).sum(dim=(-2, -1))
    residual = torch.angle(ratio * ratio[0].conj())
    assert float(residual.abs().max()) < 0.05
    assert torch.allclose(synced.abs(), scrambled.abs())


def test_synchronised_stitch_scores_like_the_truth_and_scrambled_does_not():
    scan, patches, positions, probe = _true_patches()
    weight = physics.intensity_of(probe)
    offsets = torch.from_numpy(np.random.default_rng(1).uniform(-np.pi, np.pi, len(patches)).astype(np.float32))
    scrambled = patches * torch.polar(torch.ones_like(offsets), offsets)[:, None, None]

    def phase_ssim(p):
        obj = stitch(p, positions, scan.obj.shape, weight).numpy()
        return metrics.evaluate_object(obj, scan.obj, scan.positions_px, probe.shape[-1], scan.probe)["phase_ssim"]

    assert phase_ssim(synchronise_phases(scrambled, positions, weight)) > 0.95
    assert phase_ssim(scrambled) < 0.7


def test_pairs_are_close_unique_and_ordered():
    positions = np.array([[0.0, 0.0], [10.0, 0.0], [200.0, 0.0], [205.0, 0.0]])
    pairs = neighbour_pairs(positions, N=32)
    assert pairs.tolist() == [[0, 1], [2, 3]]


def test_separate_pieces_are_each_synchronised():
    # Two scans far apart: no overlap between them, each piece is aligned on its own.
    scan, patches, positions, probe = _true_patches()
    far = positions + 10_000.0
    both_p = torch.cat([patches, patches])
    both_x = torch.cat([positions, far])
    offsets = torch.from_numpy(np.random.default_rng(2).uniform(-np.pi, np.pi, len(both_p)).astype(np.float32))
    synced = synchronise_phases(both_p * torch.polar(torch.ones_like(offsets), offsets)[:, None, None], both_x,
                                physics.intensity_of(probe))
    for part in (synced[:len(patches)], synced[len(patches):]):
        ratio = (part * patches.conj()).sum(dim=(-2, -1))
        assert float(torch.angle(ratio * ratio[0].conj()).abs().max()) < 0.05


def test_the_anchor_ties_patches_to_their_own_phase():
    # Patches that are already right: a strong anchor leaves them as they are, none lets them float
    # by one global phase only; a weak anchor on scrambled patches still removes the scrambling.
    scan, patches, positions, probe = _true_patches()
    weight = physics.intensity_of(probe)
    kept = synchronise_phases(patches, positions, weight, anchor=100.0)
    assert float(torch.angle((kept * patches.conj()).sum(dim=(-2, -1))).abs().max()) < 0.01
    offsets = torch.from_numpy(np.random.default_rng(3).uniform(-np.pi, np.pi, len(patches)).astype(np.float32))
    scrambled = patches * torch.polar(torch.ones_like(offsets), offsets)[:, None, None]
    weak = synchronise_phases(scrambled, positions, weight, anchor=1e-3)
    ratio = (weak * patches.conj()).sum(dim=(-2, -1))
    assert float(torch.angle(ratio * ratio[0].conj()).abs().max()) < 0.1
