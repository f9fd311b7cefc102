"""S3 end to end with real components: a moto S3 server, the CLI, an MLflow tracking server
whose artifact store is that S3 bucket, and `mlflow models serve` reading the model from it.

Everything listens on 127.0.0.1; every subprocess is terminated in a ``finally`` block and
every wait is bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.slow]

BUCKET = "ptycho-test"
WAIT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = WAIT_S) -> None:
    """Poll ``url`` until it answers 200; fail with the log tail if the process dies or time runs out."""
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """Signal the server and the workers it spawned (it leads its own session, see ``_server``)."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(proc: subprocess.Popen) -> None:
    _signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait(timeout=20)


@contextmanager
def _server(cmd: list[str], env: dict, log: Path, health_url: str):
    """A subprocess that is up (``health_url`` answers 200) for the duration of the block."""
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_http(health_url, proc, log)
            yield proc
        finally:
            _stop(proc)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one bucket; the process environment points boto3 (and MLflow) at it."""
    import boto3

    tmp = tmp_path_factory.mktemp("s3")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    settings = {
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "PTYCHO_ML_CACHE": str(tmp / "cache"),
    }
    unset = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in settings.items():
            mp.setenv(key, value)
        for key in unset:
            mp.delenv(key, raising=False)
        cmd = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
        with _server(cmd, dict(os.environ), tmp / "moto.log", f"{endpoint}/moto-api/"):
            client = boto3.session.Session().client("s3", endpoint_url=endpoint)
            client.create_bucket(Bucket=BUCKET)
            yield {"endpoint": endpoint, "client": client, "bucket": BUCKET, "tmp": tmp}


def _keys(client, prefix: str = "") -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def _cli(args: list[str]):
    from click.testing import CliRunner

    from ptycho_ml.cli import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


@pytest.fixture(scope="module")
def uploaded(s3, tiny_npz, tiny_test_npz):
    """The tiny scans in the bucket as scan.npz and test.npz."""
    s3["client"].upload_file(str(tiny_npz), BUCKET, "scan.npz")
    s3["client"].upload_file(str(tiny_test_npz), BUCKET, "test.npz")
    return s3


@pytest.fixture(scope="module")
def trained_bundle(uploaded, tmp_path_factory, tiny_npz):
    """A tiny model trained for one epoch by the CLI (locally), uploaded to s3://bucket/models/wts.h5.zip."""
    out = tmp_path_factory.mktemp("train")
    result = _cli(["train", "--data", str(tiny_npz), "--preset", "tiny", "--epochs", "1", "--quiet",
                   "--threads", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    bundle = out / "wts.h5.zip"
    assert bundle.is_file()
    uploaded["client"].upload_file(str(bundle), BUCKET, "models/wts.h5.zip")
    return bundle


# ---------------------------------------------------------------- data and CLI


def test_load_scan_from_s3_equals_the_local_scan(uploaded, tiny_npz):
    from ptycho_ml.data.readers import load_scan

    local, remote = load_scan(tiny_npz), load_scan(f"s3://{BUCKET}/scan.npz")
    assert len(remote) == len(local) and remote.N == local.N
    np.testing.assert_array_equal(np.asarray(remote.patterns), np.asarray(local.patterns))
    np.testing.assert_array_equal(remote.probe, local.probe)
    np.testing.assert_array_equal(remote.positions_px, local.positions_px)
    np.testing.assert_array_equal(remote.obj, local.obj)
    assert remote.obj_shape == local.obj_shape and remote.metadata == local.metadata
    # A second load is served from the cache (same local file, no second download).
    assert load_scan(f"s3://{BUCKET}/scan.npz").source == remote.source


def test_cli_reconstructs_from_s3_bundle_and_scan_into_an_s3_prefix(uploaded, trained_bundle, tmp_path):
    import h5py

    result = _cli(["reconstruct", "--bundle", f"s3://{BUCKET}/models/wts.h5.zip", "--data", f"s3://{BUCKET}/test.npz",
                   "--out", f"s3://{BUCKET}/results/run1", "--refine-steps", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    names = {"object.h5", "amplitude.png", "phase.png", "product.h5", "summary.json"}
    assert {f"results/run1/{n}" for n in names} <= _keys(uploaded["client"], "results/run1/")
    assert f"s3://{BUCKET}/results/run1/object.h5" in result.output

    local = tmp_path / "object.h5"
    uploaded["client"].download_file(BUCKET, "results/run1/object.h5", str(local))
    with h5py.File(local, "r") as h5:
        obj = h5["object"][()]
    assert obj.ndim == 2 and np.iscomplexobj(obj) and np.isfinite(obj).all()
    summary = json.loads(uploaded["client"].get_object(Bucket=BUCKET, Key="results/run1/summary.json")["Body"].read())
    assert summary["n_patterns"] > 0 and "metrics" in summary


def test_cli_evaluates_an_s3_reconstruction_and_writes_json_to_s3(uploaded, trained_bundle):
    if "results/run1/object.h5" not in _keys(uploaded["client"], "results/run1/"):
        _cli(["reconstruct", "--bundle", f"s3://{BUCKET}/models/wts.h5.zip", "--data", f"s3://{BUCKET}/test.npz",
              "--out", f"s3://{BUCKET}/results/run1", "--refine-steps", "2", "--quiet"])
    result = _cli(["evaluate", "--reconstruction", f"s3://{BUCKET}/results/run1/object.h5",
                   "--data", f"s3://{BUCKET}/test.npz", "--json", f"s3://{BUCKET}/metrics.json"])
    assert result.exit_code == 0, result.output
    assert f"metrics: s3://{BUCKET}/metrics.json" in result.output
    metrics = json.loads(uploaded["client"].get_object(Bucket=BUCKET, Key="metrics.json")["Body"].read())
    assert {"amplitude_ssim", "phase_ssim"} <= set(metrics)
    assert -1 <= metrics["amplitude_ssim"] <= 1


# ---------------------------------------------------------------- one-line errors, nothing written


def _assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _cached_partials() -> list[Path]:
    cache = Path(os.environ["PTYCHO_ML_CACHE"])
    return list(cache.glob(".dl-*")) if cache.exists() else []


def test_missing_bucket_is_a_one_line_error(uploaded, trained_bundle, tmp_path):
    out = tmp_path / "out"
    result = _cli(["reconstruct", "--bundle", str(trained_bundle), "--data", "s3://no-such-bucket/test.npz",
                   "--out", str(out), "--refine-steps", "0", "--quiet"])
    _assert_one_line_error(result, "s3://no-such-bucket/test.npz", "bucket 'no-such-bucket' does not exist")
    assert not out.exists()

    # An output prefix in a missing bucket: the error names it, nothing lands anywhere.
    before = _keys(uploaded["client"])
    result = _cli(["reconstruct", "--bundle", str(trained_bundle), "--data", f"s3://{BUCKET}/test.npz",
                   "--out", "s3://no-such-bucket/results", "--refine-steps", "0", "--quiet"])
    _assert_one_line_error(result, "s3://no-such-bucket/results", "does not exist")
    assert _keys(uploaded["client"]) == before
    assert not _cached_partials()


def test_missing_key_is_a_one_line_error(uploaded, trained_bundle):
    before = _keys(uploaded["client"])
    result = _cli(["reconstruct", "--bundle", f"s3://{BUCKET}/models/wts.h5.zip", "--data", f"s3://{BUCKET}/missing.npz",
                   "--out", f"s3://{BUCKET}/results/missing", "--refine-steps", "0", "--quiet"])
    _assert_one_line_error(result, f"s3://{BUCKET}/missing.npz", "no such key")
    result = _cli(["reconstruct", "--bundle", f"s3://{BUCKET}/models/nope.h5.zip", "--data", f"s3://{BUCKET}/test.npz",
                   "--out", f"s3://{BUCKET}/results/missing", "--refine-steps", "0", "--quiet"])
    _assert_one_line_error(result, f"s3://{BUCKET}/models/nope.h5.zip", "no such key")
    assert _keys(uploaded["client"]) == before
    assert not _cached_partials()


def test_no_credentials_is_a_one_line_error(uploaded, trained_bundle, tmp_path, monkeypatch):
    before = _keys(uploaded["client"])
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("PTYCHO_ML_CACHE", str(tmp_path / "cache"))  # nothing cached may mask the error
    out = tmp_path / "out"
    result = _cli(["reconstruct", "--bundle", str(trained_bundle), "--data", f"s3://{BUCKET}/test.npz",
                   "--out", str(out), "--refine-steps", "0", "--quiet"])
    _assert_one_line_error(result, f"s3://{BUCKET}/test.npz", "no AWS credentials found", "AWS_ACCESS_KEY_ID")
    assert not out.exists()
    monkeypatch.undo()
    assert _keys(uploaded["client"]) == before


# ---------------------------------------------------------------- MLflow tracking server with S3 artifacts


def test_mlflow_server_stores_model_in_s3_and_serves_it(uploaded, trained_bundle, tmp_path, tiny_test_npz, monkeypatch):
    import mlflow
    import requests
    from mlflow import MlflowClient
    from mlflow.tracking._tracking_service import utils as tracking_utils

    from ptycho_ml import flavor
    from ptycho_ml.data.readers import load_scan
    from ptycho_ml.model.bundle_io import load_model_bundle
    from ptycho_ml.lifecycle.serving_client import decode_predictions, to_json_payload

    env = dict(os.environ)
    env.pop("MLFLOW_RUN_ID", None)
    env["PYTHONUNBUFFERED"] = "1"
    track_port = _free_port()
    tracking_uri = f"http://127.0.0.1:{track_port}"
    server_cmd = ["mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                  "--artifacts-destination", f"s3://{BUCKET}/mlartifacts", "--host", "127.0.0.1",
                  "--port", str(track_port), "--workers", "1"]
    # set_tracking_uri also exports MLFLOW_TRACKING_URI; both are put back so later tests see no trace of this one.
    previous_uri = tracking_utils._tracking_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    with _server(server_cmd, env, tmp_path / "tracking.log", f"{tracking_uri}/health"):
        try:
            mlflow.set_tracking_uri(tracking_uri)
            experiment_id = MlflowClient(tracking_uri).create_experiment("s3-e2e")  # not set_experiment: no global state
            model = load_model_bundle(trained_bundle)[0]
            with mlflow.start_run(experiment_id=experiment_id) as run:
                info = flavor.log_model(model, name="model", registered_model_name="ptychopinn")
            assert int(info.registered_model_version) == 1
            assert run.info.artifact_uri.startswith("mlflow-artifacts:")
        finally:
            mlflow.set_tracking_uri(previous_uri)  # None: back to the default resolution

        keys = _keys(uploaded["client"], "mlartifacts/")
        mlmodel = [k for k in keys if k.endswith("/MLmodel")]
        bundles = [k for k in keys if k.endswith("/data/wts.h5.zip")]
        assert mlmodel and bundles, sorted(keys)[:20]
        assert any(k.endswith("/code/ptycho_ml/flavor.py") for k in keys)

        serve_port = _free_port()
        serve_env = {**env, "MLFLOW_TRACKING_URI": tracking_uri}
        serve_cmd = ["mlflow", "models", "serve", "-m", "models:/ptychopinn/1", "--env-manager", "local",
                     "-h", "127.0.0.1", "-p", str(serve_port), "--workers", "1"]
        url = f"http://127.0.0.1:{serve_port}"
        with _server(serve_cmd, serve_env, tmp_path / "serve.log", f"{url}/ping"):
            scan = load_scan(tiny_test_npz)
            diffraction, positions = scan.amplitude(slice(0, 20)), scan.positions_px[:20].astype(np.float32)
            response = requests.post(f"{url}/invocations", data=to_json_payload(diffraction, positions),
                                     headers={"Content-Type": "application/json"}, timeout=WAIT_S)
            assert response.status_code == 200, response.text[:500]
            predictions = decode_predictions(response.json())
            assert set(predictions) == {"amplitude", "phase"}
            assert predictions["amplitude"].ndim == 2 and predictions["amplitude"].shape == predictions["phase"].shape
            assert np.isfinite(predictions["amplitude"]).all() and (predictions["amplitude"] >= 0).all()

            expected = flavor.PtychoPyfuncModel(model).predict({"diffraction": diffraction, "positions": positions})
            np.testing.assert_allclose(predictions["amplitude"], expected["amplitude"], atol=1e-5)
