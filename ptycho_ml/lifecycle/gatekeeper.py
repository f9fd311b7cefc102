"""``ptycho-ml gatekeeper``: the promotion policy enforced when a promotion happens, whoever makes it.

MLflow's tracking server (3.17, SQL stores only) sends registry webhooks for
``registered_model.created``, ``model_version.created``,
``model_version_tag.set`` / ``.deleted`` and ``model_version_alias.created`` /
``.deleted``. **A stage transition sends nothing** (stages are deprecated), so
the gatekeeper also sweeps the stages: on every event for a model, and every
``sweep_s`` seconds for all models.

What it does:

- ``model_version.created``: writes the version's figures and per-gate verdicts
  as tags and description (:func:`~ptycho_ml.lifecycle.registry.annotate_version`).
- ``model_version_alias.created``: judges the version against the alias's gate;
  a failure removes the alias and, if the alias had an earlier holder that
  passed (remembered in the registered-model tag
  ``ptycho_ml.gatekeeper.alias.<alias>``), gives the alias back to it.
- stages (swept): a Staging/Production holder that fails the stage's gate is
  moved back to the stage it was last approved in (version tag
  ``ptycho_ml.gatekeeper.approved_stage``, else None); when several passing
  versions hold one stage, the one that entered last keeps it and the others
  are archived (the old UI's "archive existing versions" box is unticked by
  default).

Every revert is recorded on the version (``ptycho_ml.gatekeeper.reverted``).
Deliveries are verified with MLflow's HMAC signature (``X-MLflow-Signature``,
over ``delivery-id.timestamp.body``) when a secret is set, and refused if more
than 5 minutes old. The load-time gate in
:func:`~ptycho_ml.lifecycle.registry.load_model_with_provenance` holds
independently of this process; the gatekeeper makes the registry itself agree.
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
import warnings
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ptycho_ml.lifecycle import registry

SECRET_ENV = "PTYCHO_ML_GATEKEEPER_SECRET"
WEBHOOK_NAME = "ptycho-ml-gatekeeper"
#: The registry events the gatekeeper subscribes to (all MLflow 3.17 emits for model versions).
EVENTS = ("model_version.created", "model_version_tag.set", "model_version_tag.deleted",
          "model_version_alias.created", "model_version_alias.deleted")
MAX_AGE_S = 300  # a signed delivery older than this is a replay
TAG_APPROVED_STAGE = "ptycho_ml.gatekeeper.approved_stage"
TAG_REVERTED = "ptycho_ml.gatekeeper.reverted"
TAG_ALIAS_GOOD = "ptycho_ml.gatekeeper.alias."  # + alias, on the registered model: its last passing holder

_log = logging.getLogger("ptycho_ml.gatekeeper")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def verify_signature(secret: str, headers: Any, body: bytes, now_s: float | None = None) -> str | None:
    """None if the delivery is signed with ``secret`` (MLflow's scheme) and fresh, else what is wrong (one line)."""
    from mlflow.webhooks.constants import WEBHOOK_DELIVERY_ID_HEADER, WEBHOOK_SIGNATURE_HEADER, WEBHOOK_TIMESTAMP_HEADER
    from mlflow.webhooks.delivery import _generate_hmac_signature

    signature = headers.get(WEBHOOK_SIGNATURE_HEADER)
    delivery_id = headers.get(WEBHOOK_DELIVERY_ID_HEADER)
    timestamp = headers.get(WEBHOOK_TIMESTAMP_HEADER)
    if not (signature and delivery_id and timestamp):
        return f"missing {WEBHOOK_SIGNATURE_HEADER}, {WEBHOOK_DELIVERY_ID_HEADER} or {WEBHOOK_TIMESTAMP_HEADER} header"
    try:
        age_s = (time.time() if now_s is None else now_s) - int(timestamp)
    except ValueError:
        return f"{WEBHOOK_TIMESTAMP_HEADER}: found {timestamp!r}, expected Unix seconds"
    if abs(age_s) > MAX_AGE_S:
        return f"{WEBHOOK_TIMESTAMP_HEADER}: {age_s:.0f} s old, expected within {MAX_AGE_S} s (replay?)"
    expected = _generate_hmac_signature(secret, delivery_id, timestamp, body.decode("utf-8", "replace"))
    if not hmac.compare_digest(expected, signature):
        return f"{WEBHOOK_SIGNATURE_HEADER}: does not match the secret"
    return None


class Gatekeeper:
    """Evaluates the policy on registry events and reverts what fails (see the module docstring)."""

    def __init__(self, client=None, policy: str | None = None):
        self.client = registry._client(client)
        self.policy = registry.load_policy(policy)
        self._lock = threading.Lock()  # one event at a time: reverts must not interleave

    # ---------------------------------------------------------------- events

    def handle(self, event: dict[str, Any]) -> list[str]:
        """Act on one webhook payload ``{"entity", "action", "data": {...}}``; returns what was done."""
        kind = f"{event.get('entity')}.{event.get('action')}"
        data = event.get("data") or {}
        name = data.get("name")
        if not name:
            return []
        with self._lock:
            actions: list[str] = []
            if kind == "model_version.created":
                registry.annotate_version(name, data["version"], self.client, self.policy)
                actions.append(f"annotated {name} v{data['version']}")
            elif kind == "model_version_alias.created":
                actions += self._check_alias(name, data["alias"], str(data["version"]))
            elif kind.startswith("model_version_tag.") and str(data.get("key", "")).startswith("ptycho_ml."):
                return []  # our own tags (and the training run's): nothing was promoted
            actions += self.sweep_stages(name)
            return actions

    def _check_alias(self, name: str, alias: str, version: str) -> list[str]:
        current = (self.client.get_registered_model(name).aliases or {}).get(alias)
        if current is None or str(current) != version:
            return []  # moved again since: the newer event judges the newer holder
        judged = registry.annotate_version(name, version, self.client, self.policy)
        failures = judged["verdicts"].get(f"@{alias}", [])
        good_key = TAG_ALIAS_GOOD + alias
        if not failures:
            self.client.set_registered_model_tag(name, good_key, version)
            return [f"{name} v{version} @{alias}: pass"]
        self.client.delete_registered_model_alias(name, alias)
        actions = [f"{name} v{version} @{alias}: FAIL ({'; '.join(failures)}); alias removed"]
        previous = (self.client.get_registered_model(name).tags or {}).get(good_key)
        restored = ""
        if previous and previous != version:
            again = registry.annotate_version(name, previous, self.client, self.policy)
            if not again["verdicts"].get(f"@{alias}"):
                self.client.set_registered_model_alias(name, alias, previous)
                restored = f"; @{alias} given back to v{previous}"
                actions.append(f"{name} @{alias} -> v{previous} (its last passing holder)")
        self._record_revert(name, version, f"@{alias} removed{restored}: {'; '.join(failures)}")
        return actions

    def _record_revert(self, name: str, version: str, what: str) -> None:
        self.client.set_model_version_tag(name, version, TAG_REVERTED, f"{_now()} by ptycho-ml gatekeeper: {what}"[:5000])

    # ---------------------------------------------------------------- stages

    def sweep_stages(self, name: str) -> list[str]:
        """Make the Staging/Production holders of ``name`` pass their gate, one holder per stage."""
        actions: list[str] = []
        versions = self.client.search_model_versions(f"name = '{name}'")
        for stage in registry.ACTIVE_STAGES:
            holders = [v for v in versions if v.current_stage == stage]
            passing = []
            for mv in holders:
                failures = registry.gate_failures(registry._run_metrics(self.client, mv.run_id), self.policy, stage)
                if not failures:
                    passing.append(mv)
                    if (mv.tags or {}).get(TAG_APPROVED_STAGE) != stage:
                        self.client.set_model_version_tag(name, mv.version, TAG_APPROVED_STAGE, stage)
                    continue
                back = (mv.tags or {}).get(TAG_APPROVED_STAGE)
                back = back if back in ("Staging", "Production", "Archived") and back != stage else "None"
                self._transition(name, mv.version, back, archive=False)
                self._record_revert(name, str(mv.version), f"{stage} -> {back}: {'; '.join(failures)}")
                registry.annotate_version(name, mv.version, self.client, self.policy)
                actions.append(f"{name} v{mv.version} {stage}: FAIL ({'; '.join(failures)}); moved back to {back}")
            if len(passing) > 1:  # the one that entered last keeps the stage, as promote's archiving would
                keeper = max(passing, key=lambda v: (v.last_updated_timestamp or 0, int(v.version)))
                for mv in passing:
                    if mv is not keeper:
                        self._transition(name, mv.version, "Archived", archive=False)
                        actions.append(f"{name} v{mv.version} {stage} -> Archived (v{keeper.version} entered {stage})")
        return actions

    def _transition(self, name: str, version, stage: str, archive: bool) -> None:
        with warnings.catch_warnings():  # stages are deprecated in MLflow 3 but still functional
            warnings.simplefilter("ignore", FutureWarning)
            self.client.transition_model_version_stage(name, str(version), stage, archive_existing_versions=archive)

    def sweep_all(self) -> list[str]:
        """:meth:`sweep_stages` for every registered model."""
        actions: list[str] = []
        for rm in self.client.search_registered_models():
            with self._lock:
                actions += self.sweep_stages(rm.name)
        return actions


# ---------------------------------------------------------------- HTTP receiver

def make_server(gatekeeper: Gatekeeper, host: str = "127.0.0.1", port: int = 0,
                secret: str | None = None) -> ThreadingHTTPServer:
    """An HTTP server that feeds MLflow's webhook POSTs (any path) to ``gatekeeper``; ``GET /health`` answers OK.

    A bad signature gets 401, a body that is not a webhook payload 400; the
    answer is JSON ``{"actions": [...]}``.
    """

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802 (http.server's naming)
            self._reply(200, {"status": "ok"}) if self.path == "/health" else self._reply(404, {"error": "not found"})

        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if secret:
                problem = verify_signature(secret, self.headers, body)
                if problem:
                    _log.warning("refused a delivery: %s", problem)
                    return self._reply(401, {"error": problem})
            try:
                event = json.loads(body)
                if not isinstance(event, dict) or "entity" not in event or "action" not in event:
                    raise ValueError("no entity/action")
            except ValueError:
                return self._reply(400, {"error": "body: expected an MLflow webhook payload (JSON with entity, action, data)"})
            try:
                actions = gatekeeper.handle(event)
            except Exception as exc:  # report, keep serving; MLflow retries on 5xx
                _log.exception("event %s.%s failed", event.get("entity"), event.get("action"))
                return self._reply(500, {"error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__})
            for line in actions:
                _log.info(line)
            self._reply(200, {"actions": actions})

        def log_message(self, fmt, *args):  # through logging, not stderr prints
            _log.debug(fmt, *args)

    return ThreadingHTTPServer((host, port), Handler)


def register_webhook(url: str, secret: str | None = None, client=None):
    """Create (or point at ``url``) the tracking server's webhook named ``ptycho-ml-gatekeeper`` for :data:`EVENTS`."""
    client = registry._client(client)
    for hook in client.list_webhooks():
        if hook.name == WEBHOOK_NAME:
            return client.update_webhook(hook.webhook_id, url=url, events=list(EVENTS), secret=secret, status="ACTIVE")
    return client.create_webhook(WEBHOOK_NAME, url, list(EVENTS), description="ptycho_ml promotion policy", secret=secret)


def run_sweeper(gatekeeper: Gatekeeper, every_s: float, stop: threading.Event) -> threading.Thread:
    """A daemon thread running :meth:`Gatekeeper.sweep_all` every ``every_s`` seconds until ``stop`` is set."""

    def loop():
        while not stop.wait(every_s):
            try:
                for line in gatekeeper.sweep_all():
                    _log.info(line)
            except Exception:  # the tracking server may be restarting: try again next time
                _log.exception("stage sweep failed")

    thread = threading.Thread(target=loop, name="gatekeeper-sweep", daemon=True)
    thread.start()
    return thread
