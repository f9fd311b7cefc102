"""``ptycho-ml``: a thin click front end over the package's functions.

User errors print one line (``error: ...``) and exit 2; ``--debug`` shows the
traceback instead. The MLproject entry points run these same commands with
``--mlflow``, which wraps the work in an MLflow run (:mod:`ptycho_ml.lifecycle.tracking`):
one parser, one set of flag names.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import click
from click.core import ParameterSource

from ptycho_ml.version import __version__
from ptycho_ml.errors import PtychoInputError

_DEBUG = {"on": False}


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PtychoInputError as exc:
            if _DEBUG["on"]:
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ptycho-ml")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def main(debug: bool) -> None:
    """Physics-informed neural-network ptychographic reconstruction on MLflow."""
    _DEBUG["on"] = debug
    warnings.filterwarnings("default", category=UserWarning, module="ptycho_ml")


def _warnings_to_stderr() -> None:
    def show(message, category, filename, lineno, file=None, line=None):
        click.echo(f"warning: {message}", err=True)

    warnings.showwarning = show


# ---------------------------------------------------------------- simulate

_mlflow_option = click.option("--mlflow", "track", is_flag=True,
                              help="Run inside an MLflow run (the active one under `mlflow run`) and log to it.")


@main.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory (train.npz, test.npz).")
@click.option("--N", "N", default=64, show_default=True, type=int, help="Pattern size in pixels.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--nphotons", default=None, type=float, help="Mean photons per pattern (default 1e6).")
@click.option("--scan", type=click.Choice(["raster", "spiral"]), default=None, help="Scan pattern (default raster).")
@click.option("--probe", "probe_kind", type=click.Choice(["focused", "gaussian", "file"]), default=None)
@click.option("--probe-file", default="", help="NPZ (probeGuess) or .npy probe when --probe file.")
@click.option("--families", default=None, help="Comma-separated object families: lines,grf,siemens.")
@click.option("--which", default="train,test", show_default=True, help="Which scans to write.")
@click.option("--defocus-error", default=0.0, show_default=True, type=float,
              help="True defocus = (1 + this) x the file probe's; the file keeps the nominal probe.")
@click.option("--astigmatism", default=0.0, show_default=True, type=float,
              help="True astigmatism: ± this fraction of the defocus along x / y (absent from the file probe).")
@click.option("--missing-mode", default=0.0, show_default=True, type=float,
              help="Power fraction of a second true incoherent mode the file probe omits (0..0.5).")
@click.option("--position-noise-px", default=0.0, show_default=True, type=float, help="RMS error of the file positions (px, per axis).")
@click.option("--position-drift-px", default=0.0, show_default=True, type=float, help="Linear drift of the file positions over the scan (px).")
@_mlflow_option
def simulate(out_dir, N, seed, nphotons, scan, probe_kind, probe_file, families, which, defocus_error, astigmatism,
             missing_mode, position_noise_px, position_drift_px, track):
    """Simulate the default training scan and a held-out test scan (PtychoPINN NPZ with ground truth).

    The scan-error options make the file's probe and positions estimates of
    the truth that simulated the data (kept as probeTrue, xcoordsTrue, ycoordsTrue).
    """
    from ptycho_ml.config import ScanErrorConfig
    from ptycho_ml.physics import simulate as sim
    from ptycho_ml.physics.scan_errors import simulate_with_errors

    errors = ScanErrorConfig(defocus_error=defocus_error, astigmatism=astigmatism, missing_mode=missing_mode,
                             position_noise_px=position_noise_px, position_drift_px=position_drift_px, seed=seed)

    changes = {k: v for k, v in {"nphotons": nphotons, "scan": scan, "probe_kind": probe_kind,
                                 "probe_file": probe_file or None,
                                 "object_families": tuple(families.split(",")) if families else None}.items() if v is not None}
    wanted = [w.strip() for w in which.split(",") if w.strip()]
    configs = sim.default_configs(N=N, seed=seed)
    bad = [w for w in wanted if w not in configs]
    if bad:
        raise PtychoInputError(f"--which: found {bad}, expected a subset of {sorted(configs)}")
    written = []
    for name in wanted:
        cfg = type(configs[name]).from_dict({**configs[name].to_dict(), **changes})
        scan_data = simulate_with_errors(cfg, errors)
        path = sim.write_simulated(scan_data, Path(out_dir) / f"{name}.npz")
        written.append(str(path))
        click.echo(f"{path}: {len(scan_data.positions_px)} patterns of {cfg.N}x{cfg.N}, object {cfg.object_size_px}^2, nphotons {cfg.nphotons:g}")
    if track:
        from ptycho_ml.lifecycle.tracking import log_simulated

        log_simulated({"out": out_dir, "N": N, "seed": seed, **changes,
                       **{k: v for k, v in errors.to_dict().items() if v and k != "seed"}}, written)


# ---------------------------------------------------------------- train

SUPPORTED_BACKENDS = ("torch",)


def check_backend(backend: str) -> None:
    """Fail at once, before any heavy import, on an unsupported backend."""
    if backend not in SUPPORTED_BACKENDS:
        raise PtychoInputError(f"backend: found '{backend}', expected one of the supported backends: {', '.join(SUPPORTED_BACKENDS)}")


def _typed(ctx: click.Context, names: list[str]) -> dict:
    """The flags among ``names`` that the user gave (on the command line or by environment), not click defaults."""
    given = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)
    return {n: ctx.params[n] for n in names if ctx.get_parameter_source(n) in given}


def training_config(ctx: click.Context, config_file: str | None):
    """The TrainingConfig of a ``train`` call: the ``--config`` file, then the flags actually given, then defaults.

    A flag the user did not type never overrides the file (``--seed`` left at
    its default keeps the file's seed); an empty ``--data ''`` (as MLflow
    passes an unset parameter) counts as not given.
    """
    from ptycho_ml.config import TrainingConfig

    base = _read_json(config_file) if config_file else {}
    if not isinstance(base, dict):
        raise PtychoInputError(f"{config_file}: found a JSON {type(base).__name__}, expected a JSON object of config fields")
    flags = _typed(ctx, ["data", "test_data", "output_dir", "seed", "accelerator", "threads", "resume", "quiet",
                         "epochs", "batch_size", "learning_rate", "loss", "time_limit_s", "devices", "num_nodes",
                         "strategy", "refiner_iterations"])
    flags = {k: v for k, v in flags.items() if v not in ("", None) and not (k == "time_limit_s" and v == 0)}
    model = {**base.get("model", {}), **_typed(ctx, ["preset", "gridsize"])}
    merged = {**base, **flags}
    if model:
        merged["model"] = model
    return TrainingConfig.from_dict(merged)


@main.command()
@click.option("--data", default="", help="Training scan (NPZ/HDF5/ptychodus/s3://). Empty: simulate the embedded default.")
@click.option("--test-data", default="", help="Held-out scan with ground truth for quality metrics.")
@click.option("--out", "output_dir", default="outputs/train", show_default=True, help="Output directory (wts.h5.zip, checkpoints/, logs/).")
@click.option("--preset", type=click.Choice(["cpu", "gpu", "tiny"]), default="cpu", show_default=True)
@click.option("--gridsize", default=2, show_default=True, type=int, help="Patterns per group (gridsize²) under the overlap constraint.")
@click.option("--epochs", default=None, type=int, help="Maximum epochs (default 10).")
@click.option("--refiner-iterations", default=None, type=int,
              help="Training windows of the learned refinement after the generator (default 600; 0 = untrained stages).")
@click.option("--batch-size", default=None, type=int)
@click.option("--lr", "learning_rate", default=None, type=float)
@click.option("--loss", type=click.Choice(["auto", "poisson", "mae", "supervised", "hybrid"]), default=None,
              help="poisson: the measurements alone (physics); hybrid: physics + ground truth (objectGuess); "
                   "auto (default): hybrid when every training scan has its ground truth, else poisson.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--accelerator", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True)
@click.option("--threads", default=0, show_default=True, type=int, help="CPU threads (0 = all cores this process may use).")
@click.option("--devices", default=1, show_default=True, type=int,
              help="Processes (GPUs, or CPU processes) per node; above 1 Lightning trains data-parallel.")
@click.option("--num-nodes", default=1, show_default=True, type=int, help="Machines, each started by torchrun or SLURM.")
@click.option("--strategy", type=click.Choice(["auto", "ddp", "ddp_spawn"]), default="auto", show_default=True,
              help="Lightning strategy: ddp relaunches this command per device; ddp_spawn spawns workers.")
@click.option("--resume", default="", help="Checkpoint to resume from (e.g. OUT/checkpoints/last.ckpt).")
@click.option("--time-limit-s", default=0.0, type=float, help="Stop training after this many seconds (0 = no limit).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON file of TrainingConfig fields; the flags you type override it, defaults do not.")
@click.option("--quiet", is_flag=True, help="No progress bar or model summary.")
@click.option("--backend", default="torch", show_default=True, help="Deep-learning backend (only torch).")
@_mlflow_option
@click.option("--register-as", default="ptychopinn", show_default=True,
              help="With --mlflow: register the logged model as a new version of this name ('' = log only).")
@click.pass_context
def train(ctx, data, test_data, output_dir, preset, gridsize, epochs, refiner_iterations, batch_size, learning_rate, loss, seed,
          accelerator, threads, devices, num_nodes, strategy, resume, time_limit_s, config_file, quiet, backend, track,
          register_as):
    """Train a PINN reconstructor; writes OUT/wts.h5.zip (with --mlflow: logs and registers it too)."""
    from ptycho_ml.inference.metrics import format_table

    check_backend(backend)
    _warnings_to_stderr()
    config = training_config(ctx, config_file)
    if track:
        from ptycho_ml.lifecycle.tracking import train_tracked

        result, info, run_id = train_tracked(config, register_as)
        if not result.is_global_zero:  # the other processes of a multi-process run: rank 0 reports
            return
        click.echo(f"run {run_id}: model {info.model_uri}"
                   + (f", registered as {register_as} version {info.registered_model_version}" if register_as else ""))
    else:
        from ptycho_ml.lifecycle.training import train as run_train

        result = run_train(config)
        if not result.is_global_zero:
            return
    click.echo(f"bundle: {result.bundle_path}")
    click.echo(f"trained on {result.n_train} groups, validated on {result.n_val}, {len(result.history)} epochs, {result.elapsed_s:.0f} s")
    for label in ("network", "refined"):
        m = {k.split(f"test_{label}_", 1)[1]: v for k, v in result.metrics.items() if k.startswith(f"test_{label}_")}
        if m:
            click.echo(f"held-out scan, {label}:\n{format_table(m)}")


def _read_json(path: str) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as exc:
        raise PtychoInputError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno}), expected a JSON object of config fields") from None


# ---------------------------------------------------------------- reconstruct

def _allow_ungated(ctx, param, value):
    from ptycho_ml.lifecycle.registry import set_allow_ungated

    set_allow_ungated(True if value else None)  # None: $PTYCHO_ML_ALLOW_UNGATED decides
    ctx.call_on_close(lambda: set_allow_ungated(None))  # for this command only, even in a long-lived process


def _model_options(f):
    for opt in reversed([
        click.option("--bundle", default=None, help="Local or s3:// path to a wts.h5.zip bundle."),
        click.option("--model", "model_uri", default=None, help="MLflow model URI: models:/name/Production, models:/name@alias, runs:/ID/model, or a local model dir."),
        click.option("--name", default=None, help="Registered model name (with --stage/--alias/--version)."),
        click.option("--stage", default=None, help="Registry stage, e.g. Production."),
        click.option("--alias", default=None, help="Registry alias, e.g. champion."),
        click.option("--version", "model_version", default=None, help="Registered model version number."),
        click.option("--allow-ungated", is_flag=True, expose_value=False, callback=_allow_ungated,
                     help="Use a stage/alias holder that fails its policy gate (recorded in the outputs; "
                          "also $PTYCHO_ML_ALLOW_UNGATED=1)."),
    ]):
        f = opt(f)
    return f


def _load_model(bundle, model_uri, name, stage, alias, model_version):
    """``(model, provenance)`` from a bundle path, or an MLflow model URI / registry selector (resolved to its version)."""
    if bundle and (model_uri or stage or alias or model_version):
        raise PtychoInputError("--bundle: found together with --model/--stage/--alias/--version, expected one model source")
    from ptycho_ml.lifecycle.registry import load_model_with_provenance, resolve_model_uri

    if bundle:
        return load_model_with_provenance(bundle, is_bundle=True)
    uri = resolve_model_uri(model_uri, name=name, stage=stage, alias=alias, version=model_version)
    return load_model_with_provenance(uri)


def _refinement_options(f):
    """``--refine-probe``, ``--refine-positions``, ``--refine-intensity`` (alone = on; or ``true``/``false``, as
    MLflow passes a parameter), ``--probe-modes``, ``--probe-support-px``, ``--refine-auto``, ``--phase-gain``,
    ``--variance-reduction`` and ``--misfit-step-gain``: the
    :data:`~ptycho_ml.config.REFINEMENT_FIELDS` of :class:`~ptycho_ml.config.InferenceConfig`, which a command
    receives as ``**refinement``."""
    def switch(name: str, text: str):
        """A boolean flag: alone it is on; ``true``/``false`` as MLflow passes a parameter; unset: the config's."""
        return click.option(name, type=click.BOOL, is_flag=False, flag_value=True, default=None, help=text)

    for opt in reversed([
        switch("--refine-probe", "Refine the probe with the object (default off: measured, docs/benchmarks.md)."),
        switch("--refine-positions", "Correct the scan positions once the object has settled (bounded; default off)."),
        switch("--refine-intensity", "Fit a per-pattern intensity scale (flux fluctuations; default off)."),
        click.option("--probe-modes", default=None, type=int,
                     help="Incoherent probe modes to refine (with --refine-probe; default 1, at most 8; "
                          "a file probe with more keeps its strongest, power kept)."),
        click.option("--probe-support-px", default=None, type=float,
                     help="Radius (px) of a circular support the refined probe is kept inside (default 0 = none)."),
        switch("--refine-auto", "With no switch above: refine the probe and/or positions too where the data are not "
                                "explained by the object alone (default true; false = the object only)."),
        click.option("--phase-gain", default=None, type=float,
                     help="Extra gain of the refinement's phase wider than the probe (default 4, on the "
                          "variance-reduced passes; 0 = none; docs/benchmarks.md)."),
        switch("--variance-reduction", "Once the data are explained to their noise, variance-reduced refinement "
                                       "passes (default true; false = plain mini-batch passes throughout, every one "
                                       "taking the gain)."),
        click.option("--misfit-step-gain", default=None, type=float,
                     help="Object steps this many times larger while the data are misfit far above their noise "
                          "and the fit still falls (default 3; 1 = none; docs/benchmarks.md)."),
    ]):
        f = opt(f)
    return f


def _given(settings: dict) -> dict:
    """The flags given (None: not given, the config default applies)."""
    return {k: v for k, v in settings.items() if v is not None}


def _reconstruction_options(f):
    """The reconstruction flags, shared by ``reconstruct`` and ``batch``: their values make :func:`inference_config`."""
    for opt in reversed([
        click.option("--refine-steps", default=None, type=int, help="Physics-consistent refinement passes (default 45; 0 = network only)."),
        click.option("--refine-method", type=click.Choice(["object", "finetune"]), default="object", show_default=True),
        _refinement_options,
        click.option("--batch-size", default=256, show_default=True, type=int),
        click.option("--threads", default=0, show_default=True, type=int),
        click.option("--metrics/--no-metrics", default=True, show_default=True,
                     help="Score against the scan's ground truth (objectGuess) when it has one."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]):
        f = opt(f)
    return f


def inference_config(refine_steps, refine_method, batch_size, threads, quiet, refinement: dict):
    """The :class:`~ptycho_ml.config.InferenceConfig` of the reconstruction flags (a flag not given keeps the default);
    ``refinement``: the :func:`_refinement_options` values."""
    from ptycho_ml.config import InferenceConfig

    return InferenceConfig.from_dict(_given({"refine_steps": refine_steps, "refine_method": refine_method,
                                             "batch_size": batch_size, "threads": threads, "progress": not quiet,
                                             **refinement}))


@main.command()
@_model_options
@click.option("--data", required=True, help="Scan to reconstruct (NPZ/HDF5/ptychodus diffraction.h5/s3://).")
@click.option("--product", default=None, help="ptychodus product.h5 paired with a diffraction.h5 (default: beside it).")
@click.option("--out", "out_dir", required=True, help="Output directory or s3:// prefix.")
@_reconstruction_options
@_mlflow_option
def reconstruct(bundle, model_uri, name, stage, alias, model_version, data, product, out_dir, refine_steps,
                refine_method, batch_size, threads, metrics, quiet, track, **refinement):
    """Reconstruct every pattern of a scan, stitch, refine; writes object.h5, PNGs and product.h5."""
    from ptycho_ml.data.readers import load_scan
    from ptycho_ml.inference.outputs import run_reconstruction

    _warnings_to_stderr()
    if not (bundle or model_uri or stage or alias or model_version):
        raise PtychoInputError("no model given: expected --bundle PATH or --model URI (or --name with --stage/--alias/--version)")
    cfg = inference_config(refine_steps, refine_method, batch_size, threads, quiet, refinement)
    scan = load_scan(data, product=product)
    model, source = _load_model(bundle, model_uri, name, stage, alias, model_version)
    summary = run_reconstruction(model, scan, cfg, out_dir, provenance=source, with_metrics=metrics)
    if track:
        from ptycho_ml.lifecycle.tracking import log_reconstruction

        from ptycho_ml.config import REFINEMENT_FIELDS

        log_reconstruction({"model": source["uri"], "model_version": source["version"] or "", "data": data,
                            "refine_steps": cfg.refine_steps, **{k: getattr(cfg, k) for k in REFINEMENT_FIELDS}},
                           summary, out_dir)
    from ptycho_ml.lifecycle.registry import describe_provenance

    click.echo(f"model: {describe_provenance(source)}")
    for line in summary["lines"]:
        click.echo(line)


# ---------------------------------------------------------------- evaluate

@main.command()
@click.option("--reconstruction", "recon", default=None, help="object.h5 written by `reconstruct`.")
@_model_options
@click.option("--data", required=True, help="Scan with ground truth (objectGuess), e.g. the held-out test.npz.")
@click.option("--refine-steps", default=None, type=int, help="When reconstructing with a model: refinement passes.")
@_refinement_options
@click.option("--json", "json_out", default=None, help="Write the metrics as JSON here.")
@click.option("--warm-start", is_flag=True,
              help="With a model: also measure network start + K passes against flat start + 30 (passes and time saved).")
@_mlflow_option
def evaluate(recon, bundle, model_uri, name, stage, alias, model_version, data, refine_steps, json_out, warm_start,
             track, **refinement):
    """SSIM, PSNR, MAE and FRC (amplitude and phase) of a reconstruction against ground truth."""
    from ptycho_ml.inference.evaluate import evaluate_against_truth

    _warnings_to_stderr()
    model = source = None
    if not recon:
        if not (bundle or model_uri or stage or alias or model_version):
            raise PtychoInputError("nothing to evaluate: expected --reconstruction object.h5, --bundle PATH or --model URI")
        model, source = _load_model(bundle, model_uri, name, stage, alias, model_version)
    table, metrics = evaluate_against_truth(data, reconstruction=recon, model=model, refine_steps=refine_steps,
                                            refinement=_given(refinement))
    if warm_start:
        if model is None:
            raise PtychoInputError("--warm-start: found --reconstruction, expected a model (--bundle or --model) to start from")
        from ptycho_ml.data.readers import load_scan
        from ptycho_ml.inference.evaluate import format_warm_start
        from ptycho_ml.inference.evaluate import warm_start as measure_warm_start

        ws = measure_warm_start(model, load_scan(data))
        metrics.update(ws.figures())
        table += "\nwarm start:\n" + format_warm_start(ws)
    if track:
        from ptycho_ml.lifecycle.tracking import log_evaluation

        log_evaluation({"model": source["uri"] if source else "", "model_version": (source or {}).get("version") or "",
                        "reconstruction": recon or "", "data": data,
                        "refine_steps": "" if refine_steps is None else refine_steps}, metrics)
    click.echo(table)
    if json_out:
        from ptycho_ml.data.storage import OutputLocation, is_s3

        if is_s3(json_out):
            parent, fname = json_out.rsplit("/", 1)
            with OutputLocation(parent) as loc:
                (loc.path / fname).write_text(json.dumps(metrics, indent=2))
        else:
            Path(json_out).parent.mkdir(parents=True, exist_ok=True)
            Path(json_out).write_text(json.dumps(metrics, indent=2))
        click.echo(f"metrics: {json_out}")


# ---------------------------------------------------------------- convert

@main.command()
@click.option("--input", "input_path", required=True, help="NPZ/HDF5 scan, or a ptychodus diffraction.h5 (s3:// allowed).")
@click.option("--product", default=None, help="ptychodus product.h5 paired with --input (default: beside it).")
@click.option("--to", "target", type=click.Choice(["ptychodus", "npz"]), required=True,
              help="ptychodus: write diffraction.h5 + product.h5 into --out; npz: write a PtychoPINN NPZ to --out.")
@click.option("--out", "out", required=True, help="Output directory (ptychodus) or .npz path (npz); s3:// allowed.")
def convert(input_path, product, target, out):
    """Convert scans between PtychoPINN NPZ and ptychodus 1.7.0 files, both ways (streams large scans)."""
    from ptycho_ml.data.ptychodus import npz_to_ptychodus, ptychodus_to_npz
    from ptycho_ml.data.readers import load_scan
    from ptycho_ml.data.storage import OutputLocation, is_s3

    _warnings_to_stderr()
    scan = load_scan(input_path, product=product)
    if target == "ptychodus":
        existing = [n for n in ("diffraction.h5", "product.h5") if not is_s3(out) and (Path(out) / n).exists()]
        if existing:
            raise PtychoInputError(f"--out: '{out}' already holds {existing}, expected a new or empty directory (nothing was overwritten)")
        with OutputLocation(out) as loc:
            written = npz_to_ptychodus(scan, loc.path)
            names = [loc.describe(Path(p).name) for p in written]
    else:
        if not out.endswith(".npz"):
            raise PtychoInputError(f"--out: found '{out}', expected a path ending in .npz for --to npz")
        parent, fname = (out.rsplit("/", 1) if "/" in out else (".", out))
        if Path(out).exists() and not is_s3(out):
            raise PtychoInputError(f"--out: '{out}' already exists, expected a new file (nothing was overwritten)")
        with OutputLocation(parent) as loc:
            ptychodus_to_npz(scan, loc.path / fname)
            names = [loc.describe(fname)]
    click.echo(f"{len(scan)} patterns of {scan.N}x{scan.N} -> " + ", ".join(names))


# ---------------------------------------------------------------- inspect

@main.command()
@click.argument("bundle_path")
def inspect(bundle_path):
    """Show a wts.h5.zip bundle's manifest, models and configuration (loads no weights)."""
    from ptycho_ml.model.bundle import inspect_bundle
    from ptycho_ml.data.storage import local_path

    click.echo(json.dumps(inspect_bundle(local_path(bundle_path)), indent=2, default=str))


def _register_lifecycle_commands() -> None:
    from ptycho_ml.cli.registry_commands import gatekeeper, models, promote, register, serve

    main.add_command(promote)
    main.add_command(models)
    main.add_command(gatekeeper)
    main.add_command(register)
    main.add_command(serve)
    from ptycho_ml.cli.batch import batch

    main.add_command(batch)


_register_lifecycle_commands()
