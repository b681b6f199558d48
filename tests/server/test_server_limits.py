"""The guard on a live server (uvicorn, real sockets): the key is checked before any byte of a body is read, and
a body is counted as it arrives, so neither a missing key nor a chunked upload makes the server buffer it."""

import json
import socket

import httpx
import pytest

from zimage.server.app import MAX_BODY_BYTES
KEY = "guard-test-key"
CHUNK = 64 << 10
TOTAL = 64 << 20  # 64 MiB offered; the server must stop reading long before


@pytest.fixture
def live(make_live):
    return make_live(api_key=KEY)


def head_only(server, request_head: bytes, timeout: float = 5.0) -> bytes:
    """Send a request's head and no body; the server's answer (what arrives within `timeout`)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request_head)
        data = b""
        try:
            while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            pass
    return data


def test_missing_key_is_refused_before_the_body_is_read(live):
    """A chunked POST whose body never comes: the 401 arrives anyway (before the fix the server waited for it)."""
    data = head_only(live, b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Transfer-Encoding: chunked\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 401 "), data[:200]
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "missing_api_key" and set(body["error"]) == {"message", "type", "param", "code"}


class Upload:
    """A chunked request body that counts what the client managed to hand over."""

    def __init__(self):
        self.sent = 0

    def __iter__(self):
        while self.sent < TOTAL:
            self.sent += CHUNK
            yield b"x" * CHUNK


@pytest.mark.parametrize("headers,status,code", [
    ({}, 401, "missing_api_key"),
    ({"Authorization": "Bearer wrong"}, 401, "invalid_api_key"),
    ({"Authorization": f"Bearer {KEY}"}, 413, "body_too_large"),
])
def test_chunked_upload_is_stopped_early(live, headers, status, code):
    upload = Upload()
    # generations: a 1 MiB limit (/v1/jobs takes base64 pictures: its larger limit is in test_server_edits_bad_inputs)
    r = httpx.post(live.url + "/v1/images/generations", content=upload,
                   headers={**headers, "Content-Type": "application/json"},
                   timeout=30)
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert upload.sent < TOTAL // 4, f"the client sent {upload.sent} bytes: the server kept reading"
    if status == 413:
        assert str(MAX_BODY_BYTES) in r.json()["error"]["message"]
    jobs = httpx.get(live.url + "/v1/jobs", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    assert jobs == []  # nothing reached the job store


def test_declared_length_over_the_limit_is_413_before_the_key_is_needed_or_body_read(live):
    data = head_only(live, b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 400000000\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 413 "), data[:200]


@pytest.mark.parametrize("path", ["/health", "/", "/static/app.js", "/openapi.json", "/docs"])
def test_public_paths_need_no_key(live, path):
    assert httpx.get(live.url + path).status_code == 200
