"""Errors answered in OpenAI's shape, shared by the middleware, the routes and the serving code."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error answered in OpenAI's shape with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )
        self.headers = headers

    def body(self) -> dict[str, Any]:
        detail = {"message": self.message, "type": self.type, "param": self.param}
        return {"error": {**detail, "code": self.code}}


def engine_dead(reason: str | None) -> APIError:
    return APIError(503, f"the engine is not running: {reason}", "service_unavailable")
