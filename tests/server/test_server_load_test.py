"""Smoke test of benchmarks/load_test.py (the entrypoint must run): a few requests, in-process server."""

import json
import runpy
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "load_test.py"


def test_load_test_runs_and_writes_json(tmp_path, capsys):
    main = runpy.run_path(str(SCRIPT))["main"]
    out = tmp_path / "load.json"
    rc = main(["--requests", "4", "--clients", "2", "--steps", "1", "--max-batch", "2", "--output", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["server"]["images"] == 4 and result["server"]["failed"] == 0
    assert result["throughput_ratio"] > 0 and result["device"].startswith("cpu")
    assert "throughput ratio" in capsys.readouterr().out
