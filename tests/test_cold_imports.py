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


def test_the_driver_init_thread_starts_only_for_cuda_devices_on_linux(monkeypatch):
    import sys

    from zimage.engine import driver_init

    calls = []
    monkeypatch.setattr(driver_init, "_init", calls.append)
    for device in ("cpu", "mps", "cuda:x"):
        assert driver_init.start_in_background(device) is None
    monkeypatch.setattr(sys, "platform", "darwin")
    assert driver_init.start_in_background("cuda") is None
    monkeypatch.setattr(sys, "platform", "linux")
    for device in ("auto", "cuda", "cuda:1"):
        driver_init.start_in_background(device).join()
    assert calls == [0, 0, 1]  # the ordinal whose primary context is retained


def test_the_driver_init_is_silent_without_a_driver(monkeypatch):
    import ctypes

    from zimage.engine import driver_init

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(ctypes, "CDLL", missing)
    driver_init._init(0)  # no exception: torch reports the missing GPU itself


def test_the_driver_init_stops_at_the_first_failing_call(monkeypatch):
    import ctypes

    from zimage.engine import driver_init

    calls = []

    class Driver:  # cuInit succeeds, there is no device 3: the context is not asked for
        def __getattr__(self, name):
            return lambda *args: calls.append(name) or (100 if name == "cuDeviceGet" else 0)

    monkeypatch.setattr(ctypes, "CDLL", lambda name: Driver())
    driver_init._init(3)
    assert calls == ["cuInit", "cuDeviceGet"]
