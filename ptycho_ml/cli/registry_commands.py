"""``ptycho-ml promote`` and ``ptycho-ml models``: registry commands (added to the main group with ``add_command``).

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
