"""Exploration: what each piece of the warm start (zimage.engine.warm_start) costs on the generating thread alone,
and while the loader thread reads the text encoder and transformer (as Engine.load runs it), and what the real
first step costs with and without it. One fresh process per variant; JSON to $OUT (warm_start_parts_*; run with
the package of e002612: benchmarks/results/warm_start_parts_NVIDIA-H200_2026-11-30.json).

    python3 benchmarks/experiments/warm_start_parts.py   # needs the full-size folder at $ZIMAGE_BENCH_MODEL
"""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

MODEL = os.environ.get("ZIMAGE_BENCH_MODEL", "/tmp/zimage-full")
OUT = Path(os.environ.get("OUT", "/tmp/out"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import package_env  # noqa: E402
PROMPT = "a photograph of a red fox standing in fresh snow at golden hour, soft light, detailed fur"

CHILD = r'''
import sys, time, threading, json
t_start = time.perf_counter()
from pathlib import Path
import torch
variant, model, prompt = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
from zimage.weights.check import check_model_folder
from zimage.weights.load import load_network, prepare_reads
from zimage.engine.warm_start import WarmStart, StandIn, stand_in_transformer
from zimage.engine.text import PromptEncoder
from zimage.models.tokenizer import PromptTokenizer

dev, dt = torch.device("cuda"), torch.bfloat16
prepare_reads(dev)
checked = check_model_folder(model)
tok = PromptTokenizer.from_folder(model / "tokenizer")
times = {"import_torch_s": None}
def timed(name, fn):
    torch.cuda.synchronize(); t = time.perf_counter(); r = fn(); torch.cuda.synchronize()
    times[name] = round(time.perf_counter() - t, 4); return r
vae = timed("load_vae", lambda: load_network(checked["vae"], dev, dt))
box = {}
def rest():
    t = time.perf_counter()
    box["te"] = load_network(checked["text_encoder"], dev, dt)
    box["tr"] = load_network(checked["transformer"], dev, dt)
    box["reads_s"] = round(time.perf_counter() - t, 4)
    box["reads_end"] = time.perf_counter()
th = threading.Thread(target=rest)
if variant == "during":
    th.start()
else:
    rest()
t_warm = time.perf_counter()
cfg = checked["transformer"].network.config
tokens = tok.count_tokens(tok.template(prompt))
def step(model, caption):
    with torch.inference_mode():
        ctx = model.prepare([caption], 128, 128)
        x = torch.zeros(1, 16, 128, 128, dtype=dt, device=dev)
        model(x, torch.full((1,), 0.5, device=dev), ctx)
if variant != "none":
    warm = WarmStart(dev, (prompt,), vae, (1024, 1024), StandIn(cfg, dt, tokens))
    timed("decoder_1", warm._decoder)
    timed("decoder_2", warm._decoder)
    stand = timed("standin_build", lambda: stand_in_transformer(cfg, dev, dt))
    cap = torch.zeros(tokens, cfg["cap_feat_dim"], dtype=dt, device=dev)
    timed("standin_step_1", lambda: step(stand, cap))
    timed("standin_step_2", lambda: step(stand, cap))
    del stand
times["warm_work_s"] = round(time.perf_counter() - t_warm, 4)
th.join() if variant == "during" else None
if "reads_end" in box:
    times["warm_end_minus_reads_end_s"] = round(time.perf_counter() - box["reads_end"], 4)
times["reads_s"] = box["reads_s"]
prompts = PromptEncoder(tok, box["te"], dev)
emb = timed("encode_1", lambda: prompts.encode([prompt]))[0]
prompts._cache.clear()
timed("encode_2", lambda: prompts.encode([prompt]))
real = box["tr"]
for i in (1, 2, 3):
    timed(f"real_step_{i}", lambda: step(real, emb))
timed("decode_real_1", lambda: WarmStart(dev, (), vae, (1024, 1024))._decoder())
times["process_s"] = round(time.perf_counter() - t_start, 4)
print(json.dumps(times))
'''


def main():
    import torch

    env = package_env()
    runs = {v: [] for v in ("none", "alone", "during")}
    for _ in range(3):
        for variant in runs:
            out = subprocess.run([sys.executable, "-c", CHILD, variant, MODEL, PROMPT], env=env,
                                 capture_output=True, text=True, timeout=300)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(variant, runs[variant][-1], flush=True)
    medians = {v: {k: statistics.median(r[k] for r in rs) for k in rs[0] if rs[0][k] is not None}
               for v, rs in runs.items()}
    OUT.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name().replace(" ", "-")
    path = OUT / f"warm_start_parts_{name}.json"
    path.write_text(json.dumps({"model": MODEL, "medians": medians, "runs": runs}, indent=1))
    print(json.dumps(medians, indent=1))


if __name__ == "__main__":
    main()
