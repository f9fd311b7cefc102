"""The gatekeeper against a real `mlflow server` (sqlite store) and real webhook deliveries.

Promotions are made the way the MLflow UI makes them: the REST calls
``POST /api/2.0/mlflow/registered-models/alias`` and
``POST /api/2.0/mlflow/model-versions/transition-stage`` (archive box unticked).
`ptycho-ml gatekeeper` runs as its own process, as documented.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from test_s3 import _free_port, _server

from ptycho_ml.config import ModelConfig
from ptycho_ml.model.network import DiffractionToObject

pytestmark = [pytest.mark.slow]

N = 32
SECRET = "gatekeeper-test-secret"
POLICY_TOML = """[stages.Production.min]
test_network_amplitude_ssim = 0.7
test_refined_phase_ssim = 0.5
[aliases.champion]
same_as = "Production"
"""
RUNS = [{"test_network_amplitude_ssim": 0.85, "test_refined_phase_ssim": 0.72},   # v1 passes
        {"test_network_amplitude_ssim": 0.40, "test_refined_phase_ssim": 0.95},   # v2 fails on the network
        {"test_network_amplitude_ssim": 0.90, "test_refined_phase_ssim": 0.80}]   # v3 passes


def _wait_for(check, what: str, timeout_s: float = 90.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """`mlflow server` + `ptycho-ml gatekeeper` (signed webhooks, stage sweep every second), 3 registered versions."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from ptycho_ml import flavor

    tmp = tmp_path_factory.mktemp("gatekeeper")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI")}
    env.update(PYTHONUNBUFFERED="1", MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS="true", MLFLOW_WEBHOOK_ALLOWED_SCHEMES="http,https",
               MLFLOW_WEBHOOK_CACHE_TTL="1")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server_cmd = ["mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp / 'mlflow.db'}",
                  "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                  "--workers", "1"]
    (tmp / "policy.toml").write_text(POLICY_TOML)
    keeper_port = _free_port()
    keeper_env = {**env, "PTYCHO_ML_GATEKEEPER_SECRET": SECRET, "PTYCHO_ML_POLICY": str(tmp / "policy.toml")}
    keeper_cmd = [sys.executable, "-m", "ptycho_ml.cli", "gatekeeper", "--port", str(keeper_port),
                  "--tracking-uri", url, "--sweep-s", "1"]
    previous = tracking_utils._tracking_uri
    with _server(server_cmd, env, tmp / "server.log", f"{url}/health"):
        with _server(keeper_cmd, keeper_env, tmp / "gatekeeper.log", f"http://127.0.0.1:{keeper_port}/health"):
            try:
                mlflow.set_tracking_uri(url)
                client = MlflowClient(url)
                _wait_for(lambda: any(h.name == "ptycho-ml-gatekeeper" for h in client.list_webhooks()), "the webhook")
                experiment = client.create_experiment("gatekeeper")
                for seed, metrics in enumerate(RUNS):
                    torch.manual_seed(seed)
                    model = DiffractionToObject(ModelConfig(preset="tiny", N=N),
                                                probe=torch.ones(N, N, dtype=torch.complex64), amplitude_scale=1.0)
                    with mlflow.start_run(experiment_id=experiment):
                        mlflow.log_metrics(metrics)
                        flavor.log_model(model, name="model", registered_model_name="ptychopinn")
                yield {"url": url, "client": client, "keeper": f"http://127.0.0.1:{keeper_port}", "tmp": tmp}
            finally:
                mlflow.set_tracking_uri(previous)
                print((tmp / "gatekeeper.log").read_text()[-4000:])


def _rest(stack, path: str, body: dict) -> None:
    """The call the MLflow UI makes."""
    import requests

    response = requests.post(f"{stack['url']}/api/2.0/mlflow/{path}", json=body, timeout=30)
    assert response.status_code == 200, response.text


def _tags(stack, version: str) -> dict:
    return stack["client"].get_model_version("ptychopinn", version).tags


def _stages(stack) -> dict[str, str]:
    return {v.version: v.current_stage for v in stack["client"].search_model_versions("name = 'ptychopinn'")}


def test_new_versions_get_their_figures_and_verdicts(stack):
    tags = _wait_for(lambda: _tags(stack, "2").get("ptycho_ml.gate.alias.champion") and _tags(stack, "2"),
                     "verdict tags on version 2")
    assert tags["ptycho_ml.network_amplitude_ssim"] == "0.4"
    assert tags["ptycho_ml.gate.stage.Production"].startswith("fail: test_network_amplitude_ssim = 0.4 < 0.7")
    assert _wait_for(lambda: _tags(stack, "1").get("ptycho_ml.gate.stage.Production"), "v1 verdict") == "pass"
    description = stack["client"].get_model_version("ptychopinn", "2").description
    assert "| network amplitude ssim | 0.4 |" in description and "| Production | FAIL: " in description


def test_alias_set_in_the_ui_to_a_failing_version_is_reverted(stack):
    client = stack["client"]
    _rest(stack, "registered-models/alias", {"name": "ptychopinn", "alias": "champion", "version": "1"})
    _wait_for(lambda: client.get_registered_model("ptychopinn").tags.get("ptycho_ml.gatekeeper.alias.champion") == "1",
              "@champion v1 approved")
    _rest(stack, "registered-models/alias", {"name": "ptychopinn", "alias": "champion", "version": "2"})
    reverted = _wait_for(lambda: _tags(stack, "2").get("ptycho_ml.gatekeeper.reverted"), "the revert of @champion v2")
    assert "@champion removed; @champion given back to v1" in reverted and "test_network_amplitude_ssim = 0.4" in reverted
    assert {k: str(v) for k, v in client.get_registered_model("ptychopinn").aliases.items()} == {"champion": "1"}


def test_stage_transition_in_the_old_ui_is_judged_and_the_previous_holder_archived(stack):
    body = {"name": "ptychopinn", "stage": "Production", "archive_existing_versions": False}
    _rest(stack, "model-versions/transition-stage", {**body, "version": "1"})
    _wait_for(lambda: _tags(stack, "1").get("ptycho_ml.gatekeeper.approved_stage") == "Production", "v1 approved")
    _rest(stack, "model-versions/transition-stage", {**body, "version": "2"})  # fails: moved back
    # the stage moves back first, then the revert is recorded: wait for both
    _wait_for(lambda: _stages(stack)["2"] == "None"
              and "Production -> None" in _tags(stack, "2").get("ptycho_ml.gatekeeper.reverted", ""),
              "v2 moved back out of Production, and the revert recorded")
    assert _stages(stack)["1"] == "Production"
    _rest(stack, "model-versions/transition-stage", {**body, "version": "3"})  # passes: v1 is archived
    _wait_for(lambda: _stages(stack) == {"1": "Archived", "2": "None", "3": "Production"}, "v1 archived, v3 Production")


def test_unsigned_or_forged_deliveries_are_refused(stack):
    import requests

    event = {"entity": "model_version_alias", "action": "created",
             "data": {"name": "ptychopinn", "alias": "champion", "version": "2"}}
    unsigned = requests.post(stack["keeper"], data=json.dumps(event), timeout=30)
    assert unsigned.status_code == 401 and "X-MLflow-Signature" in unsigned.json()["error"]
    headers = {"X-MLflow-Signature": "v1,AAAA", "X-MLflow-Delivery-Id": "x", "X-MLflow-Timestamp": str(int(time.time()))}
    forged = requests.post(stack["keeper"], data=json.dumps(event), headers=headers, timeout=30)
    assert forged.status_code == 401 and "does not match the secret" in forged.json()["error"]


def test_signature_check_accepts_mlflows_signature_and_refuses_replays():
    from mlflow.webhooks.delivery import _generate_hmac_signature

    from ptycho_ml.lifecycle.gatekeeper import verify_signature

    body, now = b'{"entity": "model_version", "action": "created", "data": {}}', int(time.time())
    headers = {"X-MLflow-Signature": _generate_hmac_signature(SECRET, "d1", str(now), body.decode()),
               "X-MLflow-Delivery-Id": "d1", "X-MLflow-Timestamp": str(now)}
    assert verify_signature(SECRET, headers, body) is None
    assert "does not match" in verify_signature("another secret", headers, body)
    assert "does not match" in verify_signature(SECRET, headers, body + b" ")
    assert "replay" in verify_signature(SECRET, headers, body, now_s=now + 3600)
