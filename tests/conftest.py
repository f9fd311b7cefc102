"""Shared fixtures: tiny scans made by the project's own simulator (nothing large is committed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ptycho_ml.physics import simulate
from simdata import tiny_config

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_scan():
    return simulate.simulate_scan(tiny_config())


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory, tiny_scan):
    path = tmp_path_factory.mktemp("scan") / "tiny.npz"
    simulate.write_simulated(tiny_scan, path)
    return path


@pytest.fixture(scope="session")
def tiny_test_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("scan") / "tiny_test.npz"
    simulate.write_simulated(simulate.simulate_scan(tiny_config(seed=11, object_size_px=64)), path)
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)
