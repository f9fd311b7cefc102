#!/usr/bin/env python
"""Served throughput against in-process pyfunc predict, on the same 1000-frame scan in the same run.

Logs a model (``--bundle``, or an untrained CPU-preset model: throughput does
not depend on the weights) into a temporary sqlite tracking store, starts a
real ``mlflow models serve`` on 127.0.0.1, and times (median of
``--repeats``) one request of all frames with JSON and with Parquet, and
``mlflow.pyfunc`` ``predict`` in this process. Goal: Parquet-encoded serving
at least 0.5 of in-process throughput.

Usage::

    python benchmarks/serving.py [--bundle B] [--frames 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import torch

from ptycho_ml.physics import simulate
from ptycho_ml.config import ModelConfig
from ptycho_ml.data import load_scan
from ptycho_ml.lifecycle.serving_client import JSON, PARQUET, to_json_payload, to_parquet_payload

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=None)
    p.add_argument("--frames", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=HERE / "out" / "serving")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    path = args.workdir / "scan.npz"
    if not path.exists():
        base = simulate.default_configs()["test"]
        simulate.write_simulated(simulate.simulate_scan(base.replace(object_size_px=260, step_px=6.0 * 0.8)), path)
    scan = load_scan(path)
    frames = min(args.frames, len(scan))
    diffraction = scan.amplitude(slice(0, frames))
    positions = scan.positions_px[:frames].astype(np.float32)

    tmp = Path(tempfile.mkdtemp(prefix="ptycho_serving_"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    import mlflow

    from ptycho_ml import flavor
    from ptycho_ml.model.bundle_io import load_model_bundle
    from ptycho_ml.model.network import DiffractionToObject

    if args.bundle:
        model, _ = load_model_bundle(args.bundle)
    else:
        model = DiffractionToObject(ModelConfig(preset="cpu"), torch.from_numpy(scan.probe), 1.0).eval()
    with mlflow.start_run():
        flavor.log_model(model, name="model", registered_model_name="bench")
    uri = "models:/bench/1"

    pyfunc = mlflow.pyfunc.load_model(uri)
    request = {"diffraction": diffraction, "positions": positions}
    pyfunc.predict(request)
    t_inproc = statistics.median(_timed(lambda: pyfunc.predict(request)) for _ in range(args.repeats))

    port = free_port()
    log = open(tmp / "serve.log", "w")
    server = subprocess.Popen(["mlflow", "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1",
                               "-p", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}/invocations"
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(1)
        else:
            raise SystemExit("server did not start: " + (tmp / "serve.log").read_text()[-2000:])
        bodies = {"json": (to_json_payload(diffraction, positions), JSON),
                  "parquet": (to_parquet_payload(diffraction, positions), PARQUET)}
        served = {}
        for name, (body, ctype) in bodies.items():
            post = lambda: requests.post(url, data=body, headers={"Content-Type": ctype}, timeout=600).raise_for_status()
            post()
            served[name] = statistics.median(_timed(post) for _ in range(args.repeats))
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()

    rate = lambda seconds: frames / seconds
    print(f"{frames} frames of {scan.N}x{scan.N}, median of {args.repeats}; request sizes: "
          f"json {len(bodies['json'][0]) / 1e6:.1f} MB, parquet {len(bodies['parquet'][0]) / 1e6:.1f} MB")
    print(f"in-process pyfunc predict   {rate(t_inproc):8.1f} patterns/s")
    for name, seconds in served.items():
        print(f"served, {name:8s}            {rate(seconds):8.1f} patterns/s   ratio to in-process {t_inproc / seconds:.3f}")
    print("goal: parquet ratio >= 0.5")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
