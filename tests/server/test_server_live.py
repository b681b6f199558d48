"""A live server (uvicorn on a free loopback port, in a thread): the official openai client, and the web page in
a real headless Chromium. The browser test fails (never skips) if Chromium or Playwright is missing."""

import base64
import io
import os
import time

import pytest
from PIL import Image

from zimage.server.launch import start_in_thread
from zimage.server.settings import ServerSettings

KEY = "live-test-key"
CHROMIUM = os.environ.get("ZIMAGE_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def live(tmp_path, engine):
    settings = ServerSettings(data_dir=tmp_path / "data", port=0, api_key=KEY, warmup_size=None,
                              default_size=(256, 256), default_steps=2)
    server = start_in_thread(settings, engine=engine)
    yield server
    server.stop()


def test_openai_client(live):
    import openai

    client = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)
    r = client.images.generate(prompt="a tiny robot", size="256x256", n=2, response_format="b64_json",
                               extra_body={"seed": 11, "num_inference_steps": 2})
    assert len(r.data) == 2 and r.created > 0
    im = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    assert im.size == (256, 256) and '"seed": 11' in im.text["zimage"]
    r = client.images.generate(prompt="a tiny robot", size="256x256", response_format="url", output_format="webp",
                               extra_body={"num_inference_steps": 1})
    url = r.data[0].url
    assert url.startswith("/v1/images/job_") and ".webp?expires=" in url  # relative and signed (the server has a key)
    import httpx

    assert httpx.get(live.url + url).headers["content-type"] == "image/webp"  # a signed URL needs no key
    assert [m.id for m in client.models.list()] == ["tiny-random"]
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="x", size="255x256")
    assert e.value.body["param"] == "size"  # the client unwraps {"error": {...}}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")


def test_sync_request_cancelled_when_client_disconnects(live):
    import httpx

    headers = {"Authorization": f"Bearer {KEY}"}
    with pytest.raises(httpx.ReadTimeout):  # client gives up long before 100 steps at 1024x1024 are done
        httpx.post(live.url + "/v1/images/generations", headers=headers, timeout=1.0,
                   json={"prompt": "slow", "size": "1024x1024", "num_inference_steps": 100, "n": 2})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job = httpx.get(live.url + "/v1/jobs?limit=1", headers=headers).json()["data"][0]
        if job["status"] == "cancelled":
            break
        time.sleep(0.1)
    assert job["status"] == "cancelled" and job["params"]["prompt"] == "slow"


@pytest.mark.slow
def test_web_page_generates_an_image(live):
    from playwright.sync_api import expect, sync_playwright  # missing Playwright: the test fails, not skips

    assert os.path.exists(CHROMIUM), f"{CHROMIUM} not found: apt-get install chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(live.url + "/")
            page.fill("#api-key", "wrong")
            page.dispatch_event("#api-key", "change")
            expect(page.locator("#form-error")).to_contain_text("API key is not valid", timeout=15_000)
            page.fill("#api-key", KEY)
            page.dispatch_event("#api-key", "change")
            expect(page.locator("#form-error")).to_have_text("", timeout=15_000)  # the stale error is cleared
            expect(page.locator("#status")).to_contain_text("ready", timeout=15_000)
            expect(page.locator("#status")).to_contain_text("tiny-random")  # from /v1/status, with the key
            # a running job shows as running (it showed "queue 0"): one held long enough to be seen
            import httpx

            slow = httpx.post(live.url + "/v1/jobs", headers={"Authorization": f"Bearer {KEY}"},
                              json={"prompt": "slow", "size": "1024x1024", "num_inference_steps": 100}).json()
            expect(page.locator("#status")).to_contain_text("1 running", timeout=15_000)
            httpx.delete(live.url + f"/v1/jobs/{slow['id']}", headers={"Authorization": f"Bearer {KEY}"})
            page.reload()
            page.fill("#prompt", "a lighthouse at dusk")
            page.fill("#width", "256")
            page.fill("#height", "256")
            page.fill("#steps", "4")
            page.click("#randomize")
            seed = page.input_value("#seed")
            assert seed.isdigit()
            page.click("#generate")
            image = page.locator("#gallery img.gallery-image").first
            expect(image).to_be_visible(timeout=30_000)
            page.wait_for_function("document.querySelector('#gallery img').naturalWidth === 256")
            caption = page.locator("#gallery figcaption .params").first.inner_text()
            assert "a lighthouse at dusk" in caption and f"seed {seed}" in caption and "256x256" in caption
            assert page.input_value("#seed") == seed
            # reuse fills the form back from the gallery
            page.fill("#prompt", "something else")
            page.click("#gallery .reuse")
            assert page.input_value("#prompt") == "a lighthouse at dusk"
            assert localstorage_key(page) == KEY
            # a value the browser lets through but the server refuses: its message is shown
            page.fill("#prompt", "   ")
            page.click("#generate")
            expect(page.locator("#form-error")).to_contain_text("prompt is empty")
        finally:
            browser.close()


def localstorage_key(page):
    return page.evaluate("localStorage.getItem('zimage.apiKey')")
