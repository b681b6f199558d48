"""zimage.weights.early_read: the weights read into GPU buffers while torch imports. The CUDA driver is replaced by
a fake whose copies are deferred until their event is waited for (as a real async copy may land late), so a staging
buffer reused too early would show as wrong bytes; the GPU path itself is tested where a GPU is."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import pytest
import torch

from zimage.weights import early_read
from zimage.weights.safetensors_files import read_header


class FakeDriver:
    def __init__(self, free=2**40, devices=1):
        self.free_bytes = free
        self.devices = devices
        self.memory: dict[int, bytearray] = {}  # base address -> device buffer
        self.host: dict[int, bytearray] = {}
        self.ids = itertools.count(1 << 20, 1 << 40)
        self.lock = threading.Lock()
        self.inited = None

    def init(self, ordinal):
        if ordinal >= self.devices:
            raise RuntimeError("cuDeviceGet returned CUresult 101")
        self.inited = ordinal

    def bind(self):
        pass

    def free_memory(self):
        return self.free_bytes

    def alloc(self, n):
        with self.lock:
            p = next(self.ids)
            self.memory[p] = bytearray(n)
        return p

    def free(self, p):
        del self.memory[p]

    def host_alloc(self, n):
        with self.lock:
            p = next(self.ids)
            self.host[p] = bytearray(n)
        return p, memoryview(self.host[p])

    def host_free(self, p):
        del self.host[p]

    def stream(self):
        return []  # pending copies

    def event(self):
        return {}

    def copy_to_device(self, dst, src, n, stream):
        stream.append((dst, src, n))

    def record(self, event, stream):
        event["copies"] = list(stream)
        stream.clear()

    def wait(self, event):
        for dst, src, n in event.pop("copies", []):  # the copy happens now, from what the staging buffer holds now
            base = max(b for b in self.memory if b <= dst)
            self.memory[base][dst - base:dst - base + n] = self.host[src][:n]

    def destroy(self, stream, events):
        assert not stream


def _data_sections(folder: Path) -> dict[Path, bytes]:
    out = {}
    for f in early_read.plan_files(folder):
        out[f.path] = f.path.read_bytes()[f.data_start:f.data_start + f.nbytes]
    return out


def test_files_are_planned_in_loading_order_with_their_data_sections(tiny_folder):
    files = early_read.plan_files(tiny_folder)
    folders = [f.path.parent.name for f in files]
    assert folders == sorted(folders, key=["vae", "text_encoder", "transformer"].index)
    assert set(folders) == {"vae", "text_encoder", "transformer"}
    for f in files:
        infos = read_header(f.path)
        assert min(i.begin for i in infos.values()) == f.data_start
        assert max(i.end for i in infos.values()) == f.data_start + f.nbytes


@pytest.mark.parametrize("threads,chunk", [(1, 64), (3, 24), (4, 1 << 20)])
def test_every_file_lands_byte_exact_in_its_buffer(tiny_folder, threads, chunk):
    driver = FakeDriver()
    files = early_read.plan_files(tiny_folder)
    reads = early_read.EarlyReads(driver, files, threads, chunk)
    reads.run()
    assert reads.error is None
    expected = _data_sections(tiny_folder)
    for f in files:
        assert f.done.is_set() and f.pending == 0
        assert bytes(driver.memory[f.pointer][:f.nbytes]) == expected[f.path]
    assert driver.host == {}  # staging buffers freed
    reads.release_all()
    assert driver.memory == {} and reads.outstanding_bytes() == 0


def test_copies_from_the_buffers_equal_the_normal_load(tiny_folder):
    """The take step (views of each file's data section -> cast copies) on CPU stand-ins for the GPU buffers."""
    from zimage.weights.check import check_model_folder
    from zimage.weights.load import load_network

    checked = check_model_folder(tiny_folder)
    sections = _data_sections(tiny_folder)
    raw = {p: (torch.frombuffer(bytearray(b), dtype=torch.uint8), f.data_start)
           for f in early_read.plan_files(tiny_folder) for p, b in [(f.path, sections[f.path])]}
    for name in ("vae", "text_encoder", "transformer"):
        tensors = checked[name].tensors
        got = early_read._copies(tensors, {info.file: raw[info.file.resolve()] for _, info in tensors.values()},
                                 torch.bfloat16)
        ref = dict(load_network(checked[name], "cpu", torch.bfloat16).state_dict())
        assert set(got) == set(ref)
        for k, t in got.items():
            assert t.dtype == ref[k].dtype and torch.equal(t, ref[k]), k


def test_a_failed_read_wakes_the_waiters_and_leaves_the_work_to_the_normal_reader(tiny_folder):
    driver = FakeDriver()
    files = early_read.plan_files(tiny_folder)
    files[-1] = early_read.FileBuffer(files[-1].path, files[-1].data_start, files[-1].nbytes + 4096)  # past the end
    reads = early_read.EarlyReads(driver, files, 2, 64)
    reads.run()
    assert reads.error is not None and "ended at byte" in reads.error
    assert all(f.done.is_set() for f in files)
    assert not reads.has([files[0].path])
    assert reads.take({}, "cpu", torch.bfloat16) is None
    assert driver.memory == {}  # every buffer freed


@pytest.fixture
def fresh_state(monkeypatch):
    monkeypatch.setattr(early_read, "_active", None)
    yield
    early_read._decided.set()


def _start(model, device="cuda", driver=None, **kw):
    thread = early_read.start(str(model), device, 2, driver_factory=lambda: driver or FakeDriver(), **kw)
    if thread is not None:
        thread.join()
    return thread


def test_started_only_for_cuda_devices_on_linux(tiny_folder, monkeypatch, fresh_state):
    for device in ("cpu", "mps", "cuda:x"):
        assert _start(tiny_folder, device) is None
    monkeypatch.setattr(early_read.sys, "platform", "darwin")
    assert _start(tiny_folder, "cuda") is None
    monkeypatch.setattr(early_read.sys, "platform", "linux")
    driver = FakeDriver(devices=2)
    assert _start(tiny_folder, "cuda:1", driver) is not None
    assert driver.inited == 1
    assert early_read.active() is not None and early_read.active().error is None
    early_read.finish()
    assert driver.memory == {}


@pytest.mark.parametrize("case", ["no driver", "not allowed", "no room", "tiny", "missing model"])
def test_the_driver_is_initialised_but_nothing_read_when_it_cannot_help(tiny_folder, monkeypatch, fresh_state, case):
    monkeypatch.setattr(early_read.sys, "platform", "linux")
    total = sum(f.nbytes for f in early_read.plan_files(tiny_folder))
    driver = FakeDriver(free=total if case == "no room" else 2**40, devices=0 if case == "no driver" else 1)
    model = {"tiny": "tiny-random", "missing model": tiny_folder / "nowhere"}.get(case, tiny_folder)
    _start(model, "auto", driver, allowed=case != "not allowed")
    assert early_read.active() is None
    assert driver.memory == {}
    assert driver.inited == (None if case == "no driver" else 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_the_gpu_networks_load_from_the_early_buffers_exactly(tiny_folder, monkeypatch, fresh_state):
    from zimage.weights import load
    from zimage.weights.check import check_model_folder

    torch.cuda.init()
    driver = early_read.CudaDriver()
    driver.init(torch.cuda.current_device())
    reads = early_read.EarlyReads(driver, early_read.plan_files(tiny_folder), 3, 1 << 16)
    reads.run()
    assert reads.error is None
    monkeypatch.setattr(early_read, "_active", reads)
    device = torch.device("cuda", torch.cuda.current_device())
    early, normal = check_model_folder(tiny_folder), check_model_folder(tiny_folder)
    for name in ("vae", "text_encoder", "transformer"):
        got = load.load_network(early[name], device, torch.bfloat16)
        assert load.LAST_STATS[f"{name}_from"] == "GPU buffers read during the import"
        monkeypatch.setattr(early_read, "_active", None)
        ref = load.load_network(normal[name], device, torch.bfloat16)
        monkeypatch.setattr(early_read, "_active", reads)
        ref_state = ref.state_dict()
        for k, a in got.state_dict().items():
            b = ref_state[k]
            assert (a.device, a.dtype, a.shape) == (b.device, b.dtype, b.shape), k
            assert torch.equal(a, b), f"{name} {k}: max diff {(a.float() - b.float()).abs().max()}"
    loaded = {info.file.resolve() for c in early.values() for _, info in c.tensors.values()}
    left = {f.path for f in reads.files.values() if f.pointer}
    assert not left & loaded  # all taken; only files holding nothing the networks use (skipped layers) are left
    early_read.finish()
    assert reads.outstanding_bytes() == 0
