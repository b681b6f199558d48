"""The web page's picture inputs in a real headless Chromium on a live server: a picture uploaded, dropped or taken
from a result, a mask painted with the pointer (invert, clear, eraser), outpaint margins, and the LoRA picker.

What the page sends is read from the browser's own POST /v1/jobs bodies (decoded here with PIL) and from the job the
server stored (its params' sha256s must be those of the bytes sent)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.server import pictures
from tests.server.test_server_lora import lora_dir, lora_engine  # noqa: F401 (fixtures: a LoRA folder, its engine)
from tests.server.test_server_live import CHROMIUM, CHROMIUM_ARGS, KEY

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT = 30_000  # ms


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright  # missing Playwright: the tests fail, not skip

    assert os.path.exists(CHROMIUM), f"{CHROMIUM} not found: apt-get install chromium"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def server(make_live):
    return make_live(api_key=KEY)


class Page:
    """A page on `server` with the key given, and the bodies of the POST /v1/jobs it sent."""

    def __init__(self, browser, server):
        from playwright.sync_api import expect

        self.expect = expect
        self.server = server
        self.page = browser.new_page(viewport={"width": 1200, "height": 1600})
        self.sent = []
        self.page.on("request", self._record)
        self.page.goto(server.url + "/")
        self.page.fill("#api-key", KEY)
        self.page.dispatch_event("#api-key", "change")
        expect(self.page.locator("#status")).to_contain_text("ready", timeout=TIMEOUT)
        self.page.fill("#prompt", "a harbour at noon")
        self.page.fill("#steps", "2")
        self.page.fill("#width", "256")  # text-to-image at the smallest size (with a picture: the picture's)
        self.page.fill("#height", "256")

    def _record(self, request):
        if request.method == "POST" and request.url.endswith("/v1/jobs"):
            self.sent.append(json.loads(request.post_data))

    def upload(self, path):
        self.page.set_input_files("#image-file", str(path))
        self.expect(self.page.locator("#canvas-wrap")).to_be_visible()

    def paint(self, points, eraser=False):
        """A stroke through `points`, in picture pixels (the canvas is shown at its own size here)."""
        if eraser:
            self.page.check("#eraser")
        box = self.page.locator("#mask").bounding_box()
        (x0, y0), rest = points[0], points[1:]
        self.page.mouse.move(box["x"] + x0, box["y"] + y0)
        self.page.mouse.down()
        for x, y in rest:
            self.page.mouse.move(box["x"] + x, box["y"] + y, steps=8)
        self.page.mouse.up()
        if eraser:
            self.page.uncheck("#eraser")

    def generate(self) -> dict:
        """Click Generate; the body the page sent."""
        count = len(self.sent)
        self.page.click("#generate")
        waited_ms = 0
        while len(self.sent) == count and waited_ms < TIMEOUT:  # events are delivered while Playwright waits
            self.page.wait_for_timeout(50)
            waited_ms += 50
        assert len(self.sent) == count + 1, "the page sent no job"
        return self.sent[-1]

    def wait_result(self, count, width):
        """The gallery holds `count` images, the newest `width` pixels wide (decoded)."""
        self.page.wait_for_function(
            f"(() => {{ const i = document.querySelectorAll('#gallery img'); return i.length === {count} && "
            f"i[0].naturalWidth === {width}; }})()", timeout=TIMEOUT)

    def last_job(self) -> dict:
        return httpx.get(self.server.url + "/v1/jobs?limit=1", headers=AUTH).json()["data"][0]


@pytest.fixture
def page(browser, server):
    p = Page(browser, server)
    yield p
    p.page.close()


@pytest.fixture
def picture_file(tmp_path):
    path = tmp_path / "start.png"
    path.write_bytes(pictures.picture((256, 256)))
    return path


def decode(data_url: str) -> tuple[bytes, np.ndarray]:
    assert data_url.startswith("data:image/png;base64,")
    data = base64.b64decode(data_url.split(",", 1)[1])
    return data, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def mask_of(body) -> np.ndarray:
    """The sent mask, one channel; it must be opaque black and white (the server then reads white = repaint)."""
    data = base64.b64decode(body["mask"].split(",", 1)[1])
    img = Image.open(io.BytesIO(data))
    assert img.mode in ("RGB", "RGBA", "L") and (img.mode != "RGBA" or img.getextrema()[3] == (255, 255))
    m = np.asarray(img.convert("L"))
    assert set(np.unique(m)) <= {0, 255}
    return m


def sha256(data_url: str) -> str:
    return hashlib.sha256(base64.b64decode(data_url.split(",", 1)[1])).hexdigest()


# ------------------------------------------------------------------ tests
def test_a_painted_stroke_is_sent_as_a_white_mask_with_strength_one(page, picture_file):
    p = page.page
    page.expect(p.locator("#lora-note")).to_contain_text("without --lora-dir")  # this server takes no LoRAs
    page.upload(picture_file)
    assert p.inner_text("#strength-value") == "0.60" and p.is_disabled("#width")  # the size is the picture's
    page.paint([(60, 128), (200, 128)])
    assert p.inner_text("#strength-value") == "1.00" and "1.0" in p.inner_text("#strength-note")
    body = page.generate()
    page.wait_result(1, 256)
    assert body["size"] == "auto" and body["strength"] == 1.0
    image, pixels = decode(body["image"])
    assert pixels.shape == (256, 256, 3)
    assert np.abs(pixels - pictures.pixels(picture_file.read_bytes())).max() <= 1  # the picture as uploaded
    mask = mask_of(body)
    assert mask.shape == (256, 256)
    assert mask[128, 128] == 255 and mask[128, 70] == 255 and mask[128, 190] == 255  # on the stroke (32 px brush)
    assert mask[10, 10] == 0 and mask[200, 128] == 0 and mask[128, 240] == 0  # far from it
    params = page.last_job()["params"]
    assert params["image_sha256"] == hashlib.sha256(image).hexdigest()
    assert params["mask_sha256"] == sha256(body["mask"]) and params["strength"] == 1.0
    assert "mask_blur" not in body and params["mask_blur"] == 0
    p.fill("#mask-blur", "6")  # a softened outline: sent with the mask, recorded by the job
    body = page.generate()
    page.wait_result(2, 256)
    assert body["mask_blur"] == 6 and page.last_job()["params"]["mask_blur"] == 6


def test_invert_clear_eraser_and_a_chosen_strength(page, picture_file):
    p = page.page
    page.upload(picture_file)
    page.paint([(60, 128), (200, 128)])
    p.click("#mask-invert")
    mask = mask_of(page.generate())
    assert mask[128, 128] == 0 and mask[10, 10] == 255 and mask[240, 240] == 255
    p.click("#mask-clear")
    body = page.generate()
    assert "mask" not in body and body["strength"] == 0.6  # nothing painted: plain img2img, its default strength
    page.paint([(40, 128), (216, 128)])
    page.paint([(30, 128), (128, 128)], eraser=True)  # the left part rubbed out (the same 32 px brush)
    mask = mask_of(page.generate())
    assert mask[128, 80] == 0 and mask[128, 180] == 255
    p.fill("#strength", "0.8")  # the user's choice is kept, mask or not
    p.dispatch_event("#strength", "input")
    page.paint([(128, 20), (128, 60)])
    assert page.generate()["strength"] == 0.8 and "your choice" in p.inner_text("#strength-note")


def test_outpaint_margins_send_a_larger_picture_whose_new_area_is_white(page, picture_file):
    p = page.page
    data = base64.b64encode(picture_file.read_bytes()).decode()
    p.evaluate("""async (b64) => {  // a file dropped on the drop zone
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "dropped.png", { type: "image/png" }));
        document.getElementById("drop-zone").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true }));
    }""", data)
    page.expect(p.locator("#canvas-wrap")).to_be_visible()
    for side, px in (("left", 32), ("right", 64), ("bottom", 16)):
        p.fill(f"#pad-{side}", str(px))
    assert "352x272" in p.inner_text("#image-info") and p.inner_text("#strength-value") == "1.00"
    body = page.generate()
    page.wait_result(1, 352)
    _, pixels = decode(body["image"])
    assert pixels.shape == (272, 352, 3) and body["strength"] == 1.0
    original = pictures.pixels(picture_file.read_bytes())
    assert np.abs(pixels[0:256, 32:288] - original).max() <= 1  # placed at the offset
    assert np.abs(pixels[100, 0:32] - original[100, 0]).max() <= 1  # the margin: the edge pixel stretched
    assert np.abs(pixels[271, 100] - original[255, 100 - 32]).max() <= 1
    mask = mask_of(body)
    assert mask.shape == (272, 352)
    assert mask[100, 10] == 255 and mask[100, 340] == 255 and mask[265, 100] == 255 and mask[265, 340] == 255
    assert mask[100, 100] == 0 and mask[0, 32] == 0 and mask[255, 287] == 0  # the original area is kept
    # too wide for the model: the server's message is shown
    p.fill("#pad-right", "2000")
    assert "Too large" in p.inner_text("#image-info")  # said before sending
    page.generate()
    page.expect(p.locator("#form-error")).to_contain_text("2048", timeout=TIMEOUT)


def test_use_this_result_starts_the_next_image_from_it(page):
    p = page.page
    p.fill("#width", "320")
    p.fill("#height", "256")
    body = page.generate()
    assert "image" not in body and body["size"] == "320x256"
    page.wait_result(1, 320)
    png = httpx.get(page.server.url + page.last_job()["images"][0]["url"], headers=AUTH).content
    p.click("#gallery .use-image")
    page.expect(p.locator("#canvas-wrap")).to_be_visible()
    body = page.generate()
    _, pixels = decode(body["image"])
    assert pixels.shape == (256, 320, 3) and "mask" not in body and body["size"] == "auto"
    assert np.abs(pixels - pictures.pixels(png)).max() <= 1  # the generated image itself
    p.click("#image-remove")  # back to text-to-image: the size inputs count again
    assert "image" not in page.generate()


def test_the_lora_picker_sends_the_chosen_loras_and_scales(browser, make_live, lora_engine):  # noqa: F811
    server = make_live(engine_=lora_engine, api_key=KEY)
    page = Page(browser, server)
    p = page.page
    try:
        page.expect(p.locator(".lora-add[data-lora='a']")).to_be_enabled(timeout=TIMEOUT)
        broken = p.locator(".lora-add[data-lora='broken']")
        assert broken.is_disabled() and broken.get_attribute("title")  # the read error, as a tooltip
        p.click(".lora-add[data-lora='a']")
        p.click(".lora-add[data-lora='b']")
        assert p.is_disabled(".lora-add[data-lora='a']")  # added once at most
        p.click(".lora-row[data-lora='b'] .lora-remove")
        assert p.is_enabled(".lora-add[data-lora='b']")
        assert p.input_value(".lora-row[data-lora='a'] .lora-range") == "1"
        p.fill(".lora-row[data-lora='a'] .lora-scale", "0.7")
        assert p.input_value(".lora-row[data-lora='a'] .lora-range") == "0.7"
        body = page.generate()
        assert body["loras"] == [{"name": "a", "scale": 0.7}]
        page.wait_result(1, 256)
        assert page.last_job()["params"]["loras"] == [{"name": "a", "scale": 0.7}]
        assert "LoRAs a:0.7" in p.inner_text("#gallery figcaption .params")
    finally:
        p.close()
