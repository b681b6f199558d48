"""LoRAs in the engine: finding the files a request names, the set merged into the weights, the runtime slots.

Two ways to apply a set (zimage.weights.lora reads every layout into one form first, and checks it against the
loaded networks before anything changes):
- merged (`EngineConfig.loras`, the CLI's --lora, `serve --lora`): the deltas are folded into the weights in place
  (zimage.weights.lora.merge), before fp8 quantisation and fusion; zero cost per step. `Loras.set_merged` changes
  the set later: the previously merged layers are first put back exactly from the checkpoint.
- runtime (`EngineConfig.lora_slots` > 0, `serve --lora-dir`): every transformer linear is wrapped in
  zimage.models.lora.LoraLinear with `lora_slots` factor slots of rank `lora_rank`; each
  distinct set of a batch gets a slot (least recently used reused), each image row its set's slot, so one batch can
  mix sets. The set of a request is applied on top of the merged one.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections import OrderedDict
from pathlib import Path

from zimage.errors import UsageError
from zimage.lora_spec import LoraSpec

log = logging.getLogger("zimage")

SUFFIX = ".safetensors"


class LoraLibrary:
    """Where LoRA names point: a path (CLI, Python) or, for bare names, `lora_dir` (the server's folder). Read files
    are kept while their size and mtime are unchanged."""

    def __init__(self, lora_dir: str | os.PathLike | None = None):
        self.dir = Path(lora_dir).expanduser() if lora_dir else None
        self._files: dict = {}  # path -> ((size, mtime_ns), LoraFile)

    def path_of(self, name: str, names_only: bool = False) -> Path:
        """The file or PEFT folder `name` refers to. `names_only` (a server's clients): a bare name in the LoRA
        folder, never a path."""
        in_dir = self.dir is not None and "/" not in name and "\\" not in name and name not in (".", "..")
        if in_dir:
            for candidate in (self.dir / name, self.dir / f"{name}{SUFFIX}"):
                if candidate.is_file() or (candidate / "adapter_config.json").is_file():
                    return candidate
        if names_only:
            if not in_dir:
                raise UsageError(f"LoRA {name!r}: give the name of a LoRA in the server's folder (GET /v1/loras), "
                                 "not a path", param="loras")
            raise UsageError(f"no LoRA named {name!r} in the server's LoRA folder (GET /v1/loras lists them)",
                             param="loras")
        path = Path(name).expanduser()
        if not path.exists():
            where = f" or in {self.dir}" if self.dir is not None else ""
            raise UsageError(f"LoRA {name!r}: no such file{where}", param="lora")
        return path

    def read(self, spec: LoraSpec, names_only: bool = False):
        from zimage.weights.lora import read_lora

        path = self.path_of(spec.name, names_only)
        stat = _stat(path)
        cached = self._files.get(path)
        if cached is not None and cached[0] == stat:
            return cached[1]
        lora = read_lora(path)
        self._files[path] = (stat, lora)
        return lora

    def names(self) -> list[str]:
        """The names of the LoRAs in the folder, sorted, without reading them: .safetensors files (less the suffix)
        and PEFT folders; hidden entries are skipped."""
        if self.dir is None or not self.dir.is_dir():
            return []
        out = []
        for entry in sorted(self.dir.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.suffix == SUFFIX or (entry / "adapter_config.json").is_file():
                out.append(entry.stem if entry.suffix == SUFFIX else entry.name)
        return out

    def available(self) -> list:
        """Every LoRA in the folder (read, so that a broken one is reported here rather than per request): a list of
        (name, LoraFile or the LoraError that reading it raised)."""
        from zimage.weights.lora import LoraError

        out = []
        for name in self.names():
            try:
                out.append((name, self.read(LoraSpec(name))))
            except LoraError as e:
                out.append((name, e))
        return out


def _stat(path: Path):
    target = path / "adapter_model.safetensors" if path.is_dir() else path
    st = target.stat()
    return st.st_size, st.st_mtime_ns


def set_key(loras) -> tuple:
    """What identifies a set of (LoraFile, scale) pairs: the files' contents and the strengths."""
    return tuple(sorted((lora.sha256, scale) for lora, scale in loras))


def deltas(loras, network: str, device="cpu") -> dict:
    """{module: sum of scale * delta (out, in) fp32 on `device`} of a set of (LoraFile, scale) on `network`: the
    products run where the weights are (at full size ~250 of them, up to 10240 x 3840 each: seconds on a CPU)."""
    out = {}
    for lora, scale in loras:
        for module, f in lora.networks.get(network, {}).items():
            d = (f.up.to(device) @ f.down.to(device)) * (f.scale * scale)
            out[module] = out[module] + d if module in out else d
    return out


def stacked(loras) -> dict:
    """{module: (down (R, in), up (out, R))} of a set on the transformer: factors concatenated along the rank, every
    scale folded into up, so that up @ down is the set's delta (the runtime slot's content)."""
    import torch

    parts: dict = {}
    for lora, scale in loras:
        for module, f in lora.transformer.items():
            parts.setdefault(module, []).append((f.down, f.up * (f.scale * scale)))
    return {m: (torch.cat([d for d, _ in p]), torch.cat([u for _, u in p], dim=1)) for m, p in parts.items()}


class RuntimeSlots:
    """Which set each runtime slot holds, least recently used first (zimage.models.lora.LoraLinear layers)."""

    def __init__(self, transformer, targets, rows, slots: int, rank: int):
        self.transformer = transformer
        self.targets = frozenset(targets)  # unfused linear names, each computed by a LoraLinear (or a part of one)
        self.rows = rows  # zimage.models.lora.LoraRows shared by the layers
        self.rank = rank
        self.held: OrderedDict = OrderedDict((("free", i), i) for i in range(slots))  # key -> slot

    def slot_for(self, key: tuple, loras, pinned: set) -> int:
        """The slot holding set `key` (written now if it is not held); `pinned` slots (this batch's) stay."""
        if key in self.held:
            self.held.move_to_end(key)
            return self.held[key]
        victim = next((k for k, s in self.held.items() if s not in pinned), None)
        if victim is None:
            raise UsageError(f"a batch can hold {len(self.held)} different LoRA sets; this one needs more",
                             param="loras")
        slot = self.held.pop(victim)
        factors = stacked(loras)
        for module, (down, up) in factors.items():
            if down.shape[0] > self.rank:
                self.held[("free", slot)] = slot
                raise UsageError(f"this LoRA set has rank {down.shape[0]} on {module}; the engine's runtime slots "
                                 f"hold rank {self.rank} (start it with a larger --lora-rank)", param="loras")
        self.write(slot, factors)
        self.held[key] = slot
        return slot

    @contextlib.contextmanager
    def forcing_mixed(self):
        """Every batch takes the mixed-slot path while inside (the warm-up compiles its graph so)."""
        self.rows.force_mixed = True
        try:
            yield
        finally:
            self.rows.force_mixed = False

    def write(self, slot: int, factors: dict) -> None:
        """Slot `slot` of every target <- factors {name: (down, up)}; targets the set leaves out are cleared. Layers
        are looked up by name each time: zimage.speed.fuse may have fused q/k/v and w1/w3 into one layer each
        since the slots were installed (a name is then a part of the fused layer)."""
        from zimage.weights.lora.merge import find_module

        for name in self.targets:
            layer, part, _ = find_module(self.transformer, name)
            layer.write(slot, *factors.get(name, (None, None)), part=part)


def slot_bytes(transformer, slots: int, rank: int, dtype_bytes: int,
               widened: bool = False) -> tuple[dict[int, int], int]:
    """Bytes of the runtime slots on `transformer` (meta is fine): ({main block index: bytes}, bytes elsewhere).
    `widened`: the compiled plan's one-GEMM form adds one slot's up factors beside the widened weights
    (zimage.speed.lora_wide)."""
    from zimage.speed.lora_wide import extension_bytes
    from zimage.weights.lora import linear_shapes

    shapes = linear_shapes(transformer)
    per_block: dict[int, int] = {}
    rest = 0
    for name in runtime_targets(transformer):
        out_f, in_f = shapes[name]
        n = slots * rank * (in_f + out_f) * dtype_bytes  # lora_down (S, R, in) + lora_up (S, out, R)
        if widened:
            n += extension_bytes(name, out_f, rank, dtype_bytes)
        head, _, tail = name.partition(".")
        if head == "layers":
            i = int(tail.partition(".")[0])
            per_block[i] = per_block.get(i, 0) + n
        else:
            rest += n
    return per_block, rest


def runtime_targets(transformer) -> list[str]:
    """The linears a runtime slot can change: every linear of the transformer (each sees one row per image: the
    caption embedder too, which zimage.models.z_image_step runs on a (B, L, cap_dim) batch)."""
    from zimage.weights.lora import linear_shapes

    return list(linear_shapes(transformer))


class EngineLoras:
    """An engine's LoRA state: the merged set and, when enabled, the runtime slots."""

    def __init__(self, library: LoraLibrary, networks: dict, checked: dict, dtype):
        self.library = library
        self.networks = networks  # {"transformer": module, "text_encoder": module}
        self.checked = checked  # {network: CheckedNetwork}, to read merged layers' original weights back
        self.dtype = dtype
        self.merged: tuple = ()  # ((LoraFile, scale), ...) folded into the weights
        self.merged_specs: tuple = ()  # the LoraSpecs they were given as (names or paths), in the same order
        self._merged_modules: dict[str, set] = {}  # network -> modules whose weights differ from the checkpoint
        self.runtime: RuntimeSlots | None = None
        self._shapes = {net: None for net in networks}

    def shapes(self, network: str) -> dict:
        from zimage.weights.lora import linear_shapes

        if self._shapes[network] is None:
            self._shapes[network] = linear_shapes(self.networks[network])
        return self._shapes[network]

    def resolve(self, specs, names_only: bool = False) -> tuple:
        """((LoraFile, scale), ...) for `specs`, each read and checked against the loaded networks (LoraError naming
        the file and key if one does not fit): before anything is applied."""
        from zimage.lora_spec import check_loras
        from zimage.weights.lora import validate

        out = []
        for spec in check_loras(specs):
            lora = self.library.read(spec, names_only)
            for network in lora.networks:
                validate(lora, self.shapes(network), network=network)
            out.append((lora, spec.scale))
        return tuple(out)

    def set_merged(self, specs) -> bool:
        """Fold the set `specs` into the weights in place (replacing the merged set); True if anything changed.
        All files are read and checked first; then the layers the previous set changed get their checkpoint
        weights back, and the new deltas are added (fp32 sums, one rounding to the weights' dtype)."""
        from zimage.weights.load import read_original
        from zimage.weights.lora import merge

        from zimage.lora_spec import check_loras

        specs = check_loras(specs)
        loras = self.resolve(specs)
        if set_key(loras) == set_key(self.merged):
            self.merged_specs = specs
            return False
        for network, module in self.networks.items():
            new = deltas(loras, network, next(module.parameters()).device)
            old = self._merged_modules.get(network, set())
            checked = self.checked[network]

            def read(names, checked=checked):
                got = read_original(checked, [f"{n}.weight" for n in names], self.dtype)
                return {n: got[f"{n}.weight"] for n in names}

            if old:
                merge.restore(module, old, read)
            merge.merge(module, new)
            self._merged_modules[network] = set(new)
        self.merged, self.merged_specs = loras, specs
        log.info("LoRA merged: %s", ", ".join(f"{lora.name}:{scale:g}" for lora, scale in loras) or "none")
        return True

    def install_runtime(self, slots: int, rank: int) -> None:
        """Wrap the transformer's runtime targets in LoraLinear layers (`slots` slots of rank `rank`)."""
        from zimage.models.lora import wrap_linears

        transformer = self.networks["transformer"]
        targets = runtime_targets(transformer)
        rows, _ = wrap_linears(transformer, targets, slots, rank, self.dtype)
        self.runtime = RuntimeSlots(transformer, targets, rows, slots, rank)

    def row_slots(self, requests, names_only: bool = False) -> list[int] | None:
        """The runtime slot of each image of `requests` (-1: none), writing sets into slots as needed; None when no
        request asks for a LoRA beyond the merged set."""
        wanted = [r.loras for r in requests]
        if not any(wanted):
            return None
        keys, slots, pinned = {}, [], set()
        for r in requests:
            if not r.loras:
                slots += [-1] * r.num_images
                continue
            loras = self.check_runtime(r.loras, names_only)
            key = set_key(loras)
            if key not in keys:
                keys[key] = self.runtime.slot_for(key, loras, pinned)
                pinned.add(keys[key])
            slots += [keys[key]] * r.num_images
        return slots

    def check_runtime(self, specs, names_only: bool = False) -> tuple:
        """((LoraFile, scale), ...) of a per-request set, after every check a runtime slot makes (so that a server
        can refuse a request when it is submitted, not when its batch runs): each file read and fitting the
        networks, only layers the slots wrap, and the ranks summed within the slots' rank."""
        if self.runtime is None:
            raise UsageError("this engine applies LoRAs merged, as one set for every image (EngineConfig.loras, "
                             "--lora); per-request LoRAs need runtime slots (EngineConfig.lora_slots, "
                             "serve --lora-dir)", param="loras")
        loras = self.resolve(specs, names_only)
        ranks: dict[str, int] = {}
        for lora, _ in loras:
            outside = [m for m in lora.transformer if m not in self.runtime.targets]
            if lora.text_encoder or outside:
                what = "the text encoder" if lora.text_encoder else outside[0]
                raise UsageError(f"LoRA {lora.name!r} changes {what}, which per-request LoRAs cannot: apply it "
                                 "merged (--lora when the engine starts)", param="loras")
            for module, f in lora.transformer.items():
                ranks[module] = ranks.get(module, 0) + f.down.shape[0]
        for module, rank in ranks.items():
            if rank > self.runtime.rank:
                raise UsageError(f"this LoRA set has rank {rank} on {module}; the engine's runtime slots "
                                 f"hold rank {self.runtime.rank} (start it with a larger --lora-rank)", param="loras")
        return loras
