"""A team tracking server, end to end: PostgreSQL backend store, S3 artifacts (moto), the whole lifecycle.

Debian's PostgreSQL server runs on a throwaway data directory on 127.0.0.1
and a free port (as the ``postgres`` user when the tests run as root: the
server refuses root); ``mlflow server`` keeps runs and the registry in it and
artifacts in the moto S3 bucket. Then, all against that server: ``mlflow
run`` (tiny preset, 1 epoch) registers a version, ``ptycho-ml promote`` moves
it to Production with the alias champion (through the policy gate),
``ptycho-ml reconstruct --model models:/ptychopinn@champion`` reconstructs a
scan, and ``mlflow models serve`` answers a request. ``.ci/run`` installs
the ``postgresql`` package; only where its binaries are absent does the test skip.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from test_s3 import BUCKET, _free_port, _server, s3  # noqa: F401  (s3: the moto server fixture)

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[1]
# A gate every trained model passes: the test exercises the gate machinery, not the model's quality.
POLICY = """[stages.Production.min]
test_refined_amplitude_ssim = 0.0

[aliases.champion]
same_as = "Production"
"""


def _pg_bin() -> Path | None:
    """The directory of Debian's PostgreSQL server binaries (initdb, pg_ctl), the newest version."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _as_db_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: under root, run as the ``postgres`` user the package creates."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server on 127.0.0.1 with a database ``mlflow``; yields its SQLAlchemy URI."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql (.ci/run does)")
    import psycopg2

    data = Path(tempfile.mkdtemp(prefix="ptycho_pg_"))  # not under pytest's root-only tmp: postgres must reach it
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
    port = _free_port()
    log = data / "server.log"
    subprocess.run(_as_db_user([str(bindir / "initdb"), "-D", str(data / "db"), "-U", "mlflow", "--auth=trust",
                                "-E", "UTF8"]), check=True, capture_output=True, timeout=120)
    started = subprocess.run(_as_db_user([str(bindir / "pg_ctl"), "-D", str(data / "db"), "-l", str(log), "-w",
                                          "-t", "60", "-o", f"-h 127.0.0.1 -p {port} -k {data}", "start"]),
                             capture_output=True, text=True, timeout=120)
    try:
        assert started.returncode == 0, started.stderr + (log.read_text() if log.exists() else "")
        conn = psycopg2.connect(host="127.0.0.1", port=port, user="mlflow", dbname="postgres")
        conn.autocommit = True  # CREATE DATABASE runs outside a transaction
        conn.cursor().execute("CREATE DATABASE mlflow")
        conn.close()
        yield {"uri": f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow", "port": port}
    finally:
        subprocess.run(_as_db_user([str(bindir / "pg_ctl"), "-D", str(data / "db"), "-m", "fast", "-w", "stop"]),
                       capture_output=True, timeout=120)
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def team(postgres, s3, tmp_path_factory):  # noqa: F811
    """``mlflow server`` on PostgreSQL with S3 artifacts; yields the environment clients use."""
    tmp = tmp_path_factory.mktemp("team")
    (tmp / "policy.toml").write_text(POLICY)
    port = _free_port()
    tracking_uri = f"http://127.0.0.1:{port}"
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, PTYCHO_ML_POLICY=str(tmp / "policy.toml"),
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    for key in ("MLFLOW_RUN_ID", "MLFLOW_REGISTRY_URI", "PTYCHO_ML_ALLOW_UNGATED"):
        env.pop(key, None)
    cmd = ["mlflow", "server", "--backend-store-uri", postgres["uri"],
           "--artifacts-destination", f"s3://{BUCKET}/team", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1"]
    with _server(cmd, env, tmp / "tracking.log", f"{tracking_uri}/health"):
        yield {"tmp": tmp, "env": env, "uri": tracking_uri}


def _run(cmd: list[str], team: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=team["env"], cwd=team["tmp"], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd[:4]}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_lifecycle_on_postgresql_and_s3(team, postgres, s3, tiny_npz, tiny_test_npz):  # noqa: F811
    import psycopg2
    import requests
    from mlflow import MlflowClient

    from ptycho_ml.data.readers import load_scan
    from ptycho_ml.lifecycle.serving_client import decode_predictions, to_json_payload

    tmp = team["tmp"]
    _run(["mlflow", "run", str(ROOT), "-P", "preset=tiny", "-P", "epochs=1", "-P", f"data={tiny_npz}",
          "-P", f"test_data={tiny_test_npz}", "-P", f"out={tmp / 'train'}", "--env-manager", "local",
          "--experiment-name", "team"], team)
    client = MlflowClient(tracking_uri=team["uri"])
    (version,) = client.search_model_versions("name='ptychopinn'")
    assert version.version == "1" and client.get_run(version.run_id).data.metrics["train_loss"] > 0
    # The registry lives in PostgreSQL, the model files in S3.
    with psycopg2.connect(host="127.0.0.1", port=postgres["port"], user="mlflow", dbname="mlflow") as conn:
        cursor = conn.cursor()
        cursor.execute("SELECT name, version FROM model_versions")
        assert cursor.fetchall() == [("ptychopinn", 1)]
    conn.close()
    pages = s3["client"].get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="team/")
    keys = {obj["Key"] for page in pages for obj in page.get("Contents", [])}
    assert any(k.endswith("/data/wts.h5.zip") for k in keys) and any(k.endswith("/MLmodel") for k in keys)

    promoted = _run([sys.executable, "-m", "ptycho_ml.cli", "promote", "--version", "1", "--stage", "Production",
                     "--alias", "champion"], team)
    assert "Production" in promoted.stdout + promoted.stderr
    assert client.get_model_version_by_alias("ptychopinn", "champion").version == "1"

    out = tmp / "recon"
    _run([sys.executable, "-m", "ptycho_ml.cli", "reconstruct", "--model", "models:/ptychopinn@champion",
          "--data", str(tiny_test_npz), "--out", str(out), "--refine-steps", "2", "--quiet"], team)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["provenance"]["version"] == "1" and summary["provenance"]["run_id"] == version.run_id
    assert (out / "object.h5").is_file() and (out / "product.h5").is_file()

    serve_port = _free_port()
    url = f"http://127.0.0.1:{serve_port}"
    serve = ["mlflow", "models", "serve", "-m", "models:/ptychopinn@champion", "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(serve_port), "--workers", "1"]
    with _server(serve, team["env"], tmp / "serve.log", f"{url}/ping"):
        scan = load_scan(tiny_test_npz)
        diffraction, positions = scan.amplitude(slice(0, 20)), scan.positions_px[:20].astype(np.float32)
        response = requests.post(f"{url}/invocations", data=to_json_payload(diffraction, positions),
                                 headers={"Content-Type": "application/json"}, timeout=120)
        assert response.status_code == 200, response.text[:500]
        predictions = decode_predictions(response.json())
        assert predictions["amplitude"].ndim == 2 and np.isfinite(predictions["amplitude"]).all()
