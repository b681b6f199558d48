"""The OpenAPI schema, made to say what the server does: validation errors are 400 with the error body (OpenAI's
convention; FastAPI's generated schema lists 422 with its own body, which this server never sends), and a request
with a body may be refused 413."""

from __future__ import annotations

_ERROR_REF = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
_FASTAPI_VALIDATION = ("HTTPValidationError", "ValidationError")


def install_openapi(app) -> None:
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            for operations in schema["paths"].values():
                for op in operations.values():
                    _fix_responses(op)
            components = schema.get("components", {}).get("schemas", {})
            for name in _FASTAPI_VALIDATION:
                components.pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _fix_responses(op: dict) -> None:
    """422 out; a JSON body can always be refused 400 (a bad value) and 413 (too large). Routes list their other
    answers themselves (routes.py), e.g. GET /v1/jobs its 400 for a bad `limit`."""
    responses = op.setdefault("responses", {})
    responses.pop("422", None)
    if op.get("requestBody"):
        responses.setdefault("400", {"description": "A bad value (`param` names it).", "content": _ERROR_REF})
        responses.setdefault("413", {"description": "The body is over 1 MiB.", "content": _ERROR_REF})
