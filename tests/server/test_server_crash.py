"""Crash safety, for real: a server subprocess, jobs submitted, `kill -9` while one runs, a restart. Every accepted
job then finishes, exactly once: finished jobs are not re-run, the interrupted one runs again."""

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from zimage.server.launch import free_port

N_JOBS = 6
BODY = {"size": "256x256", "num_inference_steps": 60}  # ~0.5 s a job with the tiny model on CPU


def start(data_dir, port, log):
    cmd = [sys.executable, "-m", "zimage.server", "--model", "tiny-random", "--device", "cpu", "--data-dir",
           str(data_dir), "--port", str(port), "--warmup-size", "none", "--max-batch", "1", "--no-previews"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the server exited"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError("server did not start")


def jobs(url):
    return {j["id"]: j for j in httpx.get(url + "/v1/jobs?limit=100").json()["data"]}


@pytest.mark.slow
def test_kill_9_mid_run_then_restart_finishes_every_job_once(tmp_path):
    data, logs = tmp_path / "data", [tmp_path / "run1.log", tmp_path / "run2.log"]
    port = free_port()
    with open(logs[0], "wb") as log:
        proc, url = start(data, port, log)
        try:
            ids = [httpx.post(url + "/v1/jobs", json={**BODY, "prompt": f"job {i}", "seed": i}).json()["id"]
                   for i in range(N_JOBS)]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # kill once some finished and one is mid-run
                state = jobs(url)
                done = [i for i in ids if state[i]["status"] == "succeeded"]
                running = [i for i in ids if state[i]["status"] == "running"]
                if len(done) >= 1 and running and (state[running[0]]["progress"] or {}).get("phase") == "denoise":
                    break
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert done and running and len(done) < N_JOBS, "the kill did not land mid-run"
    before = {i: state[i] for i in done}

    with open(logs[1], "wb") as log:
        proc, url = start(data, port, log)
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                after = jobs(url)
                if all(after[i]["status"] == "succeeded" for i in ids):
                    break
                time.sleep(0.1)
            for i in ids:
                assert after[i]["status"] == "succeeded", after[i]
                assert len(after[i]["images"]) == 1
                assert httpx.get(url + after[i]["images"][0]["url"]).status_code == 200
            for i in done:  # finished before the crash: untouched
                assert after[i]["finished"] == before[i]["finished"] and after[i]["attempts"] == 1
            assert after[running[0]]["attempts"] == 2  # interrupted, then run again
        finally:
            proc.terminate()
            proc.wait(30)
    text = "".join(p.read_text(errors="replace") for p in logs)
    for i in ids:  # each job completed exactly once across both runs
        assert text.count(f"job {i} succeeded") == 1, (i, text[-3000:])
    assert "recovered" in logs[1].read_text()
