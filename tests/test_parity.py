"""Parity with the reference: the engine's latents and pixels equal diffusers' ZImagePipeline on the same tiny fp32
weights and seeds (image i from torch.Generator("cpu").manual_seed(seed + i)), within 1e-4."""

from __future__ import annotations

import pytest
import torch

from zimage.recipe import TURBO
from zimage.request import GenerateRequest

TOL = 1e-4
STEPS = 3


def _generators(seed: int, count: int) -> list:
    return [torch.Generator("cpu").manual_seed(seed + i) for i in range(count)]


def _reference(pipe, req: GenerateRequest, output_type: str):
    req = req.with_recipe(TURBO)  # steps and guidance left unset: the Turbo recipe's, as the engine fills them in
    prompts = list(req.prompts)
    kwargs = dict(
        prompt=prompts if len(prompts) > 1 else prompts[0],
        width=req.width, height=req.height, num_inference_steps=req.steps, guidance_scale=req.guidance,
        num_images_per_prompt=req.n, generator=_generators(req.seed, req.num_images), output_type=output_type,
    )
    if req.cfg:
        kwargs["negative_prompt"] = [req.negative_prompt] * len(prompts) if len(prompts) > 1 else req.negative_prompt
    with torch.no_grad():
        return pipe(**kwargs).images


def _engine_latents(engine, req: GenerateRequest):
    req = req.with_recipe(engine.recipe)
    cond, warnings = engine.encode([req])
    assert warnings == []
    latents, index = engine.denoise(cond, engine.noise(req.image_seeds(), req), req)
    assert index == list(range(req.num_images))
    return latents


CASES = {
    "one prompt": GenerateRequest(prompts=("a red fox in the snow",), width=256, height=256, steps=STEPS, seed=42),
    "cfg with negative prompt": GenerateRequest(
        prompts=("portrait of an old man, oil painting",), negative_prompt="blurry, dark", guidance=4.0,
        width=256, height=256, steps=STEPS, seed=7,
    ),
    "batch of different-length prompts, n=2": GenerateRequest(
        prompts=("cat", "a golden castle on a mountain at sunset, cinematic, detailed, 4k, film grain"),
        n=2, width=256, height=256, steps=STEPS, seed=100,
    ),
    "non-square 256x384": GenerateRequest(prompts=("a boat on the river",), width=256, height=384, steps=STEPS, seed=3),
}


@pytest.mark.parametrize("name", list(CASES))
def test_latents_and_pixels_match_reference(engine, reference_pipeline, name):
    req = CASES[name]
    latents = _engine_latents(engine, req)
    ref_latents = _reference(reference_pipeline, req, "latent")
    assert latents.shape == ref_latents.shape == (req.num_images, 16, req.height // 8, req.width // 8)
    assert latents.abs().max() > 0.5  # not trivially zero
    assert (latents - ref_latents).abs().max().item() <= TOL

    pixels = engine.decode(latents)
    ref_pixels = _reference(reference_pipeline, req, "pt")  # float [0, 1], before uint8
    assert pixels.shape == ref_pixels.shape == (req.num_images, 3, req.height, req.width)
    assert pixels.std() > 0.01  # an image, not a constant
    assert (pixels - ref_pixels).abs().max().item() <= TOL


def test_batch_images_differ_from_each_other(engine):
    """Different seeds and prompts really give different latents (so the parity above is not vacuous)."""
    req = CASES["batch of different-length prompts, n=2"]
    latents = _engine_latents(engine, req)
    for i in range(4):
        for j in range(i + 1, 4):
            assert (latents[i] - latents[j]).abs().max() > 0.1


def test_generate_pixels_match_reference_uint8(engine, reference_pipeline):
    """The whole of engine.generate (PIL output) equals the reference's PIL output to within one level of 255."""
    import numpy as np

    req = CASES["one prompt"]
    ours = np.asarray(engine.generate(req).images[0].image, dtype=np.int16)
    ref = np.asarray(_reference(reference_pipeline, req, "pil")[0], dtype=np.int16)
    assert ours.shape == ref.shape == (256, 256, 3)
    assert np.abs(ours - ref).max() <= 1


def test_seeds_are_seed_plus_i():
    req = GenerateRequest(prompts=("a", "b"), n=3, seed=10, width=256, height=256)
    assert req.image_seeds() == [10, 11, 12, 13, 14, 15]
    assert req.image_prompts() == ["a", "a", "a", "b", "b", "b"]
    one = req.single(4)
    assert one.prompts == ("b",) and one.seed == 14 and one.n == 1


def test_same_seed_same_image_alone_and_in_batch(engine):
    """Image i of a batch equals the same (prompt, seed+i) generated alone.

    The batch runs through the same kernels with other rows beside it; with per-image captions of different lengths
    the transformer pads captions to the longest in the batch and masks the padding, so results can differ only by
    float rounding. Bound: 1e-5 max abs on latents of magnitude ~5 (a few float32 ulps after 3 steps) and exactly
    equal noise. Any real mix-up (wrong seed, wrong caption, wrong row) changes latents by > 0.1 (see the test above).
    """
    from zimage.engine.sampling import initial_noise

    batch = GenerateRequest(prompts=("cat", "a dog in a garden, watercolor"), n=2, width=256, height=256,
                            steps=STEPS, seed=500)
    batched = _engine_latents(engine, batch)
    for i in range(batch.num_images):
        alone = batch.single(i)
        assert alone.seed == 500 + i
        # The noise is exactly the same whatever the batch.
        assert torch.equal(initial_noise([alone.seed], 16, 256, 256, "cpu"),
                           initial_noise(batch.image_seeds(), 16, 256, 256, "cpu")[i:i + 1])
        single = _engine_latents(engine, alone)
        assert (single[0] - batched[i]).abs().max().item() <= 1e-5


def test_generate_images_equal_across_batch_sizes(engine):
    """Through engine.generate (uint8 PNG pixels), image 1 of a batch == the same seed alone."""
    import numpy as np

    batch = GenerateRequest(prompts=("a tower",), n=3, width=256, height=256, steps=2, seed=77)
    images = engine.generate(batch).images
    alone = engine.generate(batch.single(1)).images[0]
    assert [im.metadata.seed for im in images] == [77, 78, 79]
    assert alone.metadata.seed == 78
    diff = np.abs(np.asarray(images[1].image, dtype=np.int16) - np.asarray(alone.image, dtype=np.int16))
    assert diff.max() <= 1
    assert np.abs(np.asarray(images[0].image, dtype=np.int16) - np.asarray(images[1].image, dtype=np.int16)).max() > 5


def test_the_default_is_the_official_8_forward_recipe_and_matches_the_reference(engine, reference_pipeline):
    """No steps given: the tiny model (a Turbo stand-in) runs its recipe's 8 forwards, as diffusers does with
    num_inference_steps=8."""
    req = GenerateRequest(prompts=("a red fox in the snow",), width=256, height=256, seed=42)
    assert engine.recipe is TURBO and req.with_recipe(engine.recipe).steps == 8
    result = engine.generate(req)
    assert result.request.steps == 8 and result.images[0].metadata.steps == 8
    latents = _engine_latents(engine, req)
    ref = _reference(reference_pipeline, req.with_recipe(TURBO), "latent")
    assert (latents - ref).abs().max().item() <= TOL


def test_the_8_step_schedule_is_the_first_8_sigmas_of_the_old_9_step_one(tiny_folder):
    """diffusers >= 0.39 draws linspace(1, 1/N, N) then shifts; the model card's old 9 steps were linspace(1, 0, 9),
    whose last step (to sigma 0 from 0) was redundant: the same 8 sigmas, one forward fewer."""
    from zimage.engine.sampling import FlowMatchConfig, make_schedule

    config = FlowMatchConfig.from_file(tiny_folder / "scheduler" / "scheduler_config.json")
    new = make_schedule(config, 8, "cpu").sigmas
    old = torch.linspace(1.0, 0.0, 9)
    old = (config.shift * old / (1 + (config.shift - 1) * old)).tolist()
    assert len(new) == 9 and new[-1] == 0.0
    assert max(abs(a - b) for a, b in zip(new[:8], old[:8])) <= 1e-6
