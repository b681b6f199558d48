"""Optional API key: `Authorization: Bearer <key>` (what the openai client sends) or `X-API-Key: <key>`.

Compared with hmac.compare_digest, so the time taken does not depend on how many leading characters match.
The check runs in the ASGI guard (zimage.server.guard) before any route and before any byte of the body is read;
the dependency below only declares the scheme, so that the OpenAPI schema and /docs "Authorize" show it.
"""

from __future__ import annotations

import hmac

from zimage.server.errors import ApiError

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def key_error(headers, expected: bytes) -> ApiError | None:
    """None if `headers` (a starlette Headers) carry the key `expected`, else the 401 to answer."""
    header = headers.get("authorization", "")
    given = header[7:].strip() if header[:7].lower() == "bearer " else headers.get("x-api-key", "")
    if not given:
        return ApiError(401, "this server needs an API key: send 'Authorization: Bearer <key>'", "missing_api_key",
                        headers=_CHALLENGE)
    if not hmac.compare_digest(given.encode(), expected):
        return ApiError(401, "the API key is not valid", "invalid_api_key", headers=_CHALLENGE)
    return None


def bearer_scheme():
    """A FastAPI dependency that checks nothing (the guard did) but puts the bearer scheme in the schema."""
    from fastapi import Security
    from fastapi.security import HTTPBearer

    bearer = HTTPBearer(auto_error=False, description="The server's API key (--api-key or $ZIMAGE_API_KEY)")

    async def dependency(creds=Security(bearer)):
        return None

    return dependency
