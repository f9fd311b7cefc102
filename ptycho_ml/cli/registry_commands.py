"""``ptycho-ml promote``, ``models``, ``register``, ``gatekeeper``, ``serve``: registry commands (added to the main group with ``add_command``).

User errors are :class:`~ptycho_ml.errors.PtychoInputError`; the main group
prints them as one line and exits 2.
"""

from __future__ import annotations

import click

from ptycho_ml.errors import PtychoInputError
from ptycho_ml.lifecycle.registry import DEFAULT_MODEL_NAME

_tracking_option = click.option("--tracking-uri", default=None,
                                help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else MLflow's default).")


def _use_tracking_uri(uri: str | None) -> str:
    import mlflow

    if uri:
        mlflow.set_tracking_uri(uri)
    return mlflow.get_tracking_uri()


@click.command()
@click.option("--name", default=DEFAULT_MODEL_NAME, show_default=True, help="Registered model name.")
@click.option("--version", "model_version", default=None, help="Version number, or 'latest'.")
@click.option("--run-id", default=None, help="Promote the version registered from this run instead.")
@click.option("--stage", default=None, metavar="Staging|Production|Archived",
              help="Move the version to this stage (case-insensitive; the previous Staging/Production holder is archived).")
@click.option("--alias", default=None, help="Point this alias at the version, e.g. champion.")
@click.option("--force", is_flag=True, help="Promote even if the policy's metric gate fails (recorded on the version).")
@click.option("--policy", "policy_file", default=None, help="Promotion policy TOML (default: registry/policy.toml).")
@_tracking_option
def promote(name, model_version, run_id, stage, alias, force, policy_file, tracking_uri):
    """Promote a registered model version by stage and/or alias, if it passes the policy's metric gates."""
    from ptycho_ml.lifecycle import registry

    if bool(model_version) == bool(run_id):
        raise PtychoInputError("promote: found " + ("both --version and --run-id" if model_version else "neither --version nor --run-id")
                               + ", expected exactly one")
    if not stage and not alias:
        raise PtychoInputError("promote: found neither --stage nor --alias, expected at least one")
    _use_tracking_uri(tracking_uri)
    version = model_version or registry.version_for_run(name, run_id)
    result = registry.promote(name, version, stage=stage, alias=alias, force=force,
                              policy=registry.load_policy(policy_file))
    v = result["version"]
    if result["stage"]:
        archived = f" (archived version {', '.join(result['archived'])})" if result["archived"] else ""
        click.echo(f"{name} version {v} -> stage {result['stage']}{archived}")
    if result["alias"]:
        previous = result["previous_alias_version"]
        was = f" (was version {previous})" if previous not in (None, v) else ""
        click.echo(f"{name} version {v} -> alias @{result['alias']}{was}")
    if result["forced"]:
        click.echo(f"forced past the gate: {'; '.join(result['failures'])}")


@click.command()
@click.option("--name", default=DEFAULT_MODEL_NAME, show_default=True, help="Registered model name.")
@_tracking_option
def models(name, tracking_uri):
    """List a registered model's versions with stage, aliases, held-out SSIMs and run id."""
    from ptycho_ml.lifecycle import registry

    uri = _use_tracking_uri(tracking_uri)
    click.echo(f"{name} ({uri})")
    click.echo(registry.format_versions(registry.list_versions(name)))


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8765, show_default=True, type=int, help="Port to listen on (0 = any free port).")
@click.option("--url", default=None, help="URL the tracking server reaches this receiver at (default http://HOST:PORT/).")
@click.option("--register/--no-register", default=True, show_default=True,
              help="Create (or re-point) the tracking server's webhook 'ptycho-ml-gatekeeper' at --url.")
@click.option("--sweep-s", default=30.0, show_default=True, type=float,
              help="Seconds between sweeps of every model's stages (stage transitions send no webhook).")
@click.option("--policy", "policy_file", default=None, help="Promotion policy TOML (default: registry/policy.toml).")
@_tracking_option
def gatekeeper(host, port, url, register, sweep_s, policy_file, tracking_uri):
    """Receive MLflow registry webhooks: judge promotions by the policy, tag the verdicts, revert what fails.

    Run beside `mlflow server` (SQL store; MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true on the server when this
    receiver is on a private address). Deliveries are verified when $PTYCHO_ML_GATEKEEPER_SECRET is set.
    """
    import logging
    import os
    import threading

    from ptycho_ml.lifecycle.gatekeeper import SECRET_ENV, Gatekeeper, make_server, register_webhook, run_sweeper

    if sweep_s <= 0:
        raise PtychoInputError(f"--sweep-s: found {sweep_s:g}, expected a positive number of seconds")
    uri = _use_tracking_uri(tracking_uri)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s gatekeeper: %(message)s")
    secret = os.environ.get(SECRET_ENV) or None
    keeper = Gatekeeper(policy=policy_file)
    try:
        server = make_server(keeper, host, port, secret)
    except OSError as exc:
        raise PtychoInputError(f"--host/--port: cannot listen on {host}:{port} ({exc.strerror}), expected a free port") from None
    url = url or f"http://{host}:{server.server_address[1]}/"
    if register:
        from mlflow.exceptions import MlflowException

        try:
            register_webhook(url, secret)
        except MlflowException as exc:
            server.server_close()
            raise PtychoInputError(f"--register: the tracking server {uri} refused the webhook for {url} "
                                   f"({str(exc.message).splitlines()[0]}); expected a SQL-backed `mlflow server` "
                                   "(with MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https for http:// and MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true for a private address)") from None
    for line in keeper.sweep_all():
        logging.getLogger("ptycho_ml.gatekeeper").info(line)
    stop = threading.Event()
    run_sweeper(keeper, sweep_s, stop)
    click.echo(f"gatekeeper on {url} for {uri} (policy {keeper.policy['path']}; signatures "
               f"{'verified' if secret else 'not verified: no $' + SECRET_ENV}; stages swept every {sweep_s:g} s)",
               err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        server.server_close()


@click.command()
@click.option("--bundle", required=True, help="A wts.h5.zip bundle (local or s3://), e.g. written by `ptycho-ml train`.")
@click.option("--name", default=DEFAULT_MODEL_NAME, show_default=True, help="Registered model name.")
@click.option("--metrics-from-data", default=None,
              help="Held-out scan with ground truth to measure the figures the gates judge "
                   "(default: the figures the bundle recorded at training).")
@click.option("--threads", default=0, show_default=True, type=int, help="CPU threads for the measurement.")
@_tracking_option
def register(bundle, name, metrics_from_data, threads, tracking_uri):
    """Log a bundle trained outside `mlflow run` as a ptycho_ml model with its figures, and register it."""
    from ptycho_ml.lifecycle.bundle_registration import register_bundle

    _use_tracking_uri(tracking_uri)
    result = register_bundle(bundle, name, metrics_from_data, threads)
    click.echo(f"{result['name']} version {result['version']} from {bundle} (run {result['run_id']}; "
               f"figures {result['metrics_source']})")
    for target, failures in result["verdicts"].items():
        click.echo(f"  {target}: {'pass' if not failures else 'fails: ' + '; '.join(failures)}")


@click.command()
@click.option("--model", "model_uri", required=True,
              help="Registry URI to follow: models:/NAME@ALIAS or models:/NAME/STAGE (a version number never changes).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5001, show_default=True, type=int)
@click.option("--poll-s", default=5.0, show_default=True, type=float,
              help="Seconds between re-resolutions of the alias or stage.")
@click.option("--allow-ungated", is_flag=True,
              help="Serve holders that fail their policy gate (named in the X-Ptycho-Model-Gate header).")
@_tracking_option
def serve(model_uri, host, port, poll_s, allow_ungated, tracking_uri):
    """Serve a stage or alias with MLflow's scoring server, following promotions without a restart."""
    import logging
    import threading

    import uvicorn

    from ptycho_ml.lifecycle.registry import describe_provenance
    from ptycho_ml.lifecycle.serving import FollowingModel, build_app, run_poller

    if poll_s <= 0:
        raise PtychoInputError(f"--poll-s: found {poll_s:g}, expected a positive number of seconds")
    _use_tracking_uri(tracking_uri)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s serve: %(message)s")
    following = FollowingModel(model_uri, allow_ungated=True if allow_ungated else None)
    click.echo(f"serving {describe_provenance(following.provenance)} on http://{host}:{port}/invocations "
               f"(re-resolved every {poll_s:g} s)", err=True)
    stop = threading.Event()
    run_poller(following, poll_s, stop)
    try:
        uvicorn.run(build_app(following), host=host, port=port, log_level="warning")
    finally:
        stop.set()
