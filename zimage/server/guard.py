"""The ASGI guard: the API key and the declared body size are checked before routing, before any body is read.

A request without a valid key is answered 401 without one byte of its body read (an unauthenticated client
cannot make the server buffer an upload), except on the public paths below, which carry no data and generate
nothing. A body declared larger than the limit (Content-Length) is answered 413 at once; a body that does not
declare its size (Transfer-Encoding: chunked) is counted as it arrives by BodyLimit below (starlette's body limit),
which raises 413 at the first byte over it. The limit is per path: `path_limits` raise it for the routes that take
pictures (zimage/server/inputs.py, upload_limits), every other body has `max_body_bytes`.

Pure ASGI (BaseHTTPMiddleware would hide client disconnects from the routes).
"""

from __future__ import annotations

from zimage.server.auth import key_error
from zimage.server.errors import ApiError, error_body

PUBLIC_PATHS = frozenset({"/health", "/", "/openapi.json", "/docs", "/docs/oauth2-redirect", "/favicon.ico"})
PUBLIC_PREFIXES = ("/static/",)


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class RequestGuard:
    def __init__(self, app, api_key: str | None, max_body_bytes: int, signer=None, path_limits=None):
        """`signer` (signing.UrlSigner): a GET of an image URL that carries a signature is let through without
        the key when the signature opens it, and refused (401) when it does not."""
        self.app = app
        self.expected = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.path_limits = dict(path_limits or {})
        self.signer = signer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            from fastapi.responses import JSONResponse

            headers = dict(refusal.headers)
            if has_body(scope):
                # The body is never read; without this uvicorn would keep the connection and discard the rest of
                # the upload as it comes. Closing it stops the client's upload.
                headers["Connection"] = "close"
            response = JSONResponse(error_body(refusal.status, refusal.message, refusal.code, refusal.param),
                                    refusal.status, headers=headers)
            return await response(scope, receive, send)  # a response alone: `receive` is never called
        return await self.app(scope, receive, send)

    def _refusal(self, scope) -> ApiError | None:
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        signed = self.signer.scope_access(scope) if self.signer is not None else None
        if isinstance(signed, ApiError):
            return signed
        if self.expected is not None and not is_public(scope["path"]) and signed is not True:
            error = key_error(headers, self.expected)
            if error is not None:
                return error
        length = headers.get("content-length")
        if length is not None:
            if not length.isascii() or not length.isdigit():
                return ApiError(400, f"Content-Length must be a number of bytes, got {length!r}", "invalid_header",
                                "content-length")
            limit = self.path_limits.get(scope["path"], self.max_body_bytes)
            if len(length) > 15 or int(length) > limit:  # (int() of 4300+ digits raises)
                return body_too_large(limit)
        return None


class BodyLimit:
    """starlette's RequestBodyLimitMiddleware with the limit of the request's path: counts the body's bytes as they
    arrive (chunked too, multipart uploads included) and raises 413 at the first byte over it."""

    def __init__(self, app, max_body_bytes: int, path_limits=None):
        self.app, self.max_body_bytes, self.path_limits = app, max_body_bytes, dict(path_limits or {})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.middleware.body_limit import RequestBodyLimitResponder

        limit = self.path_limits.get(scope["path"], self.max_body_bytes)
        return await RequestBodyLimitResponder(self.app, limit)(scope, receive, send)


def has_body(scope) -> bool:
    """Whether a body follows the request's head (a declared non-zero length, or a chunked one)."""
    for name, value in scope["headers"]:
        if (name == b"content-length" and value.strip(b"0")) or name == b"transfer-encoding":
            return True
    return False


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is over the limit of {limit} bytes", "body_too_large")
