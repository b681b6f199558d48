"""Speed of zimage against plain diffusers on the GPU, same weights, same run.

    python benchmarks/bench_speed.py [--model DIR] [--out DIR] [--quick]

Builds the full-size random-weight folder if missing (zimage.weights.tiny, published layout and shapes), then:
1. diffusers ZImagePipeline as the model card runs it (bf16, .to(device()), 1024x1024, 9 steps, guidance 0);
2. zimage eager and zimage compile (the default GPU mode for servers);
each: end-to-end s/image (median of 5 after warm-up, new prompt each time), phases (encode/denoise/decode),
ms per transformer forward (CUDA events), peak VRAM; then other sizes and a batch of 4 (median of 3);
then losslessness: relative L2 of final latents, zimage vs diffusers bf16, against the bound bf16 itself gives
(diffusers bf16 vs diffusers with an fp32 transformer). Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import (DEFAULT_MODEL_DIR, cuda_ms, device, ensure_full_model, environment, free_cuda, peak_gib,
                    prompt_variant, reset_peak, sync, timed, write_json)

MAIN = (1024, 1024)
SIZES = [(512, 512), (768, 768), (1280, 720), (1536, 1536)]
STEPS = 9
FLOP_PER_FORWARD_1024 = 5.5e13  # DESIGN.md: one forward at 4096 image + ~30 caption tokens
PEAK_TFLOPS = 790.0  # measured bf16 matmul rate of an H100/H200 here (KINDS.md)


def rel_l2(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def bench_diffusers(folder: Path, repeats: int, sizes: list, dtype_name: str = "bf16") -> dict:
    import torch
    from diffusers import ZImagePipeline

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    t = time.perf_counter()
    run_dtype = torch.bfloat16 if device() == "cuda" else torch.float32  # bf16 on a CPU is only slow
    pipe = ZImagePipeline.from_pretrained(str(folder), torch_dtype=run_dtype).to(device())
    if dtype_name == "fp32":
        pipe.transformer.to(torch.float32)
    load_s = time.perf_counter() - t
    pipe.set_progress_bar_config(disable=True)
    counter = iter(range(10_000))

    def run(w, h, batch=1, latent=False, seed=None):
        i = next(counter)
        gens = [torch.Generator("cpu").manual_seed(seed if seed is not None else i) for _ in range(batch)]
        return pipe([prompt_variant(i)] * batch if seed is None else [prompt_variant(0)] * batch, width=w, height=h,
                    num_inference_steps=STEPS, guidance_scale=0.0, generator=gens,
                    output_type="latent" if latent else "pil").images

    out = {"load_s": load_s}
    if dtype_name == "fp32":
        out["latents"] = run(*MAIN, latent=True, seed=0)
        return out
    reset_peak()
    med, all_s, _ = timed(lambda: run(*MAIN), repeats)
    out["main"] = {"s_per_image": med, "all_s": all_s, "peak_gib": peak_gib()}
    # phases
    out["main"]["encode_s"], _, emb = timed(lambda: pipe.encode_prompt(prompt_variant(0), device=device(),
                                                                       do_classifier_free_guidance=False), 3)
    lat = torch.randn(1, 16, MAIN[1] // 8, MAIN[0] // 8, device=device(), dtype=run_dtype)
    vae = pipe.vae
    out["main"]["decode_s"], _, _ = timed(lambda: vae.decode(lat / vae.config.scaling_factor + vae.config.shift_factor,
                                                             return_dict=False), 3)
    cap = emb[0]
    x = [torch.randn(16, 1, MAIN[1] // 8, MAIN[0] // 8, device=device(), dtype=run_dtype)]
    t_in = torch.tensor([0.5], device=device(), dtype=run_dtype)
    with torch.inference_mode():
        out["main"]["forward_ms"] = cuda_ms(lambda: pipe.transformer(x, t_in, cap, return_dict=False))
    for w, h in sizes:
        med, all_s, _ = timed(lambda: run(w, h), 3)
        out[f"{w}x{h}"] = {"s_per_image": med, "all_s": all_s}
    med, all_s, _ = timed(lambda: run(*MAIN, batch=4), 3)
    out["batch4"] = {"s_per_batch": med, "images_per_s": 4 / med, "all_s": all_s}
    out["latents"] = run(*MAIN, latent=True, seed=0)
    del pipe
    return out


def bench_zimage(folder: Path, mode: str, repeats: int, sizes: list) -> dict:
    import torch

    from zimage import Engine, GenerateRequest
    from zimage.speed.attention import attention_backend

    t = time.perf_counter()
    speed, _, extra = mode.partition("+")  # e.g. "compile+fp8": the lossy fp8 mode (--fp8) on top of compile
    engine = Engine.load(model=str(folder), speed=speed, fp8=extra == "fp8")
    load_s = time.perf_counter() - t
    counter = iter(range(10_000))

    def req(w, h, batch=1, seed=None):
        i = next(counter)
        return GenerateRequest(prompts=(prompt_variant(i if seed is None else 0),), width=w, height=h, steps=STEPS,
                               n=batch, seed=i if seed is None else seed)

    out = {"load_s": load_s, "mode": engine.speed, "attention": attention_backend(engine.transformer)}
    t = time.perf_counter()
    engine.generate(req(*MAIN))  # warm-up: compiles in compile mode
    sync()
    out["first_image_s"] = time.perf_counter() - t
    reset_peak()
    results = []
    med, all_s, _ = timed(lambda: results.append(engine.generate(req(*MAIN))), repeats, warmup=1)
    phases = {k: sorted(r.timings[k] for r in results[-repeats:])[repeats // 2] for k in ("encode", "denoise", "decode")}
    out["main"] = {"s_per_image": med, "all_s": all_s, "peak_gib": peak_gib(),
                   **{f"{k}_s": v for k, v in phases.items()}}
    r = req(*MAIN)
    cond, _ = engine.encode([r])
    with torch.inference_mode():
        ctx = engine.transformer.prepare(cond.positive, MAIN[1] // 8, MAIN[0] // 8)
        x = torch.randn(1, 16, MAIN[1] // 8, MAIN[0] // 8, device=device(), dtype=engine.dtype)
        t_in = torch.full((1,), 0.5, device=device())
        out["main"]["forward_ms"] = cuda_ms(lambda: engine.transformer(x, t_in, ctx))
    for w, h in sizes:
        t = time.perf_counter()
        engine.generate(req(w, h))
        first = time.perf_counter() - t
        med, all_s, _ = timed(lambda: engine.generate(req(w, h)), 3, warmup=0)
        out[f"{w}x{h}"] = {"s_per_image": med, "all_s": all_s, "first_s": first}
    engine.generate(req(*MAIN, batch=4))
    med, all_s, _ = timed(lambda: engine.generate(req(*MAIN, batch=4)), 3, warmup=0)
    out["batch4"] = {"s_per_batch": med, "images_per_s": 4 / med, "all_s": all_s}
    r = req(*MAIN, seed=0)
    cond, _ = engine.encode([r])
    out["latents"], _ = engine.denoise(cond, engine.noise(r.image_seeds(), r), r)
    del engine
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--modes", default="eager,compile,compile+fp8", help="zimage runs: eager, compile, MODE+fp8")
    p.add_argument("--no-sizes", action="store_true")
    p.add_argument("--no-fp32-bound", action="store_true")
    p.add_argument("--size", default="1024x1024", help="main size (smaller for a CPU smoke test)")
    args = p.parse_args()
    global MAIN
    MAIN = tuple(int(v) for v in args.size.split("x"))
    folder, build_s = ensure_full_model(args.model)
    print(f"model folder {folder} (built in {build_s:.0f}s)" if build_s else f"model folder {folder}", flush=True)
    sizes = [] if args.no_sizes else SIZES
    res = {"env": environment(), "build_s": build_s, "steps": STEPS}
    runs = {}
    runs["diffusers"] = bench_diffusers(folder, args.repeats, sizes)
    free_cuda()
    print("diffusers done", runs["diffusers"]["main"], flush=True)
    errors = {}
    for mode in args.modes.split(","):
        try:
            runs[f"zimage-{mode}"] = bench_zimage(folder, mode, args.repeats, sizes)
            print(mode, "done", runs[f"zimage-{mode}"]["main"], flush=True)
        except Exception as e:  # record and go on: one failing mode must not lose the others' figures
            import traceback

            traceback.print_exc()
            errors[mode] = repr(e)
        free_cuda()
    res["errors"] = errors
    ref = runs["diffusers"].pop("latents")
    lossless = {name: rel_l2(r.pop("latents"), ref) for name, r in runs.items() if name != "diffusers"}
    if not args.no_fp32_bound:
        fp32 = bench_diffusers(folder, 1, [], "fp32")
        lossless["bound: diffusers bf16 vs fp32 transformer"] = rel_l2(ref, fp32["latents"])
        free_cuda()
    res["runs"] = runs
    res["lossless_rel_l2_vs_diffusers_bf16"] = lossless
    base = runs["diffusers"]["main"]["s_per_image"]
    floor = STEPS * FLOP_PER_FORWARD_1024 / (PEAK_TFLOPS * 1e12)
    res["floor_s"] = floor
    print(f"\n{res['env']['device']}  1024x1024, {STEPS} steps, bf16  (floor {floor:.3f}s)")
    print(f"{'run':<18}{'s/img':>8}{'x diff':>8}{'enc':>7}{'denoise':>9}{'dec':>7}{'fwd ms':>8}{'peak GiB':>9}{'floor%':>8}")
    for name, r in runs.items():
        m = r["main"]
        print(f"{name:<18}{m['s_per_image']:>8.3f}{m['s_per_image'] / base:>8.2f}{m['encode_s']:>7.3f}"
              f"{m.get('denoise_s', float('nan')):>9.3f}{m['decode_s']:>7.3f}{m['forward_ms']:>8.1f}"
              f"{m['peak_gib']:>9.1f}{100 * floor / m['s_per_image']:>7.0f}%")
    for key in [f"{w}x{h}" for w, h in sizes] + ["batch4"]:
        print(key, {n: round(r[key].get("s_per_image", r[key].get("s_per_batch", 0)), 3) for n, r in runs.items()})
    print("lossless (rel L2 of latents vs diffusers bf16):", lossless)
    print("wrote", write_json("speed", res, args.out))


if __name__ == "__main__":
    main()
