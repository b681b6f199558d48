"""Image inputs on the GPU: zimage img2img and inpainting against diffusers' ZImageImg2ImgPipeline and
ZImageInpaintPipeline, full-size random weights, 1024x1024, same run; then zimage under 12 and 8 GiB budgets.

    python benchmarks/bench_image.py [--model DIR] [--speed eager] [--budgets 12,8] [--out DIR]

1. zimage at --speed: text-to-image, img2img at strength 0.6 (8 steps -> 5 forwards + the VAE encoder) and
   inpainting at strength 1.0 (8 forwards + the encoder + the blend): s/image (median of --repeats, new prompt each
   time), peak VRAM; for inpainting also how far the kept area of the output is from the input after the VAE's
   encode and decode (pixels, 0-255: random weights, so this measures the machinery, not a trained VAE);
2. diffusers (bf16, .to(cuda)): the same three;
3. zimage eager under each --budgets GiB (a hard per-process cap on the allocator), text-to-image and img2img.
Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import (DEFAULT_MODEL_DIR, ensure_full_model, environment, free_cuda, peak_gib, prompt_variant,
                    reset_peak, timed, write_json)

SIZE = (1024, 1024)
STEPS = 8
STRENGTH = 0.6
GIB = 2**30


def picture(w: int, h: int):
    """A synthetic photo-like picture: gradients, a disc, a bar (edges and smooth areas)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    disc = (x - w * 0.6) ** 2 + (y - h * 0.4) ** 2 < (min(w, h) * 0.2) ** 2
    arr = np.stack([255 * x / w, 255 * y / h, np.where(disc, 230.0, 40.0)], axis=-1)
    arr[int(h * 0.7):int(h * 0.8), :] = (250, 250, 20)
    return Image.fromarray(arr.astype(np.uint8))


def mask(w: int, h: int):
    from PIL import Image

    m = Image.new("L", (w, h), 0)
    m.paste(255, (w // 4, h // 4, w // 2, h // 2))
    return m


def zimage_runs(engine, repeats: int) -> dict:
    import numpy as np

    from zimage.request import GenerateRequest

    w, h = SIZE
    pic, m = picture(w, h), mask(w, h)
    counter = iter(range(10_000))
    kinds = {
        "txt2img": lambda i: GenerateRequest(prompts=(prompt_variant(i),), width=w, height=h, steps=STEPS, seed=i),
        "img2img": lambda i: GenerateRequest(prompts=(prompt_variant(i),), steps=STEPS, seed=i, image=pic,
                                             strength=STRENGTH),
        "inpaint": lambda i: GenerateRequest(prompts=(prompt_variant(i),), steps=STEPS, seed=i, image=pic, mask=m),
    }
    out = {}
    for kind, make in kinds.items():
        engine.generate(make(next(counter)))  # warm-up (loads the encoder at the first image input)
        reset_peak()
        results = []
        med, all_s, _ = timed(lambda: results.append(engine.generate(make(next(counter)))), repeats, warmup=0)
        out[kind] = {"s_per_image": med, "all_s": all_s, "peak_gib": peak_gib(),
                     "phases": {k: float(np.median([r.timings.get(k, 0.0) for r in results]))
                                for k in ("encode", "encode_image", "denoise", "decode")}}
    # the kept area against the input after the VAE's encode + decode (what inpainting can keep at best)
    import torch

    from zimage.engine.img2img import encode_image_latents
    from zimage.io.input_image import image_to_tensor

    result = engine.generate(kinds["inpaint"](0)).images[0].image
    with torch.inference_mode():
        z = encode_image_latents(engine.image_encoder(), image_to_tensor(pic))  # the mean: no sample drawn
        round_trip = (engine.decode(z)[0].permute(1, 2, 0).float().cpu().numpy() * 255).round()
    keep = np.asarray(m) < 128
    diff = np.abs(np.asarray(result, dtype=np.float32) - round_trip)[keep]
    out["inpaint"]["kept_area_vs_vae_round_trip"] = {"mean": float(diff.mean()), "p99": float(np.percentile(diff, 99)),
                                                     "max": float(diff.max())}
    out["plan"] = engine.policy.describe()
    return out


def diffusers_runs(folder: Path, repeats: int) -> dict:
    import torch
    from diffusers import ZImageImg2ImgPipeline, ZImageInpaintPipeline, ZImagePipeline

    w, h = SIZE
    pic, m = picture(w, h), mask(w, h)
    t = time.perf_counter()
    base = ZImagePipeline.from_pretrained(str(folder), torch_dtype=torch.bfloat16).to("cuda")
    out = {"load_s": time.perf_counter() - t}
    pipes = {"txt2img": base, "img2img": ZImageImg2ImgPipeline(**base.components),
             "inpaint": ZImageInpaintPipeline(**base.components)}
    extra = {"txt2img": dict(width=w, height=h), "img2img": dict(image=pic, strength=STRENGTH),
             "inpaint": dict(image=pic, mask_image=m, strength=1.0)}
    counter = iter(range(10_000))
    for kind, pipe in pipes.items():
        pipe.set_progress_bar_config(disable=True)

        def run():
            i = next(counter)
            return pipe(prompt_variant(i), num_inference_steps=STEPS, guidance_scale=0.0,
                        generator=torch.Generator("cpu").manual_seed(i), **extra[kind]).images

        run()
        reset_peak()
        med, all_s, _ = timed(run, repeats, warmup=0)
        out[kind] = {"s_per_image": med, "all_s": all_s, "peak_gib": peak_gib()}
    return out


def budget_runs(folder: Path, budget: float, repeats: int) -> dict:
    import torch

    from zimage import Engine

    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(budget * GIB / total, 1.0))
    try:
        engine = Engine.load(model=str(folder), device="cuda", speed="eager", vram_budget_gib=budget)
        out = zimage_runs(engine, repeats)
        del engine
    finally:
        free_cuda()
        torch.cuda.set_per_process_memory_fraction(1.0)
    out.pop("inpaint", None)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--speed", default="eager")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budgets", default="12,8", help="GiB budgets for zimage eager ('' for none)")
    p.add_argument("--size", default="1024x1024")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-diffusers", action="store_true")
    args = p.parse_args()
    global SIZE
    SIZE = tuple(int(v) for v in args.size.split("x"))
    folder, build_s = ensure_full_model(args.model)
    res = {"env": environment(), "size": SIZE, "steps": STEPS, "strength": STRENGTH, "speed": args.speed,
           "build_s": build_s}
    from zimage import Engine

    engine = Engine.load(model=str(folder), device=args.device, speed=args.speed)
    res["zimage"] = zimage_runs(engine, args.repeats)
    del engine
    free_cuda()
    if not args.no_diffusers:
        res["diffusers"] = diffusers_runs(folder, args.repeats)
        free_cuda()
    res["budgets"] = {b: budget_runs(folder, float(b), max(3, args.repeats - 2))
                      for b in filter(None, args.budgets.split(","))}
    z = res["zimage"]
    print(f"\n{res['env']['device']}  {SIZE[0]}x{SIZE[1]}, {STEPS} steps, img2img strength {STRENGTH}")
    print(f"{'run':<26}{'txt2img':>9}{'img2img':>9}{'inpaint':>9}{'i2i/t2i':>9}{'peak i2i':>10}")
    rows = [(f"zimage {args.speed}", z)] + ([("diffusers", res["diffusers"])] if "diffusers" in res else [])
    rows += [(f"zimage eager {b} GiB", r) for b, r in res["budgets"].items()]
    for name, r in rows:
        s = {k: r[k]["s_per_image"] if k in r else float("nan") for k in ("txt2img", "img2img", "inpaint")}
        print(f"{name:<26}{s['txt2img']:>9.3f}{s['img2img']:>9.3f}{s['inpaint']:>9.3f}"
              f"{s['img2img'] / s['txt2img']:>9.2f}{r['img2img']['peak_gib']:>10.1f}")
    if "diffusers" in res:
        d = res["diffusers"]
        print("zimage / diffusers:", {k: round(z[k]["s_per_image"] / d[k]["s_per_image"], 3)
                                      for k in ("txt2img", "img2img", "inpaint")})
    print("inpaint kept area vs the VAE round trip (0-255):", z["inpaint"]["kept_area_vs_vae_round_trip"])
    print("wrote", write_json("image", res, args.out))


if __name__ == "__main__":
    main()
