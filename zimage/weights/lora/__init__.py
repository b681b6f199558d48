"""LoRA files: every layout Z-Image LoRAs ship in, read into one normalised, validated form (nothing applied here).

    lora = read_lora("style.safetensors")        # LoraFile: format, hashes, networks {name: {module: LoraFactor}}
    validate(lora, linear_shapes(transformer))   # LoraError (exit code 2) naming the file, key and expectation
    describe(lora)                               # what `zimage lora inspect` prints

Imports only torch and safetensors: the runtime never imports diffusers, transformers or peft.
"""

from zimage.weights.lora.describe import describe, group_targets
from zimage.weights.lora.model import NETWORKS, TEXT_ENCODER, TRANSFORMER, LoraError, LoraFactor, LoraFile
from zimage.weights.lora.read import read_lora
from zimage.weights.lora.merge import linear_shapes
from zimage.weights.lora.validate import validate

__all__ = [
    "NETWORKS", "TEXT_ENCODER", "TRANSFORMER", "LoraError", "LoraFactor", "LoraFile", "describe", "group_targets",
    "linear_shapes", "read_lora", "validate",
]
