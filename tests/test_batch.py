"""``ptycho-ml batch``: many scans, the local engine and Spark (``local[2]``), one summary table, a bad scan reported.

Real components: a temporary sqlite tracking store with a registered tiny
model, local Spark, the CLI as a subprocess, the project's simulated scans.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from ptycho_ml.inference.outputs import OUTPUT_FILES

MODEL = "models:/batchmodel/1"

# Real subprocesses (several training processes, the CLI, Spark): the suite's slow tier.
pytestmark = [pytest.mark.slow]


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               MLFLOW_TRACKING_URI=f"sqlite:///{root / 'mlflow.db'}", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    env.pop("MLFLOW_RUN_ID", None)
    return env


def _cli(root: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptycho_ml.cli", *args], env=_env(root), cwd=root,
                          capture_output=True, text=True, timeout=timeout)


_REGISTER = """
import sys, torch
from ptycho_ml import flavor
from ptycho_ml.config import ModelConfig
from ptycho_ml.data.readers import load_scan
from ptycho_ml.model.datamodule import compute_amplitude_scale
from ptycho_ml.model.network import DiffractionToObject
import mlflow
scan = load_scan(sys.argv[1])
torch.manual_seed(0)
model = DiffractionToObject(ModelConfig(preset="tiny", N=scan.N), torch.from_numpy(scan.probe),
                            compute_amplitude_scale(scan))
with mlflow.start_run():
    flavor.log_model(model, name="model", registered_model_name="batchmodel")
"""


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_npz, tiny_test_npz):
    """Two good scans and a broken one, and a tiny model registered as batchmodel version 1."""
    root = tmp_path_factory.mktemp("batch")
    scans = root / "scans"
    scans.mkdir()
    shutil.copy(tiny_npz, scans / "a.npz")
    shutil.copy(tiny_test_npz, scans / "b.npz")
    (scans / "broken.npz").write_bytes(b"not a scan at all")
    proc = subprocess.run([sys.executable, "-c", _REGISTER, str(tiny_npz)], env=_env(root), cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _summary(out: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((out / "summary.csv").open()))


def _arrays(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path) as f:
        return {k: f[k][()] for k in f if isinstance(f[k], h5py.Dataset)}


@pytest.fixture(scope="module")
def local_run(workspace):
    proc = _cli(workspace, "batch", "--model", MODEL, "--scans", "scans/*.npz", "--out", "out_local",
                "--refine-steps", "2", "--threads", "1", "--quiet")
    return proc, workspace / "out_local"


def test_local_engine_writes_what_reconstruct_writes_per_scan_and_reports_the_bad_scan(local_run, workspace):
    proc, out = local_run
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: 1 of 3 scans failed" in proc.stderr and "Traceback" not in proc.stderr
    rows = {Path(r["scan"]).name: r for r in _summary(out)}
    assert [rows[n]["status"] for n in ("a.npz", "b.npz", "broken.npz")] == ["ok", "ok", "error"]
    assert "broken.npz" in rows["broken.npz"]["error"] and "expected" in rows["broken.npz"]["error"]
    assert int(rows["a.npz"]["n_patterns"]) > 0 and float(rows["b.npz"]["amplitude_ssim"]) > 0
    assert not (out / "broken").exists()  # nothing written for the scan that failed
    # The same files, and the same object, as `ptycho-ml reconstruct` on that scan.
    single = _cli(workspace, "reconstruct", "--model", MODEL, "--data", "scans/a.npz", "--out", "single_a",
                  "--refine-steps", "2", "--threads", "1", "--quiet")
    assert single.returncode == 0, single.stderr[-3000:]
    assert sorted(p.name for p in (out / "a").iterdir()) == sorted(p.name for p in (workspace / "single_a").iterdir())
    assert set(OUTPUT_FILES) <= {p.name for p in (out / "a").iterdir()}
    np.testing.assert_array_equal(_arrays(out / "a" / "object.h5")["object"],
                                  _arrays(workspace / "single_a" / "object.h5")["object"])
    assert json.loads((out / "a" / "summary.json").read_text())["provenance"]["version"] == "1"


def test_manifest_lists_scans_relative_to_itself(workspace):
    (workspace / "scans" / "list.txt").write_text("# one scan\n\nb.npz\n")
    proc = _cli(workspace, "batch", "--model", MODEL, "--scans", "scans/list.txt", "--out", "out_manifest",
                "--refine-steps", "0", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = _summary(workspace / "out_manifest")
    assert row["status"] == "ok" and (workspace / "out_manifest" / "b" / "object.h5").is_file()


@pytest.mark.parametrize("scans, message", [
    ("nothing/*.npz", "matches no file, expected a glob of scans"),
    ("missing.txt", "manifest 'missing.txt' not found"),
])
def test_bad_scan_selections_are_one_line_errors(workspace, scans, message):
    proc = _cli(workspace, "batch", "--model", MODEL, "--scans", scans, "--out", "out_bad", "--quiet")
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (workspace / "out_bad").exists()


def test_same_file_names_in_two_folders_are_refused_before_any_work(workspace):
    other = workspace / "more"
    other.mkdir(exist_ok=True)
    shutil.copy(workspace / "scans" / "a.npz", other / "a.npz")
    (workspace / "dupes.txt").write_text("scans/a.npz\nmore/a.npz\n")
    proc = _cli(workspace, "batch", "--model", MODEL, "--scans", "dupes.txt", "--out", "out_dupes", "--quiet")
    assert proc.returncode == 2 and "would both write 'a/'" in proc.stderr
    assert not (workspace / "out_dupes").exists()


@pytest.mark.slow
def test_spark_engine_equals_the_local_engine_bit_for_bit(local_run, workspace):
    proc = _cli(workspace, "batch", "--model", MODEL, "--scans", "scans/*.npz", "--out", "out_spark",
                "--engine", "spark", "--master", "local[2]", "--refine-steps", "2", "--threads", "1", "--quiet")
    assert proc.returncode == 2 and "error: 1 of 3 scans failed" in proc.stderr, proc.stderr[-3000:]
    local, spark = _summary(local_run[1]), _summary(workspace / "out_spark")
    assert [(r["scan"], r["status"]) for r in spark] == [(r["scan"], r["status"]) for r in local]
    assert "broken.npz: not an NPZ or HDF5 file" in spark[-1]["error"]
    for name in ("a", "b"):
        # Same code, same model version, one thread each: the same float32 arithmetic, bit for bit.
        ours, theirs = _arrays(local_run[1] / name / "object.h5"), _arrays(workspace / "out_spark" / name / "object.h5")
        assert ours.keys() == theirs.keys()
        for key in ours:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{name}/object.h5:{key}")
        local_summary = json.loads((local_run[1] / name / "summary.json").read_text())
        spark_summary = json.loads((workspace / "out_spark" / name / "summary.json").read_text())
        assert spark_summary["provenance"] == local_summary["provenance"]
        assert spark_summary["metrics"] == local_summary["metrics"]
