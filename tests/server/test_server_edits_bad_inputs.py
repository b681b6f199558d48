"""Bad image inputs, each a clear answer: the status, the server's error body (no traceback), and nothing stored
or written (no job, no file: neither an image nor an input picture)."""

import base64
import json

import httpx
import pytest

from tests.server.pictures import animated_gif, black_mask, bomb, bw_mask, picture, truncated
from tests.server.test_server_limits import head_only
from zimage.server.inputs import base64_length

KEY = "edits-bad-inputs-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
EDITS, JOBS = "/v1/images/edits", "/v1/jobs"
FIELDS = {"prompt": "a fox", "num_inference_steps": "1"}
UPLOAD_LIMIT = 600_000  # the test servers' max_upload_bytes: small, so that going over it is cheap


def edit(image=None, mask=None, image_list=(), **fields):
    files = [] if image is None else [("image", ("p.png", image, "image/png"))]
    files += [("image[]", ("p.png", data, "image/png")) for data in image_list]
    if mask is not None:
        files.append(("mask", ("m.png", mask, "image/png")))
    return {"data": {**FIELDS, **fields}, "files": files}


def job(**kw):
    return {"json": {"prompt": "a fox", "num_inference_steps": 1, **kw}}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


CASES = [
    # (what, path, request kwargs, param named by the error, words the message must contain)
    ("strength 0", EDITS, edit(picture(), strength="0"), "strength", "greater than 0"),
    ("strength 1.5", EDITS, edit(picture(), strength="1.5"), "strength", "less than or equal to 1"),
    ("strength NaN", EDITS, edit(picture(), strength="nan"), "strength", "nan"),
    ("strength text", EDITS, edit(picture(), strength="lots"), "strength", "number"),
    ("job strength 0", JOBS, job(image=b64(picture()), strength=0), "strength", "greater than 0"),
    ("job strength NaN", JOBS, {"content": json.dumps({**job(image=b64(picture()))["json"], "strength": float("nan")}),
                                "headers": {"Content-Type": "application/json"}}, "strength", "NaN"),
    ("no image", EDITS, edit(), "image", "image is required"),
    ("empty file", EDITS, edit(b""), "image", "empty"),
    ("not a picture", EDITS, edit(b"hello, this is text\n" * 10), "image", "not a picture"),
    ("truncated PNG", EDITS, edit(truncated()), "image", "truncated"),
    ("decompression bomb", EDITS, edit(bomb(30000)), "image", "too large to decode"),
    ("huge dimensions", EDITS, edit(bomb(5000)), "image", "5000x5000"),
    ("animated GIF", EDITS, edit(animated_gif()), "image", "GIF"),
    ("two images", EDITS, edit(picture(), image_list=[picture()]), "image", "one image per edit"),
    ("a text field as image", EDITS, {"data": {**FIELDS, "image": "x.png"}}, "image.0", "UploadFile"),
    ("mask of the wrong size", EDITS, edit(picture(), bw_mask((128, 128), (0, 0, 64, 64))), "mask", "128x128"),
    ("all-black mask", EDITS, edit(picture(), black_mask()), "mask", "all black"),
    ("mask without image", EDITS, edit(mask=bw_mask()), "image", "image is required"),
    ("job mask without image", JOBS, job(mask=b64(bw_mask())), "mask", "needs an input image"),
    ("job strength without image", JOBS, job(strength=0.5), "strength", "needs an input image"),
    ("job image not base64", JOBS, job(image="not base64!"), "image", "base64"),
    ("job image truncated", JOBS, job(image=b64(truncated())), "image", "truncated"),
    ("size without resize", EDITS, edit(picture(), size="512x512"), "resize", "choose resize"),
    ("bad resize", EDITS, edit(picture(), resize="squash"), "resize", "fit"),
    ("unknown field", EDITS, edit(picture(), strenght="0.5"), "strenght", "unknown field"),
    ("mask_blur too large", EDITS, edit(picture(), bw_mask(), mask_blur="500"), "mask_blur", "128"),
]


@pytest.fixture
def keyed(make_client):
    return make_client(api_key=KEY, max_upload_bytes=UPLOAD_LIMIT)


def assert_nothing_stored(client, data_dir):
    assert client.get(JOBS, headers=AUTH).json()["data"] == []
    images = data_dir / "images"
    assert not images.exists() or list(images.iterdir()) == []


@pytest.mark.parametrize("what,path,kwargs,param,words", CASES, ids=[c[0] for c in CASES])
def test_bad_image_input_is_400_naming_it(keyed, tmp_path, what, path, kwargs, param, words):
    r = keyed.post(path, headers={**AUTH, **kwargs.pop("headers", {})}, **kwargs)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param, err
    assert words.lower() in err["message"].lower(), err["message"]
    assert "Traceback" not in r.text
    assert_nothing_stored(keyed, tmp_path / "data")


def test_declared_body_over_the_upload_limit_is_413(keyed, tmp_path):
    """Edits: max_upload_bytes; a JSON job carries base64, 4/3 of it."""
    for path, big, limit in ((EDITS, edit(picture(), extra="x" * UPLOAD_LIMIT), UPLOAD_LIMIT),
                             (JOBS, job(image="A" * UPLOAD_LIMIT * 2), base64_length(UPLOAD_LIMIT))):
        r = keyed.post(path, headers=AUTH, **big)
        assert r.status_code == 413, (path, r.text)
        err = r.json()["error"]
        assert err["code"] == "body_too_large" and str(limit) in err["message"], err
    assert_nothing_stored(keyed, tmp_path / "data")


def test_pictures_over_1_mib_are_accepted_within_the_default_upload_limit(make_client):
    """The limit of the picture routes is not the 1 MiB of the others: a 1.6 MiB picture (2.2 MiB of base64)."""
    c = make_client(api_key=KEY)
    photo = picture((1024, 768))
    assert len(photo) > 1.5 * 2**20
    r = c.post(JOBS, headers=AUTH, json=job(image=b64(photo), size="256x256", resize="crop")["json"])
    assert r.status_code == 202, r.text
    r = c.post(EDITS, headers=AUTH, **edit(photo, size="256x256", resize="crop"))
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------- a live server: real sockets, chunked uploads
@pytest.fixture
def live(make_live):
    return make_live(api_key=KEY, max_upload_bytes=UPLOAD_LIMIT)


class ChunkedMultipart:
    """A multipart body sent chunked (no Content-Length): a picture part that goes on and on; counts what the
    client managed to hand over."""

    BOUNDARY = "zimage-test-boundary"
    TOTAL = 32 << 20

    def __init__(self):
        self.sent = 0

    def __iter__(self):
        head = (f"--{self.BOUNDARY}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\na fox\r\n"
                f"--{self.BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"p.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode()
        yield head
        self.sent = len(head)
        while self.sent < self.TOTAL:
            self.sent += 64 << 10
            yield b"\x00" * (64 << 10)


def test_chunked_multipart_upload_over_the_limit_is_413_and_stopped_early(live, tmp_path):
    body = ChunkedMultipart()
    r = httpx.post(live.url + EDITS, content=body, timeout=30,
                   headers={**AUTH, "Content-Type": f"multipart/form-data; boundary={body.BOUNDARY}"})
    assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "body_too_large" and str(UPLOAD_LIMIT) in err["message"]
    assert body.sent < body.TOTAL // 4, f"the client sent {body.sent} bytes: the server kept reading"
    assert httpx.get(live.url + JOBS, headers=AUTH).json()["data"] == []
    images = tmp_path / "data" / "images"
    assert not images.exists() or list(images.iterdir()) == []


def test_edit_without_the_key_is_401_before_the_body_is_read(live):
    """The head of a chunked multipart edit and no body: the 401 arrives anyway."""
    data = head_only(live, b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                           b"Content-Type: multipart/form-data; boundary=b\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 401 "), data[:200]
    assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "missing_api_key"


def test_edit_with_a_wrong_key_is_401(live):
    r = httpx.post(live.url + EDITS, headers={"Authorization": "Bearer nope"}, **edit(picture()))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
