"""Registry: URI resolution, gated promotion by stage and alias, load-time resolution, CLI.

Everything is real: a temporary sqlite tracking store, runs with logged
metrics, tiny ptycho_ml models logged with our flavour and registered.
"""

from __future__ import annotations

import re

import click
import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from ptycho_ml import flavor
from ptycho_ml.lifecycle import registry
from ptycho_ml.cli import _Group
from ptycho_ml.cli.registry_commands import models, promote
from ptycho_ml.config import ModelConfig
from ptycho_ml.errors import PtychoInputError
from ptycho_ml.model.bundle_io import save_model_bundle
from ptycho_ml.model.network import DiffractionToObject

N = 32
# Held-out metrics of the logged runs: "good" passes Production, "fair" only
# Staging, "partial" lacks the phase SSIM.
RUNS = {
    "good": {"test_refined_amplitude_ssim": 0.91, "test_refined_phase_ssim": 0.72,
             "test_network_amplitude_ssim": 0.85, "test_network_phase_ssim": 0.61},
    "good2": {"test_refined_amplitude_ssim": 0.93, "test_refined_phase_ssim": 0.75,
              "test_network_amplitude_ssim": 0.88, "test_network_phase_ssim": 0.66},
    "fair": {"test_refined_amplitude_ssim": 0.63, "test_refined_phase_ssim": 0.412},
    "partial": {"test_refined_amplitude_ssim": 0.95},
}
POLICY = {"stages": {"Staging": {"min": {"test_refined_amplitude_ssim": 0.5}},
                     "Production": {"min": {"test_refined_amplitude_ssim": 0.8, "test_refined_phase_ssim": 0.5}}},
          "aliases": {"champion": {"same_as": "Production"}}}
# The same policy as a file: the load-time gate reads it through $PTYCHO_ML_POLICY.
POLICY_TOML = """[stages.Staging.min]
test_refined_amplitude_ssim = 0.5
[stages.Production.min]
test_refined_amplitude_ssim = 0.8
test_refined_phase_ssim = 0.5
[aliases.champion]
same_as = "Production"
"""


def _tiny_model(seed: int) -> DiffractionToObject:
    torch.manual_seed(seed)
    return DiffractionToObject(ModelConfig(preset="tiny", N=N), probe=torch.ones(N, N, dtype=torch.complex64),
                               amplitude_scale=1.0)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A temporary sqlite store holding one run per entry of RUNS, each with a logged, registered tiny model."""
    from mlflow.tracking._tracking_service import utils as tracking_utils

    old_uri = tracking_utils._tracking_uri
    root = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # MLflow writes nothing into the repository
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        uri = f"sqlite:///{root}/mlflow.db"
        mp.setenv("MLFLOW_TRACKING_URI", uri)  # restored (or removed) when the module ends
        (root / "policy.toml").write_text(POLICY_TOML)
        mp.setenv(registry.POLICY_ENV, str(root / "policy.toml"))
        mp.delenv(registry.ALLOW_UNGATED_ENV, raising=False)
        mlflow.set_tracking_uri(uri)
        out = {}
        for seed, (label, metrics) in enumerate(RUNS.items()):
            model = _tiny_model(seed)
            with mlflow.start_run() as run:
                mlflow.log_metrics(metrics)
                info = flavor.log_model(model, name="model", registered_model_name=registry.DEFAULT_MODEL_NAME)
            out[label] = {"run_id": run.info.run_id, "model_uri": info.model_uri, "model": model}
        out["tracking_uri"] = uri
        try:
            yield out
        finally:
            mlflow.set_tracking_uri(old_uri)


@pytest.fixture
def make_model(logged, request):
    """Register a fresh model (unique name per test) whose versions 1, 2, ... are the given logged runs."""
    name = "t_" + re.sub(r"\W", "_", request.node.name)[:60]

    def make(*labels: str) -> str:
        for label in labels:
            mlflow.register_model(logged[label]["model_uri"], name)
        return name

    return make


def _stages(name: str) -> dict[str, str]:
    return {str(v.version): v.current_stage for v in MlflowClient().search_model_versions(f"name = '{name}'")}


# ---------------------------------------------------------------- resolve_model_uri

def test_resolve_model_uri_variants():
    r = registry.resolve_model_uri
    for uri in ("models:/m/Production", "models:/m@champion", "models:/m/3", "models:/m/latest", "runs:/abc/model",
                "/tmp/model_dir", "out/wts.h5.zip", "s3://bucket/wts.h5.zip", "models:/m-0123abcd"):
        assert r(uri) == uri
    assert r("models:/m/production") == "models:/m/Production"
    assert r(stage="staging") == "models:/ptychopinn/Staging"
    assert r(name="m", alias="champion") == "models:/m@champion"
    assert r(name="m", version=4) == "models:/m/4"
    assert r(version="latest") == "models:/ptychopinn/latest"


@pytest.mark.parametrize("kwargs, match", [
    ({}, "found none, expected exactly one of --stage, --alias or --version"),
    ({"stage": "Production", "alias": "champion"}, "found --stage 'Production' and --alias 'champion'"),
    ({"stage": "Prod"}, "--stage: found 'Prod', expected one of None, Staging, Production, Archived"),
    ({"alias": "latest"}, "--alias: found 'latest'"),
    ({"alias": "v3"}, "--alias: found 'v3'"),
    ({"alias": "bad alias"}, "--alias: found 'bad alias'"),
    ({"version": "0"}, "--version: found '0', expected a positive version number or 'latest'"),
    ({"version": "x"}, "--version: found 'x'"),
    ({"model_uri": "models:/m/Production", "stage": "Staging"}, "--model: found together with --stage"),
    ({"model_uri": "runs:/a/model", "name": "m"}, "--model: found together with --name"),
    ({"model_uri": "models:/m/Prod"}, "models:/m/Prod: found 'Prod' after the model name"),
    ({"model_uri": "models:/m@latest"}, "models:/m@latest: found 'latest'"),
])
def test_resolve_model_uri_errors(kwargs, match):
    with pytest.raises(PtychoInputError, match=re.escape(match)) as info:
        registry.resolve_model_uri(**kwargs)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- policy

def test_default_policy_file_has_the_documented_gates(monkeypatch, tmp_path):
    monkeypatch.delenv(registry.POLICY_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # not the repo: found next to the package
    policy = registry.load_policy()
    assert policy["path"].endswith("registry/policy.toml")
    production = policy["stages"]["Production"]["min"]
    # the network is judged too, not only the refined figures (which refinement makes high for any network)
    assert {"test_network_amplitude_ssim", "test_network_phase_ssim", "test_passes_saved",
            "test_refined_amplitude_ssim", "test_refined_phase_ssim"} == set(production)
    assert policy["stages"]["Staging"]["min"]["test_network_amplitude_ssim"] <= production["test_network_amplitude_ssim"]
    assert policy["aliases"]["champion"]["same_as"] == "Production"
    # $PTYCHO_ML_POLICY, then ./registry/policy.toml, take precedence
    (tmp_path / "registry").mkdir()
    (tmp_path / "registry" / "policy.toml").write_text("[stages.Staging.min]\nx = 1\n")
    assert registry.load_policy()["stages"] == {"Staging": {"min": {"x": 1.0}, "max": {}}}
    env_file = tmp_path / "env.toml"
    env_file.write_text("[stages.production.max]\ny = 2\n")
    monkeypatch.setenv(registry.POLICY_ENV, str(env_file))
    assert registry.load_policy()["stages"] == {"Production": {"min": {}, "max": {"y": 2.0}}}


@pytest.mark.parametrize("text, match", [
    ("[stages.Prod.min]\nx = 1\n", "field 'stages.Prod': found 'Prod'"),
    ("[stages.Staging.min]\nx = 'high'\n", "field 'stages.Staging.min.x': found 'high', expected a finite number"),
    ("[stages.Staging]\nminimum = 1\n", "field 'stages.Staging.minimum': found an unknown key"),
    ("[gates]\n", "field 'gates': found an unknown table"),
    ("[aliases.champion]\nsame_as = 'Prod'\n", "field 'aliases.champion.same_as': found 'Prod'"),
    ("[stages.Staging.min\n", "invalid TOML"),
])
def test_invalid_policy_is_a_one_line_error(tmp_path, text, match):
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(PtychoInputError, match=re.escape(match)) as info:
        registry.load_policy(path)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    with pytest.raises(PtychoInputError, match="no such policy file"):
        registry.load_policy(tmp_path / "absent.toml")


def test_gate_min_max_missing_and_nan():
    policy = registry.validate_policy({"stages": {"Production": {"min": {"a": 0.5}, "max": {"b": 1.0}}},
                                       "aliases": {"champion": {"same_as": "Production", "min": {"c": 2}}}})
    assert registry.gate_failures({"a": 0.5, "b": 1.0, "c": 2}, policy, "Production") == []
    assert registry.gate_failures({"a": 0.49996, "b": 1.5}, policy, "production") == [
        "a = 0.49996 < 0.5 required for Production", "b = 1.5 > 1 allowed for Production"]
    assert registry.gate_failures({"a": float("nan"), "b": 0}, policy, "@champion") == [
        "a = nan (>= 0.5 required for @champion)", "c missing (>= 2 required for @champion)"]
    assert registry.gate_failures({}, policy, "Staging") == []       # no gate for Staging here
    assert registry.gate_failures({}, policy, "challenger") == []    # nor for an unlisted alias


# ---------------------------------------------------------------- promote

def test_stage_promotion_archives_the_previous_holder(make_model):
    name = make_model("good", "good2")
    first = registry.promote(name, 1, stage="Production", policy=POLICY)
    assert first["archived"] == [] and not first["forced"]
    second = registry.promote(name, "latest", stage="production", policy=POLICY)
    assert second["version"] == "2" and second["stage"] == "Production" and second["archived"] == ["1"]
    assert _stages(name) == {"1": "Archived", "2": "Production"}
    tags = MlflowClient().get_model_version(name, "2").tags
    assert tags[registry.TAG_PROMOTED_TO] == "Production" and registry.TAG_PROMOTED_AT in tags
    assert registry.TAG_FORCED not in tags


def test_alias_is_set_moved_and_resolved(make_model, logged):
    name = make_model("good", "good2")
    assert registry.promote(name, 1, alias="champion", policy=POLICY)["previous_alias_version"] is None
    model = registry.load_native_model(registry.resolve_model_uri(name=name, alias="champion"))
    assert _same_weights(model, logged["good"]["model"])
    moved = registry.promote(name, 2, alias="champion", stage="Staging", policy=POLICY)
    assert moved["previous_alias_version"] == "1"
    assert MlflowClient().get_registered_model(name).aliases == {"champion": 2}
    assert _same_weights(registry.load_native_model(f"models:/{name}@champion"), logged["good2"]["model"])
    assert _stages(name) == {"1": "None", "2": "Staging"}


def test_gate_refusal_shows_the_numbers_and_changes_nothing(make_model):
    name = make_model("fair")
    registry.promote(name, 1, stage="Staging", policy=POLICY)
    with pytest.raises(PtychoInputError) as info:
        registry.promote(name, 1, stage="Production", alias="champion", policy=POLICY)
    message = str(info.value)
    assert "\n" not in message and f"{name} version 1 refused for Production and @champion" in message
    assert "test_refined_phase_ssim = 0.412 < 0.5 required for Production" in message
    assert "test_refined_amplitude_ssim = 0.63 < 0.8 required for @champion" in message
    assert _stages(name) == {"1": "Staging"}
    assert MlflowClient().get_registered_model(name).aliases == {}
    assert registry.TAG_PROMOTED_TO in MlflowClient().get_model_version(name, "1").tags  # from the Staging step only
    assert MlflowClient().get_model_version(name, "1").tags[registry.TAG_PROMOTED_TO] == "Staging"


def test_force_promotes_and_records_the_reasons(make_model):
    name = make_model("fair")
    result = registry.promote(name, 1, stage="Production", force=True, policy=POLICY)
    reasons = ["test_refined_amplitude_ssim = 0.63 < 0.8 required for Production",
               "test_refined_phase_ssim = 0.412 < 0.5 required for Production"]
    assert result["forced"] and result["failures"] == reasons
    assert _stages(name) == {"1": "Production"}
    forced = MlflowClient().get_model_version(name, "1").tags[registry.TAG_FORCED]
    assert forced == "Production: " + "; ".join(reasons)


def test_missing_metric_fails_the_gate(make_model):
    name = make_model("partial")
    client = MlflowClient()
    assert registry.check_gate(client, name, 1, "Production", POLICY) == [
        "test_refined_phase_ssim missing (>= 0.5 required for Production)"]
    assert registry.check_gate(client, name, 1, "Staging", POLICY) == []
    with pytest.raises(PtychoInputError, match="test_refined_phase_ssim missing"):
        registry.promote(name, 1, alias="champion", policy=POLICY)


def test_promote_input_errors(make_model):
    name = make_model("good")
    with pytest.raises(PtychoInputError, match="found neither --stage nor --alias"):
        registry.promote(name, 1, policy=POLICY)
    with pytest.raises(PtychoInputError, match=re.escape(f"--version: found 7, expected one of 1 of '{name}'")):
        registry.promote(name, 7, stage="Staging", policy=POLICY)
    with pytest.raises(PtychoInputError, match="--name: found 'nope', which is not registered, expected one of: "):
        registry.promote("nope", 1, stage="Staging", policy=POLICY)
    with pytest.raises(PtychoInputError, match="--stage: found 'Live'"):
        registry.promote(name, 1, stage="Live", policy=POLICY)


# ---------------------------------------------------------------- load at inference time

def test_load_production_returns_the_logged_weights(make_model, logged):
    name = make_model("fair", "good")
    assert not _same_weights(logged["fair"]["model"], logged["good"]["model"])
    registry.promote(name, 2, stage="Production", policy=POLICY)
    model = registry.load_native_model(registry.resolve_model_uri(f"models:/{name}/production"))
    assert isinstance(model, DiffractionToObject) and not model.training
    assert _same_weights(model, logged["good"]["model"])
    assert _same_weights(registry.load_native_model(f"runs:/{logged['fair']['run_id']}/model"), logged["fair"]["model"])


def test_default_name_production_resolves_through_the_flavour(logged):
    """The versions the flavour registered under ``ptychopinn`` itself, selected by stage."""
    client = MlflowClient()
    version = next(v for v in client.search_model_versions("name = 'ptychopinn'") if v.run_id == logged["good"]["run_id"])
    registry.promote("ptychopinn", version.version, stage="Production", policy=POLICY)
    assert _same_weights(registry.load_native_model("models:/ptychopinn/Production"), logged["good"]["model"])


def test_ui_promotions_are_honoured_at_load_time(make_model, logged):
    """Stage transitions and aliases set directly in the registry (as the UI does) take effect on the next load."""
    name = make_model("good", "good2")
    client = MlflowClient()
    uri = registry.resolve_model_uri(name=name, stage="Production")
    with pytest.warns(FutureWarning):
        client.transition_model_version_stage(name, "1", "Production")
    assert _same_weights(registry.load_native_model(uri), logged["good"]["model"])
    with pytest.warns(FutureWarning):
        client.transition_model_version_stage(name, "2", "Production", archive_existing_versions=True)
    assert _same_weights(registry.load_native_model(uri), logged["good2"]["model"])
    client.set_registered_model_alias(name, "champion", "1")
    assert _same_weights(registry.load_native_model(f"models:/{name}@champion"), logged["good"]["model"])


def test_load_errors_name_what_the_registry_holds(make_model):
    name = make_model("good", "fair")
    registry.promote(name, 2, stage="Staging", alias="candidate", policy=POLICY)
    holds = "it has versions 1, 2; stages Staging: v2; aliases candidate: v2"
    cases = {f"models:/{name}/Production": f"no version of '{name}' is in stage Production; {holds}",
             f"models:/{name}@champion": f"'{name}' has no alias 'champion'; {holds}",
             f"models:/{name}/9": f"'{name}' has no version 9; {holds}",
             "models:/nope/Production": "no registered model 'nope' in sqlite:///"}
    for uri, expected in cases.items():
        with pytest.raises(PtychoInputError) as info:
            registry.load_native_model(uri)
        assert str(info.value).startswith(f"{uri}: ") and expected in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(PtychoInputError, match="^runs:/0123/model: Run with id=0123 not found"):
        registry.load_native_model("runs:/0123/model")


def test_load_bundle_paths(tmp_path, logged):
    model = logged["good"]["model"]
    bundle = save_model_bundle(model, tmp_path / "train" / "wts.h5.zip")
    assert _same_weights(registry.load_native_model(str(bundle)), model)
    assert _same_weights(registry.load_native_model(str(tmp_path / "train")), model)  # a training output dir
    with pytest.raises(PtychoInputError, match="no such file or directory"):
        registry.load_native_model(str(tmp_path / "absent" / "wts.h5.zip"))
    with pytest.raises(PtychoInputError, match="has no MLmodel or wts.h5.zip"):
        registry.load_native_model(str(tmp_path))


# ---------------------------------------------------------------- list

def test_list_versions_rows_and_table(make_model, logged):
    name = make_model("good", "fair")
    registry.promote(name, 1, stage="Production", alias="champion", policy=POLICY)
    registry.promote(name, 2, stage="Staging", alias="candidate", force=False, policy=POLICY)
    rows = registry.list_versions(name)
    assert [(r["version"], r["stage"], r["aliases"], r["run_id"]) for r in rows] == [
        (2, "Staging", ["candidate"], logged["fair"]["run_id"]), (1, "Production", ["champion"], logged["good"]["run_id"])]
    assert rows[1]["metrics"]["test_refined_phase_ssim"] == pytest.approx(0.72)
    assert rows[0]["metrics"]["test_network_phase_ssim"] is None
    table = registry.format_versions(rows).splitlines()
    assert table[0].split()[:3] == ["version", "stage", "aliases"]
    assert table[2].split()[:7] == ["1", "Production", "champion", "0.8500", "0.6100", "0.9100", "0.7200"]
    assert table[1].split()[:5] == ["2", "Staging", "candidate", "-", "-"]


# ---------------------------------------------------------------- CLI

def _cli() -> click.Group:
    """The registry commands under the main group's error handling (one-line error, exit 2)."""
    from ptycho_ml.cli import main

    if "promote" in main.commands and "models" in main.commands:
        return main
    return _Group(name="ptycho-ml", commands={"promote": promote, "models": models})


def test_cli_promote_and_models(make_model, logged, tmp_path):
    name = make_model("good", "good2", "fair")
    runner, cli, tracking = CliRunner(), _cli(), ["--tracking-uri", logged["tracking_uri"]]
    result = runner.invoke(cli, ["promote", "--name", name, "--version", "1", "--stage", "production",
                                 "--alias", "champion", *tracking])
    assert result.exit_code == 0, result.output
    assert f"{name} version 1 -> stage Production" in result.output and "-> alias @champion" in result.output
    result = runner.invoke(cli, ["promote", "--name", name, "--run-id", logged["good2"]["run_id"],
                                 "--stage", "Production", "--alias", "champion", *tracking])
    assert result.exit_code == 0, result.output
    assert f"{name} version 2 -> stage Production (archived version 1)" in result.output
    assert f"{name} version 2 -> alias @champion (was version 1)" in result.output

    refused = runner.invoke(cli, ["promote", "--name", name, "--version", "3", "--stage", "Production"])
    assert refused.exit_code == 2
    lines = refused.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {name} version 3 refused for Production: ")
    assert "test_refined_phase_ssim = 0.412 < 0.5 required for Production" in lines[0] and "--force" in lines[0]
    assert _stages(name)["3"] == "None"

    forced = runner.invoke(cli, ["promote", "--name", name, "--version", "latest", "--stage", "Production", "--force"])
    assert forced.exit_code == 0, forced.output
    assert "archived version 2" in forced.output and "forced past the gate: test_refined_amplitude_ssim = 0.63 < 0.8" in forced.output

    listing = runner.invoke(cli, ["models", "--name", name, *tracking])
    assert listing.exit_code == 0, listing.output
    rows = {line.split()[0]: line.split() for line in listing.output.splitlines()[2:] if line[:1].isdigit()}
    assert rows["3*"][1] == "Production" and rows["2"][1:3] == ["Archived", "champion"]
    assert rows["1"][1:7] == ["Archived", "-", "0.8500", "0.6100", "0.9100", "0.7200"]
    assert logged["good"]["run_id"] in rows["1"] and "--force past a failed gate" in listing.output


@pytest.mark.parametrize("args, match", [
    (["--stage", "Staging"], "found neither --version nor --run-id, expected exactly one"),
    (["--version", "1", "--run-id", "x", "--stage", "Staging"], "found both --version and --run-id"),
    (["--version", "1"], "found neither --stage nor --alias"),
    (["--version", "1", "--stage", "Prod"], "--stage: found 'Prod', expected one of None, Staging, Production, Archived"),
    (["--run-id", "0123", "--stage", "Staging"], "--run-id: found no version of"),
    (["--version", "1", "--stage", "Staging", "--policy", "absent.toml"], "absent.toml: no such policy file"),
])
def test_cli_promote_user_errors(make_model, args, match):
    name = make_model("good")
    result = CliRunner().invoke(_cli(), ["promote", "--name", name, *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and match in result.output and len(result.output.strip().splitlines()) == 1


def test_cli_models_unknown_name(logged):
    result = CliRunner().invoke(_cli(), ["models", "--name", "nope"])
    assert result.exit_code == 2 and "error: --name: found 'nope', which is not registered" in result.output


def test_reconstruct_records_the_resolved_version_run_and_bundle_checksum(make_model, logged, tmp_path, tiny_test_npz):
    """Outputs name what answered: the alias given, the version it resolved to, its run and the bundle sha256."""
    import hashlib
    import json

    import h5py

    from ptycho_ml.cli import main

    name = make_model("good", "good2")
    registry.promote(name, 2, alias="champion", policy=POLICY)
    out = tmp_path / "recon"
    result = CliRunner().invoke(main, ["reconstruct", "--model", f"models:/{name}@champion", "--data", str(tiny_test_npz),
                                       "--out", str(out), "--refine-steps", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    bundle = mlflow.artifacts.download_artifacts(f"models:/{name}/2") + "/data/wts.h5.zip"
    sha = hashlib.sha256(open(bundle, "rb").read()).hexdigest()
    expected = {"uri": f"models:/{name}@champion", "resolved_uri": f"models:/{name}/2", "name": name, "version": "2",
                "run_id": logged["good2"]["run_id"], "bundle_sha256": sha,
                "gate": {"target": "@champion", "verdict": "pass", "failures": [],
                         "policy": str(registry.load_policy()["path"])}}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["provenance"] == expected and summary["model"] == f"models:/{name}@champion"
    with h5py.File(out / "object.h5") as h5:
        assert json.loads(h5.attrs["provenance"]) == expected
    with h5py.File(out / "product.h5") as h5:
        assert json.dumps(expected, sort_keys=True) in h5.attrs["comments"]
    # a stage resolves to its highest version; the version loaded is the one recorded
    model, provenance = registry.load_model_with_provenance(f"models:/{name}/latest")
    assert provenance["version"] == "2" and _same_weights(model, logged["good2"]["model"])


# ---------------------------------------------------------------- the load-time gate

def test_load_time_gate_refuses_a_failing_holder_however_it_got_there(make_model, logged, monkeypatch):
    """An alias or stage set straight in the registry (as the UI does) to a failing version is refused at load."""
    name = make_model("good", "fair")
    client = MlflowClient()
    client.set_registered_model_alias(name, "champion", "2")  # no gate on the way in
    with pytest.raises(PtychoInputError) as info:
        registry.load_model_with_provenance(f"models:/{name}@champion")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{name} version 2 (the holder of @champion) fails the @champion gate: ")
    assert "test_refined_phase_ssim = 0.412 < 0.5 required for @champion" in message and "--allow-ungated" in message
    # the explicit override loads it and says so in the provenance
    with pytest.warns(UserWarning, match="fails the @champion gate and is used anyway"):
        model, provenance = registry.load_model_with_provenance(f"models:/{name}@champion", allow_ungated=True)
    assert _same_weights(model, logged["fair"]["model"])
    assert provenance["gate"]["verdict"] == "overridden" and provenance["gate"]["target"] == "@champion"
    assert "test_refined_amplitude_ssim = 0.63 < 0.8 required for @champion" in provenance["gate"]["failures"]
    assert "FAILS the @champion gate" in registry.describe_provenance(provenance)
    monkeypatch.setenv(registry.ALLOW_UNGATED_ENV, "1")  # the switch for entry points without the flag
    with pytest.warns(UserWarning, match="used anyway"):
        assert registry.load_model_with_provenance(f"models:/{name}@champion")[1]["gate"]["verdict"] == "overridden"
    monkeypatch.setenv(registry.ALLOW_UNGATED_ENV, "maybe")
    with pytest.raises(PtychoInputError, match=r"\$PTYCHO_ML_ALLOW_UNGATED: found 'maybe'"):
        registry.load_model_with_provenance(f"models:/{name}@champion")
    monkeypatch.delenv(registry.ALLOW_UNGATED_ENV)
    # a version number names one model outright: no gate; an alias with no gate in the policy: no refusal
    assert "gate" not in registry.load_model_with_provenance(f"models:/{name}/2")[1]
    client.set_registered_model_alias(name, "challenger", "2")
    assert registry.load_model_with_provenance(f"models:/{name}@challenger")[1]["gate"]["verdict"] == "pass"


def test_stage_held_by_two_versions_resolves_to_the_highest_and_gates_it(make_model, logged):
    """The old UI's stage dialog leaves 'archive existing' unticked: two holders; the highest version is the one used."""
    name = make_model("good", "fair", "good2")
    client = MlflowClient()
    with pytest.warns(FutureWarning):
        client.transition_model_version_stage(name, "1", "Production")
        client.transition_model_version_stage(name, "2", "Production")  # archive_existing_versions=False, as the UI
    assert _stages(name) == {"1": "Production", "2": "Production", "3": "None"}
    with pytest.raises(PtychoInputError, match=f"^{name} version 2 \\(the holder of Production\\) fails the Production gate"):
        registry.load_native_model(f"models:/{name}/Production")
    with pytest.warns(FutureWarning):
        client.transition_model_version_stage(name, "3", "Production")
    model, provenance = registry.load_model_with_provenance(f"models:/{name}/Production")
    assert provenance["version"] == "3" and provenance["gate"]["verdict"] == "pass"
    assert _same_weights(model, logged["good2"]["model"])


def test_cli_reconstruct_refuses_then_records_the_override(make_model, logged, tmp_path, tiny_test_npz):
    import json

    from ptycho_ml.cli import main

    name = make_model("fair")
    MlflowClient().set_registered_model_alias(name, "champion", "1")
    args = ["reconstruct", "--model", f"models:/{name}@champion", "--data", str(tiny_test_npz), "--refine-steps", "0",
            "--quiet"]
    refused = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "refused")])
    assert refused.exit_code == 2, refused.output
    assert len(refused.output.strip().splitlines()) == 1
    assert refused.output.startswith(f"error: {name} version 1 (the holder of @champion) fails the @champion gate")
    assert not (tmp_path / "refused").exists()
    used = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "used"), "--allow-ungated"])
    assert used.exit_code == 0, used.output
    assert "FAILS the @champion gate, used with --allow-ungated" in used.output
    gate = json.loads((tmp_path / "used" / "summary.json").read_text())["provenance"]["gate"]
    assert gate["verdict"] == "overridden" and gate["failures"]
    # the flag holds for its own command only
    assert registry._ALLOW_UNGATED_FLAG["on"] is None
    again = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "again")])
    assert again.exit_code == 2


# ---------------------------------------------------------------- figures and verdicts on the version

def test_annotate_version_writes_figures_verdicts_and_description(make_model, logged):
    name = make_model("good", "fair")
    client = MlflowClient()
    judged = registry.annotate_version(name, 1, policy=POLICY)
    assert judged["verdicts"] == {"Staging": [], "Production": [], "@champion": []}
    tags = client.get_model_version(name, "1").tags
    assert tags["ptycho_ml.network_amplitude_ssim"] == "0.85" and tags["ptycho_ml.refined_phase_ssim"] == "0.72"
    assert tags["ptycho_ml.passes_saved"] == "missing" and tags[registry.TAG_DATASET] == "unknown"
    assert tags["ptycho_ml.gate.stage.Production"] == "pass" and tags["ptycho_ml.gate.alias.champion"] == "pass"
    registry.annotate_version(name, 2, policy=POLICY)
    v2 = client.get_model_version(name, "2")
    assert v2.tags["ptycho_ml.gate.stage.Staging"] == "pass"
    assert v2.tags["ptycho_ml.gate.stage.Production"].startswith("fail: test_refined_amplitude_ssim = 0.63 < 0.8")
    assert "| refined phase ssim | 0.412 |" in v2.description and "| Production | FAIL: " in v2.description


# ---------------------------------------------------------------- register --bundle

def test_cli_register_bundle_with_recorded_and_measured_figures(logged, tmp_path, tiny_test_npz):
    from ptycho_ml.cli import main

    name = "t_register_bundle"
    recorded = {"test_network_amplitude_ssim": 0.86, "test_network_phase_ssim": 0.62,
                "test_refined_amplitude_ssim": 0.92, "test_refined_phase_ssim": 0.7}
    bundle = save_model_bundle(_tiny_model(7), tmp_path / "wts.h5.zip",
                               extra={"metrics": recorded, "dataset": {"sha256": "ab" * 32, "source": "train.npz"}})
    runner = CliRunner()
    first = runner.invoke(main, ["register", "--bundle", str(bundle), "--name", name])
    assert first.exit_code == 0, first.output
    assert f"{name} version 1 from {bundle}" in first.output and "recorded in the bundle" in first.output
    assert "  Production: pass" in first.output  # the test policy ($PTYCHO_ML_POLICY) judges refined figures
    client = MlflowClient()
    v1 = client.get_model_version(name, "1")
    assert client.get_run(v1.run_id).data.metrics == pytest.approx(recorded)
    assert v1.tags["ptycho_ml.network_phase_ssim"] == "0.62" and v1.tags[registry.TAG_DATASET] == "ab" * 32
    assert _same_weights(registry.load_native_model(f"models:/{name}/1"), _tiny_model(7))
    bad = runner.invoke(main, ["register", "--bundle", str(tmp_path / "absent.zip"), "--name", name])
    assert bad.exit_code == 2 and bad.output.startswith("error: ") and len(bad.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_cli_register_bundle_measures_figures_on_a_held_out_scan(logged, tmp_path, tiny_test_npz):
    """Measured with the training run's own held-out evaluation (network, refined, warm start)."""
    from ptycho_ml.cli import main

    name = "t_register_measured"
    bundle = save_model_bundle(_tiny_model(8), tmp_path / "wts.h5.zip")  # records no figures
    result = CliRunner().invoke(main, ["register", "--bundle", str(bundle), "--name", name,
                                       "--metrics-from-data", str(tiny_test_npz)])
    assert result.exit_code == 0, result.output
    assert f"{name} version 1" in result.output and f"measured on {tiny_test_npz}" in result.output
    client = MlflowClient()
    measured = client.get_run(client.get_model_version(name, "1").run_id).data.metrics
    assert {"test_network_amplitude_ssim", "test_refined_phase_ssim", "test_passes_saved"} <= set(measured)
    tags = client.get_model_version(name, "1").tags
    assert tags["ptycho_ml.passes_saved"] == f"{measured['test_passes_saved']:.6g}"
