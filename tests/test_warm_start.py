"""The warm-start figures (passes and time a start saves the refinement) tell a good start from a bad one."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ptycho_ml.config import ModelConfig
from ptycho_ml.data import load_scan
from ptycho_ml.errors import PtychoInputError
from ptycho_ml.inference.evaluate import FLAT_PASSES, format_warm_start, warm_start, warm_start_curve
from ptycho_ml.model.network import DiffractionToObject

PASSES = (0, 2, 5, 30)


@pytest.fixture(scope="module")
def scan(tiny_test_npz):
    return load_scan(tiny_test_npz)


def _probe(scan):
    return torch.from_numpy(np.asarray(scan.probe, np.complex64))


def test_the_true_object_needs_no_pass_and_saves_them_all(scan):
    truth = torch.from_numpy(np.asarray(scan.obj, np.complex64))
    ws = warm_start_curve(scan, _probe(scan), truth, start_s=0.0, passes=PASSES)
    f = ws.figures()
    assert ws.passes_needed == 0 and f["passes_saved"] == FLAT_PASSES
    assert ws.curve[0]["amplitude_ssim"] > 0.99 and ws.curve[0]["phase_ssim"] > 0.99
    assert f["time_fraction"] < 0.5 and f["time_saved_s"] > 0


def test_a_flat_start_needs_exactly_the_flat_passes_and_saves_nothing(scan):
    flat = torch.ones(scan.obj_shape, dtype=torch.complex64)
    ws = warm_start_curve(scan, _probe(scan), flat, start_s=0.0, passes=PASSES)
    f = ws.figures()
    assert ws.passes_needed == FLAT_PASSES and f["passes_saved"] == 0
    last = ws.curve[-1]  # the same refinement as the reference, seed included
    assert (last["amplitude_ssim"], last["phase_ssim"]) == (ws.flat_amplitude_ssim, ws.flat_phase_ssim)
    assert [r["passes"] for r in ws.curve] == list(PASSES)


def test_an_untrained_network_is_scored_and_the_table_reads(scan, tiny_scan):
    model = DiffractionToObject(ModelConfig(preset="tiny", N=32, gridsize=1), torch.from_numpy(tiny_scan.probe),
                                float(np.sqrt(np.mean(tiny_scan.amplitude.astype(np.float64) ** 2))))
    ws = warm_start(model, scan, passes=PASSES)
    f = ws.figures()
    assert set(f) == {f"flat{FLAT_PASSES}_amplitude_ssim", f"flat{FLAT_PASSES}_phase_ssim", "passes_needed",
                      "passes_saved", "time_saved_s", "time_fraction"}
    assert ws.passes_needed is None or ws.passes_needed > 0  # the physics estimate alone is no oracle
    assert (math.isnan(f["passes_needed"])) == (ws.passes_needed is None)
    ssims = [r["amplitude_ssim"] for r in ws.curve]
    assert ssims[-1] > ssims[0]  # refinement improves on the start
    assert "flat start + 30 passes" in format_warm_start(ws) and "passes saved" in format_warm_start(ws)


def test_warm_start_needs_ground_truth(scan):
    from ptycho_ml.data import ScanData

    blind = ScanData(scan.patterns, scan.probe, scan.positions_px, scan.obj_shape, None, source="blind.npz")
    with pytest.raises(PtychoInputError, match="blind.npz: field 'objectGuess': found missing, expected a ground-truth object"):
        warm_start_curve(blind, _probe(scan), torch.ones(scan.obj_shape, dtype=torch.complex64), 0.0)
