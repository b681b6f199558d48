"""Speed of zimage against diffusers on the GPU, same weights, same run.

    python benchmarks/bench_speed.py [--model DIR] [--out DIR] [--steps 8,9] [--modes ...] [--no-sizes]

Builds the full-size random-weight folder if missing (zimage.weights.tiny, published layout and shapes), then:
1. diffusers ZImagePipeline as the model card runs it (bf16, .to(device()), 1024x1024, guidance 0);
2. diffusers at its best: the same with `transformer.compile_repeated_blocks(fullgraph=True)` and cuDNN attention
   (`set_attention_backend("_native_cudnn")`), what a diffusers user gets with two lines;
3. zimage eager, compile (the default GPU mode for servers) and compile+fp8 (lossy);
each at every --steps count (N steps = N transformer forwards in both, diffusers >= 0.39 schedule: 8 is the official
Turbo recipe): end-to-end s/image (median of --repeats after warm-up, new prompt each time), phases
(encode/denoise/decode), ms per transformer forward (CUDA events), peak VRAM; then other sizes and a batch of 4
(median of 3, at the first --steps); then losslessness: relative L2 of final latents, zimage vs diffusers bf16,
against the bound bf16 itself gives (diffusers bf16 vs diffusers with an fp32 transformer). Prints a table with the
ratio of each run against both diffusers modes; writes JSON.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import (DEFAULT_MODEL_DIR, cuda_ms, device, ensure_full_model, environment, free_cuda, peak_gib,
                    prompt_variant, reset_peak, sync, timed, write_json)

MAIN = (1024, 1024)
SIZES = [(512, 512), (768, 768), (1280, 720), (1536, 1536)]
STEPS = (8, 9)  # transformer forwards per image: the official Turbo recipe, and the old default
FLOP_PER_FORWARD_1024 = 5.5e13  # one forward at 4096 image + ~30 caption tokens: 2 x 6.15e9 params x ~4.1k tokens + attention
PEAK_TFLOPS = 790.0  # bf16 matmul rate measured on the H200 these benchmarks ran on (large square GEMMs)


def rel_l2(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def bench_diffusers(folder: Path, repeats: int, sizes: list, dtype_name: str = "bf16", compiled: bool = False) -> dict:
    import torch
    from diffusers import ZImagePipeline

    t = time.perf_counter()
    run_dtype = torch.bfloat16 if device() == "cuda" else torch.float32  # bf16 on a CPU is only slow
    pipe = ZImagePipeline.from_pretrained(str(folder), torch_dtype=run_dtype).to(device())
    if dtype_name == "fp32":
        pipe.transformer.to(torch.float32)
    if compiled:
        if device() == "cuda":
            pipe.transformer.set_attention_backend("_native_cudnn")
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
    load_s = time.perf_counter() - t
    pipe.set_progress_bar_config(disable=True)
    counter = iter(range(10_000))

    def run(w, h, batch=1, latent=False, seed=None, steps=None):
        i, steps = next(counter), steps or STEPS[0]
        gens = [torch.Generator("cpu").manual_seed(seed if seed is not None else i) for _ in range(batch)]
        return pipe([prompt_variant(i)] * batch if seed is None else [prompt_variant(0)] * batch, width=w, height=h,
                    num_inference_steps=steps, guidance_scale=0.0, generator=gens,
                    output_type="latent" if latent else "pil").images

    out = {"load_s": load_s}
    if dtype_name == "fp32":
        out["latents"] = run(*MAIN, latent=True, seed=0)
        return out
    t = time.perf_counter()
    run(*MAIN)  # warm-up (compiles in compiled mode)
    sync()
    out["first_image_s"] = time.perf_counter() - t
    reset_peak()
    for steps in STEPS:
        med, all_s, _ = timed(lambda: run(*MAIN, steps=steps), repeats)
        out[f"main_{steps}"] = {"s_per_image": med, "all_s": all_s, "peak_gib": peak_gib()}
    out["main"] = out[f"main_{STEPS[0]}"]
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
    if not compiled:  # compiled, each new size or batch would first compile: measured for zimage only
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

    def req(w, h, batch=1, seed=None, steps=None):
        i, steps = next(counter), steps or STEPS[0]
        return GenerateRequest(prompts=(prompt_variant(i if seed is None else 0),), width=w, height=h, steps=steps,
                               n=batch, seed=i if seed is None else seed)

    out = {"load_s": load_s, "mode": engine.speed, "attention": attention_backend(engine.transformer)}
    t = time.perf_counter()
    engine.generate(req(*MAIN))  # warm-up: compiles in compile mode
    sync()
    out["first_image_s"] = time.perf_counter() - t
    reset_peak()
    for steps in STEPS:
        results = []
        med, all_s, _ = timed(lambda: results.append(engine.generate(req(*MAIN, steps=steps))), repeats, warmup=1)
        phases = {k: sorted(r.timings[k] for r in results[-repeats:])[repeats // 2]
                  for k in ("encode", "denoise", "decode")}
        out[f"main_{steps}"] = {"s_per_image": med, "all_s": all_s, "peak_gib": peak_gib(),
                                **{f"{k}_s": v for k, v in phases.items()}}
    out["main"] = dict(out[f"main_{STEPS[0]}"])
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
    global MAIN, STEPS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", default=",".join(map(str, STEPS)), help="forwards per image, each measured (8,9)")
    p.add_argument("--diffusers", default="eager,compile", help="diffusers runs: eager, compile (+ cuDNN attention)")
    p.add_argument("--modes", default="eager,compile,compile+fp8", help="zimage runs: eager, compile, MODE+fp8")
    p.add_argument("--no-sizes", action="store_true")
    p.add_argument("--no-fp32-bound", action="store_true")
    p.add_argument("--size", default="1024x1024", help="main size (smaller for a CPU smoke test)")
    args = p.parse_args()
    MAIN = tuple(int(v) for v in args.size.split("x"))
    STEPS = tuple(int(v) for v in args.steps.split(","))
    folder, build_s = ensure_full_model(args.model)
    print(f"model folder {folder} (built in {build_s:.0f}s)" if build_s else f"model folder {folder}", flush=True)
    sizes = [] if args.no_sizes else SIZES
    res = {"env": environment(), "build_s": build_s, "steps": STEPS, "size": MAIN}
    runs, errors = {}, {}

    def attempt(name, fn):
        try:
            runs[name] = fn()
            print(name, "done", {k: v["s_per_image"] for k, v in runs[name].items() if k.startswith("main_")},
                  runs[name]["main"], flush=True)
        except Exception as e:  # record and go on: one failing run must not lose the others' figures
            import traceback

            traceback.print_exc()
            errors[name] = repr(e)
        free_cuda()

    bound = None
    for mode in [m for m in args.diffusers.split(",") if m]:
        attempt("diffusers" if mode == "eager" else "diffusers-compile",
                lambda: bench_diffusers(folder, args.repeats, sizes, compiled=mode == "compile"))
        if mode == "eager" and not args.no_fp32_bound:
            # before diffusers' compiled run: its cuDNN attention choice outlives the pipeline, and cuDNN has no fp32
            # kernel at these shapes
            bound = bench_diffusers(folder, 1, [], "fp32")["latents"]
            free_cuda()
        write_json("speed", {**res, "runs": {k: {x: y for x, y in v.items() if x != "latents"}
                                             for k, v in runs.items()}, "partial": True}, args.out)
    for mode in [m for m in args.modes.split(",") if m]:
        attempt(f"zimage-{mode}", lambda: bench_zimage(folder, mode, args.repeats, sizes))
        write_json("speed", {**res, "runs": {k: {x: y for x, y in v.items() if x != "latents"}
                                             for k, v in runs.items()}, "partial": True}, args.out)
    res["errors"] = errors
    # the reference: diffusers eager, else its compiled run (--diffusers compile); none without a diffusers run
    ref_name = next((b for b in ("diffusers", "diffusers-compile") if b in runs), None)
    latents = {name: r.pop("latents") for name, r in runs.items() if "latents" in r}
    ref = latents.pop(ref_name) if ref_name in latents else None
    lossless = {name: rel_l2(x, ref) for name, x in latents.items()} if ref is not None else {}
    res["lossless_reference"] = ref_name
    if bound is not None:
        lossless["bound: diffusers bf16 vs fp32 transformer"] = rel_l2(ref, bound)
    res["runs"] = runs
    res["lossless_rel_l2_vs_diffusers_bf16"] = lossless
    baselines = [b for b in ("diffusers", "diffusers-compile") if b in runs]
    res["floor_s"] = {}
    for steps in STEPS:
        floor = steps * FLOP_PER_FORWARD_1024 / (PEAK_TFLOPS * 1e12)
        res["floor_s"][steps] = floor
        print(f"\n{res['env']['device']}  {MAIN[0]}x{MAIN[1]}, {steps} forwards, bf16  (matmul floor {floor:.3f}s)")
        head = "".join(f"{'x ' + {'diffusers': 'diff', 'diffusers-compile': 'diff-c'}[b]:>10}" for b in baselines)
        print(f"{'run':<22}{'s/img':>8}{head}{'enc':>7}{'denoise':>9}{'dec':>7}{'fwd ms':>8}{'peak GiB':>9}")
        for name, r in runs.items():
            m = r[f"main_{steps}"]
            ratios = "".join(f"{m['s_per_image'] / runs[b][f'main_{steps}']['s_per_image']:>10.2f}" for b in baselines)
            print(f"{name:<22}{m['s_per_image']:>8.3f}{ratios}{r['main'].get('encode_s', float('nan')):>7.3f}"
                  f"{m.get('denoise_s', float('nan')):>9.3f}{r['main'].get('decode_s', float('nan')):>7.3f}"
                  f"{r['main'].get('forward_ms', float('nan')):>8.1f}{m['peak_gib']:>9.1f}")
    for key in [f"{w}x{h}" for w, h in sizes] + ["batch4"]:
        print(key, {n: round(r[key].get("s_per_image", r[key].get("s_per_batch", 0)), 3)
                    for n, r in runs.items() if key in r})
    print(f"lossless (rel L2 of latents vs {ref_name} bf16):", lossless)
    print("wrote", write_json("speed", res, args.out))


if __name__ == "__main__":
    main()
