"""Signed, expiring image URLs: `/v1/images/<name>?expires=<unix s>&sig=<hex>`, served without the API key.

sig = HMAC-SHA256(secret, "<name>:<expires>"), so a signature opens one image until one instant and nothing else.
The secret is --url-secret / $ZIMAGE_URL_SECRET, else 32 random bytes kept in `<data dir>/url-secret` (mode 0600):
URLs handed out stay valid across a restart, and only who can read the data dir (which holds the images anyway)
can forge one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import time
from pathlib import Path

from zimage.server.errors import ApiError

log = logging.getLogger("zimage.server")
SECRET_FILE = "url-secret"
IMAGES_PREFIX = "/v1/images/"


class UrlSigner:
    def __init__(self, secret: bytes, ttl_s: int):
        self._secret, self.ttl_s = secret, ttl_s

    def _sig(self, name: str, expires: int) -> str:
        return hmac.new(self._secret, f"{name}:{expires}".encode(), hashlib.sha256).hexdigest()

    def query(self, name: str, now: float | None = None) -> str:
        """The query string that opens image `name` for ttl_s seconds from now."""
        expires = int(now if now is not None else time.time()) + self.ttl_s
        return f"expires={expires}&sig={self._sig(name, expires)}"

    def check(self, name: str, expires: str | None, sig: str | None, now: float | None = None) -> ApiError | None:
        """None if (expires, sig) open `name` now, else the 401 to answer: a signature is a credential, and a
        bad one is answered as a bad key is (whether or not a key came with it: it is never ignored)."""
        if expires is None or sig is None:
            return _refused("a signed image URL needs both 'expires' and 'sig'", "invalid_signature", "sig")
        if not (expires.isascii() and expires.isdigit() and len(expires) <= 12):
            return _refused(f"expires must be a Unix time in seconds, got {expires[:40]!r}", "invalid_signature",
                            "expires")
        if not hmac.compare_digest(sig.encode(), self._sig(name, int(expires)).encode()):
            return _refused("the URL's signature is not valid for this image", "invalid_signature", "sig")
        if int(expires) < (now if now is not None else time.time()):
            return _refused("this image URL has expired; fetch the job again for a fresh one", "url_expired",
                            "expires")
        return None

    def scope_access(self, scope) -> ApiError | bool | None:
        """For the guard: None when the request is not a signed image fetch; True when its signature opens it;
        else the ApiError to answer."""
        from starlette.datastructures import QueryParams

        if scope["method"] not in ("GET", "HEAD") or not scope["path"].startswith(IMAGES_PREFIX):
            return None
        query = QueryParams(scope.get("query_string", b""))
        if "sig" not in query and "expires" not in query:
            return None
        error = self.check(scope["path"][len(IMAGES_PREFIX):], query.get("expires"), query.get("sig"))
        return True if error is None else error


def _refused(message: str, code: str, param: str) -> ApiError:
    return ApiError(401, message, code, param, headers={"WWW-Authenticate": "Bearer"})


def load_or_create_secret(data_dir: Path) -> bytes:
    """The secret kept in the data dir, created (mode 0600, atomically) on first use."""
    path = Path(data_dir) / SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{SECRET_FILE}.{os.getpid()}.part")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
            try:
                os.link(tmp, path)  # fails if another process created it meanwhile: then its secret is used
            except FileExistsError:
                pass
        finally:
            tmp.unlink(missing_ok=True)
    if path.stat().st_mode & 0o077:
        log.warning("%s is readable by other users: anyone who reads it can sign image URLs (chmod 600 it)", path)
    secret = path.read_text().strip()
    if len(secret) < 32:
        from zimage.errors import UsageError

        raise UsageError(f"{path} holds no usable secret (under 32 characters): delete it to make a new one",
                         param="url-secret")
    return secret.encode()
