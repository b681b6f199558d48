"""Every bad HTTP input of issue 14, in one table: the status, the error body's shape, and that nothing was
stored or written (no job, no image file)."""

import pytest

KEY = "bad-inputs-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
OK = {"prompt": "a fox", "size": "256x256", "num_inference_steps": 1}
GEN, JOBS = "/v1/images/generations", "/v1/jobs"
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error"}


def body(**kw):
    return {"json": {**OK, **kw}}


CASES = [
    # (what, method, path, request kwargs, with key, status, code, param)
    ("no key", "POST", JOBS, body(), False, 401, "missing_api_key", None),
    ("wrong key", "POST", JOBS, {**body(), "headers": {"Authorization": "Bearer nope"}}, False, 401,
     "invalid_api_key", None),
    ("declared body over 1 MiB", "POST", GEN, {"content": b"x" * (2 << 20)}, True, 413, "body_too_large", None),
    ("not JSON", "POST", JOBS, {"content": b"{not json"}, True, 400, "invalid_json", None),
    ("no prompt", "POST", GEN, {"json": {"size": "256x256"}}, True, 400, "missing_required_parameter", "prompt"),
    ("empty prompt", "POST", GEN, body(prompt=""), True, 400, "invalid_value", "prompt"),
    ("blank prompt", "POST", GEN, body(prompt="   "), True, 400, "invalid_value", "prompt"),
    ("prompt too long", "POST", JOBS, body(prompt="x" * 20001), True, 400, "invalid_value", "prompt"),
    ("superscript size", "POST", GEN, body(size="\u00b2\u2075\u2076x256"), True, 400, "invalid_value", "size"),
    ("5000-digit size", "POST", JOBS, body(size="2" * 5000 + "x256"), True, 400, "invalid_value", "size"),
    ("size below the minimum", "POST", GEN, body(size="100x100"), True, 400, "invalid_value", "size"),
    ("size not by 16", "POST", GEN, body(size="250x256"), True, 400, "invalid_value", "size"),
    ("size too large", "POST", GEN, body(size="4096x4096"), True, 400, "invalid_value", "size"),
    ("size words", "POST", GEN, body(size="big"), True, 400, "invalid_value", "size"),
    ("size with a space", "POST", GEN, body(size="256x256 "), True, 400, "invalid_value", "size"),
    ("n 0", "POST", GEN, body(n=0), True, 400, "invalid_value", "n"),
    ("n 17", "POST", JOBS, body(n=17), True, 400, "invalid_value", "n"),
    ("n true", "POST", GEN, body(n=True), True, 400, "invalid_value", "n"),
    ("n '1'", "POST", JOBS, body(n="1"), True, 400, "invalid_value", "n"),
    ("steps 101", "POST", GEN, body(num_inference_steps=101), True, 400, "invalid_value", "num_inference_steps"),
    ("steps 55.0", "POST", JOBS, body(num_inference_steps=55.0), True, 400, "invalid_value",
     "num_inference_steps"),
    ("guidance -1", "POST", GEN, body(guidance_scale=-1), True, 400, "invalid_value", "guidance_scale"),
    ("guidance true", "POST", GEN, body(guidance_scale=True), True, 400, "invalid_value", "guidance_scale"),
    ("seed -1", "POST", GEN, body(seed=-1), True, 400, "invalid_value", "seed"),
    ("seed '5'", "POST", JOBS, body(seed="5"), True, 400, "invalid_value", "seed"),
    ("compression false", "POST", GEN, body(output_compression=False), True, 400, "invalid_value",
     "output_compression"),
    ("compression 101", "POST", GEN, body(output_compression=101), True, 400, "invalid_value", "output_compression"),
    ("format gif", "POST", GEN, body(output_format="gif"), True, 400, "invalid_value", "output_format"),
    ("response format blob", "POST", GEN, body(response_format="blob"), True, 400, "invalid_value",
     "response_format"),
    ("unknown field", "POST", GEN, body(sizes="256x256"), True, 400, "invalid_value", "sizes"),
    ("transparent background", "POST", GEN, body(background="transparent"), True, 400, "invalid_value",
     "background"),
    ("partial images without stream", "POST", GEN, body(partial_images=1), True, 400, "invalid_value",
     "partial_images"),
    ("partial images 4", "POST", GEN, body(partial_images=4, stream=True), True, 400, "invalid_value",
     "partial_images"),
    ("stream as url", "POST", GEN, body(stream=True, response_format="url"), True, 400, "invalid_value",
     "response_format"),
    ("quality unknown", "POST", GEN, body(quality="ultra"), True, 400, "invalid_value", "quality"),
    ("jobs only fields", "POST", JOBS, body(response_format="url"), True, 400, "invalid_value", "response_format"),
    ("limit 0", "GET", JOBS + "?limit=0", {}, True, 400, "invalid_value", "limit"),
    ("limit words", "GET", JOBS + "?limit=many", {}, True, 400, "invalid_value", "limit"),
    ("unknown job", "GET", JOBS + "/job_000000000000000000000000", {}, True, 404, "not_found", "job_id"),
    ("job id traversal", "GET", JOBS + "/..%2Fjobs.db", {}, True, 404, "not_found", None),
    ("cancel unknown job", "DELETE", JOBS + "/job_000000000000000000000000", {}, True, 404, "not_found", "job_id"),
    ("unknown image", "GET", "/v1/images/job_000000000000000000000000-0.png", {}, True, 404, "not_found", "name"),
    ("forged signature", "GET", "/v1/images/job_000000000000000000000000-0.png?expires=9999999999&sig=" + "0" * 64,
     {}, False, 401, "invalid_signature", "sig"),
    ("GET generations", "GET", GEN, {}, True, 405, "method_not_allowed", None),
    ("PUT jobs", "PUT", JOBS, body(), True, 405, "method_not_allowed", None),
    ("no such route", "GET", "/v1/nothing", {}, True, 404, "not_found", None),
]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, engine):
    from fastapi.testclient import TestClient

    from zimage.server.app import create_app
    from zimage.server.settings import ServerSettings

    data = tmp_path_factory.mktemp("bad-inputs") / "data"
    app = create_app(ServerSettings(data_dir=data, api_key=KEY, warmup_size=None, default_size=(256, 256),
                                    default_steps=1), engine=engine)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, data


@pytest.mark.parametrize("what,method,path,kwargs,with_key,status,code,param", CASES, ids=[c[0] for c in CASES])
def test_bad_input(keyed, what, method, path, kwargs, with_key, status, code, param):
    client, data = keyed
    headers = {"Content-Type": "application/json", **(AUTH if with_key else {}), **kwargs.get("headers", {})}
    r = client.request(method, path, headers=headers, **{k: v for k, v in kwargs.items() if k != "headers"})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert set(r.json()) == {"error"} and set(err) == {"message", "type", "param", "code"}
    assert err["type"] == TYPES[status] and err["code"] == code and err["param"] == param, err
    assert err["message"] and "Traceback" not in r.text
    if status == 405:
        assert r.headers["allow"]
    assert client.get(JOBS, headers=AUTH).json()["data"] == []  # nothing stored
    assert [p.name for p in (data / "images").iterdir()] == []  # nothing written
