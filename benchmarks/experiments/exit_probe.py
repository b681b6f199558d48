"""`zimage generate` wall time with the interpreter's teardown (main) and without it (entry): fresh processes,
interleaved, with their -v timelines. JSON to $OUT (benchmarks/results/exit_*).
Run on the GPU machine: python benchmarks/experiments/exit_probe.py (model built by `zimage make-tiny
/tmp/zimage-full --full-size --device cuda`)."""
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODEL = "/tmp/zimage-full"
OUT = Path(os.environ.get("OUT", "/tmp/out"))
PNG = OUT / "e.png"
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
ARGS = ["-v", "generate", "--prompt", "a red fox in fresh snow", "--model", MODEL, "--seed", "1", "--output", str(PNG),
        "--overwrite"]
VARIANTS = {
    "teardown (main)": ["-c", "import sys; from zimage.cli.main import main; sys.exit(main(sys.argv[1:]))"],
    "quick exit (-m zimage)": ["-m", "zimage"],
    "quick exit (-c entry)": ["-c", "from zimage.cli.main import entry; entry()"],
}


def run(entry: list[str]) -> dict:
    PNG.unlink(missing_ok=True)
    started, t = time.time(), time.perf_counter()
    p = subprocess.run([sys.executable, *entry, *ARGS], env=ENV, capture_output=True, text=True)
    wall = time.perf_counter() - t
    saved = PNG.stat().st_mtime - started
    timeline = [line for line in p.stderr.splitlines()
                if " ms " in line and ("imported" in line or "loaded zimage" in line or "saved" in line)]
    return {"rc": p.returncode, "wall_s": wall, "saved_s": saved, "after_saved_s": wall - saved,
            "stdout": p.stdout.strip(), "log": timeline}


def main() -> None:
    res = {k: [] for k in VARIANTS}
    run(VARIANTS["quick exit (-m zimage)"])  # untimed: page cache and kernel caches warm
    for _ in range(3):
        for name, entry in VARIANTS.items():
            res[name].append(run(entry))
            print(name, res[name][-1], flush=True)
    summary = {k: {m: statistics.median(r[m] for r in v) for m in ("wall_s", "saved_s", "after_saved_s")}
               for k, v in res.items()}
    print(json.dumps(summary, indent=1))
    (OUT / "exit_probe.json").write_text(json.dumps({"runs": res, "median": summary}, indent=1))


if __name__ == "__main__":
    main()
