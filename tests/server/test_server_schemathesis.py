"""Schemathesis over the whole OpenAPI schema, against a live server with the tiny model and an API key: no 500,
no response that the schema does not describe (status, content type, headers, body), invalid data refused, the
key enforced, 405s with their Allow header. It runs in CI (marked slow) so that what it found stays fixed.

Two checks are left out, each for a reason that is the API's design, not a defect:
- positive_data_acceptance: the schema cannot say every rule (sizes in 256..2048 by 16, background
  'transparent' refused, a seed bound near 2**63 that JSON tools compare as a float), so some requests valid by
  the schema are rightly 400s;
- use_after_free: DELETE cancels a job, it does not delete it: the cancelled job stays readable.
The engine runs every request at 256x256 in 1 step (the HTTP layer is what is tested; schemathesis asks for
2048x2048 x 16 images at 100 steps, hours on a CPU). ZIMAGE_SCHEMATHESIS_SEED picks another seed to hunt further.
"""

import dataclasses
import os
import subprocess
import sys

import pytest

KEY = "schemathesis-key-0123456789"
SEED = os.environ.get("ZIMAGE_SCHEMATHESIS_SEED", "20261201")


class SmallEngine:
    """The tiny engine, every request made at the smallest size and one step."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate_many(self, requests, on_progress=None, cancels=None):
        small = [dataclasses.replace(r, width=256, height=256, steps=1) for r in requests]
        return self.engine.generate_many(small, on_progress, cancels)


@pytest.mark.slow
def test_schemathesis_finds_nothing(make_live, engine, tmp_path):
    live = make_live(engine_=SmallEngine(engine), api_key=KEY, max_queue=1000)
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", live.url + "/openapi.json",
           "--header", f"Authorization: Bearer {KEY}", "--checks", "all",
           "--exclude-checks", "positive_data_acceptance,use_after_free",
           "--max-examples", "15", "--workers", "1", "--seed", SEED, "--generation-database", "none",
           "--request-timeout", "120", "--max-response-time", "120", "--no-color"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=540, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-3000:]
    assert "13/13" in run.stdout  # every operation of the schema was selected (incl. GET /v1/loras, POST /v1/images/edits)
