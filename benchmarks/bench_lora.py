"""LoRA on the GPU: zimage merged and runtime (per-request slots, mixed batches) against diffusers' load_lora_weights
+ fuse_lora, full-size random weights, same run.

    python benchmarks/bench_lora.py [--model DIR] [--ranks 32,128] [--speed compile] [--out DIR]

Writes random LoRAs (diffusers layout, bf16, every linear layer of the transformer) at each --ranks, then:
1. zimage plain (no LoRA) at --speed: s/image (median of --repeats, new prompt each time), and a batch of 4;
2. zimage merged (EngineConfig.loras) at each rank: load time against the plain load, s/image (should equal plain);
3. zimage runtime slots (4 slots at the largest rank) at --speed: s/image with a set of each rank (target <= 1.08x
   plain), a batch of 4 images with 4 different LoRAs against a batch of 4 with one LoRA (target >= 0.9x images/s),
   and the switch between two sets: the time of the first image after the switch less a steady image, and whether
   dynamo compiled anything new (no recompile);
4. diffusers: from_pretrained, load_lora_weights + fuse_lora at the smallest rank: time, s/image.
5. faithfulness in bf16: the final latents of one image with the smallest-rank LoRA through the runtime slots
   (compiled: fused q/k/v and w1/w3 with their slots' parts, in the one-GEMM form of zimage.speed.lora_wide), and
   of the same image in a batch beside another set (the mixed-slot path), against the same LoRA merged (eager), as
   relative L2s, next to the bf16 noise of the same run: plain compiled against plain eager.
Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import (DEFAULT_MODEL_DIR, PROMPT, ensure_full_model, environment, free_cuda, peak_gib, prompt_variant,
                    reset_peak, sync, timed, write_json)

SIZE = (1024, 1024)
STEPS = 8
SLOTS = 4


def write_lora(model_dir: Path, rank: int, seed: int, out: Path) -> Path:
    """A random LoRA of `rank` on every linear of the model's transformer, diffusers layout, bf16, no alpha (scale 1)."""
    import torch
    from safetensors.torch import save_file

    from zimage.weights.lora import linear_shapes
    from zimage.weights.networks import build_transformer

    path = out / f"lora-r{rank}-s{seed}.safetensors"
    if path.exists():
        return path
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (o, i) in linear_shapes(build_transformer(model_dir).module).items():
        # magnitudes of a trained LoRA: updates ~1% of the weights (down ~ 1/sqrt(in), up small)
        tensors[f"transformer.{name}.lora_A.weight"] = (torch.randn(rank, i, generator=g) / i ** 0.5).to(torch.bfloat16)
        tensors[f"transformer.{name}.lora_B.weight"] = (torch.randn(o, rank, generator=g) * 1e-3).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def image_seconds(engine, repeats: int, loras=(), n: int = 1, mixed=None) -> tuple[float, list[float]]:
    """Median seconds of engine.generate_many: one request of n images with `loras`, or `mixed` (one request of
    one image per LoRA set) when given."""
    from zimage.request import GenerateRequest

    counter = iter(range(10_000))
    w, h = SIZE

    def run():
        i = next(counter)
        if mixed is not None:
            reqs = [GenerateRequest(prompts=(prompt_variant(i),), width=w, height=h, steps=STEPS, seed=k, loras=s)
                    for k, s in enumerate(mixed)]
        else:
            reqs = [GenerateRequest(prompts=(prompt_variant(i),), width=w, height=h, steps=STEPS, seed=i, n=n,
                                    loras=loras)]
        return engine.generate_many(reqs)

    med, all_s, _ = timed(run, repeats)
    return med, all_s


def final_latents(engine, loras=()):
    """The final latents (before decoding) of one fixed request, on the CPU in fp32."""
    from zimage.request import GenerateRequest

    w, h = SIZE
    req = GenerateRequest(prompts=(PROMPT,), width=w, height=h, steps=STEPS, seed=1234, loras=loras)
    cond, _ = engine.encode([req])
    slots = engine.loras.row_slots([req])
    out, _ = engine.denoise(cond, engine.noise(req.image_seeds(), req), req, lora_slots=slots)
    return out.float().cpu()


def mixed_first_latents(engine, loras, other):
    """final_latents' request run in a batch beside a request with another set (the mixed-slot path): the first
    row's final latents."""
    from zimage.request import GenerateRequest

    w, h = SIZE
    req = GenerateRequest(prompts=(PROMPT,), width=w, height=h, steps=STEPS, seed=1234, loras=loras)
    beside = GenerateRequest(prompts=(PROMPT + ", at night",), width=w, height=h, steps=STEPS, seed=99, loras=other)
    cond, _ = engine.encode([req, beside])
    slots = engine.loras.row_slots([req, beside])
    noise = engine.noise(req.image_seeds() + beside.image_seeds(), req)
    out, _ = engine.denoise(cond, noise, req, lora_slots=slots)
    return out[:1].float().cpu()


def rel_l2(a, b) -> float:
    return float((a - b).norm() / b.norm())


def compiles() -> int:
    """Graphs dynamo has compiled in this process so far (a change of LoRA set must add none)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return 0
    return int(counters["stats"]["unique_graphs"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--loras", type=Path, default=Path("/tmp/zimage-bench-loras"))
    p.add_argument("--ranks", default="32,128")
    p.add_argument("--speed", default="compile", help="speed mode of the plain and runtime engines")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--size", default="1024x1024")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-diffusers", action="store_true")
    p.add_argument("--no-merged", action="store_true", help="skip the merged runs (a runtime-slot-only rerun)")
    args = p.parse_args()
    global SIZE
    SIZE = tuple(int(v) for v in args.size.split("x"))
    folder, build_s = ensure_full_model(args.model)
    ranks = [int(r) for r in args.ranks.split(",")]
    t = time.perf_counter()
    files = {r: [write_lora(folder, r, s, args.loras) for s in range(SLOTS)] for r in ranks}
    res = {"env": environment(), "size": SIZE, "steps": STEPS, "ranks": ranks, "speed": args.speed,
           "lora_write_s": time.perf_counter() - t, "build_s": build_s}
    from zimage import Engine

    dev = dict(model=str(folder), device=args.device)
    # 1. plain
    t = time.perf_counter()
    engine = Engine.load(speed=args.speed, **dev)
    res["plain_load_s"] = time.perf_counter() - t
    image_seconds(engine, 1)  # warm-up (compiles)
    reset_peak()
    res["plain_s"], res["plain_all_s"] = image_seconds(engine, args.repeats)
    res["plain_batch4_s"], _ = image_seconds(engine, 3, n=4)
    res["plain_peak_gib"] = peak_gib()
    plain_compiled = final_latents(engine)
    del engine
    free_cuda()
    # 2. merged (eager: the merged weights are the plain model's shapes; compile would only add its cost)
    res["merged"] = {}
    for r in ([] if args.no_merged else ranks):
        t = time.perf_counter()
        engine = Engine.load(speed="eager", loras=(f"{files[r][0]}:0.8",), **dev)
        sync()
        load_s = time.perf_counter() - t
        image_seconds(engine, 1)
        s, all_s = image_seconds(engine, args.repeats)
        res["merged"][r] = {"load_s": load_s, "s_per_image": s, "all_s": all_s}
        del engine
        free_cuda()
    t = time.perf_counter()
    engine = Engine.load(speed="eager", **dev)
    sync()
    res["plain_eager_load_s"] = time.perf_counter() - t
    image_seconds(engine, 1)
    res["plain_eager_s"], _ = image_seconds(engine, args.repeats)
    plain_eager = final_latents(engine)
    res["bf16_noise_rel_l2"] = rel_l2(plain_compiled, plain_eager)  # compile vs eager, no LoRA
    del engine
    free_cuda()
    low_lora = (f"{files[min(ranks)][0]}:0.8",)
    engine = Engine.load(speed="eager", loras=low_lora, **dev)
    merged_latents = final_latents(engine)
    res["lora_effect_rel_l2"] = rel_l2(merged_latents, plain_eager)  # what the LoRA changes: the check is not vacuous
    del engine
    free_cuda()
    # 3. runtime slots
    top = max(ranks)
    t = time.perf_counter()
    engine = Engine.load(speed=args.speed, lora_slots=SLOTS, lora_rank=top, **dev)
    res["runtime_load_s"] = time.perf_counter() - t
    runtime = {}
    one = (f"{files[ranks[0]][0]}:0.8",)
    t = time.perf_counter()
    engine.warm_up(*SIZE, 2, max_batch=4)  # what a server does before it takes requests (Engine.warm_up)
    runtime["warm_up_s"] = time.perf_counter() - t
    graphs = compiles()
    image_seconds(engine, 1, loras=one)  # the LoRA files read, the slots written
    image_seconds(engine, 1, mixed=[(f"{files[top][k]}:0.8",) for k in range(SLOTS)])
    image_seconds(engine, 1, n=4, loras=one)
    runtime["new_graphs_after_warm_up"] = compiles() - graphs  # prompts of other lengths may add some
    runtime["vs_merged_rel_l2"] = rel_l2(final_latents(engine, low_lora), merged_latents)
    runtime["mixed_row_vs_merged_rel_l2"] = rel_l2(mixed_first_latents(engine, low_lora, (f"{files[top][1]}:0.8",)),
                                                   merged_latents)
    runtime["fused"] = hasattr(engine.transformer.layers[0].attention, "to_qkv")  # q/k/v one layer of 3 parts
    qkv = getattr(engine.transformer.layers[0].attention, "to_qkv", None)
    runtime["widened"] = type(getattr(qkv, "base", None)).__name__ == "WideLinear"  # the one-GEMM form
    for r in ranks:
        runtime[f"r{r}_s"], runtime[f"r{r}_all_s"] = image_seconds(engine, args.repeats, loras=(f"{files[r][0]}:0.8",))
    runtime["none_s"], _ = image_seconds(engine, args.repeats)
    runtime["same_batch4_s"], _ = image_seconds(engine, 3, n=4, loras=(f"{files[top][0]}:0.8",))
    runtime["mixed_batch4_s"], _ = image_seconds(engine, 3, mixed=[(f"{files[top][k]}:0.8",) for k in range(SLOTS)])
    # switching: a set not in any slot (a fifth LoRA: the least recently used slot is rewritten)
    extra = write_lora(folder, top, SLOTS, args.loras)
    graphs = compiles()
    steady, _ = image_seconds(engine, 3, loras=(f"{files[top][0]}:0.8",))
    t = time.perf_counter()
    engine.loras.runtime.slot_for(("switch",), engine.loras.resolve((f"{extra}:0.8",)), set())
    sync()
    runtime["slot_write_s"] = time.perf_counter() - t
    first, _ = image_seconds(engine, 1, loras=(f"{extra}:0.7",))  # a new set: read, written, run
    runtime["switch_first_image_s"] = first
    runtime["switch_overhead_s"] = first - steady
    runtime["new_graphs_after_switch"] = compiles() - graphs
    runtime["peak_gib"] = peak_gib()
    res["runtime"] = runtime
    del engine
    free_cuda()
    # 3b. runtime slots whose rank bucket is the smallest LoRA's rank: the cost of a slot grows with its bucket (the
    # two products are (L, in) x (in, R) and (L, R) x (R, out) whatever rank the LoRA in it has)
    low = min(ranks)
    if low != top:
        engine = Engine.load(speed=args.speed, lora_slots=SLOTS, lora_rank=low, **dev)
        lo = (f"{files[low][0]}:0.8",)
        image_seconds(engine, 1, loras=lo)
        image_seconds(engine, 1, mixed=[(f"{files[low][k]}:0.8",) for k in range(SLOTS)])
        matched = {f"r{low}_s": image_seconds(engine, args.repeats, loras=lo)[0],
                   "none_s": image_seconds(engine, args.repeats)[0]}
        matched["mixed_batch4_s"], _ = image_seconds(engine, 3, mixed=[(f"{files[low][k]}:0.8",) for k in range(SLOTS)])
        matched["same_batch4_s"], _ = image_seconds(engine, 3, n=4, loras=lo)
        res["runtime_bucket_" + str(low)] = matched
        del engine
        free_cuda()
    # 4. diffusers
    if not args.no_diffusers:
        import torch
        from diffusers import ZImagePipeline

        t = time.perf_counter()
        pipe = ZImagePipeline.from_pretrained(str(folder), torch_dtype=torch.bfloat16).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        d = {"load_s": time.perf_counter() - t}
        t = time.perf_counter()
        pipe.load_lora_weights(str(files[ranks[0]][0]), adapter_name="a")
        pipe.fuse_lora(lora_scale=0.8)
        sync()
        d["load_lora_fuse_s"] = time.perf_counter() - t
        counter = iter(range(10_000))

        def run():
            i = next(counter)
            return pipe(PROMPT + f", shot {i:03d}", width=SIZE[0], height=SIZE[1], num_inference_steps=STEPS,
                        guidance_scale=0.0, generator=torch.Generator("cpu").manual_seed(i)).images

        d["s_per_image"], d["all_s"], _ = timed(run, args.repeats)
        res["diffusers_fused"] = d
        del pipe
        free_cuda()
    print(f"\n{res['env']['device']}  {SIZE[0]}x{SIZE[1]}, {STEPS} forwards; plain {args.speed} "
          f"{res['plain_s']:.3f} s/image, eager {res['plain_eager_s']:.3f}")
    for r, m in res["merged"].items():  # (empty with --no-merged)
        print(f"merged r{r}: load {m['load_s']:.2f}s (plain eager {res['plain_eager_load_s']:.2f}s), "
              f"{m['s_per_image']:.3f} s/image = {m['s_per_image'] / res['plain_eager_s']:.3f}x plain eager")
    rt = res["runtime"]
    for r in ranks:
        print(f"runtime r{r}: {rt[f'r{r}_s']:.3f} s/image = {rt[f'r{r}_s'] / res['plain_s']:.3f}x plain")
    print(f"runtime, no LoRA: {rt['none_s']:.3f}; batch of 4: same LoRA {4 / rt['same_batch4_s']:.2f} img/s, "
          f"4 different {4 / rt['mixed_batch4_s']:.2f} img/s ({rt['same_batch4_s'] / rt['mixed_batch4_s']:.3f}x); "
          f"plain batch of 4 {4 / res['plain_batch4_s']:.2f} img/s")
    if f"runtime_bucket_{min(ranks)}" in res:
        m = res[f"runtime_bucket_{min(ranks)}"]
        r = min(ranks)
        print(f"runtime, bucket {r}: r{r} {m[f'r{r}_s']:.3f} s/image = {m[f'r{r}_s'] / res['plain_s']:.3f}x plain, "
              f"no LoRA {m['none_s'] / res['plain_s']:.3f}x; batch of 4 mixed/same "
              f"{m['same_batch4_s'] / m['mixed_batch4_s']:.3f}x")
    print(f"warm-up {rt['warm_up_s']:.1f}s, graphs compiled after it {rt['new_graphs_after_warm_up']}")
    print(f"bf16: runtime (fused: {rt['fused']}, widened: {rt['widened']}) vs merged rel L2 "
          f"{rt['vs_merged_rel_l2']:.4f}, the same image in a mixed batch {rt['mixed_row_vs_merged_rel_l2']:.4f}; "
          f"compile vs eager, no LoRA {res['bf16_noise_rel_l2']:.4f}; "
          f"the LoRA's own effect {res['lora_effect_rel_l2']:.4f}")
    print(f"switch: slot write {rt['slot_write_s'] * 1000:.1f} ms, first image after {rt['switch_overhead_s']:+.3f}s, "
          f"new graphs {rt['new_graphs_after_switch']}")
    if "diffusers_fused" in res:
        d = res["diffusers_fused"]
        print(f"diffusers: load_lora_weights + fuse_lora {d['load_lora_fuse_s']:.2f}s, {d['s_per_image']:.3f} s/image")
    print("wrote", write_json("lora", res, args.out))


if __name__ == "__main__":
    main()
