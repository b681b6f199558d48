"""Requests uvicorn cannot parse get the server's JSON error body, not uvicorn's plain text (both of uvicorn's
HTTP implementations: httptools, what it picks when installed, and h11)."""

from __future__ import annotations

import json
import socket

import pytest

from zimage.server import protocol

MALFORMED = [b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"]


def raw(url: str, data: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    return reply


@pytest.mark.parametrize("impl", ["httptools", "h11"])
@pytest.mark.parametrize("request_bytes", MALFORMED, ids=["request line", "header"])
def test_a_request_uvicorn_cannot_parse_is_a_json_400(make_live, monkeypatch, impl, request_bytes):
    if impl == "httptools":
        pytest.importorskip("httptools")
    else:
        monkeypatch.setattr(protocol, "http_protocol", protocol._json_400_h11)  # as without httptools
        import zimage.server.launch  # noqa: F401 - imports http_protocol when it starts a server

    server = make_live()
    head, _, body = raw(server.url, request_bytes).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "malformed_http_request" and "could not be parsed" in error["message"]
