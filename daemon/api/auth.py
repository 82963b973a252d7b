"""Optional API keys in front of the routes, per-key limits, and the audit line of admin actions.

Off unless ``CORRAL_API_KEYS_FILE`` is set: Ollama has no keys, so by default every client keeps
working unchanged (a key a client sends anyway is ignored). With a key file, :func:`authorize`
decides, in this order:

1. open routes pass: ``GET /``, ``GET /readyz``, and ``GET /metrics`` unless
   ``CORRAL_METRICS_AUTH``;
2. the key is ``Authorization: Bearer <key>`` (OpenAI SDK, ollama clients, ``OLLAMA_API_KEY``)
   or ``x-api-key: <key>`` (Anthropic SDK): none -> 401, none known -> 401;
3. a route of scope ``admin`` (model management: create, blobs, copy, delete, pull, push) with
   an ``inference`` key -> 403; a route not in :data:`RULES` needs a key of any scope;
4. a key with ``models``: every model the request names (body fields of :data:`RULES`, read
   here; the handler reads the same cached bytes) must match one of them -> else 403;
5. the key's per-minute limits (:class:`~corral.daemon.apikeys.Limiter`) -> else 429 with
   ``Retry-After``;
6. the handler runs with ``request[KEY]`` set (the key's name, scope and limits: what other
   policies may read), and the tokens it generates are charged to the key (:func:`meter`).

Refusals are :class:`ApiError` s, so the error middleware (outside this one) answers in the
route's shape (native, OpenAI, Anthropic). A key is never logged; its name is. Every admin
action (create, copy, delete, pull, push, blob upload, cancel_request) writes one ``audit`` line
with the action, the key's name (None without keys), the client's address, the models (or blob)
it names and the status, refused attempts included.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import structlog
from aiohttp import web

from corral.daemon.api.errors import ApiError, http_status
from corral.daemon.api.keys import CONFIG, METRICS
from corral.daemon.api.middleware import Handler
from corral.daemon.apikeys import ApiKey, KeyFileError, Keyring, Limiter, Scope
from corral.daemon.errors import CorralError
from corral.daemon.metrics import Metrics
from corral.daemon.models import modelfile

log = structlog.get_logger("corral.daemon.api.auth")

# The authenticated key of a request (absent without a key file or on an open route).
KEY: web.RequestKey[ApiKey] = web.RequestKey("corral_key", ApiKey)

Action = str  # create | copy | delete | pull | push | blob_upload | cancel_request
_NAMES: web.RequestKey[list] = web.RequestKey("corral.auth_models", list)


@dataclass(frozen=True, slots=True)
class Rule:
    """What a route needs: ``scope`` (None = open), the body fields that name models (matched
    ignoring case, as Go's JSON decoding does), a path parameter naming one, and the audited
    admin ``action``. ``ticket``: an inference request (it gets a ticket: ``X-Request-Id``,
    ``X-Corral-Priority``; :mod:`corral.daemon.api.requests`)."""

    scope: Scope | None
    fields: tuple[str, ...] = ()
    path_model: str | None = None
    action: Action | None = None
    ticket: bool = False


OPEN = Rule(None)
_M = ("model", "name")
_GENERATE = Rule("inference", _M, ticket=True)
_INFER = Rule("inference", ("model",), ticket=True)
RULES: dict[tuple[str, str], Rule] = {
    ("GET", "/"): OPEN,
    ("GET", "/readyz"): OPEN,
    ("GET", "/metrics"): Rule("inference"),  # open unless CORRAL_METRICS_AUTH (Gate.rule)
    ("GET", "/api/version"): Rule("inference"),
    ("GET", "/api/tags"): Rule("inference"),
    ("GET", "/api/ps"): Rule("inference"),
    ("POST", "/api/show"): Rule("inference", _M),
    ("POST", "/api/generate"): _GENERATE,
    ("POST", "/api/chat"): _GENERATE,
    ("POST", "/api/embed"): _GENERATE,
    ("POST", "/api/embeddings"): _GENERATE,
    ("POST", "/api/create"): Rule("admin", ("model", "name", "from"), action="create"),
    ("HEAD", "/api/blobs/{digest}"): Rule("admin"),
    ("POST", "/api/blobs/{digest}"): Rule("admin", action="blob_upload"),
    ("POST", "/api/copy"): Rule("admin", ("source", "destination"), action="copy"),
    ("DELETE", "/api/delete"): Rule("admin", _M, action="delete"),
    ("POST", "/api/pull"): Rule("admin", _M, action="pull"),
    ("POST", "/api/push"): Rule("admin", _M, action="push"),
    # every client's requests and addresses; ending one: the operator's
    ("GET", "/api/requests"): Rule("admin"),
    ("DELETE", "/api/requests/{id}"): Rule("admin", action="cancel_request"),
    ("POST", "/v1/chat/completions"): _INFER,
    ("POST", "/v1/completions"): _INFER,
    ("POST", "/v1/embeddings"): _INFER,
    ("POST", "/v1/responses"): _INFER,
    ("POST", "/v1/messages"): _INFER,
    ("POST", "/v1/messages/count_tokens"): _INFER,
    ("GET", "/v1/models"): Rule("inference"),
    ("GET", "/v1/models/{model}"): Rule("inference", path_model="model"),
}
UNLISTED = Rule("inference")  # unknown paths, wrong methods: a key of any scope first


def rule_of(request: web.Request) -> Rule:
    resource = request.match_info.route.resource
    if resource is None:
        return UNLISTED
    path, method = resource.canonical, request.method
    found = RULES.get((method, path))
    if found is None and method == "HEAD":  # GET routes answer HEAD too
        found = RULES.get(("GET", path))
    return found or UNLISTED


class Gate:
    """The app's key state: the keyring (swapped whole on reload), the limiter, the metrics."""

    def __init__(self, keyring: Keyring | None, metrics: Metrics, *, metrics_open: bool) -> None:
        self.keyring = keyring
        self.metrics = metrics
        self.metrics_open = metrics_open
        self.limiter = Limiter()

    def rule(self, request: web.Request) -> Rule:
        r = rule_of(request)
        if self.metrics_open and request.path == "/metrics" and r is RULES[("GET", "/metrics")]:
            return OPEN
        return r

    def charge(self, key: ApiKey, tokens: int) -> None:
        """``tokens`` generated for ``key``: counted in /metrics and in its token limit."""
        if tokens > 0:
            self.metrics.key_generated_tokens.labels(key.name).inc(tokens)
            self.limiter.charge(key, tokens, time.monotonic())

    def refuse(self, reason: str, status: int, message: str, **kw: object) -> ApiError:
        self.metrics.auth_refused.labels(reason).inc()
        return ApiError(status, message, **kw)  # type: ignore[arg-type]


AUTH: web.AppKey[Gate] = web.AppKey("auth", Gate)


# ---- the tokens a request generates ------------------------------------------------------------

Meter = Callable[[int], None]
_METER: contextvars.ContextVar[Meter | None] = contextvars.ContextVar("corral_meter", default=None)


def meter() -> Meter | None:
    """What the current request's completion calls with the tokens it generated (None when
    no key is charged). Read it where the job starts, in the handler's task."""
    return _METER.get()


def may_use(request: web.Request, model: str) -> bool:
    """Whether the request's key (if any) may use ``model``: the lists (/api/tags, /api/ps,
    /v1/models) show a key only the models it may use."""
    key = request.get(KEY)
    return key is None or key.allows_model(model)


# ---- credentials and named models --------------------------------------------------------------


def credentials(request: web.Request) -> list[str]:
    """The keys a request presents: the ``Authorization: Bearer`` token, then ``x-api-key``."""
    found = []
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        found.append(token.strip())
    api_key = request.headers.get("x-api-key", "").strip()
    if api_key:
        found.append(api_key)
    return found


def _modelfile_sources(text: object) -> list[str]:
    """The model names in a legacy ``modelfile`` body's FROM lines (blobs ``@sha256:`` are
    not models). An unparsable Modelfile names nothing: the handler answers it 400."""
    if not isinstance(text, str):
        return []
    try:
        sources = modelfile.parse(text).create_request().get("from")
    except (ValueError, CorralError):
        return []
    values = [sources] if isinstance(sources, str) else list(sources or [])
    return [v for v in values if isinstance(v, str) and not v.startswith("@")]


async def named_models(request: web.Request, rule: Rule) -> list[str]:
    """Every model name the request names, as written. Body fields are matched ignoring case
    and every spelling counts (whichever the handler takes, it was checked). A body that is
    not a JSON object names nothing (the handler refuses it)."""
    names: list[str] = []
    if rule.path_model is not None:
        names.append(request.match_info.get(rule.path_model, ""))
    if rule.fields or rule.action == "create":
        try:
            data = msgspec.json.decode(await request.read())
        except (msgspec.DecodeError, RecursionError):
            data = None
        if isinstance(data, dict):
            for k, v in data.items():
                low = k.lower()
                if low in rule.fields and isinstance(v, str):
                    names.append(v)
                elif low == "modelfile" and rule.action == "create":
                    names += _modelfile_sources(v)
    return [n for n in names if n]


# ---- the middleware ----------------------------------------------------------------------------


@web.middleware
async def authorize(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Steps 1-6 of the module docstring; the audit line for admin actions."""
    gate = request.app[AUTH]
    rule = gate.rule(request)
    if rule.action is None:
        return await _admit(request, handler, gate, rule)
    status = 500
    try:
        response = await _admit(request, handler, gate, rule)
        status = response.status
        return response
    except (ApiError, CorralError) as err:
        status = http_status(err)
        raise
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away (nginx's code, as /metrics counts it)
        raise
    finally:
        key = request.get(KEY)
        log.info(
            "audit",
            action=rule.action,
            key=key.name if key is not None else None,
            client=request.remote,
            models=request.get(_NAMES, []),
            blob=request.match_info.get("digest"),
            status=status,
        )


async def _names(request: web.Request, rule: Rule) -> list[str]:
    """:func:`named_models`, kept on the request for the audit line."""
    names = request[_NAMES] = await named_models(request, rule)
    return names


async def _admit(
    request: web.Request, handler: Handler, gate: Gate, rule: Rule
) -> web.StreamResponse:
    keyring = gate.keyring
    if keyring is None or rule.scope is None:  # 1.
        if rule.action is not None and rule.fields:
            await _names(request, rule)
        return await handler(request)
    presented = credentials(request)  # 2. (no body is read before this and 3. pass)
    if not presented:
        raise gate.refuse(
            "missing",
            401,
            "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    key = next((k for k in map(keyring.find, presented) if k is not None), None)
    if key is None:
        raise gate.refuse(
            "invalid",
            401,
            "invalid API key",
            code="invalid_api_key",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    request[KEY] = key
    if rule.scope == "admin" and key.scope != "admin":  # 3.
        raise gate.refuse(
            "scope", 403, f"API key {key.name!r} has scope {key.scope!r}: this needs 'admin'"
        )
    if (key.models or rule.action is not None) and (rule.fields or rule.path_model):  # 4.
        for name in await _names(request, rule):
            if key.models and not key.allows_model(name):
                raise gate.refuse("model", 403, f"API key {key.name!r} may not use model {name!r}")
    limited = gate.limiter.admit(key, time.monotonic())  # 5.
    if limited is not None:
        kind, wait = limited
        gate.metrics.key_limited.labels(key.name, kind).inc()
        raise ApiError(
            429,
            f"API key {key.name!r} is over its {kind} per minute: retry in {wait}s",
            headers={"Retry-After": str(wait)},
        )
    gate.metrics.key_requests.labels(key.name).inc()
    token = _METER.set(lambda n: gate.charge(key, n))  # 6.
    try:
        return await handler(request)
    finally:
        _METER.reset(token)


# ---- setup and reload --------------------------------------------------------------------------


def install(app: web.Application, keyring: Keyring | None) -> None:
    """Put the :class:`Gate` on ``app`` (the middleware is listed in ``make_app``). Without a
    ``keyring`` the config's key file is read now (:class:`KeyFileError` if it cannot be)."""
    config = app[CONFIG]
    if keyring is None and config.api_keys_file is not None:
        keyring = Keyring.load(config.api_keys_file)
    app[AUTH] = Gate(keyring, app[METRICS], metrics_open=not config.metrics_auth)


async def reload(app: web.Application) -> bool:
    """Read the key file again (SIGHUP). A file that cannot be used keeps the old keys (an
    error line says why); False then, or when there is no key file."""
    path = app[CONFIG].api_keys_file
    if path is None:
        return False
    try:
        keyring = await asyncio.to_thread(Keyring.load, path)
    except KeyFileError as e:
        log.error("API keys not reloaded, the previous keys stay", error=str(e))
        return False
    app[AUTH].keyring = keyring
    log.info("API keys reloaded", file=str(path), keys=[k.name for k in keyring.keys])
    return True
