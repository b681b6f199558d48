"""uvicorn's HTTP protocol with the server's JSON error body for the 400s it sends itself.

A request uvicorn cannot parse (a malformed request line or header, an invalid chunk) never reaches the app:
uvicorn answers 400 with a plain-text line. These subclasses send the same status in the body every other error
of the server has, {"error": {"message", "type", "param", "code"}}, so a client parses one shape whatever failed.
"""

from __future__ import annotations

import json

from zimage.server.errors import error_body

CODE = "malformed_http_request"


def _json_400(msg: str) -> bytes:
    return json.dumps(error_body(400, f"the HTTP request could not be parsed: {msg}", CODE)).encode()


def http_protocol():
    """The protocol class for uvicorn.Config(http=...): httptools' when it is installed (what uvicorn's "auto"
    picks), else h11's, each sending JSON 400s."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is optional: uvicorn then runs h11
        return _json_400_h11()
    return _json_400_httptools(HttpToolsProtocol)


def _json_400_httptools(base):
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE

    class Json400HttpToolsProtocol(base):
        def send_400_response(self, msg: str) -> None:  # (uvicorn's own, with a JSON body)
            body = _json_400(msg)
            content = [STATUS_LINE[400]]
            for name, value in self.server_state.default_headers:
                content.extend([name, b": ", value, b"\r\n"])
            content.extend([b"content-type: application/json\r\n",
                            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                            b"connection: close\r\n", b"\r\n", body])
            self.transport.write(b"".join(content))
            self.transport.close()

    return Json400HttpToolsProtocol


def _json_400_h11():
    import h11
    from uvicorn.protocols.http.h11_impl import STATUS_PHRASES, H11Protocol

    class Json400H11(H11Protocol):
        def send_400_response(self, msg: str) -> None:  # (uvicorn's own, with a JSON body)
            body = _json_400(msg)
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode("ascii")),
                       (b"connection", b"close")]
            self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers,
                                                             reason=STATUS_PHRASES[400])))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
            self.transport.close()

    return Json400H11
