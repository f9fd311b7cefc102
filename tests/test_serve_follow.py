"""`ptycho-ml serve` follows an alias: promote while a client sends requests; none fails, the answering version changes.

Real components: a sqlite tracking store, the real `ptycho-ml serve` process (MLflow's scoring
server) on a free 127.0.0.1 port, HTTP requests from a client thread.
"""

from __future__ import annotations

import os
import sys
import threading
import time

import numpy as np
import pytest
import torch

from test_s3 import _free_port, _server

from ptycho_ml.config import ModelConfig
from ptycho_ml.model.network import DiffractionToObject

pytestmark = [pytest.mark.slow]

N = 32
POLICY_TOML = "[aliases.champion.min]\ntest_network_amplitude_ssim = 0.7\n"
RUNS = [0.85, 0.9, 0.4]  # test_network_amplitude_ssim of versions 1, 2, 3 (3 fails @champion)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_test_npz):
    import mlflow
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from ptycho_ml import flavor

    tmp = tmp_path_factory.mktemp("serve_follow")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    (tmp / "policy.toml").write_text(POLICY_TOML)
    previous = tracking_utils._tracking_uri
    try:
        mlflow.set_tracking_uri(uri)
        client = MlflowClient(uri)
        experiment = client.create_experiment("serve", artifact_location=str(tmp / "artifacts"))
        for seed, ssim in enumerate(RUNS):
            torch.manual_seed(seed)
            model = DiffractionToObject(ModelConfig(preset="tiny", N=N), probe=torch.ones(N, N, dtype=torch.complex64),
                                        amplitude_scale=1.0)
            with mlflow.start_run(experiment_id=experiment):
                mlflow.log_metric("test_network_amplitude_ssim", ssim)
                flavor.log_model(model, name="model", registered_model_name="ptychopinn")
        client.set_registered_model_alias("ptychopinn", "champion", "1")
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
        env.update(MLFLOW_TRACKING_URI=uri, PTYCHO_ML_POLICY=str(tmp / "policy.toml"), PYTHONUNBUFFERED="1")
        env.pop("PTYCHO_ML_ALLOW_UNGATED", None)
        port = _free_port()
        cmd = [sys.executable, "-m", "ptycho_ml.cli", "serve", "--model", "models:/ptychopinn@champion",
               "--port", str(port), "--poll-s", "0.5"]
        with _server(cmd, env, tmp / "serve.log", f"http://127.0.0.1:{port}/ping"):
            yield {"url": f"http://127.0.0.1:{port}", "client": client, "log": tmp / "serve.log"}
    finally:
        mlflow.set_tracking_uri(previous)


def _payload(tiny_test_npz) -> bytes:
    from ptycho_ml.data.readers import load_scan
    from ptycho_ml.lifecycle.serving_client import to_json_payload

    scan = load_scan(tiny_test_npz)
    return to_json_payload(scan.amplitude(slice(0, 8)), scan.positions_px[:8].astype(np.float32)).encode()


def test_promotion_while_requests_flow_swaps_the_version_without_a_failed_request(served, tiny_test_npz):
    import requests

    body, answers, stop = _payload(tiny_test_npz), [], threading.Event()

    def client_loop():
        with requests.Session() as session:
            while not stop.is_set():
                r = session.post(f"{served['url']}/invocations", data=body,
                                 headers={"Content-Type": "application/json"}, timeout=120)
                answers.append((r.status_code, r.headers.get("X-Ptycho-Model-Version"), r.text[:300]))

    thread = threading.Thread(target=client_loop)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while len(answers) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        served["client"].set_registered_model_alias("ptychopinn", "champion", "2")  # the promotion
        while not any(v == "2" for _, v, _ in answers) and time.monotonic() < deadline:
            time.sleep(0.1)
        count = len(answers)
        while len(answers) < count + 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(timeout=150)
    assert all(status == 200 for status, _, _ in answers), [a for a in answers if a[0] != 200][:3]
    versions = [v for _, v, _ in answers]
    assert versions[0] == "1" and versions[-1] == "2", served["log"].read_text()[-2000:]
    switched = versions.index("2")
    assert set(versions[:switched]) == {"1"} and set(versions[switched:]) == {"2"}  # one clean swap
    response = requests.post(f"{served['url']}/invocations", data=body, headers={"Content-Type": "application/json"},
                             timeout=120)
    run_id = served["client"].get_model_version("ptychopinn", "2").run_id
    assert response.headers["X-Ptycho-Model-Run-Id"] == run_id and len(response.headers["X-Ptycho-Model-Bundle-Sha256"]) == 64
    body = response.json()["predictions"]  # the body names the version under the headers' names
    assert set(body) == {"amplitude", "phase", "name", "version", "run_id", "bundle_sha256"}
    assert (body["name"], body["version"], body["run_id"]) == ("ptychopinn", "2", run_id)
    assert body["bundle_sha256"] == response.headers["X-Ptycho-Model-Bundle-Sha256"]


def test_a_holder_that_fails_its_gate_is_not_swapped_in(served, tiny_test_npz):
    import requests

    served["client"].set_registered_model_alias("ptychopinn", "champion", "3")
    log = served["log"]
    deadline = time.monotonic() + 60
    while "kept version 2" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "fails the @champion gate: test_network_amplitude_ssim = 0.4 < 0.7" in log.read_text()
    response = requests.post(f"{served['url']}/invocations", data=_payload(tiny_test_npz),
                             headers={"Content-Type": "application/json"}, timeout=120)
    assert response.status_code == 200 and response.headers["X-Ptycho-Model-Version"] == "2"
