"""How the Ray Serve application is shaped: the engine deployment's replicas, resources and batching. One frozen
dataclass, a comment per field; the CLI (`zimage serve --ray`) and the application builder (`serve run`) fill it."""

from __future__ import annotations

from dataclasses import dataclass, replace

from zimage.errors import UsageError


@dataclass(frozen=True)
class EngineDeployment:
    replicas: int = 1  # fixed number of engine replicas (ignored when autoscale is set)
    autoscale: tuple[int, int] | None = None  # (min, max) replicas: Serve's autoscaler decides in between
    target_ongoing_requests: float | None = None  # per replica, what the autoscaler aims at; None: max_batch
    max_ongoing_requests: int | None = None  # calls a replica accepts at once (Serve queues the rest at the
    # router); None: 2 * max_batch, one batch running and one gathering
    max_batch: int = 8  # images per engine call: @serve.batch's max_batch_size
    batch_wait_s: float = 0.0  # @serve.batch's batch_wait_timeout_s: wait this long for companions
    num_gpus: float | None = None  # per replica; None: 0 on device cpu, else 1 when the cluster has GPUs
    num_cpus: float = 1.0  # per replica (Ray's accounting; a CPU replica also runs this many torch threads)
    torch_threads: int | None = None  # intra-op threads of a CPU replica; None: num_cpus

    def __post_init__(self):
        if self.autoscale is not None:
            lo, hi = self.autoscale
            if not 0 <= lo <= hi or hi < 1:
                raise UsageError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got {lo}:{hi}",
                                 param="autoscale")
        elif self.replicas < 1:
            raise UsageError(f"--replicas must be at least 1, got {self.replicas}", param="replicas")
        if self.max_batch < 1:
            raise UsageError(f"max_batch must be at least 1, got {self.max_batch}", param="max_batch")

    @property
    def max_replicas(self) -> int:
        return self.autoscale[1] if self.autoscale else self.replicas

    @property
    def ongoing(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_batch

    @property
    def capacity(self) -> int:
        """Calls all replicas accept at once at full scale: how many the ingress keeps in flight."""
        return self.max_replicas * self.ongoing


def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise UsageError(f"--autoscale takes MIN:MAX (e.g. 1:4), got {text!r}", param="autoscale") from None
    return lo, hi


# ServerSettings <-> EngineConfig: the server's settings hold the engine's (ServerSettings.engine).
def engine_of(settings):
    return settings.engine


def with_engine(settings, engine):
    return replace(settings, engine=engine)
