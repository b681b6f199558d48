"""Exploration, run at commit 0c6b51a plus its THREADS/CHUNK constants (the early read; gone since): what beside
`import torch` slows it. JSON to $OUT (benchmarks/results/import_contention_*)."""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

MODEL = os.environ.get("ZIMAGE_BENCH_MODEL", "/tmp/zimage-full")
OUT = Path(os.environ.get("OUT", "/tmp/out"))
ROOT = Path(__file__).resolve().parents[2]

CHILD = r'''
import os, sys, time, threading
t0 = time.perf_counter()
variant = sys.argv[1]
sys.path.insert(0, %r)
from zimage.weights import early_read as E
model = %r
done = {}
class NoCopy(E.CudaDriver):
    def copy_to_device(self, dst, src, n, stream): pass
class NoRead(E.CudaDriver):
    pass
def bg():
    t = time.perf_counter()
    if variant == "ctx":
        d = E.CudaDriver(); d.init(0)
    elif variant == "ctx+pin":
        d = E.CudaDriver(); d.init(0)
        bufs = [d.host_alloc(64 << 20) for _ in range(16)]
    elif variant.startswith("early"):
        _, threads, chunk = variant.split(":")
        E.THREADS, E.CHUNK = int(threads), int(chunk) << 20
        E.start(model, "cuda"); E._decided.wait()
        if E._active is None: raise SystemExit("no early read")
        while not all(f.done.is_set() for f in E._active.order): time.sleep(0.005)
    elif variant.startswith("nocopy"):
        _, threads, chunk = variant.split(":")
        E.THREADS, E.CHUNK = int(threads), int(chunk) << 20
        E.start(model, "cuda", driver_factory=NoCopy); E._decided.wait()
        while not all(f.done.is_set() for f in E._active.order): time.sleep(0.005)
    elif variant.startswith("pread"):
        threads = int(variant.split(":")[1])
        files = E.plan_files(E.Path(model))
        jobs = [(f.path, off) for f in files for off in range(0, f.nbytes, 64 << 20)]
        lock = threading.Lock()
        def work():
            buf = bytearray(64 << 20); view = memoryview(buf)
            fds = {}
            while True:
                with lock:
                    if not jobs: return
                    p, off = jobs.pop()
                fd = fds.get(p) or fds.setdefault(p, os.open(p, os.O_RDONLY))
                os.preadv(fd, [view], off)
        ws = [threading.Thread(target=work) for _ in range(threads)]
        [w.start() for w in ws]; [w.join() for w in ws]
    done["bg_s"] = time.perf_counter() - t
th = None
if variant != "none":
    th = threading.Thread(target=bg, daemon=True); th.start()
t = time.perf_counter()
import torch
torch.cuda.init()
imp = time.perf_counter() - t
if th: th.join()
print("RESULT", imp, done.get("bg_s", 0.0), time.perf_counter() - t0)
''' % (str(ROOT), MODEL)

variants = ["none", "ctx", "ctx+pin", "pread:8", "nocopy:8:64", "early:8:64", "early:2:64", "early:16:16"]
res = {v: [] for v in variants}
for rep in range(5):
    for v in variants:
        p = subprocess.run([sys.executable, "-c", CHILD, v], capture_output=True, text=True, timeout=120)
        line = [s for s in p.stdout.splitlines() if s.startswith("RESULT")]
        if not line:
            res[v].append({"error": p.stderr[-1500:]})
            print(v, "ERROR", p.stderr[-1500:], flush=True)
            continue
        imp, bg, total = map(float, line[0].split()[1:])
        res[v].append({"import_s": imp, "bg_s": bg, "total_s": total})
        print(rep, v, round(imp, 2), round(bg, 2), flush=True)
summary = {v: {k: statistics.median(r[k] for r in rs if k in r) for k in ("import_s", "bg_s", "total_s")}
           for v, rs in res.items() if any("import_s" in r for r in rs)}
for v, s in summary.items():
    print(f"{v:14s} import {s['import_s']:.2f}  background {s['bg_s']:.2f}  total {s['total_s']:.2f}")
(OUT / "import_contention.json").write_text(json.dumps({"runs": res, "median": summary}, indent=1))
