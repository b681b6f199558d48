"""Every failure answers `{"error": {"message", "type", "param", "code"}}` (OpenAI's shape), never a traceback."""

from __future__ import annotations

import logging

from zimage.errors import UsageError
from zimage.server.store.model import StoreUnavailable

log = logging.getLogger("zimage.server")

# status -> OpenAI-style error type
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class ApiError(Exception):
    """Raised by routes and dependencies; rendered by the handler below."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.code, self.param)


def error_body(status: int, message: str, code: str | None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}


def install_error_handlers(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def reply(status, message, code, param=None, headers=None):
        return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return reply(exc.status, exc.message, exc.code, exc.param, exc.headers)

    @app.exception_handler(StoreUnavailable)
    async def _store_unavailable(request, exc: StoreUnavailable):
        # The database is down or restarting: nothing was accepted or changed; the client may retry.
        log.warning("%s %s: %s", request.method, request.url.path, exc)
        return reply(503, "the job store is unavailable; retry shortly", "store_unavailable", None,
                     {"Retry-After": "5"})

    @app.exception_handler(UsageError)
    async def _usage_error(request, exc: UsageError):
        return reply(400, str(exc), "invalid_value", _public_param(exc.param))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        # OpenAI answers 400 (not FastAPI's 422) for a bad parameter; report the first problem, by field name.
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        param = ".".join(loc) or None
        message = first.get("msg", "invalid request")
        if "input" in first and first.get("type") not in ("missing", "json_invalid", "extra_forbidden"):
            message = f"{message}, got {_shown(first['input'])}"
        if param:
            message = f"{param}: {message}"
        code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
        if first.get("type") == "json_invalid":  # its loc is a position in the text, not a parameter
            code, message, param = "invalid_json", "the request body is not valid JSON", None
        return reply(400, message, code, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        if exc.status_code == 405:  # starlette's Allow names the methods of one route; a path may have several
            allowed = allowed_methods(request)
            return reply(405, f"{request.method} is not allowed on {request.url.path}; allowed: {allowed}",
                         "method_not_allowed", None, {"Allow": allowed})
        codes = {404: "not_found", 413: "body_too_large"}
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 413:  # FastAPI's body limit, counting a body that did not declare its size
            from starlette.middleware.body_limit import MAX_BODY_SIZE_SCOPE_KEY

            message = f"the request body is over the limit of {request.scope.get(MAX_BODY_SIZE_SCOPE_KEY)} bytes"
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 413:
            headers["Connection"] = "close"  # the rest of the body is not read: stop the upload (see guard.py)
        return reply(exc.status_code, message, codes.get(exc.status_code, "http_error"), None, headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return reply(500, "internal server error (details are in the server log)", "internal_error")


def allowed_methods(request) -> str:
    """Every method of every route whose path matches this request's path (HEAD included with GET)."""
    from starlette.routing import Match

    methods = set()
    for route in request.app.state.method_routes:
        if route.matches(request.scope)[0] != Match.NONE:
            methods |= set(route.methods)
    return ", ".join(sorted(methods))


def _shown(value) -> str:
    """A JSON value as the client wrote it, cut short."""
    import json

    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# GenerateRequest names fields as the engine does; the HTTP API names them as OpenAI and open servers do.
_PARAM_NAMES = {"prompt": "prompt", "steps": "num_inference_steps", "guidance": "guidance_scale",
                "width": "size", "height": "size", "negative_prompt": "negative_prompt", "seed": "seed", "n": "n",
                "lora": "loras"}


def _public_param(param: str | None) -> str | None:
    return _PARAM_NAMES.get(param, param) if param else None
