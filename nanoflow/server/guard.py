"""The checks every request passes before the app reads its body: draining, the API key, the
body's size and its encoding.

It is plain ASGI so that it runs before FastAPI parses anything: a request without the key gets a
401 whatever its body, and a body larger than the limit gets a 413 and is never held in memory:
the rest of it is read and dropped (up to a cap, past which the connection is closed), because a
client still sending when the server closes gets a reset instead of the answer.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from nanoflow.server.errors import APIError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
_DISCARD_CAP = 256 * 1024 * 1024
_PROTECTED_PREFIX = "/v1/"


def first_bad_string(value: Any, path: str = "") -> str | None:
    """Path (``messages.0.content``) of the first string in decoded JSON that is not valid UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = first_bad_string(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


def _undecodable(body: bytes) -> APIError | None:
    """A 400 naming the field whose bytes are not UTF-8, for a JSON body that is not UTF-8."""
    try:
        body.decode("utf-8")
        return None
    except UnicodeDecodeError as exc:
        at = exc.start
    try:
        field = first_bad_string(json.loads(body.decode("utf-8", "surrogateescape")))
    except ValueError:
        field = None
    where = f"{field} holds" if field is not None else "the body holds"
    return APIError(400, f"{where} bytes that are not valid UTF-8 (at byte {at})", param=field)


class RequestGuard:
    """ASGI middleware in front of the app; ``draining()`` says the server is shutting down."""

    def __init__(
        self,
        app: ASGIApp,
        api_key: str | None,
        max_request_bytes: int,
        draining: Callable[[], bool],
    ) -> None:
        self.app, self.api_key, self.limit = app, api_key, max_request_bytes
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._refuse_early(scope)
        if error is None and scope["method"] in ("POST", "PUT", "PATCH"):
            body, error = await self._read_body(receive)
            if error is None:
                receive = _replay(body, receive)
        if error is not None:
            if error.status == 413:
                await _discard_body(receive)
            await _send_error(send, error)
            return
        await self.app(scope, receive, send)

    def _refuse_early(self, scope: Scope) -> APIError | None:
        protected = scope["path"].startswith(_PROTECTED_PREFIX)
        if protected and self.draining():
            return APIError(503, "the server is shutting down", "service_unavailable")
        headers = dict(scope["headers"])
        if protected and self.api_key is not None and not self._authorized(headers):
            return APIError(401, "missing or wrong API key", code="invalid_api_key")
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return self._too_large()
        return None

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and secrets.compare_digest(
            token.strip(), self.api_key.encode()
        )

    def _too_large(self) -> APIError:
        return APIError(
            413, f"the request body is larger than the server's limit of {self.limit} bytes "
            "(--max-request-bytes)", code="request_too_large",
        )  # fmt: skip

    async def _read_body(self, receive: Receive) -> tuple[bytes, APIError | None]:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"", APIError(499, "the client closed the connection", code="client_closed")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return b"", self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        return body, _undecodable(body)


async def _discard_body(receive: Receive) -> None:
    dropped = 0
    while dropped < _DISCARD_CAP:
        message = await receive()
        dropped += len(message.get("body", b""))
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the app the body already read, then listens for disconnects."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def _send_error(send: Send, error: APIError) -> None:
    payload = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(payload))]
    if error.status == 413:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
