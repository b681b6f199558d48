"""Where one transformer forward's time goes on the GPU, and the lossless kernel floor it could reach.

    cd benchmarks && python bench_profile.py [--model DIR] [--size 1024x1024] [--modes eager,compile]
                                             [--cudagraphs] [--out DIR]

For each speed mode, on the full-size random-weight model (built if missing, as bench_speed.py), one caption:
1. ms per forward (3 warm-up forwards, the first compiles in compile mode; then the median of --repeats, the GPU
   synchronised around each);
2. torch.profiler over 3 forwards: GPU kernel time per forward split by kernel name into GEMM, attention, triton
   (inductor's fused kernels) and other (eager elementwise, norms, copies); GPU idle = wall - kernel time (the most
   CUDA graphs could remove); the top 15 kernels;
3. with --cudagraphs: the whole forward captured in one torch.cuda.CUDAGraph, ms per replay and the max abs
   difference of its output from the plain forward's.
Then, once, the lossless kernel floor: the TFLOP/s of one block's exact GEMM shapes (F.linear, bf16) and of
attention (SDPA: PyTorch's choice, cuDNN, flash), each alone on a rested GPU, summed over 30 joint + 2 noise-refiner
blocks (a best case); and the "skeleton" forward, those same GEMMs and attention calls back to back in forward order
and nothing else (every norm/RoPE/gate assumed fused away), timed as a whole: the floor, since it runs at the clocks
the GPU holds under a forward's sustained load (an H200 at its ~700 W cap drops from ~1980 to ~1550 MHz: measured,
and recorded in the JSON). Per forward and per 9-step image. Prints tables; writes JSON (profile_<device>_<date>.json).

CPU smoke test: --device cpu --size 256x256 --modes eager --repeats 2 on a tiny folder; there the "kernels" are
the CPU ops' self times and the cuDNN/flash/CUDA-graph parts are recorded as skipped.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import (DEFAULT_MODEL_DIR, PROMPT, cuda_ms, ensure_full_model, environment, free_cuda, sync, timed,
                    write_json)

STEPS = 9  # forwards per image (Z-Image-Turbo, guidance 0)
PROFILED_FORWARDS = 3
WARMUP_FORWARDS = 3
TOP_KERNELS = 15
CATEGORIES = ("gemm", "attention", "triton", "other")

# Substrings of kernel names, lower case. cuBLAS/cuBLASLt on Hopper: nvjet_*, sm90_xmma_gemm_*, cutlass_*;
# attention: cuDNN's cudnn_generated_fort_native_sdpa_*, flash (pytorch_flash::flash_fwd_kernel), memory-efficient
# (fmha_cutlassF_*; before GEMM because it says cutlass). The aten:: names classify CPU ops (the CPU smoke test).
_ATTENTION = ("flash", "fmha", "cudnn", "sdpa", "scaled_dot_product", "attention")
_GEMM = ("cutlass", "cublas", "gemm", "xmma", "nvjet", "aten::mm", "aten::addmm", "aten::bmm", "aten::matmul")


def categorize(kernel_name: str) -> str:
    """'gemm' | 'attention' | 'triton' | 'other' for one kernel (or CPU op) name.

    Inductor's generated kernels start with triton_: its matmul templates (triton_tem_*) are GEMMs, the rest
    (triton_poi_/red_/per_) fused elementwise and reductions; they are checked first, since their names list the ops
    they fused (e.g. ..._scaled_dot_product_cudnn_attention_... for a copy feeding attention)."""
    name = kernel_name.lower()
    if name.startswith("triton_tem") or "triton_tem_" in name:
        return "gemm"
    if name.startswith("triton") or " triton_" in name:
        return "triton"
    if any(s in name for s in _ATTENTION):
        return "attention"
    if any(s in name for s in _GEMM):
        return "gemm"
    return "other"


# ---------------------------------------------------------------- profile analysis
def kernel_events(prof, cuda: bool) -> list[tuple[str, float]]:
    """(name, microseconds) of every GPU kernel / memcpy / memset; on CPU, every CPU op's self time."""
    from torch.autograd import DeviceType

    out = []
    for e in prof.events():
        if cuda:
            if e.device_type == DeviceType.CUDA:
                out.append((e.name, e.time_range.elapsed_us()))
        elif e.device_type == DeviceType.CPU and not e.is_user_annotation and not e.is_async:
            out.append((e.name, e.self_cpu_time_total))
    return out


def breakdown(events: list[tuple[str, float]], forwards: int, wall_ms: float) -> dict:
    """Per-forward kernel time by category and the top kernels, from (name, us) events of `forwards` forwards."""
    per_name: dict[str, list] = {}
    for name, us in events:
        calls_us = per_name.setdefault(name, [0, 0.0])
        calls_us[0] += 1
        calls_us[1] += us
    kernel_ms = sum(us for _, us in events) / 1000 / forwards
    cats = {c: {"ms": 0.0, "calls": 0.0} for c in CATEGORIES}
    for name, (calls, us) in per_name.items():
        c = cats[categorize(name)]
        c["ms"] += us / 1000 / forwards
        c["calls"] += calls / forwards
    for c in cats.values():
        c["pct_of_forward"] = 100 * c["ms"] / wall_ms
        c["pct_of_kernels"] = 100 * c["ms"] / kernel_ms if kernel_ms else float("nan")
    idle = wall_ms - kernel_ms
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:TOP_KERNELS]
    return {
        "forwards_profiled": forwards,
        "wall_ms_per_forward": wall_ms,
        "kernel_ms_per_forward": kernel_ms,
        "idle_ms_per_forward": idle,  # GPU waiting for the host: what CUDA graphs could at most remove
        "idle_pct_of_forward": 100 * idle / wall_ms,
        "kernels_per_forward": len(events) / forwards,
        "categories": cats,
        "top_kernels": [{"name": name[:90], "category": categorize(name), "calls_per_forward": calls / forwards,
                         "ms_per_forward": us / 1000 / forwards} for name, (calls, us) in top],
    }


def profile_forwards(fn, forwards: int, cuda: bool):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    with profile(activities=activities) as prof:
        for _ in range(forwards):
            fn()
        sync()
    return prof


# ---------------------------------------------------------------- one mode
def bench_mode(folder: Path, mode: str, args, dims: dict) -> dict:
    import torch

    from zimage import Engine, GenerateRequest
    from zimage.speed.attention import attention_backend

    cuda = args.device == "cuda"
    t = time.perf_counter()
    engine = Engine.load(model=str(folder), device=args.device, dtype=args.dtype, speed=mode)
    sync()
    out = {"load_s": time.perf_counter() - t, "mode": engine.speed,
           "attention_backend": attention_backend(engine.transformer),
           "dtype": str(engine.dtype).replace("torch.", "")}
    w, h = args.size
    cond, _ = engine.encode([GenerateRequest(prompts=(PROMPT,), width=w, height=h, steps=STEPS, seed=0)])
    c = engine.transformer.config
    with torch.inference_mode():
        ctx = engine.transformer.prepare(cond.positive, h // 8, w // 8)
        gen = torch.Generator(args.device).manual_seed(0)
        x = torch.randn(1, engine.transformer.in_channels, h // 8, w // 8, device=args.device, generator=gen,
                        dtype=engine.dtype)
        t_in = torch.full((1,), 0.5, device=args.device)
        dims.update(dim=c["dim"], heads=c["n_heads"], layers=c["n_layers"], refiners=c["n_refiner_layers"],
                    image_tokens=ctx.n_tokens, image_tokens_padded=ctx.x_freqs.shape[1],
                    caption_tokens=len(cond.positive[0]), caption_tokens_padded=ctx.cap.shape[1],
                    dtype=engine.dtype)

        def forward():
            return engine.transformer(x, t_in, ctx)

        t = time.perf_counter()
        forward()
        sync()
        out["first_forward_s"] = time.perf_counter() - t  # includes compilation in compile mode
        for _ in range(WARMUP_FORWARDS - 1):
            forward()
        med, all_s, ref = timed(forward, args.repeats, warmup=0)
        out["forward_ms"] = 1000 * med
        out["forward_all_ms"] = [1000 * s for s in all_s]
        out["gpu_after_timing"] = gpu_state() if cuda else {}
        prof = profile_forwards(forward, PROFILED_FORWARDS, cuda)
        out["profile"] = breakdown(kernel_events(prof, cuda), PROFILED_FORWARDS, out["forward_ms"])
        out["profile"]["kernel_source"] = ("CUDA kernels, memcpy and memset (CUPTI)" if cuda else
                                           "CPU ops' self time (no CUDA: smoke test only)")
        del prof
        if not args.cudagraphs:
            out["cudagraphs"] = "not run (pass --cudagraphs)"
        elif not cuda:
            out["cudagraphs"] = "skipped: no CUDA"
        else:
            out["cudagraphs"] = cudagraph_forward(forward, x, t_in, ref, args.repeats)
    return out  # the engine and its tensors go with this frame (free_cuda() then returns their memory)


def cudagraph_forward(forward, x, t_in, ref, repeats: int) -> dict:
    """Capture forward() (x, t_in static) in one CUDA graph; ms per replay and max |graph - plain| of the output."""
    import torch

    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):  # warm-up on a side stream, as torch.cuda.graphs recommends
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = forward()
        graph.replay()
        sync()
        diff = float((static_out.float() - ref.float()).abs().max())
        med, all_s, _ = timed(graph.replay, repeats, warmup=2)
        res = {"forward_ms": 1000 * med, "forward_all_ms": [1000 * v for v in all_s], "max_abs_diff_vs_plain": diff,
               "equal_to_plain": diff == 0.0}
        del graph, static_out
        return res
    except Exception as e:  # a capture failure is a finding, not a reason to lose the run's other figures
        import traceback

        traceback.print_exc()
        return {"error": f"{type(e).__name__}: {e}"[:2000]}


# ---------------------------------------------------------------- kernel rates and the floor
def kernel_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median ms of one fn()'s kernels alone: CUDA events with the GPU kept busy while the host queues them."""
    return cuda_ms(fn, repeats, warmup, busy_ahead=True)


def gemm_shapes(dim: int) -> dict:
    """(K, N) of one block's projections, fused as the compile mode runs them, plus the unfused w1 for contrast."""
    hidden = int(dim / 3 * 8)
    return {"qkv": (dim, 3 * dim), "out": (dim, dim), "w13": (dim, 2 * hidden), "w2": (hidden, dim),
            "w1_unfused": (dim, hidden)}


FLOOR_GEMMS = ("qkv", "out", "w13", "w2")


def measure_rates(dims: dict, device: str) -> dict:
    """Each block GEMM and attention kernel alone (ms, TFLOP/s) at the joint and refiner token counts, then the floor:
    the forward's GEMM + attention kernels and nothing else, run back to back (the "skeleton" forward)."""
    import torch
    import torch.nn.functional as F

    cuda = device == "cuda"
    dtype = dims["dtype"]
    tokens = {"joint": dims["image_tokens_padded"] + dims["caption_tokens_padded"],
              "refiner": dims["image_tokens_padded"]}
    head_dim = dims["dim"] // dims["heads"]
    gen = torch.Generator(device).manual_seed(0)
    shapes = gemm_shapes(dims["dim"])
    weights = {name: torch.randn(n, k, device=device, dtype=dtype, generator=gen) / k ** 0.5
               for name, (k, n) in shapes.items()}
    inputs = {tag: {k: torch.randn(m, k, device=device, dtype=dtype, generator=gen) for k in {k for k, _ in
                                                                                          shapes.values()}}
              for tag, m in tokens.items()}
    qkv = {tag: [torch.randn(1, dims["heads"], m, head_dim, device=device, dtype=dtype, generator=gen)
                 for _ in range(3)] for tag, m in tokens.items()}
    backends = {"default": None}
    if cuda:
        from torch.nn.attention import SDPBackend

        backends.update(cudnn=SDPBackend.CUDNN_ATTENTION, flash=SDPBackend.FLASH_ATTENTION)

    def gemm_fn(tag, name):
        a, w = inputs[tag][shapes[name][0]], weights[name]
        return lambda: F.linear(a, w)

    def attention_fn(tag, backend):
        q, k, v = qkv[tag]
        if backend is None:
            return lambda: F.scaled_dot_product_attention(q, k, v)
        from torch.nn.attention import sdpa_kernel

        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    gemm, attention = {}, {}
    with torch.inference_mode():
        for tag, m in tokens.items():
            for name, (k, n) in shapes.items():
                ms = kernel_ms(gemm_fn(tag, name))
                gemm[f"{name}@{tag}"] = {"M": m, "K": k, "N": n, "ms": ms, "tflops": 2 * m * k * n / ms / 1e9}
            flop = 4 * dims["heads"] * m * m * head_dim  # QK^T and PV, 2 FLOP per multiply-add
            for name, backend in backends.items():
                try:
                    ms = kernel_ms(attention_fn(tag, backend))
                    attention[f"{name}@{tag}"] = {"M": m, "heads": dims["heads"], "head_dim": head_dim, "ms": ms,
                                                  "tflops": flop / ms / 1e9}
                except Exception as e:  # a backend this GPU / build lacks
                    attention[f"{name}@{tag}"] = {"error": f"{type(e).__name__}: {e}"[:500]}
            if not cuda:
                attention[f"cudnn@{tag}"] = attention[f"flash@{tag}"] = "skipped: no CUDA"
        fl = floor(dims, gemm, attention)
        # The skeleton: per block qkv, attention, out, w13, w2 (inputs preallocated: no copies), in forward order.
        calls = {tag: ([gemm_fn(tag, "qkv")], [attention_fn(tag, backends[fl["attention_kernel"][tag]])],
                       [gemm_fn(tag, n) for n in ("out", "w13", "w2")]) for tag in tokens}
        order = ["refiner"] * dims["refiners"] + ["joint"] * dims["layers"]

        def skeleton(parts=(0, 1, 2)):
            for tag in order:
                for i in parts:
                    for fn in calls[tag][i]:
                        fn()

        skel = {"gemm_only_ms": cuda_ms(lambda: skeleton((0, 2)), repeats=10, warmup=2),
                "attention_only_ms": cuda_ms(lambda: skeleton((1,)), repeats=10, warmup=2)}
        skel["ms_per_forward"] = cuda_ms(skeleton, repeats=10, warmup=2)
        skel["gpu"] = gpu_state()  # clocks and power right after the whole skeleton ran 12 times
    fl["sum_of_isolated_ms"] = fl.pop("ms_per_forward")
    fl["skeleton"] = skel
    fl["ms_per_forward"] = skel["ms_per_forward"]
    fl["s_per_image"] = STEPS * skel["ms_per_forward"] / 1000
    flop = sum(2 * tokens[t] * k * n for t in order for k, n in (shapes[g] for g in FLOOR_GEMMS)) + sum(
        4 * dims["heads"] * tokens[t] ** 2 * head_dim for t in order)
    fl["skeleton"]["tflop_per_forward"] = flop / 1e12
    fl["skeleton"]["tflops"] = flop / skel["ms_per_forward"] / 1e9
    return {"gemm": gemm, "attention": attention, "floor": fl,
            "timing": "each kernel alone: CUDA events around one call after a ~1 ms GPU spin, so host dispatch is "
                      "not counted and the GPU starts each call rested (boost clock: a best case); the floor is the "
                      "skeleton forward (every block's GEMMs and attention back to back, in order: the clocks and "
                      "power of a real forward), CUDA events, median of 10"}


def gpu_state() -> dict:
    """SM clock (MHz) and power (W) now, where the driver says (needs pynvml); {} otherwise."""
    import torch

    state = {}
    for key, read in (("sm_clock_mhz", torch.cuda.clock_rate), ("power_w", torch.cuda.power_draw)):
        try:
            value = read()
            state[key] = value / 1000 if key == "power_w" else value  # power_draw is in mW
        except Exception:  # no CUDA, no pynvml, or a driver that does not say
            pass
    return state


def floor(dims: dict, gemm: dict, attention: dict) -> dict:
    """The sum of one forward's GEMM and attention kernels, each at its isolated (best-case) time."""
    gemm_ms = {tag: sum(gemm[f"{n}@{tag}"]["ms"] for n in FLOOR_GEMMS) for tag in ("joint", "refiner")}
    attn_ms, attn_kernel = {}, {}
    for tag in ("joint", "refiner"):
        timed_ok = {k.split("@")[0]: v["ms"] for k, v in attention.items()
                    if k.endswith(f"@{tag}") and isinstance(v, dict) and "ms" in v}
        attn_kernel[tag] = min(timed_ok, key=timed_ok.get)
        attn_ms[tag] = timed_ok[attn_kernel[tag]]
    n_joint, n_ref = dims["layers"], dims["refiners"]
    total_gemm = n_joint * gemm_ms["joint"] + n_ref * gemm_ms["refiner"]
    total_attn = n_joint * attn_ms["joint"] + n_ref * attn_ms["refiner"]
    return {
        "blocks": f"{n_joint} joint blocks at M={dims['image_tokens_padded'] + dims['caption_tokens_padded']} + "
                  f"{n_ref} noise-refiner blocks at M={dims['image_tokens_padded']}",
        "gemm_ms_per_forward": total_gemm, "attention_ms_per_forward": total_attn,
        "attention_kernel": attn_kernel, "ms_per_forward": total_gemm + total_attn, "steps": STEPS,
        "left_out": f"the context refiner ({n_ref} blocks on {dims['caption_tokens_padded']} caption tokens, run "
                    "once per request in prepare(), not per step: negligible); adaLN modulation (M=1), the timestep "
                    "MLP, x embedding and final layer (under 0.1% of the FLOPs); every norm/RoPE/gate/SiLU "
                    "elementwise op, assumed fused into the GEMMs' prologues/epilogues at no cost",
    }


# ---------------------------------------------------------------- output
def print_tables(res: dict) -> None:
    d = res["tokens"]
    print(f"\n{res['env']['device']}  {res['size']}  tokens: image {d['image_tokens_padded']} + caption "
          f"{d['caption_tokens_padded']} (of {d['caption_tokens']})")
    for mode, r in res["modes"].items():
        if "error" in r:
            print(f"\n[{mode}] error: {r['error']}")
            continue
        p = r["profile"]
        print(f"\n[{mode}] (applied: {r['mode']}, attention {r['attention_backend']})  wall {r['forward_ms']:.1f} "
              f"ms/forward, kernels {p['kernel_ms_per_forward']:.1f} ms ({p['kernels_per_forward']:.0f} launches), "
              f"first forward {r['first_forward_s']:.1f} s")
        print(f"  {'category':<12}{'ms/fwd':>9}{'% fwd':>8}{'calls':>8}")
        for name, c in p["categories"].items():
            print(f"  {name:<12}{c['ms']:>9.2f}{c['pct_of_forward']:>7.1f}%{c['calls']:>8.0f}")
        print(f"  {'GPU idle':<12}{p['idle_ms_per_forward']:>9.2f}{p['idle_pct_of_forward']:>7.1f}%")
        print(f"  top {TOP_KERNELS} kernels:  {'ms/fwd':>7} {'calls':>6}  cat        name")
        for k in p["top_kernels"]:
            print(f"  {'':<15}{k['ms_per_forward']:>7.2f} {k['calls_per_forward']:>6.0f}  {k['category']:<10} "
                  f"{k['name']}")
        g = r["cudagraphs"]
        if isinstance(g, dict) and "forward_ms" in g:
            print(f"  CUDA graph: {g['forward_ms']:.1f} ms/forward, "
                  f"max |diff| vs plain {g['max_abs_diff_vs_plain']:.3g}")
        else:
            print(f"  CUDA graph: {g.get('error') if isinstance(g, dict) else g}")
    rates = res.get("rates")
    if not rates:
        return
    print(f"\n  {'GEMM / attention':<20}{'M':>6}{'K':>7}{'N':>7}{'ms':>9}{'TFLOP/s':>9}")
    for name, v in rates["gemm"].items():
        print(f"  {name:<20}{v['M']:>6}{v['K']:>7}{v['N']:>7}{v['ms']:>9.3f}{v['tflops']:>9.1f}")
    for name, v in rates["attention"].items():
        if isinstance(v, dict) and "ms" in v:
            print(f"  {name:<20}{v['M']:>6}{'':>14}{v['ms']:>9.3f}{v['tflops']:>9.1f}")
        else:
            print(f"  {name:<20}  {v if isinstance(v, str) else v['error'][:80]}")
    f = rates["floor"]
    sk = f["skeleton"]
    print(f"\n  kernel floor ({f['blocks']}), attention {f['attention_kernel']['joint']}:")
    print(f"    each kernel alone, summed: GEMM {f['gemm_ms_per_forward']:.1f} + attention "
          f"{f['attention_ms_per_forward']:.1f} = {f['sum_of_isolated_ms']:.1f} ms/forward")
    print(f"    skeleton forward, back to back: {sk['ms_per_forward']:.1f} ms/forward (GEMMs only "
          f"{sk['gemm_only_ms']:.1f}, attention only {sk['attention_only_ms']:.1f}; {sk['tflops']:.0f} TFLOP/s; "
          f"GPU after: {sk['gpu'] or 'n/a'})")
    print(f"    floor: {f['ms_per_forward']:.1f} ms/forward, {f['s_per_image']:.3f} s per {STEPS}-step image")
    print(f"  not counted: {f['left_out']}")
    for mode, r in res["modes"].items():
        v = r.get("profile", {}).get("vs_floor")
        if v:
            print(f"  [{mode}] {r['forward_ms']:.1f} ms = floor + {v['above_floor_ms']:.1f}; its own GEMMs "
                  f"{v['gemm_ratio']:.2f}x and attention {v['attention_ratio']:.2f}x those alone; GEMM + attention "
                  f"kernels alone {v['gemm_plus_attention_ms']:.1f} ms")


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--size", default="1024x1024", help="WIDTHxHEIGHT in pixels")
    p.add_argument("--modes", default="eager,compile", help="comma-separated speed modes (eager, compile)")
    p.add_argument("--repeats", type=int, default=10, help="timed forwards per mode (median)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="bf16 on CUDA, fp32 on CPU unless given")
    p.add_argument("--cudagraphs", action="store_true", help="also time each mode's forward captured in a CUDA graph")
    p.add_argument("--no-rates", action="store_true", help="skip the GEMM/attention rates and the floor")
    args = p.parse_args()
    args.size = tuple(int(v) for v in args.size.lower().split("x"))
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    folder, build_s = ensure_full_model(args.model)
    print(f"model folder {folder}" + (f" (built in {build_s:.0f}s)" if build_s else ""), flush=True)
    res = {"env": environment(), "model": str(folder), "size": "x".join(map(str, args.size)), "device_arg": args.device,
           "repeats": args.repeats, "warmup_forwards": WARMUP_FORWARDS, "modes": {}}
    dims: dict = {}
    t0 = time.perf_counter()
    for mode in args.modes.split(","):
        try:
            res["modes"][mode] = bench_mode(folder, mode, args, dims)
            print(mode, "done:", f"{res['modes'][mode]['forward_ms']:.1f} ms/forward", flush=True)
        except Exception as e:  # record and go on: one failing mode must not lose the others' figures
            import traceback

            traceback.print_exc()
            res["modes"][mode] = {"error": f"{type(e).__name__}: {e}"[:2000]}
        free_cuda()
    if dims:
        res["tokens"] = {k: v for k, v in dims.items() if k != "dtype"}
        res["tokens"]["joint_M"] = dims["image_tokens_padded"] + dims["caption_tokens_padded"]
        if not args.no_rates:
            res["rates"] = measure_rates(dims, args.device)
            fl = res["rates"]["floor"]
            for r in res["modes"].values():
                if "profile" in r:  # how close the forward's own GEMMs and attention come to the isolated ones
                    cats = r["profile"]["categories"]
                    r["profile"]["vs_floor"] = {  # ratios to each kernel alone (rested GPU), summed
                        "gemm_ratio": cats["gemm"]["ms"] / fl["gemm_ms_per_forward"],
                        "attention_ratio": cats["attention"]["ms"] / fl["attention_ms_per_forward"],
                        # the forward with only its own GEMM and attention kernels, back to back
                        "gemm_plus_attention_ms": cats["gemm"]["ms"] + cats["attention"]["ms"],
                        "above_floor_ms": r["forward_ms"] - fl["ms_per_forward"]}
        print_tables(res)
    else:
        res["tokens"] = None
    res["total_s"] = time.perf_counter() - t0
    name = "profile" if args.size == (1024, 1024) else f"profile-{res['size']}"
    print("\nwrote", write_json(name, res, args.out), f"({res['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
