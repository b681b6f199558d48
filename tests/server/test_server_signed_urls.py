"""Image URLs: never built from the Host header; with a key, signed and expiring, served without the key."""

import os
import re
import stat
import time


KEY = "signed-url-test-key"
GOOD = {"Authorization": f"Bearer {KEY}"}
BODY = {"prompt": "a signed fox", "size": "256x256", "num_inference_steps": 1, "response_format": "url"}


def generate_url(client, headers=GOOD, **kw):
    r = client.post("/v1/images/generations", json={**BODY, **kw}, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["data"][0]["url"]


def split(url):
    m = re.fullmatch(r"/v1/images/(job_[0-9a-f]{24}-0\.png)\?expires=([0-9]+)&sig=([0-9a-f]{64})", url)
    assert m, url
    return m.groups()


def test_no_url_from_the_host_header(make_client, wait_status):
    c = make_client()
    url = generate_url(c, headers={"Host": "evil.example"})
    assert url.startswith("/v1/images/") and "evil" not in url
    job = c.post("/v1/jobs", json={k: v for k, v in BODY.items() if k != "response_format"},
                 headers={"Host": "evil.example"}).json()
    assert "evil" not in wait_status(c, job["id"])["images"][0]["url"]
    proxied = make_client(public_url="https://img.example.com/")
    assert generate_url(proxied).startswith("https://img.example.com/v1/images/job_")


def test_signed_url_opens_its_image_without_the_key(make_client):
    c = make_client(api_key=KEY)
    url = generate_url(c)
    name, expires, _ = split(url)
    assert time.time() + 3500 < int(expires) <= time.time() + 3600  # the default ttl
    r = c.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert c.get(f"/v1/images/{name}").status_code == 401  # unsigned still needs the key
    assert c.get(f"/v1/images/{name}", headers=GOOD).status_code == 200


def test_forged_expired_and_other_name_signatures_are_401(make_client):
    c = make_client(api_key=KEY)
    a, b = generate_url(c), generate_url(c, prompt="another")
    name_a, exp_a, sig_a = split(a)
    name_b, _, sig_b = split(b)
    flipped = sig_a[:-1] + ("0" if sig_a[-1] != "0" else "1")
    cases = {
        "forged": (f"/v1/images/{name_a}?expires={exp_a}&sig={flipped}", "invalid_signature"),
        "longer life": (f"/v1/images/{name_a}?expires={int(exp_a) + 1}&sig={sig_a}", "invalid_signature"),
        "other name": (f"/v1/images/{name_b}?expires={exp_a}&sig={sig_a}", "invalid_signature"),
        "no sig": (f"/v1/images/{name_a}?expires={exp_a}", "invalid_signature"),
        "no expiry": (f"/v1/images/{name_a}?sig={sig_a}", "invalid_signature"),
        "not a number": (f"/v1/images/{name_a}?expires=%C2%B9&sig={sig_a}", "invalid_signature"),
    }
    for what, (url, code) in cases.items():
        for headers in ({}, GOOD):  # a bad signature is refused even alongside a good key: it is never ignored
            r = c.get(url, headers=headers)
            assert r.status_code == 401, (what, r.text)
            err = r.json()["error"]
            assert err["code"] == code and err["type"] == "authentication_error", what
    assert name_b != name_a and sig_b != sig_a


def test_expired_signature_is_401(make_client, monkeypatch):
    import zimage.server.signing as signing

    c = make_client(api_key=KEY, url_ttl_s=60)
    url = generate_url(c)
    assert c.get(url).status_code == 200
    real = time.time
    monkeypatch.setattr(signing.time, "time", lambda: real() + 61)
    r = c.get(url)
    assert r.status_code == 401 and r.json()["error"]["code"] == "url_expired"


def test_secret_persisted_0600_and_shared_by_restarts(make_client, tmp_path):
    first = make_client(api_key=KEY)
    url = generate_url(first)
    secret = tmp_path / "data" / "url-secret"
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600 and len(secret.read_text()) == 64
    again = make_client(api_key=KEY)  # a second app on the same data dir: a restart
    assert again.get(url).status_code == 200
    other = make_client(api_key=KEY, url_secret="x" * 40)  # an explicit secret replaces the file's
    assert other.get(url).status_code == 401


def test_ttl_zero_and_no_key_give_unsigned_urls(make_client):
    assert "?" not in generate_url(make_client(api_key=KEY, url_ttl_s=0))
    assert "?" not in generate_url(make_client(), headers={})
