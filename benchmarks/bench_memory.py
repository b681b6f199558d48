"""Memory plans under hard VRAM caps, against diffusers' low-memory modes, and cold start; one run on the GPU.

    python benchmarks/bench_memory.py --model /tmp/zimage-full [--out benchmarks/results] [--skip cold,diffusers]

The folder is the full-size random-weight model (`python -m zimage make-tiny PATH --full-size --device cuda`; built
here if missing). Every mode runs in a fresh subprocess (so a `torch.cuda.set_per_process_memory_fraction` cap, a
crash or a leak stays there) and writes one JSON record; a failing mode records its error and the others go on.
1024x1024, 9 steps, bf16, guidance 0:
- zimage at budgets resident (no cap), 16, 12, 8 GiB and the smallest the planner accepts (then +0.5 GiB if that
  fails): s/image for a new prompt and a repeated one (median of 3 after one warm-up, synchronised), peak
  allocated/reserved, predicted peak, bytes streamed per image and the host->device rate that implies, the raw
  pinned copy rate;
- diffusers: enable_model_cpu_offload (1 timed run: ~15 s/image), group offload (block level, CUDA streams) of the
  text encoder only, and of every network;
- cold start, process start -> first PNG written: `zimage -v generate` as a user runs it (median of --cli-repeats
  fresh processes, with the -v timeline of each phase), plain and with --converted-cache; script variants of zimage
  and diffusers timing imports, CUDA init, load (read + cast) and first image apart; with a warm page cache, then
  cold (drop_caches, needs root; recorded if not possible).
Ratios are against zimage resident in the same run. Prints a table; writes benchmarks/results/memory_<gpu>_<date>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
W = H = 1024
STEPS = 9
REPEATS = 3
GIB = 2**30
PROMPT = "a photograph of a red fox standing in fresh snow at golden hour, soft light, detailed fur"


# ----------------------------------------------------------------------------------------------- child side
def _cap(budget_gib):
    import torch

    if budget_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(budget_gib * GIB / total, 1.0))


def _time(fn, repeats):
    import torch

    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def _pinned_rate(nbytes=512 * 2**20) -> float:
    """GiB/s of one pinned host -> device copy of `nbytes` (what a streamed block can reach)."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)
    med, _ = _time(lambda: dev.copy_(host, non_blocking=True), 5)
    del host, dev
    return nbytes / GIB / med


def child_zimage(model: str, budget, fp8: bool = False) -> dict:
    import torch

    from zimage.engine.engine import Engine
    from zimage.request import GenerateRequest

    _cap(budget)
    rate = _pinned_rate()
    torch.cuda.empty_cache()
    t = time.perf_counter()
    engine = Engine.load(model=model, device="cuda", dtype="bf16", speed="eager", vram_budget_gib=budget, fp8=fp8)
    load_s = time.perf_counter() - t
    policy = engine.policy
    counter = iter(range(1000))

    def new():
        return engine.generate(GenerateRequest(prompts=(f"{PROMPT}, shot {next(counter)}",), width=W, height=H,
                                               steps=STEPS, seed=1))

    def repeated():
        return engine.generate(GenerateRequest(prompts=(PROMPT,), width=W, height=H, steps=STEPS, seed=1))

    repeated()  # warm-up (and puts PROMPT in the prompt cache)
    torch.cuda.reset_peak_memory_stats()
    moved0 = policy.bytes_moved() if hasattr(policy, "bytes_moved") else 0
    new_s, new_all = _time(new, REPEATS)
    moved_new = (policy.bytes_moved() - moved0) / REPEATS if hasattr(policy, "bytes_moved") else 0
    moved1 = policy.bytes_moved() if hasattr(policy, "bytes_moved") else 0
    rep_s, rep_all = _time(repeated, REPEATS)
    moved_rep = (policy.bytes_moved() - moved1) / REPEATS if hasattr(policy, "bytes_moved") else 0
    plan = getattr(policy, "plan", None)
    return {
        "plan": policy.describe(), "kind": plan.kind if plan else "resident", "load_s": load_s,
        "new_prompt_s": new_s, "new_prompt_all_s": new_all, "repeated_prompt_s": rep_s, "repeated_all_s": rep_all,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
        "predicted_peak_gib": plan.peak_bytes / GIB if plan else None,
        "moved_gib_per_new_prompt_image": moved_new / GIB, "moved_gib_per_repeated_image": moved_rep / GIB,
        # what the bus carried per second of image (a lower bound on the copy rate: copies overlap compute)
        "moved_gib_per_s": moved_new / GIB / new_s, "pinned_copy_gib_per_s": rate,
        "warnings": sorted({w for r in [repeated()] for w in r.warnings}),
    }


def child_diffusers(model: str, mode: str) -> dict:
    import torch
    from diffusers import ZImagePipeline
    from diffusers.hooks import apply_group_offloading

    rate = _pinned_rate()
    t = time.perf_counter()
    pipe = ZImagePipeline.from_pretrained(model, torch_dtype=torch.bfloat16)
    cuda = torch.device("cuda")
    if mode == "resident":
        pipe.to(cuda)
    elif mode == "model_cpu_offload":
        pipe.enable_model_cpu_offload()
    elif mode == "group_text_encoder":
        pipe.transformer.to(cuda)
        pipe.vae.to(cuda)
        apply_group_offloading(pipe.text_encoder, onload_device=cuda, offload_type="block_level",
                               num_blocks_per_group=1, use_stream=True)
    elif mode == "group_all":
        pipe.enable_group_offload(onload_device=cuda, offload_type="block_level", num_blocks_per_group=1,
                                  use_stream=True)
    else:
        raise ValueError(f"unknown diffusers mode {mode!r}")
    load_s = time.perf_counter() - t
    pipe.set_progress_bar_config(disable=True)
    counter = iter(range(1000))

    def run(prompt=None):
        g = torch.Generator("cpu").manual_seed(1)
        return pipe(prompt or f"{PROMPT}, shot {next(counter)}", width=W, height=H, num_inference_steps=STEPS,
                    guidance_scale=0.0, generator=g).images

    run()  # warm-up
    torch.cuda.reset_peak_memory_stats()
    repeats = 1 if mode == "model_cpu_offload" else REPEATS
    new_s, new_all = _time(run, repeats)
    return {"plan": f"diffusers {mode}", "kind": mode, "load_s": load_s, "new_prompt_s": new_s,
            "new_prompt_all_s": new_all, "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB, "pinned_copy_gib_per_s": rate}


COLD_VARIANTS = {  # name -> what differs from zimage's defaults (the CLI's path: pinned reads + warm start)
    "zimage": {},
    "zimage-safetensors-reads": {"pinned": False},  # safetensors' mmap -> pageable copy (the previous reader)
    "zimage-no-warm-start": {"warm": False},  # first prompt encoded after loading, not during
    "zimage-bf16-cache": {"converted_cache": True},  # reads the bf16 copy (written by an untimed run first)
}


def child_cold(model: str, which: str, started: float, out_png: str) -> dict:
    """Process start (the parent's clock at spawn) -> first image saved, in parts."""
    parts = {"process_start_s": time.time() - started}
    t = time.perf_counter()
    import torch

    if which == "diffusers":
        from diffusers import ZImagePipeline
    else:
        from zimage.engine.engine import Engine
        from zimage.request import GenerateRequest
    parts["imports_s"] = time.perf_counter() - t
    t = time.perf_counter()
    torch.cuda.init()
    torch.empty(1, device="cuda")
    parts["cuda_init_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if which != "diffusers":
        from zimage.weights import load as wl

        variant = COLD_VARIANTS[which.removesuffix("-write")]
        wl.PINNED_READS = variant.get("pinned", True)
        warm = dict(warm_prompts=(PROMPT,), warm_size=(W, H)) if variant.get("warm", True) else {}
        engine = Engine.load(model=model, device="cuda", dtype="bf16", speed="eager",
                             converted_cache=variant.get("converted_cache", False), **warm)
        torch.cuda.synchronize()
        parts.update({f"load_{k}": v for k, v in getattr(wl, "LAST_STATS", {}).items()})
    else:
        pipe = ZImagePipeline.from_pretrained(model, torch_dtype=torch.bfloat16)
        parts["read_and_cast_on_host_s"] = time.perf_counter() - t
        pipe.to("cuda")
        pipe.set_progress_bar_config(disable=True)
        torch.cuda.synchronize()
    parts["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if which != "diffusers":
        result = engine.generate(GenerateRequest(prompts=(PROMPT,), width=W, height=H, steps=STEPS, seed=1))
        image = result.images[0].image
        parts["first_image_phases_s"] = result.timings  # encode ~0 when the warm start encoded the prompt
    else:
        image = pipe(PROMPT, width=W, height=H, num_inference_steps=STEPS, guidance_scale=0.0,
                     generator=torch.Generator("cpu").manual_seed(1)).images[0]
    image.save(out_png)
    parts["first_image_s"] = time.perf_counter() - t
    parts["total_s"] = time.time() - started
    return parts


def cli_run(model: str, out_dir: str, *flags: str, root: Path = HERE.parent) -> dict:
    """One `zimage -v generate` as a user runs it, timed from outside: process start to the PNG's last write, with
    the run's -v timeline (ms since the process imported logging); {'error': ...} if it failed. `root`: the
    checkout whose zimage package runs (another one for an A/B comparison)."""
    png = Path(out_dir) / ".cold-cli.png"
    cmd = [sys.executable, "-m", "zimage", "-v", "generate", "--prompt", PROMPT, "--model", model, "--width", str(W),
           "--height", str(H), "--steps", str(STEPS), "--seed", "1", "--output", str(png), "--overwrite", *flags]
    from common import package_env

    png.unlink(missing_ok=True)
    started = time.time()
    t = time.perf_counter()
    # cwd: `python -m` puts the working directory first on sys.path, ahead of PYTHONPATH
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=package_env(root), cwd=root)
    wall = time.perf_counter() - t
    if proc.returncode != 0 or not png.is_file():
        return {"error": f"exit {proc.returncode}: " + " | ".join(proc.stderr.strip().splitlines()[-4:])}
    saved = png.stat().st_mtime - started  # the PNG's last write: "first image saved" (wall adds the exit)
    png.unlink()
    lines = [line.strip() for line in proc.stderr.replace("\r", "\n").splitlines()]
    timeline = [m.group(1) for m in map(re.compile(r"(\d+ ms (?:DEBUG|INFO): .*)$").search, lines) if m]
    imported = [float(m.group(1)) for m in map(re.compile(r"torch \S+ imported \(([\d.]+)s\)").search, timeline) if m]
    return {"command": " ".join(cmd[1:]), "saved_s": saved, "wall_s": wall,
            "import_torch_s": imported[0] if imported else None,
            "stderr_tail": [line for line in lines if "image(s) in" in line][-1:], "timeline": timeline}


def cli_rows(model: str, out_dir: str, variants: dict, repeats: int) -> dict:
    """cli_run for each of `variants` = {name: flags}, `repeats` times, interleaved (run 1 of each, then run 2, ...)
    so that a drift of the machine touches all alike. Each row: medians over its runs, and the median run's
    command, wall time and timeline."""
    per = {name: [] for name in variants}
    for _ in range(repeats):
        for name, flags in variants.items():
            per[name].append(cli_run(model, out_dir, *flags))
    out = {}
    for name, runs in per.items():
        bad = [r for r in runs if "error" in r]
        if bad:
            out[name] = bad[0]
            continue
        median = sorted(runs, key=lambda r: r["saved_s"])[len(runs) // 2]
        imports = [r["import_torch_s"] for r in runs if r["import_torch_s"] is not None]
        out[name] = {**median, "repeats": repeats, "saved_s": statistics.median(r["saved_s"] for r in runs),
                     "saved_runs_s": [r["saved_s"] for r in runs], "import_torch_runs_s": imports,
                     "import_torch_s": statistics.median(imports) if imports else None,
                     # everything but `import torch` (whose time varies 2.6-5 s between runs on the same machine)
                     "without_import_s": statistics.median(r["saved_s"] - r["import_torch_s"] for r in runs)
                     if len(imports) == len(runs) else None}
    return out


# ----------------------------------------------------------------------------------------------- parent side
def spawn(args, kind: str, arg: str, timeout: float, extra_env=None) -> dict:
    """Run one mode in a fresh interpreter; its JSON record, or {'error': ...}."""
    out = Path(args.out) / f".child-{os.getpid()}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--model", str(args.model), "--child", kind, arg,
           "--child-out", str(out), "--started", repr(time.time())]
    from common import package_env

    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=package_env(**(extra_env or {})))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    record = json.loads(out.read_text()) if out.is_file() else {}
    if proc.returncode != 0 or not record:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        record = {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    record["wall_s"] = time.perf_counter() - t
    out.unlink(missing_ok=True)
    return record


def drop_caches() -> str | None:
    """Empty the page cache (root only). None if done, else why not."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return None
    except OSError as e:
        return f"cannot drop the page cache: {e}"


def smallest_budget(model: str) -> float:
    """The planner's minimum at 1024x1024, rounded up to 0.25 GiB."""
    from zimage.memory.planner import leanest_plan, minimum_budget
    from zimage.memory.sizes import model_sizes
    from zimage.weights.check import check_model_folder

    need = minimum_budget(leanest_plan(model_sizes(check_model_folder(Path(model))), W, H)) / GIB
    return -(-need * 4 // 1) / 4


def table(results: dict) -> str:
    base = results["zimage"].get("resident", {}).get("new_prompt_s")
    lines = [f"{'mode':<34}{'s/img new':>10}{'s/img rep':>10}{'x res':>7}{'alloc':>7}{'resv':>7}{'pred':>7}"
             f"{'GiB/s':>7}  plan / error"]
    for group in ("zimage", "diffusers"):
        for name, r in results[group].items():
            if "error" in r:
                lines.append(f"{group + ' ' + name:<34}{'':>48}  ERROR {r['error'][:120]}")
                continue
            ratio = r["new_prompt_s"] / base if base else float("nan")

            def f(key, fmt="{:.2f}"):
                return fmt.format(r[key]) if r.get(key) is not None else "-"

            lines.append(f"{group + ' ' + name:<34}{f('new_prompt_s'):>10}{f('repeated_prompt_s'):>10}{ratio:>6.2f}x"
                         f"{f('peak_allocated_gib', '{:.1f}'):>7}{f('peak_reserved_gib', '{:.1f}'):>7}"
                         f"{f('predicted_peak_gib', '{:.1f}'):>7}{f('moved_gib_per_s', '{:.1f}'):>7}  {r.get('plan', '')[:90]}")
    for name, r in results["cold_start"].items():
        lines.append(f"cold start {name:<23} " + (r["error"][:120] if "error" in r else ", ".join(
            f"{k.removesuffix('_s')} {v:.2f}s" for k, v in r.items() if isinstance(v, float) and k.endswith("_s"))))
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=Path(os.environ.get("ZIMAGE_BENCH_MODEL", "/tmp/zimage-full")))
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--skip", default="", help="comma list of: zimage, diffusers, cold, cold-disk")
    p.add_argument("--budgets", default="16,12,8,resident+fp8,12+fp8,8+fp8",
                   help="budgets besides resident and the smallest: GiB, 'resident', '+fp8' for the lossy fp8 plans")
    p.add_argument("--cold-variants", default=",".join(COLD_VARIANTS),
                   help="zimage cold-start variants with a warm page cache (comma list; 'none' for only the CLI runs)")
    p.add_argument("--cli-repeats", type=int, default=5, help="fresh `zimage generate` processes per CLI cold start "
                                                                 "row (the median is reported)")
    p.add_argument("--diffusers-modes", default="model_cpu_offload,group_text_encoder,group_all",
                   help="diffusers low-memory modes to run (comma list)")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, arg = args.child
        if kind == "zimage":
            budget, _, extra = arg.partition("+")  # "12", "resident", "12+fp8"
            rec = child_zimage(str(args.model), None if budget == "resident" else float(budget), extra == "fp8")
        elif kind == "diffusers":
            rec = child_diffusers(str(args.model), arg)
        else:
            rec = child_cold(str(args.model), arg, args.started, str(Path(args.child_out).with_suffix(".png")))
        Path(args.child_out).write_text(json.dumps(rec))
        return 0

    # common.py sits beside this script (on sys.path when run as a script); zimage must be installed or on
    # PYTHONPATH (`PYTHONPATH=. python benchmarks/bench_memory.py ...`), as for the other benchmarks.
    from common import ensure_full_model, environment

    Path(args.out).mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    t0 = time.perf_counter()
    _, build_s = ensure_full_model(args.model)
    results = {"env": environment(), "size": [W, H], "steps": STEPS, "repeats": REPEATS, "build_s": build_s,
               "zimage": {}, "diffusers": {}, "cold_start": {}}
    if "zimage" not in skip:
        for b in ["resident"] + args.budgets.split(","):
            results["zimage"][b] = spawn(args, "zimage", b, 150)
            print(f"zimage {b}: {results['zimage'][b].get('new_prompt_s', results['zimage'][b].get('error'))}", flush=True)
        try:
            smallest = smallest_budget(str(args.model))
        except Exception as e:  # noqa: BLE001 - recorded, the other modes go on
            results["zimage"]["smallest"] = {"error": f"planner: {e}"}
            smallest = None
        for b in (smallest, smallest + 0.5) if smallest else ():
            rec = spawn(args, "zimage", str(b), 180)
            results["zimage"][f"smallest {b:g}"] = rec
            print(f"zimage smallest {b:g}: {rec.get('new_prompt_s', rec.get('error'))}", flush=True)
            if "error" not in rec:
                break
    if "diffusers" not in skip:
        for mode in args.diffusers_modes.split(","):  # diffusers resident: bench_speed
            results["diffusers"][mode] = spawn(args, "diffusers", mode, 150)
            print(f"diffusers {mode}: {results['diffusers'][mode].get('new_prompt_s', results['diffusers'][mode].get('error'))}", flush=True)
    if "cold" not in skip:
        # the modes above have read every file (or do it now): the page cache is warm
        os.sync()  # a model just built is still being written back: the first variant would pay for it
        for which in [v for v in args.cold_variants.split(",") if v != "none"]:
            if COLD_VARIANTS[which].get("converted_cache"):
                spawn(args, "cold", which + "-write", 240)  # untimed: writes the converted copy
            results["cold_start"][f"{which} warm"] = spawn(args, "cold", which, 150)
        cli_run(str(args.model), args.out, "--converted-cache")  # untimed: writes the bf16 copy if missing
        results["cold_start"].update(cli_rows(str(args.model), args.out, {
            "zimage CLI warm": (),
            "zimage CLI --converted-cache warm": ("--converted-cache",),
        }, args.cli_repeats))
        results["cold_start"]["diffusers warm"] = spawn(args, "cold", "diffusers", 150)
        if "cold-disk" not in skip:
            for name, flags in (("zimage CLI", ()), ("zimage CLI --converted-cache", ("--converted-cache",))):
                why = drop_caches()
                results["cold_start"][f"{name} cold disk"] = {"error": why} if why else cli_rows(
                    str(args.model), args.out, {name: flags}, 1)[name]
            for which in ("zimage", "zimage-bf16-cache", "diffusers"):
                if which in COLD_VARIANTS and which not in args.cold_variants.split(","):
                    continue
                why = drop_caches()
                results["cold_start"][f"{which} cold disk"] = {"error": why} if why else spawn(args, "cold", which, 240)
    results["total_s"] = time.perf_counter() - t0
    print(table(results))
    from common import write_json

    print(write_json("memory", results, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
