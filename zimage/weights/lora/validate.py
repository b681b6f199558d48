"""Checking a read LoRA against the network it is for, before anything is applied.

read_lora already refused what no Z-Image network has (unknown names, other models, LoKr/LoHa/DoRA, rank
mismatches between down and up, leftover keys). This checks what depends on the model actually loaded: that every
module exists in it (a layer index past the last layer, adaLN_modulation on a context_refiner block) and that each
update has the module's weight shape (a LoRA for a model of another size).
"""

from __future__ import annotations

from zimage.weights.lora.model import TRANSFORMER, LoraError, LoraFile
from zimage.weights.lora.names import EXPECTED, NETWORK_WORDS


def validate(lora: LoraFile, shapes: dict[str, tuple[int, int]], *, network: str = TRANSFORMER) -> None:
    """LoraError naming the file, the first offending key (in file key order) and what was expected, if a factor of
    `lora.networks[network]` targets a module missing from `shapes` or does not fit its (out, in) weight."""
    factors = lora.networks.get(network, {})
    for module, f in sorted(factors.items(), key=lambda mf: mf[1].key):
        if module not in shapes:
            raise LoraError(lora.path, f"module {module!r} matches no module of {NETWORK_WORDS[network]} "
                                       f"(it has {len(shapes)} linear layers); {EXPECTED[network]}", f.key)
        out, inp = shapes[module]
        if (f.out_features, f.in_features) != (out, inp):
            raise LoraError(lora.path, f"does not fit module {module!r}: the LoRA's update is (out, in) = "
                                       f"({f.out_features}, {f.in_features}) (up {tuple(f.up.shape)}, down "
                                       f"{tuple(f.down.shape)}) but the module's weight is ({out}, {inp}); a LoRA "
                                       "for a model of another size?", f.key)
