"""End to end with real components: `mlflow run`, the registry, the batch CLI and `mlflow models serve`.

A temporary sqlite tracking store, real subprocesses, real HTTP on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    env.pop("MLFLOW_RUN_ID", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _run(cmd: list[str], env: dict, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory, tiny_npz, tiny_test_npz):
    """One real `mlflow run . -P backend=torch --env-manager local` with the tiny preset."""
    tmp = tmp_path_factory.mktemp("mlflow_e2e")
    env = _env(tmp)
    cmd = ["mlflow", "run", str(ROOT), "-P", "backend=torch", "-P", "preset=tiny", "-P", "epochs=2",
           "-P", f"data={tiny_npz}", "-P", f"test_data={tiny_test_npz}", "-P", f"out={tmp / 'train'}",
           "--env-manager", "local", "--experiment-name", "e2e"]
    started = time.perf_counter()
    proc = _run(cmd, env, tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"tmp": tmp, "env": env, "proc": proc, "seconds": time.perf_counter() - started}


def test_mlflow_run_logs_params_metrics_artifacts_and_registers(lifecycle):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(lifecycle["env"]["MLFLOW_TRACKING_URI"])
    client = MlflowClient()
    exp = client.get_experiment_by_name("e2e")
    (run,) = client.search_runs([exp.experiment_id])
    params, metrics = run.data.params, run.data.metrics
    assert params["cfg.model.preset"] == "tiny" and params["cfg.epochs"] == "2"
    assert len(params["dataset.sha256"]) == 64 and json.loads(params["dataset.shape"])[1:] == [32, 32]
    for key in ("train_loss", "val_loss", "lr", "test_network_amplitude_ssim", "test_refined_phase_ssim",
                "test_refined_amplitude_frc_px", "test_network_phase_psnr", "test_flat30_amplitude_ssim",
                "test_passes_saved", "test_time_saved_s", "test_time_fraction"):
        assert key in metrics, key
    assert 0 <= metrics["test_passes_saved"] <= 30 and metrics["test_time_fraction"] > 0
    warm = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="warm_start.json")).read_text())
    assert [r["passes"] for r in warm["curve"]] == [0, 2, 5, 8, 10, 20, 30]
    (logged,) = client.search_logged_models(experiment_ids=[exp.experiment_id])
    on_model = {m.key: m.value for m in logged.metrics}
    assert on_model["test_passes_saved"] == metrics["test_passes_saved"]
    assert on_model["test_refined_phase_ssim"] == metrics["test_refined_phase_ssim"]
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"reconstruction", "dataset.json"} <= artifacts
    pngs = {a.path for a in client.list_artifacts(run.info.run_id, "reconstruction/refined")}
    assert "reconstruction/refined/amplitude.png" in pngs and "reconstruction/refined/phase.png" in pngs
    (version,) = client.search_model_versions("name='ptychopinn'")
    assert version.run_id == run.info.run_id


def test_logged_model_has_both_flavours_a_signature_and_pinned_requirements(lifecycle):
    import mlflow
    import yaml

    mlflow.set_tracking_uri(lifecycle["env"]["MLFLOW_TRACKING_URI"])
    local = Path(mlflow.artifacts.download_artifacts("models:/ptychopinn/1"))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert {"ptycho_ml", "python_function"} <= set(mlmodel["flavors"])
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "ptycho_ml.flavor"
    assert "diffraction" in mlmodel["signature"]["inputs"] and (local / "serving_input_example.json").is_file()
    assert (local / "data" / "wts.h5.zip").is_file() and (local / "code" / "ptycho_ml" / "flavor.py").is_file()
    requirements = (local / "requirements.txt").read_text()
    pin = next(d for d in yaml.safe_load((ROOT / "python_env.yaml").read_text())["dependencies"] if d.startswith("torch=="))
    assert pin in requirements.splitlines() and "+cpu" not in requirements


def test_unsupported_backend_fails_at_once_naming_the_supported_ones(lifecycle):
    proc = _run(["mlflow", "run", str(ROOT), "-P", "backend=tensorflow", "--env-manager", "local",
                 "--experiment-name", "e2e-bad"], lifecycle["env"], lifecycle["tmp"], timeout=300)
    assert proc.returncode != 0
    assert "backend: found 'tensorflow', expected one of the supported backends: torch" in proc.stderr + proc.stdout


def test_promote_gate_then_reconstruct_from_production(lifecycle, tiny_test_npz):
    tmp, env = lifecycle["tmp"], lifecycle["env"]
    strict = tmp / "strict.toml"
    strict.write_text("[stages.Production.min]\ntest_refined_amplitude_ssim = 0.999\n"
                      "[aliases.champion]\nsame_as = \"Production\"\n")
    refused = _run([sys.executable, "-m", "ptycho_ml.cli", "promote", "--version", "1", "--stage", "Production",
                    "--policy", str(strict)], env, tmp)
    assert refused.returncode == 2 and "test_refined_amplitude_ssim" in refused.stderr
    forced = _run([sys.executable, "-m", "ptycho_ml.cli", "promote", "--version", "1", "--stage", "Production",
                   "--alias", "champion", "--policy", str(strict), "--force"], env, tmp)
    assert forced.returncode == 0, forced.stderr
    listed = _run([sys.executable, "-m", "ptycho_ml.cli", "models"], env, tmp)
    assert "Production" in listed.stdout and "champion" in listed.stdout
    # --force put it there, but loading through the stage or alias judges it again: refused without the override
    strict_env = {**env, "PTYCHO_ML_POLICY": str(strict)}
    refused = _run([sys.executable, "-m", "ptycho_ml.cli", "reconstruct", "--alias", "champion", "--data",
                    str(tiny_test_npz), "--out", str(tmp / "recon_refused"), "--quiet"], strict_env, tmp)
    assert refused.returncode == 2 and "fails the @champion gate" in refused.stderr, refused.stderr
    assert not (tmp / "recon_refused").exists()
    for selector in (["--model", "models:/ptychopinn/Production"], ["--alias", "champion"], ["--stage", "production"]):
        out = tmp / ("recon_" + selector[-1].replace(":", "_").replace("/", "_"))
        proc = _run([sys.executable, "-m", "ptycho_ml.cli", "reconstruct", *selector, "--data", str(tiny_test_npz),
                     "--out", str(out), "--refine-steps", "2", "--quiet", "--allow-ungated"], strict_env, tmp)
        assert proc.returncode == 0, proc.stderr
        assert (out / "object.h5").is_file() and (out / "product.h5").is_file()
        assert json.loads((out / "summary.json").read_text())["provenance"]["gate"]["verdict"] == "overridden"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(lifecycle):
    """A real `mlflow models serve` process on 127.0.0.1 serving the registered model."""
    import requests

    env, tmp = lifecycle["env"], lifecycle["tmp"]
    port = _free_port()
    log = open(tmp / "serve.log", "w")
    proc = subprocess.Popen(["mlflow", "models", "serve", "-m", "models:/ptychopinn/1", "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port), "--workers", "1"],
                            env=env, cwd=tmp, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None:
                raise AssertionError((tmp / "serve.log").read_text()[-3000:])
            time.sleep(1)
        else:
            raise AssertionError("server did not answer /ping in 180 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _request_arrays(scan_path, count=40):
    from ptycho_ml.data import load_scan

    scan = load_scan(scan_path)
    return scan.amplitude(slice(0, count)), scan.positions_px[:count].astype(np.float32)


def test_served_model_answers_json_and_parquet_like_in_process(server, lifecycle, tiny_test_npz):
    import mlflow
    import requests

    from ptycho_ml.lifecycle.serving_client import to_json_payload, to_parquet_payload

    diffraction, positions = _request_arrays(tiny_test_npz)
    mlflow.set_tracking_uri(lifecycle["env"]["MLFLOW_TRACKING_URI"])
    expected = mlflow.pyfunc.load_model("models:/ptychopinn/1").predict({"diffraction": diffraction, "positions": positions})

    r = requests.post(f"{server}/invocations", data=to_json_payload(diffraction, positions),
                      headers={"Content-Type": "application/json"}, timeout=120)
    assert r.status_code == 200, r.text
    served = r.json()["predictions"]
    assert np.allclose(np.asarray(served["amplitude"]), expected["amplitude"], atol=1e-5)
    # the body names what answered: the version's run and its bundle (no registry name: plain MLflow serving)
    from mlflow import MlflowClient

    from ptycho_ml.lifecycle.registry import load_model_with_provenance

    version = MlflowClient().get_model_version("ptychopinn", "1")
    assert (served["run_id"], served["bundle_sha256"]) == (version.run_id, expected["bundle_sha256"])
    assert load_model_with_provenance("models:/ptychopinn/1")[1]["bundle_sha256"] == served["bundle_sha256"]
    assert "version" not in served and "name" not in served

    r = requests.post(f"{server}/invocations", data=to_parquet_payload(diffraction, positions),
                      headers={"Content-Type": "application/vnd.apache.parquet"}, timeout=120)
    assert r.status_code == 200, r.text
    assert np.allclose(np.asarray(r.json()["predictions"]["phase"]), expected["phase"], atol=1e-5)

    r = requests.post(f"{server}/invocations", data=to_json_payload(diffraction, positions, params={"output": "patches"}),
                      headers={"Content-Type": "application/json"}, timeout=120)
    assert r.status_code == 200 and np.asarray(r.json()["predictions"]["amplitude"]).shape == (40, 32, 32)


def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server, tiny_test_npz):
    import requests

    from ptycho_ml.lifecycle.serving_client import to_json_payload

    diffraction, positions = _request_arrays(tiny_test_npz, 5)
    bad = [
        ("not json at all", "application/json"),
        (json.dumps({"inputs": {"diffraction": diffraction.tolist()}}), "application/json"),
        (json.dumps({"inputs": {"diffraction": diffraction[:, :8, :8].tolist(), "positions": positions.tolist()}}), "application/json"),
        (to_json_payload(diffraction, positions * 0), "application/json"),
        (to_json_payload(diffraction, positions, params={"output": "pictures"}), "application/json"),
        (to_json_payload(-diffraction, positions), "application/json"),
    ]
    for body, ctype in bad:
        r = requests.post(f"{server}/invocations", data=body, headers={"Content-Type": ctype}, timeout=60)
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
        assert r.text
    r = requests.post(f"{server}/invocations", data=to_json_payload(diffraction, positions),
                      headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 200


def test_mlflow_run_with_the_default_environment_manager(tmp_path, tiny_npz, tiny_test_npz):
    """`mlflow run .` as a newcomer types it: MLflow builds the project's own virtualenv from python_env.yaml."""
    env = _env(tmp_path)
    proc = _run(["mlflow", "run", str(ROOT), "-P", "backend=torch", "-P", "preset=tiny", "-P", "epochs=1",
                 "-P", f"data={tiny_npz}", "-P", f"test_data={tiny_test_npz}", "-P", f"out={tmp_path / 'train'}"],
                env, tmp_path, timeout=1700)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "registered as ptychopinn version 1" in proc.stdout + proc.stderr
    assert (tmp_path / "train" / "wts.h5.zip").is_file()
