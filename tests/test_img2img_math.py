"""zimage.engine.img2img against diffusers' ZImageImg2ImgPipeline / ZImageInpaintPipeline (0.42.1): the schedule cut
by strength, the draws and the noised start, the latent mask, and end to end a parity harness that runs img2img and
inpainting from zimage's own modules only (weights loading, text encoder, transformer, VAE encoder and decoder,
sampling.euler_step and the functions under test) on the tiny model and compares latents and pixels with the
reference pipelines on the same folder, fp32 on the CPU.

The same initial noise: both sides get only seeds. The reference is called with
`generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(B)]` and (for B > 1) the picture repeated
per image; zimage seeds one CPU generator per image with seed + i and takes from it first the VAE latent sample,
then the noise (zimage.engine.img2img's module docstring), as the reference's prepare_latents does; the picture
tensor has the reference's memory layout too (image_to_tensor: convolutions round by layout).
Measured (CPU, torch 2.13, diffusers 0.42.1, 256x256, 4 steps): img2img at 0.3 / 0.6 / 1.0 and inpainting at
1.0 / 0.6 differ from the reference by <= 7.2e-7 in latents and <= 5.0e-6 in pixels; the kept area's latents equal
the picture's sampled latents exactly.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from zimage.engine.img2img import (
    check_strength, draw_noise, encode_image_latents, image_generators, img2img_schedule, inpaint_blend,
    latent_mask, noised_start, prepare_start, start_index,
)
from zimage.engine.sampling import FlowMatchConfig, cfg_combine, euler_step
from zimage.errors import UsageError
from zimage.io.input_image import image_to_tensor, mask_to_tensor, prepare_inputs

TOL = 1e-4
STEPS = 4  # strengths 0.3 / 0.6 / 1.0 -> 2 / 3 / 4 forwards


def picture(width: int = 256, height: int = 256) -> Image.Image:
    """A smooth picture with edges (gradients, a disc, a bar): something a VAE encodes like a photo."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 255 * x / width
    g = 255 * y / height
    b = np.where((x - width * 0.6) ** 2 + (y - height * 0.4) ** 2 < (min(width, height) * 0.2) ** 2, 230.0, 40.0)
    arr = np.stack([r, g, b], axis=-1)
    arr[int(height * 0.7):int(height * 0.8), :] = (250, 250, 20)
    return Image.fromarray(arr.astype(np.uint8))


def paint_mask(width: int = 256, height: int = 256) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, width // 4 + 100, height // 4 + 80))
    return mask


# ---------------------------------------------------------------- the reference


def reference_scheduler(folder):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(str(folder / "scheduler"))


def reference_timesteps(folder, steps: int, strength: float, image_seq_len: int = 256):
    """The pipeline's own code path: retrieve_timesteps with its default sigmas and mu, then get_timesteps."""
    from diffusers.pipelines.z_image.pipeline_z_image_img2img import (
        ZImageImg2ImgPipeline, calculate_shift, get_default_z_image_sigmas, retrieve_timesteps,
    )

    scheduler = reference_scheduler(folder)
    cfg = scheduler.config
    mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    retrieve_timesteps(scheduler, steps, "cpu", sigmas=get_default_z_image_sigmas(steps), mu=mu)
    timesteps, n = ZImageImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
    return scheduler, timesteps, n


def reference_timesteps_for(pipe, steps, strength):
    """retrieve_timesteps + get_timesteps on `pipe`'s own scheduler (sets its begin index, as a call does)."""
    from diffusers.pipelines.z_image.pipeline_z_image_img2img import get_default_z_image_sigmas, retrieve_timesteps

    # mu only matters with dynamic shifting, which Z-Image's scheduler config turns off
    retrieve_timesteps(pipe.scheduler, steps, "cpu", sigmas=get_default_z_image_sigmas(steps), mu=0.5)
    timesteps, n = pipe.get_timesteps(steps, strength, "cpu")
    return pipe.scheduler, timesteps, n


@pytest.fixture(scope="module")
def pipelines(reference_pipeline):
    """diffusers' img2img and inpaint pipelines on the session's reference components, each with its own scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageImg2ImgPipeline, ZImageInpaintPipeline

    parts = {k: v for k, v in reference_pipeline.components.items() if k != "scheduler"}
    out = {}
    for name, cls in (("img2img", ZImageImg2ImgPipeline), ("inpaint", ZImageInpaintPipeline)):
        pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler.from_config(reference_pipeline.scheduler.config), **parts)
        pipe.set_progress_bar_config(disable=True)
        out[name] = pipe
    return SimpleNamespace(**out)


# ---------------------------------------------------------------- zimage's side, from its own modules


@pytest.fixture(scope="module")
def ours(tiny_folder):
    """zimage's networks loaded from the tiny folder as the runtime loads them (check, meta build, strict load)."""
    from zimage.engine.text import PromptEncoder
    from zimage.models.tokenizer import PromptTokenizer
    from zimage.weights.check import check_model_folder, check_network
    from zimage.weights.load import load_network

    checked = check_model_folder(tiny_folder)
    load = lambda c: load_network(c, "cpu", torch.float32)  # noqa: E731
    tokenizer = PromptTokenizer.from_folder(tiny_folder / "tokenizer")
    return SimpleNamespace(
        prompts=PromptEncoder(tokenizer, load(checked["text_encoder"]), "cpu"),
        transformer=load(checked["transformer"]),
        decoder=load(checked["vae"]),
        encoder=load(check_network(tiny_folder, "vae_encoder")),
        scheduler=FlowMatchConfig.from_file(tiny_folder / "scheduler" / "scheduler_config.json"),
    )


@pytest.fixture(scope="module")
def image_engine(tiny_folder):
    """An fp32 CPU engine of its own: the first image input loads the VAE encoder and re-plans it."""
    from zimage.engine.engine import Engine

    return Engine.load(model=str(tiny_folder), device="cpu", dtype="fp32", speed="eager")


def run_zimage(engine, prompt: str, image: Image.Image, seeds: list[int], steps: int, strength: float,
               mask: Image.Image | None = None, guidance: float = 0.0, negative: str = ""):
    """img2img (mask None) or inpainting through the engine, phase by phase as Engine.generate runs them:
    -> (latents (B, 16, h, w), pixels (B, 3, H, W) [0, 1]). `seeds` are consecutive (image i: seeds[0] + i)."""
    from zimage.engine.start import image_start
    from zimage.request import GenerateRequest

    assert seeds == list(range(seeds[0], seeds[0] + len(seeds)))
    req = GenerateRequest(prompts=(prompt,), negative_prompt=negative, steps=steps, guidance=guidance, n=len(seeds),
                          seed=seeds[0], image=image, mask=mask, strength=strength)
    cond, _ = engine.encode([req])
    start = image_start(engine.image_encoder(), [req], engine.scheduler, engine.device, engine.policy.plan.tiled_decode)
    latents, index = engine.denoise(cond, start.latents, req, start=start.step, blend=start.blend)
    assert index == list(range(len(seeds)))
    return latents, engine.decode(latents)


def run_reference(pipe, prompt: str, image: Image.Image, seeds: list[int], steps: int, strength: float,
                  mask: Image.Image | None = None, guidance: float = 0.0, negative: str = ""):
    """The reference pipeline -> (latents, pixels [0, 1]); pixels by the pipeline's own decode and postprocess."""
    batch = len(seeds)
    kwargs = dict(
        prompt=prompt if batch == 1 else [prompt] * batch, image=image if batch == 1 else [image] * batch,
        strength=strength, num_inference_steps=steps, guidance_scale=guidance,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds], output_type="latent",
        height=image.height, width=image.width,
    )
    if guidance > 0:
        kwargs["negative_prompt"] = negative if batch == 1 else [negative] * batch
    if mask is not None:
        kwargs["mask_image"] = mask if batch == 1 else [mask] * batch
    with torch.no_grad():
        latents = pipe(**kwargs).images
        z = latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        pixels = pipe.image_processor.postprocess(pipe.vae.decode(z, return_dict=False)[0], output_type="pt")
    return latents, pixels


def _max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------- the schedule


@pytest.mark.parametrize("steps", [3, 4, 8, 9, 50])
@pytest.mark.parametrize("strength", [0.05, 0.3, 0.5, 0.6, 0.99, 1.0])
def test_schedule_equals_reference(tiny_folder, steps, strength):
    config = FlowMatchConfig.from_file(tiny_folder / "scheduler" / "scheduler_config.json")
    schedule, start = img2img_schedule(config, steps, strength, "cpu")
    scheduler, timesteps, n = reference_timesteps(tiny_folder, steps, strength)
    assert schedule.steps - start == n >= 1  # forwards that run
    assert scheduler.begin_index == start
    # the model's time input at every step that runs, and the sigmas the Euler steps use
    assert torch.equal(schedule.timesteps[start:], (1000 - timesteps) / 1000)
    assert schedule.sigmas[start:] == scheduler.sigmas[start:].tolist()


def test_start_index_examples():
    assert [start_index(9, s) for s in (0.3, 0.6, 1.0)] == [6, 3, 0]  # 3, 6 and 9 forwards
    assert [start_index(8, s) for s in (0.3, 0.6, 1.0)] == [5, 3, 0]
    assert start_index(9, 1e-6) == 8  # any strength > 0 runs one step


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), "0.5", True, None])
def test_bad_strength(tiny_folder, value):
    config = FlowMatchConfig.from_file(tiny_folder / "scheduler" / "scheduler_config.json")
    with pytest.raises(UsageError, match="strength") as info:
        img2img_schedule(config, 8, value, "cpu")
    assert info.value.param == "strength"
    assert check_strength(1) == 1.0


# ---------------------------------------------------------------- draws, start, blend


@pytest.mark.parametrize("strength", [0.3, 0.6, 1.0])
def test_noised_start_equals_scale_noise(tiny_folder, strength):
    config = FlowMatchConfig.from_file(tiny_folder / "scheduler" / "scheduler_config.json")
    schedule, start = img2img_schedule(config, STEPS, strength, "cpu")
    scheduler, timesteps, _ = reference_timesteps(tiny_folder, STEPS, strength)
    g = torch.Generator().manual_seed(0)
    z, noise = torch.randn(2, 16, 8, 6, generator=g), torch.randn(2, 16, 8, 6, generator=g)
    ref = scheduler.scale_noise(z, timesteps[:1].repeat(2), noise)
    assert torch.equal(noised_start(z, noise, schedule.sigmas[start]), ref)
    if strength == 1.0:
        assert torch.equal(ref, noise)  # sigma 1: the picture is gone from the start


def test_blend_noise_equals_reference_after_each_step(tiny_folder):
    """The inpaint loop re-noises the kept area with scale_noise after scheduler.step: the sigma it uses there is
    the next one of the cut schedule (step_index), which is what inpaint_blend is given."""
    config = FlowMatchConfig.from_file(tiny_folder / "scheduler" / "scheduler_config.json")
    schedule, start = img2img_schedule(config, STEPS, 0.6, "cpu")
    scheduler, timesteps, _ = reference_timesteps(tiny_folder, STEPS, 0.6)
    g = torch.Generator().manual_seed(1)
    z, noise, x = (torch.randn(1, 16, 8, 8, generator=g) for _ in range(3))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 3:7] = 1
    for i, t in enumerate(timesteps):
        v = torch.randn(1, 16, 8, 8, generator=g)
        ref_x = scheduler.step(v, t, x, return_dict=False)[0]
        x = euler_step(x, -v, schedule.sigmas[start + i], schedule.sigmas[start + i + 1])
        assert _max_diff(x, ref_x) <= 1e-6
        proper = z if i == len(timesteps) - 1 else scheduler.scale_noise(z, torch.tensor([timesteps[i + 1]]), noise)
        ref_x = (1 - mask) * proper + mask * ref_x
        x = inpaint_blend(x, z, noise, mask, schedule.sigmas[start + i + 1])
        assert _max_diff(x, ref_x) <= 1e-6
    assert torch.equal(x[..., mask[0, 0] == 0], z[..., mask[0, 0] == 0])  # the kept area ends as z exactly


def test_image_latents_and_draw_order_equal_prepare_latents(ours, pipelines):
    """prepare_start against the pipeline's own prepare_latents with the picture repeated per image and one
    generator per image: draw 1 samples the latent distribution, draw 2 is the noise."""
    pipe = pipelines.img2img
    seeds = [42, 43, 44]
    pixels = image_to_tensor(picture())
    schedule, start = img2img_schedule(ours.scheduler, STEPS, 0.6, "cpu")
    begin = prepare_start(ours.encoder, pixels, seeds, schedule.sigmas[start])

    _, timesteps, _ = reference_timesteps_for(pipe, STEPS, 0.6)
    with torch.no_grad():
        batch = pipe.image_processor.preprocess([picture()] * 3)  # what the pipeline makes of image=[picture] * 3
        ref = pipe.prepare_latents(batch, timesteps[:1].repeat(3), 3, 16, 256, 256,
                                   torch.float32, "cpu", [torch.Generator("cpu").manual_seed(s) for s in seeds])
    assert batch[:1].stride() == pixels.stride()  # each image is encoded with the same layout as ours
    assert _max_diff(begin.latents, ref) <= 1e-5
    # the pieces: z is the sampled, scaled latent (not the mode), the noise is each generator's second draw
    gens = image_generators(seeds)
    z = encode_image_latents(ours.encoder, pixels, gens)
    assert _max_diff(z, begin.image_latents) == 0.0
    assert torch.equal(draw_noise(gens, (16, 32, 32), "cpu"), begin.noise)
    mode = encode_image_latents(ours.encoder, pixels)
    assert mode.shape == (1, 16, 32, 32) and _max_diff(mode, z[:1]) > 1e-3
    with torch.no_grad():
        dist = pipe.vae.encode(pixels).latent_dist
        cfg = pipe.vae.config
        ref_z = (dist.sample(torch.Generator("cpu").manual_seed(42)) - cfg.shift_factor) * cfg.scaling_factor
    assert _max_diff(z[:1], ref_z) <= 1e-5
    assert (begin.noise[0] - begin.noise[1]).abs().max() > 0.5  # every image its own draws


def test_tiled_image_latents_equal_reference_with_tiling(ours, tiny_folder):
    """tiled=True equals the reference's encode with AutoencoderKL tiling on (the tiny VAE's 32-pixel tiles: a
    256x256 picture is 11x11 tiles), sampled with the same generator."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(tiny_folder / "vae")).eval()
    vae.enable_tiling()
    pixels = image_to_tensor(picture())
    with torch.no_grad():
        sample = vae.encode(pixels).latent_dist.sample(torch.Generator("cpu").manual_seed(5))
    ref = (sample - vae.config.shift_factor) * vae.config.scaling_factor
    tiled = encode_image_latents(ours.encoder, pixels, image_generators([5]), tiled=True)
    assert _max_diff(tiled, ref) <= 1e-5
    assert _max_diff(tiled, encode_image_latents(ours.encoder, pixels, image_generators([5]))) > 1e-2


def test_latent_mask_equals_prepare_mask_latents(ours, pipelines):
    pipe = pipelines.inpaint
    _, m = prepare_inputs(picture(), paint_mask(), mask_blur=5)
    mask = mask_to_tensor(m.pixels)
    pixels = image_to_tensor(picture())
    with torch.no_grad():
        ref_mask, _ = pipe.prepare_mask_latents(mask, pixels * (mask < 0.5), 1, 256, 256, torch.float32, "cpu",
                                                [torch.Generator("cpu").manual_seed(0)])
    ours_mask = latent_mask(mask, (32, 32))
    assert torch.equal(ours_mask, ref_mask) and 0 < ours_mask.mean() < 1
    assert torch.equal(ours_mask[0, 0], mask[0, 0, ::8, ::8])  # nearest = the top-left pixel of each 8x8 cell


# ---------------------------------------------------------------- end to end


@pytest.mark.parametrize("strength", [0.3, 0.6, 1.0])
def test_img2img_parity(image_engine, pipelines, strength):
    image = picture()
    latents, pixels = run_zimage(image_engine, "a red fox in the snow", image, [42], STEPS, strength)
    ref_latents, ref_pixels = run_reference(pipelines.img2img, "a red fox in the snow", image, [42], STEPS, strength)
    assert latents.shape == ref_latents.shape == (1, 16, 32, 32) and latents.abs().max() > 0.5
    assert _max_diff(latents, ref_latents) <= TOL
    assert pixels.shape == ref_pixels.shape == (1, 3, 256, 256) and pixels.std() > 0.01
    assert _max_diff(pixels, ref_pixels) <= TOL


def test_img2img_parity_batch_cfg_non_square(image_engine, pipelines):
    """Two images (seeds 7, 8) of a 256x384 picture with CFG: the reference with the picture repeated per image."""
    image = picture(256, 384)
    args = ("portrait of an old man, oil painting", image, [7, 8], STEPS, 0.6)
    cfg = dict(guidance=4.0, negative="blurry, dark")
    latents, pixels = run_zimage(image_engine, *args, **cfg)
    ref_latents, ref_pixels = run_reference(pipelines.img2img, *args, **cfg)
    assert latents.shape == (2, 16, 48, 32)
    assert _max_diff(latents, ref_latents) <= TOL and _max_diff(pixels, ref_pixels) <= TOL
    assert (latents[0] - latents[1]).abs().max() > 0.1  # different seeds, different images
    alone, _ = run_zimage(image_engine, args[0], image, [8], STEPS, 0.6, **cfg)
    assert _max_diff(alone[0], latents[1]) <= 1e-5  # image 1 of the batch = seed 8 alone


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_inpaint_parity(ours, image_engine, pipelines, strength):
    image, mask = picture(), paint_mask()
    latents, pixels = run_zimage(image_engine, "a cat", image, [3], STEPS, strength, mask=mask)
    ref_latents, ref_pixels = run_reference(pipelines.inpaint, "a cat", image, [3], STEPS, strength, mask=mask)
    assert _max_diff(latents, ref_latents) <= TOL
    assert _max_diff(pixels, ref_pixels) <= TOL
    # the kept area (mask 0 on the latent grid) is the picture's latents exactly; the rest was repainted
    keep = latent_mask(mask_to_tensor(mask), (32, 32))[0, 0] == 0
    begin_z = encode_image_latents(ours.encoder, image_to_tensor(image), image_generators([3]))
    assert torch.equal(latents[..., keep], begin_z[..., keep])
    assert (latents[..., ~keep] - begin_z[..., ~keep]).abs().max() > 0.1


def test_inpaint_parity_outpaint(image_engine, pipelines):
    """An outpainted canvas (mask built by outpaint) through the same path."""
    from zimage.io.input_image import outpaint

    canvas, built = outpaint(picture(256, 256), 0, 0, 128, 0)
    image, mask = prepare_inputs(canvas, built)
    latents, pixels = run_zimage(image_engine, "a beach", image.pixels, [11], STEPS, 1.0, mask=mask.pixels)
    ref_latents, ref_pixels = run_reference(pipelines.inpaint, "a beach", image.pixels, [11], STEPS, 1.0,
                                            mask=mask.pixels)
    assert latents.shape == (1, 16, 32, 48)
    assert _max_diff(latents, ref_latents) <= TOL and _max_diff(pixels, ref_pixels) <= TOL


def test_generate_with_an_image_equals_the_reference_and_records_the_encoder_in_the_plan(image_engine, pipelines):
    """The whole of Engine.generate (PIL output) with an input picture, against the reference's uint8 pixels."""
    from zimage.request import GenerateRequest

    image = picture()
    req = GenerateRequest(prompts=("a red fox in the snow",), steps=STEPS, seed=42, image=image, strength=0.6)
    got = np.asarray(image_engine.generate(req).images[0].image, dtype=np.int16)
    _, ref_pixels = run_reference(pipelines.img2img, "a red fox in the snow", image, [42], STEPS, 0.6)
    ref = (ref_pixels[0].permute(1, 2, 0) * 255).round().numpy().astype(np.int16)
    assert np.abs(got - ref).max() <= 1
    plan = image_engine.policy.plan
    assert plan.image_encoder and "encode_image" in dict(plan.phase_peaks) and image_engine.vae_encoder is not None
    assert "VAE encoder resident" in plan.describe()


def test_image_requests_batch_only_with_their_kind(image_engine):
    from zimage.errors import UsageError
    from zimage.request import GenerateRequest

    a = GenerateRequest(prompts=("a",), steps=2, seed=1, image=picture(), strength=0.6)
    b = GenerateRequest(prompts=("b",), steps=2, seed=2, image=picture(), strength=0.3)
    c = GenerateRequest(prompts=("c",), steps=2, seed=3, width=256, height=256)
    for other in (b, c):
        with pytest.raises(UsageError, match="batched together"):
            image_engine.generate_many([a, other])
    two = image_engine.generate_many([a, GenerateRequest(prompts=("b",), steps=2, seed=2, image=picture(),
                                                          strength=0.6)])
    alone = image_engine.generate(GenerateRequest(prompts=("b",), steps=2, seed=2, image=picture(), strength=0.6))
    x, y = (np.asarray(r.images[0].image, dtype=np.int16) for r in (two[1], alone))
    assert np.abs(x - y).max() <= 1  # each image as it would be alone
