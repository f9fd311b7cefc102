"""Client helpers for a served ptycho_ml model (``mlflow models serve``).

Two request encodings, both understood by MLflow's scoring server:

* JSON (``application/json``): ``{"inputs": {"diffraction": [...], "positions": [...]}, "params": {...}}``.
  Human-readable; float parsing dominates latency for large requests.
* Parquet (``application/vnd.apache.parquet``): a two-column table, one row per
  frame (``diffraction`` flattened N*N float32, ``positions`` 2 float32), which
  MLflow reshapes by the model's tensor signature. Binary and compact; the
  fast path for large scans. Parquet requests carry no params (defaults apply:
  stitched object, no refinement).
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

JSON = "application/json"
PARQUET = "application/vnd.apache.parquet"


def to_json_payload(diffraction: np.ndarray, positions: np.ndarray, params: dict[str, Any] | None = None) -> str:
    """diffraction ``(B, N, N)`` float32 amplitudes, positions ``(B, 2)`` float32 (x, y) -> JSON body."""
    body: dict[str, Any] = {"inputs": {"diffraction": np.asarray(diffraction, np.float32).tolist(),
                                       "positions": np.asarray(positions, np.float32).tolist()}}
    if params:
        body["params"] = params
    return json.dumps(body)


def to_parquet_payload(diffraction: np.ndarray, positions: np.ndarray) -> bytes:
    """The same request as Parquet bytes (one row per frame)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    diffraction = np.ascontiguousarray(diffraction, np.float32)
    positions = np.ascontiguousarray(positions, np.float32)
    B = len(diffraction)
    frame = diffraction.reshape(B, -1)
    table = pa.table({
        "diffraction": pa.FixedSizeListArray.from_arrays(pa.array(frame.ravel()), frame.shape[1]),
        "positions": pa.FixedSizeListArray.from_arrays(pa.array(positions.ravel()), 2),
    })
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="none")
    return sink.getvalue()


def decode_predictions(response_json: dict[str, Any]) -> dict[str, np.ndarray]:
    """``{"predictions": {"amplitude": ..., "phase": ..., "run_id": ..., ...}}`` -> the float32 arrays.

    The strings naming the model that answered (``bundle_sha256``, ``run_id``, ...) are left out.
    """
    predictions = response_json["predictions"]
    return {k: np.asarray(v, dtype=np.float32) for k, v in predictions.items() if not isinstance(v, str)}


def reconstruct_remote(url: str, diffraction: np.ndarray, positions: np.ndarray, encoding: str = "parquet",
                       params: dict[str, Any] | None = None, timeout_s: float = 600) -> dict[str, np.ndarray]:
    """POST a scan to ``{url}/invocations`` and return ``{"amplitude", "phase"}`` arrays."""
    import requests

    if encoding == "parquet" and not params:
        data, ctype = to_parquet_payload(diffraction, positions), PARQUET
    else:
        data, ctype = to_json_payload(diffraction, positions, params), JSON
    response = requests.post(f"{url.rstrip('/')}/invocations", data=data, headers={"Content-Type": ctype}, timeout=timeout_s)
    if response.status_code != 200:
        raise RuntimeError(f"{url}: HTTP {response.status_code}: {response.text[:500]}")
    return decode_predictions(response.json())
