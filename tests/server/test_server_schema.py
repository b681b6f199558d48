"""Strict types, and a schema that says what the server answers (400 with the error body, never 422; 405 with
the Allow header of the whole path)."""

import json

import pytest

BODY = {"prompt": "a strict fox", "size": "256x256", "num_inference_steps": 1}


@pytest.mark.parametrize("field,value", [
    ("n", True), ("n", "1"), ("n", 1.0), ("num_inference_steps", 55.0), ("num_inference_steps", "9"),
    ("output_compression", False), ("seed", "5"), ("seed", 1.5), ("guidance_scale", True),
    ("guidance_scale", "0"), ("prompt", 5), ("negative_prompt", ["x"]), ("size", 256),
])
@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/jobs"])
def test_types_are_strict(client, path, field, value):
    r = client.post(path, json={**BODY, field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["code"] == "invalid_value"
    assert json.dumps(value) in err["message"]  # the value given is named
    assert client.get("/v1/jobs").json()["data"] == []


def test_a_whole_number_is_still_a_number(client):
    r = client.post("/v1/jobs", json={**BODY, "guidance_scale": 0})
    assert r.status_code == 202 and r.json()["params"]["guidance"] == 0.0


def test_schema_lists_400_not_422(client):
    schema = client.get("/openapi.json").json()
    text = json.dumps(schema)
    assert '"422"' not in text and "HTTPValidationError" not in text
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for path, method in (("/v1/images/generations", "post"), ("/v1/jobs", "post"), ("/v1/jobs", "get")):
        r400 = schema["paths"][path][method]["responses"]["400"]
        assert r400["content"]["application/json"]["schema"] == error_ref, (path, method)
    for method in ("post",):
        assert "413" in schema["paths"]["/v1/jobs"][method]["responses"]
    assert client.get("/v1/jobs?limit=0").status_code == 400  # the documented 400
    assert "503" in schema["paths"]["/v1/jobs"]["post"]["responses"]
    assert set(schema["paths"]["/v1/images/{name}"]["get"]["responses"]) == {"200", "401", "404"}


@pytest.mark.parametrize("method,path,allowed", [
    ("PUT", "/v1/jobs", "GET, POST"),
    ("PATCH", "/v1/jobs/job_000000000000000000000000", "DELETE, GET"),
    ("DELETE", "/v1/images/generations", "POST"),
    ("GET", "/v1/images/generations", "POST"),  # not taken for an image name (was a 404)
    ("POST", "/health", "GET"),
])
def test_405_allow_lists_every_method_of_the_path(client, method, path, allowed):
    r = client.request(method, path)
    assert r.status_code == 405 and r.headers["allow"] == allowed
    err = r.json()["error"]
    assert err["code"] == "method_not_allowed" and allowed in err["message"]
    for ok in allowed.split(", "):  # and each method it names is served there
        assert client.request(ok, path, json=BODY).status_code != 405
