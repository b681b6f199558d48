"""Image inputs on the server, happy paths: POST /v1/images/edits (OpenAI's multipart, with the official client),
POST /v1/jobs with base64 pictures, a restart with an image job queued, batching of edits. The tiny model, 256x256,
2 steps; every served image is compared with the same request run directly on the engine."""

import base64
import hashlib
import io
import threading

import numpy as np
import pytest
from PIL import Image

from tests.server.pictures import SIZE, alpha_mask, bw_mask, picture, pixels
from zimage.request import GenerateRequest

STEPS = 2


def direct(engine, tmp_path, image: bytes, mask: bytes | None = None, prompt="a red fox", seed=1, **kw):
    """The same request straight on the engine (files on disk, as the CLI would give them): its pixels."""
    (tmp_path / "in.png").write_bytes(image)
    if mask is not None:
        (tmp_path / "mask.png").write_bytes(mask)
    req = GenerateRequest(prompts=(prompt,), image=tmp_path / "in.png",
                          mask=tmp_path / "mask.png" if mask is not None else None, steps=STEPS, guidance=0.0,
                          seed=seed, **kw)
    return np.asarray(engine.generate(req).images[0].image, dtype=np.int16)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_openai_client_edit_with_alpha_mask(make_live, engine, tmp_path):
    """client.images.edit as OpenAI documents it, unchanged: an image file, an alpha-PNG mask (transparent =
    edit); the extensions through extra_body. The image equals the engine's with the white = repaint mask."""
    import openai

    server = make_live()
    (tmp_path / "photo.png").write_bytes(picture())
    (tmp_path / "alpha.png").write_bytes(alpha_mask())
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    with open(tmp_path / "photo.png", "rb") as image, open(tmp_path / "alpha.png", "rb") as mask:
        result = client.images.edit(image=image, mask=mask, prompt="a red fox", n=1, size=f"{SIZE}x{SIZE}",
                                    response_format="b64_json",
                                    extra_body={"seed": 1, "num_inference_steps": STEPS, "strength": 0.8})
    assert len(result.data) == 1 and result.size == f"{SIZE}x{SIZE}"
    served = pixels(base64.b64decode(result.data[0].b64_json))
    want = direct(engine, tmp_path, picture(), bw_mask(), strength=0.8)
    assert np.array_equal(served, want)


def test_openai_client_image_list_of_one_and_url_response(make_live, tmp_path):
    """Given a list, the client sends `image[]`: one picture is accepted. response_format url: a fetchable PNG."""
    import httpx
    import openai

    server = make_live()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    result = client.images.edit(image=[("p.png", picture(), "image/png")], prompt="a boat", response_format="url",
                                extra_body={"num_inference_steps": STEPS, "seed": 4})
    url = result.data[0].url
    img = Image.open(io.BytesIO(httpx.get(server.url + url).content))
    assert img.size == (SIZE, SIZE) and result.size == f"{SIZE}x{SIZE}"  # size auto: the picture's own


def test_edits_default_size_is_the_pictures_rounded_down(client, engine, tmp_path):
    """No size: the picture's own, rounded down to 16 by cropping (264x270 -> 256x256), as the CLI does."""
    photo = picture((264, 270), seed=3)
    r = client.post("/v1/images/edits", data={"prompt": "a red fox", "num_inference_steps": str(STEPS), "seed": "1"},
                    files={"image": ("p.png", photo, "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["size"] == "256x256" and body["data"][0]["seed"] == 1
    assert np.array_equal(pixels(base64.b64decode(body["data"][0]["b64_json"])), direct(engine, tmp_path, photo))


def test_job_with_base64_image_and_data_url_mask(client, engine, tmp_path, wait_status):
    photo, mask = picture(seed=5), bw_mask()
    r = client.post("/v1/jobs", json={"prompt": "a red fox", "num_inference_steps": STEPS, "seed": 1,
                                      "image": b64(photo), "mask": "data:image/png;base64," + b64(mask),
                                      "mask_blur": 4})
    assert r.status_code == 202, r.text
    params = r.json()["params"]
    # the job records the hashes, not the bytes
    assert params["image_sha256"] == hashlib.sha256(photo).hexdigest()
    assert params["mask_sha256"] == hashlib.sha256(mask).hexdigest()
    assert params["strength"] == 1.0 and params["size_from_image"] is True and params["mask_blur"] == 4
    stored = client.get(f"/v1/jobs/{r.json()['id']}").text
    assert b64(photo)[:64] not in stored
    job = wait_status(client, r.json()["id"])
    assert job["status"] == "succeeded", job
    served = pixels(client.get(job["images"][0]["url"]).content)
    assert np.array_equal(served, direct(engine, tmp_path, photo, mask, mask_blur=4))


def test_image_job_queued_at_a_restart_runs_after_it_with_its_picture(make_client, engine, tmp_path, wait_status):
    """The first server stops before its engine is ready, with an image job queued; the next one, on the same data
    directory, reads the picture back from the store and makes the same pixels as a direct run."""
    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return engine

    first = make_client(ready=False, loader=slow_loader)
    photo = picture(seed=7)
    job = first.post("/v1/jobs", json={"prompt": "a red fox", "num_inference_steps": STEPS, "seed": 1,
                                       "image": b64(photo), "strength": 0.7}).json()
    threading.Timer(0.3, release.set).start()  # the loader returns once the stop has begun: nothing runs
    first.__exit__(None, None, None)
    assert any(p.name.startswith("input-") for p in (tmp_path / "data" / "images").iterdir())
    second = make_client()
    done = wait_status(second, job["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 1, done
    served = pixels(second.get(done["images"][0]["url"]).content)
    assert np.array_equal(served, direct(engine, tmp_path, photo, strength=0.7))


def test_queued_edits_with_equal_settings_share_one_engine_call(make_client, gated, engine, tmp_path, wait_status):
    c = make_client(engine_=gated, max_batch=8)
    first = c.post("/v1/jobs", json={"prompt": "a lighthouse", "num_inference_steps": STEPS, "seed": 1,
                                     "size": f"{SIZE}x{SIZE}"}).json()
    assert gated.entered.acquire(timeout=30)  # the first call holds the engine; the edits queue behind it
    photos = [picture(seed=10), picture(seed=11)]
    prompts = ["a red cube", "a blue sphere"]
    jobs = [c.post("/v1/jobs", json={"prompt": p, "num_inference_steps": STEPS, "seed": 20 + i, "image": b64(ph),
                                     "strength": 0.6}).json() for i, (p, ph) in enumerate(zip(prompts, photos))]
    other = c.post("/v1/jobs", json={"prompt": "x", "num_inference_steps": STEPS, "seed": 3, "image": b64(photos[0]),
                                     "strength": 0.9}).json()  # another strength: not in their batch
    gated.gate.set()
    done = [wait_status(c, j["id"]) for j in [first, *jobs, other]]
    assert all(d["status"] == "succeeded" for d in done), done
    assert [[r.prompts[0] for r in call] for call in gated.calls] == [["a lighthouse"], prompts, ["x"]]
    # each batched image equals its solo run (float rounding aside: at most 1/255, few pixels), as for text jobs
    for p, ph, d in zip(prompts, photos, done[1:3]):
        diff = np.abs(pixels(c.get(d["images"][0]["url"]).content)
                      - direct(engine, tmp_path, ph, prompt=p, seed=d["params"]["seed"], strength=0.6))
        assert diff.max() <= 1, diff.max()
        assert (diff > 0).mean() < 0.01, (diff > 0).mean()


def test_openapi_lists_the_edits_route_as_multipart(client):
    schema = client.get("/openapi.json").json()
    op = schema["paths"]["/v1/images/edits"]["post"]
    assert "multipart/form-data" in op["requestBody"]["content"]
    assert {"400", "401", "413"} <= set(op["responses"])
    jobs = schema["components"]["schemas"]["ImageJobCreate"]["properties"]
    assert {"image", "mask", "strength", "resize", "mask_blur"} <= set(jobs)


@pytest.mark.parametrize("size,resize", [("256x256", "stretch"), ("256x256", "crop"), ("256x256", "fit")])
def test_edits_resize_modes(client, size, resize):
    r = client.post("/v1/images/edits", data={"prompt": "a fox", "size": size, "resize": resize, "seed": "1",
                                              "num_inference_steps": str(STEPS)},
                    files={"image": ("p.png", picture((320, 272)), "image/png")})
    assert r.status_code == 200, r.text
    assert r.json()["size"] == size


def test_image_job_whose_input_file_is_gone_fails_at_the_restart(make_client, engine, tmp_path, wait_status):
    """Its picture removed from the store while the server was down: that job fails, naming why; the others run."""
    release = threading.Event()

    def slow_loader():
        release.wait(30)
        return engine

    first = make_client(ready=False, loader=slow_loader)
    lost = first.post("/v1/jobs", json={"prompt": "a fox", "num_inference_steps": STEPS,
                                        "image": b64(picture(seed=8))}).json()
    text = first.post("/v1/jobs", json={"prompt": "a fox", "num_inference_steps": STEPS}).json()
    threading.Timer(0.3, release.set).start()
    first.__exit__(None, None, None)
    for p in (tmp_path / "data" / "images").glob("input-*"):
        p.unlink()
    second = make_client()
    failed = wait_status(second, lost["id"])
    assert failed["status"] == "failed" and failed["error"]["code"] == "input_unavailable", failed
    assert "no longer in the store" in failed["error"]["message"]
    assert wait_status(second, text["id"])["status"] == "succeeded"
