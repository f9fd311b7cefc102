"""Fast checks of the scale-out helpers: which scans a batch names, their output names, a process's launch rank."""

from __future__ import annotations

import pytest

from ptycho_ml.config import TrainingConfig
from ptycho_ml.errors import PtychoInputError
from ptycho_ml.lifecycle.batch import list_scans, output_names
from ptycho_ml.model.training import launch_rank


def test_globs_and_manifests_list_scans_in_order(tmp_path):
    for name in ("b.npz", "a.npz", "c.h5"):
        (tmp_path / name).write_bytes(b"x")
    assert list_scans(str(tmp_path / "*.npz")) == [str(tmp_path / "a.npz"), str(tmp_path / "b.npz")]
    assert list_scans(str(tmp_path / "c.h5")) == [str(tmp_path / "c.h5")]  # a plain path matches itself
    (tmp_path / "list.txt").write_text("# beamtime 7\nc.h5\n\n/abs/x.npz\ns3://bucket/y.npz\n")
    assert list_scans(str(tmp_path / "list.txt")) == [str(tmp_path / "c.h5"), "/abs/x.npz", "s3://bucket/y.npz"]


@pytest.mark.parametrize("content, message", [(None, "not found"), ("# nothing\n\n", "lists no scans")])
def test_a_missing_or_empty_manifest_is_a_one_line_error(tmp_path, content, message):
    if content is not None:
        (tmp_path / "list.txt").write_text(content)
    with pytest.raises(PtychoInputError, match=message):
        list_scans(str(tmp_path / "list.txt"))


def test_output_names_are_file_stems_and_ptychodus_folders_and_must_be_distinct():
    assert output_names(["d/x.v2.npz", "run7/diffraction.h5", "s3://b/scan.h5"]) == ["x.v2", "run7", "scan"]
    with pytest.raises(PtychoInputError, match="would both write 'a/'"):
        output_names(["one/a.npz", "two/a.h5"])


@pytest.mark.parametrize("env, rank", [
    ({}, 0),                                          # alone
    ({"RANK": "3", "LOCAL_RANK": "1"}, 3),            # torchrun, Lightning's workers
    ({"LOCAL_RANK": "1"}, 1),                         # Lightning's relaunch of the command (ddp)
    ({"NODE_RANK": "1", "LOCAL_RANK": "1"}, 5),       # node 1 of devices=4
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4"}, 2),  # srun
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, 0),  # a plain sbatch script
])
def test_launch_rank_reads_the_launchers_environment(monkeypatch, env, rank):
    for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert launch_rank(TrainingConfig(devices=4)) == rank


def test_devices_and_nodes_must_be_positive():
    with pytest.raises(PtychoInputError, match="devices: found 0, expected >= 1"):
        TrainingConfig(devices=0)
    with pytest.raises(PtychoInputError, match="num_nodes: found 0"):
        TrainingConfig(num_nodes=0)
