"""Model registry: resolve model URIs at load time, gate and record promotions, list versions.

A version is promoted by stage (Staging/Production: deprecated in MLflow 3 but
functional, and shown in the UI with the "new model registry UI" toggle off)
and/or by alias (``@champion``). A TOML policy (``registry/policy.toml``)
states the metric gates a version's source run must pass for each stage or
alias. Inference resolves ``models:/`` URIs when it loads, so a promotion made
in the MLflow UI takes effect on the next load with no other step.
"""

from __future__ import annotations

import getpass
import math
import os
import re
import tomllib
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ptycho_ml.data.storage import file_sha256
from ptycho_ml.errors import PtychoInputError, field_error

DEFAULT_MODEL_NAME = "ptychopinn"
STAGES = ("None", "Staging", "Production", "Archived")
ACTIVE_STAGES = ("Staging", "Production")  # the stages whose previous holder is archived on promotion
KEY_METRICS = ("test_network_amplitude_ssim", "test_network_phase_ssim",
               "test_refined_amplitude_ssim", "test_refined_phase_ssim")
POLICY_ENV = "PTYCHO_ML_POLICY"
#: Set to 1 to load a version that fails the gate of the stage or alias it was reached through (recorded).
ALLOW_UNGATED_ENV = "PTYCHO_ML_ALLOW_UNGATED"
TAG_PROMOTED_AT = "ptycho_ml.promoted_at"
TAG_PROMOTED_BY = "ptycho_ml.promoted_by"
TAG_PROMOTED_TO = "ptycho_ml.promoted_to"
TAG_FORCED = "ptycho_ml.forced_promotion"
_ALIAS_RE = re.compile(r"^[\w-]{1,255}$")
_RESERVED_ALIAS_RE = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)


# ---------------------------------------------------------------- names

def canonical_stage(stage: str, what: str = "--stage") -> str:
    """``'production'`` -> ``'Production'``; a clear error for anything but None/Staging/Production/Archived."""
    for s in STAGES:
        if str(stage).lower() == s.lower():
            return s
    raise PtychoInputError(f"{what}: found {stage!r}, expected one of {', '.join(STAGES)}")


def _check_alias(alias: str, what: str = "--alias") -> str:
    if not _ALIAS_RE.match(alias) or _RESERVED_ALIAS_RE.match(alias):
        raise PtychoInputError(f"{what}: found {alias!r}, expected letters, digits, '_' or '-' "
                               "(not 'latest' or 'v<number>', which MLflow reserves), e.g. 'champion'")
    return alias


def _check_version(version: str | int, what: str = "--version") -> str:
    text = str(version).strip()
    if text.lower() == "latest":
        return "latest"
    if not text.isdigit() or int(text) < 1:
        raise PtychoInputError(f"{what}: found {version!r}, expected a positive version number or 'latest'")
    return str(int(text))


def _check_name(name: str, what: str = "--name") -> str:
    if not name or "/" in name or "@" in name:
        raise PtychoInputError(f"{what}: found {name!r}, expected a registered model name such as '{DEFAULT_MODEL_NAME}'")
    return name


# ---------------------------------------------------------------- resolve and load

def resolve_model_uri(model_uri: str | None = None, *, name: str | None = None, stage: str | None = None,
                      alias: str | None = None, version: str | int | None = None) -> str:
    """A model URI MLflow understands (or a bundle path), from an explicit URI or a registry selector.

    ``model_uri`` is returned as given (``models:/`` URIs are checked and their
    stage name made canonical): ``models:/name/Production``, ``models:/name@alias``,
    ``models:/name/3``, ``runs:/<id>/model``, a local MLflow model directory or a
    ``wts.h5.zip`` path. Otherwise ``models:/<name>/...`` is built from ``name``
    (default :data:`DEFAULT_MODEL_NAME`) and exactly one of stage, alias, version.
    Nothing is looked up here: the registry is read when the model is loaded.
    """
    selectors = {k: v for k, v in (("stage", stage), ("alias", alias), ("version", version)) if v not in (None, "")}
    if model_uri:
        extra = (["--name"] if name else []) + [f"--{k}" for k in selectors]
        if extra:
            raise PtychoInputError(f"--model: found together with {', '.join(extra)}, "
                                   "expected either a model URI or --name with one of --stage/--alias/--version")
        return _normalise_uri(str(model_uri))
    if len(selectors) != 1:
        found = " and ".join(f"--{k} {v!r}" for k, v in selectors.items()) or "none"
        raise PtychoInputError(f"model selector: found {found}, expected exactly one of --stage, --alias or --version "
                               f"(with --name, default '{DEFAULT_MODEL_NAME}')")
    name = _check_name(name or DEFAULT_MODEL_NAME)
    if stage not in (None, ""):
        return f"models:/{name}/{canonical_stage(stage)}"
    if alias not in (None, ""):
        return f"models:/{name}@{_check_alias(str(alias))}"
    return f"models:/{name}/{_check_version(version)}"  # type: ignore[arg-type]


def parse_models_uri(uri: str):
    """MLflow's own parse of a ``models:/`` URI (``ParsedModelUri``: model_id, name, version, stage, alias).

    None for any other URI or path; a one-line error for a malformed ``models:/`` URI.
    A trailing slash is forgiven.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import _parse_model_uri

    if not uri.startswith("models:/"):
        return None
    try:
        return _parse_model_uri(uri.rstrip("/"))
    except MlflowException:
        raise PtychoInputError(f"{uri}: found no usable model name or selector, expected models:/NAME/STAGE, "
                               "models:/NAME@ALIAS or models:/NAME/VERSION") from None


def _normalise_uri(uri: str) -> str:
    """Check a ``models:/`` URI's selector and canonicalise its stage; other URIs and paths pass unchanged."""
    parsed = parse_models_uri(uri)
    if parsed is None or parsed.model_id:  # not a registry URI, or a logged-model id (models:/m-...) in MLflow 3
        return uri
    name = _check_name(parsed.name, uri)
    if parsed.alias is not None:
        return f"models:/{name}@{_check_alias(parsed.alias, uri)}"
    if parsed.version is not None:
        return f"models:/{name}/{_check_version(parsed.version, uri)}"
    if parsed.stage is None:
        return f"models:/{name}/latest"
    if parsed.stage.lower() in (st.lower() for st in STAGES):
        return f"models:/{name}/{canonical_stage(parsed.stage, uri)}"
    raise PtychoInputError(f"{uri}: found {parsed.stage!r} after the model name, expected a version number, 'latest', "
                           f"a stage ({', '.join(STAGES)}) or models:/{name}@ALIAS")


def _is_local(uri: str) -> bool:
    return not re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", uri)  # no scheme (a one-letter "scheme" is a drive)


def load_native_model(uri: str):
    """Load the native torch model (:class:`~ptycho_ml.model.network.DiffractionToObject`, eval mode).

    See :func:`load_model_with_provenance`, which also says what was loaded.
    """
    return load_model_with_provenance(uri)[0]


def _resolve_version(uri: str, parsed):
    """The registered ``ModelVersion`` a ``models:/`` URI names now (alias, stage, version or latest).

    A stage held by several versions resolves to the highest version number, as MLflow resolves it.
    """
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        if parsed.alias is not None:
            return client.get_model_version_by_alias(parsed.name, parsed.alias)
        if parsed.version is not None:
            return client.get_model_version(parsed.name, parsed.version)
        versions = client.search_model_versions(f"name = '{parsed.name}'")
    except MlflowException as exc:
        raise PtychoInputError(_explain_load_failure(uri, exc)) from None
    if parsed.stage is not None:
        versions = [v for v in versions if v.current_stage == canonical_stage(parsed.stage, uri)]
    if not versions:
        raise PtychoInputError(_explain_load_failure(uri, MlflowException(f"no version of '{parsed.name}' matches")))
    return max(versions, key=lambda v: int(v.version))


_sha256 = file_sha256  # the bundle's sha256, as provenance records it


def allow_ungated_from_env() -> bool:
    """Whether ``$PTYCHO_ML_ALLOW_UNGATED`` asks to load versions that fail their gate (1/true/yes)."""
    value = os.environ.get(ALLOW_UNGATED_ENV, "").strip().lower()
    if value in ("", "0", "false", "no"):
        return False
    if value in ("1", "true", "yes"):
        return True
    raise PtychoInputError(f"${ALLOW_UNGATED_ENV}: found {value!r}, expected 1/true/yes or 0/false/no")


#: Set by the CLI's ``--allow-ungated`` flag for the command being run (None: use the environment).
_ALLOW_UNGATED_FLAG: dict[str, bool | None] = {"on": None}


def set_allow_ungated(on: bool | None) -> None:
    """The CLI's ``--allow-ungated`` for this command (``None`` falls back to ``$PTYCHO_ML_ALLOW_UNGATED``)."""
    _ALLOW_UNGATED_FLAG["on"] = on


def gate_target(parsed) -> str | None:
    """The gate a ``models:/`` URI is reached through: its stage (``'Production'``), ``'@alias'``, or None.

    A version number, ``latest`` or a logged-model id names one model outright: no gate.
    """
    if parsed is None or parsed.model_id:
        return None
    if parsed.alias is not None:
        return f"@{parsed.alias}"
    if parsed.stage is not None and parsed.stage.lower() != "latest":
        return canonical_stage(parsed.stage)
    return None


def load_time_gate(version, target: str, allow_ungated: bool | None = None, client=None,
                   policy: dict | str | os.PathLike | None = None) -> dict[str, Any]:
    """Judge the resolved ``version`` (a ``ModelVersion``) against the policy's gate for ``target``.

    Returns ``{"target", "verdict": "pass" | "overridden", "failures", "policy"}``.
    A failure raises a one-line :class:`PtychoInputError` with the reasons,
    unless ``allow_ungated`` (default: the CLI flag, else ``$PTYCHO_ML_ALLOW_UNGATED``):
    then a warning is printed and the verdict ``overridden`` is returned, to be recorded.
    """
    rules = _as_policy(policy)
    failures = gate_failures(_run_metrics(_client(client), version.run_id), rules, target)
    record = {"target": target, "verdict": "pass", "failures": failures, "policy": rules["path"]}
    if not failures:
        return record
    if allow_ungated is None:
        allow_ungated = _ALLOW_UNGATED_FLAG["on"] if _ALLOW_UNGATED_FLAG["on"] is not None else allow_ungated_from_env()
    what = f"{version.name} version {version.version} (the holder of {target})"
    if not allow_ungated:
        raise PtychoInputError(f"{what} fails the {target} gate: {'; '.join(failures)} (policy {rules['path']}; "
                               f"--allow-ungated or ${ALLOW_UNGATED_ENV}=1 to use it anyway, recorded in the outputs)")
    warnings.warn(f"{what} fails the {target} gate and is used anyway (--allow-ungated): {'; '.join(failures)}",
                  UserWarning, stacklevel=2)
    record["verdict"] = "overridden"
    return record


def load_model_with_provenance(uri: str, is_bundle: bool = False, allow_ungated: bool | None = None):
    """Load the native model and say exactly what was loaded: ``(model, provenance)``.

    ``uri``: a bundle file (``is_bundle``, or a name ending ``.zip``; local or ``s3://``), a directory holding
    ``wts.h5.zip`` but no ``MLmodel`` (read directly), an MLflow model
    directory, ``runs:/``, or ``models:/name/Stage``, ``models:/name@alias``,
    ``models:/name/N``. A registry URI is resolved to its version first and
    that version is loaded, so a promotion in between cannot mix two models.
    ``provenance``: ``uri`` (as given), ``resolved_uri``, ``name``, ``version``
    and ``run_id`` (None where the source has none) and ``bundle_sha256``.
    A missing model, version, alias or stage holder is a one-line
    :class:`PtychoInputError` naming the URI and what the registry holds.

    Reached through a stage or an alias, the resolved version must pass the
    policy's gate for it (:func:`load_time_gate`), however it got there (UI,
    REST, client, ``promote --force``); ``allow_ungated`` overrides a failure
    and provenance ``gate`` records the verdict (``pass`` or ``overridden``
    with the reasons). This is the one loader every inference path uses.
    """
    from ptycho_ml.data.storage import local_path
    from ptycho_ml.model.bundle_io import load_model_bundle

    uri = str(uri)
    provenance: dict[str, str | None] = {"uri": uri, "resolved_uri": uri, "name": None, "version": None, "run_id": None}
    bundle: str | Path | None = None
    if _is_local(uri):
        path = Path(uri)
        if not path.exists():
            raise PtychoInputError(f"{uri}: no such file or directory, expected a wts.h5.zip bundle, an MLflow model "
                                   "directory, or a models:/ or runs:/ URI")
        if path.is_dir() and not (path / "MLmodel").exists():
            if not (path / "wts.h5.zip").is_file():
                raise PtychoInputError(f"{uri}: directory has no MLmodel or wts.h5.zip, expected an MLflow model directory")
            bundle = path / "wts.h5.zip"
    if bundle is None and (is_bundle or uri.endswith(".zip") or (_is_local(uri) and Path(uri).is_file())):
        bundle = local_path(uri)
    if bundle is None:
        from mlflow.exceptions import MlflowException

        from ptycho_ml import flavor

        parsed = parse_models_uri(uri)
        if parsed is not None and not parsed.model_id:
            version = _resolve_version(uri, parsed)
            provenance.update(name=version.name, version=str(version.version), run_id=version.run_id,
                              resolved_uri=f"models:/{version.name}/{version.version}")
            target = gate_target(parsed)
            if target is not None:
                provenance["gate"] = load_time_gate(version, target, allow_ungated)
        elif uri.startswith("runs:/"):
            provenance["run_id"] = uri[len("runs:/"):].split("/", 1)[0]
        try:
            bundle = flavor.local_bundle(provenance["resolved_uri"])
        except MlflowException as exc:
            raise PtychoInputError(_explain_load_failure(uri, exc)) from exc
    model = load_model_bundle(bundle)[0]
    provenance["bundle_sha256"] = _sha256(bundle)
    return model, provenance


def describe_provenance(provenance: dict) -> str:
    """``ptychopinn version 3 (run 1a2b..., bundle sha256 9f8e...)``, or the bundle path and its sha256."""
    sha = (provenance.get("bundle_sha256") or "")[:12]
    if provenance.get("version"):
        gate = provenance.get("gate")
        verdict = ""
        if gate and gate["verdict"] == "overridden":
            verdict = f"; FAILS the {gate['target']} gate, used with --allow-ungated: {'; '.join(gate['failures'])}"
        elif gate:
            verdict = f"; passes the {gate['target']} gate"
        return (f"{provenance['name']} version {provenance['version']} (run {provenance['run_id']}, "
                f"bundle sha256 {sha}...) from {provenance['uri']}{verdict}")
    run = f"run {provenance['run_id']}, " if provenance.get("run_id") else ""
    return f"{provenance['uri']} ({run}bundle sha256 {sha}...)"


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _explain_load_failure(uri: str, exc: BaseException) -> str:
    """One line: what the URI asked for, and what the registry holds instead."""
    import mlflow

    reason = _first_line(exc)
    parsed = parse_models_uri(uri)
    if parsed is None or parsed.model_id:  # runs:/, paths, logged-model ids
        return f"{uri}: {reason}"
    name = parsed.name
    try:
        client = _client()
        if not _is_registered(client, name):
            return (f"{uri}: no registered model '{name}' in {mlflow.get_tracking_uri()}, "
                    f"expected one of: {_registered_names(client)}")
        holdings = describe_registry(name, client)
    except Exception:  # describing is best effort; the reason alone still names the problem
        return f"{uri}: {reason}"
    if parsed.alias is not None:
        wanted = f"'{name}' has no alias '{parsed.alias}'"
    elif parsed.version is not None:
        wanted = f"'{name}' has no version {parsed.version}"
    elif parsed.stage in STAGES:
        wanted = f"no version of '{name}' is in stage {parsed.stage}"
    else:
        wanted = reason
    return f"{uri}: {wanted}; {holdings}"


def describe_registry(name: str, client=None) -> str:
    """``versions 1, 2, 3; stages Production: v2, Staging: v3; aliases champion: v2`` (one line)."""
    client = client or _client()
    versions = sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))
    stages = ", ".join(f"{v.current_stage}: v{v.version}" for v in versions if v.current_stage not in (None, "None"))
    aliases = client.get_registered_model(name).aliases or {}
    alias_text = ", ".join(f"{a}: v{v}" for a, v in sorted(aliases.items()))
    return (f"it has versions {', '.join(str(v.version) for v in versions) or 'none'}; "
            f"stages {stages or 'none held'}; aliases {alias_text or 'none'}")


def _client(client=None):
    from mlflow import MlflowClient

    return client or MlflowClient()


# ---------------------------------------------------------------- policy

def policy_path(path: str | os.PathLike | None = None) -> Path:
    """The policy file: ``path``, else ``$PTYCHO_ML_POLICY``, else ``./registry/policy.toml``, else the repository's copy."""
    if path:
        if not Path(path).is_file():
            raise PtychoInputError(f"{path}: no such policy file, expected a TOML promotion policy like registry/policy.toml")
        return Path(path)
    env = os.environ.get(POLICY_ENV)
    if env:
        if not Path(env).is_file():
            raise PtychoInputError(f"${POLICY_ENV}: found {env!r}, which is not a file, expected a TOML promotion policy")
        return Path(env)
    candidates = [Path.cwd() / "registry" / "policy.toml", Path(__file__).resolve().parents[2] / "registry" / "policy.toml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise PtychoInputError(f"promotion policy: found none at {', '.join(map(str, candidates))}, "
                           f"expected registry/policy.toml, ${POLICY_ENV} or --policy FILE")


def load_policy(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read and check a promotion policy (see :func:`policy_path` for where it is looked for).

    Returns ``{"stages": {Stage: {"min": {metric: bound}, "max": {...}}},
    "aliases": {alias: {"same_as": Stage | None, "min": {...}, "max": {...}}},
    "path": str}``.
    """
    file = policy_path(path)
    try:
        raw = tomllib.loads(file.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise PtychoInputError(f"{file}: invalid TOML ({exc}), expected a promotion policy like registry/policy.toml") from None
    return validate_policy(raw, str(file))


def validate_policy(raw: dict[str, Any], source: str = "policy") -> dict[str, Any]:
    """Check a policy mapping (as read from TOML) and return it in canonical form (idempotent)."""
    source = str(raw.get("path", source))
    unknown = sorted(set(raw) - {"stages", "aliases", "path"})
    if unknown:
        raise field_error(source, unknown[0], "an unknown table", "'stages' or 'aliases'")

    def bounds(table: Any, where: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(table, dict):
            raise field_error(source, where, repr(table), "a table")
        extra = sorted(set(table) - allowed)
        if extra:
            raise field_error(source, f"{where}.{extra[0]}", "an unknown key", " or ".join(sorted(allowed)))
        out: dict[str, Any] = {}
        for kind in ("min", "max"):
            gate = table.get(kind, {})
            if not isinstance(gate, dict):
                raise field_error(source, f"{where}.{kind}", repr(gate), "a table of metric = number")
            for metric, bound in gate.items():
                if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not math.isfinite(bound):
                    raise field_error(source, f"{where}.{kind}.{metric}", repr(bound), "a finite number")
            out[kind] = {m: float(b) for m, b in gate.items()}
        return out

    stages = {}
    for stage, table in raw.get("stages", {}).items():
        stages[canonical_stage(stage, f"{source}: field 'stages.{stage}'")] = bounds(table, f"stages.{stage}", {"min", "max"})
    aliases = {}
    for alias, table in raw.get("aliases", {}).items():
        _check_alias(alias, f"{source}: field 'aliases.{alias}'")
        entry = bounds(table, f"aliases.{alias}", {"min", "max", "same_as"})
        same_as = table.get("same_as")
        entry["same_as"] = canonical_stage(same_as, f"{source}: field 'aliases.{alias}.same_as'") if same_as else None
        aliases[alias] = entry
    return {"stages": stages, "aliases": aliases, "path": source}


def _as_policy(policy: dict | str | os.PathLike | None) -> dict[str, Any]:
    return validate_policy(policy) if isinstance(policy, dict) else load_policy(policy)


def _gate_checks(policy: dict[str, Any], target: str) -> tuple[str, list[tuple[str, str, float]]]:
    """``(label, [(metric, 'min'|'max', bound), ...])`` for a stage or an alias (``@name`` or a non-stage name)."""
    name = target[1:] if target.startswith("@") else target
    if not target.startswith("@") and name.lower() in (s.lower() for s in STAGES):
        stage = canonical_stage(name)
        gate = policy["stages"].get(stage, {})
        return stage, [(m, kind, b) for kind in ("min", "max") for m, b in gate.get(kind, {}).items()]
    entry = policy["aliases"].get(name, {})
    base = policy["stages"].get(entry.get("same_as"), {}) if entry.get("same_as") else {}
    checks = [(m, kind, b) for gate in (base, entry) for kind in ("min", "max") for m, b in gate.get(kind, {}).items()]
    return f"@{name}", checks


def _fmt(value: float, bound: float) -> str:
    text = f"{value:.4g}"
    return repr(float(value)) if text == f"{bound:g}" else text  # never print "0.5 < 0.5"


def gate_failures(metrics: dict[str, float], policy: dict[str, Any], target: str) -> list[str]:
    """The failed checks of ``target``'s gate against a run's ``metrics``, one readable string each."""
    label, checks = _gate_checks(policy, target)
    failures = []
    for metric, kind, bound in checks:
        op, word = (">=", "required") if kind == "min" else ("<=", "allowed")
        value = metrics.get(metric)
        if value is None:
            failures.append(f"{metric} missing ({op} {bound:g} {word} for {label})")
        elif not math.isfinite(value):
            failures.append(f"{metric} = {value} ({op} {bound:g} {word} for {label})")
        elif kind == "min" and value < bound:
            failures.append(f"{metric} = {_fmt(value, bound)} < {bound:g} required for {label}")
        elif kind == "max" and value > bound:
            failures.append(f"{metric} = {_fmt(value, bound)} > {bound:g} allowed for {label}")
    return failures


def _run_metrics(client, run_id: str | None) -> dict[str, float]:
    from mlflow.exceptions import MlflowException

    if not run_id:
        return {}
    try:
        return dict(client.get_run(run_id).data.metrics)
    except MlflowException:  # the source run was deleted: every gated metric is then missing
        return {}


def check_gate(client, name: str, version: str | int, target: str, policy: dict | str | os.PathLike | None) -> list[str]:
    """Failures of ``name`` version ``version`` against the gate of ``target`` (a stage, or an alias)."""
    client = _client(client)
    mv = _get_version(client, name, version)
    return gate_failures(_run_metrics(client, mv.run_id), _as_policy(policy), target)


# ---------------------------------------------------------------- promote

def _is_registered(client, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return False


def _registered_names(client, limit: int = 20) -> str:
    names = [m.name for m in client.search_registered_models(max_results=limit + 1)]
    return (", ".join(names[:limit]) + (", ..." if len(names) > limit else "")) or "none registered yet"


def _versions(client, name: str) -> list:
    if not _is_registered(client, name):
        raise PtychoInputError(f"--name: found {name!r}, which is not registered, expected one of: {_registered_names(client)}")
    return sorted(client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))


def _get_version(client, name: str, version: str | int):
    """The ``ModelVersion``; ``'latest'`` is the highest version number."""
    wanted = _check_version(version)
    versions = _versions(client, name)
    if not versions:
        raise PtychoInputError(f"--name: '{name}' has no versions, expected a registered model with at least one version")
    if wanted == "latest":
        return versions[-1]
    for v in versions:
        if str(v.version) == wanted:
            return v
    raise PtychoInputError(f"--version: found {wanted}, expected one of {', '.join(str(v.version) for v in versions)} of '{name}'")


def version_for_run(name: str, run_id: str, client=None) -> str:
    """The version of ``name`` registered from run ``run_id`` (an error if none or several)."""
    client = _client(client)
    found = [v for v in _versions(client, name) if v.run_id == run_id]
    if len(found) != 1:
        what = "no version" if not found else f"versions {', '.join(str(v.version) for v in found)}"
        raise PtychoInputError(f"--run-id: found {what} of '{name}' from run {run_id}, expected exactly one (use --version)")
    return str(found[0].version)


def promote(name: str, version: str | int, *, stage: str | None = None, alias: str | None = None, force: bool = False,
            policy: dict | str | os.PathLike | None = None, client=None) -> dict[str, Any]:
    """Move ``name`` version ``version`` (or ``'latest'``) into ``stage`` and/or give it ``alias``, if its gates pass.

    Both gates are checked before anything changes. A failed gate raises a
    one-line :class:`PtychoInputError` showing the numbers, unless ``force``:
    then the promotion goes ahead and the reasons are recorded in the version
    tag ``ptycho_ml.forced_promotion``. Entering Staging/Production archives
    the previous holder. Tags ``ptycho_ml.promoted_at/_by/_to`` record the event.
    Returns ``{"name", "version", "stage", "alias", "archived", "previous_alias_version",
    "forced", "failures", "metrics"}``.
    """
    if not stage and not alias:
        raise PtychoInputError("promote: found neither --stage nor --alias, expected at least one")
    stage = canonical_stage(stage) if stage else None
    alias = _check_alias(alias) if alias else None
    client = _client(client)
    mv = _get_version(client, _check_name(name), version)
    v = str(mv.version)
    metrics = _run_metrics(client, mv.run_id)
    rules = _as_policy(policy)
    targets = [t for t in (stage, f"@{alias}" if alias else None) if t]
    failures = [f for t in targets for f in gate_failures(metrics, rules, t)]
    if failures and not force:
        raise PtychoInputError(f"{name} version {v} refused for {' and '.join(targets)}: {'; '.join(failures)} "
                               f"(policy {rules['path']}; --force to override)")

    archived: list[str] = []
    if stage:
        if stage in ACTIVE_STAGES:
            archived = [str(o.version) for o in _versions(client, name) if o.current_stage == stage and str(o.version) != v]
        with warnings.catch_warnings():  # stages are deprecated in MLflow 3 but still functional
            warnings.simplefilter("ignore", FutureWarning)
            client.transition_model_version_stage(name, v, stage, archive_existing_versions=stage in ACTIVE_STAGES)
    previous_alias = None
    if alias:
        previous_alias = (client.get_registered_model(name).aliases or {}).get(alias)
        client.set_registered_model_alias(name, alias, v)
    try:
        who = getpass.getuser()
    except Exception:  # no login name (some containers)
        who = "unknown"
    tags = {TAG_PROMOTED_AT: datetime.now(timezone.utc).isoformat(timespec="seconds"), TAG_PROMOTED_BY: who,
            TAG_PROMOTED_TO: ", ".join(targets)}
    if failures:
        tags[TAG_FORCED] = f"{', '.join(targets)}: {'; '.join(failures)}"[:5000]
    for key, value in tags.items():
        client.set_model_version_tag(name, v, key, value)
    return {"name": name, "version": v, "stage": stage, "alias": alias, "archived": archived,
            "previous_alias_version": None if previous_alias is None else str(previous_alias),
            "forced": bool(failures), "failures": failures, "metrics": metrics}


# ---------------------------------------------------------------- figures and verdicts on the version

#: Version tags holding the figures a promoter judges (``ptycho_ml.<short name>``) and their run metric.
FIGURE_TAGS = {"network_amplitude_ssim": "test_network_amplitude_ssim", "network_phase_ssim": "test_network_phase_ssim",
               "refined_amplitude_ssim": "test_refined_amplitude_ssim", "refined_phase_ssim": "test_refined_phase_ssim",
               "passes_saved": "test_passes_saved"}
TAG_DATASET = "ptycho_ml.dataset_sha256"
TAG_GATE_PREFIX = "ptycho_ml.gate."  # + "stage.Production" or "alias.champion": "pass" or "fail: <reasons>"
TAG_JUDGED_AT = "ptycho_ml.judged_at"


def gate_tag(target: str) -> str:
    """``'Production'`` -> ``ptycho_ml.gate.stage.Production``; ``'@champion'`` -> ``ptycho_ml.gate.alias.champion``."""
    return TAG_GATE_PREFIX + (f"alias.{target[1:]}" if target.startswith("@") else f"stage.{canonical_stage(target)}")


def judge_version(name: str, version: str | int, client=None,
                  policy: dict | str | os.PathLike | None = None) -> dict[str, Any]:
    """The figures of a version's source run and its verdict for every gate the policy names.

    Returns ``{"figures": {short name: value | None}, "dataset_sha256", "verdicts": {target: [failures]},
    "policy"}``; targets are the policy's stages and ``@alias`` names.
    """
    client = _client(client)
    rules = _as_policy(policy)
    mv = _get_version(client, name, version)
    metrics = _run_metrics(client, mv.run_id)
    dataset = None
    if mv.run_id:
        try:
            dataset = client.get_run(mv.run_id).data.params.get("dataset.sha256")
        except Exception:  # a deleted run: no fingerprint to show
            dataset = None
    targets = [*rules["stages"], *(f"@{a}" for a in rules["aliases"])]
    return {"figures": {short: metrics.get(metric) for short, metric in FIGURE_TAGS.items()},
            "dataset_sha256": dataset, "verdicts": {t: gate_failures(metrics, rules, t) for t in targets},
            "policy": rules["path"]}


def _verdict_text(failures: list[str]) -> str:
    return "pass" if not failures else ("fail: " + "; ".join(failures))[:5000]


def version_description(name: str, version: str | int, judged: dict[str, Any]) -> str:
    """A Markdown description of the version's figures and gate verdicts (shown on its registry page)."""
    rows = [f"| {short.replace('_', ' ')} | {'-' if v is None else f'{v:.4g}'} |" for short, v in judged["figures"].items()]
    gates = [f"| {target} | {'pass' if not fails else 'FAIL: ' + '; '.join(fails)} |"
             for target, fails in judged["verdicts"].items()]
    return "\n".join([
        f"**{name} version {version}**: held-out figures of its source run and the gates of `{judged['policy']}` "
        "(written by ptycho_ml; inference through a stage or alias re-checks the gate at load time).", "",
        "| figure | value |", "|---|---|", *rows,
        f"| training data sha256 | {judged['dataset_sha256'] or '-'} |", "",
        "| gate | verdict |", "|---|---|", *gates])


def annotate_version(name: str, version: str | int, client=None,
                     policy: dict | str | os.PathLike | None = None) -> dict[str, Any]:
    """Write a version's figures, data fingerprint and per-gate verdicts as version tags and its description.

    Tags: ``ptycho_ml.<figure>`` (:data:`FIGURE_TAGS`), ``ptycho_ml.dataset_sha256``,
    ``ptycho_ml.gate.stage.<Stage>`` / ``ptycho_ml.gate.alias.<alias>`` (``pass`` or
    ``fail: <reasons>``). Only tags whose value changes are written (each write
    is a webhook event). Returns :func:`judge_version`'s result.
    """
    client = _client(client)
    judged = judge_version(name, version, client, policy)
    mv = client.get_model_version(name, str(version))
    wanted = {f"ptycho_ml.{short}": ("missing" if v is None else f"{v:.6g}") for short, v in judged["figures"].items()}
    wanted[TAG_DATASET] = judged["dataset_sha256"] or "unknown"
    wanted.update({gate_tag(t): _verdict_text(f) for t, f in judged["verdicts"].items()})
    current = mv.tags or {}
    for key, value in wanted.items():
        if current.get(key) != value:
            client.set_model_version_tag(name, str(version), key, value)
    description = version_description(name, str(version), judged)
    if (mv.description or "") != description:
        client.update_model_version(name, str(version), description=description)
    return judged


# ---------------------------------------------------------------- list

def list_versions(name: str = DEFAULT_MODEL_NAME, client=None) -> list[dict[str, Any]]:
    """One row per version, newest first: version, stage, aliases, run_id, created (UTC), key metrics, forced."""
    client = _client(client)
    versions = _versions(client, name)
    aliases = client.get_registered_model(name).aliases or {}
    rows = []
    for mv in reversed(versions):
        metrics = _run_metrics(client, mv.run_id)
        rows.append({
            "version": int(mv.version), "stage": mv.current_stage or "None",
            "aliases": sorted(a for a, v in aliases.items() if str(v) == str(mv.version)),
            "run_id": mv.run_id or "",
            "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
            "metrics": {k: metrics.get(k) for k in KEY_METRICS},
            "forced": bool((mv.tags or {}).get(TAG_FORCED)),
        })
    return rows


def format_versions(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of :func:`list_versions` rows (``*`` marks a forced promotion)."""
    if not rows:
        return "no versions"
    headers = ["version", "stage", "aliases", "net amp SSIM", "net phase SSIM", "ref amp SSIM", "ref phase SSIM",
               "created (UTC)", "run_id"]
    table = [[f"{r['version']}{'*' if r.get('forced') else ''}", r["stage"], ",".join(r["aliases"]) or "-",
              *("-" if r["metrics"].get(k) is None else f"{r['metrics'][k]:.4f}" for k in KEY_METRICS),
              r["created"], r["run_id"] or "-"] for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *table)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in [headers, *table]]
    if any(r.get("forced") for r in rows):
        lines.append("* promoted with --force past a failed gate (tag ptycho_ml.forced_promotion)")
    return "\n".join(lines)
