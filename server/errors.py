"""Errors in the OpenAI error shape: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

from typing import Any


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
