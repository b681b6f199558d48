"""Cold start: loading the engine and making an image (eager) must not import diffusers, transformers or
torch._dynamo; on the GPU machine those imports cost 6-13 s, more than reading the weights (BENCHMARKS.md)."""

import subprocess
import sys

HEAVY = ("diffusers", "transformers", "torch._dynamo", "sklearn", "peft")

SCRIPT = """
import sys
from zimage import Engine, EngineConfig
from zimage.request import GenerateRequest
engine = Engine.load(EngineConfig(model=sys.argv[1], device="cpu", speed="eager"))
engine.generate(GenerateRequest(prompts=("a fox",), width=256, height=256, steps=1, seed=0))
print(",".join(m for m in sys.modules if m in {heavy!r}))
"""


def test_engine_load_and_generate_import_no_heavy_library(tiny_folder):
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(heavy=HEAVY), str(tiny_folder)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"

