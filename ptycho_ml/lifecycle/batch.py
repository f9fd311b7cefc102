"""Batch reconstruction: many scans, one model, on this process (``local``) or spread over Spark executors (``spark``).

Each scan goes through :func:`ptycho_ml.inference.outputs.run_reconstruction`,
exactly as ``ptycho-ml reconstruct`` runs it, into ``OUT/<scan name>/``
(``object.h5``, the PNGs, ``product.h5``, ``summary.json``); one table,
``OUT/summary.csv``, lists every scan with its status. A scan that fails (a
bad file, a pattern size the model does not take) is a row with its one-line
error; the others go on.

The model is loaded once through the shared loader
(:func:`ptycho_ml.lifecycle.registry.load_model_with_provenance`: registry
resolution and its load-time gate) on the driver. Spark executors load the
version the driver resolved (``models:/name/N``, pinned, so a promotion
during the job cannot mix two models) through the same loader, once per
Python worker, and check its sha256 against the driver's. Whole scans are the
unit of work (one scan per Spark task): a scan's refinement passes need its
whole object, so chunks of one scan could not be refined apart.

Why not ``mlflow.pyfunc.spark_udf`` (tried, MLflow 3.17, pyspark 4.3): the
model's tensor signature ``diffraction (-1, N, N)`` makes one DataFrame row
one frame (a row holding a whole scan's frames fails schema enforcement:
"could not be converted to the expected shape"), while the pyfunc returns
one stitched ``(H, W)`` object per request, not one value per row; it also
loads the model through MLflow's own pyfunc loader, past the registry gate
above, and sees only frames and positions (not the scan's probe, geometry
and ground truth that ``reconstruct`` uses).
"""

from __future__ import annotations

import csv
import glob
import io
import os
import re
import time
from pathlib import Path
from typing import Any

from ptycho_ml.config import InferenceConfig
from ptycho_ml.data.storage import OutputLocation, is_s3
from ptycho_ml.errors import PtychoInputError

#: The columns of ``summary.csv``, in order.
SUMMARY_COLUMNS = ("scan", "status", "out", "n_patterns", "network_s", "refine_s", "seconds",
                   "amplitude_ssim", "phase_ssim", "error")
SUMMARY_FILE = "summary.csv"
_GLOB_CHARS = set("*?[")


def list_scans(scans: str) -> list[str]:
    """The scans a ``--scans`` value names, in order.

    A path ending ``.txt`` is a manifest: one scan per line (local, relative to
    the manifest's directory, or ``s3://``), blank lines and ``#`` comments
    skipped. Anything else is a glob pattern (a plain path matches itself).
    """
    if scans.endswith(".txt"):
        manifest = Path(scans)
        if not manifest.is_file():
            raise PtychoInputError(f"--scans: manifest '{scans}' not found, expected a text file with one scan per line")
        paths = []
        for line in manifest.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                paths.append(line if is_s3(line) or os.path.isabs(line) else str(manifest.parent / line))
        if not paths:
            raise PtychoInputError(f"--scans: manifest '{scans}' lists no scans, expected one scan path per line")
        return paths
    paths = sorted(glob.glob(scans)) if _GLOB_CHARS & set(scans) else ([scans] if Path(scans).exists() else [])
    if not paths:
        raise PtychoInputError(f"--scans: '{scans}' matches no file, expected a glob of scans (quoted, e.g. 'data/*.npz') "
                               "or a manifest .txt")
    return paths


def output_names(paths: list[str]) -> list[str]:
    """One output directory name per scan: its file name without the extension (``diffraction.h5``: its folder's)."""
    names = []
    for path in paths:
        stem = Path(path.rstrip("/")).stem
        if stem == "diffraction":  # ptychodus scans are folders of diffraction.h5 + product.h5
            stem = Path(path.rstrip("/")).parent.name or stem
        names.append(stem)
    seen: dict[str, str] = {}
    for name, path in zip(names, paths):
        if name in seen:
            raise PtychoInputError(f"--scans: '{seen[name]}' and '{path}' would both write '{name}/', "
                                   "expected scans with distinct file names")
        seen[name] = path
    return names


def _join(out: str, name: str) -> str:
    return f"{out.rstrip('/')}/{name}" if is_s3(out) else str(Path(out) / name)


def reconstruct_one(model, provenance: dict[str, Any], path: str, cfg: InferenceConfig, out: str,
                    with_metrics: bool = True) -> dict[str, Any]:
    """Reconstruct one scan into ``out`` as ``reconstruct`` does; a summary row, ``status`` ``ok`` or ``error``."""
    from ptycho_ml.data.readers import load_scan
    from ptycho_ml.inference.outputs import run_reconstruction

    row: dict[str, Any] = {"scan": path, "out": out}
    started = time.perf_counter()
    try:
        summary = run_reconstruction(model, load_scan(path), cfg, out, provenance=provenance, with_metrics=with_metrics)
    except Exception as exc:  # one bad scan is reported in the table and does not stop the others
        message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if not isinstance(exc, PtychoInputError):
            message = f"{type(exc).__name__}: {message}"
        return {**row, "status": "error", "error": message, "seconds": round(time.perf_counter() - started, 3)}
    timings = summary.get("timings_s", {})
    metrics = summary.get("metrics", {})
    return {**row, "status": "ok", "n_patterns": summary["n_patterns"],
            "network_s": timings.get("network_s"), "refine_s": timings.get("refine_s", timings.get("finetune_s")),
            "seconds": round(time.perf_counter() - started, 3),
            "amplitude_ssim": metrics.get("amplitude_ssim"), "phase_ssim": metrics.get("phase_ssim")}


def run_local(model, provenance: dict[str, Any], paths: list[str], names: list[str], cfg: InferenceConfig,
              out: str, with_metrics: bool = True) -> list[dict[str, Any]]:
    """One scan after another in this process."""
    return [reconstruct_one(model, provenance, path, cfg, _join(out, name), with_metrics)
            for path, name in zip(paths, names)]


# One model per Spark Python worker (reused across its tasks): {(tracking URI, model URI, sha256): model}.
_WORKER_MODELS: dict[tuple[str, str, str], Any] = {}


def _worker_model(tracking_uri: str, registry_uri: str, provenance: dict[str, Any], uri: str):
    """The driver's model (``uri``: the version it resolved), loaded on an executor through the shared loader
    and checked against the driver's sha256."""
    key = (tracking_uri, uri, provenance["bundle_sha256"])
    if key not in _WORKER_MODELS:
        import mlflow

        from ptycho_ml.lifecycle.registry import load_model_with_provenance

        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(registry_uri)
        model, loaded = load_model_with_provenance(uri, is_bundle=uri.endswith(".zip"))
        if loaded["bundle_sha256"] != provenance["bundle_sha256"]:
            raise RuntimeError(f"{uri}: the executor loaded bundle sha256 "
                               f"{loaded['bundle_sha256'][:12]}..., expected the driver's {provenance['bundle_sha256'][:12]}...")
        _WORKER_MODELS[key] = model
    return _WORKER_MODELS[key]


def spark_session(master: str | None):
    """A Spark session: ``master`` (e.g. ``local[2]``, ``spark://host:7077``), else spark-submit's, else ``local[*]``.

    Executors run this interpreter (``spark.pyspark.python``); a cluster's
    executors need the package installed and the tracking server reachable.
    """
    import sys

    from pyspark.sql import SparkSession

    builder = (SparkSession.builder.appName("ptycho-ml batch").config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false"))
    builder = builder.config("spark.pyspark.python", sys.executable).config("spark.pyspark.driver.python", sys.executable)
    if master:
        builder = builder.master(master)
        if master.startswith("local"):  # nothing listens beyond this machine
            builder = builder.config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _python_error(exc: BaseException) -> str:
    """The last Python exception line inside a Spark error (whose text is mostly a Java stack trace)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if re.match(r"^\s*[\w.]+(Error|Exception): ", ln)
             and not ln.strip().startswith(("org.", "java.", "scala.", "py4j."))]
    return lines[-1] if lines else (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def run_spark(provenance: dict[str, Any], paths: list[str], names: list[str], cfg: InferenceConfig, out: str,
              master: str | None = None, with_metrics: bool = True) -> list[dict[str, Any]]:
    """One Spark task per scan; each executor loads the driver's model version once and writes its scans' outputs.

    ``out`` must be reachable from every executor (a shared filesystem or an
    ``s3://`` prefix); on ``local[K]`` it is this machine's disk.
    """
    import mlflow

    tracking_uri, registry_uri = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    # Executors do not share the driver's working directory: they get absolute local paths.
    def absolute(p: str) -> str:
        return p if is_s3(p) else os.path.abspath(p)

    jobs = [(i, absolute(path), absolute(_join(out, name))) for i, (path, name) in enumerate(zip(paths, names))]
    worker_cfg = cfg.replace(progress=False)  # executors' progress bars would interleave in the driver's log
    resolved = provenance["resolved_uri"]
    model_uri = os.path.abspath(resolved) if os.path.exists(resolved) else resolved  # a local bundle or model dir

    def reconstruct_partition(items):
        model = _worker_model(tracking_uri, registry_uri, provenance, model_uri)
        for i, path, scan_out in items:
            yield i, reconstruct_one(model, provenance, path, worker_cfg, scan_out, with_metrics)

    spark = spark_session(master)
    try:
        done = dict(spark.sparkContext.parallelize(jobs, numSlices=len(jobs))
                    .mapPartitions(reconstruct_partition).collect())
    except Exception as exc:  # not a scan's fault (those are rows): the executors could not run at all
        raise PtychoInputError(f"--engine spark: the Spark job failed ({_python_error(exc)}), expected executors "
                               "that can import ptycho_ml and reach the model") from None
    finally:
        spark.stop()
    # The table names scans and outputs as the user gave them, as the local engine's does.
    return [{**done[i], "scan": path, "out": _join(out, name)} for i, (path, name) in enumerate(zip(paths, names))]


def write_summary(rows: list[dict[str, Any]], out: str) -> str:
    """``OUT/summary.csv``: one row per scan (:data:`SUMMARY_COLUMNS`), written atomically; returns its path."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in SUMMARY_COLUMNS})
    with OutputLocation(out) as loc:
        from ptycho_ml.data.atomic import atomic_path

        with atomic_path(loc.path / SUMMARY_FILE) as tmp:
            Path(tmp).write_text(buffer.getvalue())
        return loc.describe(SUMMARY_FILE)


def run_batch(model, provenance: dict[str, Any], scans: str, out: str, cfg: InferenceConfig, engine: str = "local",
              master: str | None = None, with_metrics: bool = True) -> tuple[list[dict[str, Any]], str]:
    """Reconstruct every scan ``scans`` names into ``OUT/<name>/`` and write ``OUT/summary.csv``.

    ``model`` and ``provenance`` come from the shared loader. Returns the
    summary rows (in the order of ``scans``) and the table's location.
    """
    if engine not in ("local", "spark"):
        raise PtychoInputError(f"--engine: found '{engine}', expected 'local' or 'spark'")
    paths = list_scans(scans)
    names = output_names(paths)
    if engine == "local":
        rows = run_local(model, provenance, paths, names, cfg, out, with_metrics)
    else:
        rows = run_spark(provenance, paths, names, cfg, out, master, with_metrics)
    return rows, write_summary(rows, out)
