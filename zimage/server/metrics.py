"""Prometheus metrics on a private registry (several apps in one process, e.g. tests, do not collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

# seconds; spans a tiny CPU model (tens of ms) to a queued full-size batch (minutes)
_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class Metrics:
    def __init__(self, engine_getter=None):
        self.registry = r = CollectorRegistry()
        self.queue_depth = Gauge("zimage_queue_depth", "Jobs waiting to run", registry=r)
        self.running = Gauge("zimage_jobs_running", "Jobs in the batch now running", registry=r)
        self.jobs = Counter("zimage_jobs_total", "Jobs finished, by outcome", ["status"], registry=r)
        self.images = Counter("zimage_images_total", "Images generated", registry=r)
        self.errors = Counter("zimage_errors_total", "Errors, by kind (error code)", ["kind"], registry=r)
        self.batch_images = Histogram("zimage_batch_images", "Images per engine call",
                                      buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.queue_wait = Histogram("zimage_queue_wait_seconds", "Submission to start of run", buckets=_BUCKETS,
                                    registry=r)
        self.generation = Histogram("zimage_generation_seconds", "Engine time of a batch", buckets=_BUCKETS,
                                    registry=r)
        self.latency = Histogram("zimage_job_latency_seconds", "Submission to finished (succeeded jobs)",
                                 buckets=_BUCKETS, registry=r)
        self.http = Histogram("zimage_http_request_seconds", "HTTP request duration", ["route", "status"],
                              buckets=_BUCKETS, registry=r)
        r.register(_VramCollector(engine_getter or (lambda: None)))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _VramCollector:
    """GPU memory at scrape time (only when the engine runs on CUDA)."""

    def __init__(self, engine_getter):
        self.engine_getter = engine_getter

    def describe(self):
        return []

    def collect(self):
        engine = self.engine_getter()
        device = getattr(engine, "device", None)
        if device is None or getattr(device, "type", None) != "cuda":
            return
        import torch

        allocated = GaugeMetricFamily("zimage_vram_allocated_bytes", "CUDA memory held by tensors")
        reserved = GaugeMetricFamily("zimage_vram_reserved_bytes", "CUDA memory reserved by the caching allocator")
        peak = GaugeMetricFamily("zimage_vram_peak_bytes", "Peak CUDA memory held by tensors since start")
        allocated.add_metric([], torch.cuda.memory_allocated(device))
        reserved.add_metric([], torch.cuda.memory_reserved(device))
        peak.add_metric([], torch.cuda.max_memory_allocated(device))
        yield from (allocated, reserved, peak)
