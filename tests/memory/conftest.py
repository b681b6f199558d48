"""Fixtures for the memory tests: the published sizes (meta-built, no weights) and a private tiny CPU engine."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def published_sizes():
    from zimage.memory.sizes import published_model_sizes

    return published_model_sizes()


@pytest.fixture(scope="module")
def own_engine(tiny_folder):
    """A tiny fp32 CPU engine these tests may re-plan (the session `engine` must keep its state)."""
    from zimage.engine.config import EngineConfig
    from zimage.engine.engine import Engine

    return Engine.load(EngineConfig(model=str(tiny_folder), device="cpu", dtype="fp32", speed="eager"))
