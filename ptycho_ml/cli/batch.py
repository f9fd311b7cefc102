"""``ptycho-ml batch``: reconstruct many scans with one model, here or on Spark (added to the main group).

The model flags and the reconstruction flags are ``reconstruct``'s own
(:func:`ptycho_ml.cli._model_options`, :func:`ptycho_ml.cli._reconstruction_options`),
and the model is loaded by the same shared loader; the work is
:func:`ptycho_ml.lifecycle.batch.run_batch`.
"""

from __future__ import annotations

import click

from ptycho_ml.cli import _load_model, _model_options, _reconstruction_options, _warnings_to_stderr, inference_config
from ptycho_ml.errors import PtychoInputError


@click.command()
@_model_options
@click.option("--scans", required=True,
              help="Scans to reconstruct: a quoted glob ('data/*.npz') or a manifest .txt (one scan per line).")
@click.option("--out", "out_dir", required=True, help="Output directory or s3:// prefix: OUT/<scan>/ per scan, OUT/summary.csv.")
@click.option("--engine", type=click.Choice(["local", "spark"]), default="local", show_default=True,
              help="local: one scan after another in this process; spark: one Spark task per scan.")
@click.option("--master", default=None, help="Spark master with --engine spark, e.g. local[2] (default: spark-submit's, else local[*]).")
@_reconstruction_options
def batch(bundle, model_uri, name, stage, alias, model_version, scans, out_dir, engine, master, refine_steps,
          refine_method, batch_size, threads, metrics, quiet, **refinement):
    """Reconstruct many scans (the files `reconstruct` writes, per scan) and write one summary table."""
    from ptycho_ml.lifecycle.batch import run_batch
    from ptycho_ml.lifecycle.registry import describe_provenance

    _warnings_to_stderr()
    if not (bundle or model_uri or stage or alias or model_version):
        raise PtychoInputError("no model given: expected --bundle PATH or --model URI (or --name with --stage/--alias/--version)")
    if master and engine != "spark":
        raise PtychoInputError(f"--master: found '{master}' with --engine {engine}, expected --engine spark")
    cfg = inference_config(refine_steps, refine_method, batch_size, threads, quiet, refinement)
    model, source = _load_model(bundle, model_uri, name, stage, alias, model_version)
    click.echo(f"model: {describe_provenance(source)}")
    rows, table = run_batch(model, source, scans, out_dir, cfg, engine=engine, master=master, with_metrics=metrics)
    for row in rows:
        detail = f"{row['n_patterns']} patterns, {row['seconds']:.1f} s" if row["status"] == "ok" else row["error"]
        click.echo(f"{row['status']:5s} {row['scan']} -> {row['out']}: {detail}")
    click.echo(f"summary: {table}")
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        raise PtychoInputError(f"{len(failed)} of {len(rows)} scans failed (first: {failed[0]['error']}); "
                               f"the others are in {out_dir}, see {table}")
