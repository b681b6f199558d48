"""Optional API key: `Authorization: Bearer <key>` (what the openai client sends) or `X-API-Key: <key>`.

Compared with hmac.compare_digest, so the time taken does not depend on how many leading characters match.
Applied to every API route; public: /health, the page shell (/, /static/*) and the API schema (/openapi.json,
/docs), none of which carries data or generates anything.
"""


import hmac

from zimage.server.errors import ApiError


def make_key_check(api_key: str | None):
    """A FastAPI dependency that raises 401 unless the request carries `api_key` (a no-op when it is None)."""
    from fastapi import Request
    from fastapi.security import HTTPBearer

    bearer = HTTPBearer(auto_error=False, description="The server's API key (--api-key or $ZIMAGE_API_KEY)")
    expected = api_key.encode() if api_key else None

    async def check(request: Request):
        if expected is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
        if not given:
            raise ApiError(401, "this server needs an API key: send 'Authorization: Bearer <key>'", "missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.encode(), expected):
            raise ApiError(401, "the API key is not valid", "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # Declare the bearer scheme in the signature so that the OpenAPI schema (and /docs "Authorize") shows it.
    from fastapi import Security

    async def dependency(request: Request, creds=Security(bearer)):
        await check(request)

    return dependency
