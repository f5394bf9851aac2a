"""Errors in the OpenAI error shape, {"error": {"message", "type", "param", "code"}}, and the one
place where anything raised on a request's path becomes such an error (``as_api_error``)."""
from __future__ import annotations

import logging
from typing import Any

from decoders.base import AlignmentFailure, ParamError

logger = logging.getLogger("ray.serve")


class APIError(Exception):
    status_code = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 status_code: int | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        if status_code is not None:
            self.status_code = status_code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(APIError):
    status_code = 400


class NotFound(APIError):
    status_code = 404


class Unauthorized(APIError):
    status_code = 401
    type = "authentication_error"


class Overloaded(APIError):
    status_code = 429
    type = "rate_limit_error"


class Timeout(APIError):
    status_code = 504
    type = "timeout_error"


class AlignmentFailed(APIError):
    """A reward or value model failed: never return an unaligned answer as if it were aligned."""
    status_code = 502
    type = "alignment_error"


class ServerError(APIError):
    status_code = 500
    type = "server_error"


# Exceptions (by class name, as Ray may wrap them) that mean the engine or its replica is gone.
_UNAVAILABLE = frozenset({"EngineDeadError", "ActorDiedError", "ActorUnavailableError", "RayActorError",
                          "ReplicaUnavailableError", "ReplicaGone"})


def as_api_error(e: BaseException, rid: str | None = None) -> APIError:
    """The OpenAI-shaped error for an exception of the request path.

    * our own APIErrors, and ParamError (a method refusing a parameter: 400 naming it);
    * AlignmentFailure: 502 with its code; the message says what failed, not how (the details are
      in the server log under the request id);
    * the engine gone (dead engine core, replica replaced): a retryable 503;
    * anything else is our fault: a 500 whose message names the request id but not the exception.
    Ray wraps exceptions raised in another replica: the original is its ``cause``.
    """
    cause = getattr(e, "cause", None) or e
    for exc in (e, cause):
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, ParamError):
            return BadRequest(exc.message, param=exc.param, code=exc.code)
        if isinstance(exc, AlignmentFailure):
            return AlignmentFailed(f"{exc.message} (request {rid or 'unknown'})", code=exc.code)
    if type(cause).__name__ in _UNAVAILABLE or type(e).__name__ in _UNAVAILABLE:
        # The engine process died (or its replica is gone): Ray Serve's health check replaces the
        # replica; until then this is a retryable 503, not an internal error.
        return ServerError("the engine is unavailable; retry later", code="engine_unavailable", status_code=503,
                           headers={"Retry-After": "10"})
    return ServerError(f"internal server error (request {rid or 'unknown'}); the details are in the server log",
                       code="internal_error")
