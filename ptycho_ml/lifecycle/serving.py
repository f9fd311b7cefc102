"""``ptycho-ml serve``: MLflow's scoring server bound to a stage or alias, following promotions without a restart.

``mlflow models serve -m models:/ptychopinn@champion`` resolves the URI once,
when it starts. Here the same scoring server (``mlflow.pyfunc.scoring_server``:
the same ``/invocations`` request formats, ``/ping``, ``/health``) answers
with a :class:`FollowingModel`: a poller re-resolves the URI every ``poll_s``
seconds and, when the stage or alias has a new holder, loads it through the
one model loader (:func:`~ptycho_ml.lifecycle.registry.load_model_with_provenance`,
so the load-time gate applies) and swaps it in with one reference assignment.
A request reads the reference once, so it is answered wholly by the old or
wholly by the new version, and no request waits for or fails on a swap.
A new holder that fails its gate (or whose input signature differs) is not
swapped in: the server keeps answering with the version it has and logs why.

Every response names what answered in headers: ``X-Ptycho-Model-Name``,
``X-Ptycho-Model-Version``, ``X-Ptycho-Model-Run-Id``,
``X-Ptycho-Model-Bundle-Sha256`` (and ``X-Ptycho-Model-Gate`` when the
holder was served with ``--allow-ungated``), and in the body, as plain
``mlflow models serve`` does: ``name``, ``version``, ``run_id`` and
``bundle_sha256`` beside the arrays (:data:`ptycho_ml.flavor.RESPONSE_PROVENANCE`).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from typing import Any

from ptycho_ml.lifecycle import registry

_log = logging.getLogger("ptycho_ml.serve")
HEADERS = {"name": "X-Ptycho-Model-Name", "version": "X-Ptycho-Model-Version", "run_id": "X-Ptycho-Model-Run-Id",
           "bundle_sha256": "X-Ptycho-Model-Bundle-Sha256"}
# Per request: the middleware puts a dict here; the predicting thread (a copy of the context) fills it.
_ANSWERED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("ptycho_ml_answered", default=None)


class FollowingModel:
    """A pyfunc model that predicts with the current holder of ``uri`` (a ``models:/`` stage or alias URI)."""

    def __init__(self, uri: str, allow_ungated: bool | None = None):
        from mlflow.models import Model

        self.uri = uri
        self.allow_ungated = allow_ungated
        self._parsed = registry.parse_models_uri(uri)
        if self._parsed is None or self._parsed.model_id:
            from ptycho_ml.errors import PtychoInputError

            raise PtychoInputError(f"--model: found {uri!r}, expected a registry URI such as "
                                   "models:/ptychopinn@champion or models:/ptychopinn/Production")
        self._current = self._load()
        self.metadata = Model.load(self._current[0]["resolved_uri"])
        self._swap_lock = threading.Lock()  # one refresh at a time; predictions never take it

    def _load(self) -> tuple[dict[str, Any], Any]:
        from ptycho_ml.flavor import PtychoPyfuncModel

        model, provenance = registry.load_model_with_provenance(self.uri, allow_ungated=self.allow_ungated)
        return provenance, PtychoPyfuncModel(model, provenance)  # the body names it too, as the headers do

    @property
    def provenance(self) -> dict[str, Any]:
        return self._current[0]

    def refresh(self) -> str | None:
        """Re-resolve the URI; swap in a new holder. Returns what happened (None: nothing changed)."""
        from mlflow.models import Model

        from ptycho_ml.errors import PtychoInputError

        with self._swap_lock:
            current = self._current[0]
            try:
                holder = registry._resolve_version(self.uri, self._parsed)
            except PtychoInputError as exc:  # the alias was removed, the stage emptied: keep what answers now
                return f"kept version {current['version']}: {exc}"
            if str(holder.version) == current["version"]:
                return None
            try:
                fresh = self._load()
            except PtychoInputError as exc:  # e.g. the new holder fails its gate
                return f"kept version {current['version']}: {exc}"
            signature = Model.load(fresh[0]["resolved_uri"]).signature
            if (signature.to_dict() if signature else None) != (self.metadata.signature.to_dict()
                                                                 if self.metadata.signature else None):
                return (f"kept version {current['version']}: version {fresh[0]['version']} has another input "
                        "signature (restart `ptycho-ml serve` to serve it)")
            self._current = fresh  # the swap: one reference assignment
            return f"now serving version {fresh[0]['version']} (was {current['version']})"

    def predict(self, data: Any, params: dict[str, Any] | None = None):
        provenance, model = self._current  # read once: one request, one version
        out = model.predict(data, params)
        answered = _ANSWERED.get()
        if answered is not None:
            answered.update(provenance)
        return out


def build_app(following: FollowingModel):
    """MLflow's scoring-server app over ``following``, with the answering version in the response headers."""
    from mlflow.pyfunc import PyFuncModel
    from mlflow.pyfunc.scoring_server import init

    app = init(PyFuncModel(model_meta=following.metadata, model_impl=following))

    @app.middleware("http")
    async def name_the_version(request, call_next):
        answered: dict[str, Any] = {}
        token = _ANSWERED.set(answered)
        try:
            response = await call_next(request)
        finally:
            _ANSWERED.reset(token)
        for key, header in HEADERS.items():
            if answered.get(key):
                response.headers[header] = str(answered[key])
        gate = answered.get("gate")
        if gate and gate.get("verdict") == "overridden":
            response.headers["X-Ptycho-Model-Gate"] = f"overridden for {gate['target']}"
        return response

    return app


def run_poller(following: FollowingModel, every_s: float, stop: threading.Event) -> threading.Thread:
    """A daemon thread calling :meth:`FollowingModel.refresh` every ``every_s`` seconds until ``stop`` is set."""

    def loop():
        last = None
        while not stop.wait(every_s):
            try:
                message = following.refresh()
            except Exception:  # the tracking server may be restarting: keep serving, try again
                _log.exception("re-resolving %s failed", following.uri)
                continue
            if message and message != last:  # a held-back holder is reported once, not every poll
                _log.info("%s: %s", following.uri, message)
            last = message

    thread = threading.Thread(target=loop, name="serve-poller", daemon=True)
    thread.start()
    return thread
