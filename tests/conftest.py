"""Shared fixtures: one tiny model folder per session, an fp32 CPU engine on it, and diffusers' reference pipeline.

Environment isolation: ZIMAGE_CACHE points at a session tmp dir (so `--model tiny-random` builds there), and every
test gets empty, private HF_HOME / HF_HUB_CACHE / MODELSCOPE_CACHE (no test can see or fill the user's caches),
with HF_HUB_OFFLINE=1 so nothing can be fetched by accident. Inductor's cache is the one thing shared between
sessions (TORCHINDUCTOR_CACHE_DIR: one folder under the system temp dir; its entries are keyed by their graphs' and
the build's hashes), so compiled tests do not pay a cold C++/Triton build every session; tests of the compile caches
themselves unset it (tests/test_compile_cache.py). The precompiled functions (zimage.speed.precompiled) are off
except where a test turns them on.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

SHARED_INDUCTOR_CACHE = os.path.join(tempfile.gettempdir(), f"zimage-tests-inductor-{os.getuid()}")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny random Z-Image folder in the published layout, built once. Treat as read-only (copy to modify)."""
    from zimage.weights.tiny import build_model_folder

    return build_model_folder(tmp_path_factory.mktemp("tiny") / "Z-Image-Tiny")


@pytest.fixture(scope="session")
def zimage_cache_dir(tmp_path_factory, tiny_folder) -> Path:
    """ZIMAGE_CACHE for the session, with tiny-random pre-placed (a copy of tiny_folder: no second build)."""
    from zimage.weights.tiny import TINY_VERSION

    cache = tmp_path_factory.mktemp("zimage-cache")
    shutil.copytree(tiny_folder, cache / f"tiny-random-v{TINY_VERSION}")
    return cache


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path_factory, zimage_cache_dir):
    """Every test: private empty caches, offline, zimage's cache pointing at the session's tiny-random."""
    root = tmp_path_factory.mktemp("env")
    monkeypatch.setenv("ZIMAGE_CACHE", str(zimage_cache_dir))
    monkeypatch.setenv("HF_HOME", str(root / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(root / "modelscope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", SHARED_INDUCTOR_CACHE)
    # Compiled tests run torch.compile's path: the precompiled functions compile every shape once more ahead of time
    # (minutes of C++ builds on a CI CPU). tests/test_precompiled.py and the compiled parity test turn them on.
    monkeypatch.setenv("ZIMAGE_PRECOMPILED", "0")


@pytest.fixture
def model_copy(tiny_folder, tmp_path) -> Path:
    """A private, modifiable copy of the tiny folder."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_folder, dst)
    return dst


@pytest.fixture
def count_loads(monkeypatch):
    """Counts Engine.load calls (still loading for real)."""
    from zimage.engine.engine import Engine

    calls = []
    real = Engine.load.__func__

    def load(cls, *a, **k):
        calls.append(a)
        return real(cls, *a, **k)

    monkeypatch.setattr(Engine, "load", classmethod(load))
    return calls


@pytest.fixture(scope="session")
def engine(tiny_folder):
    """An fp32 CPU engine on the tiny folder, loaded once. Tests must not change its state (cache aside)."""
    from zimage.engine.config import EngineConfig
    from zimage.engine.engine import Engine

    return Engine.load(EngineConfig(model=str(tiny_folder), device="cpu", dtype="fp32", speed="eager"))


@pytest.fixture(scope="session")
def reference_pipeline(tiny_folder):
    """diffusers' ZImagePipeline on the same folder, fp32 on CPU: the reference for parity."""
    import torch
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(str(tiny_folder), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pytest_configure(config):
    # The tiny model's ops are too small to gain from intra-op threads; on a 2-core machine shared with anything else,
    # OpenMP threads spin against each other and a run takes 2-4x longer (measured: parity tests 10 s of CPU with one
    # thread, 20-40 s with two under load). One thread unless the user chose (OMP_NUM_THREADS).
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(1)
