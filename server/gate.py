"""The request gate: API keys and the body-size limit, checked before FastAPI reads or parses a body.

``GateMiddleware`` is pure ASGI; its settings (``GATE``) are set per ingress replica by
``configure`` from the server config, the ``ALIGNSERVE_API_KEYS`` environment variable and an API
key file (which fails closed: configured but missing or empty means the replica refuses to start).
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
from typing import Callable

from fastapi.responses import JSONResponse

from server.config import LimitsConfig, ServerConfig
from server.errors import APIError, BadRequest, Unauthorized

logger = logging.getLogger("ray.serve")


class Gate:
    """What the gate checks (set per replica by ``configure``)."""
    max_request_bytes: int = LimitsConfig().max_request_bytes
    api_keys: list[bytes] = []
    metrics_require_auth: bool = False

    # Always reachable without a key: liveness and the API's own description.
    OPEN_PATHS = frozenset({"/health", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"})

    def needs_auth(self, path: str) -> bool:
        if not self.api_keys or path in self.OPEN_PATHS:
            return False
        return path != "/metrics" or self.metrics_require_auth

    def authorized(self, header: str) -> bool:
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        # Constant time: compare fixed-size digests, and look at every key (no early exit).
        digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        ok = False
        for key in self.api_keys:
            ok |= hmac.compare_digest(digest, key)
        return ok and bool(token)


GATE = Gate()


def load_api_keys(config: ServerConfig) -> list[str]:
    keys = list(config.api_keys)
    env = os.environ.get("ALIGNSERVE_API_KEYS", "")
    keys += [k.strip() for k in env.split(",") if k.strip()]
    path = config.api_keys_file or os.environ.get("ALIGNSERVE_API_KEYS_FILE")
    if path:
        # Fail closed: a key file that was configured but is missing or holds no key must not
        # leave the API open (the replica does not start, and says why).
        if not os.path.isfile(path):
            raise RuntimeError(f"API key file {path!r} (api_keys_file / ALIGNSERVE_API_KEYS_FILE) does not exist; "
                               "refusing to start with authentication off")
        with open(path) as f:
            from_file = [line.strip() for line in f if line.strip() and not line.strip().startswith("#")]
        if not from_file:
            raise RuntimeError(f"API key file {path!r} (api_keys_file / ALIGNSERVE_API_KEYS_FILE) holds no key; "
                               "refusing to start with authentication off")
        keys += from_file
    return keys


def configure(config: ServerConfig) -> list[str]:
    """Set this replica's gate from the config; returns the API keys."""
    keys = load_api_keys(config)
    if config.metrics_require_auth and not keys:
        # Asked for, but there is no key to check: say so instead of leaving /metrics open silently.
        raise RuntimeError("metrics_require_auth is true but no API key is configured (api_keys, api_keys_file, "
                           "ALIGNSERVE_API_KEYS); refusing to start with /metrics open")
    GATE.api_keys = [hashlib.sha256(k.encode()).digest() for k in keys]
    GATE.metrics_require_auth = config.metrics_require_auth
    GATE.max_request_bytes = config.limits.max_request_bytes
    return keys


def key_ok(authorization_header: str) -> bool:
    return GATE.authorized(authorization_header)


def unauthorized() -> Unauthorized:
    return Unauthorized("invalid or missing API key (send `Authorization: Bearer <key>`)", code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"})


class GateMiddleware:
    """Pure ASGI: API keys, then ``limits.max_request_bytes`` (413), before any body is parsed.
    ``on_reject(reason)`` counts refusals (auth, too_large)."""

    def __init__(self, app, on_reject: Callable[[str], None] | None = None):
        self.app = app
        self.on_reject = on_reject or (lambda reason: None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers") or []}
        if GATE.needs_auth(scope.get("path", "")):
            if not GATE.authorized(headers.get(b"authorization", b"").decode("latin-1")):
                self.on_reject("auth")
                return await self._reject(unauthorized(), scope, receive, send)
        limit = GATE.max_request_bytes
        too_large = BadRequest(f"request body is larger than {limit} bytes", code="request_too_large",
                               status_code=413)
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await self._reject(BadRequest("invalid Content-Length header", code="invalid_body"),
                                          scope, receive, send)
            if n > limit:
                self.on_reject("too_large")
                return await self._reject(too_large, scope, receive, send)
            return await self.app(scope, receive, send)
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        # No Content-Length (chunked): read at most `limit` bytes, then replay them to the app.
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                self.on_reject("too_large")
                return await self._reject(too_large, scope, receive, send)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    @staticmethod
    async def _reject(err: APIError, scope, receive, send) -> None:
        await JSONResponse(err.body(), status_code=err.status_code, headers=err.headers)(scope, receive, send)
