"""OpenAI's gpt-image parameters, with the real openai client against a live server: streaming with partial
images, the ones accepted and ignored, and background 'transparent' refused with the reason."""

import base64
import io

import openai
import pytest
from PIL import Image

KEY = "openai-params-key"


@pytest.fixture
def client(make_live):
    live = make_live(api_key=KEY)
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)


def test_stream_with_partial_images(client):
    stream = client.images.generate(prompt="a streamed fox", size="256x256", stream=True, partial_images=2,
                                    extra_body={"num_inference_steps": 8, "seed": 3})
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for e in events[:2]:
        assert e.output_format == "jpeg" and e.size == "256x256"
        assert Image.open(io.BytesIO(base64.b64decode(e.b64_json))).format == "JPEG"
    done = events[-1]
    im = Image.open(io.BytesIO(base64.b64decode(done.b64_json)))
    assert im.format == "PNG" and im.size == (256, 256) and '"seed": 3' in im.text["zimage"]
    assert done.output_format == "png" and done.size == "256x256"


def test_stream_without_partials_sends_each_image(client):
    events = list(client.images.generate(prompt="two", size="256x256", n=2, stream=True,
                                         extra_body={"num_inference_steps": 2}))
    assert [e.type for e in events] == ["image_generation.completed"] * 2


def test_accepted_and_ignored_parameters(client):
    r = client.images.generate(prompt="a quiet fox", size="256x256", quality="high", style="vivid",
                               moderation="low", background="opaque", output_format="webp", output_compression=30,
                               extra_body={"num_inference_steps": 1})
    assert Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).format == "WEBP"


@pytest.mark.parametrize("kwargs,param,words", [
    ({"background": "transparent"}, "background", "opaque"),
    ({"partial_images": 2}, "partial_images", "stream"),
    ({"stream": True, "response_format": "url"}, "response_format", "b64_json"),
    ({"partial_images": 4, "stream": True}, "partial_images", "3"),
    ({"quality": "ultra"}, "quality", "ultra"),
])
def test_refused_with_the_reason(client, kwargs, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.images.generate(prompt="x", size="256x256", **kwargs)
    assert e.value.body["param"] == param and words in e.value.body["message"]


def test_stream_reports_a_failed_job_as_an_error_event(make_live, gated):
    gated.fail_prompts.add("boom")
    live = make_live(engine_=gated, api_key=KEY)
    c = openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.APIError) as e:
        list(c.images.generate(prompt="boom", size="256x256", stream=True, extra_body={"num_inference_steps": 1}))
    assert "generation failed" in str(e.value)
