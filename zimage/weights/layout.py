"""The published folder layout of Z-Image-Turbo (diffusers format), as data.

    model_index.json
    transformer/   config.json, diffusion_pytorch_model-0000N-of-0000M.safetensors (+ .index.json)   fp32, 24.6 GB
    text_encoder/  config.json, model-0000N-of-0000M.safetensors (+ .index.json)                       bf16, 8 GB
    vae/           config.json, diffusion_pytorch_model.safetensors                                     168 MB
    tokenizer/     tokenizer.json / vocab.json + merges.txt, tokenizer_config.json (chat template)
    scheduler/     scheduler_config.json
"""

from dataclasses import dataclass

DEFAULT_MODEL_ID = "Tongyi-MAI/Z-Image-Turbo"
TINY_MODEL_ID = "tiny-random"


@dataclass(frozen=True)
class WeightComponent:
    name: str  # sub-folder
    config_file: str  # json that builds the network
    weights_stem: str  # "diffusion_pytorch_model" -> diffusion_pytorch_model.safetensors or its shards + index


TRANSFORMER = WeightComponent("transformer", "config.json", "diffusion_pytorch_model")
TEXT_ENCODER = WeightComponent("text_encoder", "config.json", "model")
VAE = WeightComponent("vae", "config.json", "diffusion_pytorch_model")
WEIGHT_COMPONENTS = (TRANSFORMER, TEXT_ENCODER, VAE)

TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))  # either set suffices
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
MODEL_INDEX = "model_index.json"

# How to get the real weights; shown whenever they are not found.
HOW_TO_GET = (
    "Get the weights with one of:\n"
    "  zimage download                                   (Hugging Face, ~33 GB)\n"
    "  hf download Tongyi-MAI/Z-Image-Turbo\n"
    "  modelscope download --model Tongyi-MAI/Z-Image-Turbo\n"
    "or pass --model /path/to/folder. To try zimage without weights: --model tiny-random (images are noise)."
)
