"""zimage.weights.pinned_read: chunking, offsets, dtype views and casts, checked on the CPU against safetensors
(the CUDA path differs only in where the copies go: pinned staging, a side stream and events)."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from zimage.weights.pinned_read import read_tensors
from zimage.weights.safetensors_files import read_header


@pytest.fixture
def stored(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a.weight": torch.randn(37, 11, generator=g),  # fp32, not a multiple of the chunk
        "b.bias": torch.randn(5, generator=g).to(torch.bfloat16),
        "c.big": torch.randn(300, 7, generator=g),  # spans many chunks
        "d.ids": torch.arange(13, dtype=torch.int64),  # not floating point: keeps its dtype
        "e.scalar": torch.tensor(2.5),
    }
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    return path, tensors


@pytest.mark.parametrize("chunk", [8, 24, 64 * 2**20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reads_every_tensor_as_safetensors_does(stored, chunk, dtype):
    path, tensors = stored
    header = read_header(path)
    items = [(f"target.{k}", header[k]) for k in tensors]
    seen = []
    out = read_tensors(items, "cpu", dtype, progress=seen.append, chunk=chunk)
    with safe_open(str(path), framework="pt") as f:
        for k in tensors:
            ref = f.get_tensor(k)
            if ref.is_floating_point():
                ref = ref.to(dtype)
            got = out[f"target.{k}"]
            assert got.dtype == ref.dtype and got.shape == ref.shape
            assert torch.equal(got, ref), k
    assert sum(seen) == sum(t.numel() * t.element_size() for t in tensors.values())
    if chunk == 8:
        assert max(seen) <= 8  # really read in chunks


def test_bad_chunk_and_size_mismatch(stored, tmp_path):
    path, _ = stored
    header = read_header(path)
    with pytest.raises(ValueError, match="multiple of 8"):
        read_tensors([("x", header["a.weight"])], "cpu", torch.float32, chunk=12)
    from dataclasses import replace

    wrong = replace(header["a.weight"], end=header["a.weight"].end - 4)
    with pytest.raises(ValueError, match="a.weight|x"):
        read_tensors([("x", wrong)], "cpu", torch.float32)


def test_truncated_file_is_a_clear_error(stored):
    path, _ = stored
    header = read_header(path)
    data = path.read_bytes()
    path.write_bytes(data[: header["c.big"].begin + 100])  # cut inside c.big
    with pytest.raises(OSError, match="ended at byte"):
        read_tensors([("x", header["c.big"])], "cpu", torch.float32)


def test_staging_buffers_are_pinned_ahead_only_for_gpu_reads(monkeypatch):
    import torch

    from zimage.weights import load, pinned_read

    monkeypatch.setattr(pinned_read, "_prewarm", None)
    started = []
    monkeypatch.setattr(pinned_read, "prewarm", lambda readers: started.append(readers))
    load.prepare_reads(torch.device("cpu"))
    assert started == []
    load.prepare_reads(torch.device("cuda", 0))
    assert started == [load.READ_THREADS]
    monkeypatch.setattr(load, "PINNED_READS", False)  # the safetensors reader pins nothing
    load.prepare_reads(torch.device("cuda", 0))
    assert started == [load.READ_THREADS]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_reads_are_exact_while_another_thread_allocates_and_frees_on_the_default_stream(tmp_path):
    """The warm start runs kernels on the default stream while the weights load; blocks it frees with kernels still
    queued must not become weights written from the reading streams (this once gave NaN weights)."""
    import threading

    g = torch.Generator().manual_seed(0)
    tensors = {f"w{i}": torch.randn(1024, 1024, generator=g) for i in range(48)}  # fp32, cast to bf16 on the GPU
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    header = read_header(path)
    stop = threading.Event()

    def churn():  # allocates and frees blocks of the weights' size with kernels still queued
        a = torch.randn(1024, 1024, device="cuda", dtype=torch.bfloat16)
        while not stop.is_set():
            for _ in range(20):
                b = a @ a  # (1024, 1024) bf16: the blocks the reads allocate
                b.mul_(3.0)
                del b

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(5):
            got = read_tensors(list(header.items()), "cuda", torch.bfloat16)
            for name, t in tensors.items():
                assert torch.equal(got[name].cpu(), t.to(torch.bfloat16)), name
    finally:
        stop.set()
        thread.join()
