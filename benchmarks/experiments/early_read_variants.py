"""Exploration, run at commit 0c6b51a (the early read; gone since): `zimage -v generate` with the early read off and
with 16x16, 8x64 and 4x64 MiB threads x chunks, interleaved. JSON to $OUT (benchmarks/results/early_read_variants_*)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

MODEL = os.environ.get("ZIMAGE_BENCH_MODEL", "/tmp/zimage-full")
OUT = Path(os.environ.get("OUT", "/tmp/out"))
PROMPT = "a photograph of a red fox standing in fresh snow at golden hour, soft light, detailed fur"
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
res = {}


def run(name, cmd, png=None):
    started = time.time()
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    wall = time.perf_counter() - t
    rec = {"wall_s": wall, "rc": p.returncode}
    if png and Path(png).is_file():
        rec["saved_s"] = Path(png).stat().st_mtime - started
        Path(png).unlink()
    import re
    lines = p.stderr.replace("\r", "\n").splitlines()
    rec["log"] = [m.group(1) for m in map(re.compile(r"(\d+ ms (?:DEBUG|INFO): .*)$").search, lines) if m]
    rec["log"] += [s for s in lines if "image(s)" in s or "rror" in s][-3:]
    if p.returncode:
        rec["stderr"] = p.stderr[-3000:]
    res.setdefault(name, []).append(rec)
    print(name, {k: v for k, v in rec.items() if k != "log"}, flush=True)


def cli(name, prelude="", extra=()):
    png = str(OUT / "probe.png")
    args = ["-v", "generate", "--prompt", PROMPT, "--model", MODEL, "--seed", "1", "--output", png, "--overwrite",
            *extra]
    code = prelude + "import sys; from zimage.cli.main import main; sys.exit(main(sys.argv[1:]))"
    run(name, [sys.executable, "-c", code, *args], png)


os.sync()
variants = {
    "V0 no-early": "import zimage.weights.early_read as e; e.MARGIN = 1 << 60; ",
    "V1 early 16x16": "",
    "V2 early 8x64": "import zimage.weights.early_read as e; e.THREADS = 8; e.CHUNK = 64 << 20; ",
    "V3 early 4x64": "import zimage.weights.early_read as e; e.THREADS = 4; e.CHUNK = 64 << 20; ",
}
cli("warmup")
for _ in range(3):
    for name, prelude in variants.items():
        cli(name, prelude)
(OUT / "cold_probe_cli.json").write_text(json.dumps(res, indent=1))
